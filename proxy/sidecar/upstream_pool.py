"""HTTP/2 connections to the backend for the frame relay (`sidecar/relay.py`).

Calls share a few long-lived connections: a call takes a connection that is ready, not
going away and below the backend's SETTINGS_MAX_CONCURRENT_STREAMS; when none has room a
new one is opened (up to `max_connections`), beyond that calls wait for a free stream.
Connecting is single-flight: calls that arrive meanwhile wait for the same attempt, and
when it fails they all end UNAVAILABLE (clients retry that); the next call tries again.
A connection the backend GOAWAYs takes no new calls; its open streams finish on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque
from typing import TYPE_CHECKING, Protocol

from authproxy.wire.h2_engine import (
    ConnectionClosed,
    DataReceived,
    EngineError,
    GoAwayReceived,
    H2Protocol,
    Header,
    Limits,
    ResponseReceived,
    SettingsReceived,
    StreamClosed,
    StreamReset,
    TrailersReceived,
    client_connection,
    flush_all,
)

if TYPE_CHECKING:
    from authproxy.runtime.tls import UpstreamTls

log = logging.getLogger("authproxy.upstream")

_MAX_CONCURRENT_STREAMS = 0x3
CONNECT_TIMEOUT = 5.0
_UNLIMITED = 2**31 - 1


class UpstreamCall(Protocol):
    """What the pool tells a relayed call about its backend stream."""

    def opened(self, connection: UpstreamConnection, stream_id: int) -> None: ...
    def failed(self, message: str) -> None: ...
    def response(self, headers: tuple[Header, ...], end_stream: bool) -> None: ...
    def data(self, data: bytes, end_stream: bool) -> None: ...
    def trailers(self, headers: tuple[Header, ...]) -> None: ...
    def reset(self, error_code: int) -> None: ...
    def closed(self) -> None: ...
    def request_headers(self) -> list[Header]: ...


class UpstreamConnection(H2Protocol):
    def __init__(self, pool: UpstreamPool) -> None:
        super().__init__(pool.dirty)
        self.pool = pool
        self.connection = client_connection(pool.limits)
        self.calls: dict[int, UpstreamCall] = {}
        #: Streams the backend allows at once: 100 until its first SETTINGS says.
        self.max_streams = 100
        self.settled = False
        self.going_away = False
        self.ready = asyncio.get_running_loop().create_future()

    def has_room(self) -> bool:
        return not (self.going_away or self.closed) and len(self.calls) < self.max_streams

    def open(self, call: UpstreamCall) -> None:
        try:
            stream_id = self.connection.send_request(call.request_headers())
        except EngineError as e:
            call.failed(f"upstream {self.pool.target} refused a new stream: {e}")
            return
        self.calls[stream_id] = call
        call.opened(self, stream_id)
        self.pool.dirty.add(self)

    def retire(self) -> None:
        """Take no new calls; close once the open ones are done."""
        self.going_away = True
        if not self.calls:
            self.close()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if not self.ready.done():
            self.ready.set_result(None)

    def events(self, events: list) -> None:
        calls = self.calls
        for event in events:
            kind = type(event)
            if kind is DataReceived:
                call = calls.get(event.stream_id)
                if call is None:
                    self.acknowledge(len(event.data), event.stream_id)
                else:
                    call.data(event.data, event.end_stream)
            elif kind is ResponseReceived:
                call = calls.get(event.stream_id)
                if call is not None:
                    call.response(event.headers, event.end_stream)
            elif kind is TrailersReceived:
                call = calls.get(event.stream_id)
                if call is not None:
                    call.trailers(event.headers)
            elif kind is StreamReset:
                call = calls.get(event.stream_id)
                if call is not None:
                    call.reset(event.error_code)
            elif kind is StreamClosed:
                call = calls.pop(event.stream_id, None)
                self.backlog.pop(event.stream_id, None)
                if call is not None:
                    call.closed()
                if self.going_away and not calls:
                    self.close()
                self.pool.stream_freed()
            elif kind is SettingsReceived:
                if not self.settled:  # the first SETTINGS: no limit named means none
                    self.settled = True
                    self.max_streams = _UNLIMITED
                limit = event.settings.get(_MAX_CONCURRENT_STREAMS)
                if limit is not None:
                    self.max_streams = limit
                self.pool.stream_freed()
            elif kind is GoAwayReceived:
                self.going_away = True
                for stream_id, call in list(calls.items()):
                    if stream_id > event.last_stream_id:  # never processed: not retried here
                        call.reset(0x7)  # REFUSED_STREAM
            elif kind is ConnectionClosed:
                self.going_away = True
        self.flush()
        self.pool.flush()

    def lost(self, exc: Exception | None) -> None:
        self.going_away = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(str(exc or "closed")))
        self.pool.forget(self)
        why = f"upstream {self.pool.target} closed the connection" + (f": {exc}" if exc else "")
        for call in list(self.calls.values()):
            call.failed(why)
        self.calls.clear()
        self.backlog.clear()
        self.pool.flush()


class UpstreamPool:
    def __init__(
        self,
        target: str,
        limits: Limits,
        dirty: set,
        tls: UpstreamTls | None = None,
        max_connections: int = 8,
    ) -> None:
        """`tls`: TLS (mTLS with a client certificate) to the backend; new connections
        use the files as last (re)loaded, open ones keep theirs."""
        host, _, port = target.rpartition(":")
        self.target = target
        self.host = host.strip("[]")
        self.port = int(port)
        self.limits = limits
        self.tls = tls
        self.server_hostname = (tls.files.server_name or self.host) if tls is not None else None
        self.max_connections = max_connections
        #: Connections with frames to write at the end of the current batch of events.
        self.dirty = dirty
        self.connections: list[UpstreamConnection] = []
        self.waiting: deque[UpstreamCall] = deque()
        self.errors_total = 0
        self._connecting: asyncio.Task[None] | None = None
        self.scheme = b"https" if tls is not None else b"http"
        server_name = tls.files.server_name if tls is not None else None
        self.authority = (server_name or target).encode()

    def open(self, call: UpstreamCall) -> None:
        """Open `call`'s stream now when a connection has room, else once one has."""
        for connection in self.connections:
            if connection.has_room():
                connection.open(call)
                return
        self.waiting.append(call)
        if self._connecting is None and len(self.connections) < self.max_connections:
            self._connecting = asyncio.get_running_loop().create_task(self._connect())

    def withdraw(self, call: UpstreamCall) -> None:
        """`call` ended before its stream opened."""
        with contextlib.suppress(ValueError):
            self.waiting.remove(call)

    def stream_freed(self) -> None:
        while self.waiting:
            connection = next((c for c in self.connections if c.has_room()), None)
            if connection is None:
                if self._connecting is None and len(self.connections) < self.max_connections:
                    self._connecting = asyncio.get_running_loop().create_task(self._connect())
                return
            connection.open(self.waiting.popleft())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        connection = UpstreamConnection(self)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await loop.create_connection(
                    lambda: connection,
                    self.host,
                    self.port,
                    ssl=self.tls.context if self.tls is not None else None,
                    server_hostname=self.server_hostname,
                )
                await connection.ready
            if self.tls is not None:
                selected = connection.transport.get_extra_info("ssl_object")  # type: ignore[union-attr]
                if selected is None or selected.selected_alpn_protocol() != "h2":
                    connection.close()
                    raise ConnectionError("the backend did not agree to HTTP/2 (ALPN h2)")
        except (OSError, TimeoutError, ConnectionError, ssl.SSLError) as e:
            self._connecting = None
            self.errors_total += 1
            message = str(e) or type(e).__name__
            log.warning("upstream %s unavailable: %s", self.target, message)
            waiting, self.waiting = self.waiting, deque()
            for call in waiting:
                call.failed(f"upstream {self.target} is unavailable: {message}")
            self.flush()
            return
        self._connecting = None
        self.connections.append(connection)
        self.stream_freed()
        self.flush()

    async def ready(self, timeout: float) -> bool:
        """Whether the backend takes a connection within `timeout` (readiness)."""
        if any(not c.going_away and not c.closed for c in self.connections):
            return True
        if self._connecting is None and len(self.connections) < self.max_connections:
            self._connecting = asyncio.get_running_loop().create_task(self._connect())
        connecting = self._connecting
        if connecting is None:
            return False
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(connecting)
        except TimeoutError:
            return False
        except asyncio.CancelledError:
            caller = asyncio.current_task()
            if caller is not None and caller.cancelling():
                raise  # this caller is being cancelled
            return False  # the connect attempt was cancelled: the pool is closing
        return any(not c.going_away and not c.closed for c in self.connections)

    def forget(self, connection: UpstreamConnection) -> None:
        if connection in self.connections:
            self.connections.remove(connection)

    def flush(self) -> None:
        """Write every connection (ours and the clients') that has frames queued."""
        flush_all(self.dirty)

    def start(self) -> None:
        """Follow the TLS files (needs a running event loop); connections open with the
        first call."""
        if self.tls is not None:
            self.tls.watch(self._tls_files_changed)

    async def _tls_files_changed(self, _why: str) -> None:
        if self.tls is not None and self.tls.changed():
            log.info("upstream %s: new connections use the reloaded TLS files", self.target)
            for connection in self.connections:
                connection.retire()  # calls on it finish there; new ones go to a new one

    async def close(self) -> None:
        if self.tls is not None:
            await self.tls.stop()
        if self._connecting is not None:
            self._connecting.cancel()
        for connection in list(self.connections):
            connection.close()
        self.connections.clear()
