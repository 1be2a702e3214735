"""HTTP/2 abuse against the sidecar's listener, frame by frame (`tests/support/h2_streams.py`):
streams beyond the advertised limit, rapid reset, huge and endless header blocks, SETTINGS
and PING floods, connections that never speak HTTP/2 and HTTP/1.1 on the gRPC port.

For each: the proxy refuses what it must (the stream, or the whole connection), never
forwards the abuse to the backend, never grows without bound (the sidecar runs in this
process: its RSS is this process's), and a fresh connection gets normal service
afterwards. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PingFrame,
    SettingsFrame,
)

from authproxy.runtime.serve import ServeConfig
from tests.support.echo_backend import EchoBackend
from tests.support.h2_streams import (
    ENABLE_PUSH,
    MAX_CONCURRENT_STREAMS,
    REFUSED_STREAM,
    AbuseConnection,
    RawConnection,
    header_block_frames,
    literal_field,
    parse_frames,
    read_to_eof,
)
from tests.support.h2client import grpc_frame
from tests.support.keys import Keys
from tests.support.running_proxy import RunningProxy, start_sidecar

MiB = 1024 * 1024
OK = ("status", 0)
#: The ServeConfig field that bounds how long a connection may take to send the preface.
PREFACE_TIMEOUT_FIELD = "preface_timeout"


def rss_bytes() -> int:
    """This process's resident set size (the sidecar runs in it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
async def sidecar(tmp_path: Path, backend: EchoBackend, keys: Keys) -> AsyncIterator[RunningProxy]:
    running = await start_sidecar(tmp_path, backend.port, keys)
    yield running
    await running.stop()


async def fresh_connection_serves(port: int, backend: EchoBackend) -> None:
    """A new connection's call reaches the backend and ends OK."""
    before = len(backend.calls)
    conn = await RawConnection.open(port)
    try:
        stream_id = conn.call("/test.Public/Report")
        await conn.read_until(lambda: conn.streams[stream_id].done, 30)
        assert conn.streams[stream_id].outcome == OK, conn.streams[stream_id]
    finally:
        await conn.close()
    assert len(backend.calls) > before


def calls_to(backend: EchoBackend, method: str) -> int:
    return sum(1 for m, _ in backend.calls if m == method)


# --- streams beyond SETTINGS_MAX_CONCURRENT_STREAMS -------------------------------------------


async def test_streams_beyond_the_limit_are_refused_and_the_connection_goes_on(
    tmp_path: Path, backend: EchoBackend, keys: Keys
):
    """Limit 10, 50 streams sent at once by a client that has not yet acknowledged the
    limit (the race real clients can hit at connection start): the 40 beyond it are reset
    REFUSED_STREAM (never reaching the backend), not the connection: no GOAWAY, the 10 run
    to OK, and a new stream on the same connection works. (A client that exceeds a limit
    it has acknowledged loses the connection: tests/sidecar/test_overload.py.)"""
    running = await start_sidecar(tmp_path, backend.port, keys, max_concurrent_streams=10)
    conn = await RawConnection.open(running.sidecar.port, ack_settings=False)
    try:
        assert conn.settings.get(MAX_CONCURRENT_STREAMS) == 10
        ids = [conn.call("/test.Public/Held") for _ in range(50)]
        await conn.read_until(lambda: all(conn.streams[i].done for i in ids[10:]), 30)
        await conn.ping()
        assert [conn.streams[i].outcome for i in ids[10:]] == [("reset", REFUSED_STREAM)] * 40
        assert [conn.streams[i].outcome for i in ids[:10]] == [("open", None)] * 10
        async with asyncio.timeout(30):
            while calls_to(backend, "/test.Public/Held") < 10:
                await asyncio.sleep(0.05)

        backend.release.set()
        await conn.read_until(lambda: all(conn.streams[i].done for i in ids[:10]), 30)
        assert [conn.streams[i].outcome for i in ids[:10]] == [OK] * 10
        again = conn.call("/test.Public/Report")
        await conn.read_until(lambda: conn.streams[again].done, 30)
        assert conn.streams[again].outcome == OK
        assert conn.goaway is None and not conn.closed
        assert calls_to(backend, "/test.Public/Held") == 10
    finally:
        await conn.close()
        await running.stop()


# --- rapid reset ------------------------------------------------------------------------------

RESETS = 5000


async def test_rapid_reset_neither_reaches_the_backend_nor_stops_the_proxy(
    sidecar: RunningProxy, backend: EchoBackend
):
    """5,000 complete requests, each reset (RST_STREAM CANCEL) right after it is sent, as
    fast as the socket takes them (CVE-2023-44487). The proxy may GOAWAY the connection
    or survive it; either way fewer than 10 % of the streams reach the backend, and a fresh
    connection gets normal service."""
    port = sidecar.sidecar.port
    conn = await AbuseConnection.open(port)
    try:
        async with conn.reading():
            for _ in range(RESETS // 500):
                if not await conn.write_chunk(
                    conn.opened_and_reset("/test.Public/Report", 500), 30
                ):
                    break
        if not conn.gone:
            await conn.settle(60)
        survived = not conn.gone
        await fresh_connection_serves(port, backend)
        await fresh_connection_serves(port, backend)  # the abusive streams are behind us
        reached = sum(1 for _, md in backend.calls if ("x-abuse", "rapid-reset") in md)
        assert reached < RESETS // 10, f"{reached} reset streams reached the backend"
        if survived:  # it may go on serving this connection too
            stream_id = conn.call("/test.Public/Report")
            await conn.read_until(lambda: conn.streams[stream_id].done or conn.gone, 30)
            assert conn.gone or conn.streams[stream_id].outcome == OK
    finally:
        await conn.close()


# --- header blocks --------------------------------------------------------------------------


async def test_a_one_mib_header_list_is_refused_and_the_proxy_serves_on(
    sidecar: RunningProxy, backend: EchoBackend
):
    """A request whose header block is 1 MiB (1,100 fields of 1,000 bytes, in HEADERS plus
    CONTINUATION frames): the stream is refused (reset or an error status) or the
    connection closed, within bounded time; it never reaches the backend."""
    port = sidecar.sidecar.port
    conn = await AbuseConnection.open(port)
    try:
        fields = [(f"x-big-{i:04d}".encode(), b"a" * 1000) for i in range(1100)]
        block = conn.request_block("/test.Public/Echo", fields)
        assert len(block) > MiB
        [stream_id] = conn.register()
        frames = header_block_frames(stream_id, block)
        frames.append(DataFrame(stream_id, grpc_frame(b"{}"), flags=["END_STREAM"]).serialize())
        async with conn.reading():
            await conn.write_chunk(b"".join(frames), 30)
            async with asyncio.timeout(30):
                while not (conn.streams[stream_id].done or conn.gone):
                    await asyncio.sleep(0.05)
        assert conn.gone or conn.streams[stream_id].outcome != OK, conn.streams[stream_id]
        await fresh_connection_serves(port, backend)
        assert calls_to(backend, "/test.Public/Echo") == 0
    finally:
        await conn.close()


CONTINUATIONS = 4096  # 64 MiB of header block, if the proxy reads it all


async def test_an_endless_continuation_flood_is_cut_off_without_growing(
    sidecar: RunningProxy, backend: EchoBackend
):
    """HEADERS without END_HEADERS, then CONTINUATION frames of 16 KiB, up to 64 MiB: the
    proxy closes the connection or reads on without keeping the block (this process grows
    by less than 32 MiB), the stream never reaches the backend (ended at last, it is
    refused), and a fresh connection works."""
    port = sidecar.sidecar.port
    conn = await AbuseConnection.open(port)
    try:
        [stream_id] = conn.register()
        block = conn.request_block("/test.Public/Echo")
        opening = HeadersFrame(stream_id, block, flags=["END_STREAM"])  # no body: headers end it
        piece = ContinuationFrame(stream_id, literal_field(conn.encoder, b"x-flood", 16_000))
        chunk = piece.serialize() * 64  # 1 MiB
        baseline = peak = rss_bytes()
        async with conn.reading():
            written = await conn.write_chunk(opening.serialize(), 30)
            for _ in range(CONTINUATIONS // 64):
                if not written or conn.gone:
                    break
                written = await conn.write_chunk(chunk, 10)
                peak = max(peak, rss_bytes())
            if not conn.gone and written:
                end = ContinuationFrame(stream_id, b"", flags=["END_HEADERS"])
                await conn.write_chunk(end.serialize(), 30)
            async with asyncio.timeout(30):
                while not (conn.streams[stream_id].done or conn.gone):
                    await asyncio.sleep(0.05)
        peak = max(peak, rss_bytes())
        assert conn.gone or conn.streams[stream_id].outcome != OK, conn.streams[stream_id]
        growth = peak - baseline
        assert growth < 32 * MiB, f"grew by {growth / MiB:.1f} MiB during the flood"
        await fresh_connection_serves(port, backend)
        assert calls_to(backend, "/test.Public/Echo") == 0
    finally:
        await conn.close()


# --- control frame floods -----------------------------------------------------------------

FLOOD_FRAMES = 2_000_000
BATCH = 10_000


@pytest.mark.parametrize("kind", ["ping", "settings"])
async def test_a_flood_of_frames_that_need_an_ack_is_bounded(
    sidecar: RunningProxy, backend: EchoBackend, kind: str
):
    """Two million PINGs (or SETTINGS), each asking for an ACK, written without reading a
    single ACK: the proxy stops reading, closes the connection or keeps up, but never
    queues the ACKs without bound (this process grows by less than 24 MiB while 34 MB of
    ACKs are owed); the connection then either is closed or still serves a call, and a
    fresh connection works."""
    port = sidecar.sidecar.port
    conn = await AbuseConnection.open(port)
    if kind == "ping":
        frame = PingFrame(0, b"flood\x00\x00\x00").serialize()
    else:
        frame = SettingsFrame(0, settings={ENABLE_PUSH: 0}).serialize()
    chunk = frame * BATCH
    try:
        baseline = peak = rss_bytes()
        for _ in range(FLOOD_FRAMES // BATCH):
            written = await conn.write_chunk(chunk, 10)
            peak = max(peak, rss_bytes())
            if not written:
                break  # closed, or it stopped reading: either bounds it
        peak = max(peak, rss_bytes())
        growth = peak - baseline
        assert growth < 24 * MiB, f"grew by {growth / MiB:.1f} MiB during the flood"

        await conn.settle(120)  # reads what it owes us, or sees it close
        if not conn.gone:
            stream_id = conn.call("/test.Public/Report")
            await conn.read_until(lambda: conn.streams[stream_id].done or conn.gone, 60)
            assert conn.gone or conn.streams[stream_id].outcome == OK, conn.streams[stream_id]
        await fresh_connection_serves(port, backend)
    finally:
        await conn.close()


# --- not HTTP/2 at all ----------------------------------------------------------------------


@pytest.mark.parametrize("sent", [b"", b"PRI * HTTP/2.0\r\n"], ids=["silent", "half-a-preface"])
async def test_a_connection_that_never_sends_the_preface_is_closed(
    tmp_path: Path, backend: EchoBackend, keys: Keys, sent: bytes
):
    """A TCP connection that sends nothing (or half the preface) and waits: the proxy
    closes it once its preface timeout (2 s here) has passed, well within 30 s."""
    field_names = {f.name for f in dataclasses.fields(ServeConfig)}
    assert PREFACE_TIMEOUT_FIELD in field_names, "ServeConfig has no preface timeout"
    running = await start_sidecar(tmp_path, backend.port, keys, **{PREFACE_TIMEOUT_FIELD: 2.0})
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", running.sidecar.port)
        try:
            writer.write(sent)
            await read_to_eof(reader, 30)
        finally:
            writer.close()
        await fresh_connection_serves(running.sidecar.port, backend)
    finally:
        await running.stop()


HTTP1 = {
    "get": b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n",
    "post": (
        b"POST /test.Public/Report HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/grpc\r\nContent-Length: 7\r\n\r\n\x00\x00\x00\x00\x02{}"
    ),
}


@pytest.mark.parametrize("request_name", sorted(HTTP1))
async def test_an_http1_request_gets_a_clean_error_or_a_close(
    tmp_path: Path, backend: EchoBackend, keys: Keys, request_name: str
):
    """HTTP/1.1 on the gRPC port: the proxy answers with an HTTP/1.x 4xx/5xx or with
    well-formed HTTP/2 frames (a GOAWAY), or nothing, and closes the connection; the
    request never reaches the backend."""
    running = await start_sidecar(tmp_path, backend.port, keys, **{PREFACE_TIMEOUT_FIELD: 2.0})
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", running.sidecar.port)
        try:
            writer.write(HTTP1[request_name])
            answer = await read_to_eof(reader, 30)
        finally:
            writer.close()
        if answer.startswith(b"HTTP/1."):
            status = int(answer.split(b" ", 2)[1])
            assert 400 <= status < 600, answer[:200]
        else:
            frames = parse_frames(answer)
            assert all(not isinstance(f, (HeadersFrame, DataFrame)) for f in frames), frames
        assert backend.calls == []
        await fresh_connection_serves(running.sidecar.port, backend)
    finally:
        await running.stop()
