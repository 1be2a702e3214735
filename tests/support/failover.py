"""Watching shared state and proxies through a Redis failover (Sentinel or Cluster): when
checks failed closed and came back, and that a revoked token never passed meanwhile.

- `Watch` polls `RedisState`s every 10 ms;
- `revoke_and_spend` records a revocation and a use through two proxies,
  `calls_through_failover` makes calls through a proxy until they pass again, and
  `assert_kept` checks afterwards that both proxies still enforce what was recorded.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field

from authproxy.keys.issuer import TokenIssuer
from authproxy.state.redis_store import RedisState
from tests.support.admin import admin, revocations_url
from tests.support.redis_server import stale
from tests.support.running_proxy import OK, REUSED, REVOKED, STATE_DOWN, RunningProxy
from tests.support.waits import poll

ACCESS = "/test.Access/Echo"
REFRESH = "/test.Refresh/Echo"


class Watch:
    """Polls states every 10 ms during a failover: when each went stale and fresh again,
    and every moment a state called itself current but let a revoked token or subject
    through (never allowed)."""

    def __init__(self, states: dict[str, RedisState], jti: str, sub: str, iat: float) -> None:
        self.states = states
        self.jti, self.sub, self.iat = jti, sub, iat
        self.first_stale: dict[str, float] = {}
        self.fresh_again: dict[str, float] = {}
        self.violations: list[str] = []
        self.samples = 0

    async def run(self, until: float) -> None:
        while time.monotonic() < until and len(self.fresh_again) < len(self.states):
            now = time.monotonic()
            self.samples += 1
            for name, state in self.states.items():
                if stale(state):
                    self.first_stale.setdefault(name, now)
                    continue
                if name in self.first_stale:
                    self.fresh_again.setdefault(name, now)
                if not state.revoked(self.jti, "someone", None):
                    self.violations.append(f"{name}: current, yet token {self.jti} not revoked")
                if not state.revoked("another-jti", self.sub, self.iat):
                    self.violations.append(f"{name}: current, yet subject {self.sub} not revoked")
            await asyncio.sleep(0.01)

    def windows(self) -> dict[str, float]:
        return {n: self.fresh_again[n] - self.first_stale[n] for n in self.fresh_again}


@dataclass
class CallsDuringFailover:
    """What calls through a proxy saw from a crash (`killed_at`) on."""

    killed_at: float
    seen: Counter[tuple] = field(default_factory=Counter)
    let_through: list[float] = field(default_factory=list)
    first_down: float | None = None
    first_ok_again: float | None = None

    @property
    def window(self) -> float:
        assert self.first_down is not None and self.first_ok_again is not None, dict(self.seen)
        return self.first_ok_again - self.first_down

    def describe(self) -> str:
        return (
            f"calls STATE_UNAVAILABLE from {self.first_down - self.killed_at:.2f} s to"
            f" {self.first_ok_again - self.killed_at:.2f} s after SIGKILL (window"
            f" {self.window:.2f} s); outcomes {dict(self.seen)}"
        )


async def calls_through_failover(
    node: RunningProxy,
    good: str,
    revoked: str,
    killed_at: float,
    failing_over: Awaitable[object],
    bound: float,
) -> CallsDuringFailover:
    """Call ACCESS through `node` with `good` (and `revoked`, which must never pass) every
    20 ms from the crash until the calls fail closed and then pass again (at most
    `2 * bound` s); awaits `failing_over` too. Asserts that only OK and STATE_UNAVAILABLE
    were seen, that calls failed closed, passed again, and that the revoked token never
    passed."""
    calls = CallsDuringFailover(killed_at)
    waiting = asyncio.ensure_future(failing_over)
    try:
        while time.monotonic() - killed_at < 2 * bound:
            now = time.monotonic()
            outcome = await node.call(ACCESS, good)
            calls.seen[outcome] += 1
            if outcome == STATE_DOWN and calls.first_down is None:
                calls.first_down = now
            elif outcome == OK and calls.first_down is not None:
                calls.first_ok_again = now
                break
            if await node.call(ACCESS, revoked) == OK:
                calls.let_through.append(now - killed_at)
            await asyncio.sleep(0.02)
        await waiting
    finally:
        waiting.cancel()
    assert calls.let_through == [], f"the revoked token passed at {calls.let_through} s"
    assert calls.first_down is not None, f"calls never failed closed: {dict(calls.seen)}"
    assert calls.first_ok_again is not None, f"calls never passed again: {dict(calls.seen)}"
    assert set(calls.seen) <= {OK, STATE_DOWN}, dict(calls.seen)
    assert calls.window < bound
    return calls


@dataclass(frozen=True)
class Recorded:
    """Tokens of a failover test: `good` passes, `revoked` was revoked through one proxy,
    `refresh` was spent (single use) through the other."""

    good: str
    revoked: str
    refresh: str


async def revoke(through: RunningProxy, token, others: list[RunningProxy]) -> None:
    """Revoke `token` (a minted token) with `through`'s admin API; wait (bounded) until
    each of `others` refuses it."""
    status, _, body = await admin(
        revocations_url(through), body={"jti": token.jti, "exp": token.exp}
    )
    assert status == 201, body
    for node in others:
        result, _ = await poll(lambda n=node: n.call(ACCESS, token.token), lambda r: r != OK, 3.0)
        assert result == REVOKED


async def revoke_and_spend(a: RunningProxy, b: RunningProxy, issuer: TokenIssuer) -> Recorded:
    """Through `a` revoke a token (then `b` refuses it); through `b` spend a refresh token
    (a policy with a single-use REFRESH rule)."""
    good = issuer.mint("access", "erin", ttl=300)
    revoked = issuer.mint("access", "ivan", ttl=300)
    refresh = issuer.mint("refresh", "frank", ttl=300)
    await revoke(a, revoked, [b])
    assert await b.call(REFRESH, refresh.token) == OK  # its one use
    assert await a.call(ACCESS, good.token) == OK
    return Recorded(good.token, revoked.token, refresh.token)


async def assert_kept(
    a: RunningProxy, b: RunningProxy, issuer: TokenIssuer, recorded: Recorded
) -> None:
    """After a failover: `a` passes calls again, both refuse the revoked token, the spent
    refresh token stays spent, and a revocation through `b` reaches `a`."""
    result, _ = await poll(lambda: a.call(ACCESS, recorded.good), lambda r: r == OK, 10.0)
    assert result == OK
    for node in (a, b):
        assert await node.call(ACCESS, recorded.revoked) == REVOKED
    assert await a.call(REFRESH, recorded.refresh) == REUSED
    await revoke(b, issuer.mint("access", "judy", ttl=300), [a])
