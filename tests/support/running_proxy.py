"""The one way tests run the proxy in their own event loop: `start_proxy(cfg)` (or the
context manager `running_proxy(cfg)`) builds an `AuthProxy` from any `ServeConfig`, starts
every front end the configuration names, and opens a channel to each gRPC listener it runs.
`config_for` makes such a configuration on the test keys; `start_sidecar`,
`start_ext_authz` and `running_node` start the usual ones.

`RunningProxy` then speaks to it: `call` (status and reason, compared with `OK`,
`REVOKED`, ...), `unary` (the response) and `report` through the sidecar; `check`, a
channel to the ext_authz gRPC front end; `http_url` and `admin_base` for the HTTP
listeners, `policy()` and `metrics()` reading the admin API. `stop()` closes the channels
and stops the proxy, once (a test that stopped it itself is left alone)."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families

from authproxy.runtime.serve import AuthProxy, ServeConfig, Sidecar
from tests.support.echo_backend import EchoBackend
from tests.support.keys import REFRESH_ENV, REFRESH_SECRET, Keys
from tests.support.policies import TEST_POLICY
from tests.support.redis_server import finish_closing
from tests.support.tokens import bearer

#: A google.rpc detail message type (ErrorInfo, RetryInfo, ...).
Detail = TypeVar("Detail", error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo)

#: (status, ErrorInfo reason) of a call, as `RunningProxy.call` gives them.
OK = (grpc.StatusCode.OK, None)
REVOKED = (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED")
REUSED = (grpc.StatusCode.UNAUTHENTICATED, "REFRESH_REUSED")
STATE_DOWN = (grpc.StatusCode.UNAVAILABLE, "STATE_UNAVAILABLE")
#: Room for the tests that send large messages through the sidecar.
LARGE_MESSAGES = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
)


def with_token(metadata: Sequence[tuple[str, str]], token: str | None) -> tuple:
    """`metadata` plus an `authorization: Bearer` entry when there is a token."""
    return tuple(metadata) + (bearer(token) if token else ())


def status_detail(error: grpc.aio.AioRpcError, kind: type[Detail]) -> Detail | None:
    """The first detail of type `kind` inside `grpc-status-details-bin`, if any."""
    status = rpc_status.from_call(error)
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            found = kind()
            detail.Unpack(found)
            return found
    return None


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo inside `grpc-status-details-bin`, if any."""
    return status_detail(error, error_details_pb2.ErrorInfo)


async def http_get(url: str) -> tuple[int, str, str]:
    """(status, content-type, body) of one GET."""
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, response.headers.get("content-type", ""), await response.text()


async def http_json(url: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, json=body) as response,
    ):
        return response.status, await response.json(content_type=None)


@dataclass
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse_metrics(text: str) -> tuple[set[str], list[Sample]]:
    """(family names, every sample) of a Prometheus exposition."""
    families, samples = set(), []
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        samples.extend(Sample(s.name, dict(s.labels), s.value) for s in family.samples)
    return families, samples


def value_of(samples: list[Sample], name: str, **labels: str) -> float | None:
    """The value of the one sample `name` with exactly these labels (None: no such sample)."""
    found = [s.value for s in samples if s.name == name and s.labels == labels]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


@dataclass
class RunningProxy:
    """An started `AuthProxy` and channels to its gRPC listeners (None where it runs none)."""

    proxy: AuthProxy
    channel: grpc.aio.Channel | None  # to the sidecar
    check: grpc.aio.Channel | None  # to the ext_authz gRPC front end
    policy_path: Path
    stopped: bool = False
    #: The reloader's counts when the test took over (see `operations.watching`).
    baseline: dict[str, int] = field(default_factory=dict)

    @property
    def sidecar(self) -> Sidecar:
        assert self.proxy.sidecar is not None, "this configuration runs no sidecar"
        return self.proxy.sidecar

    @property
    def sidecar_port(self) -> int:
        return self.sidecar.port

    @property
    def grpc_port(self) -> int:
        """The ext_authz gRPC front end's port."""
        assert self.proxy.check_grpc is not None, "this configuration runs no gRPC Check"
        return self.proxy.check_grpc.port

    @property
    def http_url(self) -> str:
        """The ext_authz HTTP front end's base URL, its path prefix included."""
        front = self.proxy.check_http
        assert front is not None, "this configuration runs no HTTP check"
        return f"http://127.0.0.1:{front.port}{self.proxy.cfg.ext_authz_http_path_prefix}"

    @property
    def admin_base(self) -> str:
        assert self.proxy.admin is not None, "this configuration runs no admin API"
        return f"http://127.0.0.1:{self.proxy.admin.port}"

    async def unary(
        self,
        method: str,
        request: bytes = b"{}",
        token: str | None = None,
        metadata: tuple = (),
        timeout: float = 10.0,
        **kwargs: Any,
    ) -> tuple[bytes, grpc.aio.UnaryUnaryCall]:
        """(response, call) of one unary call through the sidecar."""
        assert self.channel is not None, "this configuration runs no sidecar"
        md = with_token(metadata, token)
        call = self.channel.unary_unary(method)(request, metadata=md, timeout=timeout, **kwargs)
        return await call, call

    async def call(
        self, method: str, token: str | None = None, metadata: tuple = (), timeout: float = 10
    ) -> tuple[grpc.StatusCode, str | None]:
        """(status, ErrorInfo reason) of one unary call through the sidecar; `OK` when it
        passed."""
        try:
            await self.unary(method, token=token, metadata=metadata, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            info = error_info(e)
            return e.code(), info.reason if info is not None else None
        return OK

    async def report(self, method: str, token: str | None = None, metadata: tuple = ()) -> dict:
        """The echo backend's report of one call, with its metadata grouped under `md`."""
        response, _ = await self.unary(method, token=token, metadata=metadata)
        report = json.loads(response)
        grouped: dict[str, list[str]] = {}
        for key, value in report["metadata"]:
            grouped.setdefault(key, []).append(value)
        return {**report, "md": grouped}

    def reloads(self) -> dict[str, int]:
        """Policy reload results since the test took over (`baseline`)."""
        results = self.proxy.reloader.results
        return {key: n - self.baseline.get(key, 0) for key, n in results.items()}

    async def policy(self) -> dict[str, Any]:
        """The admin API's `GET /policy`."""
        status, body = await http_json(f"{self.admin_base}/policy")
        assert status == 200, body
        return body

    async def metrics(self) -> tuple[set[str], list[Sample], str]:
        """The admin API's `GET /metrics`: (family names, samples, text)."""
        status, content_type, text = await http_get(f"{self.admin_base}/metrics")
        assert status == 200, text
        assert content_type.startswith("text/plain"), content_type
        families, samples = parse_metrics(text)
        return families, samples, text

    async def stop(self, grace: float = 0) -> None:
        for channel in (self.channel, self.check):
            if channel is not None:
                await channel.close()
        if not self.stopped:
            self.stopped = True
            if self.proxy.cfg.redis:  # bounded: see `finish_closing`
                await finish_closing(self.proxy.stop(grace), self.proxy.state, "proxy")
            else:
                await self.proxy.stop(grace)


@contextmanager
def environment(values: Mapping[str, str | None]) -> Iterator[None]:
    """Set (or, for None, remove) environment variables for the block."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


async def start_proxy(
    cfg: ServeConfig,
    env: Mapping[str, str | None] | None = None,
    channel_options: Sequence[tuple[str, Any]] = (),
    host: str = "127.0.0.1",
) -> RunningProxy:
    """Build (with `env` set while its secrets are read) and start the proxy `cfg`
    describes; `host`: the address its channels dial (an IPv6 listener needs `[::1]`)."""
    with environment(env or {}):
        proxy = AuthProxy(cfg)
    await proxy.start()
    channel = check = None
    if proxy.sidecar is not None:
        channel = grpc.aio.insecure_channel(f"{host}:{proxy.sidecar.port}", channel_options)
    if proxy.check_grpc is not None:
        check = grpc.aio.insecure_channel(f"{host}:{proxy.check_grpc.port}", channel_options)
    return RunningProxy(proxy, channel, check, Path(cfg.policy))


@asynccontextmanager
async def running_proxy(cfg: ServeConfig, **options: Any) -> AsyncIterator[RunningProxy]:
    """`start_proxy`, stopped again when the block ends."""
    running = await start_proxy(cfg, **options)
    try:
        yield running
    finally:
        await running.stop()


# --- the usual configurations, on the test keys ---------------------------------------------


def config_for(tmp_path: Path, keys: Keys, policy: str, **fields) -> ServeConfig:
    """A ServeConfig on the test keys, with `policy` written to tmp_path/policy.yaml."""
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(policy)
    os.environ[REFRESH_ENV] = REFRESH_SECRET.decode()
    cfg = ServeConfig(
        policy=str(policy_file),
        jwks=[str(keys.jwks)],
        hmac_secret_envs=[f"refresh-hmac={REFRESH_ENV}"],
        shutdown_grace=0.5,
    )
    for key, value in fields.items():
        setattr(cfg, key, value)
    return cfg


async def start_sidecar(
    tmp_path: Path, upstream_port: int, keys: Keys, policy: str = TEST_POLICY, **overrides
) -> RunningProxy:
    """The proxy as a sidecar in front of `upstream_port` (no admin API, no ext_authz, no
    policy watch, no reflection unless `overrides` say so) on in-memory state."""
    cfg = config_for(
        tmp_path,
        keys,
        policy,
        listen="127.0.0.1:0",
        upstream=f"127.0.0.1:{upstream_port}",
        **{"upstream_reflection": False, "watch_policy": False, **overrides},
    )
    return await start_proxy(cfg, channel_options=LARGE_MESSAGES)


async def start_ext_authz(
    tmp_path: Path, keys: Keys, policy: str = TEST_POLICY, path_prefix: str = "", **overrides
) -> RunningProxy:
    """The proxy running only its Envoy ext_authz front ends (gRPC Check and HTTP)."""
    cfg = config_for(
        tmp_path,
        keys,
        policy,
        ext_authz_grpc="127.0.0.1:0",
        ext_authz_http="127.0.0.1:0",
        ext_authz_http_path_prefix=path_prefix,
        **overrides,
    )
    return await start_proxy(cfg)


@asynccontextmanager
async def running_node(
    tmp_path: Path,
    keys: Keys,
    backend: EchoBackend,
    name: str,
    policy: str = TEST_POLICY,
    **fields: Any,
) -> AsyncIterator[RunningProxy]:
    """One whole proxy named `name` (its own directory): the sidecar in front of the echo
    backend, plus its admin API."""
    directory = tmp_path / name
    directory.mkdir()
    cfg = config_for(
        directory,
        keys,
        policy,
        listen="127.0.0.1:0",
        upstream=f"127.0.0.1:{backend.port}",
        upstream_reflection=False,
        admin="127.0.0.1:0",
        **fields,
    )
    async with running_proxy(cfg) as node:
        yield node
