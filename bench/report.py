"""The benchmark's figures: the headline ratios (the JSON keys the docs quote), the
printed table, and the latency plot."""

from __future__ import annotations

import statistics
from pathlib import Path

from .load import BURST_GAP_US, OpenLoop, Spacing, percentile
from .machine import line as machine_line
from .sidecar import BIDI_STREAMS, BIDI_TARGETS, C_RELAY, PIPE, TARGETS, Results

#: The headline figures and their targets: (key, target, "max" or "min"). The data plane's
#: (a frame relay: the proxy should cost less per call than the backend it protects),
#: then ext_authz's, then the shared state's and the policy lookup's.
TARGETS_TABLE = (
    ("proxy_cpu_ratio_vs_backend", 0.6, "max"),
    ("proxied_rps_ratio_vs_direct", 0.6, "min"),
    ("bidi_proxy_cpu_ratio_vs_backend", 0.45, "max"),
    ("bidi_proxied_rps_ratio_vs_direct", 0.75, "min"),
    ("cold_verify_cpu_ratio_vs_backend", 1.2, "max"),
    ("proxied_p50_ratio_vs_direct_at_1k", 1.3, "max"),
    ("ext_authz_grpc_cpu_ratio", 0.5, "max"),
    ("ext_authz_http_cpu_ratio", 0.8, "max"),
    ("ext_authz_p50_ratio_vs_bare_at_1k", 1.0, "max"),
    ("policy_match_ratio_100k_vs_10", 1.5, "max"),
    ("redis_state_ratio", 0.8, "min"),
)

#: The data-plane ratio lines, in the order printed: (key, label).
RATIO_LINES = (
    ("proxy_cpu_ratio_vs_backend", "proxy CPU per unary call ÷ backend's"),
    ("proxied_rps_ratio_vs_direct", "proxied ÷ direct unary calls/s"),
    ("bidi_proxy_cpu_ratio_vs_backend", "proxy CPU per bidi message ÷ backend's"),
    ("bidi_proxied_rps_ratio_vs_direct", "proxied ÷ direct bidi messages/s"),
    (
        "cold_verify_cpu_ratio_vs_backend",
        "proxy CPU per call, token verified every call ÷ backend's",
    ),
    ("ext_authz_grpc_cpu_ratio", "our Check CPU ÷ bare Check CPU"),
    ("ext_authz_http_cpu_ratio", "our HTTP mode CPU ÷ bare aiohttp handler CPU"),
    ("proxied_p50_ratio_vs_direct_at_1k", "p50 at 1,000/s: proxied ÷ direct"),
    ("c_relay_p50_ratio_vs_direct_at_1k", "p50 at 1,000/s: nghttpx (C relay, no auth) ÷ direct"),
    ("pipe_p50_ratio_vs_direct_at_1k", "p50 at 1,000/s: asyncio byte pipe (no HTTP/2) ÷ direct"),
    ("ext_authz_p50_ratio_vs_bare_at_1k", "Check p50 at 1,000/s ÷ bare Check p50"),
)

#: Latency targets for scale, not for a target: (latency target, its p50 ratio's key).
_SCALE = (
    (C_RELAY, "c_relay_p50_ratio_vs_direct_at_1k"),
    (PIPE, "pipe_p50_ratio_vs_direct_at_1k"),
)


def latency_figures(runs: list[OpenLoop]) -> dict:
    """One target at one rate: percentiles of every round's calls pooled, p50 per round,
    and the spacing of the departures (gaps within each run, pooled)."""
    latencies = [v for run in runs for v in run.latencies_us]
    gaps = [g for run in runs for g in run.spacing.gaps_us]
    calls = sum(run.spacing.calls for run in runs)
    pooled = Spacing(gaps, runs[0].offered, 0.0, sum(run.spacing.late for run in runs), calls)
    spacing = pooled.summary()
    spacing["sent_rate"] = statistics.median(run.spacing.sent_rate for run in runs)
    spacing["burst_share_worst"] = max(run.spacing.summary()["burst_share"] for run in runs)
    return {
        "offered": runs[0].offered,
        "rounds": len(runs),
        "n": len(latencies),
        "p50_ms": percentile(latencies, 50) / 1000,
        "p99_ms": percentile(latencies, 99) / 1000,
        "p999_ms": percentile(latencies, 99.9) / 1000,
        "p50_ms_rounds": [percentile(run.latencies_us, 50) / 1000 for run in runs],
        # answered calls/s, over the time to the last answer (a backlog lowers it)
        "rps": len(latencies) / sum(run.answered_seconds for run in runs),
        "failed": sum(run.failed for run in runs),
        "not_sent": sum(run.not_sent for run in runs),
        "generator_cpu_us": statistics.median(run.gen_cpu_us for run in runs),
        "spacing": spacing,
    }


def _row(results: Results, kind: str, target: str) -> dict:
    row = {
        "rps": results.rps(kind, target),
        "cpu_us": results.cpu_us(kind, target, target),
        "backend_cpu_us": results.cpu_us(kind, target, "direct"),
        "rps_rounds": results.rounds(kind, target),
        "cpu_us_rounds": results.rounds(kind, target, target),
    }
    if kind == "bidi":
        row["generator_cpu_us"] = results.cpu_us(kind, target, "generator")
    return row


def sidecar_figures(results: Results, rate: int) -> dict:
    out: dict = {}
    for kind in ("unary", "stream", "bidi"):
        targets = BIDI_TARGETS if kind == "bidi" else TARGETS
        out[kind] = {target: _row(results, kind, target) for target in targets}
    out["latency"] = {f"{t}@{r}": latency_figures(runs) for (t, r), runs in results.latency.items()}
    if results.sweep:
        out["sweep"] = {f"{t}@{r}": latency_figures(runs) for (t, r), runs in results.sweep.items()}
    out["rate"] = rate
    return out


def headline(f: dict) -> dict[str, float]:
    """The figures the targets are set on, from the detailed ones."""
    out: dict[str, float] = {}
    for kind, prefix in (("unary", ""), ("stream", "stream_"), ("bidi", "bidi_")):
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
        if "proxy, cold verify" in k:
            out[f"{prefix}cold_verify_cpu_ratio_vs_cached"] = (
                k["proxy, cold verify"]["cpu_us"] / k["proxy"]["cpu_us"]
            )
    unary = f["sidecar"]["unary"]
    out["cold_verify_cpu_ratio_vs_backend"] = (
        unary["proxy, cold verify"]["cpu_us"] / unary["direct"]["cpu_us"]
    )
    rate = f["sidecar"]["rate"]
    lat = f["sidecar"]["latency"]
    for target in ("direct", "proxy"):
        for q in ("p50", "p99", "p999"):
            out[f"{target}_{q}_ms_at_1k"] = lat[f"{target}@{rate}"][f"{q}_ms"]
    out["proxied_p50_ratio_vs_direct_at_1k"] = (
        out["proxy_p50_ms_at_1k"] / out["direct_p50_ms_at_1k"]
    )
    for scale, key in _SCALE:  # what a relay in C, and a Python event loop, add here
        if f"{scale}@{rate}" in lat:
            out[key] = lat[f"{scale}@{rate}"]["p50_ms"] / out["direct_p50_ms_at_1k"]
    e = f["ext_authz"]
    out["ext_authz_grpc_ratio"] = e["check"]["rps"] / e["bare check"]["rps"]
    out["ext_authz_http_ratio"] = e["http"]["rps"] / e["bare http"]["rps"]
    out["ext_authz_grpc_cpu_ratio"] = e["check"]["cpu_us"] / e["bare check"]["cpu_us"]
    out["ext_authz_http_cpu_ratio"] = e["http"]["cpu_us"] / e["bare http"]["cpu_us"]
    elat = f["ext_authz_latency"]
    for q in ("p50", "p99", "p999"):
        out[f"ext_authz_{q}_ms_at_1k"] = elat[f"check@{rate}"][f"{q}_ms"]
        out[f"ext_authz_bare_{q}_ms_at_1k"] = elat[f"bare check@{rate}"][f"{q}_ms"]
    out["ext_authz_p50_ratio_vs_bare_at_1k"] = (
        out["ext_authz_p50_ms_at_1k"] / out["ext_authz_bare_p50_ms_at_1k"]
    )
    for server, row in f.get("memory", {}).items():
        out[f"{server}_rss_mib_per_1k_connections"] = row["mib_per_1k_connections"]
        out[f"{server}_rss_mib_per_1k_streams"] = row["mib_per_1k_streams"]
    m = f["micro"]
    out["policy_match_ratio_100k_vs_10"] = m["policy_match"]["ratio_100k_vs_10"]
    for alg, row in m["cold_verify"]["algorithms"].items():
        out[f"verify_{alg}_ratio_vs_pyjwt"] = row["ratio"]
    if "state" in f:
        out["redis_state_ratio"] = f["state"]["revocation"]["ratio"]
        out["redis_rate_limit_ratio"] = f["state"]["rate limit"]["ratio"]
        out["redis_single_use_ratio"] = f["state"]["single use"]["ratio"]
    return out


def _span(ours: list[float], floor: list[float]) -> list[float]:
    """Lowest and highest of the per-round ratios (the rounds ran side by side)."""
    ratios = [a / b for a, b in zip(ours, floor, strict=False) if b]
    return [min(ratios), max(ratios)] if ratios else []


def ratio_rounds(f: dict) -> dict[str, list[float]]:
    """The spread of each RATIO_LINES ratio over the rounds."""
    u, b, e = f["sidecar"]["unary"], f["sidecar"]["bidi"], f["ext_authz"]
    rate = f["sidecar"]["rate"]
    lat, elat = f["sidecar"]["latency"], f["ext_authz_latency"]
    spans = {
        "proxy_cpu_ratio_vs_backend": _span(
            u["proxy"]["cpu_us_rounds"], u["direct"]["cpu_us_rounds"]
        ),
        "proxied_rps_ratio_vs_direct": _span(u["proxy"]["rps_rounds"], u["direct"]["rps_rounds"]),
        "bidi_proxy_cpu_ratio_vs_backend": _span(
            b["proxy"]["cpu_us_rounds"], b["direct"]["cpu_us_rounds"]
        ),
        "bidi_proxied_rps_ratio_vs_direct": _span(
            b["proxy"]["rps_rounds"], b["direct"]["rps_rounds"]
        ),
        "cold_verify_cpu_ratio_vs_backend": _span(
            u["proxy, cold verify"]["cpu_us_rounds"], u["direct"]["cpu_us_rounds"]
        ),
        "ext_authz_grpc_cpu_ratio": _span(
            e["check"]["cpu_us_rounds"], e["bare check"]["cpu_us_rounds"]
        ),
        "ext_authz_http_cpu_ratio": _span(
            e["http"]["cpu_us_rounds"], e["bare http"]["cpu_us_rounds"]
        ),
        "proxied_p50_ratio_vs_direct_at_1k": _span(
            lat[f"proxy@{rate}"]["p50_ms_rounds"], lat[f"direct@{rate}"]["p50_ms_rounds"]
        ),
        "ext_authz_p50_ratio_vs_bare_at_1k": _span(
            elat[f"check@{rate}"]["p50_ms_rounds"], elat[f"bare check@{rate}"]["p50_ms_rounds"]
        ),
    }
    for scale, key in _SCALE:
        if f"{scale}@{rate}" in lat:
            spans[key] = _span(
                lat[f"{scale}@{rate}"]["p50_ms_rounds"], lat[f"direct@{rate}"]["p50_ms_rounds"]
            )
    return spans


def _meets(value: float, target: float, way: str) -> str:
    ok = value <= target if way == "max" else value >= target
    return "yes" if ok else "NO"


def _rates(latency: dict) -> list[tuple[str, int]]:
    pairs = [(k.rpartition("@")[0], int(k.rpartition("@")[2])) for k in latency]
    order = {t: i for i, (t, _) in enumerate(pairs)}
    return sorted(pairs, key=lambda p: (order[p[0]], p[1]))


def _print_latency(f: dict) -> None:
    tables = [("", f["sidecar"]["latency"]), ("ext_authz ", f["ext_authz_latency"])]
    rounds = f.get("rounds", 1)
    print(
        f"latency, open loop (bench.h2gen: calls evenly spaced at the offered rate, round-robin"
        f" over max(4, rate/100) connections; targets alternating, {rounds} round(s) pooled):"
    )
    print(
        f"  {'target':20} {'offered':>7} {'answered/s':>10} {'n':>6} {'p50 ms':>7} {'p99 ms':>7}"
        f" {'p99.9 ms':>8}  {'p50 by round':>13} {'failed':>6}"
    )
    for prefix, lat in tables:
        for target, rate in _rates(lat):
            row = lat[f"{target}@{rate}"]
            by_round = row["p50_ms_rounds"]
            spread = f"{min(by_round):.2f}-{max(by_round):.2f}"
            flag = "" if row["rps"] >= 0.9 * rate else "  (overloaded: under 90 % answered)"
            print(
                f"  {prefix + target:20} {rate:7d} {row['rps']:10.0f} {row['n']:6d}"
                f" {row['p50_ms']:7.2f} {row['p99_ms']:7.2f} {row['p999_ms']:8.2f}"
                f"  {spread:>13} {row['failed'] + row['not_sent']:6d}{flag}"
            )
    print(
        f"departure spacing of those runs (gaps between consecutive sends, from h2gen's send"
        f" timestamps; h2load --rps sent 87-90 % of calls < {BURST_GAP_US} µs apart):"
    )
    print(
        f"  {'target':20} {'offered':>7} {'sent/s':>7} {'gap median':>10} {'gap p1-p99':>13}"
        f"  {'<' + str(BURST_GAP_US) + ' µs':>7} {'worst rnd':>9} {'late>1ms':>8}"
        f" {'h2gen CPU µs/call':>17}"
    )
    for prefix, lat in tables:
        for target, rate in _rates(lat):
            row = lat[f"{target}@{rate}"]
            sp = row["spacing"]
            p1_p99 = f"{sp['gap_p1_us']:.0f}-{sp['gap_p99_us']:.0f} µs"
            print(
                f"  {prefix + target:20} {rate:7d} {sp['sent_rate']:7.0f}"
                f" {sp['gap_median_us']:7.0f} µs {p1_p99:>13}  {sp['burst_share']:7.1%}"
                f" {sp['burst_share_worst']:9.1%} {sp['late_share']:8.1%}"
                f" {row['generator_cpu_us']:17.0f}"
            )


def print_table(f: dict) -> None:
    if "machine" in f:
        print(machine_line(f["machine"]))
    workers = f" (proxy --workers {f['workers']})" if f["workers"] > 1 else ""
    print(f"sidecar{workers}: h2load, 16 connections; CPU µs per call from /proc (medians)")
    print(
        "  (direct: the echo backend; passthrough: the proxy's frame relay deciding nothing,"
        " its floor; proxy: the same relay and the decision)"
    )
    print(
        f"  {'':20} {'unary/s':>9} {'CPU µs':>8} {'backend':>8}   {'stream msg/s':>12} {'CPU µs':>8}"
    )
    for target in TARGETS:
        u, s = f["sidecar"]["unary"][target], f["sidecar"]["stream"][target]
        print(
            f"  {target:20} {u['rps']:9.0f} {u['cpu_us']:8.1f} {u['backend_cpu_us']:8.1f}"
            f"   {s['rps']:12.0f} {s['cpu_us']:8.1f}"
        )
    print(
        f"bidi ping-pong (bench.h2gen: {BIDI_STREAMS} streams over 16 connections, each sends"
        f" its next message when the echo is back; medians):"
    )
    print(f"  {'':20} {'msg/s':>9} {'CPU µs/msg':>10} {'backend':>8} {'h2gen':>6}")
    for target in BIDI_TARGETS:
        b = f["sidecar"]["bidi"][target]
        print(
            f"  {target:20} {b['rps']:9.0f} {b['cpu_us']:10.1f} {b['backend_cpu_us']:8.1f}"
            f" {b['generator_cpu_us']:6.1f}"
        )
    _print_latency(f)
    print("ext_authz, h2load at saturation (medians):")
    for target, row in f["ext_authz"].items():
        print(f"  {target:20} {row['rps']:9.0f}/s  CPU {row['cpu_us']:7.1f} µs per check")
    if "memory" in f:
        any_row = next(iter(f["memory"].values()))
        print(
            f"memory (VmRSS growth of a fresh process: {any_row['connections']} connections past"
            f" the preface and SETTINGS, no streams; then {any_row['streams']} bidi streams held"
            " open on them):"
        )
        for server, row in f["memory"].items():
            print(
                f"  {server:10} {row['mib_per_1k_connections']:7.2f} MiB per 1,000 idle connections"
                f"   {row['mib_per_1k_streams']:7.2f} MiB per 1,000 open streams"
                f"   (base {row['base_mib']:.0f} MiB)"
            )
    if "state" in f:
        print_state(f["state"])
    cold = f["micro"]["cold_verify"]
    print("cold verification, µs per token:  ours    PyJWT   ours/PyJWT")
    for alg, row in cold["algorithms"].items():
        print(f"  {alg:28} {row['ours_us']:6.1f} {row['pyjwt_us']:8.1f}   {row['ratio']:.2f}")
    match = f["micro"]["policy_match"]
    sizes = "  ".join(f"{n}: {row['lookup_ns']:.0f} ns" for n, row in match["sizes"].items())
    print(f"policy match per call: {sizes}")
    targets = {key: (target, way) for key, target, way in TARGETS_TABLE}
    spreads = f.get("ratio_rounds", {})
    print("ratios (medians of each side; in brackets the lowest-highest per-round ratio):")
    for key, label in RATIO_LINES:
        if key not in f:
            continue
        spread = spreads.get(key) or []
        rounds = f"({spread[0]:.2f}-{spread[1]:.2f})" if spread else ""
        verdict = ""
        if key in targets:
            target, way = targets[key]
            sign = "≤" if way == "max" else "≥"
            verdict = f"target {sign} {target:<5} {_meets(f[key], target, way)}"
        print(f"  {label:58} {f[key]:6.2f} {rounds:13} {verdict:18} [{key}]")
    print("headline figures (targets are for a full run; --quick figures are noisier):")
    for key, target, way in TARGETS_TABLE:
        if key in f and key not in dict(RATIO_LINES):
            sign = "≤" if way == "max" else "≥"
            verdict = _meets(f[key], target, way)
            print(f"  {key:34} {f[key]:8.3f}   target {sign} {target:<5}  {verdict}")


def plot(figures: dict, rates: tuple[int, ...], path: Path) -> None:
    """p50 and p99 latency against offered load for direct, passthrough, proxy (and, for
    scale, nghttpx and the byte pipe), from the figures' open-loop runs. A hollow marker: the target did not keep up (it answered
    under 90 % of the offered load)."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install -e '.[bench]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latency = {**figures["sidecar"]["latency"], **figures["sidecar"].get("sweep", {})}
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for target, colour in (
        ("direct", "tab:green"),
        ("passthrough", "tab:blue"),
        ("proxy", "tab:red"),
        (C_RELAY, "tab:gray"),  # when installed: a C relay, for scale
        (PIPE, "tab:purple"),  # for scale: a byte pipe on asyncio
    ):
        runs = [(r, latency[f"{target}@{r}"]) for r in rates if f"{target}@{r}" in latency]
        swept = any(k.startswith(f"{target}@") for k in figures["sidecar"].get("sweep", {}))
        for q, style, alpha in (("p50_ms", "-", 1.0), ("p99_ms", "--", 0.55)):
            # a target measured at the latency runs' rates only: points, no line between
            ax.plot([r for r, _ in runs], [v[q] for _, v in runs],
                    linestyle=style if swept else "none", color=colour, alpha=alpha, label=f"{target} {q[:3]}",
                    marker=None if swept else ("o" if q == "p50_ms" else "s"))  # fmt: skip
            for r, v in runs:
                kept_up = v["rps"] >= 0.9 * r
                ax.plot(r, v[q], "o", color=colour, alpha=alpha,
                        markerfacecolor=colour if kept_up else "white")  # fmt: skip
    ax.set_xlabel("offered load (unary calls/s); hollow: under 90 % of it served")
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_yscale("log")
    ax.set_title("Unary call latency vs offered load (evenly spaced, loopback, 2 cores)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":  # redraw a plot from a run's JSON: python -m bench.report IN OUT
    import json
    import sys

    data = json.loads(Path(sys.argv[1]).read_text())
    runs = {**data["sidecar"]["latency"], **data["sidecar"].get("sweep", {})}
    offered = sorted({int(k.rpartition("@")[2]) for k in runs})
    plot(data, tuple(offered), Path(sys.argv[2]))


def print_state(state: dict) -> None:
    """The shared-state rows: calls/s per store, and each Redis mode's ratio to memory."""
    modes = [
        m for m in ("redis", "sentinel", "cluster") if f"{m}_rps" in next(iter(state.values()))
    ]
    names = {"redis": "Redis", "sentinel": "Sentinel", "cluster": "Cluster"}
    print(
        "shared state, sidecar calls/s:   memory"
        + "".join(f" {names[m]:>10}" for m in modes)
        + "   ratios to memory [spread]"
    )
    for row, v in state.items():
        ratios = []
        for mode in modes:
            key = "ratio" if mode == "redis" else f"{mode}_ratio"
            low, high = v.get(f"{key}_spread", [v[key], v[key]])
            ratios.append(f"{names[mode]} {v[key]:.2f} [{low:.2f}, {high:.2f}]")
        print(
            f"  {row:28} {v['memory_rps']:8.0f}"
            + "".join(f" {v[f'{m}_rps']:10.0f}" for m in modes)
            + "   "
            + ", ".join(ratios)
        )
