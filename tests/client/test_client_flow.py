"""The client library (`proxy.client`) against the real proxy and example backend: the
login flow, and which token each method gets — checked where it arrives."""

from __future__ import annotations

import asyncio
import json

import grpc
import pyotp
import pytest

from authproxy.client import AsyncAuthSession, AuthSession, MethodLevels, NoTokenError
from authproxy.policy.loader import PolicyError, load_policy
from authproxy.policy.model import PUBLIC
from examples.backend.api.v1 import api_pb2, api_pb2_grpc
from tests.support.client import (
    GET_PROFILE,
    Recorder,
    forwarding_policy,
    sent_token,
    signed_up,
    target,
)
from tests.support.echo_backend import start_echo_backend
from tests.support.example_backend import (
    ADMIN_SECRET,
    PASSWORD,
    POLICY,
    decoded,
    running_behind_proxy,
)
from tests.support.tokens import bearer


async def test_full_flow_login_2fa_access_refresh_logout(tmp_path):
    recorder = Recorder()
    async with running_behind_proxy(tmp_path, interceptors=[recorder]) as proxied:
        created = await signed_up(proxied, "flow@example.com", enable_2fa=True)
        levels = await MethodLevels.from_admin_async(proxied.admin_url, admin_token=ADMIN_SECRET)
        async with AsyncAuthSession(target(proxied), levels) as session:
            users = api_pb2_grpc.UserServiceStub(session.channel)
            data = api_pb2_grpc.DataServiceStub(session.channel)

            login = await session.login("flow@example.com", PASSWORD)
            assert login.requires_2fa and login.expires_in > 0
            assert session.store.get("2fa") is not None
            assert session.store.get("access") is None and not session.logged_in

            await session.verify_2fa(pyotp.parse_uri(created.otpauth_uri).now())
            assert session.store.get("2fa") is None  # the 2FA token is spent
            access, refresh = session.store.get("access"), session.store.get("refresh")
            assert access is not None and refresh is not None
            # Expiry comes from the token itself.
            assert access.expires_at == decoded(access.value)["exp"]
            assert refresh.expires_at == decoded(refresh.value)["exp"]

            profile = await users.GetProfile(api_pb2.GetProfileRequest())
            assert profile.user_id == created.user_id
            record = await data.CreateRecord(api_pb2.CreateRecordRequest(data="x"))
            assert record.owner == created.user_id

            await session.refresh()
            rotated = session.store.get("refresh")
            assert rotated is not None and rotated.value != refresh.value
            assert session.store.get("access").value != access.value  # type: ignore[union-attr]
            # The old refresh token was spent by the rotation.
            with pytest.raises(grpc.aio.AioRpcError) as spent:
                await proxied.auth.RefreshToken(
                    api_pb2.RefreshTokenRequest(),
                    metadata=bearer(refresh.value),
                )
            assert spent.value.code() == grpc.StatusCode.UNAUTHENTICATED

            listed = await data.ListRecords(api_pb2.ListRecordsRequest())
            assert [r.id for r in listed.records] == [record.id]

            await session.logout()
            assert not session.logged_in and session.store.get("access") is None
            reached = recorder.count(GET_PROFILE)
            with pytest.raises(NoTokenError):
                await users.GetProfile(api_pb2.GetProfileRequest())
            assert recorder.count(GET_PROFILE) == reached
        # Logout revoked the last access token at the proxy.
        revoked = [r for r in await proxied.revocations() if r.get("jti")]
        assert revoked


def _sync_flow(address: str, levels: MethodLevels) -> tuple[str, list[str]]:
    with AuthSession(address, levels) as session:
        users = api_pb2_grpc.UserServiceStub(session.channel)
        data = api_pb2_grpc.DataServiceStub(session.channel)
        assert not session.login("sync@example.com", PASSWORD).requires_2fa
        subject = users.GetProfile(api_pb2.GetProfileRequest()).user_id
        data.CreateRecord(api_pb2.CreateRecordRequest(data="one"))
        stream = data.WatchRecords(api_pb2.WatchRecordsRequest(include_existing=True))
        assert next(stream).data == "one"  # streams carry the access token too
        stream.cancel()
        session.refresh()
        owners = [r.owner for r in data.ListRecords(api_pb2.ListRecordsRequest()).records]
        session.logout()
        assert not session.logged_in
        with pytest.raises(NoTokenError):
            users.GetProfile(api_pb2.GetProfileRequest())
        return subject, owners


async def test_sync_session_runs_the_same_flow(tmp_path):
    async with running_behind_proxy(tmp_path) as proxied:
        created = await signed_up(proxied, "sync@example.com")
        levels = MethodLevels.from_file(POLICY)
        # The proxy runs on this event loop: the blocking session runs in a thread.
        subject, owners = await asyncio.to_thread(_sync_flow, target(proxied), levels)
        assert subject == created.user_id
        assert owners == [created.user_id]


async def test_no_token_is_a_local_error_before_any_network_call():
    levels = MethodLevels.from_file(POLICY)
    # Nothing listens on port 1: any call that went out would fail with UNAVAILABLE.
    async with AsyncAuthSession("127.0.0.1:1", levels, timeout=2) as session:
        auth = api_pb2_grpc.AuthServiceStub(session.channel)
        users = api_pb2_grpc.UserServiceStub(session.channel)
        for call, request, level in (
            (users.GetProfile, api_pb2.GetProfileRequest(), "access"),
            (auth.Verify2FA, api_pb2.Verify2FARequest(code="123456"), "2fa"),
            (auth.RefreshToken, api_pb2.RefreshTokenRequest(), "refresh"),
        ):
            with pytest.raises(NoTokenError) as refused:
                await call(request)
            assert refused.value.level == level
            assert f"level {level!r}" in str(refused.value)
        # A public method is sent (and fails to connect): public needs no token.
        with pytest.raises(grpc.aio.AioRpcError) as sent:
            await users.SearchPublicUsers(api_pb2.SearchRequest(), timeout=2)
        assert sent.value.code() in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )


async def test_each_method_gets_only_the_token_of_its_level_checked_at_the_backend(tmp_path):
    """With `forward_token: true` the backend sees the authorization header of every call
    it receives: public methods carry none, and every other method carries a token whose
    type is the one its level accepts."""
    recorder = Recorder()
    policy_path = forwarding_policy(tmp_path)
    async with running_behind_proxy(
        tmp_path, policy=policy_path, interceptors=[recorder]
    ) as proxied:
        created = await signed_up(proxied, "levels@example.com", enable_2fa=True)
        levels = MethodLevels.from_file(policy_path)
        async with AsyncAuthSession(target(proxied), levels) as session:
            auth = api_pb2_grpc.AuthServiceStub(session.channel)
            users = api_pb2_grpc.UserServiceStub(session.channel)
            data = api_pb2_grpc.DataServiceStub(session.channel)
            await users.SearchPublicUsers(api_pb2.SearchRequest())
            await session.login("levels@example.com", PASSWORD)
            await auth.ResendCode(api_pb2.ResendCodeRequest())
            await users.SearchPublicUsers(api_pb2.SearchRequest())
            await session.verify_2fa(pyotp.parse_uri(created.otpauth_uri).now())
            await auth.HealthCheck(api_pb2.google_dot_protobuf_dot_empty__pb2.Empty())
            await users.GetProfile(api_pb2.GetProfileRequest())
            await session.refresh()
            await data.CreateRecord(api_pb2.CreateRecordRequest(data="x"))
            await users.SearchPublicUsers(api_pb2.SearchRequest())
            await session.logout()

    policy = load_policy(policy_path)
    seen_levels = set()
    for method, metadata in recorder.calls:
        if method.startswith("/grpc."):
            continue  # the proxy's own reflection and health calls
        level = levels.level(method)
        seen_levels.add(level)
        token = sent_token(metadata)
        if level == PUBLIC:
            assert token is None, f"{method} (public) carried a token"
            continue
        assert token is not None, f"{method} ({level}) carried no token"
        expected = policy.tokens[level]
        assert decoded(token)[expected.type_claim] == expected.type, (method, level)
    assert seen_levels == {"public", "2fa", "refresh", "access"}


async def test_a_call_with_its_own_authorization_is_left_alone(tmp_path):
    recorder = Recorder()
    policy_path = forwarding_policy(tmp_path)
    async with running_behind_proxy(
        tmp_path, policy=policy_path, interceptors=[recorder]
    ) as proxied:
        _, login = await proxied.account("own@example.com")
        levels = MethodLevels.from_file(policy_path)
        async with AsyncAuthSession(target(proxied), levels) as session:
            await session.login("own@example.com", PASSWORD)
            users = api_pb2_grpc.UserServiceStub(session.channel)
            chosen = login.access_token  # another valid access token of the same user
            assert chosen != session.store.get("access").value  # type: ignore[union-attr]
            await users.GetProfile(api_pb2.GetProfileRequest(), metadata=bearer(chosen))
        method, metadata = recorder.calls[-1]
        assert method == GET_PROFILE
        assert sent_token(metadata) == chosen


async def test_levels_from_the_file_and_from_the_admin_api_agree(tmp_path):
    async with running_behind_proxy(tmp_path) as proxied:
        from_admin = await MethodLevels.from_admin_async(
            proxied.admin_url, admin_token=ADMIN_SECRET
        )
    from_file = MethodLevels.from_file(POLICY)
    assert from_admin.policy.version == from_file.policy.version
    for method in (
        *from_file.policy.exact,
        "/api.v1.DataService/ListRecords",  # a service wildcard
        "/unknown.v1.Thing/Do",  # the default
    ):
        assert from_admin.level(method) == from_file.level(method), method
    assert from_file.level("/unknown.v1.Thing/Do") == "access"
    assert from_file.level("/api.v1.AuthService/Login") == "public"
    assert from_file.level("/admin.v1.Ops/Shutdown") == "deny"


def test_a_bad_policy_file_names_the_file_and_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(POLICY.read_text().replace("Verify2FA: 2fa", "Verify2FA: twofa", 1))
    with pytest.raises(PolicyError) as error:
        MethodLevels.from_file(bad)
    message = str(error.value)
    assert str(bad) in message and "twofa" in message
    line = next(n for n, t in enumerate(bad.read_text().splitlines(), 1) if "twofa" in t)
    assert f":{line}" in message


ECHO_POLICY = """\
version: 1
default: access
tokens:
  2fa:     {type: 2fa_pending, audience: a}
  refresh: {type: refresh, audience: b}
  access:  {type: access, audience: c}
methods:
  /test.Public/*: public
  /test.TwoFA/*: 2fa
  /test.Refresh/*: refresh
  /test.Denied/*: deny
"""


async def test_what_leaves_the_client_for_each_level(tmp_path):
    """Straight to a backend that reports the metadata it got (no proxy in between): each
    level's method gets exactly its own token, public and deny methods none, on unary and
    streaming calls alike."""
    policy = tmp_path / "echo-policy.yaml"
    policy.write_text(ECHO_POLICY)
    backend = await start_echo_backend()
    try:
        async with AsyncAuthSession(
            f"127.0.0.1:{backend.port}", MethodLevels.from_file(policy)
        ) as session:
            session.store.set("2fa", "the-2fa-token")
            session.store.set_pair("the-access-token", "the-refresh-token")
            session.store.set("2fa", "the-2fa-token")  # set_pair spends a 2FA token
            expected = {
                "Public": None,
                "TwoFA": "the-2fa-token",
                "Refresh": "the-refresh-token",
                "Access": "the-access-token",  # the default level
                "Denied": None,
            }
            for service, token in expected.items():
                report = await session.channel.unary_unary(f"/test.{service}/Report")(b"")
                sent = [v for k, v in json.loads(report)["metadata"] if k == "authorization"]
                assert sent == ([f"Bearer {token}"] if token else []), service
                chat = session.channel.stream_stream(f"/test.{service}/Chat")(iter([b"x"]))
                assert [m async for m in chat] == [b"echo:x"]
                _, metadata = backend.calls[-1]
                sent = [v for k, v in metadata if k == "authorization"]
                assert sent == ([f"Bearer {token}"] if token else []), service
    finally:
        await backend.server.stop(None)  # type: ignore[union-attr]
