"""Benchmark: ratios measured in one run, on loopback.

    .venv/bin/python -m bench.run [--seconds 3] [--concurrency 16] [--only sidecar|ext-authz|state]

Part 1, the sidecar:
Starts the test echo backend, a sidecar with a public-only policy (the forwarding floor,
no auth), and a sidecar with the access policy; drives each with the same grpc.aio load
(a Python client, so absolute numbers are bounded by the client on a 2-core machine; the
ratios are what to compare). Also times the decision pipeline alone: a cached token, a
fresh token per call (signature check) and PyJWT's own decode as the floor.

Part 2, the Envoy ext_authz front ends against bare servers (see bench/ext_authz.py).
Part 3, shared state in Redis against in-memory state (see bench/state.py).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import tempfile
import time
from pathlib import Path

import grpc
import jwt
from google.protobuf import descriptor_pb2

from bench import ext_authz
from bench.policies import AUTH_POLICY
from proxy.issuer import TokenIssuer
from proxy.keygen import keygen
from proxy.keys import KeySet, load_jwks_file
from proxy.pipeline import Authorizer
from proxy.policy_file import parse_policy
from proxy.serve import ServeConfig, Sidecar
from proxy.verify import TokenVerifier
from tests.echo_backend import start_echo_backend

OPEN_POLICY = "version: 1\ndefault: deny\nmethods:\n  /bench.Svc/*: public\n"


async def drive(target: str, seconds: float, concurrency: int, token: str | None) -> float:
    """Unary calls per second against `target`."""
    channel = grpc.aio.insecure_channel(target)
    call = channel.unary_unary("/bench.Svc/Echo")
    md = (("authorization", f"Bearer {token}"),) if token else ()
    payload = b"x" * 64
    for _ in range(50):  # warm up connection, caches, reflection
        await call(payload, metadata=md)
    count = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal count
        while time.perf_counter() < deadline:
            await call(payload, metadata=md)
            count += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    await channel.close()
    return count / elapsed


def write_descriptor_set(path: Path) -> Path:
    """Tell the proxy that /bench.Svc/Echo is unary (the echo backend has no reflection)."""
    fd = descriptor_pb2.FileDescriptorProto(name="bench.proto", package="bench")
    fd.service.add(name="Svc").method.add(name="Echo", input_type=".B", output_type=".B")
    path.write_bytes(descriptor_pb2.FileDescriptorSet(file=[fd]).SerializeToString())
    return path


def sidecar_config(tmp: Path, policy: str, upstream: int, **fields) -> ServeConfig:
    """A sidecar in front of `upstream` on the keys in tmp/jwks.json, with `policy`."""
    path = tmp / f"policy-{hashlib.sha256(policy.encode()).hexdigest()[:12]}.yaml"
    path.write_text(policy)
    return ServeConfig(
        policy=str(path),
        listen="127.0.0.1:0",
        upstream=f"127.0.0.1:{upstream}",
        jwks=[str(tmp / "jwks.json")],
        descriptor_sets=[str(write_descriptor_set(tmp / "bench.protoset"))],
        upstream_reflection=False,
        **fields,
    )


async def start_proxy(tmp: Path, policy: str, upstream: int) -> Sidecar:
    sidecar = Sidecar(sidecar_config(tmp, policy, upstream))
    await sidecar.start()
    return sidecar


async def time_decisions(authorizer: Authorizer, tokens: list[str], rounds: int) -> float:
    """Microseconds per `decide` call."""
    headers = [(("authorization", f"Bearer {t}"),) for t in tokens]
    start = time.perf_counter()
    for i in range(rounds):
        decision = await authorizer.decide("/bench.Svc/Echo", headers[i % len(headers)])
        assert decision.allowed, decision.message
    return (time.perf_counter() - start) / rounds * 1e6


async def main(seconds: float, concurrency: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="authproxy-bench-"))
    key = keygen("ES256", tmp / "k.pem", tmp / "jwks.json")
    policy = parse_policy(AUTH_POLICY, "bench")
    issuer = TokenIssuer(policy, {"access": key})
    token = issuer.mint("access", "bench-user", ttl=3600).token

    backend = await start_echo_backend()
    open_proxy = await start_proxy(tmp, OPEN_POLICY, backend.port)
    auth_proxy = await start_proxy(tmp, AUTH_POLICY, backend.port)
    rows = {}
    try:
        rows["direct"] = await drive(f"127.0.0.1:{backend.port}", seconds, concurrency, None)
        rows["proxy, no auth"] = await drive(
            f"127.0.0.1:{open_proxy.port}", seconds, concurrency, None
        )
        rows["proxy, auth"] = await drive(
            f"127.0.0.1:{auth_proxy.port}", seconds, concurrency, token
        )
    finally:
        await open_proxy.stop(0)
        await auth_proxy.stop(0)
        await backend.server.stop(None)

    keys = KeySet(load_jwks_file(str(tmp / "jwks.json")))
    cached = Authorizer(policy, TokenVerifier(keys))
    cold = Authorizer(policy, TokenVerifier(keys, cache_size=0))
    fresh = [issuer.mint("access", f"u{i}", ttl=3600).token for i in range(200)]
    us_cached = await time_decisions(cached, [token], 20_000)
    us_cold = await time_decisions(cold, fresh, 2_000)
    public = key.key.public_key()
    start = time.perf_counter()
    for t in fresh * 10:
        jwt.decode(t, public, algorithms=["ES256"], audience="api-access")
    us_pyjwt = (time.perf_counter() - start) / (len(fresh) * 10) * 1e6

    print(f"unary calls/s over {seconds:g}s, {concurrency} concurrent (Python client):")
    for name, rps in rows.items():
        print(f"  {name:<16} {rps:10.0f}")
    print(f"  proxied (no auth) / direct  = {rows['proxy, no auth'] / rows['direct']:.2f}")
    print(f"  proxied (auth)    / direct  = {rows['proxy, auth'] / rows['direct']:.2f}")
    print(f"  auth / no auth (proxied)    = {rows['proxy, auth'] / rows['proxy, no auth']:.2f}")
    print("decision pipeline, ES256 access token:")
    print(f"  cached token        {us_cached:8.1f} µs/decision")
    print(f"  fresh token (cold)  {us_cold:8.1f} µs/decision")
    print(f"  PyJWT decode alone  {us_pyjwt:8.1f} µs/token")
    print(f"  cold / PyJWT = {us_cold / us_pyjwt:.2f}   cached / cold = {us_cached / us_cold:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--only", choices=("sidecar", "ext-authz", "state"), help="run one part (default: all)"
    )
    args = parser.parse_args()
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    if args.only in (None, "sidecar"):
        asyncio.run(main(args.seconds, args.concurrency))
    if args.only in (None, "ext-authz"):
        asyncio.run(ext_authz.main(args.seconds))
    if args.only in (None, "state"):
        from bench import state  # imports bench.run: load it only when needed

        asyncio.run(state.main(args.seconds, args.concurrency))
