"""Load from h2load (nghttp2's C HTTP/2 load generator) with pre-encoded request bodies.

A gRPC request is an HTTP/2 POST whose body is length-prefixed messages; h2load sends a
file as every request's body, so a gRPC call is that file plus the gRPC headers. One
message makes a unary call; several make a bidi call that sends them all, half-closes,
and reads the answers. h2load checks only the HTTP status (always 200 in gRPC), so the
benchmark makes one real gRPC call with the same headers before each load to prove the
call succeeds, and compares the served counts in the proxy's own metrics.

h2load runs one thread (`-t1`): on a 2-core machine it takes part of a core and leaves
the rest to the servers.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass
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


async def fixed_rate(url: str, rate: int, extra: list[str], seconds: float, log: Path) -> Load:
    """`rate` requests per second (RATE_CLIENTS clients, one request in flight each)."""
    clients = max(RATE_CLIENTS, rate // 100)  # a request every 10 ms or more per client
    per_client = max(1, rate // clients)
    args = [f"-c{clients}", "-m1", f"--rps={per_client}", f"-D{_ms(seconds)}"]
    return await h2load(url, [*args, f"--warm-up-time={_ms(WARM_SECONDS)}", *extra], log)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}ms"
