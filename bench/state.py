"""Shared state: the sidecar with Redis state against the same sidecar with in-memory
state, in front of the same echo backend, alternating, medians of the rounds.

- revocation: access tokens; every call checks revocation in the local view (Redis keeps
  it fresh by pub/sub: no round trip per call). h2load.
- rate limit: a `rate_limit` every call is counted in but never reaches (the `limits`
  moving window: one Lua script per call in Redis). h2load.
- single use: a `single_use` rule, so every call needs a fresh token (one Redis `SET NX`
  per call). h2load sends one header set, so this row uses a grpc.aio client with tokens
  minted ahead; its absolute rate is bounded by that client, its ratio is still fair.

Each row runs against in-memory state and against Redis in each of its modes: one server,
a Sentinel-managed primary (a primary, a replica, three sentinels) and a Redis Cluster
(three primaries; needs `redis-cli` to create it), all on loopback. Ratios are to
in-memory, from the same run.

Needs `redis-server`; the benchmark starts its own on free ports.
"""

from __future__ import annotations

import asyncio
import statistics
from pathlib import Path

import grpc

from . import load, procs, redis_server
from .fixtures import AUTH_POLICY, PAYLOAD, Fixtures, check_allowed, decision_counts
from .redis_cluster import RedisCluster, cli_binary
from .redis_sentinel import SentinelTopology
from .redis_server import RedisServer
from .servers import UNARY_METHOD

RULE = "/bench.Svc/*: access"
POLICIES = {
    "revocation": AUTH_POLICY,
    "rate limit": AUTH_POLICY.replace(
        RULE, "/bench.Svc/*: {level: access, rate_limit: {limit: 10000/second, key: subject}}"
    ),
    "single use": AUTH_POLICY.replace(RULE, "/bench.Svc/*: {level: access, single_use: true}"),
}
CLIENT_CONCURRENCY = 16
#: The Redis modes, each compared with in-memory state.
MODES = ("redis", "sentinel", "cluster")


def available() -> bool:
    return redis_server.binary() is not None


class StateBench:
    def __init__(self, fx: Fixtures, logs: Path, backend_port: int) -> None:
        self.fx = fx
        self.logs = logs
        self.redis = RedisServer(logs / "redis")
        self.redis.start()
        self.sentinel = SentinelTopology(logs / "sentinel")
        self.sentinel.start()
        urls = {"redis": self.redis.url, "sentinel": self.sentinel.url}
        self.cluster: RedisCluster | None = None
        if cli_binary() is not None:
            self.cluster = RedisCluster(logs / "cluster")
            self.cluster.start()
            urls["cluster"] = self.cluster.url
        self.stores = ("memory", *urls)
        upstream = ["--upstream", f"127.0.0.1:{backend_port}"]
        self.proxies: dict[tuple[str, str], procs.Server] = {}
        self.admin: dict[tuple[str, str], int] = {}
        for row, policy in POLICIES.items():
            for store in self.stores:
                flags = [*upstream, *fx.proxy_flags(policy)]
                if store != "memory":
                    flags += ["--redis", urls[store]]
                self.admin[row, store] = procs.free_port()
                flags += ["--admin", str(self.admin[row, store])]
                name = f"state-{row.replace(' ', '-')}-{store}"
                self.proxies[row, store] = procs.proxy(name, flags, logs)
        self.body = logs / "state-body.grpc"
        self.body.write_bytes(load.grpc_frames([PAYLOAD]))

    async def start(self) -> None:
        for server in self.proxies.values():
            await server.wait_listening()

    def stop(self) -> None:
        for server in self.proxies.values():
            server.stop()
        self.redis.stop()
        self.sentinel.stop()
        if self.cluster is not None:
            self.cluster.stop()

    async def _rate(self, row: str, store: str, seconds: float) -> float:
        server = self.proxies[row, store]
        if row == "single use":
            return await single_use_rate(server.port, self.fx, seconds)
        url = f"http://127.0.0.1:{server.port}{UNARY_METHOD}"
        args = ["-d", str(self.body), *load.grpc_headers(self.fx.token)]
        await load.warm_up(url, args, self.logs / "warm.log")
        before = await decision_counts(self.admin[row, store])
        result = await load.saturate(url, args, seconds, self.logs / "h2load.log")
        after = await decision_counts(self.admin[row, store])
        check_allowed(f"{row}, {store}", result.requests, before, after)
        return result.rps

    async def measure(self, seconds: float, rounds: int) -> dict[str, dict[str, float]]:
        """Per row: calls/s of each store (medians of `rounds` rounds, the stores taking
        turns within each round) and each Redis mode's ratio to in-memory (`ratio` for
        one server, `sentinel_ratio`, `cluster_ratio`), with the rounds' spread."""
        runs: dict[tuple[str, str], list[float]] = {pair: [] for pair in self.proxies}
        for _ in range(rounds):
            for row, store in self.proxies:
                runs[row, store].append(await self._rate(row, store, seconds))
        result = {}
        for row in POLICIES:
            memory = statistics.median(runs[row, "memory"])
            figures = {"memory_rps": memory}
            for store in self.stores[1:]:
                prefix = "" if store == "redis" else f"{store}_"
                figures[f"{store}_rps"] = statistics.median(runs[row, store])
                ratios = [m / r for m, r in zip(runs[row, store], runs[row, "memory"], strict=True)]
                figures[f"{prefix}ratio"] = figures[f"{store}_rps"] / memory
                figures[f"{prefix}ratio_spread"] = [min(ratios), max(ratios)]
            result[row] = figures
        return result


async def single_use_rate(port: int, fx: Fixtures, seconds: float) -> float:
    """Calls/s when every call presents a fresh single-use token; every call must pass."""
    tokens = iter(fx.fresh_tokens(int(3000 * seconds) + 100))
    loop = asyncio.get_running_loop()
    done = 0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(UNARY_METHOD)

        async def worker() -> None:
            nonlocal done
            for token in tokens:
                await call(PAYLOAD, metadata=(("authorization", f"Bearer {token}"),))
                done += 1
                if loop.time() > deadline:
                    return

        deadline = loop.time() + seconds
        start = loop.time()
        await asyncio.gather(*(worker() for _ in range(CLIENT_CONCURRENCY)))
        return done / (loop.time() - start)
