"""The sidecar against its floors: the echo backend called directly, the same frame relay
with a decision that costs nothing (bench.servers passthrough: the relay's floor, so proxy
minus passthrough is the decision's cost), the proxy with a cached token, and the proxy
verifying every call's token (`--token-cache-size 0`: h2load sends one header set, so a
fresh token per call is a cache that never hits — the same verification work).

Each server is its own process. Throughput runs alternate the four targets for a number
of rounds and keep medians, so a slow moment on the shared machine hits every target,
not one; each run reads the servers' CPU time before and after (CPU µs per request).

Kinds of run: `unary` and `stream` (h2load at saturation: a bidi call that sends 50
messages, half-closes and reads the echoes) and `bidi` (bench.h2gen ping-pong: 64 streams
over 16 connections, each sending its next message when the last one's echo is back;
CPU µs per message). Latency: bench.h2gen open loop, evenly spaced calls at fixed rates,
direct and proxy alternating, rounds pooled.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from . import load, procs
from .fixtures import (
    PAYLOAD,
    Fixtures,
    check_allowed,
    check_answers_allowed,
    check_calls,
    decision_counts,
)
from .servers import STREAM_METHOD, UNARY_METHOD

#: Messages per bidi call: h2load sends them all, half-closes and reads the echoes.
STREAM_MESSAGES = 50
TARGETS = ("direct", "passthrough", "proxy", "proxy, cold verify")
#: Ping-pong bidi: a token is verified once per stream, so no "cold verify" row.
BIDI_TARGETS = TARGETS[:3]
BIDI_STREAMS = 64
#: For scale in the latency runs: a byte pipe on asyncio (`bench.pipe`), the floor of any
#: relay in a Python process.
PIPE = "pipe"
LATENCY_TARGETS = ("direct", "passthrough", "proxy", PIPE)
#: For scale in the latency runs, when installed: a relay written in C, no auth.
C_RELAY = "nghttpx"


@dataclass
class Run:
    rps: float  # calls (unary) or messages (bidi) per second
    cpu_us: dict[str, float]  # server name -> CPU µs per call or message


@dataclass
class Results:
    runs: dict[tuple[str, str], list[Run]] = field(default_factory=dict)  # (kind, target)
    #: (target, rate) -> one open-loop run per round
    latency: dict[tuple[str, int], list[load.OpenLoop]] = field(default_factory=dict)
    sweep: dict[tuple[str, int], list[load.OpenLoop]] = field(default_factory=dict)  # --plot

    def rps(self, kind: str, target: str) -> float:
        return statistics.median(r.rps for r in self.runs[kind, target])

    def cpu_us(self, kind: str, target: str, server: str) -> float:
        return statistics.median(r.cpu_us[server] for r in self.runs[kind, target])

    def rounds(self, kind: str, target: str, server: str | None = None) -> list[float]:
        """Per-round figures in round order: calls/s, or a server's CPU µs per call."""
        runs = self.runs[kind, target]
        return [r.rps if server is None else r.cpu_us[server] for r in runs]


class SidecarBench:
    def __init__(self, fx: Fixtures, logs: Path, workers: int = 1, redis: str | None = None):
        self.fx = fx
        self.logs = logs
        self.workers = workers
        self.backend = procs.baseline("backend", "backend", logs)
        self.passthrough = procs.baseline("passthrough", "passthrough", logs, self.backend.port)
        self.pipe = procs.baseline(PIPE, PIPE, logs, self.backend.port)
        extra = ["--upstream", f"127.0.0.1:{self.backend.port}", *fx.proxy_flags()]
        if workers > 1:
            extra += ["--workers", str(workers), "--redis", str(redis)]
        self.admin = {"proxy": procs.free_port(), "proxy, cold verify": procs.free_port()}
        self.proxy = procs.proxy("proxy", [*extra, "--admin", str(self.admin["proxy"])], logs)
        self.cold = procs.proxy(
            "proxy-cold",
            [*extra, "--admin", str(self.admin["proxy, cold verify"]), "--token-cache-size", "0"],
            logs,
        )
        self.servers = {
            "direct": self.backend,
            "passthrough": self.passthrough,
            "proxy": self.proxy,
            "proxy, cold verify": self.cold,
            PIPE: self.pipe,
        }
        self.latency_targets = LATENCY_TARGETS
        c_relay = procs.c_relay(C_RELAY, self.backend.port, logs)
        if c_relay is not None:
            self.servers[C_RELAY] = c_relay
            self.latency_targets = (*LATENCY_TARGETS, C_RELAY)

    async def start(self) -> None:
        for server in self.servers.values():
            await server.wait_listening()
        for target, server in self.servers.items():
            try:
                await check_calls(server.port, self._token(target), STREAM_MESSAGES)
            except (grpc.aio.AioRpcError, RuntimeError) as e:  # say which server, and why
                log = server.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(
                    f"{target}: a check call failed: {e}\n{server.log}:\n{log}"
                ) from e

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()

    def _token(self, target: str) -> str | None:
        return self.fx.token if target.startswith("proxy") else None

    def _target(self, target: str) -> load.Target:
        """bench.h2gen's target: one message, to the unary or the bidi method."""
        body = self.logs / "body-one.grpc"
        if not body.exists():
            body.write_bytes(load.grpc_frames([PAYLOAD]))
        port = self.servers[target].port
        return load.Target(port, UNARY_METHOD, body, load.token_headers(self._token(target)))

    def _args(self, kind: str, target: str) -> tuple[str, list[str]]:
        server = self.servers[target]
        if kind == "unary":
            body, method = [PAYLOAD], UNARY_METHOD
        else:
            body, method = [PAYLOAD] * STREAM_MESSAGES, STREAM_METHOD
        path = self.logs / f"body-{kind}.grpc"
        if not path.exists():
            path.write_bytes(load.grpc_frames(body))
        url = f"http://127.0.0.1:{server.port}{method}"
        return url, ["-d", str(path), *load.grpc_headers(self._token(target))]

    async def throughput(self, kind: str, target: str, seconds: float) -> Run:
        url, args = self._args(kind, target)
        streams = 4 if kind == "unary" else 1  # a bidi call is already 50 messages in flight
        await load.warm_up(url, args, self.logs / "warm.log", streams)
        counted = target in self.admin
        before = await decision_counts(self.admin[target], self.workers) if counted else {}
        cpu_before = {name: s.cpu() for name, s in self.servers.items()}
        result = await load.saturate(url, args, seconds, self.logs / "h2load.log", streams)
        cpu_after = {name: s.cpu() for name, s in self.servers.items()}
        if counted:
            after = await decision_counts(self.admin[target], self.workers)
            check_allowed(target, result.requests, before, after)
        per = STREAM_MESSAGES if kind == "stream" else 1
        served = result.requests * per
        cpu_us = {n: (cpu_after[n] - cpu_before[n]) / served * 1e6 for n in self.servers}
        return Run(served / result.seconds, cpu_us)

    async def bidi(self, target: str, seconds: float) -> Run:
        """Ping-pong messages/s and CPU µs per message, read at h2gen's start/stop marks."""
        cpu: dict[str, dict[str, float]] = {}

        async def mark(line: str) -> None:
            cpu[line] = {name: s.cpu() for name, s in self.servers.items()}

        counted = target in self.admin
        before = await decision_counts(self.admin[target], self.workers) if counted else {}
        aim = self._target(target)
        aim.path = STREAM_METHOD
        result = await load.pingpong(aim, BIDI_STREAMS, seconds, mark)
        if counted:  # one decision per stream
            after = await decision_counts(self.admin[target], self.workers)
            check_allowed(target, BIDI_STREAMS, before, after)
        echoes = result["echoes"]
        if not echoes or set(cpu) != {"start", "stop"}:
            raise RuntimeError(f"bidi {target}: {echoes} echoes, marks {sorted(cpu)}")
        cpu_us = {n: (cpu["stop"][n] - cpu["start"][n]) / echoes * 1e6 for n in self.servers}
        cpu_us["generator"] = result["cpu_us_per_echo"]
        return Run(echoes / result["seconds"], cpu_us)

    async def measure(
        self, results: Results, seconds: float, rounds: int, bidi_seconds: float | None = None
    ) -> None:
        for kind in ("unary", "stream", "bidi"):
            for _ in range(rounds):
                for target in BIDI_TARGETS if kind == "bidi" else TARGETS:
                    if kind == "bidi":
                        run = await self.bidi(target, bidi_seconds or seconds)
                    else:
                        run = await self.throughput(kind, target, seconds)
                    results.runs.setdefault((kind, target), []).append(run)

    async def open_loop(self, target: str, rate: int, seconds: float) -> load.OpenLoop:
        counted = target in self.admin
        before = await decision_counts(self.admin[target], self.workers) if counted else {}
        run = await load.open_loop(self._target(target), rate, seconds)
        if counted:
            after = await decision_counts(self.admin[target], self.workers)
            check_answers_allowed(target, len(run.latencies_us), before, after)
        return run

    async def latency(
        self,
        into: dict[tuple[str, int], list[load.OpenLoop]],
        rates: tuple[int, ...],
        seconds: dict[int, float],
        rounds: int,
        targets: tuple[str, ...] | None = None,
    ) -> None:
        """Open-loop runs at each rate: the targets (`latency_targets` unless given)
        alternating, `rounds` times."""
        for rate in rates:
            for _ in range(rounds):
                for target in targets or self.latency_targets:
                    run = await self.open_loop(target, rate, seconds[rate])
                    into.setdefault((target, rate), []).append(run)
