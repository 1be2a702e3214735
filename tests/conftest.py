"""Shared fixtures: keys, a token issuer, the echo backend and a real sidecar on loopback."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from authproxy.keys.issuer import SigningKey, TokenIssuer, hmac_signing_key
from authproxy.keys.keygen import keygen
from authproxy.policy.loader import parse_policy
from authproxy.runtime.serve import ServeConfig
from tests.echo_backend import UNARY, EchoBackend, start_echo_backend
from tests.example_backend_harness import Example, running_example
from tests.running_proxy import LARGE_MESSAGES, RunningProxy, start_proxy

TEST_POLICY = """\
version: 1
default: access
issuer: test-issuer
leeway: 5s
tokens:
  2fa:     {type: 2fa_pending, audience: 2fa-verification}
  refresh: {type: refresh, audience: token-refresh, keys: [refresh-hmac]}
  access:  {type: access, audience: api-access}
methods:
  /test.Public/*: public
  /test.TwoFA/*: 2fa
  /test.Refresh/*: refresh
  /test.Access/*: access
  /test.Admin/*: {level: access, roles: [admin]}
  /test.Denied/*: deny
  /test.Forward/*: {level: access, forward_token: true}
"""
SERVICES = ("Public", "TwoFA", "Refresh", "Access", "Admin", "Denied", "Forward", "Other")
REFRESH_SECRET = b"r" * 40
REFRESH_ENV = "AUTHPROXY_TEST_REFRESH_SECRET"


@dataclass
class Keys:
    dir: Path
    jwks: Path
    es256: SigningKey
    rs256: SigningKey
    refresh: SigningKey


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    d = tmp_path_factory.mktemp("keys")
    jwks = d / "jwks.json"
    es = keygen("ES256", d / "es256.pem", jwks)
    rs = keygen("RS256", d / "rs256.pem", jwks)
    return Keys(d, jwks, es, rs, hmac_signing_key(REFRESH_SECRET, "refresh-hmac"))


@pytest.fixture(scope="session")
def issuer(keys: Keys) -> TokenIssuer:
    policy = parse_policy(TEST_POLICY, "test-policy.yaml")
    return TokenIssuer(policy, {"access": keys.es256, "2fa": keys.rs256, "refresh": keys.refresh})


def descriptor_set(path: Path) -> Path:
    """A protoset naming the echo backend's methods with their real kinds."""
    fd = descriptor_pb2.FileDescriptorProto(name="test/echo.proto", package="test")
    for service in SERVICES:
        svc = fd.service.add(name=service)
        for name in (*UNARY, "Count", "Sum", "Chat"):
            svc.method.add(
                name=name,
                input_type=".test.Bytes",
                output_type=".test.Bytes",
                client_streaming=name in ("Sum", "Chat"),
                server_streaming=name in ("Count", "Chat"),
            )
    path.write_bytes(descriptor_pb2.FileDescriptorSet(file=[fd]).SerializeToString())
    return path


@pytest.fixture
async def example(tmp_path: Path) -> AsyncIterator[Example]:
    """The example api.v1 backend, running in the test's event loop."""
    async with running_example(tmp_path) as running:
        yield running


@pytest.fixture
async def backend() -> AsyncIterator[EchoBackend]:
    b = await start_echo_backend()
    yield b
    await b.server.stop(None)


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


@pytest.fixture(params=["unary-path", "stream-path"])
async def proxy(
    request, tmp_path: Path, backend: EchoBackend, keys: Keys
) -> AsyncIterator[RunningProxy]:
    """The sidecar in front of the echo backend; run once with method kinds known (known
    unary calls are not watched as streams) and once without (every call is)."""
    sets = (
        [str(descriptor_set(tmp_path / "echo.protoset"))] if request.param == "unary-path" else []
    )
    running = await start_sidecar(tmp_path, backend.port, keys, descriptor_sets=sets)
    yield running
    await running.stop()


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


@pytest.fixture
async def ext_authz(tmp_path: Path, keys: Keys) -> AsyncIterator[RunningProxy]:
    """Both ext_authz front ends on loopback with TEST_POLICY; no sidecar, no upstream."""
    running = await start_ext_authz(tmp_path, keys)
    yield running
    await running.stop()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A skipped or xfailed test is a failing test: it proves nothing."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    unproven = [r for key in ("skipped", "xfailed", "xpassed") for r in reporter.stats.get(key, [])]
    if unproven and session.exitstatus == 0:
        reporter.write_line(f"{len(unproven)} skipped/xfailed test(s): failing the run", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
