"""The benchmark: every figure measured in one run, on loopback, as ratios.

    .venv/bin/python -m bench [--quick] [--json PATH] [--plot PATH] [--workers N]
    .venv/bin/python -m bench --tracing [--baseline-tree DIR] [--seconds S] [--rounds N]
    .venv/bin/python -m bench --state [--seconds S] [--rounds N] [--json PATH]

Starts everything itself, each server in its own process: the echo backend, a bare
passthrough (the proxy's frame relay with a decision that costs nothing), the proxy
(cached token and cold verification), bare no-op ext_authz servers and ours,
Redis-backed and in-memory sidecars (when `redis-server` is installed), and, for scale in
the latency runs, nghttpx relaying with no auth (when installed) and a byte pipe on
asyncio (`bench.pipe`, the floor of any relay in a Python process). h2load drives
the saturation runs; bench.h2gen (our raw HTTP/2 client) the evenly spaced latency runs
at 100, 1,000 and 3,000 calls/s, bidi ping-pong and the connections held for memory.
Prints a table; with `--json` writes the figures; with `--plot` draws latency against
offered load. The table's first line (and the JSON's `machine`) names the Python every
server ran on.
`--quick` (under a minute) keeps the benchmark working in CI: its figures are noisier,
and nothing checks them against targets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from . import load, machine, memory, micro, report
from . import state as state_bench
from .ext_authz import ExtAuthzBench
from .fixtures import make_fixtures
from .sidecar import TARGETS, Results, SidecarBench

#: Offered loads for latency percentiles (calls or checks per second): the shape of
#: OPA-Envoy's published latency table.
RATES = (100, 1000, 3000)
#: The offered load the headline latency figures and ratios use.
RATE = 1000
#: Offered loads for the latency plot.
SWEEP = (250, 500, 1000, 1500, 2000, 2500, 3000)
#: Memory: idle connections held, then open streams on them (figures per 1,000). Under
#: 800 streams: the proxy's upstream pool opens at most 8 connections of 100 streams to
#: a backend, and further calls wait for a free stream.
MEMORY_CONNECTIONS = 1000
MEMORY_STREAMS = 500


def _options(args: argparse.Namespace) -> dict:
    """Run lengths. A latency run at rate R lasts `latency[R]` seconds after the warm-up
    (per round, a full run has 400 calls at 100/s, 4,000 at 1,000/s, 4,500 at 3,000/s)."""
    if args.quick:
        return {
            "seconds": 0.8, "bidi_seconds": 0.5, "rounds": 1, "warm": 0.2,
            "latency": {100: 0.6, 1000: 0.3, 3000: 0.2}, "sweep_seconds": 0.5,
            "memory": (500, 300),
        }  # fmt: skip
    return {
        "seconds": args.seconds, "bidi_seconds": args.seconds, "rounds": args.rounds,
        "warm": 0.5, "latency": {100: 4.0, 1000: 2.0, 3000: 1.5}, "sweep_seconds": 2.0,
        "memory": (MEMORY_CONNECTIONS, MEMORY_STREAMS),
    }  # fmt: skip


async def measure(args: argparse.Namespace, tmp: Path) -> dict:
    opts = _options(args)
    load.WARM_SECONDS = opts["warm"]
    (tmp / "config").mkdir()
    logs = tmp / "logs"  # apart from the config: the proxy watches its files' directory
    logs.mkdir()
    fx = make_fixtures(tmp / "config")
    figures: dict = {
        "quick": args.quick,
        "workers": args.workers,
        "rounds": opts["rounds"],
        "machine": machine.describe(),
    }
    # Before any server starts (they inherit it): room for the held connections.
    held = memory.fd_room(opts["memory"][0])
    redis = None
    if state_bench.available():
        redis = state_bench.RedisServer(logs / "redis-workers")
        redis.start()
    elif args.workers > 1:
        raise SystemExit("--workers needs redis-server (the workers share state in Redis)")

    try:
        sidecar = SidecarBench(fx, logs, args.workers, redis.url if redis else None)
        try:
            await sidecar.start()
            results = Results()
            await sidecar.measure(results, opts["seconds"], opts["rounds"], opts["bidi_seconds"])
            await sidecar.latency(results.latency, RATES, opts["latency"], opts["rounds"])
            if args.plot:
                sweep = dict.fromkeys(SWEEP, opts["sweep_seconds"])
                await sidecar.latency(results.sweep, SWEEP, sweep, 1, TARGETS[:3])
            figures["sidecar"] = report.sidecar_figures(results, RATE)
        finally:
            sidecar.stop()

        ext = ExtAuthzBench(fx, logs)
        try:
            await ext.start()
            figures["ext_authz"] = await ext.measure(opts["seconds"], opts["rounds"])
            latency = await ext.latency(RATES, opts["latency"], opts["rounds"])
            figures["ext_authz_latency"] = {
                f"{t}@{r}": report.latency_figures(runs) for (t, r), runs in latency.items()
            }
        finally:
            ext.stop()

        if held:
            streams = min(opts["memory"][1], held * 100)
            figures["memory"] = await memory.measure(fx, logs, held, streams)

        if state_bench.available():
            backend = state_bench.procs.baseline("state-backend", "backend", logs)
            state = state_bench.StateBench(fx, logs, backend.port)
            try:
                await backend.wait_listening()
                await state.start()
                figures["state"] = await state.measure(opts["seconds"], opts["rounds"])
            finally:
                state.stop()
                backend.stop()
    finally:
        if redis is not None:
            redis.stop()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run, under a minute")
    parser.add_argument("--seconds", type=float, default=4.0, help="each throughput run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (medians)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--plot", type=Path, help="draw latency vs offered load (PNG)")
    parser.add_argument("--workers", type=int, default=1, help="the proxy's --workers")
    parser.add_argument(
        "--tracing", action="store_true", help="only what tracing costs (bench/tracing.py)"
    )
    parser.add_argument(
        "--baseline-tree", type=Path, help="with --tracing: a source tree without tracing"
    )
    parser.add_argument(
        "--state",
        action="store_true",
        help="only the shared-state rows: memory vs Redis, Sentinel and Cluster (bench/state.py)",
    )
    args = parser.parse_args(argv)
    if shutil.which("h2load") is None:
        print("bench: needs h2load (apt-get install nghttp2-client)", file=sys.stderr)
        return 2
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    if args.tracing:
        return _tracing(args)
    if args.state:
        return _state(args)
    tmp = Path(tempfile.mkdtemp(prefix="authproxy-bench-"))
    try:
        figures = asyncio.run(measure(args, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    figures["micro"] = micro.run(quick=args.quick)  # in-process: no event loop running
    figures.update(report.headline(figures))
    figures["ratio_rounds"] = report.ratio_rounds(figures)
    if args.plot:
        report.plot(figures, SWEEP, args.plot)
    report.print_table(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    return 0


def _state(args: argparse.Namespace) -> int:
    """`--state`: the shared-state rows alone."""
    if not state_bench.available():
        print("bench: --state needs redis-server (apt-get install redis-server)", file=sys.stderr)
        return 2

    async def measure(tmp: Path) -> dict:
        (tmp / "config").mkdir()
        logs = tmp / "logs"
        logs.mkdir()
        fx = make_fixtures(tmp / "config")
        backend = state_bench.procs.baseline("state-backend", "backend", logs)
        part = state_bench.StateBench(fx, logs, backend.port)
        try:
            await backend.wait_listening()
            await part.start()
            return {"state": await part.measure(args.seconds, args.rounds)}
        finally:
            part.stop()
            backend.stop()

    tmp = Path(tempfile.mkdtemp(prefix="authproxy-bench-"))
    try:
        figures = asyncio.run(measure(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    figures["machine"] = machine.describe()
    report.print_state(figures["state"])
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    return 0


def _tracing(args: argparse.Namespace) -> int:
    """`--tracing`: the tracing part alone (needs the otel extra)."""
    from . import tracing

    async def measure(tmp: Path) -> dict:
        (tmp / "config").mkdir()
        part = tracing.TracingBench(make_fixtures(tmp / "config"), tmp, args.baseline_tree)
        try:
            await part.start()
            await part.measure(args.seconds, args.rounds)
        finally:
            await part.stop()
        return part.figures()

    tmp = Path(tempfile.mkdtemp(prefix="authproxy-bench-"))
    try:
        figures = asyncio.run(measure(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tracing.print_figures(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
