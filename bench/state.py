"""Benchmark shared state: the sidecar with in-memory state vs Redis-backed state, in one run.

    .venv/bin/python -m bench.state [--seconds 3] [--concurrency 16]

Both proxies run the full pipeline with the revocation check (a local view in both
cases: Redis keeps it fresh by pub/sub, so no round trip per call) in front of the echo
backend; the same Python client load drives each, alternating, medians of three rounds.
Two more rows: single-use tokens (one Redis `SET NX` per call) and a rate limit (the
`limits` moving window: one Lua script per call in Redis) against memory.
Needs `redis-server` (apt-get install redis-server); the benchmark starts its own.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
from pathlib import Path

import grpc

from bench.policies import AUTH_POLICY
from bench.run import drive, sidecar_config
from proxy.issuer import TokenIssuer
from proxy.keygen import keygen
from proxy.policy_file import parse_policy
from proxy.serve import AuthProxy
from tests.echo_backend import start_echo_backend
from tests.redis_server import RedisServer

ROUNDS = 3
SINGLE_USE = AUTH_POLICY.replace(
    "/bench.Svc/*: access", "/bench.Svc/*: {level: access, single_use: true}"
)
#: Counted on every call, never reached at these rates.
RATE_LIMITED = AUTH_POLICY.replace(
    "/bench.Svc/*: access",
    "/bench.Svc/*: {level: access, rate_limit: {limit: 10000/second, key: subject}}",
)


async def start(tmp: Path, policy: str, upstream: int, redis: str | None) -> AuthProxy:
    proxy = AuthProxy(sidecar_config(tmp, policy, upstream, redis=redis))
    await proxy.start()
    return proxy


async def single_use_rate(proxy: AuthProxy, issuer: TokenIssuer, seconds: float, n: int) -> float:
    """Calls/s when every call presents a fresh single-use token (minted ahead of time)."""
    tokens = [issuer.mint("access", f"u{i}", ttl=3600).token for i in range(int(2500 * seconds))]
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{proxy.sidecar.port}")  # type: ignore[union-attr]
    call = channel.unary_unary("/bench.Svc/Echo")
    loop = asyncio.get_running_loop()
    it = iter(tokens)
    done = 0

    async def worker() -> None:
        nonlocal done
        for token in it:
            await call(b"x" * 64, metadata=(("authorization", f"Bearer {token}"),))
            done += 1
            if loop.time() > deadline:
                return

    deadline = loop.time() + seconds
    start = loop.time()
    await asyncio.gather(*(worker() for _ in range(n)))
    elapsed = loop.time() - start
    await channel.close()
    return done / elapsed


async def main(seconds: float, concurrency: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="authproxy-bench-"))
    key = keygen("ES256", tmp / "k.pem", tmp / "jwks.json")
    issuer = TokenIssuer(parse_policy(AUTH_POLICY, "bench"), {"access": key})
    token = issuer.mint("access", "bench-user", ttl=3600).token
    server = RedisServer(tmp / "redis")
    server.start()
    backend = await start_echo_backend()
    # (row, policy, single-use driver?) x (memory, Redis)
    cases = (("revocation", AUTH_POLICY, False), ("single use", SINGLE_USE, True))
    cases += (("rate limit", RATE_LIMITED, False),)
    proxies = {
        (case, store): await start(tmp, policy, backend.port, url)
        for case, policy, _ in cases
        for store, url in (("memory", None), ("redis", server.url))
    }
    runs: dict[tuple[str, str], list[float]] = {pair: [] for pair in proxies}
    try:
        for _ in range(ROUNDS):
            for case, _, once in cases:
                for store in ("memory", "redis"):
                    proxy = proxies[case, store]
                    if once:
                        rate = await single_use_rate(proxy, issuer, seconds, concurrency)
                    else:
                        target = f"127.0.0.1:{proxy.sidecar.port}"  # type: ignore[union-attr]
                        rate = await drive(target, seconds, concurrency, token)
                    runs[case, store].append(rate)
    finally:
        for proxy in proxies.values():
            await proxy.stop(0)
        await backend.server.stop(None)
        server.stop()
    rate = {pair: statistics.median(values) for pair, values in runs.items()}
    print(
        f"shared state, sidecar with access tokens, median of {ROUNDS} alternating {seconds:g}s runs:"
    )
    print(f"  {'':34} {'memory':>9} {'Redis':>9}  Redis / memory")
    for case, what in (
        ("revocation", "revocation checked (local view)"),
        ("single use", "single-use tokens (SET NX)"),
        ("rate limit", "rate limit (moving window)"),
    ):
        memory, redis = rate[case, "memory"], rate[case, "redis"]
        print(f"  {what:34} {memory:7.0f}/s {redis:7.0f}/s  = {redis / memory:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    asyncio.run(main(args.seconds, args.concurrency))
