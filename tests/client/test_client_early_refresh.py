"""The early refresh, against the real proxy and example backend: a refresh that fails
inside the early window leaves the calls their still-valid token and is tried again after
a backoff, and the window fits short-lived tokens instead of refreshing before every call."""

from __future__ import annotations

import asyncio
import logging

import pytest

from authproxy.client import (
    AsyncAuthSession,
    AuthSession,
    MethodLevels,
    RefreshError,
    TokenStore,
)
from examples.backend.api.v1 import api_pb2, api_pb2_grpc
from tests.support.client import (
    GET_PROFILE,
    REFRESH,
    ManualClock,
    Outage,
    Recorder,
    forwarding_policy,
    profiles_from_threads,
    sent_token,
    short_access,
    signed_up,
    target,
)
from tests.support.example_backend import PASSWORD, POLICY, running_behind_proxy

LEVELS = MethodLevels.from_file(POLICY)
#: The channel does not retry UNAVAILABLE itself: these tests count the library's refreshes.
NO_RETRIES = [("grpc.enable_retries", 0)]
CALLS = 20


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "authproxy.client" and r.levelno == logging.WARNING
    ]


def _sent(recorder: Recorder, method: str) -> list[str | None]:
    return [sent_token(metadata) for m, metadata in recorder.calls if m == method]


async def test_a_rate_limited_early_refresh_leaves_the_calls_their_valid_token(tmp_path, caplog):
    """RefreshToken limited to once an hour per session: the second refresh is refused
    RATE_LIMITED by the proxy, and the calls go on with the access token they hold, trying
    the refresh again only after a growing backoff, with one warning per try."""
    caplog.set_level(logging.WARNING, "authproxy.client")
    recorder = Recorder()
    policy = forwarding_policy(tmp_path, refresh_limit="1/hour")
    async with running_behind_proxy(tmp_path, policy=policy, interceptors=[recorder]) as proxied:
        user_id, login = await proxied.account("limited@example.com")
        clock = ManualClock()
        store = TokenStore(clock=clock)
        store.set_pair(login.access_token, login.refresh_token)
        levels = MethodLevels.from_file(policy)
        async with AsyncAuthSession(target(proxied), levels, store=store) as session:
            await session.refresh()  # the session's one refresh this hour
            near = short_access(proxied, store.get("access").value, ttl=40)  # type: ignore[union-attr]
            store.set("access", near)  # inside the 60 s window
            users = api_pb2_grpc.UserServiceStub(session.channel)

            for _ in range(5):
                assert (await users.GetProfile(api_pb2.GetProfileRequest())).user_id == user_id
            assert session.refresher.calls == 2  # the first call's refresh, refused
            assert recorder.count(REFRESH) == 1  # the proxy refused the second one
            assert _sent(recorder, GET_PROFILE) == [near] * 5
            (warning,) = _warnings(caplog)
            assert "RESOURCE_EXHAUSTED" in warning and "tried again in 1.0 s" in warning

            clock.advance(1)  # the first backoff is over: one more try, refused again
            await users.GetProfile(api_pb2.GetProfileRequest())
            assert session.refresher.calls == 3
            assert "tried again in 2.0 s" in _warnings(caplog)[-1]
            clock.advance(1)  # the second backoff (2 s) is not
            await users.GetProfile(api_pb2.GetProfileRequest())
            assert session.refresher.calls == 3
            clock.advance(1)
            await users.GetProfile(api_pb2.GetProfileRequest())
            assert session.refresher.calls == 4
            assert len(_warnings(caplog)) == 3  # one per try
            assert _sent(recorder, GET_PROFILE) == [near] * 8
            assert store.get("access").value == near  # type: ignore[union-attr]


async def test_concurrent_calls_share_a_failed_refresh_and_a_later_call_refreshes(tmp_path, caplog):
    """The auth service is briefly unavailable: CALLS concurrent calls inside the window
    share one failed refresh and all go through with the old token; once the service is
    back and the backoff is over, the next call refreshes and carries the new token. A
    token that has expired fails its call when the refresh fails."""
    caplog.set_level(logging.WARNING, "authproxy.client")
    recorder, outage = Recorder(), Outage(REFRESH)
    policy = forwarding_policy(tmp_path)
    async with running_behind_proxy(
        tmp_path, policy=policy, interceptors=[outage, recorder]
    ) as proxied:
        user_id, login = await proxied.account("outage@example.com")
        clock = ManualClock()
        store = TokenStore(clock=clock)
        near = short_access(proxied, login.access_token, ttl=30)
        store.set_pair(near, login.refresh_token)
        levels = MethodLevels.from_file(policy)
        async with AsyncAuthSession(
            target(proxied), levels, store=store, options=NO_RETRIES
        ) as session:
            users = api_pb2_grpc.UserServiceStub(session.channel)
            profiles = await asyncio.gather(
                *(users.GetProfile(api_pb2.GetProfileRequest()) for _ in range(CALLS))
            )
            assert {p.user_id for p in profiles} == {user_id}
            assert (session.refresher.calls, outage.failures) == (1, 1)
            assert len(_warnings(caplog)) == 1
            await users.GetProfile(api_pb2.GetProfileRequest())  # still backing off
            assert session.refresher.calls == 1
            assert _sent(recorder, GET_PROFILE) == [near] * (CALLS + 1)

            outage.down = False
            clock.advance(1)
            await users.GetProfile(api_pb2.GetProfileRequest())
            assert session.refresher.calls == 2 and recorder.count(REFRESH) == 1
            fresh = store.get("access")
            assert fresh is not None and fresh.value != near
            assert _sent(recorder, GET_PROFILE)[-1] == fresh.value
            assert len(_warnings(caplog)) == 1

            outage.down = True
            clock.advance(3600)  # by the client's clock, the new token has expired
            with pytest.raises(RefreshError):
                await users.GetProfile(api_pb2.GetProfileRequest())
            assert session.refresher.calls == 3
            assert store.get("access") is fresh  # kept for the next try


def _threads_fallback(address: str, tokens: dict[str, str]) -> tuple[set[str], int]:
    with AuthSession(address, LEVELS, options=NO_RETRIES) as session:
        session.store.set_pair(tokens["access"], tokens["refresh"])
        subjects = profiles_from_threads(session.channel, CALLS)
        assert session.store.get("access").value == tokens["access"]  # type: ignore[union-attr]
        return subjects, session.refresher.calls


async def test_threads_share_a_failed_refresh_and_go_on_with_their_token(tmp_path):
    outage = Outage(REFRESH)
    async with running_behind_proxy(tmp_path, interceptors=[outage]) as proxied:
        user_id, login = await proxied.account("threads-outage@example.com")
        tokens = {
            "access": short_access(proxied, login.access_token, ttl=30),
            "refresh": login.refresh_token,
        }
        subjects, calls = await asyncio.to_thread(_threads_fallback, target(proxied), tokens)
        assert subjects == {user_id}
        assert calls == outage.failures == 1


async def test_thirty_second_tokens_are_not_refreshed_before_every_call(tmp_path):
    """The backend issues 30 s access tokens; the session's skew (60 s) is longer than
    that. The window is capped at a quarter of the token's life (7.5 s), so calls use each
    token for most of its life: a token with 20 s left is not refreshed, one with 7 s left
    is refreshed once, and the new one serves the calls after it."""
    recorder = Recorder()
    async with running_behind_proxy(tmp_path, interceptors=[recorder], access_ttl=30) as proxied:
        user_id = (await signed_up(proxied, "short@example.com")).user_id
        async with AsyncAuthSession(target(proxied), LEVELS, skew=60) as session:
            assert (await session.login("short@example.com", PASSWORD)).expires_in == 30
            token = session.store.get("access")
            assert token is not None and token.lifetime == 30
            users = api_pb2_grpc.UserServiceStub(session.channel)
            for _ in range(CALLS):
                assert (await users.GetProfile(api_pb2.GetProfileRequest())).user_id == user_id
            assert session.refresher.calls == 0 and recorder.count(REFRESH) == 0
            assert session.refresher.window(token) == 7.5

            session.store.set("access", short_access(proxied, token.value, ttl=7))
            for _ in range(CALLS):
                await users.GetProfile(api_pb2.GetProfileRequest())
            assert session.refresher.calls == 1 and recorder.count(REFRESH) == 1
            assert recorder.count(GET_PROFILE) == 2 * CALLS
