"""`authproxy policy diff`: what changed between two policies, and which changes let more
through (`policy/diff.py`)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from authproxy.policy import diff as policy_diff
from authproxy.policy import table
from authproxy.policy.loader import load_policy
from authproxy.policy.model import Rule
from tests.support.cli import authproxy
from tests.support.readme import README, section

REPO = Path(__file__).resolve().parents[2]

OLD = """\
version: 1
default: access
issuer: test-issuer
tokens:
  refresh: {type: refresh, audience: token-refresh, keys: [refresh-hmac]}
  access:  {type: access, audience: api-access}
methods:
  /a.Svc/*: access
  /a.Svc/Public: public
  /a.Svc/Admin: {level: access, roles: [admin], permissions: [users:read, users:write]}
  /a.Svc/Scoped: {level: access, scopes: [read]}
  /a.Svc/Peer: {level: access, peers: ["spiffe://c/ns/a/*"]}
  /a.Svc/Refresh: {level: refresh, single_use: true}
  /a.Svc/Login: {level: public, rate_limit: {limit: 10/minute, key: peer}}
  /a.Svc/Stream: access
  /b.Ops/Shutdown: deny
http:
  "GET /api/items": access
"""


def write(tmp_path: Path, text: str, name: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def edited(*edits: tuple[str, str]) -> str:
    """OLD with each (old text, new text) replaced; each old text must occur once."""
    text = OLD
    for before, after in edits:
        assert text.count(before) == 1, before
        text = text.replace(before, after)
    return text


def changes(tmp_path: Path, new: str, old: str = OLD) -> list[policy_diff.Change]:
    return policy_diff.diff(
        load_policy(write(tmp_path, old, "old.yaml")), load_policy(write(tmp_path, new, "new.yaml"))
    )


def lines(tmp_path: Path, new: str, old: str = OLD) -> list[str]:
    return [c.line for c in changes(tmp_path, new, old)]


# --- no differences -------------------------------------------------------------------------


def test_identical_files_print_nothing_and_exit_0(tmp_path: Path) -> None:
    old, new = write(tmp_path, OLD, "old.yaml"), write(tmp_path, OLD, "new.yaml")
    result = authproxy("policy", "diff", str(old), str(new), cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_the_same_meaning_written_another_way_is_no_difference(tmp_path: Path) -> None:
    same = edited(
        ("  /a.Svc/*: access\n", "  /a.Svc/*: {level: access}  # every method\n"),
        ("permissions: [users:read, users:write]", "permissions: [users:write, users:read]"),
        ("{limit: 10/minute, key: peer}", "[{limit: 10 per 1 minute}]"),
    )
    assert lines(tmp_path, same) == []


def test_json_of_no_difference_is_an_empty_list_and_exit_0(tmp_path: Path) -> None:
    old, new = write(tmp_path, OLD, "old.yaml"), write(tmp_path, OLD, "new.yaml")
    result = authproxy("policy", "diff", str(old), str(new), "--format", "json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["changes"] == []
    assert report["summary"] == {
        "changes": 0,
        "added": 0,
        "removed": 0,
        "changed": 0,
        "flagged": 0,
    }


# --- each kind of change --------------------------------------------------------------------

#: (edit of OLD, the one line the diff prints). A line starting with "!" is flagged.
CHANGES = {
    "level to public": (
        ("  /a.Svc/Stream: access\n", "  /a.Svc/Stream: public\n"),
        "! ~ /a.Svc/Stream: level access -> public",
    ),
    "level between token levels": (
        ("  /a.Svc/Stream: access\n", "  /a.Svc/Stream: refresh\n"),
        "  ~ /a.Svc/Stream: level access -> refresh",
    ),
    "deny to access": (
        ("  /b.Ops/Shutdown: deny\n", "  /b.Ops/Shutdown: access\n"),
        "! ~ /b.Ops/Shutdown: level deny -> access",
    ),
    "access to deny": (
        ("  /a.Svc/Stream: access\n", "  /a.Svc/Stream: deny\n"),
        "  ~ /a.Svc/Stream: level access -> deny",
    ),
    "role added (any of: more callers)": (
        ("roles: [admin]", "roles: [admin, support]"),
        "! ~ /a.Svc/Admin: roles [admin] -> [admin, support]",
    ),
    "role removed from several": (
        ("roles: [admin]", "roles: [root]"),
        "! ~ /a.Svc/Admin: roles [admin] -> [root]",
    ),
    "roles requirement removed": (
        ("roles: [admin], ", ""),
        "! ~ /a.Svc/Admin: roles [admin] -> none",
    ),
    "roles requirement added": (
        ("  /a.Svc/Stream: access\n", "  /a.Svc/Stream: {level: access, roles: [ops]}\n"),
        "  ~ /a.Svc/Stream: roles none -> [ops]",
    ),
    "permission dropped (all of: fewer needed)": (
        ("[users:read, users:write]", "[users:read]"),
        "! ~ /a.Svc/Admin: permissions [users:read, users:write] -> [users:read]",
    ),
    "permission added (all of: more needed)": (
        ("[users:read, users:write]", "[users:read, users:write, users:delete]"),
        "  ~ /a.Svc/Admin: permissions [users:read, users:write]"
        " -> [users:delete, users:read, users:write]",
    ),
    "scope replaced": (
        ("scopes: [read]", "scopes: [write]"),
        "! ~ /a.Svc/Scoped: scopes [read] -> [write]",
    ),
    "peer added": (
        ('peers: ["spiffe://c/ns/a/*"]', 'peers: ["spiffe://c/ns/a/*", "spiffe://c/ns/b/*"]'),
        "! ~ /a.Svc/Peer: peers [spiffe://c/ns/a/*] -> [spiffe://c/ns/a/*, spiffe://c/ns/b/*]",
    ),
    "peers narrowed": (
        ('peers: ["spiffe://c/ns/a/*"]', 'peers: ["spiffe://c/ns/a/sa/x"]'),
        "  ~ /a.Svc/Peer: peers [spiffe://c/ns/a/*] -> [spiffe://c/ns/a/sa/x]",
    ),
    "single use off": (
        ("{level: refresh, single_use: true}", "refresh"),
        "! ~ /a.Svc/Refresh: single use yes (revoke on reuse) -> no",
    ),
    "reuse revocation off": (
        ("single_use: true}", "single_use: true, revoke_on_reuse: false}"),
        "! ~ /a.Svc/Refresh: single use yes (revoke on reuse) -> yes",
    ),
    "single use on": (
        ("  /a.Svc/Stream: access\n", "  /a.Svc/Stream: {level: access, single_use: true}\n"),
        "  ~ /a.Svc/Stream: single use no -> yes (revoke on reuse)",
    ),
    "rate limit removed": (
        ("{level: public, rate_limit: {limit: 10/minute, key: peer}}", "public"),
        "! ~ /a.Svc/Login: rate limits 10/minute per peer -> none",
    ),
    "rate limit loosened": (
        ("10/minute", "20/minute"),
        "! ~ /a.Svc/Login: rate limits 10/minute per peer -> 20/minute per peer",
    ),
    "rate limit tightened": (
        ("10/minute", "5/minute"),
        "  ~ /a.Svc/Login: rate limits 10/minute per peer -> 5/minute per peer",
    ),
    "rate limit over a longer window, same count": (
        ("10/minute", "10/hour"),
        "  ~ /a.Svc/Login: rate limits 10/minute per peer -> 10/hour per peer",
    ),
    "rate limit over a shorter window, lower rate but a burst": (
        ("10/minute", "6 per 40 seconds"),
        "! ~ /a.Svc/Login: rate limits 10/minute per peer -> 6 per 40 seconds per peer",
    ),
    "rate limit fails open": (
        ("key: peer}", "key: peer, fail_open: true}"),
        "! ~ /a.Svc/Login: rate limits 10/minute per peer -> 10/minute per peer (fail open)",
    ),
    "rate limit added": (
        (
            "  /a.Svc/Stream: access\n",
            "  /a.Svc/Stream: {level: access, rate_limit: {limit: 1/second, key: subject}}\n",
        ),
        "  ~ /a.Svc/Stream: rate limits none -> 1/second per subject",
    ),
    "shadow mode on": (
        ("  /a.Svc/Stream: access\n", "  /a.Svc/Stream: {level: access, mode: shadow}\n"),
        "! ~ /a.Svc/Stream: mode enforce -> shadow",
    ),
    "token forwarded": (
        ("  /a.Svc/Stream: access\n", "  /a.Svc/Stream: {level: access, forward_token: true}\n"),
        "! ~ /a.Svc/Stream: forward token no -> yes",
    ),
    "streams no longer ended": (
        ("  /a.Svc/Stream: access\n", "  /a.Svc/Stream: {level: access, end_streams: false}\n"),
        "! ~ /a.Svc/Stream: end streams yes -> no",
    ),
    "method added, no weaker than what decided it": (
        ("  /a.Svc/Stream: access\n", "  /a.Svc/Stream: access\n  /a.Svc/New: access\n"),
        "  + /a.Svc/New: access",
    ),
    "method added, stricter than what decided it": (
        ("  /a.Svc/Stream: access\n", "  /a.Svc/Stream: access\n  /a.Svc/New: deny\n"),
        "  + /a.Svc/New: deny",
    ),
    "method added, weaker than the service wildcard": (
        ("  /a.Svc/Stream: access\n", "  /a.Svc/Stream: access\n  /a.Svc/New: public\n"),
        "! + /a.Svc/New: public (until now /a.Svc/*: access)",
    ),
    "service wildcard added, weaker than the default": (
        ("  /a.Svc/Stream: access\n", "  /a.Svc/Stream: access\n  /c.Other/*: public\n"),
        "! + /c.Other/*: public (until now default: access)",
    ),
    "method removed, the wildcard as strict": (
        ("  /a.Svc/Stream: access\n", ""),
        "  - /a.Svc/Stream (was access)",
    ),
    "method removed, now decided by a weaker default": (
        ("  /b.Ops/Shutdown: deny\n", ""),
        "! - /b.Ops/Shutdown (was deny; now default: access)",
    ),
    "method with requirements removed": (
        (
            "  /a.Svc/Admin: {level: access, roles: [admin], permissions: [users:read, users:write]}\n",
            "",
        ),
        "! - /a.Svc/Admin (was access, roles any of [admin], permissions all of [users:read,"
        " users:write]; now /a.Svc/*: access)",
    ),
    "http route added": (
        (
            '  "GET /api/items": access\n',
            '  "GET /api/items": access\n  "POST /api/items": access\n',
        ),
        "  + POST /api/items: access",
    ),
    "http route removed, now decided by the default": (
        ('http:\n  "GET /api/items": access\n', ""),
        "  - GET /api/items (was access)",
    ),
    "http route changed": (
        ('  "GET /api/items": access\n', '  "GET /api/items": {level: access, mode: shadow}\n'),
        "! ~ GET /api/items: mode enforce -> shadow",
    ),
    "default weakened": (
        ("default: access\n", "default: public\n"),
        "! ~ default: level access -> public",
    ),
    "default made stricter (flagged too: it decides every unnamed method)": (
        ("default: access\n", "default: deny\n"),
        "! ~ default: level access -> deny",
    ),
    "token audience added": (
        ("audience: api-access}", "audience: [api-access, other]}"),
        "! ~ tokens.access: audience [api-access] -> [api-access, other]",
    ),
    "token type changed": (
        ("{type: access,", "{type: bearer,"),
        "! ~ tokens.access: type access -> bearer",
    ),
    "token type claim changed": (
        ("{type: access,", "{type_claim: token_use, type: access,"),
        "! ~ tokens.access: type claim type -> token_use",
    ),
    "token keys no longer restricted": (
        (", keys: [refresh-hmac]}", "}"),
        "! ~ tokens.refresh: keys [refresh-hmac] -> any key",
    ),
    "token keys restricted": (
        ("audience: api-access}", "audience: api-access, keys: [k1]}"),
        "  ~ tokens.access: keys any key -> [k1]",
    ),
    "token issuer overridden": (
        ("audience: api-access}", "audience: api-access, issuer: [test-issuer, other]}"),
        "! ~ tokens.access: issuer [test-issuer] -> [other, test-issuer]",
    ),
}


@pytest.mark.parametrize("name", CHANGES)
def test_each_kind_of_change_is_one_line(tmp_path: Path, name: str) -> None:
    edit, line = CHANGES[name]
    assert lines(tmp_path, edited(edit)) == [line]


def test_a_renamed_route_is_one_removed_and_one_added(tmp_path: Path) -> None:
    new = edited(('  "GET /api/items": access\n', '  "GET /api/other": access\n'))
    assert lines(tmp_path, new) == [
        "  - GET /api/items (was access)",
        "  + GET /api/other: access",
    ]


def test_a_narrowed_token_audience_is_not_flagged(tmp_path: Path) -> None:
    wider = edited(("audience: token-refresh,", "audience: [token-refresh, old],"))
    assert lines(tmp_path, OLD, old=wider) == [
        "  ~ tokens.refresh: audience [old, token-refresh] -> [token-refresh]"
    ]


def test_only_peers_compare_as_prefix_patterns(tmp_path: Path) -> None:
    wider = edited(('peers: ["spiffe://c/ns/a/*"]', 'peers: ["spiffe://c/*"]'))
    assert lines(tmp_path, wider) == [
        "! ~ /a.Svc/Peer: peers [spiffe://c/ns/a/*] -> [spiffe://c/*]"
    ]
    assert lines(tmp_path, OLD, old=wider) == [
        "  ~ /a.Svc/Peer: peers [spiffe://c/*] -> [spiffe://c/ns/a/*]"
    ]
    pattern_like = edited(("roles: [admin]", 'roles: ["adm*"]'))  # a role is never a pattern
    assert lines(tmp_path, OLD, old=pattern_like) == ["! ~ /a.Svc/Admin: roles [adm*] -> [admin]"]


def test_http_routes_are_judged_against_the_route_that_decided_them(tmp_path: Path) -> None:
    """A route added is compared with the route that matched its path before; a route
    removed with the one that matches it now."""
    wildcard = edited(('  "GET /api/items": access\n', '  "GET /api/*": access\n'))
    both = edited(
        ('  "GET /api/items": access\n', '  "GET /api/*": access\n  "GET /api/items": public\n')
    )
    assert lines(tmp_path, both, old=wildcard) == [
        "! + GET /api/items: public (until now GET /api/*: access)"
    ]
    public_wildcard = edited(('  "GET /api/items": access\n', '  "GET /api/*": public\n'))
    assert lines(tmp_path, public_wildcard) == [
        "! + GET /api/*: public (until now default: access)",
        "! - GET /api/items (was access; now GET /api/*: public)",
    ]


def test_token_levels_added_and_removed(tmp_path: Path) -> None:
    with_2fa = edited(("tokens:\n", "tokens:\n  2fa: {type: 2fa_pending, audience: verify}\n"))
    assert lines(tmp_path, with_2fa) == [
        "  + tokens.2fa: type 2fa_pending, type claim type, audience [verify],"
        " issuer [test-issuer], keys any key, claims the usual names"
    ]
    assert lines(tmp_path, OLD, old=with_2fa) == [
        "  - tokens.2fa (was type 2fa_pending, type claim type, audience [verify],"
        " issuer [test-issuer], keys any key, claims the usual names)"
    ]


def test_changes_come_in_the_tables_order_then_tokens(tmp_path: Path) -> None:
    new = edited(
        ("default: access\n", "default: deny\n"),
        ("audience: api-access}", "audience: api-access, keys: [k1]}"),
        ('  "GET /api/items": access\n', '  "GET /api/items": public\n'),
        ("  /b.Ops/Shutdown: deny\n", ""),
        ("  /a.Svc/Stream: access\n", "  /a.Svc/Stream: refresh\n"),
    )
    subjects = [c.subject for c in changes(tmp_path, new)]
    assert subjects == [
        "/a.Svc/Stream",
        "/b.Ops/Shutdown",
        "GET /api/items",
        "default",
        "tokens.access",
    ]


def test_a_rule_with_several_changes_has_one_line_each(tmp_path: Path) -> None:
    new = edited(("{level: refresh, single_use: true}", "{level: access, mode: shadow}"))
    assert lines(tmp_path, new) == [
        "  ~ /a.Svc/Refresh: level refresh -> access",
        "! ~ /a.Svc/Refresh: single use yes (revoke on reuse) -> no",
        "! ~ /a.Svc/Refresh: mode enforce -> shadow",
    ]


def test_diff_follows_the_tables_requirement_fields(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A requirement field `requirements` lists is compared by its name; one the diff
    cannot read as a set is flagged whenever it changes or goes away."""
    real = table.requirements

    def with_tenant(rule: Rule) -> list[str]:
        return [*real(rule), *(["tenant is acme"] if rule.level == "access" else [])]

    monkeypatch.setattr(table, "requirements", with_tenant)
    new = edited(("  /a.Svc/Stream: access\n", "  /a.Svc/Stream: refresh\n"))
    assert lines(tmp_path, new) == [
        "  ~ /a.Svc/Stream: level access -> refresh",
        "! ~ /a.Svc/Stream: tenant is acme -> none",
    ]


# --- the report -----------------------------------------------------------------------------


def test_the_summary_counts_each_kind_and_the_flagged(tmp_path: Path) -> None:
    new = edited(
        ("  /b.Ops/Shutdown: deny\n", ""),
        ("roles: [admin]", "roles: [admin, support]"),
        ("10/minute", "5/minute"),
        ("  /a.Svc/Stream: access\n", "  /a.Svc/Stream: access\n  /a.Svc/New: access\n"),
    )
    report = policy_diff.text_report(changes(tmp_path, new)).splitlines()
    assert report[-1] == (
        "summary: 4 changes (1 added, 1 removed, 2 changed); 2 flagged (!) for security review"
    )
    assert sum(line.startswith("! ") for line in report) == 2
    assert policy_diff.text_report([]) == ""


def test_json_lists_each_change(tmp_path: Path) -> None:
    old = write(tmp_path, OLD, "old.yaml")
    new = write(tmp_path, edited(("roles: [admin]", "roles: [admin, support]")), "new.yaml")
    result = authproxy("policy", "diff", str(old), str(new), "--format", "json", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["changes"] == [
        {
            "change": "changed",
            "section": "methods",
            "subject": "/a.Svc/Admin",
            "aspect": "roles",
            "old": "[admin]",
            "new": "[admin, support]",
            "flagged": True,
            "line": "! ~ /a.Svc/Admin: roles [admin] -> [admin, support]",
        }
    ]
    assert report["summary"] == {
        "changes": 1,
        "added": 0,
        "removed": 0,
        "changed": 1,
        "flagged": 1,
    }


# --- the command ----------------------------------------------------------------------------


def test_differences_print_the_report_and_exit_1(tmp_path: Path) -> None:
    old = write(tmp_path, OLD, "old.yaml")
    new = write(tmp_path, edited(("default: access\n", "default: public\n")), "new.yaml")
    result = authproxy("policy", "diff", str(old), str(new), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert result.stderr == ""
    assert result.stdout.splitlines() == [
        "! ~ default: level access -> public",
        "summary: 1 change (0 added, 0 removed, 1 changed); 1 flagged (!) for security review",
    ]


def test_a_broken_policy_exits_2_naming_file_and_line(tmp_path: Path) -> None:
    old = write(tmp_path, OLD, "old.yaml")
    bad = write(
        tmp_path, edited(("  /a.Svc/Stream: access\n", "  /a.Svc/Stream: acess\n")), "new.yaml"
    )
    line = OLD.splitlines().index("  /a.Svc/Stream: access") + 1
    for args in ([old, bad], [bad, old]):
        result = authproxy("policy", "diff", *map(str, args), cwd=tmp_path)
        assert result.returncode == 2
        assert result.stdout == ""
        assert result.stderr.splitlines() == [
            f"{bad}:{line}: unknown level 'acess' for /a.Svc/Stream"
            " (expected one of public, 2fa, refresh, access, deny)"
        ]


def test_both_policies_broken_reports_both(tmp_path: Path) -> None:
    one = write(tmp_path, "version: 2\n", "one.yaml")
    two = write(tmp_path, "version: 1\nmethods:\n  nope: deny\n", "two.yaml")
    result = authproxy("policy", "diff", str(one), str(two), "--format", "json", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    errors = result.stderr.splitlines()
    assert [e.partition(": ")[0] for e in errors] == [f"{one}:1", f"{two}:3"]


def test_a_missing_file_exits_2(tmp_path: Path) -> None:
    old = write(tmp_path, OLD, "old.yaml")
    result = authproxy("policy", "diff", str(old), "absent.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("absent.yaml: cannot read policy")


def test_a_missing_argument_is_a_usage_error(tmp_path: Path) -> None:
    result = authproxy("policy", "diff", "only-one.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("authproxy: error:")
    assert "new" in result.stderr


# --- the README -----------------------------------------------------------------------------

#: The edit the README describes: the support role may list users, the login limit is
#: 5/minute, the Shutdown rule is gone, and a new DataService method has a shadow rule.
README_EDITS = (
    (
        "  /api.v1.UserService/ListUsers: {level: access, roles: [admin]}\n",
        "  /api.v1.UserService/ListUsers: {level: access, roles: [admin, support]}\n",
    ),
    (
        "    rate_limit: {limit: 10/minute, key: peer}\n",
        "    rate_limit: {limit: 5/minute, key: peer}\n",
    ),
    ("  /admin.v1.Ops/Shutdown: deny\n", ""),
    (
        "  /api.v1.DataService/*: access\n",
        "  /api.v1.DataService/*: access\n"
        "  /api.v1.DataService/Export: {level: access, roles: [auditor], mode: shadow}\n",
    ),
)


def test_the_readme_diff_is_the_commands_output_for_the_edit_it_describes(
    tmp_path: Path,
) -> None:
    text = section(README, "### Policy table and diff")
    command = "authproxy policy diff policy.yaml edited.yaml"
    blocks = re.findall(r"^```console\n(.*?)^```", text, flags=re.S | re.M)
    (block,) = [b for b in blocks if b.startswith(f"$ {command}\n")]
    sample = block.splitlines()[1:]
    shutil.copy2(REPO / "policy.yaml", tmp_path / "policy.yaml")
    policy = (REPO / "policy.yaml").read_text()
    for before, after in README_EDITS:
        assert policy.count(before) == 1, before
        policy = policy.replace(before, after)
    (tmp_path / "edited.yaml").write_text(policy)
    result = authproxy(*command.split()[1:], cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == sample


def test_a_when_condition_dropped_is_flagged_and_one_added_is_not(tmp_path: Path) -> None:
    stream = "  /a.Svc/Stream: access\n"
    tenant = "[{claim: tenant_id, equals_header: x-tenant-id}]"
    bound = f"  /a.Svc/Stream: {{level: access, when: {tenant}}}\n"
    assert lines(tmp_path, edited((stream, bound))) == [
        '  ~ /a.Svc/Stream: when none -> ["tenant_id equals header x-tenant-id"]'
    ]
    assert lines(tmp_path, OLD, old=edited((stream, bound))) == [
        '! ~ /a.Svc/Stream: when ["tenant_id equals header x-tenant-id"] -> none'
    ]


def test_a_changed_claim_mapping_is_flagged(tmp_path: Path) -> None:
    access = "  access:  {type: access, audience: api-access}\n"
    mapped = "  access:  {type: access, audience: api-access, claims: {roles: groups}}\n"
    assert lines(tmp_path, edited((access, mapped))) == [
        "! ~ tokens.access: claims the usual names -> roles from groups"
    ]
