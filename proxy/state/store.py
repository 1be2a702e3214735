"""Shared state: token revocation and single use, in memory or (see `state/redis_store.py`) Redis.

Every record expires: a revoked jti when its token would have expired anyway, a subject
revocation after `subject_ttl` (longer than any token it must cover lives), a used jti at
its token's `exp`. So the state never grows without bound.

Rate limits are counted by the `limits` library in the storage each store provides.

Revocation is read on every request from a *local view* (`revoked`, no I/O); the Redis
store keeps that view fresh by pub/sub and says how fresh it is (`check_fresh`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from limits.aio.storage import MemoryStorage, Storage

from authproxy.policy.values import MAX_LEEWAY

#: How long a "log out all devices" record lasts unless configured: 30 days, a long
#: refresh token lifetime (the example backend's refresh tokens last 7 days).
DEFAULT_SUBJECT_TTL = 30 * 24 * 3600.0
#: A token is accepted until `exp` plus the policy's leeway, so records about one token
#: (revoked, used) are kept that much longer: the longest leeway a policy may set.
EXPIRY_GRACE = MAX_LEEWAY


class StateUnavailable(Exception):
    """The state backend cannot answer (or the local view is too old to trust)."""


@dataclass(frozen=True, slots=True)
class Revocation:
    """One active revocation: a token (`jti`) or every token of `sub` issued before `before`."""

    jti: str | None = None
    sub: str | None = None
    before: float | None = None
    #: A token's `exp`; a subject record's end (`before` + the subject TTL).
    expires: float = 0.0

    @property
    def until(self) -> float:
        """When the record can be dropped: a token record outlives its `exp` by the grace."""
        return self.expires + EXPIRY_GRACE if self.jti is not None else self.expires

    def as_json(self) -> dict:
        if self.jti is not None:
            return {"jti": self.jti, "exp": self.expires}
        return {"sub": self.sub, "before": self.before, "expires": self.expires}

    @classmethod
    def from_json(cls, record: dict) -> Revocation:
        """The revocation `as_json` wrote (ValueError, KeyError or TypeError otherwise)."""
        if "jti" in record:
            return cls(jti=str(record["jti"]), expires=float(record["exp"]))
        before = float(record["before"])
        return cls(sub=str(record["sub"]), before=before, expires=float(record["expires"]))


class StateStore(Protocol):
    #: The local picture of active revocations (see `RevocationView`).
    view: RevocationView

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def revoke_token(self, jti: str, exp: float) -> None: ...
    async def revoke_subject(self, sub: str, before: float) -> None: ...
    async def revocations(self) -> list[Revocation]: ...
    def check_fresh(self) -> None:
        """Raise StateUnavailable when the local view may be missing revocations."""

    def revoked(self, jti: str | None, sub: str, iat: float | None) -> bool: ...
    async def used(self, jti: str) -> bool:
        """Whether a jti was recorded as used (reads only)."""
        ...

    async def first_use(self, jti: str, exp: float) -> bool:
        """Record a jti as used; True for the first presentation only (atomic)."""
        ...

    def rate_limit_storage(self) -> Storage:
        """Where the `limits` library counts rate-limited calls (see `decide/rate_limits.py`)."""
        ...


class RevocationView:
    """The in-process picture of active revocations; expired entries are dropped lazily."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.tokens: dict[str, float] = {}  # jti -> exp
        self.subjects: dict[str, tuple[float, float]] = {}  # sub -> (before, expires)
        #: Called after every change (open streams re-check their tokens).
        self.listeners: list[Callable[[], None]] = []

    def add(self, revocation: Revocation) -> None:
        self._add(revocation)
        self._changed()

    def merge(self, revocations: list[Revocation]) -> None:
        """Add every one of `revocations`, keeping what the view already holds."""
        for revocation in revocations:
            self._add(revocation)
        self._changed()

    def _changed(self) -> None:
        for listener in self.listeners:
            listener()

    def _add(self, revocation: Revocation) -> None:
        if revocation.jti is not None:
            self.tokens[revocation.jti] = max(
                revocation.expires, self.tokens.get(revocation.jti, 0)
            )
        elif revocation.sub is not None and revocation.before is not None:
            before, expires = self.subjects.get(revocation.sub, (0.0, 0.0))
            self.subjects[revocation.sub] = (
                max(before, revocation.before),
                max(expires, revocation.expires),
            )

    def revoked(self, jti: str | None, sub: str, iat: float | None) -> bool:
        now = self.clock()
        if jti is not None:
            exp = self.tokens.get(jti)
            if exp is not None:
                if exp + EXPIRY_GRACE > now:  # still accepted within the leeway
                    return True
                del self.tokens[jti]
        entry = self.subjects.get(sub)
        if entry is not None:
            before, expires = entry
            if expires <= now:
                del self.subjects[sub]
            elif iat is None or iat < before:  # a token without iat cannot prove it is newer
                return True
        return False

    def active(self) -> list[Revocation]:
        now = self.clock()
        out = [
            Revocation(jti=j, expires=e) for j, e in self.tokens.items() if e + EXPIRY_GRACE > now
        ]
        out += [
            Revocation(sub=s, before=b, expires=e) for s, (b, e) in self.subjects.items() if e > now
        ]
        return out


def lacking(held: list[Revocation], loaded: list[Revocation]) -> list[Revocation]:
    """The revocations of `held` that `loaded` (Redis) does not cover."""
    tokens = {r.jti for r in loaded if r.jti is not None}
    subjects = {r.sub: r.before or 0.0 for r in loaded if r.jti is None}
    return [
        r
        for r in held
        if (
            r.jti not in tokens
            if r.jti is not None
            else subjects.get(r.sub, -1.0) < (r.before or 0.0)
        )
    ]


class MemoryState:
    """Single-process state: the view is the store, always fresh."""

    def __init__(
        self, subject_ttl: float = DEFAULT_SUBJECT_TTL, clock: Callable[[], float] = time.time
    ) -> None:
        self.clock = clock
        self.subject_ttl = subject_ttl
        self.view = RevocationView(clock)
        self._used: dict[str, float] = {}  # jti -> exp
        self._purge_at = 1024
        self._limits: MemoryStorage | None = None

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        if self._limits is not None and self._limits.timer is not None:
            self._limits.timer.cancel()  # its expiry sweep

    async def revoke_token(self, jti: str, exp: float) -> None:
        self.view.add(Revocation(jti=jti, expires=exp))

    async def revoke_subject(self, sub: str, before: float) -> None:
        self.view.add(Revocation(sub=sub, before=before, expires=before + self.subject_ttl))

    async def revocations(self) -> list[Revocation]:
        return self.view.active()

    def check_fresh(self) -> None:
        return None

    def revoked(self, jti: str | None, sub: str, iat: float | None) -> bool:
        return self.view.revoked(jti, sub, iat)

    async def used(self, jti: str) -> bool:
        seen = self._used.get(jti)
        return seen is not None and seen > self.clock()

    async def first_use(self, jti: str, exp: float) -> bool:
        now = self.clock()
        if len(self._used) >= self._purge_at:  # amortised: drop expired records
            self._used = {j: e for j, e in self._used.items() if e > now}
            self._purge_at = max(1024, 2 * len(self._used))
        seen = self._used.get(jti)
        if seen is not None and seen > now:
            return False
        self._used[jti] = exp + EXPIRY_GRACE  # no await since the check: atomic here
        return True

    def rate_limit_storage(self) -> Storage:
        if self._limits is None:
            self._limits = MemoryStorage()
        return self._limits
