"""A rule's `request:` block (request fields that must equal claims) is checked as strictly
as the rest of the policy: every problem as `file:line: problem`, all at once, and no
policy from a file with any."""

from __future__ import annotations

import pytest

from authproxy.policy.claims import ClaimPath, RequestOwnership
from authproxy.policy.loader import parse_policy
from tests.support.policies import HEAD, problems


def test_a_valid_block_is_read_with_its_fields_claims_roles_and_unset_rule():
    policy = parse_policy(
        HEAD
        + """\
  /a.B/*:
    level: access
    request:
      equal_claims:
        user_id: sub
        filter.owner_id: [https://example.com/uid]
        tenant: org.tenant
      allow_unset: true
      unless_roles: [admin, support]
  /a.B/Strict:
    level: access
    request: {equal_claims: {user_id: sub}}
""",
        "p.yaml",
    )
    request = policy.services["a.B"].request
    assert request == RequestOwnership(
        equal_claims=(
            (("user_id",), ClaimPath(("sub",))),
            (("filter", "owner_id"), ClaimPath(("https://example.com/uid",))),
            (("tenant",), ClaimPath(("org", "tenant"))),
        ),
        allow_unset=True,
        unless_roles=frozenset({"admin", "support"}),
        line=8,
    )
    assert str(request) == (
        "request user_id = claim sub, filter.owner_id = claim [https://example.com/uid],"
        " tenant = claim org.tenant (unset allowed) unless roles admin, support"
    )
    strict = policy.exact["/a.B/Strict"].request
    assert strict is not None
    assert (strict.allow_unset, strict.unless_roles, strict.line) == (False, frozenset(), 17)
    assert policy.exact["/a.B/Strict"].level == "access"


def test_a_rule_without_a_block_checks_no_fields():
    policy = parse_policy(HEAD + "  /a.B/C: access\n  /a.B/D: {level: access}\n")
    assert policy.exact["/a.B/C"].request is None
    assert policy.exact["/a.B/D"].request is None


@pytest.mark.parametrize(
    "block",
    [
        "request: [user_id]",
        "request: user_id",
        "request: {allow_unset: true}",
        "request: {equal_claims: [user_id, sub]}",
        "request: {equal_claims: user_id}",
    ],
)
def test_a_block_that_is_no_mapping_of_fields_is_reported_on_its_line(block: str):
    assert problems(f"  /a.B/C:\n    level: access\n    {block}\n") == [
        "p.yaml:8: /a.B/C: 'request' is {equal_claims: {FIELD: CLAIM, ...}}"
    ]


def test_an_empty_equal_claims_is_reported():
    assert problems("  /a.B/C:\n    level: access\n    request: {equal_claims: {}}\n") == [
        "p.yaml:8: /a.B/C: 'equal_claims' names no field"
    ]


def test_each_bad_field_path_and_claim_is_reported_on_its_line():
    assert problems(
        """\
  /a.B/C:
    level: access
    request:
      equal_claims:
        a..b: sub
        1x: sub
        user_id: sub
        filter.owner_id: https://example.com/uid
        tenant: 5
        blank: ''
        a.b.c.d.e.f.g.h.i: sub
        .lead: sub
        trail.: sub
        has-dash: sub
"""
    ) == [
        "p.yaml:10: /a.B/C: 'a..b' is not a field path (name or a.b.c)",
        "p.yaml:11: /a.B/C: '1x' is not a field path (name or a.b.c)",
        "p.yaml:13: /a.B/C: request field filter.owner_id: 'https://example.com/uid' reads as"
        " nested claims split at each dot; a claim whose name holds dots is written as a"
        " list: ['https://example.com/uid']",
        "p.yaml:14: /a.B/C: request field tenant: a claim is a name (a.b for nested) or a"
        " list of names",
        "p.yaml:15: /a.B/C: request field blank: '' has an empty or over-long claim name",
        "p.yaml:16: /a.B/C: 'a.b.c.d.e.f.g.h.i' is not a field path (name or a.b.c)",
        "p.yaml:17: /a.B/C: '.lead' is not a field path (name or a.b.c)",
        "p.yaml:18: /a.B/C: 'trail.' is not a field path (name or a.b.c)",
        "p.yaml:19: /a.B/C: 'has-dash' is not a field path (name or a.b.c)",
    ]


def test_a_field_name_that_is_not_a_string_is_reported():
    assert problems("  /a.B/C:\n    level: access\n    request: {equal_claims: {5: sub}}\n") == [
        "p.yaml:8: /a.B/C: 5 is not a field path (name or a.b.c)"
    ]


def test_misspelled_keys_get_a_did_you_mean_and_unknown_ones_the_allowed_list():
    assert problems(
        """\
  /a.B/C:
    level: access
    request:
      equal_claims: {user_id: sub}
      allow_unsett: true
      unless_role: [admin]
      colour: red
"""
    ) == [
        "p.yaml:10: unknown key in 'request' of /a.B/C 'allow_unsett': did you mean 'allow_unset'?",
        "p.yaml:11: unknown key in 'request' of /a.B/C 'unless_role': did you mean 'unless_roles'?",
        "p.yaml:12: unknown key in 'request' of /a.B/C 'colour' (allowed: equal_claims,"
        " allow_unset, unless_roles)",
    ]


def test_a_misspelled_equal_claims_gets_a_did_you_mean_and_nothing_else():
    """As for every other mapping: the misspelled key is named with the one it most likely
    meant, and its value judged under that name (not also reported as missing)."""
    assert problems(
        "  /a.B/C:\n    level: access\n    request:\n      equal_claim: {user_id: sub}\n"
    ) == [
        "p.yaml:9: unknown key in 'request' of /a.B/C 'equal_claim': did you mean 'equal_claims'?"
    ]


def test_bad_values_of_allow_unset_and_unless_roles_are_reported():
    assert problems(
        """\
  /a.B/C:
    level: access
    request:
      equal_claims: {user_id: sub}
      allow_unset: 'yes'
      unless_roles: admin
"""
    ) == [
        "p.yaml:10: 'allow_unset' must be true or false",
        "p.yaml:11: 'unless_roles' must be a non-empty list",
    ]


def test_a_block_needs_a_token_level():
    assert problems(
        """\
  /a.B/C:
    level: public
    request: {equal_claims: {user_id: sub}}
  /a.B/D:
    level: deny
    request: {equal_claims: {user_id: sub}}
  /a.B/E: access
"""
    ) == [
        "p.yaml:8: /a.B/C: 'request' needs a token level, not 'public'",
        "p.yaml:11: /a.B/D: 'request' needs a token level, not 'deny'",
    ]


def test_every_problem_of_a_file_is_reported_at_once():
    found = problems(
        """\
  /a.B/C:
    level: public
    request: {equal_claims: {user_id: sub}}
  /a.B/D:
    level: access
    request: [user_id]
  /a.B/E:
    level: access
    request:
      equal_claims: {a..b: sub}
"""
    )
    assert [line.split(": ", 1)[0] for line in found] == ["p.yaml:8", "p.yaml:11", "p.yaml:15"]
