"""The Envoy ext_authz front ends against bare servers on the same stack: our Check
server against a no-op grpc.aio Check server answering OK, our HTTP mode against an
aiohttp low-level server answering 200. Every request carries a valid ES256 access
token, so ours runs the whole decision; its metrics prove every check was an allow.

Throughput: h2load at saturation, ours and bare alternating, medians of the rounds, with
CPU µs per check. Latency (the gRPC Check only: bench.h2gen speaks gRPC): bench.h2gen
open loop, evenly spaced checks at fixed rates, ours and bare alternating, rounds pooled.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import grpc
from envoy.service.auth.v3 import attribute_context_pb2 as attrs
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from . import load, procs
from .fixtures import Fixtures, check_allowed, check_answers_allowed, decision_counts
from .sidecar import Run

CHECK_PATH = "/envoy.service.auth.v3.Authorization/Check"
HTTP_PATH = "/api/items/42"
TARGETS = ("check", "bare check", "http", "bare http")
LATENCY_TARGETS = ("check", "bare check")


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


class ExtAuthzBench:
    def __init__(self, fx: Fixtures, logs: Path) -> None:
        self.logs = logs
        self.http_port = procs.free_port()
        self.admin_port = procs.free_port()
        flags = [
            "--ext-authz-http", f"127.0.0.1:{self.http_port}",
            "--admin", str(self.admin_port),
            "--policy", str(fx.policy()),
            "--jwks", str(fx.jwks),
            "--log-level", "warning",
        ]  # fmt: skip
        self.ours = procs.proxy("ext-authz", flags, logs, port_flag="--ext-authz-grpc")
        self.noop_check = procs.baseline("noop-check", "noop-check", logs)
        self.noop_http = procs.baseline("noop-http", "noop-http", logs)
        self.frame = check_request(fx.token).SerializeToString()
        body = logs / "check.grpc"
        body.write_bytes(load.grpc_frames([self.frame]))
        grpc_args = ["-d", str(body), *load.grpc_headers()]
        self.check_targets = {
            "check": load.Target(self.ours.port, CHECK_PATH, body),
            "bare check": load.Target(self.noop_check.port, CHECK_PATH, body),
        }
        http_args = ["--h1", "-H", f"authorization: Bearer {fx.token}"]
        self.targets = {
            "check": (self.ours, f"{self.ours.port}{CHECK_PATH}", grpc_args),
            "bare check": (self.noop_check, f"{self.noop_check.port}{CHECK_PATH}", grpc_args),
            "http": (self.ours, f"{self.http_port}{HTTP_PATH}", http_args),
            "bare http": (self.noop_http, f"{self.noop_http.port}{HTTP_PATH}", http_args),
        }

    async def start(self) -> None:
        for server in (self.ours, self.noop_check, self.noop_http):
            await server.wait_listening()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.ours.port}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            response = await stub.Check(external_auth_pb2.CheckRequest.FromString(self.frame))
        if response.status.code != 0:
            raise RuntimeError(f"the benchmark's check was denied: {response.status.message}")

    def stop(self) -> None:
        for server in (self.ours, self.noop_check, self.noop_http):
            server.stop()

    async def throughput(self, target: str, seconds: float) -> Run:
        server, where, args = self.targets[target]
        url = f"http://127.0.0.1:{where}"
        await load.warm_up(url, args, self.logs / "warm.log")
        ours = server is self.ours
        before = await decision_counts(self.admin_port) if ours else {}
        cpu = server.cpu()
        result = await load.saturate(url, args, seconds, self.logs / "h2load.log")
        cpu_us = (server.cpu() - cpu) / result.requests * 1e6
        if ours:
            check_allowed(target, result.requests, before, await decision_counts(self.admin_port))
        return Run(result.rps, {target: cpu_us})

    async def measure(self, seconds: float, rounds: int) -> dict[str, dict]:
        runs: dict[str, list[Run]] = {t: [] for t in TARGETS}
        for _ in range(rounds):
            for target in TARGETS:
                runs[target].append(await self.throughput(target, seconds))
        return {
            t: {
                "rps": statistics.median(r.rps for r in rs),
                "cpu_us": statistics.median(r.cpu_us[t] for r in rs),
                "rps_rounds": [r.rps for r in rs],
                "cpu_us_rounds": [r.cpu_us[t] for r in rs],
            }
            for t, rs in runs.items()
        }

    async def latency(
        self, rates: tuple[int, ...], seconds: dict[int, float], rounds: int
    ) -> dict[tuple[str, int], list[load.OpenLoop]]:
        """Open-loop Check runs at each rate, ours and bare alternating, `rounds` times."""
        result: dict[tuple[str, int], list[load.OpenLoop]] = {}
        for rate in rates:
            for _ in range(rounds):
                for target in LATENCY_TARGETS:
                    ours = target == "check"
                    before = await decision_counts(self.admin_port) if ours else {}
                    run = await load.open_loop(self.check_targets[target], rate, seconds[rate])
                    if ours:
                        after = await decision_counts(self.admin_port)
                        check_answers_allowed(target, len(run.latencies_us), before, after)
                    result.setdefault((target, rate), []).append(run)
        return result
