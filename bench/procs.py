"""The benchmark's server processes: start, wait until they listen, read their CPU time,
stop.

CPU time is `utime + stime` from `/proc/<pid>/stat` (all threads of the process: the
event loop and gRPC's own threads), summed over the process and its children (the
workers of `serve --workers N`). Read before and after a load run, divided by the
requests served, it gives CPU µs per request: the steadiest figure on a shared machine,
since it does not depend on how much of the CPU the process was given.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(process: subprocess.Popen) -> None:
    """Terminate politely, then kill if it does not go (no-op when it has ended)."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
        except FileNotFoundError:
            continue
        for child in text.split():
            found.append(int(child))
            found.extend(_children(int(child)))
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and its descendants so far."""
    total = 0
    for p in (pid, *_children(pid)):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except FileNotFoundError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / _TICKS


class Server:
    """One server process listening on `port` (127.0.0.1)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        port: int,
        log: Path,
        program: str = sys.executable,
        env: dict[str, str] | None = None,
        cwd: Path = REPO,
    ) -> None:
        """`argv` runs under `program`: this interpreter, unless another program is named;
        `env`: variables added to this process's; `cwd`: where it runs (`python -m` imports
        from there first)."""
        self.name = name
        self.port = port
        self.log = log
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            [program, *argv],
            cwd=cwd,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "GRPC_VERBOSITY": "ERROR", **(env or {})},
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    async def wait_listening(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()[-3000:]}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return
        raise RuntimeError(f"{self.name} did not listen on {self.port}:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


def baseline(name: str, kind: str, log_dir: Path, upstream: int | None = None) -> Server:
    port = free_port()
    argv = ["-m", "bench.servers", kind, "--port", str(port)]
    if upstream is not None:
        argv += ["--upstream", f"127.0.0.1:{upstream}"]
    return Server(name, argv, port, log_dir / f"{name}.log")


def proxy(
    name: str,
    flags: list[str],
    log_dir: Path,
    port_flag: str = "--listen",
    env: dict[str, str] | None = None,
    cwd: Path = REPO,
) -> Server:
    """`authproxy serve` (the real command) with `flags`, and `port_flag` on a free port;
    `cwd`: the source tree it runs from (default: this one)."""
    port = free_port()
    argv = ["-m", "authproxy", "serve", port_flag, f"127.0.0.1:{port}", *flags]
    return Server(name, argv, port, log_dir / f"{name}.log", env=env, cwd=cwd)


def c_relay(name: str, upstream: int, log_dir: Path) -> Server | None:
    """nghttpx (nghttp2's proxy, C, on the same libnghttp2; `apt-get install
    nghttp2-proxy`) relaying h2c to h2c with no auth: for scale, what a relay written in C
    adds to a call's latency here. None when it is not installed."""
    program = shutil.which("nghttpx")
    if program is None:
        return None
    port = free_port()
    argv = [
        f"--frontend=127.0.0.1,{port};no-tls",
        f"--backend=127.0.0.1,{upstream};;proto=h2;no-tls",
        "--workers=1", "--no-via", "--no-server-rewrite", "--conf=/dev/null",
        "--accesslog-file=/dev/null", f"--errorlog-file={log_dir / (name + '-errors.log')}",
    ]  # fmt: skip
    return Server(name, argv, port, log_dir / f"{name}.log", program)
