"""Tracing with OpenTelemetry (the `otel` extra): the only module that imports it.

Off (the default), `build_tracing` returns None and nothing of OpenTelemetry is imported;
the front ends keep the pipeline's own `decide_now` / `decide_http` and check one
attribute (`tracing is None`) per relayed call. On (`--tracing`), the SDK is configured
from the standard `OTEL_*` variables by the SDK itself: `OTEL_TRACES_EXPORTER` (by the
SDK's exporter entry points; default `otlp`), `OTEL_EXPORTER_OTLP_*` (the exporter),
`OTEL_TRACES_SAMPLER[_ARG]` (the tracer provider), `OTEL_SERVICE_NAME` and
`OTEL_RESOURCE_ATTRIBUTES` (the resource; default service name `authproxy`) and
`OTEL_BSP_*` (the batch span processor). The provider is this proxy's own: nothing global
is set.

Spans continue the caller's W3C trace context (`traceparent`, `tracestate`; a malformed
one starts a new trace):

- `authproxy.decide`, one per decision, from every front end: the target, rule, level,
  decision, reason, policy version and front end. Never a token, claim or header value.
  While the pipeline runs, this span is the current one, so an observer (the decision
  log) can name it (`current_ids`).
- `authproxy.relay`, one per call the sidecar relays to the backend (kind CLIENT): the
  method, the backend and its gRPC status. Its `traceparent` replaces the caller's in the
  request the backend receives, so the backend's spans join the trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import threading
from collections.abc import Awaitable, Callable, Generator, Iterable
from typing import TYPE_CHECKING, Any

import grpc

from authproxy.decide.decision import Decision
from authproxy.runtime.config import ConfigError

if TYPE_CHECKING:
    from authproxy.wire.h2_engine import Header

INSTALL = "pip install 'authproxy[otel]'"
#: xds-protos (the Envoy API, a dependency) installs an old copy of the OpenTelemetry
#: protos under the same module names as opentelemetry-proto; installed after it, it
#: replaces files the OTLP exporter needs.
SHADOWED = "opentelemetry-proto's modules were replaced by xds-protos's older copy"
REINSTALL_PROTO = "pip install --force-reinstall --no-deps opentelemetry-proto==<its version>"
DECIDE_SPAN = "authproxy.decide"
RELAY_SPAN = "authproxy.relay"
SERVICE_NAME = "authproxy"
#: The trace context headers: read from the caller, replaced towards the backend.
_CONTEXT_HEADERS = ("traceparent", "tracestate")
_CONTEXT_KEYS = (b"traceparent", b"tracestate")
_CANCELLED = grpc.StatusCode.CANCELLED.value[0]
_UNKNOWN = grpc.StatusCode.UNKNOWN.value[0]

DecideNow = Callable[..., "Decision | Awaitable[Decision]"]
DecideHttp = Callable[..., Awaitable[Decision]]


def build_tracing(enabled: bool) -> Tracing | None:
    """The tracing `--tracing` asks for, or None (nothing imported). ConfigError when the
    `otel` extra is not installed or the `OTEL_*` variables name what cannot be had."""
    if not enabled:
        return None
    try:
        provider = _provider()
    except ImportError as e:
        if "opentelemetry.proto" in str(e):  # xds-protos ships an old copy of those files
            raise ConfigError(f"--tracing: {SHADOWED} ({e}): {REINSTALL_PROTO}") from None
        raise ConfigError(
            f"--tracing needs OpenTelemetry, which is not installed ({e}): {INSTALL}"
        ) from None
    except (RuntimeError, ValueError) as e:  # an exporter or sampler the SDK cannot make
        raise ConfigError(f"--tracing: the OTEL_* configuration: {e}") from None
    return Tracing(provider)


def _provider() -> Any:
    """The SDK's tracer provider, configured by the SDK from the `OTEL_*` variables."""
    from opentelemetry.sdk._configuration import (
        _get_exporter_entry_point,
        _get_exporter_names,
        _import_exporters,
    )
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    provider = TracerProvider(resource=resource)  # reads OTEL_TRACES_SAMPLER[_ARG]
    if "OTEL_TRACES_EXPORTER" in os.environ:
        names = _get_exporter_names("traces")  # "none" is no exporter
    else:  # the specification's default, which the SDK leaves to its distro
        names = [_get_exporter_entry_point("otlp", "traces")]
    exporters, _, _ = _import_exporters(names, [], [])
    for exporter in exporters.values():
        provider.add_span_processor(BatchSpanProcessor(exporter()))
    return provider


class Tracing:
    """Spans for decisions and relayed calls on one tracer provider."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        from authproxy import __version__

        self.provider = provider
        self.tracer = provider.get_tracer("authproxy", __version__)
        self._propagator = TraceContextTextMapPropagator()
        self._attach = context.attach
        self._in_context = trace.set_span_in_context
        self._current_span = trace.get_current_span
        self._kinds = {"internal": trace.SpanKind.INTERNAL, "server": trace.SpanKind.SERVER}
        self._client = trace.SpanKind.CLIENT
        self._error = trace.Status(trace.StatusCode.ERROR)
        #: (headers, decision span) of the sidecar call decided last, when its decision
        #: started a new trace: `relay`, called right after for that call, continues it.
        self._root: tuple[Any, Any] | None = None

    # --- the decision span --------------------------------------------------------------

    def decide_now(self, decide_now: DecideNow, front_end: str = "sidecar") -> DecideNow:
        """`Authorizer.decide_now` inside an `authproxy.decide` span."""
        begin, decided, failed = self._begin, self._decided, self._failed

        def traced(method: str, headers: Any, peer: Any = None, principal: Any = None) -> Any:
            span, run, root = begin(headers, front_end, "internal")
            try:
                result = run(decide_now, method, headers, peer, principal)
            except BaseException as e:
                failed(span, e)
                raise
            if isinstance(result, Decision):
                decided(span, result, root)
                return result
            return self._later(span, InContext(result, run), root)

        return traced

    def decide_http(self, decide_http: DecideHttp, front_end: str) -> DecideHttp:
        """`Authorizer.decide_http` inside an `authproxy.decide` span (an ext_authz Check)."""
        begin = self._begin

        async def traced(
            http_method: str, path: str, headers: Any, grpc: bool, *rest: Any
        ) -> Decision:
            span, run, _ = begin(headers, front_end, "server")
            pending = decide_http(http_method, path, headers, grpc, *rest)
            return await self._later(span, InContext(pending, run))

        return traced

    async def _later(self, span: Any, pending: Awaitable[Decision], root: Any = None) -> Decision:
        try:
            decision = await pending
        except BaseException as e:
            self._failed(span, e)
            raise
        self._decided(span, decision, root)
        return decision

    def _begin(self, headers: Any, front_end: str, kind: str) -> tuple[Any, Callable, Any]:
        """A started decision span; a `run` that calls in a context where it is the current
        span (a copy of the caller's: nothing leaks back); and, when the span starts a new
        trace (no valid caller context), the headers it was started for."""
        parent = self.extract(headers)
        span = self.tracer.start_span(
            DECIDE_SPAN, parent, self._kinds[kind], {"authproxy.front_end": front_end}
        )
        context = contextvars.copy_context()
        context.run(self._attach, self._in_context(span, parent))
        valid = parent is not None and self._current_span(parent).get_span_context().is_valid
        return span, context.run, None if valid else headers

    def _decided(self, span: Any, decision: Decision, root: Any = None) -> None:
        """`root`: the headers of a call whose decision started its trace; the relay span
        that may follow at once (`relay`) joins that trace under it."""
        self._root = None if root is None else (root, span)
        if span.is_recording():
            span.set_attributes(decision_attributes(decision))
        span.end()

    def _failed(self, span: Any, error: BaseException) -> None:
        if span.is_recording():
            span.set_status(self._error)
            span.set_attribute("error.type", type(error).__qualname__)
        span.end()

    def current_ids(self) -> tuple[str, str] | None:
        """(trace id, span id) of the current span (the decision's, while the pipeline
        runs), in hex; None outside any."""
        found = self._current_span().get_span_context()
        if not found.is_valid:
            return None
        return f"{found.trace_id:032x}", f"{found.span_id:016x}"

    # --- the relay span -----------------------------------------------------------------

    def extract(self, headers: Iterable[tuple[str, Any]]) -> Any:
        """The caller's trace context from its headers (an empty context when it sent none
        or a malformed one)."""
        carrier = {k.lower(): v for k, v in headers if k.lower() in _CONTEXT_HEADERS}
        if not carrier:
            return None
        return self._propagator.extract(carrier)

    def relay(
        self, call_headers: Iterable[tuple[str, str]], upstream: list[Header], method: str
    ) -> RelaySpan:
        """Start the span of a call relayed to the backend, a child of the caller's span (or,
        for a call that came without trace context, of its decision span); the backend's
        request headers (`upstream`) get its trace context instead of the caller's."""
        parent = self.extract(call_headers)
        root, self._root = self._root, None
        if root is not None and root[0] is call_headers:  # its decision started the trace
            parent = self._in_context(root[1])
        span = self.tracer.start_span(
            RELAY_SPAN, parent, self._client, {"rpc.system": "grpc", "rpc.method": method}
        )
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, self._in_context(span, parent))
        upstream[:] = [h for h in upstream if h[0] not in _CONTEXT_KEYS]
        upstream.extend((k.encode(), v.encode()) for k, v in carrier.items())
        return RelaySpan(span, self._error)

    async def close(self, timeout: float) -> None:
        """Export what is queued and stop the exporters (the batch processor's shutdown),
        waiting at most `timeout` seconds; an export still running then finishes in its
        own daemon thread, or not at all when the process ends."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def shut_down() -> None:
            try:
                self.provider.shutdown()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                    loop.call_soon_threadsafe(_resolve, done)

        threading.Thread(target=shut_down, name="authproxy-tracing-close", daemon=True).start()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await done


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def decision_attributes(decision: Decision) -> dict[str, Any]:
    """What a decision span records: policy terms only, never a token, claim or header."""
    attributes: dict[str, Any] = {
        "authproxy.target": decision.method,
        "authproxy.rule": decision.rule.pattern,
        "authproxy.level": decision.level,
        "authproxy.decision": "allow" if decision.allowed else "deny",
        "authproxy.policy_version": decision.policy_version,
    }
    if decision.reason is not None:
        attributes["authproxy.reason"] = decision.reason.value
    if decision.shadow:
        attributes["authproxy.shadow"] = True
    return attributes


class RelaySpan:
    """The span of one relayed call. It ends with the call's gRPC status, as the backend or
    the proxy gave it; a call whose stream closes with neither was cancelled by its client."""

    __slots__ = ("error", "span")

    def __init__(self, span: Any, error: Any) -> None:
        self.span: Any = span
        self.error = error

    def backend_ended(self, headers: Iterable[Header]) -> None:
        """The backend's trailers (or trailers-only response)."""
        code = _UNKNOWN
        for key, value in headers:
            if key == b"grpc-status":
                code = int(value) if value.isdigit() else _UNKNOWN
                break
        self._end(code)

    def proxy_ended(self, code: grpc.StatusCode) -> None:
        """The proxy ended the call (deadline, backend unreachable, limits, stopping)."""
        self._end(code.value[0])

    def end(self) -> None:
        """The client's stream is closed (a no-op once the call ended with a status)."""
        self._end(_CANCELLED)

    def _end(self, code: int) -> None:
        span = self.span
        if span is None:
            return
        self.span = None
        if span.is_recording():
            span.set_attribute("rpc.grpc.status_code", code)
            if code != 0:
                span.set_status(self.error)
        span.end()


class InContext:
    """An awaitable run step by step inside `run` (a `Context.run`): what it sets in its
    context stays there, whether it finishes at once, in the caller's task or in another."""

    __slots__ = ("awaitable", "run")

    def __init__(self, awaitable: Awaitable[Any], run: Callable) -> None:
        self.awaitable = awaitable
        self.run = run

    def __await__(self) -> Generator[Any, Any, Any]:
        inner, run = self.awaitable.__await__(), self.run
        step: Callable = inner.send
        value: Any = None
        while True:
            try:
                waiting = run(step, value)
            except StopIteration as done:
                return done.value
            try:
                value, step = (yield waiting), inner.send
            except GeneratorExit:
                run(inner.close)
                raise
            except BaseException as e:
                value, step = e, inner.throw
