"""The benchmark's figures: the headline ratios (the JSON keys the docs quote), the
printed table, and the latency plot."""

from __future__ import annotations

from pathlib import Path

from .load import Load
from .sidecar import TARGETS, Results

#: The headline figures and their targets: (key, target, "max" or "min").
TARGETS_TABLE = (
    ("proxy_cpu_ratio_vs_passthrough", 1.15, "max"),
    ("proxy_cpu_ratio_vs_backend", 1.4, "max"),
    ("proxied_rps_ratio_vs_direct", 0.5, "min"),
    ("ext_authz_grpc_ratio", 0.85, "min"),
    ("ext_authz_http_ratio", 0.85, "min"),
    ("ext_authz_p50_ms_at_1k", 0.35, "max"),
    ("ext_authz_p99_ms_at_1k", 3.0, "max"),
    ("policy_match_ratio_100k_vs_10", 1.5, "max"),
    ("redis_state_ratio", 0.8, "min"),
)


def percentiles(load: Load) -> dict[str, float]:
    return {"p50_ms": load.percentile(50), "p99_ms": load.percentile(99), "rps": load.rps}


def sidecar_figures(results: Results, rate: int) -> dict:
    out: dict = {}
    for kind in ("unary", "stream"):
        out[kind] = {
            target: {
                "rps": results.rps(kind, target),
                "cpu_us": results.cpu_us(kind, target, target),
                "backend_cpu_us": results.cpu_us(kind, target, "direct"),
            }
            for target in TARGETS
        }
    out["latency"] = {
        f"{target}@{r}": percentiles(load) for (target, r), load in results.latency.items()
    }
    out["rate"] = rate
    return out


def headline(f: dict) -> dict[str, float]:
    """The figures the targets are set on, from the detailed ones."""
    out: dict[str, float] = {}
    for kind, prefix in (("unary", ""), ("stream", "stream_")):
        k = f["sidecar"][kind]
        out[f"{prefix}proxy_cpu_ratio_vs_passthrough"] = (
            k["proxy"]["cpu_us"] / k["passthrough"]["cpu_us"]
        )
        out[f"{prefix}proxy_cpu_ratio_vs_backend"] = k["proxy"]["cpu_us"] / k["direct"]["cpu_us"]
        out[f"{prefix}passthrough_cpu_ratio_vs_backend"] = (
            k["passthrough"]["cpu_us"] / k["direct"]["cpu_us"]
        )
        out[f"{prefix}proxied_rps_ratio_vs_direct"] = k["proxy"]["rps"] / k["direct"]["rps"]
        out[f"{prefix}passthrough_rps_ratio_vs_direct"] = (
            k["passthrough"]["rps"] / k["direct"]["rps"]
        )
        out[f"{prefix}cold_verify_cpu_ratio_vs_cached"] = (
            k["proxy, cold verify"]["cpu_us"] / k["proxy"]["cpu_us"]
        )
    rate = f["sidecar"]["rate"]
    for target in ("direct", "passthrough", "proxy"):
        lat = f["sidecar"]["latency"][f"{target}@{rate}"]
        out[f"{target}_p50_ms_at_1k"] = lat["p50_ms"]
        out[f"{target}_p99_ms_at_1k"] = lat["p99_ms"]
    e = f["ext_authz"]
    out["ext_authz_grpc_ratio"] = e["check"]["rps"] / e["bare check"]["rps"]
    out["ext_authz_http_ratio"] = e["http"]["rps"] / e["bare http"]["rps"]
    out["ext_authz_p50_ms_at_1k"] = f["ext_authz_latency"]["check"]["p50_ms"]
    out["ext_authz_p99_ms_at_1k"] = f["ext_authz_latency"]["check"]["p99_ms"]
    out["ext_authz_http_p50_ms_at_1k"] = f["ext_authz_latency"]["http"]["p50_ms"]
    out["ext_authz_http_p99_ms_at_1k"] = f["ext_authz_latency"]["http"]["p99_ms"]
    m = f["micro"]
    out["policy_match_ratio_100k_vs_10"] = m["policy_match"]["ratio_100k_vs_10"]
    for alg, row in m["cold_verify"]["algorithms"].items():
        out[f"verify_{alg}_ratio_vs_pyjwt"] = row["ratio"]
    if "state" in f:
        out["redis_state_ratio"] = f["state"]["revocation"]["ratio"]
        out["redis_rate_limit_ratio"] = f["state"]["rate limit"]["ratio"]
        out["redis_single_use_ratio"] = f["state"]["single use"]["ratio"]
    return out


def _meets(value: float, target: float, way: str) -> str:
    ok = value <= target if way == "max" else value >= target
    return "yes" if ok else "NO"


def print_table(f: dict) -> None:
    workers = f" (proxy --workers {f['workers']})" if f["workers"] > 1 else ""
    print(f"sidecar{workers}: h2load, 16 connections; CPU µs per call from /proc (medians)")
    print(
        f"  {'':20} {'unary/s':>9} {'CPU µs':>8} {'backend':>8}   {'stream msg/s':>12} {'CPU µs':>8}"
    )
    for target in TARGETS:
        u, s = f["sidecar"]["unary"][target], f["sidecar"]["stream"][target]
        print(
            f"  {target:20} {u['rps']:9.0f} {u['cpu_us']:8.1f} {u['backend_cpu_us']:8.1f}"
            f"   {s['rps']:12.0f} {s['cpu_us']:8.1f}"
        )
    rate = f["sidecar"]["rate"]
    print(f"latency at {rate}/s offered (unary; ext_authz checks):")
    rows = [(t, f["sidecar"]["latency"][f"{t}@{rate}"]) for t in ("direct", "passthrough", "proxy")]
    rows += [(f"ext_authz {t}", lat) for t, lat in f["ext_authz_latency"].items()]
    for name, lat in rows:
        print(f"  {name:20} p50 {lat['p50_ms']:6.2f} ms   p99 {lat['p99_ms']:6.2f} ms")
    print("ext_authz, h2load at saturation (medians):")
    for target, row in f["ext_authz"].items():
        print(f"  {target:20} {row['rps']:9.0f}/s  CPU {row['cpu_us']:7.1f} µs per check")
    if "state" in f:
        print("shared state, sidecar calls/s:   memory      Redis   Redis/memory")
        for row, v in f["state"].items():
            print(f"  {row:28} {v['memory_rps']:8.0f} {v['redis_rps']:10.0f}   {v['ratio']:.2f}")
    cold = f["micro"]["cold_verify"]
    print("cold verification, µs per token:  ours    PyJWT   ours/PyJWT")
    for alg, row in cold["algorithms"].items():
        print(f"  {alg:28} {row['ours_us']:6.1f} {row['pyjwt_us']:8.1f}   {row['ratio']:.2f}")
    match = f["micro"]["policy_match"]
    sizes = "  ".join(f"{n}: {row['lookup_ns']:.0f} ns" for n, row in match["sizes"].items())
    print(f"policy match per call: {sizes}")
    print("headline figures (targets are for a full run; --quick figures are noisier):")
    for key, target, way in TARGETS_TABLE:
        if key in f:
            sign = "≤" if way == "max" else "≥"
            verdict = _meets(f[key], target, way)
            print(f"  {key:34} {f[key]:8.3f}   target {sign} {target:<5}  {verdict}")


def plot(figures: dict, rates: tuple[int, ...], path: Path) -> None:
    """p50 and p99 latency against offered load for direct, passthrough and proxy, from
    the figures' latency runs. A hollow marker: the target did not keep up (it served
    under 90 % of the offered load), so its latency includes queueing in h2load."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install -e '.[bench]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latency = figures["sidecar"]["latency"]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for target, colour in (
        ("direct", "tab:green"),
        ("passthrough", "tab:blue"),
        ("proxy", "tab:red"),
    ):
        runs = [(r, latency[f"{target}@{r}"]) for r in rates if f"{target}@{r}" in latency]
        for q, style, alpha in (("p50_ms", "-", 1.0), ("p99_ms", "--", 0.55)):
            ax.plot([r for r, _ in runs], [v[q] for _, v in runs], style, color=colour,
                    alpha=alpha, label=f"{target} {q[:3]}")  # fmt: skip
            for r, v in runs:
                kept_up = v["rps"] >= 0.9 * r
                ax.plot(r, v[q], "o", color=colour, alpha=alpha,
                        markerfacecolor=colour if kept_up else "white")  # fmt: skip
    ax.set_xlabel("offered load (unary calls/s); hollow: under 90 % of it served")
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_yscale("log")
    ax.set_title("Unary call latency vs offered load (h2load, loopback, 2 cores)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":  # redraw a plot from a run's JSON: python -m bench.report IN OUT
    import json
    import sys

    data = json.loads(Path(sys.argv[1]).read_text())
    offered = sorted({int(k.rpartition("@")[2]) for k in data["sidecar"]["latency"]})
    plot(data, tuple(offered), Path(sys.argv[2]))
