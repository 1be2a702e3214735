"""Hostile inputs through the real proxy: oversized and deeply nested tokens, the
authorization header itself, and spoofed identity headers on every level."""

from __future__ import annotations

import base64
import json

import grpc
import pytest

from authproxy.keys.issuer import TokenIssuer
from tests.support.attacks import (
    ACCESS,
    METHODS,
    Case,
    assert_allowed,
    assert_denied,
    es_attacker,
    outcome,
)
from tests.support.echo_backend import EchoBackend
from tests.support.jws import LEVELS, Raw, b64url, claims, craft, pairs, signed
from tests.support.keys import Keys
from tests.support.running_proxy import RunningProxy
from tests.support.tokens import bearer

# --- huge inputs ---------------------------------------------------------------------------


def _filler_token(length: int) -> str:
    third = length // 3
    return "e" * third + "." + "e" * third + "." + "e" * (length - 2 * third - 2)


async def test_oversized_tokens(proxy: RunningProxy, backend: EchoBackend):
    cases = [
        Case("9KiB", "TOKEN_TOO_LARGE", _filler_token(9 * 1024)),
        Case("60KiB", "TOKEN_TOO_LARGE", _filler_token(60 * 1024)),
        Case("10k-dots", "TOKEN_TOO_LARGE", "." * 10_000),
        Case("8000-dots", "TOKEN_MALFORMED", "." * 8000),  # under the limit: 8001 parts
        Case("dots-between-segments", "TOKEN_MALFORMED", "a." * 3000 + "a"),
    ]
    await assert_denied(proxy, backend, cases)


async def test_token_size_limit_boundary(proxy: RunningProxy, backend: EchoBackend, keys: Keys):
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
    proxy: RunningProxy, backend: EchoBackend, keys: Keys
):
    """A token the proxy accepts must not make the relayed call fail. Expected: OK.
    (Found: proxy/decide/identity.py `_build` forwards the whole claim set as x-auth-claims,
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
    proxy: RunningProxy, backend: EchoBackend, keys: Keys
):
    """A deny must reach the client as UNAUTHENTICATED with its ErrorInfo. Expected: that.
    (Found: deny messages quote attacker strings in full: proxy/keys/verify.py `_candidates`
    "no configured key has kid {kid!r}" / "... accepts algorithm {alg!r}", and
    proxy/wire/grpc_status.py `deny_details` sends the message twice, in grpc-message
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
    proxy: RunningProxy, backend: EchoBackend, issuer: TokenIssuer, header
):
    token = issuer.mint("access", "alice", ttl=300).token
    big = "Bearer " + "a" * (1024 * 1024) if header == "authorization" else "a" * (1024 * 1024)
    md: tuple[tuple[str, str], ...] = ((header, big),)
    if header != "authorization":
        md += bearer(token)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await proxy.unary(ACCESS, metadata=md)
    # One field over 64 KiB: the HPACK decoder (libnghttp2) ends the connection
    # (COMPRESSION_ERROR) before anything decides; the client sees UNAVAILABLE.
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert backend.calls == []
    await assert_allowed(proxy, token)


async def test_a_header_list_over_the_limit_is_refused_and_the_connection_stays(
    proxy: RunningProxy, backend: EchoBackend, issuer: TokenIssuer
):
    """Fields under 64 KiB each, 120 KiB in all (the limit is 80 KiB): that call alone is
    refused with RESOURCE_EXHAUSTED before the pipeline; the connection serves on."""
    token = issuer.mint("access", "alice", ttl=300).token
    md = (("x-a", "a" * 60_000), ("x-b", "b" * 60_000), ("authorization", f"Bearer {token}"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await proxy.unary(ACCESS, metadata=md)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "request headers of" in (caught.value.details() or "")
    assert backend.calls == []
    await assert_allowed(proxy, token)


async def test_deeply_nested_json_in_the_header_is_malformed(
    proxy: RunningProxy, backend: EchoBackend, keys: Keys
):
    """Pre-authentication: the header is parsed before any signature check. Expected:
    UNAUTHENTICATED / TOKEN_MALFORMED. (Found: RecursionError escapes
    proxy/keys/verify.py `_json_segment`, which catches only ValueError; the call ends UNKNOWN
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
    proxy: RunningProxy, backend: EchoBackend, keys: Keys
):
    """Same with a validly signed payload (the issuer's key is needed). Expected:
    TOKEN_MALFORMED. (Found: RecursionError, call ends UNKNOWN.)"""
    token = signed(keys.es256, [*pairs(), ("x", Raw("[" * 2500 + "]" * 2500))])
    assert len(token) < 8192
    await assert_denied(proxy, backend, [Case("arrays-2500", "TOKEN_MALFORMED", token)])


# --- the authorization header ------------------------------------------------------------


async def test_authorization_header_count_and_scheme(
    proxy: RunningProxy, backend: EchoBackend, issuer: TokenIssuer
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
    ["bearer {t}", "BEARER {t}", "BeArEr {t}", "Bearer   {t}"],
    ids=["lower", "upper", "mixed", "extra-spaces"],
)
async def test_bearer_scheme_is_case_insensitive_and_allows_extra_spaces(
    proxy: RunningProxy, issuer: TokenIssuer, value
):
    token = issuer.mint("access", "alice", ttl=300).token
    await assert_allowed(proxy, None, metadata=(("authorization", value.format(t=token)),))


@pytest.mark.parametrize("value", ["  Bearer {t}  ", "Bearer {t}   ", "Bearer     "])
async def test_authorization_with_surrounding_whitespace_is_refused_by_http2(
    proxy: RunningProxy, backend: EchoBackend, issuer: TokenIssuer, value
):
    """RFC 9113 8.2.1: a field value must not start or end with whitespace. The HTTP/2
    engine resets such a stream (PROTOCOL_ERROR; gRPC clients report INTERNAL) before
    anything decides on it, and the backend never sees it."""
    token = issuer.mint("access", "alice", ttl=300).token
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await proxy.unary(ACCESS, metadata=(("authorization", value.format(t=token)),))
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "RST_STREAM" in (caught.value.details() or "")
    assert backend.calls == []


@pytest.mark.parametrize("value", ["Bearer\t{t}", "Bearer \t{t}", "Bearer {t}\n", "Bearer\x00{t}"])
async def test_control_characters_in_authorization_never_reach_the_proxy_via_grpc(
    proxy: RunningProxy, backend: EchoBackend, issuer: TokenIssuer, value
):
    """The grpc client refuses them (not printable ASCII); the same bytes sent over raw
    HTTP/2 are covered in test_http2_tricks.py."""
    token = issuer.mint("access", "alice", ttl=300).token
    with pytest.raises(Exception) as caught:
        await proxy.unary(ACCESS, metadata=(("authorization", value.format(t=token)),))
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
    proxy: RunningProxy, backend: EchoBackend, issuer: TokenIssuer, level
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
    proxy: RunningProxy, backend: EchoBackend, issuer: TokenIssuer, level
):
    await assert_denied(
        proxy,
        backend,
        [Case("no-token", "TOKEN_MISSING", metadata=FORGED, method=METHODS[level])],
    )
