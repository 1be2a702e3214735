"""One gRPC call through the frame relay: a client stream paired with a backend stream.

The call is decided on its request HEADERS (`Authorizer.decide_now`, in the batch of
frames that brought them: only a decision that really waits — a key fetch, Redis —
continues in a task). A deny is a
trailers-only response. An allowed call opens a stream on the backend with the rewritten
headers and relays DATA, response headers and trailers as they come, frame by frame:
messages are never parsed, only their 5-byte prefixes are followed for the size limit.

Backpressure: bytes received on one side are acknowledged (WINDOW_UPDATE) only once the
other side's engine has sent them on, so a slow reader holds at most the stream window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from time import monotonic
from typing import TYPE_CHECKING

import grpc

from authproxy.decide.reasons import Denied
from authproxy.decide.request_fields import field_check
from authproxy.sidecar.catalog import Kind
from authproxy.sidecar.request_inspection import RequestInspection, refused_late
from authproxy.wire.grpc_protocol import (
    MessageSizes,
    decode_message,
    format_timeout,
    status_headers,
)
from authproxy.wire.h2_engine import EngineError, ErrorCode, Header
from authproxy.wire.h2_server import send_status

if TYPE_CHECKING:
    from authproxy.decide.decision import Decision
    from authproxy.runtime.tracing import RelaySpan
    from authproxy.sidecar.relay import Downstream, Relay
    from authproxy.sidecar.stream_guard import Watch
    from authproxy.sidecar.upstream_pool import UpstreamConnection

log = logging.getLogger("authproxy.sidecar")

#: Response headers that belong to one hop only.
_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"upgrade"})
_CANCEL = ErrorCode.CANCEL


class Call:
    __slots__ = (
        "deadline",
        "down",
        "ended",
        "headers",
        "inspection",
        "method",
        "pending",
        "relay",
        "replied",
        "request_done",
        "request_sizes",
        "request_unacked",
        "response_sizes",
        "response_unacked",
        "sid",
        "started",
        "timer",
        "trace",
        "up",
        "upstream_headers",
        "upstream_stream",
        "watch",
    )

    def __init__(
        self, relay: Relay, down: Downstream, sid: int, method: str, deadline: float | None
    ) -> None:
        self.relay = relay
        self.down = down
        self.sid = sid
        self.method = method
        self.deadline = deadline
        self.started = monotonic()
        self.up: UpstreamConnection | None = None
        self.upstream_stream = 0
        self.upstream_headers: list[Header] = []
        self.pending: list[tuple[bytes, bool]] | None = []  # request data before the stream
        self.request_unacked = 0
        self.response_unacked = 0
        self.request_sizes = MessageSizes(relay.max_message_bytes)
        self.response_sizes = MessageSizes(relay.max_message_bytes)
        self.request_done = False
        self.replied = False  # response headers sent to the client
        self.ended = False  # the client's stream is finished (by either side)
        self.watch: Watch | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.headers: tuple = ()
        #: Set when the rule checks request fields: each message is held until checked.
        self.inspection: RequestInspection | None = None
        self.trace: RelaySpan | None = None  # with tracing on, once relayed

    # --- the decision -----------------------------------------------------------------

    def decided(self, decision: Decision, request_headers: tuple[Header, ...]) -> None:
        if self.ended:
            return
        if not decision.allowed:
            self.relay.refuse(self, decision)
            return
        relay = self.relay
        try:
            rewritten = relay.rewrite(request_headers, decision)
        except ValueError as e:  # InvalidMetadata
            self.finish(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            return
        pool = relay.pool
        headers = [
            (b":method", b"POST"),
            (b":scheme", pool.scheme),
            (b":path", self.method.encode()),
            (b":authority", pool.authority),
        ]
        if self.deadline is not None:
            remaining = self.deadline - monotonic()
            if remaining <= 0:
                self.finish(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
                return
            headers.append((b"grpc-timeout", format_timeout(remaining)))
        headers.extend(rewritten)
        if relay.tracing is not None:  # the backend's traceparent is the relay span's
            self.trace = relay.tracing.relay(self.headers, headers, self.method)
        self.upstream_headers = headers
        try:  # rules without `request:` (almost every call) skip this step
            fields = None if decision.rule.request is None else field_check(decision, relay.types)
        except Denied as denied:
            if not refused_late(self, decision, denied):
                return
            fields = None
        if relay.guard is not None and relay.kinds.get(self.method) is not Kind.UNARY:
            self.watch = relay.guard.watch(decision, self.method, self.headers, self.guard_ended)
            if self.request_done:
                self.watch.requests_done()
        if fields is None:
            pool.open(self)
            return
        # The backend stream opens once the first message passed; what came before the
        # decision is read again, message by message.
        self.inspection = RequestInspection(self, fields, decision)
        received, self.pending = self.pending or [], []
        for data, end in received:
            self.request_unacked -= len(data)
            self.inspection.feed(data, end)

    # --- UpstreamCall: the pool and the backend stream ----------------------------------

    def request_headers(self) -> list[Header]:
        return self.upstream_headers

    def opened(self, connection: UpstreamConnection, stream_id: int) -> None:
        self.up = connection
        self.upstream_stream = stream_id
        pending, self.pending = self.pending, None
        for data, end in pending or ():
            self.to_backend(data, end)

    def failed(self, message: str) -> None:
        self.relay.pool.errors_total += 1
        self.finish(grpc.StatusCode.UNAVAILABLE, message)

    def response(self, headers: tuple[Header, ...], end_stream: bool) -> None:
        if self.ended:
            return
        out = [h for h in headers if h[0] not in _HOP]
        if end_stream:
            out = self._status_of_backend(out)
        try:
            self.down.connection.send_response(self.sid, out, end_stream=end_stream)
        except EngineError:
            self._client_gone()
            return
        self.replied = True
        if end_stream:
            self._ended()
        self.relay.dirty.add(self.down)

    def data(self, data: bytes, end_stream: bool) -> None:
        if self.ended:
            self.up.acknowledge(len(data), self.upstream_stream)  # type: ignore[union-attr]
            return
        sizes = self.response_sizes
        before = sizes.messages
        too_big = sizes.feed(data)
        if too_big is not None:
            self.cancel_backend()
            self.finish(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"response message larger than max ({too_big} vs. {sizes.limit})",
            )
            self.up.acknowledge(len(data), self.upstream_stream)  # type: ignore[union-attr]
            return
        watch = self.watch
        if watch is not None:
            for _ in range(sizes.messages - before):  # each message this chunk starts
                if not watch.may_respond():
                    self.up.acknowledge(len(data), self.upstream_stream)  # type: ignore[union-attr]
                    self.guard_ended()
                    return
                watch.responded()
        try:
            self.down.connection.send_data(self.sid, data, end_stream=end_stream)
        except EngineError:
            self.up.acknowledge(len(data), self.upstream_stream)  # type: ignore[union-attr]
            self._client_gone()
            return
        self.response_unacked += len(data)
        self.down.backlog[self.sid] = self._downstream_taken
        self.relay.dirty.add(self.down)
        if end_stream:
            self._ended()

    def trailers(self, headers: tuple[Header, ...]) -> None:
        if self.ended:
            return
        out = self._status_of_backend([h for h in headers if h[0] not in _HOP])
        try:
            self.down.connection.send_trailers(self.sid, out)
        except EngineError:
            self._client_gone()
            return
        self._ended()
        self.relay.dirty.add(self.down)

    def _status_of_backend(self, headers: list[Header]) -> list[Header]:
        """CANCELLED from the backend becomes UNAVAILABLE: the client did not cancel (that
        resets the stream), so the backend's side did — grpc core drops calls a busy
        server queued too long or holds when it stops. Clients retry UNAVAILABLE."""
        if self.trace is not None:
            self.trace.backend_ended(headers)
        if (b"grpc-status", b"1") not in headers:
            return headers
        self.relay.pool.errors_total += 1
        message = next((decode_message(v) for k, v in headers if k == b"grpc-message"), "")
        rest = [h for h in headers if h[0] not in (b"grpc-status", b"grpc-message")]
        target = self.relay.pool.target
        return rest + status_headers(
            grpc.StatusCode.UNAVAILABLE,
            f"upstream {target} cancelled the call (overloaded or stopping): {message}",
        )

    def reset(self, error_code: int) -> None:
        self.relay.pool.errors_total += 1
        what = "refused" if error_code == ErrorCode.REFUSED_STREAM else "reset"
        self.finish(
            grpc.StatusCode.UNAVAILABLE,
            f"upstream {self.relay.pool.target} {what} the stream (HTTP/2 error {error_code})",
        )

    def closed(self) -> None:
        """The backend stream is closed: give back what it had not acknowledged."""
        up = self.up
        if up is not None and self.response_unacked:
            up.acknowledge(self.response_unacked, self.upstream_stream)
            self.response_unacked = 0
        if not self.ended:
            self.reset(0)

    def _upstream_taken(self) -> None:
        """The backend engine sent our request data on: the client may send more."""
        if self.request_unacked:
            self.down.acknowledge(self.request_unacked, self.sid)
            self.request_unacked = 0

    def _downstream_taken(self) -> None:
        """The client's engine sent the response data on: the backend may send more."""
        if self.response_unacked and self.up is not None:
            self.up.acknowledge(self.response_unacked, self.upstream_stream)
            self.response_unacked = 0

    # --- the client's stream ------------------------------------------------------------

    def client_data(self, data: bytes, end_stream: bool) -> None:
        if self.ended:
            self.down.acknowledge(len(data), self.sid)
            return
        too_big = self.request_sizes.feed(data)
        if too_big is not None:
            self.down.acknowledge(len(data), self.sid)
            self.cancel_backend()
            self.finish(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request message larger than max ({too_big} vs. {self.request_sizes.limit})",
            )
            return
        if end_stream:
            self.request_done = True
            if self.watch is not None:
                self.watch.requests_done()
        if self.inspection is not None:
            self.inspection.feed(data, end_stream)
            return
        self.request_unacked += len(data)
        if self.pending is not None:
            self.pending.append((data, end_stream))
        else:
            self.to_backend(data, end_stream)

    def client_reset(self) -> None:
        """The client cancelled (RST_STREAM) or went away."""
        self.cancel_backend()
        self.ended = True
        self.cleanup()

    def to_backend(self, data: bytes, end_stream: bool) -> None:
        up = self.up
        assert up is not None
        try:
            if data:
                up.connection.send_data(self.upstream_stream, data, end_stream=end_stream)
            elif end_stream:
                up.connection.end_stream(self.upstream_stream)
        except EngineError:
            return  # the backend stream is gone; its reset or close says why
        up.backlog[self.upstream_stream] = self._upstream_taken
        self.relay.dirty.add(up)

    # --- ending -------------------------------------------------------------------------

    def finish(self, code: grpc.StatusCode, message: str, extra=()) -> None:
        """End the client's stream with a status (trailers-only before any response)."""
        if self.ended:
            return
        if self.trace is not None:
            self.trace.proxy_ended(code)
        send_status(self.down.connection, self.sid, self.replied, code, message, extra)
        self._ended()
        self.relay.dirty.add(self.down)
        self.cancel_backend()

    def expired(self) -> None:
        self.timer = None
        self.finish(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        self.relay.flush()

    def guard_ended(self) -> None:
        """The stream guard ended this stream (token expired or revoked, policy changed)."""
        watch = self.watch
        assert watch is not None and watch.ended is not None
        reason, message, by = watch.ended
        decision = watch.decision
        ending = (by or decision)._replace(
            allowed=False, reason=reason, message=message, shadow=False
        )
        self.cancel_backend()
        self.relay.refuse(self, ending)
        self.relay.flush()

    def cancel_backend(self) -> None:
        up = self.up
        if up is not None and self.upstream_stream in up.calls:
            with contextlib.suppress(EngineError):
                up.connection.reset_stream(self.upstream_stream, _CANCEL)
            self.relay.dirty.add(up)
        elif self.up is None:
            self.relay.pool.withdraw(self)

    def _client_gone(self) -> None:
        self.cancel_backend()
        self._ended()

    def _ended(self) -> None:
        self.ended = True
        if self.watch is not None:
            self.relay.guard.release(self.watch)  # type: ignore[union-attr]
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def cleanup(self) -> None:
        """The client's stream is closed: give back what it had not acknowledged."""
        self._ended()
        if self.request_unacked:
            self.down.acknowledge(self.request_unacked, self.sid)
            self.request_unacked = 0
        if self.pending:
            self.pending = None
