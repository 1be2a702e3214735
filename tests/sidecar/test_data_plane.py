"""The sidecar's data plane, black box: what a gRPC client and a gRPC backend see of the
relay between them, over real loopback sockets, whatever relays inside (grpc.aio or the
HTTP/2 frame relay).

Flow control end to end (a slow reader holds the backend back; the proxy buffers little),
big messages and the message size limit in both directions, many streams on one
connection, bursts, cancellation and deadlines both ways, a backend that stops gracefully
and comes back, and metadata (text, `-bin`, trailers, status details, compression)
byte for byte. Every wait is bounded; no sleep proves anything.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from authproxy.keys.issuer import TokenIssuer
from tests.support.echo_backend import EchoBackend, big_message, start_echo_backend
from tests.support.h2client import grpc_request_headers, h2_call
from tests.support.keys import Keys
from tests.support.operations import serve_process
from tests.support.policies import TEST_POLICY, descriptor_set
from tests.support.resetting_backend import ResettingBackend
from tests.support.running_proxy import RunningProxy, start_sidecar
from tests.support.tokens import bearer, minted

MiB = 1024 * 1024
BIG_CHANNEL = [
    ("grpc.max_receive_message_length", 64 * MiB),
    ("grpc.max_send_message_length", 64 * MiB),
]


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process (VmRSS in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


@pytest.fixture
async def sidecar(tmp_path: Path, backend: EchoBackend, keys: Keys) -> AsyncIterator[RunningProxy]:
    """One sidecar in front of the echo backend (for methods the test protoset does not
    name, which both of the `proxy` fixture's variants would relay alike)."""
    running = await start_sidecar(tmp_path, backend.port, keys)
    yield running
    await running.stop()


# --- flow control: a slow reader ------------------------------------------------------------

BIG_SIZE = 128 * 1024
BIG_COUNT = 400  # 50 MiB in all


async def _until_backend_stalls(backend: EchoBackend, pid: int, within: float) -> int:
    """Wait until the backend's BigStream stops making progress (no write completes for
    3 s) or finishes; the proxy process's highest RSS seen meanwhile."""
    peak, last, still = rss_bytes(pid), -1, 0
    async with asyncio.timeout(within):
        while still < 30 and not backend.big_done.is_set():
            await asyncio.sleep(0.1)
            peak = max(peak, rss_bytes(pid))
            still = still + 1 if backend.big_sent == last else 0
            last = backend.big_sent
    return max(peak, rss_bytes(pid))


async def test_a_slow_reader_holds_the_backend_back_and_the_proxy_buffers_little(
    tmp_path: Path, keys: Keys, backend: EchoBackend
):
    """A server stream of 50 MiB whose client reads one message and then nothing: flow
    control holds the backend back (it cannot finish sending), and the proxy, a process of
    its own here, grows by far less than the stream (< 20 MiB). Once the client reads,
    every message arrives, in order, byte for byte."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(TEST_POLICY)
    async with serve_process(keys, policy, backend) as served:
        port = await served.port_of("authproxy listening on port")
        pid = served.proc.pid
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=BIG_CHANNEL) as channel:
            big_stream = channel.unary_stream("/test.Public/BigStream")
            # A small stream first: what the first stream costs the proxy is in the baseline.
            warm = big_stream(json.dumps({"messages": 8, "size": BIG_SIZE}).encode(), timeout=60)
            assert [m async for m in warm] == [big_message(i, BIG_SIZE) for i in range(8)]
            backend.big_done.clear()
            backend.big_sent = 0

            request = json.dumps({"messages": BIG_COUNT, "size": BIG_SIZE}).encode()
            call = big_stream(request, timeout=300)
            assert await call.read() == big_message(0, BIG_SIZE)
            baseline = rss_bytes(pid)
            peak = await _until_backend_stalls(backend, pid, within=120)
            sent = backend.big_sent

            assert not backend.big_done.is_set(), "the backend sent everything to a paused client"
            assert sent < BIG_COUNT * BIG_SIZE // 2, f"{sent} bytes left the backend"
            growth = peak - baseline
            assert growth < 20 * MiB, f"the proxy grew by {growth / MiB:.1f} MiB"

            for i in range(1, BIG_COUNT):
                message = await call.read()
                assert message == big_message(i, BIG_SIZE), f"message {i} differs"
            assert await call.read() == grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK
            assert backend.big_done.is_set()


# --- big messages and the size limit ------------------------------------------------------


async def test_ten_mib_messages_both_ways(proxy: RunningProxy, issuer: TokenIssuer):
    """A 10 MiB request and its 10 MiB echo (unary), then three 10 MiB messages each way
    on one bidi stream, each echoed before the next is sent."""
    payload = bytes(range(256)) * (10 * MiB // 256)
    response, _ = await proxy.unary(
        "/test.Access/Echo", payload, token=None, metadata=bearer(minted(issuer))
    )
    assert response == payload

    chat = proxy.channel.stream_stream("/test.Access/Chat")(
        metadata=bearer(minted(issuer)), timeout=60
    )
    for n in range(3):
        message = bytes([n]) * 7 + payload[7:]
        await chat.write(message)
        assert await chat.read() == b"echo:" + message
    await chat.done_writing()
    assert await chat.read() == grpc.aio.EOF
    assert await chat.code() == grpc.StatusCode.OK


LIMIT = 1 * MiB


@pytest.fixture(params=["unary-path", "stream-path"])
async def limited(
    request, tmp_path: Path, backend: EchoBackend, keys: Keys
) -> AsyncIterator[RunningProxy]:
    """A sidecar whose `max_message_bytes` is LIMIT (the backend and client allow 64 MiB)."""
    sets = (
        [str(descriptor_set(tmp_path / "echo.protoset"))] if request.param == "unary-path" else []
    )
    running = await start_sidecar(
        tmp_path, backend.port, keys, max_message_bytes=LIMIT, descriptor_sets=sets
    )
    yield running
    await running.stop()


async def _code_of(awaitable) -> grpc.StatusCode:
    try:
        await awaitable
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def test_a_request_over_the_message_limit_is_resource_exhausted(limited: RunningProxy):
    """Unary and on a stream: a request message of exactly `max_message_bytes` passes, one
    byte more ends the call RESOURCE_EXHAUSTED; the proxy serves on afterwards."""
    echo = limited.channel.unary_unary("/test.Public/Echo")
    assert await echo(b"q" * LIMIT, timeout=30) == b"q" * LIMIT
    assert await _code_of(echo(b"q" * (LIMIT + 1), timeout=30)) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )

    chat = limited.channel.stream_stream("/test.Public/Chat")(timeout=30)
    await chat.write(b"small")
    assert await chat.read() == b"echo:small"
    await chat.write(b"q" * (LIMIT + 1))
    assert await _code_of(chat.read()) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await chat.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    assert await echo(b"after", timeout=30) == b"after"


async def test_a_response_over_the_message_limit_is_resource_exhausted(limited: RunningProxy):
    """The backend answers a small request with a message of exactly `max_message_bytes`
    (passes) or one byte more (the client gets RESOURCE_EXHAUSTED, not the message); on a
    server stream, the messages before the big one arrive first."""
    sized = limited.channel.unary_unary("/test.Public/Sized")
    assert await sized(json.dumps({"size": LIMIT}).encode(), timeout=30) == big_message(0, LIMIT)
    too_big = sized(json.dumps({"size": LIMIT + 1}).encode(), timeout=30)
    assert await _code_of(too_big) == grpc.StatusCode.RESOURCE_EXHAUSTED

    # BigStream: message i is big_message(i, size); the size applies to every message.
    stream = limited.channel.unary_stream("/test.Public/BigStream")
    call = stream(json.dumps({"messages": 3, "size": LIMIT + 1}).encode(), timeout=30)
    assert await _code_of(call.read()) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    ok = stream(json.dumps({"messages": 3, "size": LIMIT}).encode(), timeout=30)
    assert [m async for m in ok] == [big_message(i, LIMIT) for i in range(3)]


# --- many streams ---------------------------------------------------------------------------


async def test_a_thousand_concurrent_streams_on_one_connection(
    tmp_path: Path, backend: EchoBackend, keys: Keys, issuer: TokenIssuer
):
    """One grpc.aio channel (one HTTP/2 connection), `max_concurrent_streams` 1000: 1,000
    calls (public and with a token, alternately) are open at once, on the client's
    connection and in the backend (which sets no stream limit): each Barrier call answers
    only once all 1,000 are there, so a relay that holds some back never finishes them.
    All end OK."""
    running = await start_sidecar(tmp_path, backend.port, keys, max_concurrent_streams=1000)
    md = bearer(minted(issuer))
    request = json.dumps({"n": 1000}).encode()
    try:
        public = running.channel.unary_unary("/test.Public/Barrier")
        access = running.channel.unary_unary("/test.Access/Barrier")

        async def call(n: int) -> bytes | grpc.StatusCode:
            try:
                if n % 2:
                    return await access(request, metadata=md, timeout=60)
                return await public(request, timeout=60)
            except grpc.aio.AioRpcError as e:
                return e.code()

        results = Counter(await asyncio.gather(*(call(n) for n in range(1000))))
    finally:
        await running.stop()
    arrived = backend.barrier_arrived
    assert results == {b"ok": 1000}, f"{results}; {arrived} calls reached the backend"
    assert arrived == 1000


async def test_a_burst_of_two_thousand_mixed_calls_each_gets_its_own_answer(
    tmp_path: Path, backend: EchoBackend, keys: Keys, issuer: TokenIssuer
):
    """2,000 unary calls at once over 8 connections (800 streams open at once, the clients
    queue the rest): public echoes, echoes and reports with tokens of three subjects, and
    calls without the token they need, mixed. Each ends exactly as it should: its own
    payload back, the report of its own subject and size, or UNAUTHENTICATED. None is
    CANCELLED, none is dropped, no answer goes to another call."""
    running = await start_sidecar(tmp_path, backend.port, keys)
    subjects = ("alice", "bob", "carol")
    tokens = {s: bearer(minted(issuer, s)) for s in subjects}
    target = f"127.0.0.1:{running.sidecar.port}"
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(8)
    ]

    async def call(n: int) -> str:
        channel = channels[n % len(channels)]
        payload = f"burst-{n}-".encode() * (1 + n % 7)
        subject = subjects[n % 3]
        try:
            match n % 4:
                case 0:
                    got = await channel.unary_unary("/test.Public/Echo")(payload, timeout=120)
                    return "ok" if got == payload else f"wrong echo for {n}"
                case 1:
                    method = channel.unary_unary("/test.Access/Echo")
                    got = await method(payload, metadata=tokens[subject], timeout=120)
                    return "ok" if got == payload else f"wrong echo for {n}"
                case 2:
                    method = channel.unary_unary("/test.Access/Report")
                    report = json.loads(
                        await method(payload, metadata=tokens[subject], timeout=120)
                    )
                    seen = dict((k, v) for k, v in report["metadata"] if k == "x-auth-subject")
                    right = report["size"] == len(payload) and seen == {"x-auth-subject": subject}
                    return "ok" if right else f"wrong report for {n}: {report}"
                case _:
                    await channel.unary_unary("/test.Access/Echo")(payload, timeout=120)
                    return f"call {n} without a token passed"
        except grpc.aio.AioRpcError as e:
            if n % 4 == 3 and e.code() == grpc.StatusCode.UNAUTHENTICATED:
                return "ok"
            return e.code().name

    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), 10)
        outcomes = Counter(await asyncio.gather(*(call(n) for n in range(2000))))
    finally:
        for channel in channels:
            await channel.close()
        await running.stop()
    assert outcomes == {"ok": 2000}, outcomes


# --- cancellation -----------------------------------------------------------------------------


async def test_a_client_cancelling_a_stream_cancels_the_backend_stream(
    sidecar: RunningProxy, backend: EchoBackend, issuer: TokenIssuer
):
    """A bidi stream that has relayed a message and then waits: the client cancels, and
    the backend's handler is cancelled."""
    call = sidecar.channel.stream_stream("/test.Access/HangStream")(
        metadata=bearer(minted(issuer)), timeout=60
    )
    assert await call.read() == b"first"
    await asyncio.wait_for(backend.stream_started.wait(), 10)
    assert not backend.stream_cancelled.is_set()
    call.cancel()
    await asyncio.wait_for(backend.stream_cancelled.wait(), 10)


async def test_a_backend_abort_mid_stream_reaches_the_client_after_its_messages(
    proxy: RunningProxy, issuer: TokenIssuer
):
    """The backend sends three messages, then ends the stream DATA_LOSS with a message and
    trailers (text and -bin): the client gets the three messages, then exactly that."""
    request = json.dumps({"messages": 3, "code": "DATA_LOSS", "message": "disk gone"}).encode()
    call = proxy.channel.unary_stream("/test.Access/AbortStream")(
        request, metadata=bearer(minted(issuer)), timeout=30
    )
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for message in call:
            received.append(message)
    assert received == [b"0", b"1", b"2"]
    assert caught.value.code() == grpc.StatusCode.DATA_LOSS
    assert caught.value.details() == "disk gone"
    trailers = tuple(caught.value.trailing_metadata())
    assert ("x-abort-trailer", "t") in trailers
    assert ("x-abort-bin", b"\x00\x01\xff") in trailers


async def test_a_backend_resetting_a_stream_ends_the_client_call_unavailable(
    tmp_path: Path, keys: Keys
):
    """A backend that resets its streams with RST_STREAM CANCEL after one message (no
    status): the client did not cancel, so its call ends UNAVAILABLE (which it may retry),
    at once, never hanging and never OK; the proxy serves on."""
    raw = await ResettingBackend().start()
    running = await start_sidecar(tmp_path, raw.port, keys)
    try:
        for _ in range(2):  # twice: the proxy's backend connection survives a reset
            call = running.channel.unary_stream("/test.Public/Anything")(b"{}", timeout=30)
            received = []
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for message in call:
                    received.append(message)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value
            assert received in ([], [b"first"])
        assert raw.requests == 2
    finally:
        await running.stop()
        await raw.stop()


# --- deadlines ----------------------------------------------------------------------------


async def test_the_deadline_reaches_the_backend_and_never_grows(proxy: RunningProxy):
    """A request with `grpc-timeout: 10S` (exactly; the raw client does not round): the
    backend's call has a deadline, at most 10 s away and not much less."""
    port = proxy.sidecar.port
    headers = [*grpc_request_headers(port, "/test.Public/Report"), (b"grpc-timeout", b"10S")]
    response = await h2_call(port, headers, timeout=20)
    assert response.grpc_status == 0, response
    remaining = json.loads(response.data[5:])["time_remaining"]
    assert remaining is not None and 5.0 < remaining <= 10.0, remaining


async def test_an_expired_deadline_ends_the_call_and_cancels_the_backend_call(
    proxy: RunningProxy, backend: EchoBackend, issuer: TokenIssuer
):
    """A call the backend never answers, with a 1 s deadline: the client gets
    DEADLINE_EXCEEDED and the backend's handler is cancelled."""
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await proxy.unary("/test.Access/Hang", metadata=bearer(minted(issuer)), timeout=1.0)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 15
    await asyncio.wait_for(backend.cancelled.wait(), 10)


async def test_an_expired_deadline_on_a_stream_cancels_the_backend_stream(
    sidecar: RunningProxy, backend: EchoBackend, issuer: TokenIssuer
):
    call = sidecar.channel.stream_stream("/test.Access/HangStream")(
        metadata=bearer(minted(issuer)), timeout=2.0
    )
    assert await call.read() == b"first"
    assert await call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.wait_for(backend.stream_cancelled.wait(), 10)


async def test_a_deadline_the_client_does_not_enforce_is_enforced_behind_it(
    proxy: RunningProxy, backend: EchoBackend
):
    """A raw client sends `grpc-timeout: 1S` and then just waits: the call still ends with
    grpc-status DEADLINE_EXCEEDED (4), and the backend's handler is cancelled."""
    port = proxy.sidecar.port
    headers = [*grpc_request_headers(port, "/test.Public/Hang"), (b"grpc-timeout", b"1S")]
    response = await h2_call(port, headers, timeout=20)
    assert response.grpc_status == 4, response
    await asyncio.wait_for(backend.cancelled.wait(), 10)


# --- the backend goes away and comes back ---------------------------------------------------


async def test_a_backend_stopping_gracefully_lets_the_open_stream_finish_then_a_new_one_serves(
    tmp_path: Path, keys: Keys, issuer: TokenIssuer
):
    """The backend stops with a 30 s grace (GOAWAY: no new calls) while a bidi stream is
    open: the stream goes on, exchanges messages and ends OK with its trailers, and the
    backend's stop completes as soon as it has (well within the grace). A new backend on
    the same port then gets the proxy's calls again, without anything restarting the
    proxy (calls may fail UNAVAILABLE while it reconnects)."""
    first = await start_echo_backend()
    port = first.port
    running = await start_sidecar(tmp_path, port, keys)
    second: EchoBackend | None = None
    md = bearer(minted(issuer))
    try:
        chat = running.channel.stream_stream("/test.Access/Chat")(metadata=md, timeout=120)
        await chat.write(b"before")
        assert await chat.read() == b"echo:before"

        stopping = asyncio.create_task(first.server.stop(30))
        # The backend takes no new calls now: wait until one through the proxy fails.
        async with asyncio.timeout(30):
            while True:
                code = await _code_of(running.unary("/test.Public/Report", timeout=5))
                if code != grpc.StatusCode.OK:
                    break
                await asyncio.sleep(0.05)

        await chat.write(b"during")
        assert await chat.read() == b"echo:during"
        assert not stopping.done()  # the backend waits for the open stream
        await chat.done_writing()
        assert await chat.read() == grpc.aio.EOF
        assert await chat.code() == grpc.StatusCode.OK
        assert ("x-chat-end", "done") in tuple(await chat.trailing_metadata())
        await asyncio.wait_for(stopping, 20)  # ended by the stream, not by the grace

        second = await start_echo_backend(port)
        report = None
        async with asyncio.timeout(30):
            while report is None:
                try:
                    report = await running.report("/test.Access/Report", metadata=md)
                except grpc.aio.AioRpcError as e:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                    await asyncio.sleep(0.1)
        assert report["md"]["x-auth-subject"] == ["alice"]
        assert [m for m, _ in second.calls][-1] == "/test.Access/Report"
    finally:
        await running.stop()
        await first.server.stop(None)
        if second is not None:
            await second.server.stop(None)


# --- metadata, status details, compression --------------------------------------------------

PRINTABLE = "".join(chr(c) for c in range(0x21, 0x7F))
ALL_BYTES = bytes(range(256))
REQUEST_METADATA: tuple[tuple[str, str | bytes], ...] = (
    ("x-m-printable", f"a {PRINTABLE} z"),
    ("x-m-long", "L" * 4000),  # all of it stays below grpc core's 8 KiB soft limit
    ("x-m-multi", "one"),
    ("x-m-multi", "two"),
    ("x-m-multi", "three"),
    ("x-m-every-byte-bin", ALL_BYTES),
    ("x-m-padding-bin", b"\xff"),  # base64 with padding
    ("x-m-zero-bin", b"\x00\x00\x00\x00"),
    ("x-m-multi-bin", b"\x01"),
    ("x-m-multi-bin", b"\xfe\xff"),
)


def _as_report(pairs) -> list[list[str]]:
    return [[k, v if isinstance(v, str) else "bin:" + v.hex()] for k, v in pairs]


async def test_request_metadata_reaches_the_backend_byte_exact(
    proxy: RunningProxy, issuer: TokenIssuer
):
    """Text values (every printable character, 4,000 characters, repeated keys in order)
    and -bin values (every byte value, padding, zeros, repeated) reach the backend exactly
    as sent, in order."""
    report = await proxy.report(
        "/test.Access/Report", metadata=(*bearer(minted(issuer)), *REQUEST_METADATA)
    )
    seen = [pair for pair in report["metadata"] if pair[0].startswith("x-m-")]
    assert seen == _as_report(REQUEST_METADATA)


async def test_response_headers_and_trailers_reach_the_client_byte_exact(
    sidecar: RunningProxy, issuer: TokenIssuer
):
    """The backend sends the same pairs back as response headers and as trailers: the
    client reads them exactly, in order, text and -bin."""
    response, call = await sidecar.unary(
        "/test.Access/Mirror", b"mirror", metadata=(*bearer(minted(issuer)), *REQUEST_METADATA)
    )
    assert response == b"mirror"
    headers = [(k, v) for k, v in await call.initial_metadata() if k.startswith("x-m-")]
    trailers = [(k, v) for k, v in await call.trailing_metadata() if k.startswith("x-m-")]
    assert headers == list(REQUEST_METADATA)
    assert trailers == list(REQUEST_METADATA)


@pytest.mark.parametrize(
    "message", ["no such record", "100% unicode: grüße, ☃, 雪\nsecond line\t%41"]
)
async def test_status_message_and_details_from_the_backend_survive_byte_exact(
    proxy: RunningProxy, issuer: TokenIssuer, message: str
):
    """A backend's error: the client gets its code, its message (percent-encoded on the
    wire: non-ASCII, `%` and control characters come back as they were), the
    `grpc-status-details-bin` bytes exactly, and its header and trailers."""
    request = json.dumps({"code": "FAILED_PRECONDITION", "message": message}).encode()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await proxy.unary("/test.Access/Fail", request, metadata=bearer(minted(issuer)))
    error = caught.value
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == message
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason="BACKEND_REASON", domain="backend.test"))
    expected = status_pb2.Status(
        code=grpc.StatusCode.FAILED_PRECONDITION.value[0], message=message, details=[detail]
    ).SerializeToString()
    details_bin = [v for k, v in error.trailing_metadata() if k == "grpc-status-details-bin"]
    assert details_bin == [expected]
    assert ("x-fail-bin", b"\x01\x02") in tuple(error.trailing_metadata())
    assert ("x-fail-trailer", "t") in tuple(error.trailing_metadata())
    assert ("x-fail-header", "h") in tuple(error.initial_metadata())


async def test_gzip_responses_and_gzip_requests_of_every_kind(
    proxy: RunningProxy, issuer: TokenIssuer
):
    """The backend compresses its response (gzip); the client compresses its requests
    (unary, client streaming, bidi); both sides get the exact bytes."""
    md = bearer(minted(issuer))
    payload = b"compress me, " * 100_000  # 1.3 MB, compresses well
    response, _ = await proxy.unary("/test.Access/Compressed", payload, metadata=md)
    assert response == payload

    gzip = grpc.Compression.Gzip
    response, _ = await proxy.unary("/test.Access/Echo", payload, metadata=md, compression=gzip)
    assert response == payload

    async def messages():
        for n in range(10):
            yield bytes([n]) * 100_000

    summed = proxy.channel.stream_unary("/test.Access/Sum")(
        messages(), metadata=md, timeout=30, compression=gzip
    )
    assert json.loads(await summed) == {"messages": 10, "bytes": 1_000_000}

    chat = proxy.channel.stream_stream("/test.Access/Chat")(
        metadata=md, timeout=30, compression=gzip
    )
    for n in range(3):
        await chat.write(payload[n:])
        assert await chat.read() == b"echo:" + payload[n:]
    await chat.done_writing()
    assert await chat.code() == grpc.StatusCode.OK


# --- an independent client ------------------------------------------------------------------

GRPC_JS = Path(__file__).parents[1] / "data" / "grpc-js"


async def test_an_independent_grpc_js_client_gets_faithful_service(
    sidecar: RunningProxy, backend: EchoBackend, issuer: TokenIssuer
):
    """grpc-js (Node), not grpc core: a 3 MiB unary echo with the backend's headers and
    trailers (-bin too), request metadata byte for byte, a server stream, a bidi stream,
    a deny, a backend error with its message and trailers, and an expired deadline.
    Needs `npm ci` in tests/data/grpc-js (package-lock.json pins every package)."""
    node = shutil.which("node")
    assert node is not None, "node (Node.js 18 or newer) is needed"
    assert (GRPC_JS / "node_modules" / "@grpc" / "grpc-js").is_dir(), f"run `npm ci` in {GRPC_JS}"
    token = issuer.mint("access", "alice", ttl=300).token
    proc = await asyncio.create_subprocess_exec(
        node, str(GRPC_JS / "client.js"), str(sidecar.sidecar.port), token,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    seen = json.loads(out)

    assert seen["echo"]["code"] == 0 and seen["echo"]["same"], seen["echo"]
    assert ["x-backend-header", "hello"] in seen["echo"]["headers"]
    assert ["x-backend-trailer", "bye"] in seen["echo"]["trailers"]
    assert ["x-trailer-bin", "hex:00ff"] in seen["echo"]["trailers"]

    assert seen["report"]["code"] == 0
    pairs = seen["report"]["body"]["metadata"]
    assert ["x-m-text", "a b c"] in pairs and ["x-m-data-bin", "bin:0001feff"] in pairs
    assert ["x-auth-subject", "alice"] in pairs
    assert not [k for k, _ in pairs if k == "authorization"]

    assert seen["count"] == {"code": 0, "messages": [str(i) for i in range(20)]}
    assert seen["chat"] == {"code": 0, "messages": ["echo:m0", "echo:m1", "echo:m2"]}
    assert seen["denied"]["code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert seen["fail"]["code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert seen["fail"]["details"] == "no such record"
    assert ["x-fail-trailer", "t"] in seen["fail"]["trailers"]
    assert seen["hang"]["code"] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    await asyncio.wait_for(backend.cancelled.wait(), 10)
