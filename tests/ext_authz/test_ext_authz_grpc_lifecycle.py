"""The ext_authz gRPC listener's life (`CheckServer`): gRPC health (Check, Watch,
NOT_SERVING once stopping, as grpc's HealthServicer answers), binding (at construction;
SO_REUSEPORT for workers) and graceful stop (GOAWAY, checks in flight answered within
the grace, the rest UNAVAILABLE, the connections closed), over real loopback sockets
with grpc clients and raw HTTP/2 frames (`tests/support/ext_authz_h2.py`).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from grpc_health.v1 import health_pb2

from authproxy.ext_authz.grpc_check import SERVICE_NAME, CheckServer
from authproxy.keys.issuer import TokenIssuer
from tests.support.ext_authz import check_request, outcome
from tests.support.ext_authz_h2 import (
    CHECK,
    Held,
    Served,
    access_check,
    frames,
    new_authorizer,
    serving,
)
from tests.support.h2client import grpc_frame
from tests.support.keys import Keys

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
async def served(tmp_path: Path, keys: Keys) -> AsyncIterator[Served]:
    async with serving(tmp_path, keys) as running:
        yield running


# --- gRPC health ---------------------------------------------------------------------------


@pytest.mark.parametrize("service", ["", SERVICE_NAME])
async def test_health_check_reports_serving_for_the_server_and_the_check_service(
    served: Served, service: str
):
    reply = await served.health().Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    assert reply.status == SERVING


async def test_health_check_of_an_unknown_service_is_not_found(served: Served):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.health().Check(health_pb2.HealthCheckRequest(service="nope.Svc"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_watch_of_an_unknown_service_says_service_unknown(served: Served):
    call = served.health().Watch(health_pb2.HealthCheckRequest(service="nope.Svc"), timeout=30)
    first = await call.read()
    assert first.status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    call.cancel()


async def test_health_watch_sees_serving_then_not_serving_when_the_server_stops(served: Served):
    call = served.health().Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=30)
    assert (await call.read()).status == SERVING
    await served.server.stop(5)
    assert (await call.read()).status == NOT_SERVING
    # Once the checks in flight (none) are done, the open Watch ends: UNAVAILABLE.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_health_check_that_completes_while_stopping_is_not_serving(served: Served):
    """A health Check whose request is still arriving when the server starts stopping is
    answered within the grace period: NOT_SERVING."""
    async with frames(served.port) as conn:
        request = health_pb2.HealthCheckRequest(service="").SerializeToString()
        stream_id = conn.open_stream("/grpc.health.v1.Health/Check")
        await conn.ping()  # the server has the stream
        stopping = asyncio.create_task(served.server.stop(30))
        await conn.read_until(lambda: conn.goaway is not None, 10)
        conn.send_body(stream_id, grpc_frame(request))
        assert await conn.answer(stream_id) == (0, "")
        reply = health_pb2.HealthCheckResponse.FromString(conn.data[stream_id][5:])
        assert reply.status == NOT_SERVING
        async with asyncio.timeout(10):  # nothing else in flight: no need for the grace
            await stopping


# --- binding ---------------------------------------------------------------------------


async def test_the_port_is_bound_when_started_and_shared_only_with_reuse_port(
    tmp_path: Path, keys: Keys
):
    authorizer = new_authorizer(tmp_path, keys)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused = CheckServer(authorizer, f"127.0.0.1:{port}")  # built: nothing bound yet
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            await refused.start()
        await refused.stop(0)
    first = CheckServer(authorizer, "127.0.0.1:0", reuse_port=True)
    try:
        await first.start()
        second = CheckServer(authorizer, f"127.0.0.1:{first.port}", reuse_port=True)
        await second.start()
        try:
            assert second.port == first.port
            for server in (first, second):
                async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
                    answer = await stub.Check(check_request("/test.Public/Echo"), timeout=10)
                    assert outcome(answer) == "ALLOW"
        finally:
            await second.stop(0)
    finally:
        await first.stop(0)


# --- stopping ------------------------------------------------------------------------------


async def test_checks_in_flight_when_stopping_are_answered_within_the_grace(
    served: Served, issuer: TokenIssuer
):
    held = Held(expected=5)
    held.install(served.authorizer)
    request = access_check(issuer)
    checks = [asyncio.create_task(served.check(request)) for _ in range(5)]
    async with asyncio.timeout(30):
        await held.all_in.wait()
    async with frames(served.port) as conn:
        stopping = asyncio.create_task(served.server.stop(60))
        await conn.read_until(lambda: conn.goaway is not None, 10)
        assert conn.goaway is not None and conn.goaway.error_code == 0
        held.release.set()
        async with asyncio.timeout(30):  # answered as soon as decided, not after the grace
            assert await asyncio.gather(*checks) == ["ALLOW"] * 5
            await stopping
    with pytest.raises(OSError):  # the listener is closed
        await asyncio.open_connection("127.0.0.1", served.port)


async def test_stopping_sends_goaway_and_checks_undecided_after_the_grace_are_unavailable(
    served: Served, issuer: TokenIssuer
):
    held = Held(expected=3)
    held.install(served.authorizer)
    message = grpc_frame(access_check(issuer).SerializeToString())
    try:
        async with frames(served.port) as conn:
            ids = [conn.request(CHECK, message) for _ in range(3)]
            async with asyncio.timeout(30):
                await held.all_in.wait()
            await served.server.stop(1.0)
            await conn.read_until(lambda: all(conn.streams[i].done for i in ids), 30)
            assert conn.goaway is not None and conn.goaway.error_code == 0
            assert conn.goaway.last_stream_id >= max(ids)
            for stream_id in ids:
                code, text = await conn.answer(stream_id)
                assert code == grpc.StatusCode.UNAVAILABLE.value[0] and "stopping" in text
            await conn.read_until(lambda: False, 30)  # then the server closes
            assert conn.closed
    finally:
        held.release.set()  # the decisions end; their answers have nowhere to go
