"""The benchmark command keeps working: `python -m bench --quick` runs every part and
writes every headline figure, naming the Python that produced them. No thresholds here:
timings on a shared machine are noise, so figures are read from a full run
(docs/performance.md), not from tests.

Also the pieces whose mistakes no figure would show: the passthrough is the proxy's relay
and decides nothing, and the benchmark stands on its own (no pytest, nothing from tests/).
"""

from __future__ import annotations

import json
import math
import platform
import re
import subprocess
import sys
from pathlib import Path

import grpc

from bench import pipe
from bench.passthrough import build_passthrough
from bench.report import RATIO_LINES, TARGETS_TABLE
from tests.support.echo_backend import start_echo_backend

REPO = Path(__file__).resolve().parents[1]


def test_the_state_rows_run_alone_against_every_redis_mode(tmp_path: Path):
    """`python -m bench --state` (README, Benchmark): the shared-state rows by themselves."""
    out = tmp_path / "state.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--state", "--seconds", "0.5", "--rounds", "1",
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    state = json.loads(out.read_text())["state"]
    assert set(state) == {"revocation", "rate limit", "single use"}
    for row in state.values():
        assert row["memory_rps"] > 0 and row["cluster_ratio"] > 0 and row["sentinel_ratio"] > 0
    assert "Sentinel" in done.stdout and "Cluster" in done.stdout


def test_the_quick_benchmark_runs_every_part_and_writes_the_headline_figures(tmp_path: Path):
    out = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(out.read_text())
    python = platform.python_version()  # every server ran on the interpreter running this
    assert figures["machine"]["python"] == python, figures["machine"]
    assert done.stdout.startswith(f"machine: Python {python} "), done.stdout[:200]
    for key, _, _ in TARGETS_TABLE:  # the keys the docs quote, all measured
        assert math.isfinite(figures[key]) and figures[key] > 0, (key, figures.get(key))
        assert key in done.stdout
    for kind in ("unary", "stream"):
        for target in ("direct", "passthrough", "proxy", "proxy, cold verify"):
            row = figures["sidecar"][kind][target]
            assert row["rps"] > 0 and row["cpu_us"] > 0, (kind, target, row)
    assert set(figures["micro"]["cold_verify"]["algorithms"]) == {
        "RS256",
        "ES256",
        "EdDSA",
        "HS256",
    }
    assert set(figures["state"]) == {"revocation", "rate limit", "single use"}
    for row in figures["state"].values():  # in-memory against each Redis mode
        for mode in ("redis", "sentinel", "cluster"):
            assert row[f"{mode}_rps"] > 0, row
        assert row["ratio"] > 0 and row["sentinel_ratio"] > 0 and row["cluster_ratio"] > 0
    for target in ("direct", "passthrough", "proxy"):  # bidi ping-pong
        row = figures["sidecar"]["bidi"][target]
        assert row["rps"] > 0 and row["cpu_us"] > 0 and row["generator_cpu_us"] > 0, row
    for key, label in RATIO_LINES:  # the data-plane ratio lines
        assert math.isfinite(figures[key]) and figures[key] > 0, (key, figures.get(key))
        assert label in done.stdout and f"[{key}]" in done.stdout
    _assert_latency_table(figures, done.stdout)
    _assert_memory_lines(figures, done.stdout)


def _assert_latency_table(figures: dict, stdout: str) -> None:
    """p50/p99/p99.9 at 100, 1,000 and 3,000/s for six targets (for scale too: nghttpx,
    the C relay, and the asyncio byte pipe), each with the measured spacing of its departures (the proof that
    calls left evenly, not in bursts)."""
    assert "latency, open loop" in stdout and "departure spacing" in stdout
    section = stdout[stdout.index("latency, open loop") : stdout.index("ext_authz, h2load")]
    runs = {f"{t}@{r}": figures["sidecar"]["latency"] for t in ("direct", "proxy", "nghttpx", "pipe")
            for r in (100, 1000, 3000)}  # fmt: skip
    runs.update({f"{t}@{r}": figures["ext_authz_latency"] for t in ("check", "bare check")
                 for r in (100, 1000, 3000)})  # fmt: skip
    for key, table in runs.items():
        row = table[key]
        assert row["n"] > 0 and row["rps"] > 0, (key, row)
        assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["p999_ms"], (key, row)
        assert all(v > 0 for v in row["p50_ms_rounds"]), (key, row)
        spacing = row["spacing"]
        assert spacing["gap_median_us"] > 0 and spacing["sent_rate"] > 0, (key, spacing)
        assert 0 <= spacing["burst_share"] <= spacing["burst_share_worst"] <= 1, (key, spacing)
        assert 0 <= spacing["late_share"] <= 1, (key, spacing)
        target, _, rate = key.partition("@")  # a latency row and a spacing row
        name = target if table is figures["sidecar"]["latency"] else f"ext_authz {target}"
        rows = re.findall(rf"^  {re.escape(name)} +{rate} ", section, re.M)
        assert len(rows) == 2, (key, section)


def _assert_memory_lines(figures: dict, stdout: str) -> None:
    for server in ("proxy", "backend"):
        row = figures["memory"][server]
        assert row["connections"] > 0 and row["streams"] > 0, row
        for key in ("mib_per_1k_connections", "mib_per_1k_streams", "base_mib"):
            assert math.isfinite(row[key]) and row[key] > 0, (server, key, row)
        assert math.isfinite(figures[f"{server}_rss_mib_per_1k_connections"])
    assert stdout.count("MiB per 1,000 idle connections") == 2
    assert stdout.count("MiB per 1,000 open streams") == 2


async def test_the_passthrough_relays_calls_and_headers_without_deciding():
    """A token that verifies nowhere goes through untouched (no pipeline runs), other
    headers too; the relay's own rules still hold (client-set `x-auth-*` never reaches a
    backend). Unary and bidi calls are relayed both ways."""
    backend = await start_echo_backend()
    relay = build_passthrough(f"127.0.0.1:{backend.port}")
    port = await relay.listen("127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            sent = (
                ("authorization", "Bearer not.a.token"),
                ("x-auth-subject", "forged"),
                ("x-custom", "kept"),
            )
            answer = await channel.unary_unary("/any.Service/Report")(
                b"", metadata=sent, timeout=10
            )
            received = dict(json.loads(answer)["metadata"])
            assert received["authorization"] == "Bearer not.a.token"
            assert received["x-custom"] == "kept"
            assert "x-auth-subject" not in received
            chat = channel.stream_stream("/any.Service/Chat")(iter([b"a", b"b"]), timeout=10)
            assert [m async for m in chat] == [b"echo:a", b"echo:b"]
    finally:
        await relay.stop(0)
        await backend.server.stop(None)  # type: ignore[union-attr]


async def test_the_pipe_carries_a_call_without_reading_it():
    """The byte pipe (the latency runs' floor for a Python relay) moves bytes, so a gRPC
    call through it reaches the backend exactly as sent, forged headers included: it is a
    measuring stick, not a relay that could stand in for the proxy."""
    backend = await start_echo_backend()
    listener = await pipe.listen("127.0.0.1", 0, f"127.0.0.1:{backend.port}")
    port = listener.sockets[0].getsockname()[1]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            sent = (("x-auth-subject", "forged"),)
            answer = await channel.unary_unary("/any.Service/Report")(
                b"", metadata=sent, timeout=10
            )
            assert dict(json.loads(answer)["metadata"])["x-auth-subject"] == "forged"
    finally:
        listener.close()
        await backend.server.stop(None)  # type: ignore[union-attr]


def test_the_benchmark_imports_neither_pytest_nor_the_tests():
    """`python -m bench` runs where the test suite is not installed."""
    probe = (
        "import pkgutil, importlib, sys, bench\n"
        "for m in pkgutil.iter_modules(bench.__path__): importlib.import_module('bench.' + m.name)\n"
        "print(sorted(n for n in sys.modules if n == 'pytest' or n.split('.')[0] == 'tests'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
