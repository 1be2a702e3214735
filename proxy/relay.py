"""The sidecar's data plane: gRPC relayed frame by frame over HTTP/2 (libnghttp2).

`Relay` listens (h2c, or TLS with ALPN h2 and optionally client certificates); each
client connection is a `Downstream`, each call a `relay_call.Call` paired with a stream
on a pooled backend connection (`upstream_pool.py`). The relay needs no knowledge of the
backend's methods: unary and streaming calls are the same frames.

One event loop turn handles a batch of frames from one socket; whatever it queued for
other connections is written at the end of the batch (`dirty`), so many small frames
become one write per connection.

Stopping: the listener closes, every connection gets GOAWAY (streams it had opened run
on), and after `grace` seconds what still runs is ended UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import sys
from collections.abc import Callable
from time import monotonic

import grpc
from prometheus_client import Histogram

from .catalog import Kind
from .decision import Decision
from .grpc_status import deny_details
from .grpc_wire import parse_timeout, trailers_only
from .h2_engine import (
    DataReceived,
    EngineError,
    ErrorCode,
    H2Protocol,
    Header,
    Limits,
    RequestReceived,
    SettingsReceived,
    StreamClosed,
    StreamReset,
    TrailersReceived,
    flush_all,
    server_connection,
)
from .metadata import relay_headers
from .pipeline import Authorizer
from .relay_call import Call
from .stream_guard import StreamGuard
from .upstream_pool import UpstreamPool

log = logging.getLogger("authproxy.sidecar")

#: Python 3.12+ runs a task's first step at once (`eager_start`): a decision that needs
#: no I/O costs no task switch. On 3.11 every decision is a task.
_EAGER = sys.version_info >= (3, 12)
#: A connection that has not sent the HTTP/2 preface and SETTINGS by then is closed.
PREFACE_TIMEOUT = 10.0
_GRPC = b"application/grpc"


class Downstream(H2Protocol):
    """One client connection."""

    def __init__(self, relay: Relay) -> None:
        super().__init__(relay.dirty)
        self.relay = relay
        self.connection = server_connection(relay.limits)
        self.calls: dict[int, Call] = {}
        self.peer = "unknown"
        self.principal: str | None = None
        self.spoke = False
        self._preface_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        relay = self.relay
        relay.connections.add(self)
        peer = transport.get_extra_info("peername")
        if peer:
            host, port = peer[0], peer[1]
            self.peer = f"ipv6:%5B{host}%5D:{port}" if ":" in host else f"ipv4:{host}:{port}"
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.selected_alpn_protocol() != "h2":
            log.debug("closing a TLS connection from %s that did not agree to h2", self.peer)
            transport.close()  # gRPC needs HTTP/2; clients negotiate it by ALPN
            return
        if relay.principal_of is not None:
            self.principal = relay.principal_of(transport)
        self._preface_timer = asyncio.get_running_loop().call_later(
            relay.preface_timeout, self._silent
        )
        super().connection_made(transport)

    def _silent(self) -> None:
        if not self.spoke:
            log.debug("closing a connection from %s that sent no HTTP/2 preface", self.peer)
            self.close()

    def events(self, events: list) -> None:
        if not self.spoke and any(type(event) is SettingsReceived for event in events):
            self.spoke = True  # the whole preface and SETTINGS arrived
            if self._preface_timer is not None:
                self._preface_timer.cancel()
        calls = self.calls
        relay = self.relay
        for event in events:
            kind = type(event)
            if kind is DataReceived:
                call = calls.get(event.stream_id)
                if call is None:
                    self.acknowledge(len(event.data), event.stream_id)
                else:
                    call.client_data(event.data, event.end_stream)
            elif kind is RequestReceived:
                relay.start(self, event.stream_id, event.headers, event.end_stream)
            elif kind is StreamReset:
                call = calls.get(event.stream_id)
                if call is not None:
                    call.client_reset()
            elif kind is StreamClosed:
                call = calls.pop(event.stream_id, None)
                if call is not None:
                    self.backlog.pop(event.stream_id, None)
                    if not call.ended:
                        call.client_reset()
                    call.cleanup()
                    relay.finished(call)
            elif kind is TrailersReceived:  # gRPC clients send none; end the request
                call = calls.get(event.stream_id)
                if call is not None:
                    call.client_data(b"", True)
        relay.flush()

    def lost(self, exc: Exception | None) -> None:
        if self._preface_timer is not None:
            self._preface_timer.cancel()
        relay = self.relay
        relay.connections.discard(self)
        for call in list(self.calls.values()):
            call.client_reset()
            relay.finished(call)
        self.calls.clear()
        self.backlog.clear()
        relay.flush()


class Relay:
    def __init__(
        self,
        authorizer: Authorizer,
        pool: UpstreamPool,
        limits: Limits,
        dirty: set,
        max_message_bytes: int,
        guard: StreamGuard | None = None,
        upstream_seconds: Histogram | None = None,
        principal_of: Callable[[asyncio.BaseTransport], str | None] | None = None,
        preface_timeout: float = PREFACE_TIMEOUT,
        kinds: dict[str, Kind] | None = None,
    ) -> None:
        """`principal_of`: the client certificate's identity of a TLS connection (mTLS
        listeners); it goes to the pipeline as the call's principal. `kinds`: method kinds
        known from reflection or descriptor sets; known unary calls are decided once and
        never watched by the stream guard (others are, see `stream_guard.py`)."""
        self.kinds = {} if kinds is None else kinds
        self.authorizer = authorizer
        self.pool = pool
        self.limits = limits
        self.dirty = dirty
        self.max_message_bytes = max_message_bytes
        self.guard = guard
        self.principal_of = principal_of
        self.preface_timeout = preface_timeout
        self._seconds = upstream_seconds.labels("stream") if upstream_seconds else None
        self._unary_seconds = upstream_seconds.labels("unary") if upstream_seconds else None
        self.connections: set[Downstream] = set()
        self._deciding: set[asyncio.Task[None]] = set()
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._active = 0
        self.server: asyncio.AbstractServer | None = None

    # --- calls --------------------------------------------------------------------------

    def start(self, down: Downstream, sid: int, headers: tuple[Header, ...], end: bool) -> None:
        method = content_type = timeout = None
        size = 0
        for name, value in headers:
            size += len(name) + len(value) + 32
            if name == b":path":
                method = value
            elif name == b"content-type":
                content_type = value
            elif name == b"grpc-timeout":
                timeout = value
            elif name == b":method" and value != b"POST":
                self._reply(down, sid, [(b":status", b"405")])
                return
        if content_type is None or not content_type.startswith(_GRPC):
            self._reply(down, sid, [(b":status", b"415")])
            return
        if size > self.limits.max_header_list_bytes:
            message = f"request headers of {size} bytes exceed the limit of" + (
                f" {self.limits.max_header_list_bytes}"
            )
            self._reply(down, sid, trailers_only(grpc.StatusCode.RESOURCE_EXHAUSTED, message))
            return
        if self.draining:
            self._reply(
                down, sid, trailers_only(grpc.StatusCode.UNAVAILABLE, "the proxy is stopping")
            )
            return
        deadline = None
        if timeout is not None:
            seconds = parse_timeout(timeout)
            if seconds is not None:
                deadline = monotonic() + seconds
        path = (method or b"").decode("latin-1")
        call = Call(self, down, sid, path, deadline)
        down.calls[sid] = call
        self._active += 1
        self._idle.clear()
        if deadline is not None:
            call.timer = asyncio.get_running_loop().call_at(
                asyncio.get_running_loop().time() + (deadline - monotonic()), call.expired
            )
        metadata = tuple(
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in headers if k[:1] != b":"
        )
        call.headers = metadata
        if end:
            call.client_data(b"", True)
        decision = self._decide(call, path, metadata, headers, down)
        if _EAGER:  # the first step runs now; only a decision that waits becomes a task
            task = asyncio.Task(decision, eager_start=True)  # type: ignore[call-arg]
        else:
            task = asyncio.get_running_loop().create_task(decision)
        if not task.done():  # keep it referenced until it is
            self._deciding.add(task)
            task.add_done_callback(self._deciding.discard)

    async def _decide(
        self,
        call: Call,
        path: str,
        metadata: tuple[tuple[str, str], ...],
        headers: tuple[Header, ...],
        down: Downstream,
    ) -> None:
        try:
            if down.principal is not None:
                decision = await self.authorizer.decide(
                    path, metadata, down.peer, principal=down.principal
                )
            else:
                decision = await self.authorizer.decide(path, metadata, down.peer)
        except Exception:
            log.exception("the decision for %s failed", path)
            call.finish(grpc.StatusCode.INTERNAL, "the proxy could not decide this call")
        else:
            call.decided(decision, headers)
        self.flush()

    def rewrite(self, headers: tuple[Header, ...], decision: Decision) -> list[Header]:
        return relay_headers(headers, decision, self.authorizer.policy.strip_headers)

    def refuse(self, call: Call, decision: Decision) -> None:
        """End `call` with a deny's status, message and `grpc-status-details-bin`, exactly
        as the decision's other front ends do."""
        message, details = deny_details(decision)
        call.finish(decision.status, message, details)

    def finished(self, call: Call) -> None:
        self._active -= 1
        if self._active <= 0:
            self._active = 0
            self._idle.set()
        if self._seconds is not None and call.up is not None:  # it reached the backend
            unary = self.kinds.get(call.method) is Kind.UNARY
            (self._unary_seconds if unary else self._seconds).observe(  # type: ignore[union-attr]
                monotonic() - call.started
            )

    def observe(self, call: Call) -> None:
        return None

    def _reply(self, down: Downstream, sid: int, headers: list[Header]) -> None:
        try:
            down.connection.send_response(sid, headers, end_stream=True)
        except EngineError:
            return
        self.dirty.add(down)

    def flush(self) -> None:
        flush_all(self.dirty)

    # --- listening ----------------------------------------------------------------------

    async def listen(
        self, host: str, port: int, tls: ssl.SSLContext | None = None, reuse_port: bool = False
    ) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: Downstream(self), host, port, ssl=tls, reuse_port=reuse_port or None
        )
        return self.server.sockets[0].getsockname()[1]

    async def stop(self, grace: float) -> None:
        """GOAWAY every connection, let running calls finish for `grace` seconds, then end
        the rest UNAVAILABLE and close."""
        self.draining = True
        if self.server is not None:
            self.server.close()
        for down in list(self.connections):
            with contextlib.suppress(EngineError):
                down.connection.send_goaway(ErrorCode.NO_ERROR)
            self.dirty.add(down)
        self.flush()
        if grace > 0:
            try:
                async with asyncio.timeout(grace):
                    await self._idle.wait()
            except TimeoutError:
                pass
        for down in list(self.connections):
            for call in list(down.calls.values()):
                call.finish(grpc.StatusCode.UNAVAILABLE, "the proxy is stopping")
            self.dirty.add(down)
        self.flush()
        for down in list(self.connections):
            down.close()
        await self.pool.close()
