"""JWT attacks after RFC 8725 (JWT Best Current Practices), all through the real proxy.

Every case is a real gRPC call to a sidecar with the echo backend behind it (both the
unary and the stream path, see the `proxy` fixture). A denied call must carry the exact
status code and `ErrorInfo` reason, and the backend must never see it. Tokens the
issuer would never produce are built by hand in `tests/security/jws.py`.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from proxy.issuer import SigningKey, TokenIssuer
from proxy.keys import KeySet, load_jwks_file, public_jwk
from proxy.policy_file import parse_policy
from proxy.reasons import Denied, Reason
from proxy.verify import TokenVerifier
from tests.conftest import TEST_POLICY, Keys, Running, error_info, start_sidecar
from tests.echo_backend import EchoBackend
from tests.security.jws import LEVELS, Raw, b64url, claims, craft, pairs, signed

UNAUTH = grpc.StatusCode.UNAUTHENTICATED
METHODS = {
    "public": "/test.Public/Report",
    "2fa": "/test.TwoFA/Report",
    "refresh": "/test.Refresh/Report",
    "access": "/test.Access/Report",
}
ACCESS = METHODS["access"]


@dataclass(frozen=True)
class Case:
    label: str
    reason: str
    token: str | None = None
    metadata: tuple[tuple[str, str | bytes], ...] = ()
    method: str = ACCESS
    code: grpc.StatusCode = UNAUTH


def _metadata(case: Case) -> tuple[tuple[str, str | bytes], ...]:
    auth = (("authorization", f"Bearer {case.token}"),) if case.token is not None else ()
    return tuple(case.metadata) + auth


async def outcome(running: Running, case: Case) -> tuple[str, str | None]:
    """(status name, ErrorInfo reason) of one call; ("OK", None) when it succeeds."""
    try:
        await running.call(case.method, metadata=_metadata(case))
    except grpc.aio.AioRpcError as error:
        try:
            info = error_info(error)
        except ValueError:  # status details that contradict the status code
            info = None
        reason = info.reason if info is not None and info.domain == "authproxy" else None
        return error.code().name, reason
    return "OK", None


async def assert_denied(running: Running, backend: EchoBackend, cases: Iterable[Case]) -> None:
    """Every case ends with its status and reason; all mismatches are reported at once."""
    cases = list(cases)
    assert len({c.label for c in cases}) == len(cases), "case labels must be unique"
    results = await asyncio.gather(*(outcome(running, c) for c in cases))
    got = {c.label: r for c, r in zip(cases, results, strict=True)}
    want = {c.label: (c.code.name, c.reason) for c in cases}
    assert got == want
    assert backend.calls == []


async def assert_allowed(running: Running, token: str, method: str = ACCESS, **kw) -> dict:
    report = await running.report(method, token=token, **kw)
    assert report["md"]["x-auth-subject"] == ["alice"]
    return report


def level_key(keys: Keys, level: str) -> SigningKey:
    """The key the `issuer` fixture signs each level with."""
    return {"access": keys.es256, "2fa": keys.rs256, "refresh": keys.refresh}[level]


@functools.cache
def attacker() -> dict[str, Any]:
    """Keys and a certificate that belong to nobody the proxy trusts."""
    ec_key = ec.generate_private_key(ec.SECP256R1())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attacker.example")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ec_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .sign(ec_key, hashes.SHA256())
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    return {
        "ec": ec_key,
        "rsa": rsa_key,
        "ec_jwk": public_jwk(ec_key.public_key()),
        "rsa_jwk": public_jwk(rsa_key.public_key()),
        "x5c": [base64.b64encode(der).decode()],
        "hmac": b"attacker-controlled-secret-0123456789abcdef",
    }


def es_attacker(header: dict[str, Any], payload: Any = None) -> str:
    return craft({"alg": "ES256", **header}, payload or claims(), key=attacker()["ec"])


# --- alg none ----------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
async def test_alg_none_in_every_spelling(proxy: Running, backend: EchoBackend, keys: Keys, alg):
    cases = []
    for kid_label, header in (
        ("no-kid", {"alg": alg}),
        ("es256-kid", {"alg": alg, "kid": keys.es256.kid}),
        ("rs256-kid", {"alg": alg, "kid": keys.rs256.kid}),
    ):
        body = craft(header, claims(), signature="x").rsplit(".", 1)[0]
        real_sig = craft(header, claims(), key=keys.es256.key, alg="ES256")
        cases += [
            # An unsigned token is refused as such (before the empty signature is noticed).
            Case(f"{kid_label}/empty-signature", "ALGORITHM_NOT_ALLOWED", f"{body}."),
            Case(f"{kid_label}/no-signature-part", "TOKEN_MALFORMED", body),
            Case(
                f"{kid_label}/junk-signature",
                "ALGORITHM_NOT_ALLOWED",
                f"{body}.{b64url(b'x' * 32)}",
            ),
            Case(f"{kid_label}/real-es256-signature", "ALGORITHM_NOT_ALLOWED", real_sig),
        ]
    await assert_denied(proxy, backend, cases)


async def test_alg_lookalikes_are_not_none_and_not_accepted(
    proxy: Running, backend: EchoBackend, keys: Keys
):
    kid = keys.es256.kid
    sig = b64url(b"x" * 64)
    cases = [
        Case(
            "none-with-space",
            "ALGORITHM_NOT_ALLOWED",
            craft({"alg": "none ", "kid": kid}, claims(), signature=sig),
        ),
        Case(
            "empty-alg", "TOKEN_MALFORMED", craft({"alg": "", "kid": kid}, claims(), signature=sig)
        ),
        Case(
            "alg-null", "TOKEN_MALFORMED", craft({"alg": None, "kid": kid}, claims(), signature=sig)
        ),
        Case(
            "alg-list",
            "TOKEN_MALFORMED",
            craft({"alg": ["ES256"], "kid": kid}, claims(), signature=sig),
        ),
        Case("no-alg", "TOKEN_MALFORMED", craft({"kid": kid}, claims(), signature=sig)),
        Case(
            "es256-lowercase",
            "ALGORITHM_NOT_ALLOWED",
            craft({"alg": "es256", "kid": kid}, claims(), key=keys.es256.key, alg="ES256"),
        ),
        Case("crit-header", "TOKEN_MALFORMED", signed(keys.es256, claims(), crit=["exp"], exp=1)),
        Case("b64-false", "TOKEN_MALFORMED", signed(keys.es256, claims(), b64=False, crit=["b64"])),
    ]
    await assert_denied(proxy, backend, cases)


# --- HS/RS key confusion -------------------------------------------------------------------


def _public_key_as_bytes(sk: SigningKey) -> dict[str, bytes]:
    public = sk.key.public_key()
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return {
        "pem": pem,
        "pem-no-newline": pem.rstrip(b"\n"),
        "der": der,
        "jwk-json": json.dumps(sk.public_jwk()).encode(),
        "jwk-json-compact": json.dumps(sk.public_jwk(), separators=(",", ":")).encode(),
    }


@pytest.mark.parametrize("target", ["rs256", "es256"])
async def test_hmac_signed_with_the_public_key(
    proxy: Running, backend: EchoBackend, keys: Keys, target
):
    """The classic HS256-with-the-RSA-public-key attack: the key named by kid never accepts
    HS*; without a kid only the real HMAC key is tried, and the forged MAC does not match."""
    sk: SigningKey = getattr(keys, target)
    cases = []
    for form, secret in _public_key_as_bytes(sk).items():
        for kid_label, header, reason in (
            ("target-kid", {"alg": "HS256", "kid": sk.kid}, "ALGORITHM_NOT_ALLOWED"),
            ("no-kid", {"alg": "HS256"}, "BAD_SIGNATURE"),
            ("hmac-kid", {"alg": "HS256", "kid": "refresh-hmac"}, "BAD_SIGNATURE"),
            ("hs512-no-kid", {"alg": "HS512"}, "ALGORITHM_NOT_ALLOWED"),  # no 64-byte secret
            ("hs384-target-kid", {"alg": "HS384", "kid": sk.kid}, "ALGORITHM_NOT_ALLOWED"),
        ):
            token = craft(header, claims(), key=secret)
            cases.append(Case(f"{form}/{kid_label}", reason, token))
    await assert_denied(proxy, backend, cases)


# --- keys and key URLs carried by the token ----------------------------------------------


@pytest.fixture
async def url_recorder() -> AsyncIterator[dict[str, Any]]:
    """A local 'attacker' URL that counts every connection made to it."""
    seen = {"connections": 0}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen["connections"] += 1
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    seen["url"] = f"http://127.0.0.1:{port}"
    yield seen
    server.close()
    await server.wait_closed()


async def test_keys_and_key_urls_in_the_header_are_ignored(
    proxy: Running, backend: EchoBackend, keys: Keys, url_recorder
):
    a = attacker()
    url = url_recorder["url"]
    jwk_with_real_kid = {**a["ec_jwk"], "kid": keys.es256.kid, "alg": "ES256", "use": "sig"}
    embedded = {
        "jwk": {"jwk": a["ec_jwk"]},
        "jwk-with-real-kid": {"jwk": jwk_with_real_kid},
        "jku": {"jku": f"{url}/jwks.json"},
        "x5u": {"x5u": f"{url}/cert.pem"},
        "x5c": {"x5c": a["x5c"]},
        "all": {"jwk": a["ec_jwk"], "jku": f"{url}/jwks.json", "x5u": f"{url}/c", "x5c": a["x5c"]},
    }
    cases = []
    for name, params in embedded.items():
        for kid_label, kid, reason in (
            ("no-kid", None, "BAD_SIGNATURE"),  # tried against the real ES256 key only
            ("real-kid", keys.es256.kid, "BAD_SIGNATURE"),
            ("attacker-kid", "attacker", "KEY_NOT_FOUND"),
        ):
            header = {**params, **({"kid": kid} if kid else {})}
            cases.append(Case(f"{name}/{kid_label}", reason, es_attacker(header)))
    rsa_token = craft({"alg": "RS256", "jwk": a["rsa_jwk"]}, claims(), key=a["rsa"])
    cases.append(Case("rsa-jwk/no-kid", "BAD_SIGNATURE", rsa_token))
    await assert_denied(proxy, backend, cases)
    await asyncio.sleep(0.05)
    assert url_recorder["connections"] == 0  # the proxy never fetched a key URL


# --- kid tricks ------------------------------------------------------------------------------


async def test_kid_tricks(proxy: Running, backend: EchoBackend, keys: Keys):
    a = attacker()
    payload = claims()
    cases = [
        # The kid of another configured key, with the attacker's signature.
        Case("rs256-kid/es256-alg", "ALGORITHM_NOT_ALLOWED", es_attacker({"kid": keys.rs256.kid})),
        Case(
            "rs256-kid/attacker-rsa",
            "BAD_SIGNATURE",
            craft({"alg": "RS256", "kid": keys.rs256.kid}, payload, key=a["rsa"]),
        ),
        Case("es256-kid/attacker-ec", "BAD_SIGNATURE", es_attacker({"kid": keys.es256.kid})),
        Case(
            "hmac-kid/attacker-secret",
            "BAD_SIGNATURE",
            craft({"alg": "HS256", "kid": "refresh-hmac"}, payload, key=a["hmac"]),
        ),
        Case(
            "hmac-kid/empty-secret",
            "BAD_SIGNATURE",
            craft({"alg": "HS256", "kid": "refresh-hmac"}, payload, key=b""),
        ),
        # Lookup strings: kids are dictionary keys, never paths or queries.
        Case("path-traversal", "KEY_NOT_FOUND", es_attacker({"kid": "../../dev/null"})),
        Case(
            "path-traversal/hs256-empty",
            "KEY_NOT_FOUND",
            craft({"alg": "HS256", "kid": "../../../../../../dev/null"}, payload, key=b""),
        ),
        Case("absolute-path", "KEY_NOT_FOUND", es_attacker({"kid": "/etc/passwd"})),
        Case("sql", "KEY_NOT_FOUND", es_attacker({"kid": "' OR 1=1 --"})),
        Case("sql-union", "KEY_NOT_FOUND", es_attacker({"kid": "x' UNION SELECT 'key"})),
        Case("empty-string", "KEY_NOT_FOUND", es_attacker({"kid": ""})),
        Case("very-long", "KEY_NOT_FOUND", es_attacker({"kid": "k" * 1000})),
        Case("real-kid-plus-space", "KEY_NOT_FOUND", es_attacker({"kid": keys.es256.kid + " "})),
        Case(
            "real-kid-uppercased",
            "KEY_NOT_FOUND",
            es_attacker({"kid": keys.es256.kid.upper() + "!"}),
        ),
        Case("nul-in-kid", "KEY_NOT_FOUND", es_attacker({"kid": keys.es256.kid + "\x00"})),
        Case("crlf-in-kid", "KEY_NOT_FOUND", es_attacker({"kid": "x\r\nx-auth-subject: root"})),
        # Not a string at all.
        Case("number", "TOKEN_MALFORMED", es_attacker({"kid": 1})),
        Case("object", "TOKEN_MALFORMED", es_attacker({"kid": {"kid": keys.es256.kid}})),
        Case("list", "TOKEN_MALFORMED", es_attacker({"kid": [keys.es256.kid]})),
        Case("bool", "TOKEN_MALFORMED", es_attacker({"kid": True})),
        # PyJWT refuses a kid that is present but not a string, null included.
        Case("null", "TOKEN_MALFORMED", es_attacker({"kid": None})),
    ]
    await assert_denied(proxy, backend, cases)


# --- duplicate JSON members --------------------------------------------------------------


async def test_duplicate_members_in_header_and_payload(
    proxy: Running, backend: EchoBackend, keys: Keys
):
    es = keys.es256
    kid = es.kid

    def es_signed(header: Any, payload: Any) -> str:
        return craft(header, payload, key=es.key, alg="ES256")

    cases = [
        Case(
            "header/alg-then-none",
            "TOKEN_MALFORMED",
            es_signed([("alg", "ES256"), ("kid", kid), ("alg", "none")], claims()),
        ),
        Case(
            "header/none-then-alg",
            "TOKEN_MALFORMED",
            es_signed([("alg", "none"), ("kid", kid), ("alg", "ES256")], claims()),
        ),
        Case(
            "header/two-kids",
            "TOKEN_MALFORMED",
            es_signed([("alg", "ES256"), ("kid", "attacker"), ("kid", kid)], claims()),
        ),
        Case("payload/sub", "TOKEN_MALFORMED", signed(es, [*pairs(), ("sub", "admin")])),
        Case(
            "payload/type-refresh-then-access",
            "TOKEN_MALFORMED",
            signed(es, [*pairs(type="refresh"), ("type", "access")]),
        ),
        Case(
            "payload/type-access-then-refresh",
            "TOKEN_MALFORMED",
            signed(es, [*pairs(), ("type", "refresh")]),
        ),
        Case(
            "payload/aud",
            "TOKEN_MALFORMED",
            signed(es, [*pairs(aud="elsewhere"), ("aud", "api-access")]),
        ),
        Case("payload/exp", "TOKEN_MALFORMED", signed(es, [*pairs(exp=1), ("exp", 99999999999)])),
        Case(
            "payload/roles",
            "TOKEN_MALFORMED",
            signed(es, [*pairs(roles=["user"]), ("roles", ["admin"])]),
        ),
        Case(
            "payload/nested",
            "TOKEN_MALFORMED",
            signed(es, [*pairs(), ("ctx", Raw('{"a":1,"a":2}'))]),
        ),
    ]
    await assert_denied(proxy, backend, cases)


# --- numeric claims ------------------------------------------------------------------------


async def test_time_claims_must_be_finite_numbers(proxy: Running, backend: EchoBackend, keys: Keys):
    es = keys.es256
    cases = [
        Case("exp-string", "INVALID_CLAIM", signed(es, pairs(exp="9999999999"))),
        Case("nbf-string", "INVALID_CLAIM", signed(es, pairs(nbf="0"))),
        Case("iat-string", "INVALID_CLAIM", signed(es, pairs(iat="0"))),
        Case("exp-true", "INVALID_CLAIM", signed(es, pairs(exp=True))),
        Case("exp-false", "INVALID_CLAIM", signed(es, pairs(exp=False))),
        Case("nbf-true", "INVALID_CLAIM", signed(es, pairs(nbf=True))),
        Case("exp-list", "INVALID_CLAIM", signed(es, pairs(exp=[9999999999]))),
        Case("exp-object", "INVALID_CLAIM", signed(es, pairs(exp={"$numberLong": "9999999999"}))),
        Case("exp-null", "MISSING_CLAIM", signed(es, pairs(exp=Raw("null")))),
        Case("exp-missing", "MISSING_CLAIM", signed(es, claims(exp=None))),
        Case("exp-NaN", "TOKEN_MALFORMED", signed(es, pairs(exp=Raw("NaN")))),
        Case("exp-Infinity", "TOKEN_MALFORMED", signed(es, pairs(exp=Raw("Infinity")))),
        Case("nbf-minus-Infinity", "TOKEN_MALFORMED", signed(es, pairs(nbf=Raw("-Infinity")))),
        Case("exp-1e400", "INVALID_CLAIM", signed(es, pairs(exp=Raw("1e400")))),  # parses as inf
        Case("nbf-minus-1e400", "INVALID_CLAIM", signed(es, pairs(nbf=Raw("-1e400")))),
        Case("iat-1e400", "INVALID_CLAIM", signed(es, pairs(iat=Raw("1e400")))),
        Case("exp-5000-digits", "TOKEN_MALFORMED", signed(es, pairs(exp=Raw("9" * 5000)))),
    ]
    await assert_denied(proxy, backend, cases)


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
async def test_time_claim_too_big_for_a_float_is_refused(
    proxy: Running, backend: EchoBackend, keys: Keys, claim
):
    """A 400-digit integer is valid JSON and a Python int, but not a float: INVALID_CLAIM.
    (At commit abcd4e4, `math.isfinite` raised OverflowError in proxy/verify.py
    `_require_time` and the call ended UNKNOWN with the exception text.)"""
    token = signed(keys.es256, pairs(**{claim: Raw("9" * 400)}))
    await assert_denied(proxy, backend, [Case(claim, "INVALID_CLAIM", token)])


# --- huge inputs ---------------------------------------------------------------------------


def _filler_token(length: int) -> str:
    third = length // 3
    return "e" * third + "." + "e" * third + "." + "e" * (length - 2 * third - 2)


async def test_oversized_tokens(proxy: Running, backend: EchoBackend):
    cases = [
        Case("9KiB", "TOKEN_TOO_LARGE", _filler_token(9 * 1024)),
        Case("60KiB", "TOKEN_TOO_LARGE", _filler_token(60 * 1024)),
        Case("10k-dots", "TOKEN_TOO_LARGE", "." * 10_000),
        Case("8000-dots", "TOKEN_MALFORMED", "." * 8000),  # under the limit: 8001 parts
        Case("dots-between-segments", "TOKEN_MALFORMED", "a." * 3000 + "a"),
    ]
    await assert_denied(proxy, backend, cases)


async def test_token_size_limit_boundary(proxy: Running, backend: EchoBackend, keys: Keys):
    """max_token_bytes is 8192: a genuine token of that size is allowed, one byte over is
    TOKEN_TOO_LARGE. The allowed call is checked at the decision (and through the proxy
    for anything but TOKEN_TOO_LARGE): its x-auth-claims header copies the ~8 KB claim
    set, which a default backend refuses now and then (see
    test_accepted_token_with_big_claims_reaches_a_default_backend)."""

    def token_with_pad(n: int) -> str:
        return signed(keys.es256, claims(pad="x" * n))

    low, high = 0, 8192  # the largest pad whose token fits: len(token_with_pad(low)) <= 8192
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if len(token_with_pad(mid)) <= 8192 else (low, mid)
    n = low
    at_limit = token_with_pad(n)
    over = next(t for i in range(n + 1, n + 4) if len(t := token_with_pad(i)) > 8192)
    assert len(at_limit) in (8191, 8192) and len(over) <= 8194
    decision = await proxy.sidecar.authorizer.decide(
        ACCESS, [("authorization", f"Bearer {at_limit}")]
    )
    assert decision.allowed, decision
    status, reason = await outcome(proxy, Case("at-limit", "", at_limit))
    assert reason != "TOKEN_TOO_LARGE" and status in ("OK", "RESOURCE_EXHAUSTED")
    backend.calls.clear()
    await assert_denied(proxy, backend, [Case("over", "TOKEN_TOO_LARGE", over)])


async def test_accepted_token_with_big_claims_reaches_a_default_backend(
    proxy: Running, backend: EchoBackend, keys: Keys
):
    """A token the proxy accepts must not make the relayed call fail. Expected: OK.
    (Found: proxy/identity.py `_build` forwards the whole claim set as x-auth-claims,
    JSON with ensure_ascii=True, base64url. A 6.3 KB token whose `name` claim holds 2300
    UTF-8 "é" becomes an ~18 KB header, over gRPC's default 16 KiB hard metadata limit:
    the backend refuses every call with RESOURCE_EXHAUSTED "received metadata size
    exceeds hard limit". Plain ASCII tokens of 7.7-8.2 KB, under the default
    max_token_bytes 8192, land between the 8 KiB soft and 16 KiB hard limits and about
    5-10% of their calls are refused at random.)"""
    token = signed(keys.es256, pairs(name=Raw(json.dumps("\u00e9" * 2300, ensure_ascii=False))))
    assert len(token) < 8192
    report = await assert_allowed(proxy, token)
    assert report["md"]["x-auth-subject"] == ["alice"]


async def test_deny_stays_readable_when_the_token_echoes_huge_strings(
    proxy: Running, backend: EchoBackend, keys: Keys
):
    """A deny must reach the client as UNAUTHENTICATED with its ErrorInfo. Expected: that.
    (Found: deny messages quote attacker strings in full: proxy/verify.py `_candidates`
    "no configured key has kid {kid!r}" / "... accepts algorithm {alg!r}", and
    proxy/grpc_status.py `deny_details` sends the message twice, in grpc-message
    (percent-encoded: "%" becomes 3 bytes) and inside grpc-status-details-bin (base64).
    A 7 KB token with a 5000-character kid or alg of "%" yields ~20 KB of trailers, over
    the gRPC client's default 16 KiB hard limit: the client gets RESOURCE_EXHAUSTED
    "Stream removed" and no reason. Between 8 and 16 KiB (e.g. a 5500-character kid of
    letters) the client drops the deny at random.)"""
    cases = [
        Case("kid-5000-percent", "KEY_NOT_FOUND", es_attacker({"kid": "%" * 5000})),
        Case(
            "alg-5000-percent",
            "ALGORITHM_NOT_ALLOWED",
            craft({"alg": "%" * 5000}, claims(), signature=b"s" * 64),
        ),
        Case(
            "alg-4900-percent-real-kid",
            "ALGORITHM_NOT_ALLOWED",
            craft({"alg": "%" * 4900, "kid": keys.es256.kid}, claims(), signature=b"s" * 64),
        ),
    ]
    await assert_denied(proxy, backend, cases)


@pytest.mark.parametrize("header", ["authorization", "x-big"])
async def test_one_mebibyte_header_is_refused_and_the_proxy_stays_up(
    proxy: Running, backend: EchoBackend, issuer: TokenIssuer, header
):
    token = issuer.mint("access", "alice", ttl=300).token
    big = "Bearer " + "a" * (1024 * 1024) if header == "authorization" else "a" * (1024 * 1024)
    md: tuple[tuple[str, str], ...] = ((header, big),)
    if header != "authorization":
        md += (("authorization", f"Bearer {token}"),)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await proxy.call(ACCESS, metadata=md)
    # Refused by the gRPC layer (metadata hard limit) before the pipeline sees it.
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert backend.calls == []
    await assert_allowed(proxy, token)


async def test_deeply_nested_json_in_the_header_is_malformed(
    proxy: Running, backend: EchoBackend, keys: Keys
):
    """Pre-authentication: the header is parsed before any signature check. Expected:
    UNAUTHENTICATED / TOKEN_MALFORMED. (Found: RecursionError escapes
    proxy/verify.py `_json_segment`, which catches only ValueError; the call ends UNKNOWN
    with "Unexpected <class 'RecursionError'>" and no ErrorInfo.)"""
    cases = []
    # Depths that fit in the 8 KiB token limit and exceed Python's default recursion limit.
    for kind, open_, close, depth in (
        ("arrays", "[", "]", 1_000),
        ("arrays", "[", "]", 2_500),
        ("objects", '{"":', "}", 1_000),
    ):
        header = Raw(
            f'{{"alg":"ES256","kid":"{keys.es256.kid}","x":{open_ * depth}1{close * depth}}}'
        )
        token = craft(header, claims(), signature=b"s" * 64)
        assert len(token) < 8192
        cases.append(Case(f"{kind}-{depth}", "TOKEN_MALFORMED", token))
    await assert_denied(proxy, backend, cases)


async def test_deeply_nested_json_in_a_signed_payload_is_malformed(
    proxy: Running, backend: EchoBackend, keys: Keys
):
    """Same with a validly signed payload (the issuer's key is needed). Expected:
    TOKEN_MALFORMED. (Found: RecursionError, call ends UNKNOWN.)"""
    token = signed(keys.es256, [*pairs(), ("x", Raw("[" * 2500 + "]" * 2500))])
    assert len(token) < 8192
    await assert_denied(proxy, backend, [Case("arrays-2500", "TOKEN_MALFORMED", token)])


# --- the authorization header ------------------------------------------------------------


async def test_authorization_header_count_and_scheme(
    proxy: Running, backend: EchoBackend, issuer: TokenIssuer
):
    valid = issuer.mint("access", "alice", ttl=300).token
    other = issuer.mint("access", "bob", ttl=300).token
    auth = lambda value: (("authorization", value),)  # noqa: E731
    cases = [
        Case(
            "valid+invalid",
            "TOKEN_AMBIGUOUS",
            metadata=auth(f"Bearer {valid}") + auth("Bearer x.y.z"),
        ),
        Case(
            "invalid+valid",
            "TOKEN_AMBIGUOUS",
            metadata=auth("Bearer x.y.z") + auth(f"Bearer {valid}"),
        ),
        Case("same-valid-twice", "TOKEN_AMBIGUOUS", metadata=auth(f"Bearer {valid}") * 2),
        Case(
            "two-valid",
            "TOKEN_AMBIGUOUS",
            metadata=auth(f"Bearer {valid}") + auth(f"Bearer {other}"),
        ),
        Case("valid+empty", "TOKEN_AMBIGUOUS", metadata=auth(f"Bearer {valid}") + auth("")),
        Case("basic", "TOKEN_MALFORMED", metadata=auth(f"Basic {valid}")),
        Case("token-scheme", "TOKEN_MALFORMED", metadata=auth(f"Token {valid}")),
        Case("no-scheme", "TOKEN_MALFORMED", metadata=auth(valid)),
        Case("scheme-only", "TOKEN_MALFORMED", metadata=auth("Bearer")),
        Case("scheme-and-spaces", "TOKEN_MALFORMED", metadata=auth("Bearer     ")),
        Case("empty", "TOKEN_MALFORMED", metadata=auth("")),
        Case("bearer-glued", "TOKEN_MALFORMED", metadata=auth(f"Bearer{valid}")),
        Case("token-then-junk", "TOKEN_MALFORMED", metadata=auth(f"Bearer {valid} extra")),
        Case("two-tokens", "TOKEN_MALFORMED", metadata=auth(f"Bearer {valid} Bearer {other}")),
        Case(
            "binary-header-only",
            "TOKEN_MISSING",
            metadata=(("authorization-bin", f"Bearer {valid}".encode()),),
        ),
        Case(
            "proxy-authorization-only",
            "TOKEN_MISSING",
            metadata=(("proxy-authorization", f"Bearer {valid}"),),
        ),
    ]
    await assert_denied(proxy, backend, cases)


@pytest.mark.parametrize(
    "value",
    ["bearer {t}", "BEARER {t}", "BeArEr {t}", "Bearer   {t}", "  Bearer {t}  ", "Bearer {t}   "],
    ids=["lower", "upper", "mixed", "extra-spaces", "surrounding-spaces", "trailing-spaces"],
)
async def test_bearer_scheme_is_case_insensitive_and_allows_extra_spaces(
    proxy: Running, issuer: TokenIssuer, value
):
    token = issuer.mint("access", "alice", ttl=300).token
    await assert_allowed(proxy, None, metadata=(("authorization", value.format(t=token)),))


@pytest.mark.parametrize("value", ["Bearer\t{t}", "Bearer \t{t}", "Bearer {t}\n", "Bearer\x00{t}"])
async def test_control_characters_in_authorization_never_reach_the_proxy_via_grpc(
    proxy: Running, backend: EchoBackend, issuer: TokenIssuer, value
):
    """The grpc client refuses them (not printable ASCII); the same bytes sent over raw
    HTTP/2 are covered in test_http2_tricks.py."""
    token = issuer.mint("access", "alice", ttl=300).token
    with pytest.raises(Exception) as caught:
        await proxy.call(ACCESS, metadata=(("authorization", value.format(t=token)),))
    assert not isinstance(caught.value, grpc.aio.AioRpcError)  # refused before sending
    assert backend.calls == []


# --- spoofed identity headers ------------------------------------------------------------

FORGED: tuple[tuple[str, str | bytes], ...] = (
    ("x-auth-subject", "root"),
    ("x-auth-subject", "admin"),
    ("x-auth-roles", "admin"),
    ("x-auth-permissions", "*"),
    ("x-auth-scopes", "admin"),
    ("x-auth-token-type", "access"),
    ("x-auth-jti", "forged"),
    ("x-auth-issuer", "evil"),
    ("x-auth-claims", b64url(b'{"sub":"root","roles":["admin"]}')),
    ("x-auth-foo", "bar"),
    ("x-auth-", "empty-suffix"),
    ("x-auth-subject-bin", b"root"),
    ("x-auth-claims-bin", b"\x00\xff"),
    *(("x-auth-subject", f"root{i}") for i in range(100)),
    ("x-kept", "yes"),  # control: ordinary metadata still passes
)


@pytest.mark.parametrize("level", ["public", "2fa", "refresh", "access"])
async def test_spoofed_identity_headers_never_reach_the_backend(
    proxy: Running, backend: EchoBackend, issuer: TokenIssuer, level
):
    minted = issuer.mint(level, "alice", ttl=300) if level != "public" else None
    report = await proxy.report(
        METHODS[level], token=minted.token if minted else None, metadata=FORGED
    )
    identity = {k: v for k, v in report["md"].items() if k.startswith("x-auth")}
    assert report["md"]["x-kept"] == ["yes"]
    if minted is None:
        assert identity == {}
        return
    claims_header = identity.pop("x-auth-claims")
    assert identity == {
        "x-auth-subject": ["alice"],
        "x-auth-token-type": [LEVELS[level][0]],
        "x-auth-jti": [minted.jti],
        "x-auth-issuer": ["test-issuer"],
    }
    assert len(claims_header) == 1
    assert json.loads(base64.urlsafe_b64decode(claims_header[0] + "==")) == minted.claims


@pytest.mark.parametrize("level", ["2fa", "refresh", "access"])
async def test_spoofed_identity_headers_on_a_denied_call_reach_nothing(
    proxy: Running, backend: EchoBackend, issuer: TokenIssuer, level
):
    await assert_denied(
        proxy,
        backend,
        [Case("no-token", "TOKEN_MISSING", metadata=FORGED, method=METHODS[level])],
    )


# --- token types, audiences, issuers, times ----------------------------------------------

TOKEN_LEVELS = ("2fa", "refresh", "access")


@pytest.mark.parametrize("presented", TOKEN_LEVELS)
@pytest.mark.parametrize("required", TOKEN_LEVELS)
async def test_token_type_matrix(
    proxy: Running, backend: EchoBackend, issuer: TokenIssuer, presented, required
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
    proxy: Running, backend: EchoBackend, keys: Keys, issuer: TokenIssuer, level
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
    proxy: Running, backend: EchoBackend, keys: Keys
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


async def test_type_confusion(proxy: Running, backend: EchoBackend, keys: Keys):
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
    proxy: Running, backend: EchoBackend, keys: Keys, issuer: TokenIssuer
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
        await running.channel.close()
        await running.sidecar.stop(0)


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
