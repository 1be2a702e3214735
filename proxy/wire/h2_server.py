"""HTTP/2 servers on the engine (`wire/h2_engine.py`): the listener and connection plumbing
that the sidecar's relay (`sidecar/relay.py`) and the gRPC server for the proxy's own services
(`wire/grpc_server.py`: ext_authz Check, health) share.

`H2Server` listens (h2c, or TLS with ALPN h2), keeps its connections and stops
gracefully: the listener closes, every connection gets GOAWAY (streams it had opened run
on), the calls in flight get `grace` seconds, then what still runs is ended by the
subclass (`abandon`, UNAVAILABLE) and every connection closes.

`ServerConnection` is one client connection: its peer's name, the ALPN check (gRPC needs
HTTP/2, which TLS clients negotiate by ALPN) and the preface timeout: a connection that
has not sent the HTTP/2 preface and SETTINGS in time is closed, since an idle socket
holds a file descriptor and memory and nothing else would ever end it.

`request_head` is what both servers check on a request's HEADERS before anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import sys
from collections.abc import Coroutine, Iterable
from typing import Any

import grpc

from authproxy.wire.grpc_protocol import status_headers, trailers_only
from authproxy.wire.h2_engine import (
    EngineError,
    ErrorCode,
    H2Protocol,
    Header,
    Limits,
    SettingsReceived,
    flush_all,
    server_connection,
)
from authproxy.wire.listen import listen_on

log = logging.getLogger("authproxy.h2")

#: Python 3.12+ runs a task's first step at once (`eager_start`): a decision that needs
#: no I/O costs no task switch. On 3.11 every decision is a task (a plain coroutine run
#: inline would have no current task, which `asyncio.timeout` in redis-py needs).
EAGER = sys.version_info >= (3, 12)
#: A connection that has not sent the HTTP/2 preface and SETTINGS by then is closed.
PREFACE_TIMEOUT = 10.0
_GRPC = b"application/grpc"
_METHOD_NOT_ALLOWED: tuple[Header, ...] = ((b":status", b"405"),)
_UNSUPPORTED_MEDIA_TYPE: tuple[Header, ...] = ((b":status", b"415"),)


def request_head(
    headers: Iterable[Header], max_header_list_bytes: int
) -> tuple[bytes, bytes | None, Iterable[Header] | None]:
    """(`:path`, `grpc-timeout`, refusal) of a request's HEADERS. The refusal, when there
    is one, is the whole response to send instead of serving the request: 405 for a method
    other than POST, 415 for a content type that is not gRPC (no grpc-status: the client
    may not speak gRPC at all), RESOURCE_EXHAUSTED for a header list over the limit
    (RFC 9113 counting; the engine itself only ends connections far beyond it)."""
    path = content_type = timeout = None
    size = 0
    for name, value in headers:
        size += len(name) + len(value) + 32
        if name == b":path":
            path = value
        elif name == b"content-type":
            content_type = value
        elif name == b"grpc-timeout":
            timeout = value
        elif name == b":method" and value != b"POST":
            return b"", None, _METHOD_NOT_ALLOWED
    if content_type is None or not content_type.startswith(_GRPC):
        return b"", None, _UNSUPPORTED_MEDIA_TYPE
    if size > max_header_list_bytes:
        message = f"request headers of {size} bytes exceed the limit of {max_header_list_bytes}"
        return b"", None, trailers_only(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
    return path or b"", timeout, None


def send_status(
    engine: Any, sid: int, replied: bool, code: grpc.StatusCode, message: str, extra=()
) -> bool:
    """End stream `sid` on `engine` with a gRPC status: trailers after a response was
    started (`replied`), else a trailers-only response. False when the engine refused
    (the stream or connection is already gone)."""
    try:
        if replied:
            engine.send_trailers(sid, status_headers(code, message, extra))
        else:
            engine.send_response(sid, trailers_only(code, message, extra), end_stream=True)
    except EngineError:
        return False
    return True


def start_task(coroutine: Coroutine[Any, Any, None], running: set[asyncio.Task[None]]) -> None:
    """Run a call's decision: its first step now on 3.12+ (only a decision that waits
    becomes a task), a task on 3.11; referenced in `running` until it is done."""
    loop = asyncio.get_running_loop()
    if EAGER:  # the loop given: 3.12.0 and 3.12.1 fail an eager start without one
        task = asyncio.Task(coroutine, loop=loop, eager_start=True)  # type: ignore[call-arg]
    else:
        task = loop.create_task(coroutine)
    if not task.done():  # keep it referenced until it is
        running.add(task)
        task.add_done_callback(running.discard)


class ServerConnection(H2Protocol):
    """One client connection of an `H2Server`. Subclasses handle the engine's events in
    `handle` and may read the transport once it is accepted (`accepted`)."""

    def __init__(self, server: H2Server) -> None:
        super().__init__(server.dirty)
        self.server = server
        self.connection = server_connection(server.limits)
        #: The peer as gRPC names it (`ipv4:127.0.0.1:5000`), for the pipeline and logs.
        self.peer = "unknown"
        self.spoke = False  # the preface and the first SETTINGS arrived
        self._preface_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        server = self.server
        server.connections.add(self)
        peer = transport.get_extra_info("peername")
        if peer:
            host, port = peer[0], peer[1]
            self.peer = f"ipv6:%5B{host}%5D:{port}" if ":" in host else f"ipv4:{host}:{port}"
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.selected_alpn_protocol() != "h2":
            log.debug("closing a TLS connection from %s that did not agree to h2", self.peer)
            transport.close()  # gRPC needs HTTP/2; clients negotiate it by ALPN
            return
        self.accepted(transport)
        self._preface_timer = asyncio.get_running_loop().call_later(
            server.preface_timeout, self._silent
        )
        super().connection_made(transport)

    def accepted(self, transport: asyncio.BaseTransport) -> None:
        """The connection is taken (and, with TLS, agreed to h2): read what it says of the
        peer before any frame arrives."""

    def _silent(self) -> None:
        if not self.spoke:
            log.debug("closing a connection from %s that sent no HTTP/2 preface", self.peer)
            self.close()

    def events(self, events: list) -> None:
        if not self.spoke and any(type(event) is SettingsReceived for event in events):
            self.spoke = True  # the whole preface and SETTINGS arrived
            if self._preface_timer is not None:
                self._preface_timer.cancel()
        self.handle(events)

    def handle(self, events: list) -> None:
        raise NotImplementedError

    def respond(self, stream_id: int, headers: Iterable[Header]) -> None:
        """A whole response that is only headers (END_STREAM): a refusal or a status."""
        try:
            self.connection.send_response(stream_id, headers, end_stream=True)
        except EngineError:
            return  # the stream is gone
        self.dirty.add(self)

    def lost(self, exc: Exception | None) -> None:
        if self._preface_timer is not None:
            self._preface_timer.cancel()
        self.server.connections.discard(self)


class H2Server:
    """A listener whose connections are `ServerConnection`s (made by `protocol`), with the
    in-flight count (`begin`/`end`) that a graceful stop waits for."""

    def __init__(
        self, limits: Limits, dirty: set, preface_timeout: float = PREFACE_TIMEOUT
    ) -> None:
        """`dirty`: the connections with frames to write, shared with whatever else this
        server queues frames on (the relay's backend connections), written at the end of
        a batch of events (`flush`)."""
        self.limits = limits
        self.dirty = dirty
        self.preface_timeout = preface_timeout
        self.connections: set[ServerConnection] = set()
        self.servers: list[asyncio.AbstractServer] = []
        self.draining = False
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # --- for subclasses -----------------------------------------------------------------

    def protocol(self) -> ServerConnection:
        """A new connection."""
        raise NotImplementedError

    def abandon(self, connection: ServerConnection) -> None:
        """The grace period is over: end what still runs on `connection` (UNAVAILABLE)."""

    def begin(self) -> None:
        """A call started: a graceful stop waits for it."""
        self._active += 1
        self._idle.clear()

    def end(self) -> None:
        """A call `begin` counted is over."""
        self._active -= 1
        if self._active <= 0:
            self._active = 0
            self._idle.set()

    def flush(self) -> None:
        flush_all(self.dirty)

    # --- listening ----------------------------------------------------------------------

    async def listen(
        self, address: str, tls: ssl.SSLContext | None = None, reuse_port: bool = False
    ) -> int:
        """Bind `HOST:PORT` (`wire/listen.py`) and listen there; the bound port. OSError
        (naming the address) when it cannot be had."""
        loop = asyncio.get_running_loop()

        async def serve(sock: socket.socket) -> None:
            server = await loop.create_server(
                self.protocol, sock=sock, ssl=tls, backlog=socket.SOMAXCONN
            )
            self.servers.append(server)

        return await listen_on(address, serve, reuse_port)

    async def stop(self, grace: float) -> None:
        """GOAWAY every connection, let running calls finish for `grace` seconds, then end
        the rest (`abandon`) and close."""
        self.draining = True
        for server in self.servers:
            server.close()
        for connection in list(self.connections):
            with contextlib.suppress(EngineError):
                connection.connection.send_goaway(ErrorCode.NO_ERROR)
            self.dirty.add(connection)
        self.flush()
        if grace > 0:
            try:
                async with asyncio.timeout(grace):
                    await self._idle.wait()
            except TimeoutError:
                pass
        for connection in list(self.connections):
            self.abandon(connection)
            self.dirty.add(connection)
        self.flush()
        for connection in list(self.connections):
            connection.close()
