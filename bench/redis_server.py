"""A real `redis-server`: on a free loopback port, without persistence (`--save ''
--appendonly no`), in its own directory; it can be killed (SIGKILL, like a crash or a
network cut) and restarted on the same port, empty.

The benchmark's shared-state runs and the test suite's shared-state tests both start
theirs here (`tests/support/redis_server.py` adds the pytest fixtures), so both run Redis the
same way. Nothing here imports pytest or `tests/`.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from .procs import free_port, stop_process

#: How long a server may take to answer PING after it was started.
START_TIMEOUT = 10.0
#: Where Debian's package puts it, for environments whose PATH leaves out /usr/bin.
_USUAL = Path("/usr/bin/redis-server")


class RedisNotInstalled(RuntimeError):
    """No `redis-server` executable on PATH nor at /usr/bin/redis-server."""


def binary() -> str | None:
    """The `redis-server` executable, or None when it is not installed."""
    return shutil.which("redis-server") or (str(_USUAL) if _USUAL.is_file() else None)


def ping(port: int, timeout: float = 0.5) -> bool:
    """True when a Redis server on loopback `port` answers PING (PONG, or NOAUTH)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))  # NOAUTH: it needs a password
    except OSError:
        return False


class RedisServer:
    """One `redis-server` process on a fixed loopback port (chosen free at creation, so a
    restart comes back where clients are reconnecting)."""

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        executable: str | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        """`extra_args`: more `redis-server` options (a cluster node's, say)."""
        found = executable or binary()
        if found is None:
            raise RedisNotInstalled(
                "redis-server is not installed (not on PATH, not /usr/bin/redis-server);"
                " install it: apt-get install redis-server"
            )
        self.binary = found
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra_args = extra_args
        self.log = self.dir / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None
        #: How many times it was started (a restart counts).
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
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.dir), "--protected-mode", "no",
                 *self.extra_args],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while not ping(self.port):
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with status {self.process.returncode} on port"
                    f" {self.port}:\n{self._log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"redis-server on port {self.port} did not answer PING within"
                    f" {START_TIMEOUT:.0f}s:\n{self._log_tail()}"
                )
            time.sleep(0.01)  # polling a child process that has no readiness signal

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def kill(self) -> None:
        """SIGKILL the server (no goodbye to clients, like a crash) and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def restart(self) -> None:
        """Start again, empty, on the same port (killing the old process first if needed)."""
        self.kill()
        self.start()

    def stop(self) -> None:
        """Terminate politely, then kill if it does not go."""
        if self.process is not None:
            stop_process(self.process)
