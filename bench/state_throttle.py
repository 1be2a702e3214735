"""How `--state-staleness` and `--state-timeout` fare on a CPU-throttled pod.

    .venv/bin/python -m bench.state_throttle [--seconds 60] [--quotas 100,250]
        [--staleness 1,2,5] [--timeouts 0.5] [--loads idle,busy]

Each run is a child process holding one `RedisState` (Redis itself runs unthrottled, as
it would on its own node), confined to a CFS quota of Q millicores per 100 ms period: a
cgroup (v1 `cpu` or v2 `cpu.max`; needs root), else SIGSTOP/SIGCONT duty cycling. The
child checks `check_fresh()` every 10 ms, as requests would, and counts the failures
(spurious STATE_UNAVAILABLE: Redis is up all along) and the stale episodes. Loads:
`idle` (a quiet proxy); `half` (CPU work in 0.5 ms slices, half the quota); `full` (16
tasks burning 0.5 ms slices: the loop saturated, a proxy at its CPU limit); `over` (64
tasks burning 1 ms slices: every call waits ~64 ms of CPU per loop turn, far past
overload). At the end, five bursts of 100 concurrent `first_use` calls on a cold
connection pool count the operations that fail within `--state-timeout`.

Runs of the same quota and load (one per staleness and timeout) run side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PERIOD_US = 100_000
CHECK_EVERY = 0.01


# --- the child: one RedisState under the quota ------------------------------------------------


async def child(
    url: str, staleness: float, timeout: float, seconds: float, load: str, quota: int
) -> dict:
    from authproxy.state.redis_store import RedisState
    from authproxy.state.store import StateUnavailable

    logging.disable(logging.WARNING)  # the failures are counted, not printed

    async def burn(slice_: float, pause: float) -> None:
        while True:
            start = time.perf_counter()
            while time.perf_counter() - start < slice_:
                pass
            await asyncio.sleep(pause)

    state = RedisState(url, namespace=f"bench-{os.getpid()}", staleness=staleness, timeout=timeout)
    await state.start()
    half_pause = 0.0005 * (2000 / quota - 1)  # 0.5 ms of CPU, then idle: half the quota
    count, slice_, pause = {
        "idle": (0, 0.0, 0.0),
        "half": (1, 0.0005, half_pause),
        "full": (16, 0.0005, 0.0),
        "over": (64, 0.001, 0.0),
    }[load]
    burners = [asyncio.create_task(burn(slice_, pause)) for _ in range(count)]
    checks = failed = episodes = 0
    stale_since: float | None = None
    longest = 0.0
    end = time.monotonic() + seconds
    while (now := time.monotonic()) < end:
        checks += 1
        try:
            state.check_fresh()
            if stale_since is not None:
                longest = max(longest, now - stale_since)
                stale_since = None
        except StateUnavailable:
            failed += 1
            if stale_since is None:
                episodes += 1
                stale_since = now
        await asyncio.sleep(CHECK_EVERY)
    burst_errors = 0
    for i in range(5):  # a cold pool: 100 concurrent operations open up to 64 connections
        cold = RedisState(url, namespace=f"bench-{os.getpid()}", timeout=timeout)
        exp = time.time() + 60
        results = await asyncio.gather(
            *(cold.first_use(f"burst-{i}-{n}", exp) for n in range(100)), return_exceptions=True
        )
        burst_errors += sum(isinstance(r, BaseException) for r in results)
        await cold.client.aclose()
        await cold.client.connection_pool.disconnect()
    for task in burners:
        task.cancel()
    feed_failures = state.failures_total
    await state.close()
    return {
        "checks": checks,
        "failed_checks": failed,
        "stale_episodes": episodes,
        "longest_stale_s": round(longest, 3),
        "feed_failures": feed_failures,
        "burst_errors_of_500": burst_errors,
    }


# --- the parent: quotas, runs side by side, the table -------------------------------------------


def cgroup_root() -> tuple[str, Path] | None:
    v1 = Path("/sys/fs/cgroup/cpu")
    if (v1 / "cpu.cfs_quota_us").exists() and os.access(v1, os.W_OK):
        return "v1", v1
    v2 = Path("/sys/fs/cgroup")
    controllers = v2 / "cgroup.subtree_control"
    if controllers.exists() and os.access(v2, os.W_OK) and "cpu" in controllers.read_text().split():
        return "v2", v2
    return None


class Throttle:
    """A CFS quota for one process: a cgroup, or SIGSTOP/SIGCONT duty cycling."""

    def __init__(self, millicores: int, name: str) -> None:
        self.quota_us = millicores * PERIOD_US // 1000
        self.root = cgroup_root()
        self.group: Path | None = None
        self._stop = threading.Event()
        if self.root is not None:
            kind, base = self.root
            self.group = base / name
            self.group.mkdir(exist_ok=True)
            if kind == "v1":
                (self.group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                (self.group / "cpu.cfs_quota_us").write_text(str(self.quota_us))
            else:
                (self.group / "cpu.max").write_text(f"{self.quota_us} {PERIOD_US}")

    def enter(self) -> None:
        """In the child, before exec: join the cgroup."""
        if self.group is not None:
            (self.group / "cgroup.procs").write_text(str(os.getpid()))

    def follow(self, pid: int) -> None:
        if self.group is not None:
            return
        run, rest = self.quota_us / 1e6, (PERIOD_US - self.quota_us) / 1e6

        def cycle() -> None:
            while not self._stop.is_set():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
                time.sleep(run)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
                time.sleep(rest)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

        threading.Thread(target=cycle, daemon=True).start()

    def throttled(self) -> str:
        if self.group is None or self.root is None or self.root[0] != "v1":
            return ""
        stat = dict(line.split() for line in (self.group / "cpu.stat").read_text().splitlines())
        return f"{stat['nr_throttled']}/{stat['nr_periods']} periods throttled"

    def close(self) -> None:
        self._stop.set()
        if self.group is not None:
            with contextlib.suppress(OSError):
                self.group.rmdir()


def parent(args: argparse.Namespace) -> None:
    from bench.redis_server import RedisServer

    server = RedisServer(Path(tempfile.mkdtemp(prefix="bench-redis-")))
    server.start()
    print(
        f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}; {args.seconds:.0f} s runs"
    )
    header = "quota  load  staleness timeout  checks failed episodes longest feed_err burst_err"
    print(header)
    try:
        for quota in args.quotas:
            for load in args.loads:
                runs = []
                for staleness in args.staleness:
                    for timeout in args.timeouts:
                        name = f"authproxy-bench-{os.getpid()}-{len(runs)}"
                        throttle = Throttle(quota, name)
                        proc = subprocess.Popen(
                            [sys.executable, "-m", "bench.state_throttle", "--child", server.url,
                             "--seconds", str(args.seconds), "--staleness", str(staleness),
                             "--timeouts", str(timeout), "--loads", load, "--quotas", str(quota)],
                            stdout=subprocess.PIPE, text=True, preexec_fn=throttle.enter,
                        )  # fmt: skip
                        throttle.follow(proc.pid)
                        runs.append((staleness, timeout, throttle, proc))
                for staleness, timeout, throttle, proc in runs:
                    out, _ = proc.communicate(timeout=args.seconds * 4 + 120)
                    note = throttle.throttled()
                    throttle.close()
                    r = json.loads(out.strip().splitlines()[-1])
                    print(
                        f"{quota:>4}m {load:>5} {staleness:>7.1f} s {timeout:>5.1f} s"
                        f" {r['checks']:>7} {r['failed_checks']:>6} {r['stale_episodes']:>8}"
                        f" {r['longest_stale_s']:>6.2f}s {r['feed_failures']:>8}"
                        f" {r['burst_errors_of_500']:>9}  {note}",
                        flush=True,
                    )
        root = cgroup_root()
        print(f"(throttled by {f'cgroup {root[0]}' if root else 'SIGSTOP/SIGCONT duty cycling'})")
    finally:
        server.stop()


def numbers(kind: type) -> object:
    return lambda value: [kind(v) for v in value.split(",")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", metavar="REDIS_URL", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--quotas", type=numbers(int), default=[100, 250], help="millicores")
    p.add_argument("--staleness", type=numbers(float), default=[1.0, 2.0, 5.0])
    p.add_argument("--timeouts", type=numbers(float), default=[0.5])
    p.add_argument("--loads", type=lambda v: v.split(","), default=["idle", "half", "full", "over"])
    args = p.parse_args()
    if args.child:
        result = asyncio.run(
            child(
                args.child,
                args.staleness[0],
                args.timeouts[0],
                args.seconds,
                args.loads[0],
                args.quotas[0],
            )
        )
        print(json.dumps(result))
    else:
        parent(args)


if __name__ == "__main__":
    main()
