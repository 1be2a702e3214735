"""`tokens.<level>.claims`: where a level's subject, roles, permissions and scopes come
from, for the claim layouts real identity providers use (Keycloak, Auth0, Azure AD,
Cognito). The mapped values are what requirements check and what the backend is told."""

from __future__ import annotations

import pytest

from authproxy.decide.identity import PERMISSIONS, ROLES, SCOPES, SUBJECT
from authproxy.decide.reasons import Reason
from authproxy.policy.claims import ClaimPath
from authproxy.policy.loader import PolicyError, parse_policy
from tests.support.tokens import Clock, authorizer, bearer, token

POLICY = """\
version: 1
default: deny
issuer: auth-service
tokens:
  access:
    type: access
    audience: api-access
    claims:
      subject: oid
      roles: realm_access.roles
      permissions: ["https://example.com/permissions"]
      scopes: scp
methods:
  /t.S/Admin: {level: access, roles: [admin]}
  /t.S/Write: {level: access, permissions: [records.write], scopes: [Records.Write]}
"""

KEYCLOAK_LIKE = {
    "oid": "0b6f-user",
    "realm_access": {"roles": ["admin", "user"]},
    "https://example.com/permissions": ["records.write"],
    "scp": "Records.Read Records.Write",
}


async def decide(method: str, **claims):
    return await authorizer(Clock(), text=POLICY).decide(method, bearer(token(**claims)))


async def test_requirements_read_the_mapped_claims_and_the_backend_is_told_them():
    decision = await decide("/t.S/Write", **KEYCLOAK_LIKE)
    assert decision.allowed, decision.message
    identity = decision.identity
    assert identity.subject == "0b6f-user"
    headers = dict(identity.headers)
    assert headers[SUBJECT] == "0b6f-user"
    assert headers[ROLES] == "admin,user"
    assert headers[PERMISSIONS] == "records.write"
    assert headers[SCOPES] == "Records.Read,Records.Write"
    assert (await decide("/t.S/Admin", **KEYCLOAK_LIKE)).allowed


async def test_the_default_claim_names_mean_nothing_once_a_level_maps_others():
    claims = {**KEYCLOAK_LIKE, "realm_access": {"roles": ["user"]}, "roles": ["admin"]}
    decision = await decide("/t.S/Admin", **claims)
    assert decision.reason is Reason.INSUFFICIENT_ROLE


async def test_a_mapped_subject_the_token_lacks_is_a_missing_claim():
    claims = {k: v for k, v in KEYCLOAK_LIKE.items() if k != "oid"}
    decision = await decide("/t.S/Admin", **claims)
    assert decision.reason is Reason.MISSING_CLAIM
    assert "'oid'" in decision.message


@pytest.mark.parametrize("bad", [42, "", "two\nlines", ["a"]])
async def test_a_mapped_subject_must_be_a_plain_string(bad):
    decision = await decide("/t.S/Admin", **{**KEYCLOAK_LIKE, "oid": bad})
    assert decision.reason is Reason.INVALID_CLAIM


async def test_mapped_roles_must_be_a_list_of_header_safe_strings():
    claims = {**KEYCLOAK_LIKE, "realm_access": {"roles": "admin"}}
    assert (await decide("/t.S/Admin", **claims)).reason is Reason.INVALID_CLAIM
    claims = {**KEYCLOAK_LIKE, "realm_access": {"roles": ["ad,min"]}}
    assert (await decide("/t.S/Admin", **claims)).reason is Reason.INVALID_CLAIM


def test_claim_paths_are_dotted_names_or_lists_of_names():
    spec = parse_policy(POLICY).tokens["access"].claims
    assert spec.roles == ClaimPath(("realm_access", "roles"))
    assert spec.permissions == ClaimPath(("https://example.com/permissions",))
    assert spec.scopes == (ClaimPath(("scp",)),)
    assert spec.mapped() == {
        "subject": "oid",
        "roles": "realm_access.roles",
        "permissions": "[https://example.com/permissions]",
        "scopes": "scp",
    }
    keycloak_client = POLICY.replace("realm_access.roles", "[resource_access, my-client, roles]")
    spec = parse_policy(keycloak_client).tokens["access"].claims
    assert spec.roles == ClaimPath(("resource_access", "my-client", "roles"))


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("https://example.com/roles", "written as a list: ['https://example.com/roles']"),
        ("urn:acme.roles", "written as a list"),
        ("a..b", "empty or over-long claim name"),
        ("[]", "empty or over-long claim name"),
        ("{a: b}", "a claim is a name"),
        ("a.b.c.d.e.f.g.h.i", "at most 8 levels"),
    ],
)
def test_a_claim_path_that_cannot_mean_what_it_says_is_a_policy_error(value, problem):
    text = POLICY.replace("roles: realm_access.roles", f"roles: {value}")
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "p.yaml")
    (error,) = caught.value.errors
    assert str(error).startswith("p.yaml:10: tokens.access.claims.roles: ")
    assert problem in str(error)


def test_cognito_style_names_with_a_colon_are_one_claim():
    text = POLICY.replace("roles: realm_access.roles", "roles: cognito:groups")
    spec = parse_policy(text).tokens["access"].claims
    assert spec.roles == ClaimPath(("cognito:groups",))
