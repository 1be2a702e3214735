"""Refreshing the access token, once for all concurrent callers (single flight).

A caller that needs a fresh access token names the token it found stale. The first such
caller starts the refresh; every caller that arrives while it runs waits for that same
refresh and shares its outcome; a caller that arrives after it finished sees that the
stale token was already replaced and makes no call. So one refresh call is made however
many calls needed it — which matters, because the proxy accepts each refresh token once
and a second use revokes the whole session (reuse detection).

When. A call refreshes the access token first once it is inside its early-refresh window:
the last `skew` seconds of its life, but never more than `WINDOW_FRACTION` (a quarter) of
its lifetime (`exp - iat`, read unverified from the token). Without that cap a skew longer
than the tokens live (60 s against 30 s tokens) would refresh before every call — and the
proxy rate-limits RefreshToken. A quarter keeps three quarters of every token's life in
use, so a session refreshes at most about once per three quarters of a lifetime, and it
leaves the last quarter for retries. A token without `iat` gets the whole `skew`.

Early refresh failing. Inside the window the token is still valid: when that refresh fails
for a passing reason (`RefreshError`: RATE_LIMITED, UNAVAILABLE, a timeout) the calls go
on with it, and the refresh is not tried again before a backoff (`first_retry` seconds,
doubling after each failure up to `max_retry`, and never past the token's expiry), logged
once per backoff at warning level. Only a token that has expired fails the call with the
`RefreshError`. A refused refresh (`LoginRequiredError`) clears the session as before.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from .errors import LoginRequiredError, RefreshError
from .levels import Level
from .tokens import StoredToken, TokenStore

log = logging.getLogger("authproxy.client")

#: Refresh when the access token has less than this many seconds left (see WINDOW_FRACTION).
DEFAULT_SKEW = 60.0
#: The early-refresh window is at most this share of the access token's lifetime.
WINDOW_FRACTION = 0.25
#: After a failed refresh, calls keep a still-valid token this long before trying again,
#: doubling after each failure up to MAX_RETRY (and never past the token's expiry).
FIRST_RETRY = 1.0
MAX_RETRY = 30.0
#: Answers to a refresh call that mean the refresh token is no good: log in again.
_REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)

#: Calls the refresh method with a refresh token; returns (access, rotated refresh or "").
SyncRefreshCall = Callable[[str], tuple[str, str]]
AsyncRefreshCall = Callable[[str], Awaitable[tuple[str, str]]]


class _Flight:
    """One refresh in progress, for the threads that wait for it."""

    def __init__(self) -> None:
        self.finished = threading.Event()
        self.token: StoredToken | None = None
        self.error: BaseException | None = None

    def outcome(self) -> StoredToken:
        self.finished.wait()
        if self.error is not None:
            raise self.error
        assert self.token is not None
        return self.token


@dataclass(frozen=True, slots=True)
class _Backoff:
    """Refreshes failed `failures` times in a row while `token` was the access token: calls
    use it, without refreshing, until `retry_at`."""

    token: StoredToken
    failures: int
    retry_at: float


class Refresher:
    """Refreshes the access token of a `TokenStore`: when (`fresh`, `window`), once for all
    concurrent callers (`refresh`, `refresh_async`), and what a call gets when the refresh
    fails (`access`, `access_async`)."""

    def __init__(
        self,
        store: TokenStore,
        skew: float = DEFAULT_SKEW,
        *,
        first_retry: float = FIRST_RETRY,
        max_retry: float = MAX_RETRY,
    ) -> None:
        """`skew`: the early-refresh window's longest length, in seconds; `first_retry`
        and `max_retry`: the backoff after a failed refresh (see the module's text)."""
        self.store = store
        self.skew = skew
        self.first_retry = first_retry
        self.max_retry = max_retry
        self.calls = 0  # refresh calls made (for the curious and for tests)
        self._lock = threading.Lock()
        self._flight: _Flight | None = None
        self._task: asyncio.Task[StoredToken] | None = None
        self._backoff: _Backoff | None = None

    def window(self, token: StoredToken) -> float:
        """How many seconds before `token`'s expiry a call refreshes it first: `skew`,
        but at most `WINDOW_FRACTION` of its lifetime when the token says it (`iat`)."""
        lifetime = token.lifetime
        return self.skew if lifetime is None else min(self.skew, lifetime * WINDOW_FRACTION)

    def fresh(self) -> StoredToken | None:
        """The access token when a call can use it as it is: outside its early-refresh
        window, or inside it while a failed refresh backs off (and not expired). None:
        refresh first."""
        token = self.store.get(Level.ACCESS)
        if token is None:
            return None
        now = self.store.now()
        if not token.expires_within(self.window(token), now):
            return token
        backoff = self._backoff
        if backoff is not None and backoff.token is token and now < backoff.retry_at:
            return None if token.expires_within(0, now) else token
        return None

    def access(self, call: SyncRefreshCall) -> StoredToken:
        """The access token for a call (blocking): the one held, refreshed first inside
        its window. A refresh that fails with `RefreshError` while the held token has not
        expired leaves the call that token; `LoginRequiredError` is raised as it comes."""
        token = self.fresh()
        if token is not None:
            return token
        stale = self.store.get(Level.ACCESS)
        try:
            return self.refresh(stale, call)
        except RefreshError:
            if not self._valid(stale):
                raise
            return stale  # type: ignore[return-value]

    async def access_async(self, call: AsyncRefreshCall) -> StoredToken:
        """`access` for coroutines."""
        token = self.fresh()
        if token is not None:
            return token
        stale = self.store.get(Level.ACCESS)
        try:
            return await self.refresh_async(stale, call)
        except RefreshError:
            if not self._valid(stale):
                raise
            return stale  # type: ignore[return-value]

    def _valid(self, token: StoredToken | None) -> bool:
        return token is not None and not token.expires_within(0, self.store.now())

    def refresh(self, stale: StoredToken | None, call: SyncRefreshCall) -> StoredToken:
        """A new access token in place of `stale` (blocking; threads share one call).
        Raises `RefreshError` or `LoginRequiredError` when the refresh fails."""
        with self._lock:
            current = self.store.get(Level.ACCESS)
            if current is not stale and current is not None:
                return current  # already replaced while this caller was looking
            flight, leader = self._flight, False
            if flight is None:
                flight, leader = _Flight(), True
                self._flight = flight
        if leader:
            try:
                flight.token = self._refresh(stale, call)
            except BaseException as e:
                flight.error = e
            finally:
                with self._lock:
                    self._flight = None
                flight.finished.set()
        return flight.outcome()

    async def refresh_async(self, stale: StoredToken | None, call: AsyncRefreshCall) -> StoredToken:
        """A new access token in place of `stale` (coroutines share one call). A session
        used from asyncio belongs to one event loop."""
        current = self.store.get(Level.ACCESS)
        if current is not stale and current is not None:
            return current
        if self._task is None:
            self._task = asyncio.ensure_future(self._refresh_async(stale, call))
            self._task.add_done_callback(self._landed)
        # shield: a caller cancelled while waiting must not cancel the others' refresh
        return await asyncio.shield(self._task)

    def _landed(self, task: asyncio.Task[StoredToken]) -> None:
        if self._task is task:
            self._task = None
        if not task.cancelled():
            task.exception()  # retrieved: waiters re-raise it, nobody logs it as lost

    def _refresh(self, stale: StoredToken | None, call: SyncRefreshCall) -> StoredToken:
        usable = self._refresh_token(stale)
        if isinstance(usable, StoredToken):
            return usable
        self.calls += 1
        try:
            access, rotated = call(usable)
        except grpc.RpcError as e:
            raise self._failed(e, stale) from e
        return self._store(access, rotated)

    async def _refresh_async(
        self, stale: StoredToken | None, call: AsyncRefreshCall
    ) -> StoredToken:
        usable = self._refresh_token(stale)
        if isinstance(usable, StoredToken):
            return usable
        self.calls += 1
        try:
            access, rotated = await call(usable)
        except grpc.RpcError as e:
            raise self._failed(e, stale) from e
        return self._store(access, rotated)

    def _refresh_token(self, stale: StoredToken | None) -> str | StoredToken:
        """The refresh token to use; or `stale` itself when there is no refresh token but
        `stale` has not expired yet (use it while it lasts); else LoginRequiredError."""
        now = self.store.now()
        refresh = self.store.get(Level.REFRESH)
        if refresh is None:
            if stale is not None and not stale.expires_within(0, now):
                return stale
            self.store.clear()
            raise LoginRequiredError("no refresh token: log in again")
        if refresh.expires_within(0, now):
            self.store.clear()
            raise LoginRequiredError("the refresh token has expired: log in again")
        return refresh.value

    def _failed(self, error: grpc.RpcError, stale: StoredToken | None) -> Exception:
        code = error.code()  # type: ignore[attr-defined]
        details = error.details() or ""  # type: ignore[attr-defined]
        if code in _REFUSED:
            self.store.clear()
            self._backoff = None
            log.info(
                "refresh refused (%s: %s); the session's tokens are cleared", code.name, details
            )
            return LoginRequiredError(
                f"the refresh was refused ({code.name}: {details}): log in again"
            )
        if stale is not None and self._valid(stale):
            now = self.store.now()
            retry_at = self._back_off(stale, now)
            left = "" if stale.expires_at is None else f", {stale.expires_at - now:.0f} s left"
            log.warning(
                "refresh failed (%s: %s); calls go on with the access token (still valid%s) "
                "and the refresh is tried again in %.1f s",
                code.name,
                details,
                left,
                retry_at - now,
            )
        else:
            log.warning("refresh failed (%s: %s); the tokens are kept", code.name, details)
        return RefreshError(f"the refresh failed ({code.name}: {details}); try again later")

    def _back_off(self, stale: StoredToken, now: float) -> float:
        """Record one more failed refresh while `stale` is in use; when to try again."""
        prior = self._backoff
        failures = prior.failures + 1 if prior is not None and prior.token is stale else 1
        delay = min(self.first_retry * 2 ** (failures - 1), self.max_retry)
        retry_at = now + delay
        if stale.expires_at is not None:
            retry_at = min(retry_at, stale.expires_at)
        self._backoff = _Backoff(stale, failures, retry_at)
        return retry_at

    def _store(self, access: str, rotated: str) -> StoredToken:
        if not access:
            self.store.clear()
            raise LoginRequiredError("the refresh answer carried no access token: log in again")
        self.store.set_pair(access, rotated or None)
        self._backoff = None
        token = self.store.get(Level.ACCESS)
        assert token is not None
        return token
