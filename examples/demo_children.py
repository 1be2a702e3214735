"""The demo's two child processes: the example backend and the proxy, on free loopback
ports, started and stopped together (see `examples/demo.py`)."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from google.protobuf import empty_pb2

from examples.backend.api.v1 import api_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
STARTUP_SECONDS = 20.0


class DemoError(Exception):
    """The demo cannot go on; the message says why."""


# --- the two child processes -----------------------------------------------------------


class Children:
    """The backend and the proxy, with their output in files; always stopped on exit."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, args: Sequence[str]) -> subprocess.Popen[bytes]:
        with (
            open(self.workdir / f"{name}.out", "wb") as out,
            open(self.workdir / f"{name}.err", "wb") as err,
        ):
            proc = subprocess.Popen(
                [sys.executable, *args],
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        self.procs[name] = proc
        return proc

    def output(self, name: str, stream: str = "err") -> str:
        path = self.workdir / f"{name}.{stream}"
        return path.read_text(errors="replace") if path.exists() else ""

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise DemoError(f"the {name} exited with status {proc.returncode}")

    def report(self) -> str:
        """The tail of every child's stderr, for error messages."""
        parts = []
        for name in self.procs:
            lines = self.output(name).strip().splitlines()[-30:]
            if lines:
                parts.append(
                    f"--- {name} stderr (last {len(lines)} lines) ---\n" + "\n".join(lines)
                )
        return "\n".join(parts)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_backend(children: Children, deadline: float) -> int:
    """The port from the backend's `backend listening on HOST:PORT` line."""
    while time.monotonic() < deadline:
        found = re.search(r"backend listening on \S+:(\d+)", children.output("backend", "out"))
        if found:
            return int(found.group(1))
        children.check_alive()
        time.sleep(0.1)
    raise DemoError(f"the backend did not start within {STARTUP_SECONDS:.0f}s")


def wait_for_proxy(children: Children, target: str, deadline: float) -> None:
    """Until the public HealthCheck answers through the proxy."""
    last = "no answer"
    with grpc.insecure_channel(target) as channel:
        stub = api_pb2_grpc.AuthServiceStub(channel)
        while time.monotonic() < deadline:
            children.check_alive()
            try:
                stub.HealthCheck(empty_pb2.Empty(), timeout=1.0)
                return
            except grpc.RpcError as e:
                last = f"{e.code().name}: {e.details()}"
            time.sleep(0.2)
    raise DemoError(f"the proxy did not answer within {STARTUP_SECONDS:.0f}s (last: {last})")
