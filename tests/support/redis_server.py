"""A real `redis-server` for the shared-state tests: the benchmark's (`bench.redis_server`:
on a free loopback port, without persistence, in its own temporary directory; it can be
killed with SIGKILL, like a crash or a network cut, and restarted on the same port).

Fixtures (tests/conftest.py registers them for every test):

- `redis_server` — a running `RedisServer`, stopped at teardown;
- (`redis_url`, one URL per Redis mode, is in `tests/support/redis_modes.py`.)

A missing `redis-server` fails the test with a clear message: it is never skipped.

Also `stale` / `assert_fails_closed` (a state that must fail closed, without hanging), and
`finish_closing` / `running_state`: closing a `RedisState` (or stopping a proxy
that owns one) with a bound, so that a close that hangs fails one test instead of
hanging the run — see `tests/state/test_state.py::test_close_returns_right_after_start`.
"""

from __future__ import annotations

import asyncio
import socket
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import pytest

from authproxy.state.redis_store import RedisState
from authproxy.state.store import StateUnavailable
from bench.procs import free_port
from bench.redis_server import START_TIMEOUT, RedisServer, binary, ping

__all__ = [
    "HUNG_CLOSES",
    "PATIENT",
    "PATIENT_CONFIG",
    "START_TIMEOUT",
    "RedisServer",
    "assert_fails_closed",
    "finish_closing",
    "free_port",
    "mute_port",
    "ping",
    "redis_server",
    "redis_server_binary",
    "running_state",
    "stale",
]


def redis_server_binary() -> str:
    """The `redis-server` executable, or a test failure saying how to get one."""
    found = binary()
    if found is None:
        pytest.fail(
            "redis-server is not installed (not on PATH, not /usr/bin/redis-server): the shared"
            " state tests run against a real Redis >= 7; install it (apt-get install"
            " redis-server) — these tests are never skipped",
            pytrace=False,
        )
    return found


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), executable=redis_server_binary())
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --- closing a RedisState without hanging the run -------------------------------------------

#: Labels of closes that did not finish by themselves within their bound (see below).
HUNG_CLOSES: list[str] = []


async def finish_closing(
    closing: Awaitable[Any], state: object, label: str, limit: float = 1.0
) -> bool:
    """Await `closing` (`state.close()`, or `proxy.stop()` of a proxy owning `state`) in
    the calling task, as a proxy would.

    True when it finished by itself within `limit` seconds. Otherwise the close is stuck
    waiting for the Redis follower task, whose cancellation was lost (CPython 3.11's
    `asyncio.wait_for`, which redis-py uses to send, returns the result instead of
    raising when the cancel lands as the send completes): a watchdog then cancels the
    follower again until the close finishes, records the hang in HUNG_CLOSES and the
    result is False.
    """
    hung = False

    async def rescue() -> None:
        nonlocal hung
        await asyncio.sleep(limit)
        hung = True
        HUNG_CLOSES.append(label)
        warnings.warn(
            f"{label}: close did not finish within {limit}s (the Redis follower ignored its"
            " cancellation); cancelling it again",
            RuntimeWarning,
            stacklevel=1,
        )
        follower = getattr(state, "_follower", None)
        while follower is not None and not follower.done():
            follower.cancel()
            await asyncio.sleep(0.1)

    watchdog = asyncio.create_task(rescue())
    try:
        await closing
    finally:
        watchdog.cancel()
    return not hung


#: RedisState settings for tests whose property is not about timing (exact counts under
#: concurrency, what is stored): a busy machine must not turn them into timeouts. The
#: defaults (0.5 s per operation and per pooled connect, 1 s staleness) are production
#: bounds; 100 concurrent calls opening 64 connections on a starved CPU can exceed them.
PATIENT: dict[str, Any] = {"timeout": 10.0, "staleness": 10.0}
#: The same, as the proxy's configuration fields (for a whole proxy on Redis).
PATIENT_CONFIG: dict[str, Any] = {"state_timeout": 10.0, "state_staleness": 10.0}


@asynccontextmanager
async def running_state(url: str, **kwargs: Any) -> AsyncIterator[RedisState]:
    """A started RedisState, closed (with a bound) on exit."""
    state = RedisState(url, **kwargs)
    try:
        await state.start()
        yield state
    finally:
        await finish_closing(state.close(), state, f"RedisState({kwargs}).close")


def stale(state: RedisState) -> bool:
    """True when revocation checks fail closed (the view is not current)."""
    try:
        state.check_fresh()
    except StateUnavailable:
        return True
    return False


async def assert_fails_closed(url: str, bound: float = 10.0) -> RedisState:
    """A RedisState on `url` starts within `bound` s, stays stale, and every operation
    raises StateUnavailable (counted in failures_total), each within `bound`."""
    state = RedisState(url, staleness=0.5, timeout=0.5)
    started = time.monotonic()
    try:
        await asyncio.wait_for(state.start(), timeout=bound)
        took = time.monotonic() - started
        assert took < bound
        assert stale(state)
        before = state.failures_total
        for operation in (
            state.revoke_token("jti-1", time.time() + 60),
            state.revoke_subject("alice", time.time()),
            state.first_use("jti-1", time.time() + 60),
            state.revocations(),
        ):
            with pytest.raises(StateUnavailable):
                await asyncio.wait_for(operation, timeout=bound)
        assert state.failures_total >= before + 4
        assert stale(state)
        print(f"\n{url}: start() returned after {took:.2f} s, failures {state.failures_total}")
    finally:
        assert await finish_closing(state.close(), state, f"RedisState({url}).close", limit=5.0)
    return state


@contextmanager
def mute_port() -> Iterator[int]:
    """A loopback port that accepts connections and never answers (a hung host): the
    kernel completes the handshakes, nothing ever reads or writes."""
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(16)
    try:
        yield mute.getsockname()[1]
    finally:
        mute.close()
