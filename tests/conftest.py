"""Fixtures and hooks for every test: keys, a token issuer, the echo backend, the example
backend, a real sidecar and ext_authz front ends on loopback, and a real `redis-server`.
What they are built from lives in `tests/support/`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from authproxy.keys.issuer import TokenIssuer, hmac_signing_key
from authproxy.keys.keygen import keygen
from authproxy.policy.loader import parse_policy
from authproxy.runtime.decision_log import LOGGER
from tests.support.echo_backend import EchoBackend, start_echo_backend
from tests.support.example_backend import Example, running_example
from tests.support.keys import REFRESH_SECRET, Keys
from tests.support.policies import TEST_POLICY, descriptor_set
from tests.support.redis_modes import (  # noqa: F401 (fixtures)
    redis_url,
    session_cluster,
    session_sentinel,
)
from tests.support.redis_server import redis_server  # noqa: F401 (fixture)
from tests.support.running_proxy import RunningProxy, start_ext_authz, start_sidecar


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


@pytest.fixture
def decision_lines() -> Iterator[list[str]]:
    """The raw lines written to the decision log during the test."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger(LOGGER)
    handler = Collect(logging.INFO)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)
