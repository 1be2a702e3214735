"""Open streams keep their token's limits and the policy's: they end when the token
expires or is revoked, or when a new policy version would refuse them.

Every stream is watched until it finishes. One authorized with a token (rule option
`end_streams`, on by default) is held to that token:

* expiry — a timer at the token's `exp` plus the policy's leeway (the moment a new call
  with that token would be refused) ends it with UNAUTHENTICATED / TOKEN_EXPIRED;
* revocation — every change of the state's revocation view (a local admin call, or one
  published through Redis) re-checks the open streams, ending revoked ones with
  UNAUTHENTICATED / TOKEN_REVOKED; so a revocation reaches open streams within the same
  bound as new calls (`--state-staleness`);
* stale state — while streams are open the view's freshness is checked every
  `interval`; when revocations can no longer be known (Redis unreachable for longer than
  the staleness bound), open streams end with UNAVAILABLE / STATE_UNAVAILABLE, as new
  calls are refused: nothing stays allowed because state was unreachable.

And every stream, token or not, follows the policy:

* a policy reload — every open stream (token or not) is judged again by the new version
  (rule, token, requirements; nothing is recorded); one it would refuse ends with
  PERMISSION_DENIED / POLICY_CHANGED (`--no-reload-ends-streams` keeps them).

A call whose request is complete and whose answer has not started yet gets a short
grace, `ANSWER_GRACE`: a unary call the proxy relays as a stream because the backend's
reflection did not tell its kind (a logout that revokes its own token is the common
case) still receives its answer, as a unary call would. Within the grace the answer's
first message and its trailers pass; a second message is never relayed, and the ending
applies when the grace is over. So after an ending at most the one answer to an already
accepted request reaches the client, and only if it comes at once.

Ending a stream calls its watch's `on_end` (the relay ends the client's stream with the
status; see `sidecar/call.py`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from authproxy.decide.decision import Decision
from authproxy.decide.pipeline import Authorizer, Headers
from authproxy.decide.reasons import Reason
from authproxy.policy.model import Policy
from authproxy.state.store import StateStore, StateUnavailable

log = logging.getLogger("authproxy.streams")

DEFAULT_INTERVAL = 0.25
#: How long a call awaiting its answer may still receive it (one message and trailers)
#: once its stream is ended (see the module doc).
ANSWER_GRACE = 2.0

#: Why and by what a stream was ended: (reason, message, the refusing decision of a new
#: policy or None).
Ending = tuple[Reason, str, Decision | None]


class Watch:
    """One open stream: its call, its token, and why it was ended (if it was)."""

    __slots__ = (
        "_guard",
        "decision",
        "deferred",
        "ended",
        "grace",
        "headers",
        "iat",
        "jti",
        "method",
        "on_end",
        "principal",
        "requests_ended",
        "responses",
        "sub",
        "timer",
    )

    def __init__(
        self,
        guard: StreamGuard,
        decision: Decision,
        method: str,
        headers: Headers,
        on_end: Callable[[], object],
        principal: str | None = None,
    ) -> None:
        self._guard = guard
        self.decision = decision
        self.method = method
        self.headers = headers
        #: Ends the relay of the stream (the front end turns `ended` into the status).
        self.on_end = on_end
        #: The client certificate's identity, for re-judging `peers:` after a reload.
        self.principal = principal
        #: The token's revocation keys; `sub` is None when the stream is not held to its
        #: token (public rules, `end_streams: false`).
        self.jti: str | None = None
        self.sub: str | None = None
        self.iat: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        #: Set once the guard has ended the stream.
        self.ended: Ending | None = None
        #: An ending held back while the call awaits its answer (see the module doc).
        self.deferred: Ending | None = None
        self.grace: asyncio.TimerHandle | None = None
        self.requests_ended = False
        self.responses = 0

    def awaiting_answer(self) -> bool:
        return self.requests_ended and self.responses == 0

    # What the relay (`relay_call.Call`) tells of where the call is.
    def requests_done(self) -> None:
        self.requests_ended = True

    def may_respond(self) -> bool:
        if self.deferred is not None and self.responses > 0:
            self._guard.finish(self, *self.deferred, cancel=False)
            return False
        return True

    def responded(self) -> None:
        self.responses += 1


class StreamGuard:
    def __init__(
        self,
        store: StateStore,
        authorizer: Authorizer,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.time,
        reload_ends_streams: bool = True,
    ) -> None:
        self.store = store
        self.authorizer = authorizer
        self.interval = interval
        self.clock = clock
        self.reload_ends_streams = reload_ends_streams
        #: See `ANSWER_GRACE`.
        self.answer_grace = ANSWER_GRACE
        self.ended_total: dict[Reason, int] = {}
        self._watches: set[Watch] = set()
        self._ticker: asyncio.Task[None] | None = None
        store.view.listeners.append(self._revocations_changed)

    def __len__(self) -> int:
        return len(self._watches)

    def watch(
        self,
        decision: Decision,
        method: str,
        headers: Headers,
        on_end: Callable[[], object] | None = None,
    ) -> Watch:
        """Start watching a stream (until `release`); `on_end` stops its relay (default:
        cancel the current task)."""
        if on_end is None:
            on_end = asyncio.current_task().cancel  # type: ignore[union-attr]
        watch = Watch(self, decision, method, headers, on_end, decision.principal)
        self._watches.add(watch)
        identity = decision.identity
        if identity is None or not decision.rule.end_streams:
            return watch  # followed for policy changes only
        claims = identity.claims
        # Revocation is by the token's `sub` (the mapped subject may be another claim).
        watch.jti, watch.sub, watch.iat = identity.jti, claims["sub"], claims.get("iat")
        loop = asyncio.get_running_loop()
        leeway = self.authorizer.policy.leeway
        delay = max(0.0, claims["exp"] + leeway - self.clock())
        watch.timer = loop.call_later(
            delay, self._end, watch, Reason.TOKEN_EXPIRED, "the token expired during the stream"
        )
        if self._ticker is None or self._ticker.done():
            self._ticker = loop.create_task(self._tick())
        return watch

    def release(self, watch: Watch) -> None:
        """The stream finished: stop watching it."""
        self._watches.discard(watch)
        for timer in (watch.timer, watch.grace):
            if timer is not None:
                timer.cancel()

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        if self._revocations_changed in self.store.view.listeners:
            self.store.view.listeners.remove(self._revocations_changed)

    async def policy_changed(self, old: Policy, new: Policy) -> None:
        """A new policy version is in place: end the open streams it would refuse."""
        if not self.reload_ends_streams:
            return
        for watch in list(self._watches):
            decision = await self.authorizer.recheck(watch.method, watch.headers, watch.principal)
            if not decision.allowed:
                self._end(
                    watch,
                    Reason.POLICY_CHANGED,
                    f"policy version {new.version} refuses this stream:"
                    f" {decision.reason}: {decision.message}",
                    decision,
                )

    def _end(self, watch: Watch, reason: Reason, message: str, by: Decision | None = None) -> None:
        """End one stream, or defer the ending while it awaits its answer; `by`: the new
        policy's decision that refuses it (if any)."""
        if watch.ended is not None or watch not in self._watches:
            return
        if watch.awaiting_answer():
            if watch.deferred is None:
                watch.deferred = (reason, message, by)
                watch.grace = asyncio.get_running_loop().call_later(
                    self.answer_grace, self.finish, watch, reason, message, by
                )
            return
        self.finish(watch, reason, message, by)

    def finish(
        self,
        watch: Watch,
        reason: Reason,
        message: str,
        by: Decision | None = None,
        cancel: bool = True,
    ) -> None:
        """End one stream now; `cancel=False` when its relay stops by itself."""
        if watch.ended is not None or watch not in self._watches:
            return
        watch.ended = (reason, message, by)
        self.release(watch)
        self.ended_total[reason] = self.ended_total.get(reason, 0) + 1
        if cancel:
            watch.on_end()

    def _revocations_changed(self) -> None:
        for watch in list(self._watches):
            if watch.sub is not None and self.store.revoked(watch.jti, watch.sub, watch.iat):
                self._end(watch, Reason.TOKEN_REVOKED, "the token was revoked during the stream")

    async def _tick(self) -> None:
        """While streams held to their tokens are open: end them once the revocation view
        is stale."""
        while any(watch.sub is not None for watch in self._watches):
            await asyncio.sleep(self.interval)
            try:
                self.store.check_fresh()
            except StateUnavailable as e:
                held = [watch for watch in self._watches if watch.sub is not None]
                log.warning("ending %d open streams: %s", len(held), e)
                for watch in held:
                    self._end(watch, Reason.STATE_UNAVAILABLE, str(e))
