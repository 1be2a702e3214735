"""Calls across a proxy restart and a brief backend outage, with the settings the README
gives: `wait_for_ready=True` (a call made while the proxy is down waits for it) and the
sessions' default retry policy for UNAVAILABLE (`reconnect_options()`)."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from authproxy.client import AsyncAuthSession, AuthSession, MethodLevels, reconnect_options
from examples.backend.api.v1 import api_pb2, api_pb2_grpc
from tests.support.client import Outage, Recorder, restarted, target
from tests.support.example_backend import POLICY, running_behind_proxy

LEVELS = MethodLevels.from_file(POLICY)
CREATE = "/api.v1.DataService/CreateRecord"
WAIT_SECONDS = 20


async def _state(channel: grpc.aio.Channel, wanted: grpc.ChannelConnectivity) -> None:
    """Wait (bounded) until the channel is in state `wanted`."""
    async with asyncio.timeout(WAIT_SECONDS):
        while (state := channel.get_state()) != wanted:
            await channel.wait_for_state_change(state)


async def test_a_call_made_while_the_proxy_is_down_goes_through_when_it_is_back(tmp_path):
    async with running_behind_proxy(tmp_path) as proxied:
        user_id, login = await proxied.account("restart@example.com")
        port = proxied.running.sidecar_port
        async with AsyncAuthSession(target(proxied), LEVELS, wait_for_ready=True) as session:
            session.store.set_pair(login.access_token, login.refresh_token)
            data = api_pb2_grpc.DataServiceStub(session.channel)
            await data.CreateRecord(api_pb2.CreateRecordRequest(data="before"))

            await proxied.running.stop()
            listing = asyncio.ensure_future(
                data.ListRecords(api_pb2.ListRecordsRequest(), timeout=WAIT_SECONDS)
            )
            # The call found no proxy: the channel is backing off before it reconnects.
            await _state(session.channel, grpc.ChannelConnectivity.TRANSIENT_FAILURE)
            assert not listing.done()

            again = await restarted(proxied, port)
            try:
                listed = await listing
                assert [(r.owner, r.data) for r in listed.records] == [(user_id, "before")]
            finally:
                await again.stop()


async def test_a_sync_call_made_while_the_proxy_is_down_goes_through_when_it_is_back(tmp_path):
    async with running_behind_proxy(tmp_path) as proxied:
        user_id, login = await proxied.account("sync-restart@example.com")
        port = proxied.running.sidecar_port
        await proxied.running.stop()
        loop, failing = asyncio.get_running_loop(), asyncio.Event()

        def seen(state: grpc.ChannelConnectivity) -> None:  # on a gRPC thread
            if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                loop.call_soon_threadsafe(failing.set)

        with AuthSession(target(proxied), LEVELS, wait_for_ready=True) as session:
            session.store.set_pair(login.access_token, login.refresh_token)
            session.channel.subscribe(seen)
            data = api_pb2_grpc.DataServiceStub(session.channel)
            request = api_pb2.CreateRecordRequest(data="sync")
            creating = asyncio.ensure_future(
                asyncio.to_thread(data.CreateRecord, request, timeout=WAIT_SECONDS)
            )
            async with asyncio.timeout(WAIT_SECONDS):
                await failing.wait()  # the call found no proxy
            assert not creating.done()
            again = await restarted(proxied, port)
            try:
                assert (await creating).owner == user_id
            finally:
                session.channel.unsubscribe(seen)
                await again.stop()


async def test_the_sessions_retry_a_call_the_backend_answered_unavailable(tmp_path):
    """The backend is briefly unavailable (CreateRecord fails twice): the session's channel
    retries the call (`reconnect_options()`, its default), and it goes through; a session
    whose options bring their own service config does not retry."""
    recorder, outage = Recorder(), Outage(CREATE, failures_left=2)
    async with running_behind_proxy(tmp_path, interceptors=[outage, recorder]) as proxied:
        user_id, login = await proxied.account("retry@example.com")
        async with AsyncAuthSession(target(proxied), LEVELS) as session:
            session.store.set_pair(login.access_token, login.refresh_token)
            data = api_pb2_grpc.DataServiceStub(session.channel)
            record = await data.CreateRecord(api_pb2.CreateRecordRequest(data="x"), timeout=10)
            assert record.owner == user_id
            assert (outage.failures, recorder.count(CREATE)) == (2, 1)

        outage.down, outage.failures_left = True, 1
        no_retry = [("grpc.service_config", json.dumps({}))]
        async with AsyncAuthSession(target(proxied), LEVELS, options=no_retry) as session:
            session.store.set_pair(login.access_token, login.refresh_token)
            data = api_pb2_grpc.DataServiceStub(session.channel)
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await data.CreateRecord(api_pb2.CreateRecordRequest(data="y"), timeout=10)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            assert (outage.failures, recorder.count(CREATE)) == (3, 1)


def test_reconnect_options_carry_a_retry_policy_for_unavailable():
    options = dict(reconnect_options(max_attempts=4, max_reconnect_backoff=3))
    assert options["grpc.enable_retries"] == 1
    assert options["grpc.max_reconnect_backoff_ms"] == 3000
    (method,) = json.loads(options["grpc.service_config"])["methodConfig"]
    assert method["name"] == [{}]  # every method
    assert method["retryPolicy"]["maxAttempts"] == 4
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
