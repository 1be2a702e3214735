"""A call whose rule checks request fields (`request:`, `decide/request_fields.py`): its
request messages are held until each is whole and holds the fields, then passed on; the
backend stream opens only once the first message passed, so a refused call never
reaches the backend. A message that does not hold ends the call PERMISSION_DENIED (the
backend stream is cancelled); under a shadow rule the deny is reported and the call goes
on unchecked.

Flow control: bytes of a message not yet whole are acknowledged at once (at most one
message, which the size limit bounds, so a message larger than the stream window cannot
stall); passed-on bytes are acknowledged once the backend took them, as for any call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from authproxy.decide.reasons import Denied, Reason
from authproxy.wire.grpc_protocol import MessageReader

if TYPE_CHECKING:
    from authproxy.decide.decision import Decision
    from authproxy.decide.request_fields import FieldCheck
    from authproxy.sidecar.call import Call


class RequestInspection:
    __slots__ = ("call", "decision", "encoding", "fields", "reader", "waiting")

    def __init__(self, call: Call, fields: FieldCheck, decision: Decision) -> None:
        self.call = call
        self.fields: FieldCheck | None = fields
        self.decision = decision
        self.reader = MessageReader()
        self.waiting = True  # for the first message that passes
        #: How compressed messages are compressed (`grpc-encoding`), for the whole call.
        self.encoding = next((v for k, v in call.upstream_headers if k == b"grpc-encoding"), None)

    def feed(self, data: bytes, end_stream: bool) -> None:
        """Pass on the whole messages `data` completes once each holds the fields; keep a
        partial one."""
        call, reader, fields = self.call, self.reader, self.fields
        if fields is None:  # shadow mode reported a deny: the rest goes on unchecked
            call.request_unacked += len(data)
            self.pass_on(data, end_stream)
            return
        before = reader.held
        messages, passed = reader.feed(data)
        if passed:  # it starts with the bytes held before, acknowledged already
            call.request_unacked += len(passed) - before
            call.down.acknowledge(reader.held, call.sid)
        else:
            call.down.acknowledge(len(data), call.sid)
        problem = None
        for compressed, payload in messages:
            try:
                fields.check(compressed, payload, self.encoding, call.request_sizes.limit)
            except Denied as denied:
                problem = denied
                break
        if problem is None and end_stream and reader.held:
            problem = Denied(Reason.FIELD_MISMATCH, "the request ends inside a message")
        if problem is not None:
            if not refused_late(call, self.decision, problem):
                return
            passed += reader.take_held()
            self.fields = None
        if passed or end_stream:
            self.pass_on(passed, end_stream)

    def pass_on(self, data: bytes, end_stream: bool) -> None:
        """Checked request bytes: the first open the backend stream."""
        call = self.call
        if self.waiting:
            self.waiting = False
            call.pending = [(data, end_stream)]
            call.relay.pool.open(call)
        elif call.pending is not None:
            call.pending.append((data, end_stream))
        else:
            call.to_backend(data, end_stream)


def refused_late(call: Call, decision: Decision, denied: Denied) -> bool:
    """Refuse `call` for `denied`, after its headers were let through; True when a shadow
    rule lets it go on instead."""
    late = call.relay.authorizer.refuse_later(decision, denied)
    if late.allowed:
        return True
    call.cancel_backend()
    call.relay.refuse(call, late)
    return False
