"""A real `redis-server` for the shared-state tests: on a free loopback port, without
persistence, in its own temporary directory; it can be killed (SIGKILL, like a crash or
a network cut) and restarted on the same port.

Fixtures (import them into a test module to use them):

- `redis_server` — a running `RedisServer`, stopped at teardown;
- `redis_url` — `redis://127.0.0.1:PORT` of that server.

A missing `redis-server` fails the test with a clear message: it is never skipped.

Also `finish_closing` / `running_state`: closing a `RedisState` (or stopping a proxy
that owns one) with a bound, so that a close that hangs fails one test instead of
hanging the run — see `test_state.py::test_close_returns_right_after_start`.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from proxy.state_redis import RedisState

#: How long a server may take to answer PING after it was started.
START_TIMEOUT = 10.0


def redis_server_binary() -> str:
    """The `redis-server` executable, or a test failure saying how to get one."""
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").is_file() else None
    )
    if found is None:
        pytest.fail(
            "redis-server is not installed (not on PATH, not /usr/bin/redis-server): the shared"
            " state tests run against a real Redis >= 7; install it (apt-get install"
            " redis-server) — these tests are never skipped",
            pytrace=False,
        )
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ping(port: int, timeout: float = 0.5) -> bool:
    """True when a Redis server on loopback `port` answers PING with PONG."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One `redis-server` process on a fixed loopback port (chosen free at creation)."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.binary = redis_server_binary()
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log = self.dir / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start the server and wait (bounded) until it answers PING."""
        if self.running:
            raise RuntimeError(f"redis-server on port {self.port} is already running")
        self.starts += 1
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    "--port", str(self.port),
                    "--bind", "127.0.0.1",
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", str(self.dir),
                    "--protected-mode", "no",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while not ping(self.port):
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with status {self.process.returncode} on port"
                    f" {self.port}:\n{self.log.read_text(errors='replace')[-2000:]}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"redis-server on port {self.port} did not answer PING within"
                    f" {START_TIMEOUT:.0f}s:\n{self.log.read_text(errors='replace')[-2000:]}"
                )
            time.sleep(0.01)

    def kill(self) -> None:
        """SIGKILL the server (no goodbye to clients, like a crash) and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def restart(self) -> None:
        """Start again on the same port (killing the old process first if needed)."""
        self.kill()
        self.start()

    def stop(self) -> None:
        """Terminate politely, then kill if it does not go."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


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


@asynccontextmanager
async def running_state(url: str, **kwargs: Any) -> AsyncIterator[RedisState]:
    """A started RedisState, closed (with a bound) on exit."""
    state = RedisState(url, **kwargs)
    try:
        await state.start()
        yield state
    finally:
        await finish_closing(state.close(), state, f"RedisState({kwargs}).close")
