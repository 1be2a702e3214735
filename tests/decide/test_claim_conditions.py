"""A rule's `when:` conditions (`decide/conditions.py`) in the pipeline: claim values,
JSON types, list claims, presence, and request headers bound to claims, each with the
reason and status a caller gets."""

from __future__ import annotations

import grpc
import pytest

from authproxy.decide.reasons import Reason
from tests.support.tokens import Clock, authorizer, bearer, token

POLICY = """\
version: 1
default: deny
issuer: auth-service
tokens:
  access: {type: access, audience: api-access}
methods:
  /t.S/Verified:
    level: access
    when: [{claim: email_verified, equals: true}]
  /t.S/Tier:
    level: access
    when: [{claim: org.tier, in: [gold, silver]}]
  /t.S/Group:
    level: access
    when: [{claim: groups, equals: ops}]
  /t.S/Namespaced:
    level: access
    when: [{claim: ["https://example.com/org"], equals: acme}]
  /t.S/NoImpersonation:
    level: access
    when: [{claim: act, present: false}]
  /t.S/Tenant:
    level: access
    roles: [user]
    when:
      - {claim: tenant_id, present: true}
      - {claim: tenant_id, equals_header: x-tenant-id}
"""


async def decide(method: str, *extra: tuple[str, str], **claims):
    auth = authorizer(Clock(), text=POLICY)
    return await auth.decide(method, (*bearer(token(**claims)), *extra))


@pytest.mark.parametrize(
    ("method", "claims", "allowed"),
    [
        ("/t.S/Verified", {"email_verified": True}, True),
        ("/t.S/Verified", {"email_verified": False}, False),
        ("/t.S/Verified", {"email_verified": "true"}, False),  # a string is not a boolean
        ("/t.S/Verified", {"email_verified": 1}, False),  # nor is 1
        ("/t.S/Verified", {}, False),
        ("/t.S/Tier", {"org": {"tier": "gold"}}, True),
        ("/t.S/Tier", {"org": {"tier": "silver"}}, True),
        ("/t.S/Tier", {"org": {"tier": "bronze"}}, False),
        ("/t.S/Tier", {"org": "gold"}, False),  # no nested object: missing
        ("/t.S/Group", {"groups": ["dev", "ops"]}, True),  # one item of a list claim
        ("/t.S/Group", {"groups": ["dev"]}, False),
        ("/t.S/Namespaced", {"https://example.com/org": "acme"}, True),
        ("/t.S/Namespaced", {"https://example": {"com/org": "acme"}}, False),
        ("/t.S/NoImpersonation", {}, True),
        ("/t.S/NoImpersonation", {"act": {"sub": "admin"}}, False),
    ],
)
async def test_claim_conditions_allow_only_the_values_they_name(method, claims, allowed):
    decision = await decide(method, **claims)
    assert decision.allowed is allowed, decision.message
    if not allowed:
        assert decision.reason is Reason.CLAIM_MISMATCH
        assert decision.reason.status == grpc.StatusCode.PERMISSION_DENIED


async def test_a_claim_mismatch_names_the_claim_not_its_value():
    decision = await decide("/t.S/Tier", org={"tier": "secret-bronze"})
    assert "org.tier" in decision.message
    assert "secret-bronze" not in decision.message


@pytest.mark.parametrize(
    ("headers", "tenant", "problem"),
    [
        ((("x-tenant-id", "t1"),), "t1", None),
        ((("x-tenant-id", "t2"),), "t1", "does not equal"),
        ((), "t1", "needs the header x-tenant-id"),  # a missing header is a deny
        ((("x-tenant-id", "t1"), ("x-tenant-id", "t2")), "t1", "sent 2 times"),
        ((("x-tenant-id", "t1"), ("x-tenant-id", "t1")), "t1", "sent 2 times"),
        ((("X-Tenant-Id", "t2"),), "t1", "does not equal"),  # any case is the header
        ((("x-tenant-id", "t1 "),), "t1", "does not equal"),  # no trimming
        ((("x-tenant-id", "42"),), 42, None),  # an integer claim, as text
    ],
)
async def test_a_header_bound_to_a_claim_must_be_sent_once_and_equal_it(headers, tenant, problem):
    decision = await decide("/t.S/Tenant", *headers, roles=["user"], tenant_id=tenant)
    if problem is None:
        assert decision.allowed, decision.message
        return
    assert not decision.allowed
    assert decision.reason is Reason.HEADER_MISMATCH
    assert problem in decision.message


async def test_a_bound_claim_the_token_lacks_is_refused_before_the_header_is_read():
    decision = await decide("/t.S/Tenant", ("x-tenant-id", "t1"), roles=["user"])
    assert decision.reason is Reason.CLAIM_MISMATCH
    assert "tenant_id" in decision.message


async def test_a_non_text_claim_never_equals_a_header():
    for value in (True, ["t1"], {"id": "t1"}, 1.0):
        decision = await decide(
            "/t.S/Tenant", ("x-tenant-id", "t1"), roles=["user"], tenant_id=value
        )
        assert decision.reason is Reason.HEADER_MISMATCH, value


async def test_roles_are_checked_before_conditions():
    decision = await decide("/t.S/Tenant", ("x-tenant-id", "t1"), tenant_id="t1")
    assert decision.reason is Reason.INSUFFICIENT_ROLE
