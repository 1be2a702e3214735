"""Load and shutdown: every call through the sidecar gets a decision, a response, or a
status a gRPC client can act on (UNAVAILABLE, RESOURCE_EXHAUSTED, or a REFUSED_STREAM
reset, which gRPC clients retry by themselves), never a CANCELLED the client did not ask
for. Real sockets, real servers; the raw HTTP/2 client is `tests/support/h2_streams.py`."""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter
from pathlib import Path

import grpc
import pytest

from authproxy.cli.main import build_parser
from authproxy.cli.serve import serve_config
from authproxy.keys.issuer import TokenIssuer
from tests.support.echo_backend import EchoBackend
from tests.support.h2_streams import (
    MAX_CONCURRENT_STREAMS,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    RawConnection,
)
from tests.support.keys import Keys
from tests.support.operations import serve_process
from tests.support.policies import TEST_POLICY
from tests.support.running_proxy import RunningProxy, start_sidecar
from tests.support.tokens import bearer, bearer_value, minted

OK, CANCELLED, UNAVAILABLE = 0, 1, 14
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}


async def test_a_burst_of_concurrent_calls_ends_ok_or_retryable_never_cancelled(
    tmp_path: Path, backend: EchoBackend, keys: Keys, issuer: TokenIssuer
):
    """3,000 calls at once over 20 connections: 2,000 streams open together (100 each,
    the default limit; the clients queue the rest), more than grpc core's server queue
    keeps (it cancelled a random share of the calls above 1,000 waiting for the
    application, and every one above 3,000)."""
    running = await start_sidecar(tmp_path, backend.port, keys)
    token = issuer.mint("access", "alice", ttl=300).token
    md = bearer(token)
    target = f"127.0.0.1:{running.sidecar.port}"
    # One connection per channel (a shared subchannel pool would put all on one).
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(20)
    ]
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), 10)

        async def call(n: int) -> grpc.StatusCode:
            method = channels[n % len(channels)].unary_unary("/test.Access/Echo")
            try:
                assert await method(b"burst", metadata=md, timeout=120) == b"burst"
            except grpc.aio.AioRpcError as e:
                return e.code()
            return grpc.StatusCode.OK

        codes = Counter(await asyncio.gather(*(call(n) for n in range(3000))))
    finally:
        for channel in channels:
            await channel.close()
        await running.stop()
    assert codes[grpc.StatusCode.CANCELLED] == 0, codes
    assert codes[grpc.StatusCode.OK] > 0 and set(codes) <= {grpc.StatusCode.OK, *RETRYABLE}, codes


async def test_the_listener_advertises_its_stream_limit_and_refuses_streams_beyond_it(
    tmp_path: Path, backend: EchoBackend, keys: Keys
):
    """A client that opens streams before it has taken in the limit (its first round
    trip) gets the excess refused with REFUSED_STREAM, which gRPC clients retry
    transparently; one that exceeds a limit it has acknowledged breaks the protocol and
    loses the connection (GOAWAY PROTOCOL_ERROR, libnghttp2's rule), nobody else's."""
    running = await start_sidecar(tmp_path, backend.port, keys, max_concurrent_streams=5)
    conn = await RawConnection.open(running.sidecar.port, ack_settings=False)
    rude = await RawConnection.open(running.sidecar.port)
    try:
        assert conn.settings.get(MAX_CONCURRENT_STREAMS) == 5
        # Eight calls that stay open (a public method that never answers): the sixth,
        # seventh and eighth streams are refused.
        ids = [conn.call("/test.Public/Hang") for _ in range(8)]
        await conn.read_until(lambda: all(conn.streams[i].done for i in ids[5:]), 10)
        await conn.ping()
        assert [conn.streams[i].outcome for i in ids[5:]] == [("reset", REFUSED_STREAM)] * 3
        assert [conn.streams[i].outcome for i in ids[:5]] == [("open", None)] * 5
        # Having acknowledged the limit, a client that exceeds it is cut off.
        for _ in range(6):
            rude.call("/test.Public/Hang")
        await rude.read_until(lambda: rude.goaway is not None, 10)
        assert rude.goaway is not None and rude.goaway.error_code == PROTOCOL_ERROR
        assert not conn.closed
        await conn.ping()  # the well-behaved connection is still served
    finally:
        await conn.close()
        await rude.close()
        await running.stop()


async def test_the_default_stream_limit_is_100(tmp_path: Path, backend: EchoBackend, keys: Keys):
    running = await start_sidecar(tmp_path, backend.port, keys)
    conn = await RawConnection.open(running.sidecar.port)
    try:
        assert conn.settings.get(MAX_CONCURRENT_STREAMS) == 100
    finally:
        await conn.close()
        await running.stop()


def test_the_stream_limit_flag_and_its_environment_variable(monkeypatch):
    def limit(*argv: str) -> int:
        args = build_parser().parse_args(["serve", "--upstream", "127.0.0.1:1", *argv])
        return serve_config(args).max_concurrent_streams

    assert limit() == 100
    assert limit("--max-concurrent-streams", "7") == 7
    monkeypatch.setenv("AUTHPROXY_MAX_CONCURRENT_STREAMS", "9")
    assert limit() == 9
    with pytest.raises(SystemExit):  # a bound is the point: 0 is refused
        limit("--max-concurrent-streams", "0")


async def test_a_call_the_backend_side_cancels_reaches_the_client_as_unavailable(
    proxy: RunningProxy, issuer: TokenIssuer
):
    """The client did not cancel: the backend (or its grpc core, under load or stopping)
    did. The client gets a status it retries, naming the upstream."""
    token = issuer.mint("access", "alice", ttl=300).token
    request = json.dumps({"code": "CANCELLED", "message": "dropped by the backend"}).encode()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await proxy.unary("/test.Access/Fail", request, token=token)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    details = caught.value.details()
    assert "cancelled the call" in details and "dropped by the backend" in details


async def test_calls_racing_sigterm_are_answered_never_cancelled(
    tmp_path: Path, keys: Keys, issuer: TokenIssuer, backend: EchoBackend
):
    """A serve process gets 500 calls on one connection (all 500 reach it: the PING
    round trip says so), then SIGTERM at once. The connection gets GOAWAY (NO_ERROR);
    every call it had received is still answered — OK, or UNAVAILABLE if the stop got
    there first — and none is CANCELLED or left without an answer."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(TEST_POLICY)
    flags = ("--shutdown-grace", "30", "--max-concurrent-streams", "500")
    async with serve_process(keys, policy, backend, *flags) as served:
        port = await served.port_of("authproxy listening on port")
        conn = await RawConnection.open(port)
        try:
            assert conn.settings.get(MAX_CONCURRENT_STREAMS) == 500  # the flag reaches it
            ids = [
                conn.call(
                    "/test.Access/Echo", [(b"authorization", bearer_value(minted(issuer)).encode())]
                )
                for _ in range(500)
            ]
            await conn.ping()
            served.signal(signal.SIGTERM)
            await conn.read_until(lambda: all(conn.streams[i].done for i in ids), 60)
            outcomes = Counter(conn.streams[i].outcome for i in ids)
            await conn.read_until(lambda: conn.goaway is not None, 30)
        finally:
            await conn.close()
        assert await asyncio.wait_for(served.proc.wait(), 30) == 0
    assert conn.goaway is not None and conn.goaway.error_code == 0
    assert ("status", CANCELLED) not in outcomes, outcomes
    assert set(outcomes) <= {("status", OK), ("status", UNAVAILABLE)}, outcomes
