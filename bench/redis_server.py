"""A `redis-server` for the benchmark: on a free loopback port, no persistence
(`--save '' --appendonly no`), in its own directory; started and stopped by the
benchmark (no pytest, nothing from `tests/`)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from .procs import free_port

#: How long the server may take to answer PING.
START_TIMEOUT = 10.0


def binary() -> str | None:
    return shutil.which("redis-server")


def ping(port: int, timeout: float = 0.5) -> bool:
    """True when a Redis server on loopback `port` answers PING with PONG."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the server; return once it answers PING."""
        found = binary()
        if found is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.dir.mkdir(parents=True, exist_ok=True)
        log = self.dir / "redis.log"
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [found, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.dir), "--protected-mode", "no"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while not ping(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"redis-server on port {self.port} did not answer PING:\n"
                    + log.read_text(errors="replace")[-2000:]
                )
            time.sleep(0.01)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
