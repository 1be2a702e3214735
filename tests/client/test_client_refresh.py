"""The client library's refresh: one refresh for many callers, a refresh and one retry on
TOKEN_EXPIRED, rotation, and what a failed refresh leaves behind."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from authproxy.client import (
    AsyncAuthSession,
    AuthSession,
    LoginRequiredError,
    MethodLevels,
    NoTokenError,
    RefreshError,
    TokenStore,
    denial_reason,
)
from examples.backend.api.v1 import api_pb2, api_pb2_grpc
from tests.support.client import (
    GET_PROFILE,
    REFRESH,
    Recorder,
    forwarding_policy,
    profiles_from_threads,
    short_access,
    signed_up,
    target,
)
from tests.support.example_backend import PASSWORD, POLICY, running_behind_proxy

LEVELS = MethodLevels.from_file(POLICY)
WATCH = "/api.v1.DataService/WatchRecords"
CALLS = 50


async def test_fifty_concurrent_calls_near_expiry_make_exactly_one_refresh(tmp_path):
    recorder = Recorder()
    async with running_behind_proxy(tmp_path, interceptors=[recorder]) as proxied:
        created = await signed_up(proxied, "many@example.com")
        async with AsyncAuthSession(target(proxied), LEVELS, skew=60) as session:
            await session.login("many@example.com", PASSWORD)
            logged_in = session.store.get("access")
            assert logged_in is not None
            # The access token has 20 s left: inside the 60 s skew.
            session.store.set("access", short_access(proxied, logged_in.value, ttl=20))
            stale = session.store.get("access")

            users = api_pb2_grpc.UserServiceStub(session.channel)
            profiles = await asyncio.gather(
                *(users.GetProfile(api_pb2.GetProfileRequest()) for _ in range(CALLS))
            )

            assert {p.user_id for p in profiles} == {created.user_id}
            assert recorder.count(REFRESH) == 1
            assert session.refresher.calls == 1
            fresh = session.store.get("access")
            assert fresh is not None and fresh.value != stale.value  # type: ignore[union-attr]
            assert fresh.expires_at is not None and fresh.expires_at - time.time() > 60
            # Every call went out once, with the refreshed token.
            assert recorder.count(GET_PROFILE) == CALLS


def _threads_flow(address: str, tokens: dict[str, str]) -> tuple[set[str], int, str]:
    with AuthSession(address, LEVELS, skew=60) as session:
        session.store.set_pair(tokens["access"], tokens["refresh"])
        subjects = profiles_from_threads(session.channel, CALLS)
        access = session.store.get("access")
        assert access is not None
        return subjects, session.refresher.calls, access.value


async def test_fifty_threads_near_expiry_make_exactly_one_refresh(tmp_path):
    recorder = Recorder()
    async with running_behind_proxy(tmp_path, interceptors=[recorder]) as proxied:
        user_id, login = await proxied.account("threads@example.com")
        tokens = {
            "access": short_access(proxied, login.access_token, ttl=20),
            "refresh": login.refresh_token,
        }
        subjects, calls, access = await asyncio.to_thread(_threads_flow, target(proxied), tokens)
        assert subjects == {user_id}
        assert calls == 1
        assert recorder.count(REFRESH) == 1
        assert access != tokens["access"]


async def test_token_expired_answer_refreshes_once_and_retries_the_call_once(tmp_path):
    recorder = Recorder()
    async with running_behind_proxy(tmp_path, interceptors=[recorder]) as proxied:
        user_id, login = await proxied.account("expired@example.com")
        # The client's clock is an hour behind: by its clock the token is fresh, but the
        # proxy sees it expired (60 s ago, past the policy's 30 s leeway).
        store = TokenStore(clock=lambda: time.time() - 3600)
        store.set_pair(short_access(proxied, login.access_token, ttl=-60), login.refresh_token)
        async with AsyncAuthSession(target(proxied), LEVELS, store=store) as session:
            users = api_pb2_grpc.UserServiceStub(session.channel)
            profile = await users.GetProfile(api_pb2.GetProfileRequest())
            assert profile.user_id == user_id
            assert session.refresher.calls == 1
            assert recorder.count(REFRESH) == 1
            # The refused first attempt never reached the backend; the retry did.
            assert recorder.count(GET_PROFILE) == 1


def _sync_expired(address: str, tokens: dict[str, str]) -> tuple[str, int]:
    store = TokenStore(clock=lambda: time.time() - 3600)
    store.set_pair(tokens["access"], tokens["refresh"])
    with AuthSession(address, LEVELS, store=store) as session:
        users = api_pb2_grpc.UserServiceStub(session.channel)
        return users.GetProfile(api_pb2.GetProfileRequest()).user_id, session.refresher.calls


async def test_sync_token_expired_answer_refreshes_and_retries(tmp_path):
    recorder = Recorder()
    async with running_behind_proxy(tmp_path, interceptors=[recorder]) as proxied:
        user_id, login = await proxied.account("sync-expired@example.com")
        tokens = {
            "access": short_access(proxied, login.access_token, ttl=-60),
            "refresh": login.refresh_token,
        }
        subject, calls = await asyncio.to_thread(_sync_expired, target(proxied), tokens)
        assert (subject, calls) == (user_id, 1)
        assert recorder.count(REFRESH) == 1
        assert recorder.count(GET_PROFILE) == 1


async def test_a_refused_refresh_clears_the_tokens_and_asks_to_log_in_again(tmp_path):
    recorder = Recorder()
    async with running_behind_proxy(tmp_path, interceptors=[recorder]) as proxied:
        await signed_up(proxied, "refused@example.com")
        async with AsyncAuthSession(target(proxied), LEVELS) as session:
            await session.login("refused@example.com", PASSWORD)
            access = session.store.get("access")
            assert access is not None
            # Logged out everywhere from another device: every token of the user,
            # the session's refresh token included, is revoked at the proxy.
            await proxied.logout(access.value, all_devices=True)
            session.store.set("access", short_access(proxied, access.value, ttl=20))
            users = api_pb2_grpc.UserServiceStub(session.channel)
            with pytest.raises(LoginRequiredError) as refused:
                await users.GetProfile(api_pb2.GetProfileRequest())
            assert "log in again" in str(refused.value)
            assert "UNAUTHENTICATED" in str(refused.value)
            assert not session.logged_in and session.store.get("refresh") is None
            # The proxy refused the refresh: it never reached the backend.
            assert recorder.count(REFRESH) == 0
            # Nothing left to send: the next call fails locally, nothing is retried.
            with pytest.raises(NoTokenError):
                await users.GetProfile(api_pb2.GetProfileRequest())
            assert session.refresher.calls == 1


async def test_an_unreachable_proxy_fails_the_refresh_and_keeps_the_tokens(tmp_path):
    async with running_behind_proxy(tmp_path) as proxied:
        _, login = await proxied.account("unreachable@example.com")
        near = short_access(proxied, login.access_token, ttl=20)
        expired = short_access(proxied, login.access_token, ttl=-5)
    # The proxy is gone now. (The channel does not retry: each attempt fails at once.)
    no_retries = [("grpc.enable_retries", 0)]
    async with AsyncAuthSession(target(proxied), LEVELS, timeout=2, options=no_retries) as session:
        session.store.set_pair(near, login.refresh_token)
        users = api_pb2_grpc.UserServiceStub(session.channel)
        # The access token is due for a refresh but still valid: the call goes out with it
        # (and finds no proxy either).
        with pytest.raises(grpc.aio.AioRpcError) as unreachable:
            await users.GetProfile(api_pb2.GetProfileRequest(), timeout=2)
        assert unreachable.value.code() in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )
        with pytest.raises(RefreshError) as failed:
            await session.refresh()
        assert "try again" in str(failed.value)
        assert session.store.get("access").value == near  # type: ignore[union-attr]
        assert session.store.get("refresh").value == login.refresh_token  # type: ignore[union-attr]
        # An expired access token with a failed refresh: the call fails, nothing is lost.
        session.store.set("access", expired)
        with pytest.raises(RefreshError):
            await users.GetProfile(api_pb2.GetProfileRequest())
        assert session.store.get("refresh").value == login.refresh_token  # type: ignore[union-attr]
        assert session.refresher.calls == 3


async def test_an_expired_refresh_token_asks_to_log_in_without_a_call(tmp_path):
    async with running_behind_proxy(tmp_path) as proxied:
        _, login = await proxied.account("old-refresh@example.com")
        near = short_access(proxied, login.access_token, ttl=20)
    # A week and a day later by the client's clock, the refresh token (7 days) is over.
    store = TokenStore(clock=lambda: time.time() + 8 * 24 * 3600)
    store.set_pair(near, login.refresh_token)
    async with AsyncAuthSession("127.0.0.1:1", LEVELS, store=store, timeout=2) as session:
        users = api_pb2_grpc.UserServiceStub(session.channel)
        with pytest.raises(LoginRequiredError, match="refresh token has expired"):
            await users.GetProfile(api_pb2.GetProfileRequest())
        assert session.refresher.calls == 0
        assert not session.logged_in


async def test_the_rotated_refresh_token_replaces_the_old_one(tmp_path):
    async with running_behind_proxy(tmp_path) as proxied:
        await signed_up(proxied, "rotate@example.com")
        async with AsyncAuthSession(target(proxied), LEVELS) as session:
            await session.login("rotate@example.com", PASSWORD)
            seen = [session.store.get("refresh").value]  # type: ignore[union-attr]
            for _ in range(3):
                await session.refresh()
                seen.append(session.store.get("refresh").value)  # type: ignore[union-attr]
            assert len(set(seen)) == 4  # each refresh rotated it, and the session kept each
            users = api_pb2_grpc.UserServiceStub(session.channel)
            await users.GetProfile(api_pb2.GetProfileRequest())
            assert session.refresher.calls == 3


async def test_a_stream_ended_by_token_expiry_is_not_retried_and_the_next_call_refreshes(
    tmp_path,
):
    recorder = Recorder()
    policy = forwarding_policy(tmp_path, leeway="0s")  # the stream ends right at `exp`
    async with running_behind_proxy(tmp_path, policy=policy, interceptors=[recorder]) as proxied:
        await signed_up(proxied, "stream@example.com")
        levels = MethodLevels.from_file(policy)
        async with AsyncAuthSession(target(proxied), levels, skew=1) as session:
            await session.login("stream@example.com", PASSWORD)
            logged_in = session.store.get("access")
            assert logged_in is not None
            session.store.set(
                "access", short_access(proxied, logged_in.value, ttl=8)
            )  # room for a busy machine
            data = api_pb2_grpc.DataServiceStub(session.channel)

            # include_existing: the record arrives whether the stream reaches the
            # backend before or after the create.
            stream = data.WatchRecords(api_pb2.WatchRecordsRequest(include_existing=True))
            created = await data.CreateRecord(api_pb2.CreateRecordRequest(data="before"))
            assert (await stream.read()).id == created.id
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await stream.read()  # until the proxy ends the stream at the token's expiry
            assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert denial_reason(ended.value) == "TOKEN_EXPIRED"
            assert session.refresher.calls == 0  # a stream is not retried
            assert recorder.count(WATCH) == 1

            # The next call sees the expired token and refreshes before it is sent.
            listed = await data.ListRecords(api_pb2.ListRecordsRequest())
            assert [r.id for r in listed.records] == [created.id]
            assert session.refresher.calls == 1
            assert recorder.count(REFRESH) == 1
            again = data.WatchRecords(api_pb2.WatchRecordsRequest(include_existing=True))
            assert (await again.read()).id == created.id
            again.cancel()
