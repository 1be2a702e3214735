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

Ending a stream cancels the task that relays it; the front end turns that into the
status (see `sidecar.py`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from .decision import Decision
from .pipeline import Authorizer, Headers
from .policy import Policy
from .reasons import Reason
from .state import StateStore, StateUnavailable

log = logging.getLogger("authproxy.streams")

DEFAULT_INTERVAL = 0.25


class Watch:
    """One open stream: its call, its token, and why it was ended (if it was)."""

    __slots__ = ("ended", "headers", "iat", "jti", "method", "principal", "sub", "task", "timer")

    def __init__(
        self, method: str, headers: Headers, task: asyncio.Task, principal: str | None = None
    ) -> None:
        self.method = method
        self.headers = headers
        self.task = task
        #: The client certificate's identity, for re-judging `peers:` after a reload.
        self.principal = principal
        #: The token's revocation keys; `sub` is None when the stream is not held to its
        #: token (public rules, `end_streams: false`).
        self.jti: str | None = None
        self.sub: str | None = None
        self.iat: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        #: (reason, message, the refusing decision of a new policy or None) once the guard
        #: has ended the stream.
        self.ended: tuple[Reason, str, Decision | None] | None = None


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
        self.ended_total: dict[Reason, int] = {}
        self._watches: set[Watch] = set()
        self._ticker: asyncio.Task[None] | None = None
        store.view.listeners.append(self._revocations_changed)

    def __len__(self) -> int:
        return len(self._watches)

    def watch(self, decision: Decision, method: str, headers: Headers) -> Watch:
        """Start watching the stream the current task relays (until `release`)."""
        task = asyncio.current_task()
        watch = Watch(method, headers, task, decision.principal)  # type: ignore[arg-type]
        self._watches.add(watch)
        identity = decision.identity
        if identity is None or not decision.rule.end_streams:
            return watch  # followed for policy changes only
        claims = identity.claims
        watch.jti, watch.sub, watch.iat = identity.jti, identity.subject, claims.get("iat")
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
        if watch.timer is not None:
            watch.timer.cancel()

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
        """End one stream; `by`: the new policy's decision that refuses it (if any)."""
        if watch.ended is not None or watch not in self._watches:
            return
        watch.ended = (reason, message, by)
        self.release(watch)
        self.ended_total[reason] = self.ended_total.get(reason, 0) + 1
        watch.task.cancel()

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
