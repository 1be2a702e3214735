"""The sidecar's data plane: gRPC relayed frame by frame over HTTP/2 (libnghttp2).

`Relay` listens (h2c, or TLS with ALPN h2 and optionally client certificates); each
client connection is a `Downstream`, each call a `relay_call.Call` paired with a stream
on a pooled backend connection (`sidecar/upstream_pool.py`). The relay needs no knowledge of the
backend's methods: unary and streaming calls are the same frames.

One event loop turn handles a batch of frames from one socket; whatever it queued for
other connections is written at the end of the batch (`dirty`), so many small frames
become one write per connection.

Stopping: the listener closes, every connection gets GOAWAY (streams it had opened run
on), and after `grace` seconds what still runs is ended UNAVAILABLE. The listener and
connection plumbing (preface timeout, ALPN check, graceful stop) is `wire/h2_server.py`'s,
shared with the ext_authz Check server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from time import monotonic
from typing import TYPE_CHECKING

import grpc

from authproxy.decide.auth_headers import relay_headers
from authproxy.decide.decision import Decision
from authproxy.decide.pipeline import Authorizer
from authproxy.runtime.metrics import LabelledHistogram
from authproxy.sidecar.call import Call
from authproxy.sidecar.catalog import Kind
from authproxy.sidecar.stream_guard import StreamGuard
from authproxy.sidecar.upstream_pool import UpstreamPool
from authproxy.wire.grpc_protocol import parse_timeout, trailers_only
from authproxy.wire.grpc_status import deny_details
from authproxy.wire.h2_engine import (
    DataReceived,
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
    start_task,
)
from authproxy.wire.message_types import MessageTypes

if TYPE_CHECKING:
    from authproxy.runtime.tracing import Tracing

log = logging.getLogger("authproxy.sidecar")


class Downstream(ServerConnection):
    """One client connection."""

    def __init__(self, relay: Relay) -> None:
        super().__init__(relay)
        self.relay = relay
        self.calls: dict[int, Call] = {}
        self.principal: str | None = None

    def accepted(self, transport: asyncio.BaseTransport) -> None:
        if self.relay.principal_of is not None:
            self.principal = self.relay.principal_of(transport)

    def handle(self, events: list) -> None:
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
        super().lost(exc)
        relay = self.relay
        for call in list(self.calls.values()):
            call.client_reset()
            relay.finished(call)
        self.calls.clear()
        self.backlog.clear()
        relay.flush()


class Relay(H2Server):
    def __init__(
        self,
        authorizer: Authorizer,
        pool: UpstreamPool,
        limits: Limits,
        dirty: set,
        max_message_bytes: int,
        guard: StreamGuard | None = None,
        upstream_seconds: LabelledHistogram | None = None,
        principal_of: Callable[[asyncio.BaseTransport], str | None] | None = None,
        preface_timeout: float = PREFACE_TIMEOUT,
        kinds: dict[str, Kind] | None = None,
        types: MessageTypes | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        """`principal_of`: the client certificate's identity of a TLS connection (mTLS
        listeners); it goes to the pipeline as the call's principal. `kinds`: method kinds
        known from reflection or descriptor sets; known unary calls are decided once and
        never watched by the stream guard (others are, see `sidecar/stream_guard.py`).
        `types`: request message types, for rules that check request fields.
        `tracing`: spans for each decision and relayed call (None: off, no cost)."""
        super().__init__(limits, dirty, preface_timeout)
        self.kinds = {} if kinds is None else kinds
        self.types = types
        self.authorizer = authorizer
        self.pool = pool
        self.max_message_bytes = max_message_bytes
        self.guard = guard
        self.principal_of = principal_of
        self._seconds = upstream_seconds.labels("stream") if upstream_seconds else None
        self._unary_seconds = upstream_seconds.labels("unary") if upstream_seconds else None
        self._deciding: set[asyncio.Task[None]] = set()
        self.tracing = tracing
        self.decide_now = authorizer.decide_now
        if tracing is not None:
            self.decide_now = tracing.decide_now(authorizer.decide_now)

    # --- calls --------------------------------------------------------------------------

    def start(self, down: Downstream, sid: int, headers: tuple[Header, ...], end: bool) -> None:
        method, timeout, refusal = request_head(headers, self.limits.max_header_list_bytes)
        if refusal is not None:
            down.respond(sid, refusal)
            return
        if self.draining:
            down.respond(sid, trailers_only(grpc.StatusCode.UNAVAILABLE, "the proxy is stopping"))
            return
        deadline = None
        if timeout is not None:
            seconds = parse_timeout(timeout)
            if seconds is not None:
                deadline = monotonic() + seconds
        path = method.decode("latin-1")
        call = Call(self, down, sid, path, deadline)
        down.calls[sid] = call
        self.begin()
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
        try:
            pending = self.decide_now(path, metadata, down.peer, down.principal)
        except Exception:
            self._failed(call, path)
            return
        if isinstance(pending, Decision):  # no step waited: decided in this batch
            call.decided(pending, headers)
        else:
            start_task(self._decide(call, path, pending, headers), self._deciding)

    async def _decide(
        self, call: Call, path: str, pending: Awaitable[Decision], headers: tuple[Header, ...]
    ) -> None:
        """The rest of a decision that waits (a key fetch, Redis), in a task."""
        try:
            decision = await pending
        except Exception:
            self._failed(call, path)
        else:
            call.decided(decision, headers)
        self.flush()

    def _failed(self, call: Call, path: str) -> None:
        log.exception("the decision for %s failed", path)
        call.finish(grpc.StatusCode.INTERNAL, "the proxy could not decide this call")

    def rewrite(self, headers: tuple[Header, ...], decision: Decision) -> list[Header]:
        return relay_headers(headers, decision, self.authorizer.policy.strip_headers)

    def refuse(self, call: Call, decision: Decision) -> None:
        """End `call` with a deny's status, message and `grpc-status-details-bin`, exactly
        as the decision's other front ends do."""
        message, details = deny_details(decision)
        call.finish(decision.status, message, details)

    def finished(self, call: Call) -> None:
        self.end()
        if call.trace is not None:
            call.trace.end()
        if self._seconds is not None and call.up is not None:  # it reached the backend
            unary = self.kinds.get(call.method) is Kind.UNARY
            (self._unary_seconds if unary else self._seconds).observe(  # type: ignore[union-attr]
                monotonic() - call.started
            )

    # --- the listener -------------------------------------------------------------------

    def protocol(self) -> Downstream:
        return Downstream(self)

    def abandon(self, connection: ServerConnection) -> None:
        assert isinstance(connection, Downstream)
        for call in list(connection.calls.values()):
            call.finish(grpc.StatusCode.UNAVAILABLE, "the proxy is stopping")

    async def stop(self, grace: float) -> None:
        """GOAWAY every connection, let running calls finish for `grace` seconds, then end
        the rest UNAVAILABLE and close."""
        await super().stop(grace)
        await self.pool.close()
