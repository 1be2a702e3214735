"""The HTTP/2 engine: the one module that imports `ngh2` (Sans-I/O HTTP/2 on libnghttp2).

`ngh2` is young (alpha, pinned in pyproject.toml); everything the data plane needs from it
goes through here, so another engine with h2-style events (the pure-Python `h2` library)
could stand in by changing this module alone. What we rely on, and test in
`tests/test_h2_engine.py`:

* events `RequestReceived`, `ResponseReceived`, `TrailersReceived`, `DataReceived`,
  `StreamReset`, `StreamClosed`, `GoAwayReceived`, `ConnectionClosed`, `SettingsReceived`,
  `WindowUpdated`, headers as `(bytes, bytes)` with pseudo-headers first;
* manual flow control (`auto_window_update=False`): the peer may send a stream no more
  than its window until we `acknowledge` what we consumed — the relay acknowledges a
  chunk only once the other side has taken it, so a slow reader holds memory to the
  window, not to what the sender would push;
* libnghttp2's own defences, configured in `Limits`: header list size and count,
  CONTINUATION frames per header block, SETTINGS entries, queued SETTINGS/PING acks
  (a flood ends the connection), the RST_STREAM rate (rapid reset) and its "glitch" rate
  (other suspicious frames); streams beyond SETTINGS_MAX_CONCURRENT_STREAMS are refused
  with REFUSED_STREAM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import ngh2
from ngh2 import (
    ConnectionClosed,
    DataReceived,
    ErrorCode,
    GoAwayReceived,
    NGH2Error,
    RequestReceived,
    ResponseReceived,
    SettingsReceived,
    StreamClosed,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)

__all__ = [
    "ConnectionClosed",
    "DataReceived",
    "EngineError",
    "ErrorCode",
    "GoAwayReceived",
    "H2Protocol",
    "Header",
    "Limits",
    "RequestReceived",
    "ResponseReceived",
    "SettingsReceived",
    "StreamClosed",
    "StreamReset",
    "TrailersReceived",
    "WindowUpdated",
]

log = logging.getLogger("authproxy.h2")

Header = tuple[bytes, bytes]
#: Any error the engine raises for a protocol violation or an operation it refuses.
EngineError = NGH2Error

_MAX_CONCURRENT_STREAMS = 0x3
_INITIAL_WINDOW_SIZE = 0x4
_MAX_FRAME_SIZE = 0x5
_MAX_HEADER_LIST_SIZE = 0x6
_ENABLE_PUSH = 0x2
#: Seconds a closed connection is still read (and ignored) for the peer to close too.
LINGER = 2.0


@dataclass(frozen=True, slots=True)
class Limits:
    """What one connection may cost us."""

    #: Streams a peer may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS).
    max_concurrent_streams: int = 100
    #: Bytes a peer may send on one stream before we acknowledge (the stream window).
    stream_window: int = 1 << 20
    #: Bytes a peer may send on the whole connection before we acknowledge.
    connection_window: int = 4 << 20
    #: Decoded header list size (RFC 9113 counting): advertised, and a stream over it is
    #: refused (RESOURCE_EXHAUSTED) by the relay; beyond `abusive_header_list_bytes` the
    #: engine ends the whole connection (a flood, not a call).
    max_header_list_bytes: int = 80 * 1024
    abusive_header_list_bytes: int = 1152 * 1024
    max_header_count: int = 512
    max_continuations: int = 8
    #: Incoming RST_STREAM frames: (burst, per second) before the connection is closed.
    reset_rate: tuple[int, int] = (1000, 33)
    #: Other suspicious frames (empty DATA, needless WINDOW_UPDATE, ...): (burst, per second).
    glitch_rate: tuple[int, int] = (10_000, 330)
    #: SETTINGS and PING acknowledgements queued (the peer not reading) before closing.
    max_outbound_ack: int = 1000


def _configuration(limits: Limits) -> ngh2.Configuration:
    return ngh2.Configuration(
        auto_window_update=False,
        max_inbound_header_list_size=limits.abusive_header_list_bytes,
        max_inbound_header_count=limits.max_header_count,
        max_continuations=limits.max_continuations,
        stream_reset_rate_limit=limits.reset_rate,
        glitch_rate_limit=limits.glitch_rate,
        max_outbound_ack=limits.max_outbound_ack,
        max_send_header_block_length=limits.max_header_list_bytes + 1024,
    )


def server_connection(limits: Limits) -> ngh2.Connection:
    """A server side with its SETTINGS queued (the first bytes to write)."""
    connection = ngh2.Connection(ngh2.Role.SERVER, _configuration(limits))
    connection.initiate_connection(
        {
            _MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
            _INITIAL_WINDOW_SIZE: limits.stream_window,
            _MAX_HEADER_LIST_SIZE: limits.max_header_list_bytes,
        }
    )
    connection.set_local_window_size(limits.connection_window)
    return connection


def client_connection(limits: Limits) -> ngh2.Connection:
    """A client side (to the backend) with its preface and SETTINGS queued."""
    connection = ngh2.Connection(ngh2.Role.CLIENT, _configuration(limits))
    connection.initiate_connection(
        {
            _ENABLE_PUSH: 0,
            _INITIAL_WINDOW_SIZE: limits.stream_window,
            _MAX_HEADER_LIST_SIZE: limits.max_header_list_bytes,
        }
    )
    connection.set_local_window_size(limits.connection_window)
    return connection


def flush_all(dirty: set[H2Protocol]) -> None:
    """Write every connection with frames queued (flushing one may queue on another)."""
    while dirty:
        dirty.pop().flush()


class H2Protocol(asyncio.Protocol):
    """One transport driven by one engine connection. Subclasses handle `events` and call
    `flush` after queuing frames; writes pause while the transport's buffer is full (the
    engine keeps the frames, so the relay stops acknowledging and the peer stops)."""

    connection: ngh2.Connection

    def __init__(self, dirty: set[H2Protocol]) -> None:
        #: Connections (this one and its peers on the other side of the relay) with frames
        #: queued; `flush_all` writes them at the end of a batch of events.
        self.dirty = dirty
        #: stream id -> what to do once the engine has sent on all the data queued for that
        #: stream (acknowledge it to the side it came from).
        self.backlog: dict[int, Callable[[], None]] = {}
        self.transport: asyncio.Transport | None = None
        self.writable = True
        self.closed = False
        self._linger: asyncio.TimerHandle | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.flush()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return  # lingering: read and ignore
        try:
            self.connection.receive_data(data)
        except NGH2Error as e:  # a connection error: the engine queued its GOAWAY
            log.debug("HTTP/2 connection error from %s: %s", self.peer_name(), e)
            with contextlib.suppress(NGH2Error):  # the engine may be done already
                self.events(self.connection.events())
            self.close()
            return
        self.events(self.connection.events())
        self.flush()
        self.drained()  # what flushing released (acknowledgements) goes out too

    def pause_writing(self) -> None:
        self.writable = False

    def resume_writing(self) -> None:
        self.writable = True
        self.flush()
        self.drained()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._linger is not None:
            self._linger.cancel()
        self.lost(exc)

    # for subclasses
    def events(self, events: list) -> None:
        raise NotImplementedError

    def drained(self) -> None:
        """This connection wrote what it could: write the others it gave frames to."""
        flush_all(self.dirty)

    def acknowledge(self, amount: int, stream_id: int) -> None:
        """Let the peer send `amount` more bytes on `stream_id` (and the connection)."""
        try:
            self.connection.acknowledge_received_data(amount, stream_id)
        except (NGH2Error, ValueError):
            return  # the stream or the connection is gone
        self.dirty.add(self)

    def lost(self, exc: Exception | None) -> None:
        """The transport is gone."""

    def flush(self) -> None:
        """Write what the engine has queued (unless the transport is full); close once
        neither side wants anything more."""
        transport = self.transport
        if transport is None or self.closed:
            return
        if self.writable:
            data = self.connection.data_to_send()
            if data:
                transport.write(data)
            if self.backlog:
                queued = self.connection.queued_body_size
                for stream_id, taken in list(self.backlog.items()):
                    if queued(stream_id) == 0:
                        del self.backlog[stream_id]
                        taken()
        if not (self.connection.want_read or self.connection.want_write):
            self.close()

    def close(self) -> None:
        """Write what the engine still holds (a final GOAWAY, last frames), then close.

        A lingering close: our side is shut down for writing (FIN) and the socket is read
        and ignored until the peer closes, for at most `LINGER` seconds. Closing at once
        while the peer's last frames (a WINDOW_UPDATE, a PING ack) sit unread makes the
        kernel answer with RST, and the peer may lose our last frames with it."""
        transport = self.transport
        if transport is None or self.closed:
            return
        self.closed = True
        try:
            data = self.connection.data_to_send()
        except NGH2Error:  # a failed engine has nothing more to say
            data = b""
        if data:
            transport.write(data)
        try:
            if transport.can_write_eof():
                transport.write_eof()
                self._linger = asyncio.get_running_loop().call_later(LINGER, transport.close)
                return
        except OSError:  # the peer is gone already
            pass
        transport.close()

    def eof_received(self) -> bool:
        return False  # the peer is done: close (also ends a lingering close)

    def peer_name(self) -> str:
        if self.transport is None:
            return "?"
        peer = self.transport.get_extra_info("peername")
        return str(peer[0]) if peer else "?"
