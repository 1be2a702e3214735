"""The pipeline's shared-state steps: revocation and single use (see `state.py`).

Both run on every call at a token level, after the token verified (cached or not), so
the verified-token cache can never serve a revoked or reused token. Both fail closed:
when the state cannot be consulted the call is refused with STATE_UNAVAILABLE.
"""

from __future__ import annotations

import logging
import time

from .pipeline import StateCheck
from .policy import Rule
from .reasons import Denied, Reason
from .state import StateStore, StateUnavailable
from .verify import VerifiedToken

log = logging.getLogger("authproxy.state")


def revocation_check(store: StateStore) -> StateCheck:
    async def check(rule: Rule, verified: VerifiedToken) -> None:
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


def single_use_check(store: StateStore, clock=time.time) -> StateCheck:
    async def check(rule: Rule, verified: VerifiedToken) -> None:
        if not rule.single_use:
            return
        jti = verified.claims.get("jti")  # a non-empty string when present (claims layer)
        if jti is None:
            raise Denied(
                Reason.MISSING_CLAIM, "this method accepts each token once: it needs a 'jti'"
            )
        try:
            first = await store.first_use(jti, verified.exp)
        except StateUnavailable as e:
            raise Denied(Reason.STATE_UNAVAILABLE, str(e)) from None
        if first:
            return
        subject = verified.claims["sub"]
        if rule.revoke_on_reuse and not rule.shadow:  # shadow mode changes nothing
            try:
                await store.revoke_subject(subject, clock())
                log.warning("reuse of single-use token %s: revoked every token of its subject", jti)
            except StateUnavailable:
                log.error("reuse of single-use token %s: could not revoke its subject", jti)
        raise Denied(
            Reason.REFRESH_REUSED,
            "this token was already used"
            + (
                "; every session of its subject is revoked"
                if rule.revoke_on_reuse and not rule.shadow
                else ""
            ),
        )

    return check
