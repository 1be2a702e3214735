"""The client's tokens: the 2FA token, the access token and the refresh token, each with
its expiry and issue time read from the token's own `exp` and `iat` claims.

The client cannot verify a token (it has no keys and needs none): the claims are read from
the payload only to know when to refresh. The proxy verifies every token on every call.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt

from .levels import TOKEN_KINDS, Level


@dataclass(frozen=True, slots=True)
class StoredToken:
    """A token the session holds, with the times read (unverified) from its payload."""

    value: str
    #: The token's `exp` (seconds since the epoch); None when it has none or is not a JWT.
    expires_at: float | None
    #: The token's `iat`; None when it has none or is not a JWT.
    issued_at: float | None = None

    def expires_within(self, seconds: float, now: float) -> bool:
        """True when the token has an expiry and at most `seconds` are left at `now`."""
        return self.expires_at is not None and self.expires_at - now <= seconds

    @property
    def lifetime(self) -> float | None:
        """`exp - iat`: how long the issuer made the token valid; None when unknown."""
        if self.expires_at is None or self.issued_at is None:
            return None
        span = self.expires_at - self.issued_at
        return span if span > 0 else None


def _claims(token: str) -> dict[str, Any]:
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return {}
    return claims if isinstance(claims, dict) else {}


def _time(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def expiry_of(token: str) -> float | None:
    """The `exp` claim of a JWT, unverified; None when there is none or it is not a JWT."""
    return _time(_claims(token), "exp")


def _stored(value: str) -> StoredToken:
    """A `StoredToken` for `value`, with its `exp` and `iat` read (unverified)."""
    claims = _claims(value)
    return StoredToken(value, _time(claims, "exp"), _time(claims, "iat"))


def _kind(kind: Level | str) -> Level:
    try:
        level = Level(kind)
    except ValueError:
        level = None
    if level not in TOKEN_KINDS:
        raise ValueError(f"unknown token kind {str(kind)!r}: one of {', '.join(TOKEN_KINDS)}")
    return level  # type: ignore[return-value]


class TokenStore:
    """Thread-safe: every read and write takes one lock, and tokens are immutable. A login
    or refresh answer replaces the access and refresh tokens in one step (`set_pair`).

    Kinds are `Level.TWO_FA`, `Level.ACCESS` and `Level.REFRESH`, or the same as bare
    strings (`"2fa"`, `"access"`, `"refresh"`)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        """`clock`: seconds since the epoch, as the tokens' `exp` counts them."""
        self.clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[str, StoredToken] = {}  # keyed by Level

    def get(self, kind: Level | str) -> StoredToken | None:
        """The token of `kind` held, or None (also for a kind no store holds)."""
        try:
            level = _kind(kind)
        except ValueError:
            return None
        with self._lock:
            return self._tokens.get(level)

    def set(self, kind: Level | str, value: str) -> StoredToken:
        """Hold `value` as the token of `kind` (ValueError for a kind no store holds)."""
        level = _kind(kind)
        token = _stored(value)
        with self._lock:
            self._tokens[level] = token
        return token

    def set_pair(self, access: str, refresh: str | None) -> None:
        """A login or refresh answer: the new access token, and the new refresh token when
        the server rotated it (kept as it was when `refresh` is empty)."""
        pair: dict[str, StoredToken] = {Level.ACCESS: _stored(access)}
        if refresh:
            pair[Level.REFRESH] = _stored(refresh)
        with self._lock:
            self._tokens.update(pair)
            self._tokens.pop(Level.TWO_FA, None)

    @property
    def logged_in(self) -> bool:
        """An access or a refresh token is held (read in one step)."""
        with self._lock:
            return Level.ACCESS in self._tokens or Level.REFRESH in self._tokens

    def snapshot(self) -> dict[str, StoredToken]:
        """Every token held, read in one step (to persist a session, for example); the
        keys are `Level` members."""
        with self._lock:
            return dict(self._tokens)

    def clear(self, *kinds: Level | str) -> None:
        """Forget `kinds`, or every token."""
        with self._lock:
            for kind in kinds or TOKEN_KINDS:
                self._tokens.pop(kind, None)

    def now(self) -> float:
        """The store's clock: what the refresh compares the tokens' times with."""
        return self.clock()
