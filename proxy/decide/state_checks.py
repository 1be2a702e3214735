"""The pipeline's shared-state steps: revocation and single use (see `state/store.py`).

Both run on every call at a token level, after the token verified (cached or not), so
the verified-token cache can never serve a revoked or reused token. Both fail closed:
when the state cannot be consulted the call is refused with STATE_UNAVAILABLE. A use is
recorded only by the pipeline's last step (`SingleUse.record`).

The revocation check reads the local view and never waits, so it is a plain function;
the single-use steps return None for rules without `single_use` and a coroutine (store
I/O) only for rules with it (the pipeline's `StateCheck` contract).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from authproxy.decide.pipeline import StateCheck
from authproxy.decide.reasons import Denied, Reason
from authproxy.keys.verify import VerifiedToken
from authproxy.policy.model import Rule
from authproxy.state.store import StateStore, StateUnavailable

log = logging.getLogger("authproxy.state")


def revocation_check(store: StateStore) -> StateCheck:
    def check(rule: Rule, verified: VerifiedToken) -> None:
        try:
            store.check_fresh()
        except StateUnavailable as e:
            raise Denied(Reason.STATE_UNAVAILABLE, str(e)) from None
        # The claims layer ran first: `jti`, when present, is a non-empty string and
        # `iat` a finite number.
        claims = verified.claims
        if store.revoked(claims.get("jti"), claims["sub"], claims.get("iat")):
            raise Denied(Reason.TOKEN_REVOKED, "this token has been revoked")

    return check


class SingleUse:
    """`single_use: true`: each token (`jti`) passes once. Two steps of the pipeline:

    `check` (a state check, before requirements and rate limits) refuses a token already
    used, so a replay is never counted against a rate limit; `record` (the last step, run
    only when every other step let the call through) spends the token atomically (`SET
    NX`): of concurrent first presentations exactly one wins. A call refused by a later
    step (rate limit, role, peer) leaves the token unspent for a retry.
    """

    def __init__(self, store: StateStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    def check(self, rule: Rule, verified: VerifiedToken) -> Awaitable[None] | None:
        """The state check: None for a rule without `single_use`, else the look-up."""
        return self._check(rule, verified) if rule.single_use else None

    def record(self, rule: Rule, verified: VerifiedToken) -> Awaitable[None] | None:
        """The recorder: None for a rule without `single_use`, else the atomic record."""
        return self._record(rule, verified) if rule.single_use else None

    async def _check(self, rule: Rule, verified: VerifiedToken) -> None:
        jti = _jti(verified)
        try:
            used = await self.store.used(jti)
        except StateUnavailable as e:
            raise Denied(Reason.STATE_UNAVAILABLE, str(e)) from None
        if used:
            await self._reused(rule, verified, jti)

    async def _record(self, rule: Rule, verified: VerifiedToken) -> None:
        jti = _jti(verified)
        try:
            first = await self.store.first_use(jti, verified.exp)
        except StateUnavailable as e:
            raise Denied(Reason.STATE_UNAVAILABLE, str(e)) from None
        if not first:  # a concurrent presentation won between check and record
            await self._reused(rule, verified, jti)

    async def _reused(self, rule: Rule, verified: VerifiedToken, jti: str) -> None:
        revoke = rule.revoke_on_reuse and not rule.shadow  # shadow mode changes nothing
        if revoke:
            try:
                await self.store.revoke_subject(verified.claims["sub"], self.clock())
                log.warning("reuse of single-use token %s: revoked every token of its subject", jti)
            except StateUnavailable:
                log.error("reuse of single-use token %s: could not revoke its subject", jti)
        raise Denied(
            Reason.REFRESH_REUSED,
            "this token was already used"
            + ("; every session of its subject is revoked" if revoke else ""),
        )


def _jti(verified: VerifiedToken) -> str:
    jti = verified.claims.get("jti")  # a non-empty string when present (claims layer)
    if jti is None:
        raise Denied(Reason.MISSING_CLAIM, "this method accepts each token once: it needs a 'jti'")
    return jti
