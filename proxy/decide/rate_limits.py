"""The pipeline's last step: per-rule rate limits (`rate_limit:` in the policy).

Counting is the `limits` library's moving window, in the state backend's storage (memory,
or Redis shared by every replica, where one Lua script does check-and-count atomically).
A call is counted only when it passed every other step (and every limit of its rule), so
refused calls do not use up a client's allowance. Over the limit -> RESOURCE_EXHAUSTED
(RATE_LIMITED) with the seconds until the window frees a slot. When the storage cannot be reached the rule's `fail_open`
decides; by default the call is refused (STATE_UNAVAILABLE).
"""

from __future__ import annotations

import hashlib
import logging
import time

from limits.aio.storage import Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError

from authproxy.decide.client_address import TrustedProxies
from authproxy.decide.pipeline import Headers
from authproxy.decide.reasons import Denied, Reason
from authproxy.keys.verify import VerifiedToken
from authproxy.policy.model import RateLimit, Rule

log = logging.getLogger("authproxy.ratelimit")

#: Key values longer than this are hashed, so a long claim cannot make a long storage key.
MAX_KEY_VALUE = 128


class RateLimiter:
    def __init__(self, storage: Storage, trusted: TrustedProxies | None = None) -> None:
        self.storage = storage
        self.strategy = MovingWindowRateLimiter(storage)
        self.trusted = trusted or TrustedProxies()
        self.failures_total = 0
        self._failing = False

    async def __call__(
        self, rule: Rule, peer: str | None, headers: Headers, verified: VerifiedToken | None
    ) -> None:
        """Count this call against each of the rule's limits; raise `Denied` when over one.

        With several limits, every one is tested before any is counted, so a call refused
        by one limit does not use up another's allowance (two concurrent calls may still
        both pass the test and then race for a last slot; the loser is refused and has
        counted against the limits before it)."""
        windows = [
            # The rule and the limit's place in it name the counter, so two rules (or two
            # limits of one rule) never share one; a reload keeps the counts.
            (
                limit,
                (
                    rule.pattern,
                    str(index),
                    limit.key,
                    self._key_value(limit, peer, headers, verified),
                ),
            )
            for index, limit in enumerate(rule.rate_limits)
        ]
        if len(windows) > 1:
            for limit, identifiers in windows:
                await self._count(limit, identifiers, self.strategy.test)
        for limit, identifiers in windows:
            await self._count(limit, identifiers, self.strategy.hit)

    async def _count(self, limit: RateLimit, identifiers: tuple[str, ...], step) -> None:
        """Run `step` (test or hit) on one window; raise `Denied` when it is full."""
        try:
            if await step(limit.item, *identifiers):
                self._recovered()
                return
            stats = await self.strategy.get_window_stats(limit.item, *identifiers)
        except (StorageError, OSError, TimeoutError) as e:
            self._failed(e)
            if limit.fail_open:
                return
            raise Denied(
                Reason.STATE_UNAVAILABLE, "the rate limit cannot be checked right now"
            ) from None
        retry_after = max(0.0, stats.reset_time - time.time())
        raise Denied(
            Reason.RATE_LIMITED,
            f"rate limit of {limit.item} per {_key_name(limit.key)} reached;"
            f" retry in {retry_after:.0f}s",
            retry_after=retry_after,
        )

    def _key_value(
        self, limit: RateLimit, peer: str | None, headers: Headers, verified: VerifiedToken | None
    ) -> str:
        if limit.key == "peer":
            return self.trusted.client(peer, headers)
        assert verified is not None  # the policy allows other keys on token levels only
        claim = "sub" if limit.key == "subject" else limit.key
        value = verified.claims.get(claim)
        if not isinstance(value, str | int) or isinstance(value, bool) or value == "":
            raise Denied(
                Reason.MISSING_CLAIM,
                f"this method is rate limited per '{claim}', and the token has no usable"
                f" '{claim}' claim",
            )
        text = str(value)
        if len(text) > MAX_KEY_VALUE:
            return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
        return text

    def _failed(self, error: Exception) -> None:
        self.failures_total += 1
        if not self._failing:  # once per outage; every failure is counted
            log.warning("rate limit storage unavailable: %s", error)
        self._failing = True

    def _recovered(self) -> None:
        if self._failing:
            log.info("rate limit storage reachable again")
            self._failing = False


def _key_name(key: str) -> str:
    return {"peer": "client address", "subject": "subject"}.get(key, f"'{key}'")
