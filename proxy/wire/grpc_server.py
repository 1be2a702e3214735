"""A gRPC server for the proxy's own services (ext_authz Check, gRPC health) on the
HTTP/2 engine (`wire/h2_server.py`), without grpc.aio.

Why not grpc.aio: a check is a small request and a small answer, and grpc.aio spends
most of a check's CPU in its own machinery (grpc core's completion queue and threads,
the bridge to the event loop, a task per call). Here one event-loop turn reads a batch
of frames; each request is decided on the loop (`h2_server.start_task`: eagerly on
Python 3.12+), and the answers of a batch leave in one write per connection (`dirty`).

Methods are unary (`Method.unary`: one request message, answered with headers, one
message and `grpc-status: 0`, or a status) or server-streaming (`Method.stream`: the
handler keeps the `Stream` and `send`s on it, as health Watch does). The request is
read whole first: exactly one message, uncompressed (no `grpc-accept-encoding` is
advertised, so a compressed message is a client error), within `max_message_bytes`
(grpc's default receive limit), parsed by the method's `parse` (protobuf `FromString`;
a message that does not parse is INVALID_ARGUMENT). An unknown method is UNIMPLEMENTED;
requests that are not POST or not gRPC are refused as `request_head` says.

Stopping (`H2Server.stop`): GOAWAY; unary calls in flight are answered within the
grace period; then what is still open (unanswered calls, Watch streams) ends
UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from authproxy.wire.grpc_protocol import RESPONSE_START, trailers_only
from authproxy.wire.h2_engine import (
    DataReceived,
    EngineError,
    Header,
    Limits,
    RequestReceived,
    StreamClosed,
    StreamReset,
    TrailersReceived,
)
from authproxy.wire.h2_server import (
    PREFACE_TIMEOUT,
    H2Server,
    ServerConnection,
    request_head,
    send_status,
    start_task,
)

log = logging.getLogger("authproxy.grpc")

#: grpc's default limit for a received message.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
_OK: tuple[Header, ...] = ((b"grpc-status", b"0"),)
_IDENTITY = (b"", b"identity")
#: What a client whose compression was refused is told this server accepts (gRPC's
#: compression document: with UNIMPLEMENTED, the server names its encodings).
_ACCEPT_IDENTITY = (("grpc-accept-encoding", "identity"),)


def framed(message: bytes) -> bytes:
    """A serialized message with its 5-byte gRPC prefix (uncompressed): what unary
    handlers return and `Stream.send` takes."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


class RpcError(Exception):
    """A handler's answer that is a status (with `extra` metadata), not a message."""

    def __init__(
        self, code: grpc.StatusCode, message: str, extra: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra


@dataclass(frozen=True, slots=True)
class Method:
    """One method: `parse` (bytes -> request message) and exactly one of `unary` (request
    -> awaitable `framed` response) or `stream` (request, `Stream` -> None; called on the
    event loop, it must not block)."""

    parse: Callable[[bytes], Any]
    unary: Callable[[Any], Awaitable[bytes]] | None = None
    stream: Callable[[Any, Stream], None] | None = None


class Stream:
    """One call: the request as it arrives, then the answer. A streaming handler keeps it
    to `send` messages and sets `on_close` to hear when the client is gone."""

    __slots__ = (
        "buffer",
        "connection",
        "counted",
        "done",
        "headers",
        "held",
        "method",
        "on_close",
        "replied",
        "sid",
    )

    def __init__(
        self, connection: GrpcConnection, sid: int, method: Method, headers: tuple[Header, ...]
    ) -> None:
        self.connection = connection
        self.sid = sid
        self.method = method
        self.headers = headers
        self.buffer: bytes | bytearray = b""
        self.held = 0  # bytes of an unfinished request counted in `GrpcConnection.held`
        self.counted = False  # a unary call a graceful stop waits for
        self.done = False  # answered, or the client is gone: nothing more is sent
        self.replied = False  # response headers sent (a streaming answer)
        self.on_close: Callable[[], None] | None = None

    def send(self, message: bytes) -> None:
        """Send one `framed` message (the response headers first), written soon."""
        if self.done:
            return
        engine = self.connection.connection
        try:
            if not self.replied:
                engine.send_response(self.sid, RESPONSE_START)
                self.replied = True
            engine.send_data(self.sid, message)
        except EngineError:
            return  # the stream is gone; its close event ends it
        server = self.connection.grpc
        server.dirty.add(self.connection)
        server.flush_soon()


class GrpcConnection(ServerConnection):
    """One client connection: its streams by id."""

    def __init__(self, server: GrpcServer) -> None:
        super().__init__(server)
        self.grpc = server
        self.streams: dict[int, Stream] = {}
        #: Bytes of requests still arriving (kept until they are whole).
        self.held = 0

    def handle(self, events: list) -> None:
        streams = self.streams
        server = self.grpc
        for event in events:
            kind = type(event)
            if kind is DataReceived:
                data = event.data
                if data:  # read (kept, or dropped): the client may send more
                    self.acknowledge(len(data), event.stream_id)
                stream = streams.get(event.stream_id)
                if stream is not None and not stream.done:
                    server.received(stream, data, event.end_stream)
            elif kind is RequestReceived:
                server.start(self, event.stream_id, event.headers, event.end_stream)
            elif kind is StreamClosed or kind is StreamReset:
                stream = streams.pop(event.stream_id, None)
                if stream is not None:
                    server.closed(stream)
            elif kind is TrailersReceived:  # gRPC clients send none; end the request
                stream = streams.get(event.stream_id)
                if stream is not None and not stream.done:
                    server.received(stream, b"", True)

    def lost(self, exc: Exception | None) -> None:
        super().lost(exc)
        server = self.grpc
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            server.closed(stream)


class GrpcServer(H2Server):
    """The listener and the methods it serves (by path, `/package.Service/Method`)."""

    def __init__(
        self,
        methods: dict[str, Method],
        limits: Limits | None = None,
        preface_timeout: float = PREFACE_TIMEOUT,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        super().__init__(limits or Limits(), set(), preface_timeout)
        self.methods = {path.encode(): method for path, method in methods.items()}
        self.max_message_bytes = max_message_bytes
        #: What the unfinished requests of one connection may hold: one message at the
        #: limit plus a connection window of others. Request data is acknowledged as it
        #: is kept (a message may be larger than the stream window), so this, not flow
        #: control, bounds a connection's memory.
        self.max_held_bytes = self.limits.connection_window + max_message_bytes
        self._running: set[asyncio.Task[None]] = set()
        self._flushing = False

    def protocol(self) -> GrpcConnection:
        return GrpcConnection(self)

    # --- the request --------------------------------------------------------------------

    def start(self, conn: GrpcConnection, sid: int, headers: tuple[Header, ...], end: bool) -> None:
        path, _, refusal = request_head(headers, self.limits.max_header_list_bytes)
        if refusal is not None:
            conn.respond(sid, refusal)
            return
        method = self.methods.get(path)
        if method is None:
            name = path.decode("latin-1")
            conn.respond(
                sid, trailers_only(grpc.StatusCode.UNIMPLEMENTED, f"unknown method {name}")
            )
            return
        stream = Stream(conn, sid, method, headers)
        conn.streams[sid] = stream
        if method.unary is not None:
            stream.counted = True
            self.begin()
        if end:
            self.received(stream, b"", True)

    def received(self, stream: Stream, data: bytes, end: bool) -> None:
        """Request bytes (all of them at `end`): keep them, and refuse the call as soon as
        its framing is wrong, so nothing over the limit is kept."""
        buffer = stream.buffer
        if not buffer:
            buffer = stream.buffer = data
        elif data:
            if type(buffer) is bytes:  # a message in several frames: grow in place
                buffer = stream.buffer = bytearray(buffer)
            buffer += data  # type: ignore[operator]
        if len(buffer) >= 5:
            problem = self._framing(stream, buffer)
            if problem is not None:
                self.fail(stream, problem.code, problem.message, problem.extra)
                return
        if end:
            self._complete(stream, buffer)
        elif data:
            stream.held += len(data)
            conn = stream.connection
            conn.held += len(data)
            if conn.held > self.max_held_bytes:
                message = (
                    "the requests still arriving on this connection hold more than"
                    f" {self.max_held_bytes} bytes"
                )
                self.fail(stream, grpc.StatusCode.RESOURCE_EXHAUSTED, message)

    def _framing(self, stream: Stream, buffer: bytes | bytearray) -> RpcError | None:
        """What is wrong with a request holding at least a message prefix, or None."""
        if buffer[0]:
            encoding = next((v for k, v in stream.headers if k == b"grpc-encoding"), b"")
            if encoding not in _IDENTITY:
                return RpcError(
                    grpc.StatusCode.UNIMPLEMENTED,
                    f"grpc-encoding {encoding.decode('latin-1')} is not supported"
                    " (this server accepts identity only)",
                    _ACCEPT_IDENTITY,
                )
            return RpcError(
                grpc.StatusCode.INTERNAL,
                "a compressed message without grpc-encoding (this server accepts identity only)",
                _ACCEPT_IDENTITY,
            )
        size = int.from_bytes(buffer[1:5], "big")
        if size > self.max_message_bytes:
            return RpcError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request message larger than max ({size} vs. {self.max_message_bytes})",
            )
        if len(buffer) > 5 + size:
            return RpcError(
                grpc.StatusCode.INTERNAL, "more than one request message for this method"
            )
        return None

    def _complete(self, stream: Stream, buffer: bytes | bytearray) -> None:
        if len(buffer) < 5 or len(buffer) < 5 + int.from_bytes(buffer[1:5], "big"):
            self.fail(stream, grpc.StatusCode.INTERNAL, "the request ended without a whole message")
            return
        method = stream.method
        self._release(stream)
        try:
            request = method.parse(bytes(memoryview(buffer)[5:]))
        except Exception:  # protobuf's DecodeError (and whatever else a parser raises)
            self.fail(
                stream, grpc.StatusCode.INVALID_ARGUMENT, "the request message does not parse"
            )
            return
        if method.stream is not None:
            method.stream(request, stream)
            return
        start_task(self._unary(stream, request), self._running)

    async def _unary(self, stream: Stream, request: Any) -> None:
        try:
            response = await stream.method.unary(request)  # type: ignore[misc]
        except RpcError as e:
            self.fail(stream, e.code, e.message, e.extra)
        except Exception:
            log.exception("a gRPC method failed; answering INTERNAL")
            self.fail(stream, grpc.StatusCode.INTERNAL, "the server failed to answer")
        else:
            self.answer(stream, response)
        self.flush_soon()

    # --- the answer ---------------------------------------------------------------------

    def answer(self, stream: Stream, message: bytes) -> None:
        """A unary call's answer: headers, the `framed` message, `grpc-status: 0`."""
        if stream.done:
            return  # the client went away (or the server stopped) meanwhile
        self._done(stream)
        engine = stream.connection.connection
        sid = stream.sid
        try:
            engine.send_response(sid, RESPONSE_START)
            engine.send_data(sid, message)
            engine.send_trailers(sid, _OK)
        except EngineError:
            return
        self.dirty.add(stream.connection)

    def fail(self, stream: Stream, code: grpc.StatusCode, message: str, extra=()) -> None:
        """End the call with a status and `extra` metadata (trailers-only unless a
        response was started)."""
        if stream.done:
            return
        self._done(stream)
        self._release(stream)
        if send_status(
            stream.connection.connection, stream.sid, stream.replied, code, message, extra
        ):
            self.dirty.add(stream.connection)

    def _done(self, stream: Stream) -> None:
        stream.done = True
        if stream.counted:
            stream.counted = False
            self.end()

    def _release(self, stream: Stream) -> None:
        """The request's bytes are no longer kept."""
        stream.buffer = b""
        if stream.held:
            stream.connection.held -= stream.held
            stream.held = 0

    def closed(self, stream: Stream) -> None:
        """The stream is closed or reset (or its connection is gone)."""
        if not stream.done:
            self._done(stream)
        self._release(stream)
        if stream.on_close is not None:
            on_close, stream.on_close = stream.on_close, None
            on_close()

    def flush_soon(self) -> None:
        """Write what the calls answered, once the loop has run every call ready now: the
        answers decided in one turn leave in one write per connection."""
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        self.flush()

    def abandon(self, connection: ServerConnection) -> None:
        assert isinstance(connection, GrpcConnection)
        for stream in list(connection.streams.values()):
            self.fail(stream, grpc.StatusCode.UNAVAILABLE, "the server is stopping")
