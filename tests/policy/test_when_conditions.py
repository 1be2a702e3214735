"""A rule's `when:` list is checked as strictly as the rest of the policy: every problem
as `file:line: problem`, all at once, and no policy from a file with any."""

from __future__ import annotations

from authproxy.policy.claims import ClaimPath
from authproxy.policy.loader import parse_policy
from tests.support.policies import HEAD, problems


def test_every_operator_is_read_in_order():
    policy = parse_policy(
        HEAD
        + """\
  /a.B/C:
    level: access
    when:
      - {claim: email_verified, equals: true}
      - {claim: org.tier, in: [gold, 3]}
      - {claim: act, present: false}
      - {claim: tenant_id, equals_header: x-tenant-id}
"""
    )
    when = policy.exact["/a.B/C"].when
    assert [(c.claim, c.operator, c.values, c.header) for c in when] == [
        (ClaimPath(("email_verified",)), "equals", (True,), None),
        (ClaimPath(("org", "tier")), "in", ("gold", 3), None),
        (ClaimPath(("act",)), "present", (False,), None),
        (ClaimPath(("tenant_id",)), "equals_header", (), "x-tenant-id"),
    ]
    assert [str(c) for c in when] == [
        "email_verified = true",
        "org.tier in [gold, 3]",
        "act absent",
        "tenant_id equals header x-tenant-id",
    ]


def test_each_malformed_condition_is_reported_on_its_line():
    assert problems(
        """\
  /a.B/C:
    level: access
    when:
      - {claim: a, equals: 1.5}
      - {claim: a, equals: 1, in: [2]}
      - {claim: a, equals_header: x-auth-subject}
      - {claim: a, equals_header: X-Tenant}
      - {claim: a, equals_header: authorization}
      - {claim: a, in: []}
      - {claim: a, present: yes please}
      - {claim: a, equals: null}
      - {clam: a, present: true}
      - just-a-string
  /a.B/D:
    level: public
    when: [{claim: a, present: true}]
  /a.B/E: {level: access, when: {claim: a, present: true}}
"""
    ) == [
        "p.yaml:9: /a.B/C: 'equals' compares with strings, integers or booleans, not 1.5",
        "p.yaml:10: /a.B/C: a 'when' entry names one 'claim' and exactly one of equals, in,"
        " present, equals_header",
        "p.yaml:11: /a.B/C: header 'x-auth-subject' cannot be bound to a claim (the proxy"
        " removes x-auth-* headers, and the token's own headers prove nothing)",
        "p.yaml:12: /a.B/C: 'equals_header' names a lowercase header, not 'X-Tenant'",
        "p.yaml:13: /a.B/C: header 'authorization' cannot be bound to a claim (the proxy"
        " removes x-auth-* headers, and the token's own headers prove nothing)",
        "p.yaml:14: /a.B/C: 'in' takes a list of 1 to 256 values",
        "p.yaml:15: /a.B/C: 'present' is true or false",
        "p.yaml:16: /a.B/C: 'equals' compares with strings, integers or booleans, not None",
        "p.yaml:17: unknown key in a 'when' entry of /a.B/C 'clam': did you mean 'claim'?",
        "p.yaml:18: /a.B/C: each 'when' entry is a mapping {claim: ..., equals: ...}",
        "p.yaml:21: /a.B/D: 'when' conditions need a token level, not 'public'",
        "p.yaml:22: /a.B/E: 'when' must be a list like [{claim: x, equals: y}]",
    ]


def test_a_deny_rule_takes_no_conditions():
    assert problems("  /a.B/C: {level: deny, when: [{claim: a, present: true}]}\n") == [
        "p.yaml:6: /a.B/C: 'when' conditions need a token level, not 'deny'"
    ]
