"""`authproxy explain` on claim mapping and `when:` conditions: the identity step names
the claims a level maps, a conditions step follows the requirements, `--header` gives
the headers a condition binds, and the verdict is still the runtime's own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from authproxy.cli.explain import FAIL, OK, explain_offline
from authproxy.cli.explain_report import json_report, text_report
from authproxy.decide.reasons import Reason
from authproxy.keys.issuer import TokenIssuer
from authproxy.runtime.serve import ServeConfig, build_authorizer
from authproxy.state.store import MemoryState
from tests.support.keys import Keys
from tests.support.policies import TEST_POLICY
from tests.support.running_proxy import config_for

REPO = Path(__file__).resolve().parents[2]
POLICY = TEST_POLICY.replace(
    "  access:  {type: access, audience: api-access}\n",
    "  access:  {type: access, audience: api-access, claims: {roles: realm_access.roles}}\n",
) + (
    "  /test.Tenant/Get:\n"
    "    level: access\n"
    "    roles: [user]\n"
    "    when:\n"
    "      - {claim: email_verified, equals: true}\n"
    "      - {claim: tenant_id, equals_header: x-tenant-id}\n"
)
METHOD = "/test.Tenant/Get"


@pytest.fixture
def cfg(tmp_path: Path, keys: Keys) -> ServeConfig:
    return config_for(tmp_path, keys, POLICY)


@pytest.fixture(scope="module")
def token(issuer: TokenIssuer) -> str:
    extra = {"realm_access": {"roles": ["user"]}, "email_verified": True, "tenant_id": "t1"}
    return issuer.mint("access", "alice", ttl=600, extra=extra).token


@pytest.mark.parametrize(
    ("headers", "outcome", "reason"),
    [
        ((("x-tenant-id", "t1"),), OK, None),
        ((("x-tenant-id", "t2"),), FAIL, Reason.HEADER_MISMATCH),
        ((), FAIL, Reason.HEADER_MISMATCH),
    ],
)
async def test_the_conditions_step_follows_the_requirements_and_matches_the_runtime(
    cfg: ServeConfig, token: str, headers, outcome, reason
):
    now = time.time()
    explained = await explain_offline(cfg, METHOD, token, now=now, headers=headers)
    runtime = build_authorizer(cfg, MemoryState())
    runtime.verifier.clock = lambda: now
    decision = await runtime.decide(METHOD, [*headers, ("authorization", f"Bearer {token}")])
    assert (explained.decision.allowed, explained.decision.reason) == (
        decision.allowed,
        decision.reason,
    )
    names = [s.name for s in explained.steps]
    assert names[names.index("requirements") + 1] == "conditions"
    step = explained.steps[names.index("conditions")]
    assert (step.outcome, step.reason) == (outcome, reason)
    if outcome == OK:
        assert step.detail == "email_verified = true; tenant_id equals header x-tenant-id"


async def test_the_identity_step_and_the_report_name_the_mapped_claim(cfg: ServeConfig, token: str):
    explained = await explain_offline(cfg, METHOD, token, headers=(("x-tenant-id", "t1"),))
    identity = next(s for s in explained.steps if s.name == "identity")
    assert "roles user (claim realm_access.roles)" in identity.detail
    text = text_report(explained)
    assert "when          email_verified = true" in text
    assert "when          tenant_id equals header x-tenant-id" in text
    report = json_report(explained)
    assert report["rule"]["when"] == [
        "email_verified = true",
        "tenant_id equals header x-tenant-id",
    ]
    assert report["rule"]["token"]["claims_from"] == {"roles": "realm_access.roles"}


def test_the_cli_takes_headers_for_conditions(cfg: ServeConfig, token: str):
    base = [sys.executable, "-m", "authproxy", "explain", METHOD, "--policy", cfg.policy]
    base += ["--jwks", cfg.jwks[0], "--hmac-secret-env", cfg.hmac_secret_envs[0]]
    base += ["--token", token, "--format", "json"]
    env = dict(os.environ)  # config_for put the HMAC secret there
    allowed = subprocess.run(
        [*base, "--header", "X-Tenant-Id: t1"], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert allowed.returncode == 0, allowed.stderr
    assert json.loads(allowed.stdout)["decision"]["allowed"] is True
    denied = subprocess.run(base, capture_output=True, text=True, env=env, cwd=REPO)
    assert denied.returncode == 1
    assert json.loads(denied.stdout)["decision"]["reason"] == "HEADER_MISMATCH"
    bad = subprocess.run([*base, "--header", "novalue"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2
    assert "--header 'novalue': expected NAME:VALUE" in bad.stderr
