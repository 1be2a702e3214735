"""The benchmark command keeps working (it prints ratios; no thresholds here: timings on
shared machines are noise, so figures are read from `python -m bench.run`, not tests)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_runs_and_prints_its_ratios():
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--seconds", "0.3", "--concurrency", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for label in (
        "proxied (no auth) / direct",
        "proxied (auth)    / direct",
        "auth / no auth (proxied)",
    ):
        assert re.search(re.escape(label) + r"\s+=\s+\d+\.\d\d", done.stdout), done.stdout
    assert re.search(r"cached token\s+\d+\.\d µs/decision", done.stdout), done.stdout
    for label in (
        "Check / bare Check server",
        "HTTP mode / bare aiohttp",
    ):
        assert re.search(re.escape(label) + r"\s+=\s+\d+\.\d\d", done.stdout), done.stdout
    for row in (
        "revocation checked (local view)",
        "single-use tokens (SET NX)",
        "rate limit (moving window)",
    ):
        ratio = re.escape(row) + r"\s+\d+/s\s+\d+/s\s+=\s+\d+\.\d\d"
        assert re.search(ratio, done.stdout), done.stdout
    for name in ("Check", "bare Check", "HTTP mode", "bare aiohttp"):
        assert re.search(rf"{name}\s+p50 \d+\.\d\d ms\s+p99 \d+\.\d\d ms", done.stdout), done.stdout
