"""Open streams keep their token's limits: they end when the token expires or is revoked.

A stream authorized with a token (rule option `end_streams`, on by default) is watched
until it finishes:

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

Ending a stream cancels the task that relays it; the front end turns that into the
status (see `sidecar.py`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from .decision import Decision
from .reasons import Reason
from .state import StateStore, StateUnavailable

log = logging.getLogger("authproxy.streams")

DEFAULT_INTERVAL = 0.25


class Watch:
    """One open stream: what identifies its token, and why it was ended (if it was)."""

    __slots__ = ("ended", "iat", "jti", "sub", "task", "timer")

    def __init__(self, jti: str | None, sub: str, iat: float | None, task: asyncio.Task) -> None:
        self.jti = jti
        self.sub = sub
        self.iat = iat
        self.task = task
        self.timer: asyncio.TimerHandle | None = None
        #: (reason, message) once the guard has ended the stream.
        self.ended: tuple[Reason, str] | None = None


class StreamGuard:
    def __init__(
        self,
        store: StateStore,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.interval = interval
        self.clock = clock
        self.ended_total: dict[Reason, int] = {}
        self._watches: set[Watch] = set()
        self._ticker: asyncio.Task[None] | None = None
        store.view.listeners.append(self._revocations_changed)

    def __len__(self) -> int:
        return len(self._watches)

    def watch(self, decision: Decision, leeway: float) -> Watch | None:
        """Start watching the stream the current task relays; None when its rule does not
        end streams or no token was verified (public rules)."""
        identity = decision.identity
        if identity is None or not decision.rule.end_streams:
            return None
        claims = identity.claims
        watch = Watch(identity.jti, identity.subject, claims.get("iat"), asyncio.current_task())
        loop = asyncio.get_running_loop()
        delay = max(0.0, claims["exp"] + leeway - self.clock())
        watch.timer = loop.call_later(
            delay, self._end, watch, Reason.TOKEN_EXPIRED, "the token expired during the stream"
        )
        self._watches.add(watch)
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

    def _end(self, watch: Watch, reason: Reason, message: str) -> None:
        if watch.ended is not None or watch not in self._watches:
            return
        watch.ended = (reason, message)
        self.release(watch)
        self.ended_total[reason] = self.ended_total.get(reason, 0) + 1
        watch.task.cancel()

    def _revocations_changed(self) -> None:
        for watch in list(self._watches):
            if self.store.revoked(watch.jti, watch.sub, watch.iat):
                self._end(watch, Reason.TOKEN_REVOKED, "the token was revoked during the stream")

    async def _tick(self) -> None:
        """While streams are open: end them all once the revocation view is stale."""
        while self._watches:
            await asyncio.sleep(self.interval)
            try:
                self.store.check_fresh()
            except StateUnavailable as e:
                log.warning("ending %d open streams: %s", len(self._watches), e)
                for watch in list(self._watches):
                    self._end(watch, Reason.STATE_UNAVAILABLE, str(e))
