"""The issuer's memory of its sessions: refresh rotation, logouts and 2FA attempts.

The proxy checks that a token is genuine and of the right type; whether a genuine refresh
token may still be exchanged is the issuer's business, decided here:

* Rotation: every refresh token is single use. Presenting one a second time means two
  parties hold it, so the reuse is refused and every session of that user is ended.
* Logout everywhere (and a password change) ends every refresh token issued before it.
  `iat` has one-second resolution, so for tokens minted in the logout's own second the
  ledger remembers which ones came after the logout — unless the logout gives the whole
  second from which new tokens are minted (`Tokens.revoking`), which is then exact.
* Logout of one session ends that session's refresh tokens (the `sid` claim).
* A 2FA token allows a few wrong codes, and is spent once a code is accepted.

Access tokens are not revoked here: the backend never sees them before the proxy does.
With `--proxy-admin` the auth service has the proxy revoke them (see `revocations.py`)
before it updates this ledger; without it they stay valid until they expire (an hour by
default).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from authproxy.keys.issuer import MintedToken

#: Wrong codes one 2FA token may carry before it is spent.
MAX_2FA_FAILURES = 5
_PRUNE_EVERY = 256
#: Entries are kept this long past their token's `exp` (the proxy allows clock leeway).
_GRACE = 300.0

ALREADY_USED = "refresh token already used"
LOGGED_OUT = "refresh token was revoked by a logout"
SESSION_ENDED = "this session has been logged out"
MISSING_JTI = "refresh token has no 'jti' claim"
MISSING_IAT = "refresh token has no 'iat' claim"


@dataclass(slots=True)
class _TwoFactorToken:
    exp: float
    failures: int = 0
    spent: bool = False


@dataclass(slots=True)
class _Cutoff:
    """Refresh tokens of a subject issued before `at` are revoked."""

    at: float
    #: `at` is a whole second no token of the subject is minted before from the logout
    #: on: `iat` < `at` is the whole rule.
    exact: bool = False
    #: jtis of refresh tokens minted after the logout, within its second.
    minted_after: set[str] = field(default_factory=set)


class SessionLedger:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._used_refresh: dict[str, float] = {}  # jti -> exp
        self._cutoffs: dict[str, _Cutoff] = {}  # subject -> last logout everywhere
        self._ended_sessions: dict[str, float] = {}  # sid -> when it may be forgotten
        self._two_factor: dict[str, _TwoFactorToken] = {}  # 2FA token jti -> state
        self._changes = 0

    @staticmethod
    def new_session() -> str:
        return secrets.token_urlsafe(12)

    # --- refresh tokens ----------------------------------------------------------------

    def minted_refresh(self, subject: str, token: MintedToken) -> None:
        """Note a refresh token just minted (needed when it shares a logout's second)."""
        cutoff = self._cutoffs.get(subject)
        if cutoff is not None and not cutoff.exact and token.claims["iat"] == int(cutoff.at):
            cutoff.minted_after.add(token.jti)

    def use_refresh(self, subject: str, jti: str, claims: Mapping[str, Any]) -> str | None:
        """Spend a refresh token: None if it may be exchanged, else why not."""
        if not jti:
            return MISSING_JTI
        iat = claims.get("iat")
        if not isinstance(iat, int | float) or isinstance(iat, bool):
            return MISSING_IAT
        if jti in self._used_refresh:
            self.logout_all(subject)  # a replayed refresh token: end every session
            return ALREADY_USED
        if self._revoked_by_logout(subject, jti, iat):
            return LOGGED_OUT
        sid = claims.get("sid")
        if isinstance(sid, str) and sid in self._ended_sessions:
            return SESSION_ENDED
        exp = claims.get("exp")
        self._used_refresh[jti] = float(exp) if isinstance(exp, int | float) else self.clock()
        self._changed()
        return None

    def _revoked_by_logout(self, subject: str, jti: str, iat: float) -> bool:
        cutoff = self._cutoffs.get(subject)
        if cutoff is None:
            return False
        if cutoff.exact:
            return iat < cutoff.at
        second = int(cutoff.at)
        return iat < second or (iat == second and jti not in cutoff.minted_after)

    # --- logouts -----------------------------------------------------------------------

    def logout_all(self, subject: str, before: int | None = None) -> None:
        """End every refresh token of `subject` issued until now.

        `before`: the whole second from which the subject's tokens are minted (see
        `Tokens.revoking`); every token issued earlier is ended, and none later.
        """
        cutoff = _Cutoff(self.clock()) if before is None else _Cutoff(float(before), exact=True)
        current = self._cutoffs.get(subject)
        if current is None or cutoff.at >= current.at:
            self._cutoffs[subject] = cutoff

    def end_session(self, sid: str, keep_for: float) -> None:
        """End one session; it is remembered for `keep_for` seconds (the refresh lifetime)."""
        self._ended_sessions[sid] = self.clock() + keep_for
        self._changed()

    # --- 2FA tokens --------------------------------------------------------------------

    def two_factor_open(self, jti: str) -> bool:
        """May this 2FA token still try a code?"""
        state = self._two_factor.get(jti)
        return state is None or (not state.spent and state.failures < MAX_2FA_FAILURES)

    def two_factor_failed(self, jti: str, exp: float) -> None:
        self._two_factor_state(jti, exp).failures += 1

    def two_factor_spent(self, jti: str, exp: float) -> None:
        self._two_factor_state(jti, exp).spent = True

    def _two_factor_state(self, jti: str, exp: float) -> _TwoFactorToken:
        state = self._two_factor.get(jti)
        if state is None:
            state = self._two_factor[jti] = _TwoFactorToken(exp)
            self._changed()
        return state

    # --- housekeeping ------------------------------------------------------------------

    def _changed(self) -> None:
        """Every few changes, forget entries whose tokens have expired anyway."""
        self._changes += 1
        if self._changes % _PRUNE_EVERY:
            return
        now = self.clock()
        self._used_refresh = {j: e for j, e in self._used_refresh.items() if e + _GRACE > now}
        self._ended_sessions = {s: e for s, e in self._ended_sessions.items() if e > now}
        self._two_factor = {j: s for j, s in self._two_factor.items() if s.exp + _GRACE > now}
