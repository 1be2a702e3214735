"""What tracing costs: `python -m bench --tracing [--baseline-tree DIR]`.

Two sidecars in front of the same echo backend, each its own process: tracing off (the
default) and `--tracing` with every call sampled (`parentbased_always_on`, and every
request sends a sampled `traceparent`), exporting over OTLP/gRPC to a receiver in this
process that counts the spans (so the proxy's figure includes the export, in its batch
processor's thread). With `--baseline-tree DIR` (a source tree of the proxy without
tracing, e.g. `git archive` of an earlier commit), that proxy is a third target: the
cost of tracing *off* is the difference between it and "tracing off".

Unary calls at saturation (h2load), the targets alternating round after round (A, B,
A, B, ...); per round, each proxy's CPU µs per call from /proc. Prints medians and the
spread (lowest, highest) over the rounds.
"""

from __future__ import annotations

import secrets
import statistics
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from . import load, procs
from .fixtures import PAYLOAD, Fixtures, check_calls
from .servers import UNARY_METHOD

OFF, ON, BEFORE = "tracing off", "tracing on (sampled 100%)", "before tracing"


class SpanSink(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that only counts."""

    def __init__(self) -> None:
        self.spans = 0

    async def Export(self, request, context):
        self.spans += sum(
            len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans
        )
        return trace_service_pb2.ExportTraceServiceResponse()


class TracingBench:
    def __init__(self, fx: Fixtures, logs: Path, baseline_tree: Path | None = None) -> None:
        self.fx = fx
        self.logs = logs
        self.sink = SpanSink()
        self.server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self.sink, self.server)
        sink_port = self.server.add_insecure_port("127.0.0.1:0")
        self.backend = procs.baseline("backend", "backend", logs)
        flags = ["--upstream", f"127.0.0.1:{self.backend.port}", *fx.proxy_flags()]
        otel = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
            "OTEL_SERVICE_NAME": "authproxy-bench",
        }
        self.proxies = {
            OFF: procs.proxy("proxy-tracing-off", flags, logs),
            ON: procs.proxy("proxy-tracing-on", [*flags, "--tracing"], logs, env=otel),
        }
        if baseline_tree is not None:
            self.proxies[BEFORE] = procs.proxy(
                "proxy-before-tracing", flags, logs, cwd=baseline_tree
            )
        self.runs: dict[str, list[tuple[float, float]]] = {t: [] for t in self.proxies}

    async def start(self) -> None:
        await self.server.start()
        for server in (self.backend, *self.proxies.values()):
            await server.wait_listening()
        for server in self.proxies.values():
            await check_calls(server.port, self.fx.token, 2)

    async def stop(self) -> None:
        for server in (*self.proxies.values(), self.backend):
            server.stop()
        await self.server.stop(None)

    async def measure(self, seconds: float, rounds: int) -> None:
        body = self.logs / "body-tracing.grpc"
        body.write_bytes(load.grpc_frames([PAYLOAD]))
        parent = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
        headers = [*load.grpc_headers(self.fx.token), "-H", f"traceparent: {parent}"]
        args = ["-d", str(body), *headers]
        for _ in range(rounds):
            for target, server in self.proxies.items():
                url = f"http://127.0.0.1:{server.port}{UNARY_METHOD}"
                await load.warm_up(url, args, self.logs / "warm.log")
                before = server.cpu()
                result = await load.saturate(url, args, seconds, self.logs / "h2load.log")
                cpu_us = (server.cpu() - before) / result.requests * 1e6
                self.runs[target].append((cpu_us, result.requests / result.seconds))

    def figures(self) -> dict:
        out: dict = {"spans_exported": self.sink.spans}
        for target, runs in self.runs.items():
            cpu = [c for c, _ in runs]
            rps = [r for _, r in runs]
            out[target] = {
                "cpu_us_per_call": statistics.median(cpu),
                "cpu_us_spread": [min(cpu), max(cpu)],
                "calls_per_s": statistics.median(rps),
                "rounds": cpu,
            }
        return out


def print_figures(figures: dict) -> None:
    print("sidecar, unary at saturation: proxy CPU µs per call (median [lowest, highest])")
    for target in (BEFORE, OFF, ON):
        row = figures.get(target)
        if row is not None:
            low, high = row["cpu_us_spread"]
            print(
                f"  {target:28} {row['cpu_us_per_call']:7.1f} [{low:.1f}, {high:.1f}]"
                f"   {row['calls_per_s']:8.0f} calls/s"
            )
    off, on = figures[OFF]["cpu_us_per_call"], figures[ON]["cpu_us_per_call"]
    print(f"  tracing on costs {on - off:+.1f} µs per call ({(on / off - 1) * 100:+.0f} %)")
    if BEFORE in figures:
        before = figures[BEFORE]["cpu_us_per_call"]
        print(f"  tracing off vs before: {off - before:+.1f} µs per call")
    print(f"  spans exported: {figures['spans_exported']}")
