"""Claim mapping and `when:` conditions end to end: through the sidecar to a real backend
(which receives the mapped identity and the bound header, and nothing when refused), and
through Envoy ext_authz (gRPC Check and HTTP), which judge the same way. The README's
examples are policies that load."""

from __future__ import annotations

from pathlib import Path

import grpc
import yaml

from authproxy.decide.reasons import Reason
from authproxy.keys.issuer import TokenIssuer
from authproxy.policy.loader import parse_policy
from tests.support.echo_backend import EchoBackend
from tests.support.ext_authz import check_path, outcome, running_ext_authz
from tests.support.ext_authz_http import get, raw_http
from tests.support.keys import Keys
from tests.support.policies import TEST_POLICY
from tests.support.readme import README, section
from tests.support.running_proxy import running_node

POLICY = TEST_POLICY.replace(
    "  access:  {type: access, audience: api-access}\n",
    "  access:\n    type: access\n    audience: api-access\n"
    "    claims: {subject: oid, roles: realm_access.roles}\n",
) + (
    "  /test.Tenant/*:\n"
    "    level: access\n"
    "    roles: [user]\n"
    "    when:\n"
    "      - {claim: email_verified, equals: true}\n"
    "      - {claim: tenant_id, equals_header: x-tenant-id}\n"
)
DENIED = grpc.StatusCode.PERMISSION_DENIED


def alice(issuer: TokenIssuer, **changes) -> str:
    claims = {
        "oid": "u-0b6f",
        "realm_access": {"roles": ["user"]},
        "email_verified": True,
        "tenant_id": "t1",
        **changes,
    }
    return issuer.mint("access", "alice", ttl=300, extra=claims).token


async def test_the_backend_gets_the_mapped_identity_and_the_bound_header(
    tmp_path: Path, keys: Keys, issuer: TokenIssuer, backend: EchoBackend
):
    async with running_node(tmp_path, keys, backend, "node", POLICY) as node:
        report = await node.report(
            "/test.Tenant/Report", alice(issuer), metadata=(("x-tenant-id", "t1"),)
        )
        assert report["md"]["x-auth-subject"] == ["u-0b6f"]
        assert report["md"]["x-auth-roles"] == ["user"]
        assert report["md"]["x-tenant-id"] == ["t1"]


async def test_a_call_for_another_tenant_never_reaches_the_backend(
    tmp_path: Path, keys: Keys, issuer: TokenIssuer, backend: EchoBackend
):
    async with running_node(tmp_path, keys, backend, "node", POLICY) as node:
        token = alice(issuer)
        before = len(backend.calls)
        for metadata, reason in [
            ((("x-tenant-id", "t2"),), Reason.HEADER_MISMATCH),
            ((), Reason.HEADER_MISMATCH),
            ((("x-tenant-id", "t2"), ("x-tenant-id", "t1")), Reason.HEADER_MISMATCH),
        ]:
            assert await node.call("/test.Tenant/Report", token, metadata) == (DENIED, reason)
        unverified = alice(issuer, email_verified=False)
        assert await node.call("/test.Tenant/Report", unverified, (("x-tenant-id", "t1"),)) == (
            DENIED,
            Reason.CLAIM_MISMATCH,
        )
        assert len(backend.calls) == before


async def test_ext_authz_judges_conditions_as_the_sidecar_does(
    tmp_path: Path, keys: Keys, issuer: TokenIssuer
):
    token = alice(issuer)
    async with running_ext_authz(tmp_path, keys, policy=POLICY) as node:
        cases = {
            "t1": "ALLOW",
            "t2": Reason.HEADER_MISMATCH,
            "t1,t1": Reason.HEADER_MISMATCH,  # Envoy joins repeated headers with ","
        }
        for sent, expected in cases.items():
            response = await check_path(
                node, "/test.Tenant/Report", token=token, headers=(("x-tenant-id", sent),)
            )
            assert outcome(response) == expected, sent
        port = node.proxy.check_http.port
        auth = ("authorization", f"Bearer {token}")
        status, _, _ = await raw_http(port, get("/test.Tenant/Report", auth, ("x-tenant-id", "t1")))
        assert status == 200
        status, _, _ = await raw_http(port, get("/test.Tenant/Report", auth, ("x-tenant-id", "t9")))
        assert status == 403


def test_the_readme_examples_are_policies_that_load():
    mapping = yaml.safe_load(_yaml_block("### Claim mapping"))
    conditions = yaml.safe_load(_yaml_block("### Claim conditions and header binding"))
    policy = parse_policy(
        yaml.safe_dump({"version": 1, "default": "deny", **mapping, **conditions})
    )
    assert policy.tokens["access"].claims.mapped()["roles"] == "realm_access.roles"
    (rule,) = policy.services.values()
    assert len(rule.when) == 4


def _yaml_block(heading: str) -> str:
    text = section(README, heading)
    return text.split("```yaml\n", 1)[1].split("```", 1)[0]


def test_the_readme_request_field_example_is_a_policy_that_loads():
    methods = yaml.safe_load(_yaml_block("### Request-field ownership"))
    tokens = {"access": {"type": "access", "audience": "api"}}
    policy = parse_policy(yaml.safe_dump({"version": 1, "tokens": tokens, **methods}))
    profile = policy.exact["/api.v1.UserService/GetProfile"].request
    assert profile is not None and profile.allow_unset and profile.unless_roles == {"admin"}
    orders = policy.exact["/shop.v1.Orders/List"].request
    assert orders is not None and [f for f, _ in orders.equal_claims] == [
        ("filter", "owner_id"),
        ("tenant",),
    ]
