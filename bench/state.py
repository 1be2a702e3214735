"""Benchmark shared state: the sidecar with in-memory state vs Redis-backed state, in one run.

    .venv/bin/python -m bench.state [--seconds 3] [--concurrency 16]

Both proxies run the full pipeline with the revocation check (a local view in both
cases: Redis keeps it fresh by pub/sub, so no round trip per call) in front of the echo
backend; the same Python client load drives each, alternating, medians of three rounds.
A third row measures single-use tokens (one Redis `SET NX` per call) against memory.
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
    memory = await start(tmp, AUTH_POLICY, backend.port, None)
    shared = await start(tmp, AUTH_POLICY, backend.port, server.url)
    memory_once = await start(tmp, SINGLE_USE, backend.port, None)
    shared_once = await start(tmp, SINGLE_USE, backend.port, server.url)
    runs: dict[str, list[float]] = {"memory": [], "redis": [], "memory once": [], "redis once": []}
    try:
        for _ in range(ROUNDS):
            for name, proxy in (("memory", memory), ("redis", shared)):
                target = f"127.0.0.1:{proxy.sidecar.port}"  # type: ignore[union-attr]
                runs[name].append(await drive(target, seconds, concurrency, token))
            runs["memory once"].append(
                await single_use_rate(memory_once, issuer, seconds, concurrency)
            )
            runs["redis once"].append(
                await single_use_rate(shared_once, issuer, seconds, concurrency)
            )
    finally:
        for proxy in (memory, shared, memory_once, shared_once):
            await proxy.stop(0)
        await backend.server.stop(None)
        server.stop()
    rate = {name: statistics.median(values) for name, values in runs.items()}
    print(
        f"shared state, sidecar with access tokens, median of {ROUNDS} alternating {seconds:g}s runs:"
    )
    print(f"  in-memory state    {rate['memory']:8.0f} calls/s")
    print(f"  Redis state        {rate['redis']:8.0f} calls/s")
    print(f"  Redis / in-memory (revocation checked)   = {rate['redis'] / rate['memory']:.2f}")
    print(
        f"  single-use tokens: memory {rate['memory once']:.0f}/s, Redis {rate['redis once']:.0f}/s"
    )
    print(
        f"  Redis / in-memory (single use, SET NX)   = {rate['redis once'] / rate['memory once']:.2f}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    asyncio.run(main(args.seconds, args.concurrency))
