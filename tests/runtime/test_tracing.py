"""Tracing with OpenTelemetry (`--tracing`, `runtime/tracing.py`), against a real OTLP
receiver: spans continue the caller's W3C trace context, the backend joins the trace,
the decision log names the decision span, nothing secret is recorded, and with tracing
off nothing of OpenTelemetry is even imported."""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from authproxy.keys.issuer import TokenIssuer
from authproxy.runtime.decision_log import LOGGER
from tests.support.cli import REPO, assert_config_error, serve
from tests.support.echo_backend import EchoBackend
from tests.support.ext_authz import check_path, outcome
from tests.support.ext_authz_http import front, get, raw_http
from tests.support.keys import REFRESH_ENV, REFRESH_SECRET, Keys
from tests.support.otlp_receiver import Receiver, Span, running_receiver
from tests.support.policies import TEST_POLICY
from tests.support.running_proxy import OK, RunningProxy, start_ext_authz, start_sidecar
from tests.support.tokens import minted

REPORT = "/test.Access/Report"
ADMIN = "/test.Admin/Report"
DECIDE, RELAY = "authproxy.decide", "authproxy.relay"
CLIENT_KIND = 3  # opentelemetry.proto.trace.v1.Span.SPAN_KIND_CLIENT
ERROR = 2  # Status.STATUS_CODE_ERROR


def caller() -> tuple[str, str, str]:
    """(trace id, span id, traceparent) of a sampled caller span."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def secret_values(token: str) -> set[str]:
    """The token, and every string claim in it (what no span may record)."""
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    found = {token, f"Bearer {token}"}
    for value in claims.values():
        values = value if isinstance(value, list) else [value]
        found.update(v for v in values if isinstance(v, str) and v not in ("access",))
    return found


def assert_nothing_secret(spans: list[Span], secret: set[str]) -> None:
    for span in spans:
        for key, value in span.attributes.items():
            text = json.dumps(value)
            leaked = [s for s in secret if s in text]
            assert not leaked, (span.name, key, value)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with running_receiver() as running:
        yield running


@pytest.fixture
def decision_lines() -> Iterator[list[dict]]:
    """The decision log lines written during the test, parsed."""
    lines: list[dict] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(record.getMessage()))

    logger = logging.getLogger(LOGGER)
    handler, level = Collect(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
async def traced(
    tmp_path: Path,
    backend: EchoBackend,
    keys: Keys,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[RunningProxy]:
    """The sidecar with tracing on, exporting to `receiver`, every allow logged."""
    for name, value in receiver.env.items():
        monkeypatch.setenv(name, value)
    running = await start_sidecar(tmp_path, backend.port, keys, tracing=True, log_allows=1.0)
    yield running
    await running.stop()


async def test_decision_and_relay_spans_continue_the_callers_trace(
    traced: RunningProxy, receiver: Receiver, issuer: TokenIssuer, decision_lines: list[dict]
) -> None:
    trace_id, parent, traceparent = caller()
    token = minted(issuer, "subject-7f3a")
    report = await traced.report(
        REPORT, token, metadata=(("traceparent", traceparent), ("tracestate", "vendor=abc"))
    )
    await receiver.wait_for(lambda: len(receiver.spans_of(trace_id)) == 2)
    (decide,) = receiver.spans_of(trace_id, DECIDE)
    (relay,) = receiver.spans_of(trace_id, RELAY)
    assert decide.parent_id == parent and relay.parent_id == parent
    assert decide.service == "authproxy-under-test"
    assert decide.attributes == {
        "authproxy.front_end": "sidecar",
        "authproxy.target": REPORT,
        "authproxy.rule": "/test.Access/*",
        "authproxy.level": "access",
        "authproxy.decision": "allow",
        "authproxy.policy_version": decide.attributes["authproxy.policy_version"],
    }
    assert relay.kind == CLIENT_KIND
    assert relay.attributes == {
        "rpc.system": "grpc",
        "rpc.method": REPORT,
        "rpc.grpc.status_code": 0,
    }
    # The backend joins the trace under the relay span; the caller's tracestate travels on.
    assert report["md"]["traceparent"] == [f"00-{trace_id}-{relay.span_id}-01"]
    assert report["md"]["tracestate"] == ["vendor=abc"]
    assert_nothing_secret(receiver.spans, secret_values(token))
    (line,) = [ln for ln in decision_lines if ln["method"] == REPORT]
    assert (line["trace_id"], line["span_id"]) == (trace_id, decide.span_id)


async def test_a_deny_span_carries_the_reason_and_nothing_is_relayed(
    traced: RunningProxy, receiver: Receiver, issuer: TokenIssuer, decision_lines: list[dict]
) -> None:
    trace_id, parent, traceparent = caller()
    token = minted(issuer, "subject-9c1d", roles=["viewer"])
    status, reason = await traced.call(ADMIN, token, metadata=(("traceparent", traceparent),))
    assert (status, reason) == (grpc.StatusCode.PERMISSION_DENIED, "INSUFFICIENT_ROLE")
    await receiver.wait_for(lambda: bool(receiver.spans_of(trace_id, DECIDE)))
    (decide,) = receiver.spans_of(trace_id, DECIDE)
    assert decide.parent_id == parent
    assert decide.attributes["authproxy.decision"] == "deny"
    assert decide.attributes["authproxy.reason"] == "INSUFFICIENT_ROLE"
    assert_nothing_secret(receiver.spans, secret_values(token))
    (line,) = [ln for ln in decision_lines if ln["method"] == ADMIN]
    assert (line["trace_id"], line["span_id"]) == (trace_id, decide.span_id)
    await traced.stop()  # flushes: a relay span would be exported by now
    assert receiver.spans_of(trace_id, RELAY) == []


async def test_a_backend_error_is_the_relay_spans_status(
    traced: RunningProxy, receiver: Receiver, issuer: TokenIssuer
) -> None:
    trace_id, _, traceparent = caller()
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await traced.unary(
            "/test.Access/Fail",
            json.dumps({"code": "NOT_FOUND", "message": "no such thing"}).encode(),
            minted(issuer),
            metadata=(("traceparent", traceparent),),
        )
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    await receiver.wait_for(lambda: bool(receiver.spans_of(trace_id, RELAY)))
    (relay,) = receiver.spans_of(trace_id, RELAY)
    assert relay.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert relay.status_code == ERROR


@pytest.mark.parametrize(
    "traceparent", ["00-not-a-trace-01", "00-" + "0" * 32 + "-" + "1" * 16 + "-01"]
)
async def test_a_malformed_traceparent_starts_a_new_trace(
    traced: RunningProxy, receiver: Receiver, issuer: TokenIssuer, traceparent: str
) -> None:
    report = await traced.report(REPORT, minted(issuer), metadata=(("traceparent", traceparent),))
    (sent,) = report["md"]["traceparent"]
    trace_id = sent.split("-")[1]
    assert trace_id not in traceparent and trace_id != "0" * 32
    await receiver.wait_for(lambda: len(receiver.spans_of(trace_id)) == 2)
    (decide,) = receiver.spans_of(trace_id, DECIDE)
    (relay,) = receiver.spans_of(trace_id, RELAY)
    assert decide.parent_id == "" and relay.parent_id == decide.span_id
    assert sent.split("-")[1:3] == [trace_id, relay.span_id]


async def test_a_call_without_trace_context_starts_a_trace(
    traced: RunningProxy, receiver: Receiver, issuer: TokenIssuer
) -> None:
    assert await traced.call(REPORT, minted(issuer)) == OK
    await receiver.wait_for(lambda: {s.name for s in receiver.spans} == {DECIDE, RELAY})
    decide, relay = sorted(receiver.spans, key=lambda s: s.name)
    assert decide.trace_id == relay.trace_id  # the decision starts the call's trace
    assert decide.parent_id == "" and relay.parent_id == decide.span_id


async def test_each_ext_authz_check_is_a_span_of_the_checked_requests_trace(
    tmp_path: Path,
    keys: Keys,
    receiver: Receiver,
    issuer: TokenIssuer,
    monkeypatch: pytest.MonkeyPatch,
    decision_lines: list[dict],
) -> None:
    for name, value in receiver.env.items():
        monkeypatch.setenv(name, value)
    running = await start_ext_authz(tmp_path, keys, tracing=True, log_allows=1.0)
    try:
        token = minted(issuer, "subject-e4b2")
        grpc_trace, grpc_parent, grpc_header = caller()
        response = await check_path(
            running, REPORT, token=token, headers=(("traceparent", grpc_header),)
        )
        assert outcome(response) == "ALLOW"
        http_trace, http_parent, http_header = caller()
        status, _, _ = await raw_http(
            front(running).port, get("/test.Denied/Report", ("traceparent", http_header))
        )
        assert status == 403
        await receiver.wait_for(
            lambda: bool(receiver.spans_of(grpc_trace) and receiver.spans_of(http_trace))
        )
    finally:
        await running.stop()
    (checked,) = receiver.spans_of(grpc_trace, DECIDE)
    assert checked.parent_id == grpc_parent
    assert checked.attributes["authproxy.front_end"] == "ext_authz.grpc"
    assert checked.attributes["authproxy.decision"] == "allow"
    (denied,) = receiver.spans_of(http_trace, DECIDE)
    assert denied.parent_id == http_parent
    assert denied.attributes["authproxy.front_end"] == "ext_authz.http"
    assert denied.attributes["authproxy.reason"] == "METHOD_DENIED"
    assert_nothing_secret(receiver.spans, secret_values(token))
    ids = {(ln["trace_id"], ln["span_id"]) for ln in decision_lines}
    assert ids == {(grpc_trace, checked.span_id), (http_trace, denied.span_id)}


async def test_tracing_off_sends_no_span_and_logs_no_ids(
    tmp_path: Path,
    backend: EchoBackend,
    keys: Keys,
    receiver: Receiver,
    issuer: TokenIssuer,
    monkeypatch: pytest.MonkeyPatch,
    decision_lines: list[dict],
) -> None:
    for name, value in receiver.env.items():  # OTEL_* alone do not turn tracing on
        monkeypatch.setenv(name, value)
    running = await start_sidecar(tmp_path, backend.port, keys, log_allows=1.0)
    try:
        relay = running.sidecar.relay
        assert relay.tracing is None
        assert relay.decide_now == running.proxy.authorizer.decide_now  # the pipeline's own
        _, _, traceparent = caller()
        report = await running.report(REPORT, minted(issuer), (("traceparent", traceparent),))
        assert report["md"]["traceparent"] == [traceparent]  # passed on untouched
    finally:
        await running.stop()
    assert receiver.spans == []
    assert decision_lines and all("trace_id" not in ln for ln in decision_lines)


def _policy_args(tmp_path: Path, keys: Keys) -> list[str]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(TEST_POLICY)
    return [
        "--policy", str(policy), "--jwks", str(keys.jwks),
        "--hmac-secret-env", f"refresh-hmac={REFRESH_ENV}",
    ]  # fmt: skip


#: Run in a fresh interpreter: build the whole proxy (every front end, nothing listening)
#: with tracing off, noting each `opentelemetry` module the proxy's own code imports (the
#: module that asked, past importlib's frames). Other libraries may import parts of it
#: when it is installed (redis-py does, for its own metrics): not ours to count.
_BUILD_WITHOUT_TRACING = """
import asyncio, os, sys
import authproxy
ours, package = [], os.path.dirname(authproxy.__file__)

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "opentelemetry":
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith("<frozen"):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(package):
                ours.append(name)
        return None

sys.meta_path.insert(0, Watch())
from authproxy.runtime import serve
cfg = serve.ServeConfig(policy=sys.argv[1], jwks=[sys.argv[2]], hmac_secret_envs=[sys.argv[3]],
    upstream="127.0.0.1:1", ext_authz_grpc="127.0.0.1:0", ext_authz_http="127.0.0.1:0")
asyncio.run(serve.check(cfg))
tracing = sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk.trace",
    "opentelemetry.exporter", "opentelemetry.trace.propagation.tracecontext")))
print(ours, tracing)
"""


def test_a_proxy_without_tracing_imports_no_opentelemetry(tmp_path: Path, keys: Keys) -> None:
    args = _policy_args(tmp_path, keys)
    result = subprocess.run(
        [sys.executable, "-c", _BUILD_WITHOUT_TRACING, args[1], args[3], args[5]],
        cwd=REPO,
        env={**os.environ, REFRESH_ENV: REFRESH_SECRET.decode()},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[] []"


def test_tracing_without_the_extra_is_a_config_error(tmp_path: Path, keys: Keys) -> None:
    """`--tracing` where OpenTelemetry cannot be imported (a package on PYTHONPATH that
    refuses to import stands in for its absence): exit 2, naming the extra to install."""
    blocked = tmp_path / "blocked" / "opentelemetry"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'opentelemetry'\", name='opentelemetry')\n"
    )
    path = os.pathsep.join(p for p in (str(blocked.parent), os.environ.get("PYTHONPATH")) if p)
    result = serve(
        tmp_path,
        *_policy_args(tmp_path, keys),
        "--tracing",
        "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1",
        env={"PYTHONPATH": path, REFRESH_ENV: REFRESH_SECRET.decode()},
    )  # fmt: skip
    line = assert_config_error(result, "pip install 'authproxy[otel]'")
    assert "--tracing needs OpenTelemetry" in line


_SHADOWED_PROTOS = """
import sys, types
from authproxy.runtime.config import ConfigError
from authproxy.runtime.tracing import build_tracing
old = types.ModuleType("opentelemetry.proto.common.v1.common_pb2")  # no InstrumentationScope
sys.modules[old.__name__] = old
try:
    build_tracing(True)
except ConfigError as e:
    print(e)
"""


def test_protos_replaced_by_an_older_copy_are_a_config_error_naming_the_fix() -> None:
    """xds-protos installs old OpenTelemetry protos under opentelemetry-proto's module names:
    an exporter that cannot import its messages says which package to reinstall."""
    result = subprocess.run(
        [sys.executable, "-c", _SHADOWED_PROTOS], cwd=REPO, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("--tracing: opentelemetry-proto's modules were replaced")
    assert "pip install --force-reinstall --no-deps opentelemetry-proto==" in result.stdout


def test_the_installed_opentelemetry_protos_are_the_exporters() -> None:
    """The development install puts opentelemetry-proto's modules back over xds-protos's."""
    from opentelemetry.proto.common.v1 import common_pb2

    assert hasattr(common_pb2, "InstrumentationScope")


def test_an_unknown_exporter_is_a_config_error(tmp_path: Path, keys: Keys) -> None:
    result = serve(
        tmp_path,
        *_policy_args(tmp_path, keys),
        "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1",
        env={
            "AUTHPROXY_TRACING": "true",
            "OTEL_TRACES_EXPORTER": "no-such-exporter",
            REFRESH_ENV: REFRESH_SECRET.decode(),
        },
    )  # fmt: skip
    assert_config_error(result, "no-such-exporter")
