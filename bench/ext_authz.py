"""Benchmark the Envoy ext_authz front ends against bare servers, in one run, with h2load.

    .venv/bin/python -m bench.ext_authz [--seconds 5]

Four servers run in this process, each driven alone by h2load (C; one thread, so the
server keeps the other core): our Check server and a bare no-op grpc.aio Check server
answering OK; our HTTP mode and a bare aiohttp handler answering 200. Every request
carries a valid ES256 access token, so ours does the whole decision. Prints throughput
ratios (ours / bare) and latency percentiles at a fixed 1,000 checks/s (h2load's
per-request log).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc
from aiohttp import web
from envoy.service.auth.v3 import attribute_context_pb2 as attrs
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import status_pb2

from bench.policies import AUTH_POLICY
from proxy.issuer import TokenIssuer
from proxy.keygen import keygen
from proxy.policy_file import parse_policy
from proxy.serve import AuthProxy, ServeConfig

POLICY = AUTH_POLICY + 'http:\n  "GET /api/items/{id}": access\n'
CHECK_PATH = "/envoy.service.auth.v3.Authorization/Check"
HTTP_PATH = "/api/items/42"
RATE = 1000  # checks per second for the latency run
RATE_CLIENTS = 4
ROUNDS = 3


@dataclass
class Load:
    rps: float
    latencies_ms: list[float]

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def check_request(token: str) -> external_auth_pb2.CheckRequest:
    """What Envoy sends for a gRPC call with a bearer token (a typical header set)."""
    http = attrs.AttributeContext.HttpRequest(
        method="POST",
        path="/bench.Svc/Echo",
        host="api.example",
        protocol="HTTP/2",
        headers={
            ":authority": "api.example",
            ":method": "POST",
            ":path": "/bench.Svc/Echo",
            "content-type": "application/grpc",
            "te": "trailers",
            "user-agent": "grpc-go/1.70.0",
            "x-request-id": "5f0e8c8e-1c1a-4c1e-9d1e-0b7c2b0e9a11",
            "authorization": f"Bearer {token}",
        },
    )
    return external_auth_pb2.CheckRequest(
        attributes=attrs.AttributeContext(request=attrs.AttributeContext.Request(http=http))
    )


class NoOpCheck(external_auth_pb2_grpc.AuthorizationServicer):
    async def Check(self, request, context):
        return external_auth_pb2.CheckResponse(status=status_pb2.Status(code=0))


async def bare_grpc() -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(NoOpCheck(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def bare_http() -> tuple[web.ServerRunner, int]:
    async def ok(request: web.BaseRequest) -> web.Response:
        return web.Response(status=200)

    runner = web.ServerRunner(web.Server(ok, access_log=None), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


async def h2load(url: str, args: list[str], tmp: Path) -> Load:
    """Run h2load; every request must succeed (2xx)."""
    log = tmp / "h2load.log"
    log.unlink(missing_ok=True)
    proc = await asyncio.create_subprocess_exec(
        "h2load", *args, f"--log-file={log}", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out = (await proc.communicate())[0].decode()
    if proc.returncode != 0:
        raise RuntimeError(f"h2load failed:\n{out}")
    fields = next(line for line in out.splitlines() if line.startswith("requests:")).split()
    done, succeeded = int(fields[5]), int(fields[7])
    if done == 0 or succeeded != done:
        raise RuntimeError(f"h2load: {succeeded} of {done} requests succeeded:\n{out}")
    rps = float(next(line for line in out.splitlines() if "req/s" in line).split()[3])
    latencies = [int(row.split("\t")[2]) / 1000 for row in log.read_text().splitlines() if row]
    return Load(rps, latencies)


async def throughput(url: str, extra: list[str], seconds: float, tmp: Path) -> float:
    args = ["-t1", "-c8", "-m8", f"-D{_ms(seconds)}", f"--warm-up-time={_ms(min(seconds, 1))}"]
    args += extra
    return (await h2load(url, args, tmp)).rps


async def fixed_rate(url: str, extra: list[str], seconds: float, tmp: Path) -> Load:
    per_client = RATE // RATE_CLIENTS
    args = ["-t1", f"-c{RATE_CLIENTS}", "-m1", f"--rps={per_client}", f"-D{_ms(seconds)}"]
    return await h2load(url, [*args, f"--warm-up-time={_ms(min(seconds, 1))}", *extra], tmp)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}ms"


async def main(seconds: float) -> None:
    if shutil.which("h2load") is None:
        raise SystemExit("bench.ext_authz needs h2load: apt-get install nghttp2-client")
    tmp = Path(tempfile.mkdtemp(prefix="authproxy-bench-"))
    key = keygen("ES256", tmp / "k.pem", tmp / "jwks.json")
    (tmp / "policy.yaml").write_text(POLICY)
    token = (
        TokenIssuer(parse_policy(POLICY, "bench"), {"access": key})
        .mint("access", "bench-user", ttl=3600)
        .token
    )
    frame = check_request(token).SerializeToString()
    body = tmp / "check.grpc"
    body.write_bytes(b"\x00" + struct.pack(">I", len(frame)) + frame)
    grpc_args = ["-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers"]
    http_args = ["--h1", "-H", f"authorization: Bearer {token}"]

    ours = AuthProxy(
        ServeConfig(
            policy=str(tmp / "policy.yaml"),
            ext_authz_grpc="127.0.0.1:0",
            ext_authz_http="127.0.0.1:0",
            jwks=[str(tmp / "jwks.json")],
        )
    )
    await ours.start()
    assert ours.check_grpc is not None and ours.check_http is not None
    await assert_allowed(ours.check_grpc.port, frame)
    noop_server, noop_port = await bare_grpc()
    bare_runner, bare_port = await bare_http()
    check_url = f"http://127.0.0.1:{ours.check_grpc.port}{CHECK_PATH}"
    http_url = f"http://127.0.0.1:{ours.check_http.port}{HTTP_PATH}"
    noop_url = f"http://127.0.0.1:{noop_port}{CHECK_PATH}"
    bare_url = f"http://127.0.0.1:{bare_port}{HTTP_PATH}"
    try:
        # Alternate ours and bare for ROUNDS rounds and keep the medians: this machine is
        # shared, and a slow moment should hit both sides of a ratio, not one.
        runs: dict[str, list[float]] = {"check": [], "noop": [], "http": [], "bare": []}
        for _ in range(ROUNDS):
            runs["check"].append(await throughput(check_url, grpc_args, seconds, tmp))
            runs["noop"].append(await throughput(noop_url, grpc_args, seconds, tmp))
            runs["http"].append(await throughput(http_url, http_args, seconds, tmp))
            runs["bare"].append(await throughput(bare_url, http_args, seconds, tmp))
        check, noop, http, bare = (statistics.median(runs[k]) for k in runs)
        check_lat = await fixed_rate(check_url, grpc_args, seconds, tmp)
        noop_lat = await fixed_rate(noop_url, grpc_args, seconds, tmp)
        http_lat = await fixed_rate(http_url, http_args, seconds, tmp)
        bare_lat = await fixed_rate(bare_url, http_args, seconds, tmp)
    finally:
        await ours.stop(0)
        await noop_server.stop(None)
        await bare_runner.cleanup()

    print(
        f"Envoy ext_authz, ES256 access token, h2load, median of {ROUNDS} alternating"
        f" {seconds:g}s runs:"
    )
    print(f"  Check (gRPC)      {check:8.0f} checks/s   bare no-op grpc.aio Check {noop:8.0f}")
    print(f"  HTTP mode         {http:8.0f} checks/s   bare aiohttp handler      {bare:8.0f}")
    print(f"  Check / bare Check server   = {check / noop:.2f}")
    print(f"  HTTP mode / bare aiohttp    = {http / bare:.2f}")
    print(f"  latency at a fixed {RATE} checks/s:")
    for name, load in (
        ("Check", check_lat),
        ("bare Check", noop_lat),
        ("HTTP mode", http_lat),
        ("bare aiohttp", bare_lat),
    ):
        print(
            f"    {name:<13} p50 {load.percentile(50):.2f} ms  p99 {load.percentile(99):.2f} ms"
            f"  mean {statistics.fmean(load.latencies_ms):.2f} ms"
            f"  ({len(load.latencies_ms)} checks, {load.rps:.0f}/s achieved)"
        )


async def assert_allowed(port: int, frame: bytes) -> None:
    """h2load sees only HTTP 200; make sure the benchmarked check really is an allow."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        response = await stub.Check(external_auth_pb2.CheckRequest.FromString(frame))
    if response.status.code != 0:
        raise SystemExit(f"benchmark check was denied: {response.status.message}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    asyncio.run(main(args.seconds))
