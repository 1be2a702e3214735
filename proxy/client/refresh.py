"""Refreshing the access token, once for all concurrent callers (single flight).

A caller that needs a fresh access token names the token it found stale. The first such
caller starts the refresh; every caller that arrives while it runs waits for that same
refresh and shares its outcome; a caller that arrives after it finished sees that the
stale token was already replaced and makes no call. So one refresh call is made however
many calls needed it — which matters, because the proxy accepts each refresh token once
and a second use revokes the whole session (reuse detection).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable

import grpc

from authproxy.policy.model import ACCESS, REFRESH

from .errors import LoginRequiredError, RefreshError
from .tokens import StoredToken, TokenStore

log = logging.getLogger("authproxy.client")

#: Refresh when the access token has less than this many seconds left.
DEFAULT_SKEW = 60.0
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


class Refresher:
    def __init__(self, store: TokenStore, skew: float = DEFAULT_SKEW) -> None:
        self.store = store
        self.skew = skew
        self.calls = 0  # refresh calls made (for the curious and for tests)
        self._lock = threading.Lock()
        self._flight: _Flight | None = None
        self._task: asyncio.Task[StoredToken] | None = None

    def fresh(self) -> StoredToken | None:
        """The access token when it does not need a refresh yet, else None."""
        token = self.store.get(ACCESS)
        if token is None or token.expires_within(self.skew, self.store.now()):
            return None
        return token

    def refresh(self, stale: StoredToken | None, call: SyncRefreshCall) -> StoredToken:
        """A new access token in place of `stale` (blocking; threads share one call)."""
        with self._lock:
            current = self.store.get(ACCESS)
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
        current = self.store.get(ACCESS)
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
            raise self._failed(e) from e
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
            raise self._failed(e) from e
        return self._store(access, rotated)

    def _refresh_token(self, stale: StoredToken | None) -> str | StoredToken:
        """The refresh token to use; or `stale` itself when there is no refresh token but
        `stale` has not expired yet (use it while it lasts); else LoginRequiredError."""
        now = self.store.now()
        refresh = self.store.get(REFRESH)
        if refresh is None:
            if stale is not None and not stale.expires_within(0, now):
                return stale
            self.store.clear()
            raise LoginRequiredError("no refresh token: log in again")
        if refresh.expires_within(0, now):
            self.store.clear()
            raise LoginRequiredError("the refresh token has expired: log in again")
        return refresh.value

    def _failed(self, error: grpc.RpcError) -> Exception:
        code = error.code()  # type: ignore[attr-defined]
        details = error.details() or ""  # type: ignore[attr-defined]
        if code in _REFUSED:
            self.store.clear()
            log.info(
                "refresh refused (%s: %s); the session's tokens are cleared", code.name, details
            )
            return LoginRequiredError(
                f"the refresh was refused ({code.name}: {details}): log in again"
            )
        log.warning("refresh failed (%s: %s); the tokens are kept", code.name, details)
        return RefreshError(f"the refresh failed ({code.name}: {details}); try again later")

    def _store(self, access: str, rotated: str) -> StoredToken:
        if not access:
            self.store.clear()
            raise LoginRequiredError("the refresh answer carried no access token: log in again")
        self.store.set_pair(access, rotated or None)
        token = self.store.get(ACCESS)
        assert token is not None
        return token
