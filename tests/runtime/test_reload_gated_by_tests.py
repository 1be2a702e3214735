"""A policy's tests gate every load: a proxy whose policy fails its tests does not start,
and a live reload whose tests fail is refused like an invalid file — the last good version
keeps deciding, the failure is logged, counted and shown on `/policy`."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest

from authproxy.decide.reasons import Reason
from authproxy.keys.issuer import TokenIssuer
from authproxy.policy.loader import parse_policy
from authproxy.runtime.serve import AuthProxy, ConfigError
from tests.support.cli import ADDRESSES, assert_config_error, serve
from tests.support.echo_backend import EchoBackend
from tests.support.keys import Keys
from tests.support.operations import watched_proxy, write_atomically
from tests.support.policies import TEST_POLICY
from tests.support.running_proxy import OK, RunningProxy, config_for, http_json, value_of
from tests.support.waits import poll

RELOAD_BOUND = 2.0
DENIED_LINE = "  /test.Denied/*: deny\n"
assert DENIED_LINE in TEST_POLICY
#: TEST_POLICY with /test.Denied/* opened to everyone: what its tests forbid.
OPENED = TEST_POLICY.replace(DENIED_LINE, "  /test.Denied/*: public\n")
#: A valid edit the tests allow: a new public service.
EXTENDED = TEST_POLICY + "  /test.Extra/*: public\n"
TESTS = """\
tests:
  - name: public calls pass
    call: /test.Public/Echo
    expect: allow
  - name: the denied service stays closed
    call: /test.Denied/Echo
    token: {level: access, claims: {sub: alice, roles: [admin]}}
    expect: {deny: METHOD_DENIED}
"""
CLOSED_CASE_LINE = 5
DENIED_NOW = (grpc.StatusCode.PERMISSION_DENIED, Reason.METHOD_DENIED)


async def reloads_settled(node: RunningProxy, key: str, count: int) -> dict[str, int]:
    async def results() -> dict[str, int]:
        return node.reloads()

    counted, _ = await poll(results, lambda r: r[key] >= count, within=RELOAD_BOUND)
    return counted


async def test_a_reload_whose_tests_fail_is_refused_and_the_old_policy_keeps_deciding(
    tmp_path: Path,
    keys: Keys,
    issuer: TokenIssuer,
    backend: EchoBackend,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="authproxy.policy")
    (tmp_path / "policy.tests.yaml").write_text(TESTS)
    tests_path = tmp_path / "policy.tests.yaml"
    async with watched_proxy(keys, backend, tmp_path / "policy.yaml", TEST_POLICY) as node:
        assert await node.call("/test.Denied/Echo") == DENIED_NOW
        write_atomically(node.policy_path, OPENED)
        results = await reloads_settled(node, "error", 1)
        assert (results["ok"], results["error"]) == (0, 1)

        failure = (
            f"{tests_path}:{CLOSED_CASE_LINE}: test 'the denied service stays closed' failed:"
            " expected deny METHOD_DENIED, got allow"
        )
        status = await node.policy()
        assert status["last_reload_error"] == failure
        code, ready = await http_json(f"{node.admin_base}/readyz")
        assert code == 200  # still serving the last good version
        assert "the last reload was refused: " + failure in ready["checks"]["policy"]
        assert status["version"] == parse_policy(TEST_POLICY).version
        assert status["text"] == TEST_POLICY
        logged = [r.getMessage() for r in caplog.records if r.name == "authproxy.policy"]
        assert any(failure in m and "refused" in m for m in logged), logged
        _, samples, _ = await node.metrics()
        assert value_of(samples, "authproxy_policy_reloads_total", result="error") == 1
        assert await node.call("/test.Denied/Echo") == DENIED_NOW  # the old version decides
        token = issuer.mint("access", "alice", ttl=300).token
        assert await node.call("/test.Access/Echo", token) == OK

        write_atomically(node.policy_path, EXTENDED)  # a version its tests pass
        results = await reloads_settled(node, "ok", 1)
        assert (results["ok"], results["error"]) == (1, 1)
        status = await node.policy()
        assert status["last_reload_error"] is None
        _, ready = await http_json(f"{node.admin_base}/readyz")
        assert "refused" not in ready["checks"]["policy"]
        assert status["version"] == parse_policy(EXTENDED).version
        assert await node.call("/test.Extra/Echo") == OK
        assert await node.call("/test.Denied/Echo") == DENIED_NOW


async def test_a_reload_with_a_test_file_that_went_missing_is_refused(
    tmp_path: Path, keys: Keys, backend: EchoBackend
) -> None:
    (tmp_path / "cases.yaml").write_text(TESTS)
    named = TEST_POLICY + "tests: [cases.yaml]\n"
    async with watched_proxy(keys, backend, tmp_path / "policy.yaml", named) as node:
        write_atomically(node.policy_path, named.replace("cases.yaml", "gone.yaml"))
        results = await reloads_settled(node, "error", 1)
        assert (results["ok"], results["error"]) == (0, 1)
        error = (await node.policy())["last_reload_error"]
        assert (
            error
            == f"{tmp_path / 'gone.yaml'}: cannot read policy tests: No such file or directory"
        )


async def test_a_proxy_whose_policy_fails_its_tests_does_not_start(
    tmp_path: Path, keys: Keys
) -> None:
    """The tests run when the proxy starts, before anything listens."""
    cfg = config_for(tmp_path, keys, OPENED, ext_authz_grpc="127.0.0.1:0")
    (tmp_path / "policy.tests.yaml").write_text(TESTS)
    refused = AuthProxy(cfg)
    with pytest.raises(ConfigError) as raised:
        await refused.start()
    assert refused.check_grpc is not None and refused.check_grpc.port == 0  # never bound
    assert str(raised.value) == (
        f"{tmp_path / 'policy.tests.yaml'}:{CLOSED_CASE_LINE}: test 'the denied service stays"
        " closed' failed: expected deny METHOD_DENIED, got allow"
    )
    (tmp_path / "policy.yaml").write_text(TEST_POLICY)  # the tests pass: it builds
    proxy = AuthProxy(cfg)
    await proxy.start()
    assert proxy.authorizer.policy.version == parse_policy(TEST_POLICY).version
    await proxy.stop(0)


def test_serve_exits_2_when_the_policy_fails_its_tests(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text("version: 1\ndefault: deny\nmethods:\n  /a.B/C: public\n")
    (tmp_path / "policy.tests.yaml").write_text(
        "tests:\n  - name: closed\n    call: /a.B/C\n    expect: {deny: METHOD_DENIED}\n"
    )
    result = serve(tmp_path, "--policy", "policy.yaml", *ADDRESSES)
    line = assert_config_error(result, "policy.tests.yaml:2: test 'closed' failed")
    assert line == (
        "authproxy: error: policy.tests.yaml:2: test 'closed' failed:"
        " expected deny METHOD_DENIED, got allow"
    )
