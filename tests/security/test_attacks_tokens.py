"""Token semantics through the real proxy: every type at every level, wrong audience,
issuer and times, the per-level key, type confusion, signature stripping, the cache."""

from __future__ import annotations

import asyncio
import base64
import functools
import time
from pathlib import Path

import pytest

from authproxy.decide.reasons import Denied, Reason
from authproxy.keys.issuer import TokenIssuer
from authproxy.keys.keyset import KeySet, load_jwks_file
from authproxy.keys.verify import TokenVerifier
from authproxy.policy.loader import parse_policy
from tests.support.attacks import (
    METHODS,
    Case,
    assert_allowed,
    assert_denied,
    level_key,
)
from tests.support.echo_backend import EchoBackend
from tests.support.jws import LEVELS, Raw, b64url, claims, craft, pairs, signed
from tests.support.keys import Keys
from tests.support.policies import TEST_POLICY
from tests.support.running_proxy import RunningProxy, start_sidecar

# --- token types, audiences, issuers, times ----------------------------------------------

TOKEN_LEVELS = ("2fa", "refresh", "access")


@pytest.mark.parametrize("presented", TOKEN_LEVELS)
@pytest.mark.parametrize("required", TOKEN_LEVELS)
async def test_token_type_matrix(
    proxy: RunningProxy, backend: EchoBackend, issuer: TokenIssuer, presented, required
):
    token = issuer.mint(presented, "alice", ttl=300).token
    if presented == required:
        report = await assert_allowed(proxy, token, METHODS[required])
        assert report["md"]["x-auth-token-type"] == [LEVELS[required][0]]
    else:
        case = Case("wrong-type", "WRONG_TOKEN_TYPE", token, method=METHODS[required])
        await assert_denied(proxy, backend, [case])


@pytest.mark.parametrize("level", TOKEN_LEVELS)
async def test_right_type_with_wrong_claims(
    proxy: RunningProxy, backend: EchoBackend, keys: Keys, issuer: TokenIssuer, level
):
    now = int(time.time())
    sk = level_key(keys, level)
    mint = functools.partial(issuer.mint, level, "alice")
    cases = [
        ("wrong-audience", "WRONG_AUDIENCE", mint(ttl=300, extra={"aud": "other-api"}).token),
        (
            "audience-list-without-ours",
            "WRONG_AUDIENCE",
            mint(ttl=300, extra={"aud": ["a", "b"]}).token,
        ),
        (
            "other-level-audience",
            "WRONG_AUDIENCE",
            mint(
                ttl=300, extra={"aud": "api-access" if level != "access" else "token-refresh"}
            ).token,
        ),
        ("audience-number", "INVALID_CLAIM", mint(ttl=300, extra={"aud": 1}).token),
        ("empty-audience-list", "INVALID_CLAIM", mint(ttl=300, extra={"aud": []}).token),
        ("wrong-issuer", "WRONG_ISSUER", mint(ttl=300, extra={"iss": "evil-issuer"}).token),
        ("issuer-case", "WRONG_ISSUER", mint(ttl=300, extra={"iss": "Test-Issuer"}).token),
        ("expired", "TOKEN_EXPIRED", mint(ttl=-60).token),
        ("expired-just-past-leeway", "TOKEN_EXPIRED", mint(ttl=-7).token),
        ("nbf-in-future", "TOKEN_NOT_YET_VALID", mint(ttl=300, extra={"nbf": now + 120}).token),
        ("iat-in-future", "TOKEN_NOT_YET_VALID", mint(ttl=300, extra={"iat": now + 120}).token),
        ("no-type", "MISSING_CLAIM", signed(sk, claims(level, type=None))),
        ("no-aud", "MISSING_CLAIM", signed(sk, claims(level, aud=None))),
        ("no-iss", "MISSING_CLAIM", signed(sk, claims(level, iss=None))),
        ("no-sub", "MISSING_CLAIM", signed(sk, claims(level, sub=None))),
        (
            "sub-with-newline",
            "INVALID_CLAIM",
            signed(sk, claims(level, sub="alice\r\nx-auth-roles: admin")),
        ),
        ("sub-empty", "INVALID_CLAIM", signed(sk, claims(level, sub=""))),
        ("sub-number", "INVALID_CLAIM", signed(sk, claims(level, sub=0))),
        ("roles-with-comma", "INVALID_CLAIM", signed(sk, claims(level, roles=["user,admin"]))),
        ("roles-string", "INVALID_CLAIM", signed(sk, claims(level, roles="admin"))),
    ]
    await assert_denied(
        proxy, backend, [Case(label, r, t, method=METHODS[level]) for label, r, t in cases]
    )
    # Control: the same key and claims, done right, pass (the cases above differ in one way).
    ok = signed(sk, claims(level, aud=["other-api", LEVELS[level][1]]))
    await assert_allowed(proxy, ok, METHODS[level])


async def test_refresh_tokens_only_from_the_refresh_key(
    proxy: RunningProxy, backend: EchoBackend, keys: Keys
):
    """The policy restricts refresh tokens to kid `refresh-hmac`: a perfectly formed refresh
    token signed by the (valid, configured) access or 2FA key is refused."""
    refresh = METHODS["refresh"]
    cases = [
        Case(
            "signed-by-access-key",
            "KEY_NOT_FOUND",
            signed(keys.es256, claims("refresh")),
            method=refresh,
        ),
        Case(
            "signed-by-2fa-key",
            "KEY_NOT_FOUND",
            signed(keys.rs256, claims("refresh")),
            method=refresh,
        ),
        Case(
            "no-kid-es256",
            "KEY_NOT_FOUND",
            craft({"alg": "ES256"}, claims("refresh"), key=keys.es256.key),
            method=refresh,
        ),
    ]
    await assert_denied(proxy, backend, cases)
    await assert_allowed(proxy, signed(keys.refresh, claims("refresh")), refresh)


async def test_type_confusion(proxy: RunningProxy, backend: EchoBackend, keys: Keys):
    """`typ` in the header means nothing to the level check; `type` must be exactly the
    level's string."""
    ref, es = keys.refresh, keys.es256
    cases = [
        Case(
            "typ-access-header-on-refresh-token",
            "WRONG_TOKEN_TYPE",
            signed(ref, claims("refresh"), typ="access"),
        ),
        Case(
            "typ-at+jwt-on-refresh-token",
            "WRONG_TOKEN_TYPE",
            signed(ref, claims("refresh"), typ="at+jwt"),
        ),
        Case("type-list", "WRONG_TOKEN_TYPE", signed(es, claims(type=["access"]))),
        Case("type-list-two", "WRONG_TOKEN_TYPE", signed(es, claims(type=["refresh", "access"]))),
        Case("type-uppercase", "WRONG_TOKEN_TYPE", signed(es, claims(type="ACCESS"))),
        Case("type-trailing-space", "WRONG_TOKEN_TYPE", signed(es, claims(type="access "))),
        Case("type-object", "WRONG_TOKEN_TYPE", signed(es, claims(type={"access": True}))),
        Case("type-true", "WRONG_TOKEN_TYPE", signed(es, claims(type=True))),
        Case(
            "typ-claim-instead-of-type",
            "MISSING_CLAIM",
            signed(es, claims(type=None, typ="access")),
        ),
        Case("type-null", "MISSING_CLAIM", signed(es, pairs(type=Raw("null")))),
        Case(
            "2fa-type-with-access-audience",
            "WRONG_TOKEN_TYPE",
            signed(es, claims(type="2fa_pending")),
        ),
    ]
    await assert_denied(proxy, backend, cases)


# --- signature stripping and substitution -------------------------------------------------


async def test_signature_stripping_and_substitution(
    proxy: RunningProxy, backend: EchoBackend, keys: Keys, issuer: TokenIssuer
):
    token = issuer.mint("access", "alice", ttl=300).token
    other = issuer.mint("access", "alice", ttl=300).token  # same key, other jti
    two_fa = issuer.mint("2fa", "alice", ttl=300).token  # RS256
    admin = signed(keys.es256, claims(sub="admin", roles=["admin"]))
    h, p, s = token.split(".")
    cases = [
        Case("signature-removed", "TOKEN_MALFORMED", f"{h}.{p}."),
        Case("signature-part-removed", "TOKEN_MALFORMED", f"{h}.{p}"),
        Case("other-tokens-signature", "BAD_SIGNATURE", f"{h}.{p}.{other.split('.')[2]}"),
        Case("rs256-signature", "BAD_SIGNATURE", f"{h}.{p}.{two_fa.split('.')[2]}"),
        Case("payload-swapped", "BAD_SIGNATURE", f"{h}.{admin.split('.')[1]}.{s}"),
        Case("signature-truncated", "BAD_SIGNATURE", f"{h}.{p}.{s[:-2]}"),
        Case("signature-zeroes", "BAD_SIGNATURE", f"{h}.{p}.{b64url(bytes(64))}"),
        Case(
            "signature-doubled",
            "BAD_SIGNATURE",
            f"{h}.{p}.{b64url(base64.urlsafe_b64decode(s + '==') * 2)}",
        ),
        Case("signature-padded", "TOKEN_MALFORMED", f"{h}.{p}.{s}=="),
    ]
    await assert_denied(proxy, backend, cases)
    await assert_allowed(proxy, token)  # the untouched token still passes


# --- the verified-token cache after expiry -----------------------------------------------


async def test_cached_token_is_refused_after_expiry_through_the_proxy(
    tmp_path: Path, backend: EchoBackend, keys: Keys
):
    """A token verified (and cached) twice is refused once it expires: the cache keeps the
    signature result, never the time checks. Policy leeway 0 s; waits about 1 s."""
    policy = TEST_POLICY.replace("leeway: 5s", "leeway: 0s")
    assert "leeway: 0s" in policy
    issuer = TokenIssuer(parse_policy(policy, "p.yaml"), {"access": keys.es256})
    running = await start_sidecar(tmp_path, backend.port, keys, policy=policy)
    try:
        if time.time() % 1 > 0.5:  # exp is whole seconds: leave at least 0.5 s of validity
            await asyncio.sleep(1.02 - time.time() % 1)
        minted = issuer.mint("access", "alice", ttl=1)
        verifier = running.sidecar.authorizer.verifier
        await assert_allowed(running, minted.token)
        hits = verifier.cache_hits
        await assert_allowed(running, minted.token)
        assert verifier.cache_hits == hits + 1  # the second call was served from the cache
        assert time.time() < minted.exp  # both calls really happened while it was valid
        await asyncio.sleep(minted.exp - time.time() + 0.05)
        backend.calls.clear()
        await assert_denied(running, backend, [Case("expired", "TOKEN_EXPIRED", minted.token)])
    finally:
        await running.stop()


class ManualClock:
    """A real clock function whose time the test sets."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_cached_token_expiry_at_the_verifier(keys: Keys):
    clock = ManualClock(1_800_000_000.0)
    policy = parse_policy(TEST_POLICY, "test-policy.yaml")  # leeway 5 s
    spec = policy.tokens["access"]
    verifier = TokenVerifier(KeySet(load_jwks_file(str(keys.jwks))), clock=clock)
    minted = TokenIssuer(policy, {"access": keys.es256}, clock=clock).mint(
        "access", "alice", ttl=60
    )

    verifier.verify(minted.token, spec, policy)
    assert (verifier.cache_hits, verifier.cache_misses) == (0, 1)
    clock.now += 59
    verifier.verify(minted.token, spec, policy)
    assert verifier.cache_hits == 1
    clock.now = minted.exp + 4  # expired, within leeway: evicted, re-verified, not re-cached
    verifier.verify(minted.token, spec, policy)
    assert verifier.cache_misses == 2 and minted.token not in verifier._cache
    for _ in range(2):
        clock.now = minted.exp + 5.5
        with pytest.raises(Denied) as denied:
            verifier.verify(minted.token, spec, policy)
        assert denied.value.reason == Reason.TOKEN_EXPIRED
