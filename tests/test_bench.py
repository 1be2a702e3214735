"""The benchmark command keeps working: `python -m bench --quick` runs every part and
writes every headline figure. No thresholds here: timings on a shared machine are noise,
so figures are read from a full run (docs/performance.md), not from tests."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from bench.report import TARGETS_TABLE

REPO = Path(__file__).resolve().parents[1]


def test_the_quick_benchmark_runs_every_part_and_writes_the_headline_figures(tmp_path: Path):
    out = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(out.read_text())
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
