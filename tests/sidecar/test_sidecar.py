"""The sidecar over real loopback sockets: decisions, identity headers, and faithful relay
of all four RPC kinds, metadata, trailers, status details, deadlines and cancellation.

Every test runs twice (see the `proxy` fixture): with method kinds known (known unary
calls are not watched as streams) and without (every call is)."""

from __future__ import annotations

import asyncio
import base64
import json

import grpc
import pytest

from tests.support.echo_backend import EchoBackend
from tests.support.keys import Keys
from tests.support.policies import TEST_POLICY
from tests.support.running_proxy import RunningProxy, error_info, start_sidecar
from tests.support.tokens import minted


async def test_access_call_reaches_backend_with_verified_identity(proxy: RunningProxy, issuer):
    token = issuer.mint(
        "access",
        "alice",
        ttl=300,
        roles=["user", "ops"],
        permissions=["user:read"],
        scopes=["read"],
    )
    report = await proxy.report("/test.Access/Report", token=token.token)
    md = report["md"]
    assert md["x-auth-subject"] == ["alice"]
    assert md["x-auth-token-type"] == ["access"]
    assert md["x-auth-roles"] == ["user,ops"]
    assert md["x-auth-permissions"] == ["user:read"]
    assert md["x-auth-scopes"] == ["read"]
    assert md["x-auth-jti"] == [token.jti]
    assert md["x-auth-issuer"] == ["test-issuer"]
    claims = json.loads(base64.urlsafe_b64decode(md["x-auth-claims"][0] + "=="))
    assert claims == token.claims
    assert "authorization" not in md


@pytest.mark.parametrize("service", ["Public", "TwoFA", "Refresh", "Access"])
async def test_forged_identity_headers_never_reach_backend(proxy: RunningProxy, issuer, service):
    level = {"Public": None, "TwoFA": "2fa", "Refresh": "refresh", "Access": "access"}[service]
    token = issuer.mint(level, "alice", ttl=300).token if level else None
    forged = (
        ("x-auth-subject", "root"),
        ("x-auth-subject", "admin"),
        ("x-auth-roles", "admin"),
        ("x-auth-anything", "x"),
        ("x-auth-claims-bin", b"\x00"),
    )
    report = await proxy.report(f"/test.{service}/Report", token=token, metadata=forged)
    md = report["md"]
    forged_keys = {k for k, _ in forged}
    if level is None:
        assert not [k for k in md if k.startswith("x-auth-")]
    else:
        assert md["x-auth-subject"] == ["alice"]
        assert "x-auth-roles" not in md  # the token has no roles; the forged one is gone
        assert not (forged_keys - {"x-auth-subject", "x-auth-roles"}) & set(md)
    assert "authorization" not in md


#: Identity headers of other auth proxies, and method/URL overrides, as a client might send
#: them (underscore spellings too; gRPC clients send lowercase keys).
FOREIGN = (
    ("x-forwarded-user", "root"),
    ("x-forwarded-groups", "admins"),
    ("x-forwarded-access-token", "ey"),
    ("remote-user", "root"),
    ("x-remote-group", "system:masters"),
    ("x-remote-extra-scopes", "all"),
    ("x-pomerium-claim-email", "root@example.com"),
    ("x-user", "root"),
    ("x_forwarded_email", "root@example.com"),
    ("x-http-method-override", "DELETE"),
    ("x-original-url", "/admin"),
    ("x_rewrite_url", "/admin"),
)


@pytest.mark.parametrize("service", ["Public", "Access"])
async def test_foreign_identity_and_override_headers_never_reach_backend(
    proxy: RunningProxy, issuer, service
):
    token = minted(issuer) if service == "Access" else None
    metadata = (*FOREIGN, ("x-forwarded-for", "10.0.0.1"), ("x-custom", "kept"))
    report = await proxy.report(f"/test.{service}/Report", token=token, metadata=metadata)
    md = report["md"]
    assert not {key.lower() for key, _ in FOREIGN} & set(md)
    assert (md["x-forwarded-for"], md["x-custom"]) == (["10.0.0.1"], ["kept"])


async def test_strip_headers_in_the_policy_add_and_keep_names(
    tmp_path, backend: EchoBackend, keys: Keys, issuer
):
    policy = TEST_POLICY + "strip_headers:\n  add: [x-tenant, x-legacy-*]\n  keep: [x-email]\n"
    running = await start_sidecar(tmp_path, backend.port, keys, policy=policy)
    try:
        report = await running.report(
            "/test.Access/Report",
            token=minted(issuer),
            metadata=(
                ("x-tenant", "t1"),
                ("x-legacy-user", "root"),
                ("x-email", "alice@example.com"),
                ("x-forwarded-user", "root"),
            ),
        )
    finally:
        await running.stop()
    md = report["md"]
    assert md["x-email"] == ["alice@example.com"]
    assert not {"x-tenant", "x-legacy-user", "x-forwarded-user"} & set(md)
    assert md["x-auth-subject"] == ["alice"]


async def test_public_method_needs_no_token_and_gets_no_identity(proxy: RunningProxy):
    report = await proxy.report("/test.Public/Report", metadata=(("x-custom", "kept"),))
    assert report["md"]["x-custom"] == ["kept"]
    assert "x-auth-subject" not in report["md"]


@pytest.mark.parametrize(
    ("method", "token_level", "code", "reason"),
    [
        ("/test.Access/Report", None, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MISSING"),
        ("/test.Access/Report", "refresh", grpc.StatusCode.UNAUTHENTICATED, "WRONG_TOKEN_TYPE"),
        ("/test.Access/Report", "2fa", grpc.StatusCode.UNAUTHENTICATED, "WRONG_TOKEN_TYPE"),
        ("/test.Refresh/Report", "access", grpc.StatusCode.UNAUTHENTICATED, "WRONG_TOKEN_TYPE"),
        ("/test.TwoFA/Report", "access", grpc.StatusCode.UNAUTHENTICATED, "WRONG_TOKEN_TYPE"),
        ("/test.Admin/Report", "access", grpc.StatusCode.PERMISSION_DENIED, "INSUFFICIENT_ROLE"),
        ("/test.Denied/Report", "access", grpc.StatusCode.PERMISSION_DENIED, "METHOD_DENIED"),
        ("/test.Other/Report", None, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MISSING"),
    ],
)
async def test_denied_calls_get_status_reason_and_never_reach_backend(
    proxy: RunningProxy, backend: EchoBackend, issuer, method, token_level, code, reason
):
    token = issuer.mint(token_level, "alice", ttl=300).token if token_level else None
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await proxy.unary(method, token=token)
    assert caught.value.code() == code
    info = error_info(caught.value)
    assert info is not None and info.reason == reason and info.domain == "authproxy"
    assert reason in caught.value.details()
    assert backend.calls == []


async def test_wrong_type_message_says_what_the_method_needs(proxy: RunningProxy, issuer):
    refresh = issuer.mint("refresh", "alice", ttl=300).token
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await proxy.unary("/test.Access/Report", token=refresh)
    assert "this method needs an access token; got a refresh token" in caught.value.details()


async def test_admin_role_allows(proxy: RunningProxy, issuer):
    report = await proxy.report("/test.Admin/Report", token=minted(issuer, roles=["admin"]))
    assert report["md"]["x-auth-roles"] == ["admin"]


async def test_forward_token_rule_keeps_authorization(proxy: RunningProxy, issuer):
    token = minted(issuer)
    report = await proxy.report("/test.Forward/Report", token=token)
    assert report["md"]["authorization"] == [f"Bearer {token}"]


async def test_two_authorization_headers_are_refused(proxy: RunningProxy, issuer):
    token = minted(issuer)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await proxy.unary(
            "/test.Access/Report", token=token, metadata=(("authorization", "Bearer x.y.z"),)
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(caught.value).reason == "TOKEN_AMBIGUOUS"


async def test_metadata_headers_and_trailers_relay_faithfully(proxy: RunningProxy, issuer):
    md = (("x-custom", "v1"), ("x-custom", "v2"), ("x-data-bin", b"\x00\x01\xfe\xff"))
    response, call = await proxy.unary(
        "/test.Access/Echo", b"payload", token=minted(issuer), metadata=md
    )
    assert response == b"payload"
    assert ("x-backend-header", "hello") in tuple(await call.initial_metadata())
    trailers = tuple(await call.trailing_metadata())
    assert ("x-backend-trailer", "bye") in trailers
    assert ("x-trailer-bin", b"\x00\xff") in trailers
    report = await proxy.report("/test.Access/Report", token=minted(issuer), metadata=md)
    assert report["md"]["x-custom"] == ["v1", "v2"]
    assert report["md"]["x-data-bin"] == ["bin:" + b"\x00\x01\xfe\xff".hex()]


async def test_backend_status_details_and_trailers_reach_client(proxy: RunningProxy, issuer):
    request = json.dumps({"code": "NOT_FOUND", "message": "no such record"}).encode()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await proxy.unary("/test.Access/Fail", request, token=minted(issuer))
    error = caught.value
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == "no such record"
    info = error_info(error)
    assert (info.reason, info.domain) == ("BACKEND_REASON", "backend.test")
    trailers = tuple(error.trailing_metadata())
    assert ("x-fail-trailer", "t") in trailers
    assert ("x-fail-bin", b"\x01\x02") in trailers
    assert ("x-fail-header", "h") in tuple(error.initial_metadata())


async def test_server_streaming(proxy: RunningProxy, issuer):
    md = (("authorization", f"Bearer {minted(issuer)}"),)
    call = proxy.channel.unary_stream("/test.Access/Count")(b'{"n": 50}', metadata=md, timeout=10)
    assert [m async for m in call] == [str(i).encode() for i in range(50)]
    assert await call.code() == grpc.StatusCode.OK


async def test_client_streaming(proxy: RunningProxy, issuer):
    md = (("authorization", f"Bearer {minted(issuer)}"),)

    async def messages():
        for i in range(20):
            yield bytes([i]) * 1000

    call = proxy.channel.stream_unary("/test.Access/Sum")(messages(), metadata=md, timeout=10)
    assert json.loads(await call) == {"messages": 20, "bytes": 20_000}


async def test_bidi_streaming_interleaves_and_relays_headers_and_trailers(
    proxy: RunningProxy, issuer
):
    md = (("authorization", f"Bearer {minted(issuer)}"),)
    call = proxy.channel.stream_stream("/test.Access/Chat")(metadata=md, timeout=10)
    for i in range(5):  # one at a time: each answer must arrive before the next request
        await call.write(f"m{i}".encode())
        assert await call.read() == f"echo:m{i}".encode()
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF
    assert ("x-chat", "open") in tuple(await call.initial_metadata())
    assert ("x-chat-end", "done") in tuple(await call.trailing_metadata())
    assert await call.code() == grpc.StatusCode.OK


async def test_streaming_call_is_authorized_before_any_message(
    proxy: RunningProxy, backend: EchoBackend
):
    call = proxy.channel.stream_stream("/test.Access/Chat")(timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert backend.calls == []


async def test_deadline_propagates_as_remaining_time(proxy: RunningProxy, issuer):
    response, _ = await proxy.unary("/test.Access/Report", token=minted(issuer), timeout=3.0)
    remaining = json.loads(response)["time_remaining"]
    # grpc-timeout is encoded with limited precision (rounded up), hence the small margin.
    assert remaining is not None and 0 < remaining <= 3.05


async def test_no_deadline_stays_no_deadline(proxy: RunningProxy, issuer):
    md = (("authorization", f"Bearer {minted(issuer)}"),)
    response = await proxy.channel.unary_unary("/test.Access/Report")(b"{}", metadata=md)
    assert json.loads(response)["time_remaining"] is None


async def test_deadline_exceeded_reaches_client(proxy: RunningProxy, issuer):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await proxy.unary("/test.Access/Hang", token=minted(issuer), timeout=0.5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_client_cancel_cancels_backend_call(
    proxy: RunningProxy, backend: EchoBackend, issuer
):
    md = (("authorization", f"Bearer {minted(issuer)}"),)
    call = proxy.channel.unary_unary("/test.Access/Hang")(b"{}", metadata=md, timeout=30)
    await asyncio.wait_for(backend.hang_started.wait(), 10)
    call.cancel()
    await asyncio.wait_for(backend.cancelled.wait(), 10)
    assert backend.cancelled.is_set()


@pytest.mark.parametrize("size", [4 * 1024 * 1024, 12 * 1024 * 1024])
async def test_large_messages(proxy: RunningProxy, issuer, size):
    payload = bytes(range(256)) * (size // 256)
    response, _ = await proxy.unary("/test.Access/Echo", payload, token=minted(issuer))
    assert response == payload


async def test_message_over_limit_is_refused(proxy: RunningProxy, backend: EchoBackend, issuer):
    payload = b"x" * (17 * 1024 * 1024)  # default limit is 16 MiB
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await proxy.unary("/test.Access/Echo", payload, token=minted(issuer))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The relay refuses the message by its 5-byte prefix, before any of it is relayed.
    assert backend.echoed == []


async def test_compressed_requests_and_responses(proxy: RunningProxy, issuer):
    payload = b"compress me " * 10_000
    response, _ = await proxy.unary(
        "/test.Access/Compressed", payload, token=minted(issuer), compression=grpc.Compression.Gzip
    )
    assert response == payload
