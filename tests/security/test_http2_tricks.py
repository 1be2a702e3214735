"""HTTP/2 header tricks the grpc client library will not send, built by hand with `h2`.

Uppercase field names (malformed in HTTP/2, RFC 9113 8.2.1), repeated identity headers,
duplicate and uppercase `authorization`, control characters in values, and odd `:path`
values. Whatever the HTTP/2 layer of the sidecar does with them (refuse the stream, or
pass them on), the backend must never see a forged identity and a bad token must never
pass. Every exchange is bounded by a timeout (see `tests/support/h2client.py`).
"""

from __future__ import annotations

import base64
import json

import pytest
from google.rpc import error_details_pb2, status_pb2

from authproxy.keys.issuer import TokenIssuer
from tests.support.echo_backend import EchoBackend
from tests.support.h2client import H2Response, grpc_request_headers, h2_call
from tests.support.running_proxy import RunningProxy
from tests.support.tokens import bearer_value, minted

ACCESS = "/test.Access/Report"
PUBLIC = "/test.Public/Report"
OK, INVALID_ARGUMENT, PERMISSION_DENIED, UNAUTHENTICATED = 0, 3, 7, 16
PROTOCOL_ERROR = 0x1


def malformed(response: H2Response) -> bool:
    """The HTTP/2 engine refused a malformed request (RFC 9113 8.1.1): RST_STREAM
    PROTOCOL_ERROR, before anything decided on it."""
    return response.reset_code == PROTOCOL_ERROR and response.grpc_status is None


def reason_of(response: H2Response) -> str | None:
    """The authproxy ErrorInfo reason in grpc-status-details-bin, if any."""
    raw = response.get(b"grpc-status-details-bin")
    if raw is None:
        return None
    status = status_pb2.Status.FromString(base64.b64decode(raw + b"=" * (-len(raw) % 4)))
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason if info.domain == "authproxy" else None
    return None


async def send(
    running: RunningProxy, extra: list[tuple[bytes, bytes]], path: str = ACCESS
) -> H2Response:
    port = running.sidecar.port
    return await h2_call(port, grpc_request_headers(port, path) + extra, timeout=5.0)


def identity_seen(backend: EchoBackend) -> list[tuple[str, str | bytes]]:
    """Every x-auth-* pair (any case) the backend received, over all calls."""
    return [(k, v) for _, md in backend.calls for k, v in md if k.lower().startswith("x-auth-")]


def subjects_seen(backend: EchoBackend) -> list[str | bytes]:
    return [v for k, v in identity_seen(backend) if k.lower() == "x-auth-subject"]


async def test_harness_valid_token_over_raw_http2(
    proxy: RunningProxy, backend: EchoBackend, issuer: TokenIssuer
):
    """The hand-built request works: the call succeeds and carries the verified subject."""
    token = issuer.mint("access", "alice", ttl=300).token
    response = await send(proxy, [(b"authorization", bearer_value(token).encode())])
    assert response.grpc_status == OK, response
    assert response.data[:1] == b"\x00"  # one uncompressed gRPC message
    report = json.loads(response.data[5:])
    assert ["x-auth-subject", "alice"] in report["metadata"]
    assert subjects_seen(backend) == ["alice"]


@pytest.mark.parametrize("name", [b"X-Auth-Subject", b"X-AUTH-SUBJECT", b"x-Auth-subject"])
@pytest.mark.parametrize("path", [ACCESS, PUBLIC], ids=["access", "public"])
async def test_uppercase_identity_header_never_reaches_the_backend(
    proxy: RunningProxy, backend: EchoBackend, issuer: TokenIssuer, name: bytes, path: str
):
    """HTTP/2 field names are lower case (RFC 9113 8.2.1): the engine resets the stream
    (PROTOCOL_ERROR) before anything decides. Were it let through, the backend would see
    only the verified identity (x-auth-* is stripped case-insensitively)."""
    token = issuer.mint("access", "alice", ttl=300).token
    extra = [(name, b"root"), (b"X-Auth-Roles", b"admin")]
    if path == ACCESS:
        extra.append((b"authorization", bearer_value(token).encode()))
    response = await send(proxy, extra, path)
    assert malformed(response) or response.grpc_status == OK, response
    if path == PUBLIC:
        assert identity_seen(backend) == []
    else:
        assert set(subjects_seen(backend)) <= {"alice"}
        assert all(k.lower() != "x-auth-roles" for k, _ in identity_seen(backend))
    if response.grpc_status == OK:  # if it was let through, it carried the verified subject
        assert subjects_seen(backend) == (["alice"] if path == ACCESS else [])


@pytest.mark.parametrize("path", [ACCESS, PUBLIC], ids=["access", "public"])
async def test_identity_header_repeated_fifty_times(
    proxy: RunningProxy, backend: EchoBackend, issuer: TokenIssuer, path: str
):
    token = issuer.mint("access", "alice", ttl=300).token
    extra = [(b"x-auth-subject", f"root{i}".encode()) for i in range(50)]
    if path == ACCESS:
        extra.append((b"authorization", bearer_value(token).encode()))
    response = await send(proxy, extra, path)
    assert response.grpc_status == OK, response
    assert subjects_seen(backend) == (["alice"] if path == ACCESS else [])


async def test_two_authorization_headers_with_different_tokens(
    proxy: RunningProxy, backend: EchoBackend, issuer: TokenIssuer
):
    alice = issuer.mint("access", "alice", ttl=300).token
    bob = issuer.mint("access", "bob", ttl=300).token
    response = await send(
        proxy,
        [
            (b"authorization", bearer_value(alice).encode()),
            (b"authorization", bearer_value(bob).encode()),
        ],
    )
    assert (response.grpc_status, reason_of(response)) == (UNAUTHENTICATED, "TOKEN_AMBIGUOUS")
    assert backend.calls == []


@pytest.mark.parametrize(
    "fields",
    [
        [(b"Authorization", b"valid"), (b"authorization", b"other")],
        [(b"authorization", b"valid"), (b"AUTHORIZATION", b"other")],
        [(b"Authorization", b"invalid"), (b"authorization", b"valid")],
        [(b"Authorization", b"invalid")],
    ],
    ids=[
        "upper-valid+lower-other",
        "lower-valid+upper-other",
        "upper-invalid+lower-valid",
        "upper-invalid",
    ],
)
async def test_uppercase_authorization_never_lets_a_bad_or_second_token_through(
    proxy: RunningProxy, backend: EchoBackend, issuer: TokenIssuer, fields
):
    tokens = {
        b"valid": bearer_value(minted(issuer)).encode(),
        b"other": bearer_value(minted(issuer, "bob")).encode(),
        b"invalid": b"Bearer x.y.z",
    }
    response = await send(proxy, [(name, tokens[value]) for name, value in fields])
    # Refused by the HTTP/2 engine (a malformed request: RST_STREAM PROTOCOL_ERROR) or by
    # the proxy (ambiguous / malformed); never OK, and the backend never sees the call.
    assert malformed(response) or response.grpc_status == UNAUTHENTICATED, response
    if response.grpc_status == UNAUTHENTICATED:
        assert reason_of(response) in ("TOKEN_AMBIGUOUS", "TOKEN_MALFORMED")
    assert backend.calls == []


async def test_uppercase_authorization_alone_with_a_valid_token(
    proxy: RunningProxy, backend: EchoBackend, issuer: TokenIssuer
):
    """RFC 9113 makes the request malformed; the HTTP/2 engine resets the stream. Never OK
    with a forged or missing identity."""
    token = issuer.mint("access", "alice", ttl=300).token
    response = await send(proxy, [(b"Authorization", bearer_value(token).encode())])
    assert malformed(response) or response.grpc_status == OK, response
    assert set(subjects_seen(backend)) <= {"alice"}
    assert len(backend.calls) <= 1


@pytest.mark.parametrize(
    "value",
    [
        b"Bearer {t}\r\n x",
        b"Bearer {t}\r\n\tx",
        b"Bearer {t}\x00",
        b"Bearer \x00{t}",
        b"Bearer {t}\x00x",
    ],
    ids=["obs-fold", "obs-fold-tab", "trailing-nul", "nul-before-token", "nul-inside"],
)
async def test_control_characters_in_authorization_are_refused(
    proxy: RunningProxy, backend: EchoBackend, issuer: TokenIssuer, value: bytes
):
    token = issuer.mint("access", "alice", ttl=300).token
    response = await send(proxy, [(b"authorization", value.replace(b"{t}", token.encode()))])
    assert malformed(response) or response.grpc_status == UNAUTHENTICATED, response
    if response.grpc_status == UNAUTHENTICATED:
        assert reason_of(response) == "TOKEN_MALFORMED"
    assert backend.calls == []


@pytest.mark.parametrize(
    "value",
    [b"Bearer {t}\r\n", b"\r\nBearer {t}"],
    ids=["trailing-crlf", "leading-crlf"],
)
async def test_line_breaks_around_the_authorization_value_are_refused(
    proxy: RunningProxy, backend: EchoBackend, issuer: TokenIssuer, value: bytes
):
    """RFC 9113 8.2.1: a field value with CR, LF or NUL makes the request malformed, and
    RFC 6750 allows only spaces between scheme and token. Expected: TOKEN_MALFORMED (or
    a refusal by the HTTP/2 layer). (Found: proxy/decide/bearer.py `extract_bearer` calls
    `value.strip()`, which also strips CR/LF/TAB/VT/FF, so the malformed value is
    accepted and the call succeeds. gRPC core passes such values to the application.)"""
    token = issuer.mint("access", "alice", ttl=300).token
    response = await send(proxy, [(b"authorization", value.replace(b"{t}", token.encode()))])
    assert malformed(response) or response.grpc_status == UNAUTHENTICATED, response
    if response.grpc_status == UNAUTHENTICATED:
        assert reason_of(response) == "TOKEN_MALFORMED"
    assert backend.calls == []


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (ACCESS, b"a\r\n b"),
        (ACCESS, b"a\x00b"),
        (ACCESS, b"a\nx-auth-subject: root"),
        (ACCESS, "\u00e9".encode()),
        (PUBLIC, b"a\x00b"),
    ],
    ids=["obs-fold", "nul", "lf-injection", "non-ascii", "public-nul"],
)
async def test_illegal_bytes_in_other_headers_end_the_call_and_never_reach_the_backend(
    proxy: RunningProxy, backend: EchoBackend, issuer: TokenIssuer, path: str, value: bytes
):
    """An allowed call (access with a valid token, or public with none) whose other
    metadata holds bytes gRPC does not allow in a text value (printable ASCII only). The
    proxy refuses to relay them: the call ends at once with INVALID_ARGUMENT naming the
    header (or, for CR, LF and NUL, the HTTP/2 engine resets the stream), and the backend
    sees nothing (no header injected through a line break).

    (Regression: the unary path used to hand such values to the gRPC client, which raised
    ExecuteBatchError; unhandled, the call hung until the client's deadline.)"""
    token = issuer.mint("access", "alice", ttl=300).token
    extra = [(b"x-custom", value)]
    if path == ACCESS:
        extra.append((b"authorization", bearer_value(token).encode()))
    port = proxy.sidecar.port
    try:
        response = await h2_call(port, grpc_request_headers(port, path) + extra, timeout=1.5)
    except TimeoutError:
        pytest.fail("no gRPC status within 1.5 s: the call hangs")
    if not malformed(response):  # CR, LF, NUL: the HTTP/2 engine's refusal; else ours
        assert response.grpc_status == INVALID_ARGUMENT, response
        assert b"x-custom" in dict(response.headers + response.trailers).get(b"grpc-message", b"")
    assert backend.calls == []


async def test_tab_after_the_scheme_is_malformed(
    proxy: RunningProxy, backend: EchoBackend, issuer: TokenIssuer
):
    token = issuer.mint("access", "alice", ttl=300).token
    for value in (b"Bearer\t" + token.encode(), b"Bearer \t" + token.encode()):
        response = await send(proxy, [(b"authorization", value)])
        assert (response.grpc_status, reason_of(response)) == (UNAUTHENTICATED, "TOKEN_MALFORMED")
    assert backend.calls == []


@pytest.mark.parametrize(
    ("path", "status", "reason"),
    [
        ("/test.Public/../test.Access/Report", PERMISSION_DENIED, "METHOD_MALFORMED"),
        ("/test.Public/Report/../../test.Access/Report", PERMISSION_DENIED, "METHOD_MALFORMED"),
        ("//test.Public/Report", PERMISSION_DENIED, "METHOD_MALFORMED"),
        ("/test.Public/Report%2F..%2Ftest.Access", PERMISSION_DENIED, "METHOD_MALFORMED"),
        ("/test.Access/Report?as=public", PERMISSION_DENIED, "METHOD_MALFORMED"),
        ("/test.Public/./Report", PERMISSION_DENIED, "METHOD_MALFORMED"),
        ("/test.public/Report", UNAUTHENTICATED, "TOKEN_MISSING"),  # default level: access
        ("/test.Denied/Report", PERMISSION_DENIED, "METHOD_DENIED"),
    ],
)
async def test_path_tricks_never_borrow_a_public_rule(
    proxy: RunningProxy, backend: EchoBackend, path: str, status: int, reason: str
):
    response = await send(proxy, [], path)
    assert (response.grpc_status, reason_of(response)) == (status, reason), response
    assert backend.calls == []
