"""The client's tokens: the 2FA token, the access token and the refresh token, each with
its expiry read from the token's own `exp` claim.

The client cannot verify a token (it has no keys and needs none): `exp` is read from the
payload only to know when to refresh. The proxy verifies every token on every call.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import jwt

from authproxy.policy.model import ACCESS, REFRESH, TWO_FA

#: The token kinds a store holds, named like the policy levels that accept them.
KINDS = (TWO_FA, ACCESS, REFRESH)


@dataclass(frozen=True, slots=True)
class StoredToken:
    value: str
    #: The token's `exp` (seconds since the epoch); None when it has none or is not a JWT.
    expires_at: float | None

    def expires_within(self, seconds: float, now: float) -> bool:
        return self.expires_at is not None and self.expires_at - now <= seconds


def expiry_of(token: str) -> float | None:
    """The `exp` claim of a JWT, unverified; None when there is none or it is not a JWT."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return None
    exp = claims.get("exp")
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


class TokenStore:
    """Thread-safe: every read and write takes one lock, and tokens are immutable. A login
    or refresh answer replaces the access and refresh tokens in one step (`set_pair`)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[str, StoredToken] = {}

    def get(self, kind: str) -> StoredToken | None:
        with self._lock:
            return self._tokens.get(kind)

    def set(self, kind: str, value: str) -> StoredToken:
        if kind not in KINDS:
            raise ValueError(f"unknown token kind {kind!r}: one of {', '.join(KINDS)}")
        token = StoredToken(value, expiry_of(value))
        with self._lock:
            self._tokens[kind] = token
        return token

    def set_pair(self, access: str, refresh: str | None) -> None:
        """A login or refresh answer: the new access token, and the new refresh token when
        the server rotated it (kept as it was when `refresh` is empty)."""
        pair = {ACCESS: StoredToken(access, expiry_of(access))}
        if refresh:
            pair[REFRESH] = StoredToken(refresh, expiry_of(refresh))
        with self._lock:
            self._tokens.update(pair)
            self._tokens.pop(TWO_FA, None)

    def snapshot(self) -> dict[str, StoredToken]:
        """Every token held, read in one step (to persist a session, for example)."""
        with self._lock:
            return dict(self._tokens)

    def clear(self, *kinds: str) -> None:
        """Forget `kinds`, or every token."""
        with self._lock:
            for kind in kinds or KINDS:
                self._tokens.pop(kind, None)

    def now(self) -> float:
        return self.clock()
