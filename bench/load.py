"""Load from h2load (nghttp2's C HTTP/2 load generator) with pre-encoded request bodies.

A gRPC request is an HTTP/2 POST whose body is length-prefixed messages; h2load sends a
file as every request's body, so a gRPC call is that file plus the gRPC headers. One
message makes a unary call; several make a bidi call that sends them all, half-closes,
and reads the answers. h2load checks only the HTTP status (always 200 in gRPC), so the
benchmark makes one real gRPC call with the same headers before each load to prove the
call succeeds, and compares the served counts in the proxy's own metrics.

h2load runs one thread (`-t1`): on a 2-core machine it takes part of a core and leaves
the rest to the servers. It drives the saturation runs only.

Latency at a fixed rate, bidi ping-pong and held connections come from `bench.h2gen`, a
raw HTTP/2 client process of our own: h2load cannot space requests evenly (`--rps` fires
every client's timer together, at most every 10 ms: 87-90 % of requests left in bursts
under 200 µs apart; its timing scripts re-arm every client's timer from one loop time,
so clients that fire together once stay together), and it cannot ping-pong on a bidi
stream. `Spacing` proves, from the departure times h2gen records, how evenly a latency
run's calls really left.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import struct
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

#: Length of the unmeasured run before each measured one.
WARM_SECONDS = 0.5
#: Concurrent connections for throughput runs ("saturation, 16 connections").
CONNECTIONS = 16
#: Fewest clients for fixed-rate runs (one request in flight each; more at higher rates,
#: so a slow answer delays one client's next request, not the offered load).
RATE_CLIENTS = 4


def grpc_frames(messages: list[bytes]) -> bytes:
    """gRPC length-prefixed messages, uncompressed."""
    return b"".join(b"\x00" + struct.pack(">I", len(m)) + m for m in messages)


def grpc_headers(token: str | None = None) -> list[str]:
    args = ["-H", "content-type: application/grpc", "-H", "te: trailers"]
    if token:
        args += ["-H", f"authorization: Bearer {token}"]
    return args


@dataclass
class Load:
    requests: int
    seconds: float
    latencies_ms: list[float]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def h2load(url: str, args: list[str], log: Path, measured: bool = True) -> Load:
    """Run h2load against `url`; every request must get a 2xx (and a measured run must
    complete some)."""
    log.unlink(missing_ok=True)
    proc = await asyncio.create_subprocess_exec(
        "h2load", "-t1", *args, f"--log-file={log}", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out = (await proc.communicate())[0].decode()
    if proc.returncode != 0:
        raise RuntimeError(f"h2load {url} failed:\n{out}")
    fields = next(line for line in out.splitlines() if line.startswith("requests:")).split()
    done, succeeded = int(fields[5]), int(fields[7])
    if (measured and done == 0) or succeeded != done:
        raise RuntimeError(f"h2load {url}: {succeeded} of {done} requests succeeded:\n{out}")
    rows = [row.split("\t") for row in log.read_text().splitlines() if row]
    if not rows:
        return Load(0, 0.0, [])
    # The log covers the measurement period only (not the warm-up): its own span is the
    # duration; h2load's printed req/s divides by a duration that includes connecting.
    starts = [int(r[0]) for r in rows]
    ends = [int(r[0]) + int(r[2]) for r in rows]
    span = (max(ends) - min(starts)) / 1e6
    return Load(len(rows), span, [int(r[2]) / 1000 for r in rows])


async def saturate(
    url: str, extra: list[str], seconds: float, log: Path, streams: int = 4, measured: bool = True
) -> Load:
    """As many requests as the server takes: CONNECTIONS connections, `streams` each. No
    warm-up period, so every request the servers' CPU time covers is counted (warm up
    with a run before)."""
    args = [f"-c{CONNECTIONS}", f"-m{streams}", f"-D{_ms(seconds)}"]
    return await h2load(url, [*args, *extra], log, measured)


async def warm_up(url: str, extra: list[str], log: Path, streams: int = 4) -> Load:
    """An unmeasured run: connections, caches and the servers' first calls."""
    return await saturate(url, extra, WARM_SECONDS, log, streams, measured=False)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}ms"


# --- bench.h2gen: open-loop latency, bidi ping-pong, held connections --------------------


@dataclass
class Target:
    """Where bench.h2gen sends: a gRPC method on a loopback port, one framed message."""

    port: int
    path: str
    body: Path
    headers: list[str] = field(default_factory=list)  # "name: value"

    def argv(self, mode: str) -> list[str]:
        argv = [sys.executable, "-m", "bench.h2gen", mode, "--port", str(self.port)]
        argv += ["--path", self.path, "--body", str(self.body)]
        for header in self.headers:
            argv += ["--header", header]
        return argv


def token_headers(token: str | None) -> list[str]:
    return [f"authorization: Bearer {token}"] if token else []


#: The longest stdout line read from h2gen (its result holds every call's times).
RESULT_LIMIT = 1 << 26
#: A departure gap under this is a burst (h2load --rps sent 87-90 % of calls so).
BURST_GAP_US = 200


@dataclass
class Spacing:
    """How evenly a run's calls left: gaps between consecutive departures."""

    gaps_us: list[int]
    offered: float  # calls/s asked for
    sent_rate: float  # calls/s that left, measured from the departures
    late: int  # calls sent over 1 ms after their due time
    calls: int

    @classmethod
    def of(cls, departures_us: list[int], offered: float, late: int) -> Spacing:
        gaps = [b - a for a, b in itertools.pairwise(departures_us)]
        span = (departures_us[-1] - departures_us[0]) / 1e6 if len(departures_us) > 1 else 0
        rate = (len(departures_us) - 1) / span if span else 0.0
        return cls(gaps, offered, rate, late, len(departures_us))

    def summary(self) -> dict[str, float]:
        gaps = self.gaps_us or [0]
        return {
            "offered": self.offered,
            "sent_rate": self.sent_rate,
            "gap_median_us": statistics.median(gaps),
            "gap_p1_us": percentile(gaps, 1),
            "gap_p99_us": percentile(gaps, 99),
            "burst_share": sum(1 for g in gaps if g < BURST_GAP_US) / len(gaps),
            "late_share": self.late / max(1, self.calls),
        }


@dataclass
class OpenLoop:
    """One open-loop latency run (see bench.h2gen `unary`)."""

    offered: float
    seconds: float  # the schedule's length (the warm-up left out)
    answered_seconds: float  # first departure to last answer: longer when it fell behind
    latencies_us: list[int]
    spacing: Spacing
    failed: int  # answered without a message, reset, or not answered at all
    not_sent: int
    gen_cpu_us: float  # bench.h2gen's own CPU per call

    @property
    def served_rate(self) -> float:
        return len(self.latencies_us) / self.answered_seconds


def percentile(values: list[int] | list[float], p: float) -> float:
    """The nearest-rank percentile of `values` (unsorted)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def _h2gen(argv: list[str], on_line: Callable[[str], Awaitable[None]] | None = None) -> dict:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, limit=RESULT_LIMIT
    )
    assert proc.stdout is not None and proc.stderr is not None
    result = None
    async for raw in proc.stdout:
        line = raw.decode().strip()
        if line.startswith("result "):
            result = json.loads(line[7:])
        elif on_line is not None:
            await on_line(line)
    err = (await proc.stderr.read()).decode()
    if await proc.wait() != 0 or result is None:
        raise RuntimeError(f"{' '.join(argv[2:5])} failed: {err[-3000:]}")
    return result


def rate_connections(rate: float) -> int:
    """Connections for a fixed-rate run: RATE_CLIENTS, more at higher rates (as before)."""
    return max(RATE_CLIENTS, int(rate) // 100)


async def open_loop(target: Target, rate: float, seconds: float) -> OpenLoop:
    """`rate` unary calls per second, evenly spaced, for `seconds` after a warm-up."""
    argv = [
        *target.argv("unary"),
        "--rate", str(rate), "--seconds", str(seconds), "--warm", str(WARM_SECONDS),
        "--connections", str(rate_connections(rate)),
    ]  # fmt: skip
    r = await _h2gen(argv)
    if not r["latency_us"]:
        raise RuntimeError(f"h2gen {target.path}: no call of {r['sent']} was answered: {r}")
    return OpenLoop(
        offered=rate,
        seconds=r["seconds"],
        answered_seconds=r["answered_seconds"],
        latencies_us=r["latency_us"],
        spacing=Spacing.of(r["departures_us"], rate, r["late"]),
        failed=r["failed"] + r["unanswered"],
        not_sent=r["not_sent"],
        gen_cpu_us=r["cpu_us_per_call"],
    )


async def pingpong(
    target: Target, streams: int, seconds: float, on_mark: Callable[[str], Awaitable[None]]
) -> dict:
    """Bidi ping-pong on `streams` streams over CONNECTIONS connections; `on_mark` is
    awaited at "start" and "stop" (read the servers' CPU there). The result's `echoes`
    were all answered between the two."""
    argv = [
        *target.argv("bidi"),
        "--streams", str(streams), "--connections", str(min(streams, CONNECTIONS)),
        "--seconds", str(seconds), "--warm", str(WARM_SECONDS),
    ]  # fmt: skip
    return await _h2gen(argv, on_mark)


class Held:
    """bench.h2gen `hold`: idle connections, then open streams on them (for memory)."""

    def __init__(self, target: Target, connections: int) -> None:
        self.argv = [*target.argv("hold"), "--connections", str(connections)]
        self.proc: asyncio.subprocess.Process | None = None

    async def _line(self, prefix: str, timeout: float = 60.0) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            line = (await asyncio.wait_for(self.proc.stdout.readline(), timeout)).decode()
        except TimeoutError:
            raise RuntimeError(
                f"h2gen hold: no {prefix.strip()!r} within {timeout:.0f} s"
            ) from None
        if not line.startswith(prefix):
            assert self.proc.stderr is not None
            await self.proc.wait()
            err = (await self.proc.stderr.read()).decode()
            raise RuntimeError(f"h2gen hold: expected {prefix!r}, got {line!r}: {err[-3000:]}")
        return line

    async def open(self) -> None:
        """Start; return once every connection is past the preface and SETTINGS."""
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        await self._line("idle ")

    async def streams(self, count: int) -> None:
        """Open `count` streams; return once each had its message echoed."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(f"streams {count}\n".encode())
        await self.proc.stdin.drain()
        await self._line("streams ", timeout=30.0)

    async def close(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
