"""`authproxy policy table`: the policy's rules as a review table (`policy/table.py`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from authproxy.policy.loader import load_policy
from authproxy.policy.model import Rule
from authproxy.policy.table import COLUMNS, rate_text, render, requirements
from tests.support.cli import authproxy
from tests.support.readme import README, section

REPO = Path(__file__).resolve().parents[2]

POLICY = """\
version: 1
default: deny
issuer: test-issuer
tokens:
  refresh: {type: refresh, audience: token-refresh}
  access:  {type: access, audience: [other-api, api-access]}
methods:
  /z.Last/Call: public
  /a.Svc/*: access
  /a.Svc/Admin:
    level: access
    roles: [ops, admin]
    permissions: [users:write, users:read]
    scopes: [b, a]
    peers: ["spiffe://c/ns/x/*", "CN=ops,O=Example"]
  /a.Svc/Refresh:
    level: refresh
    single_use: true
    rate_limit:
      - {limit: 10/hour, key: sid}
      - {limit: 100 per 2 hours, key: subject, fail_open: true}
  /a.Svc/Once: {level: refresh, single_use: true, revoke_on_reuse: false}
  /a.Svc/Login: {level: public, rate_limit: {limit: 10/minute, key: peer}}
  /a.Svc/Try: {level: access, mode: shadow}
http:
  "POST /api/items": access
  "GET /api/items": public
  "* /api/admin/**": {level: access, roles: [admin]}
  "DELETE /api/zeta": deny
"""
#: POLICY's rows: methods by pattern, then http routes by path and method, then default.
ORDER = [
    "/a.Svc/*",
    "/a.Svc/Admin",
    "/a.Svc/Login",
    "/a.Svc/Once",
    "/a.Svc/Refresh",
    "/a.Svc/Try",
    "/z.Last/Call",
    "* /api/admin/**",
    "GET /api/items",
    "POST /api/items",
    "DELETE /api/zeta",
    "default",
]
ADMIN_REQUIREMENTS = [
    "roles any of [admin, ops]",
    "permissions all of [users:read, users:write]",
    "scopes all of [a, b]",
    'peers any of ["CN=ops,O=Example", spiffe://c/ns/x/*]',
]


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def text_rows(out: str) -> list[dict[str, str]]:
    """A text table read back by its header's column offsets (cells hold single spaces
    only, columns are two or more spaces apart)."""
    header, dashes, *body = out.splitlines()
    starts = [m.start() for m in re.finditer(r"\S+(?: \S+)*", header)]
    assert [header[s:].split("  ")[0].strip() for s in starts] == [c.upper() for c in COLUMNS]
    assert [m.start() for m in re.finditer(r"-+", dashes)] == starts
    bounds = [*starts[1:], None]
    return [
        {col: line[s:e].strip() for col, s, e in zip(COLUMNS, starts, bounds, strict=True)}
        for line in body
    ]


@pytest.fixture
def table(tmp_path: Path) -> dict[str, dict[str, str]]:
    out = render(load_policy(write(tmp_path, POLICY)), "text")
    return {row["pattern"]: row for row in text_rows(out)}


# --- rows and columns -----------------------------------------------------------------------


def test_one_row_per_rule_methods_then_routes_then_the_default(tmp_path: Path) -> None:
    out = render(load_policy(write(tmp_path, POLICY)), "text")
    assert [row["pattern"] for row in text_rows(out)] == ORDER


def test_level_column(table: dict[str, dict[str, str]]) -> None:
    levels = {pattern: row["level"] for pattern, row in table.items()}
    assert levels["/a.Svc/Refresh"] == "refresh"
    assert levels["/z.Last/Call"] == "public"
    assert levels["GET /api/items"] == "public"
    assert levels["default"] == "deny"
    assert levels["/a.Svc/*"] == "access"


def test_requirements_column_lists_each_kind_sorted(table: dict[str, dict[str, str]]) -> None:
    assert table["/a.Svc/Admin"]["requirements"] == "; ".join(ADMIN_REQUIREMENTS)
    assert table["* /api/admin/**"]["requirements"] == "roles any of [admin]"
    assert table["/a.Svc/*"]["requirements"] == "-"


def test_single_use_column(table: dict[str, dict[str, str]]) -> None:
    assert table["/a.Svc/Refresh"]["single use"] == "yes (revoke on reuse)"
    assert table["/a.Svc/Once"]["single use"] == "yes"
    assert table["/a.Svc/Login"]["single use"] == "-"


def test_rate_limits_column(table: dict[str, dict[str, str]]) -> None:
    assert table["/a.Svc/Login"]["rate limits"] == "10/minute per peer"
    assert (
        table["/a.Svc/Refresh"]["rate limits"]
        == "10/hour per sid; 100 per 2 hours per subject (fail open)"
    )
    assert table["/a.Svc/Try"]["rate limits"] == "-"


def test_mode_column(table: dict[str, dict[str, str]]) -> None:
    assert table["/a.Svc/Try"]["mode"] == "shadow"
    assert {row["mode"] for p, row in table.items() if p != "/a.Svc/Try"} == {"enforce"}


def test_token_column_is_the_levels_type_and_audiences(table: dict[str, dict[str, str]]) -> None:
    assert table["/a.Svc/*"]["token"] == "access (aud api-access, other-api)"
    assert table["/a.Svc/Refresh"]["token"] == "refresh (aud token-refresh)"
    assert table["/z.Last/Call"]["token"] == "-"  # public
    assert table["default"]["token"] == "-"  # deny


def test_a_top_level_shadow_mode_shows_on_every_rule_not_enforcing(tmp_path: Path) -> None:
    text = "version: 1\nmode: shadow\ndefault: deny\nmethods:\n  /a.B/C: public\n"
    text += "  /a.B/D: {level: public, mode: enforce}\n"
    rows = text_rows(render(load_policy(write(tmp_path, text)), "text"))
    assert {r["pattern"]: r["mode"] for r in rows} == {
        "/a.B/C": "shadow",
        "/a.B/D": "enforce",
        "default": "shadow",
    }


def test_requirements_is_one_entry_per_field_set() -> None:
    assert requirements(Rule("/a.B/C", "access")) == []
    rule = Rule("/a.B/C", "access", scopes=frozenset({"y", "x"}), peers=("spiffe://a/*",))
    assert requirements(rule) == ["scopes all of [x, y]", "peers any of [spiffe://a/*]"]
    quoted = Rule("/a.B/C", "access", roles=frozenset({"a b", "c"}))
    assert requirements(quoted) == ['roles any of ["a b", c]']


def test_rate_text(tmp_path: Path) -> None:
    text = """\
version: 1
methods:
  /a.B/C:
    level: public
    rate_limit:
      - {limit: 1/second}
      - {limit: 3 per 5 minutes, key: peer, fail_open: true}
"""
    rule = load_policy(write(tmp_path, text)).exact["/a.B/C"]
    assert [rate_text(r) for r in rule.rate_limits] == [
        "1/second per peer",
        "3 per 5 minutes per peer (fail open)",
    ]


# --- formats --------------------------------------------------------------------------------


def test_text_columns_line_up_under_the_header(tmp_path: Path) -> None:
    out = render(load_policy(write(tmp_path, POLICY)), "text")
    header, dashes, *body = out.splitlines()
    starts = [m.start() for m in re.finditer(r"-+", dashes)]
    assert len(starts) == len(COLUMNS)
    assert [header.index(c.upper()) for c in COLUMNS] == starts
    for line in body:
        for start in starts[1:]:
            assert line[start - 2 : start] == "  " and line[start] != " ", (line, start)
    assert all(line == line.rstrip() for line in out.splitlines())


def test_markdown_is_a_github_table(tmp_path: Path) -> None:
    out = render(load_policy(write(tmp_path, POLICY)), "markdown")
    header, separator, *body = out.splitlines()
    assert header == "| " + " | ".join(COLUMNS) + " |"
    assert separator == "|" + "---|" * len(COLUMNS)
    assert len(body) == len(ORDER)
    for line, pattern in zip(body, ORDER, strict=True):
        cells = re.split(r"(?<!\\)\|", line)[1:-1]  # an escaped \| stays in its cell
        assert len(cells) == len(COLUMNS), line
        assert cells[0].strip() == f"`{pattern}`"  # the `*` of a wildcard stays literal
    admin = body[ORDER.index("/a.Svc/Admin")]
    assert r"spiffe://c/ns/x/\*" in admin  # not the start of emphasis


def test_json_is_a_list_of_objects(tmp_path: Path) -> None:
    rows = json.loads(render(load_policy(write(tmp_path, POLICY)), "json"))
    assert [r["pattern"] for r in rows] == ORDER
    by = {r["pattern"]: r for r in rows}
    assert by["/a.Svc/Admin"]["requirements"] == ADMIN_REQUIREMENTS
    assert by["/a.Svc/Refresh"] == {
        "pattern": "/a.Svc/Refresh",
        "section": "methods",
        "level": "refresh",
        "requirements": [],
        "single_use": True,
        "revoke_on_reuse": True,
        "rate_limits": ["10/hour per sid", "100 per 2 hours per subject (fail open)"],
        "mode": "enforce",
        "token": {"type": "refresh", "audiences": ["token-refresh"]},
    }
    assert by["GET /api/items"]["section"] == "http"
    assert by["default"]["section"] == "default"
    assert by["default"]["token"] is None


def test_an_unknown_format_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="csv"):
        render(load_policy(write(tmp_path, POLICY)), "csv")


# --- determinism ----------------------------------------------------------------------------


def test_the_table_depends_only_on_what_the_policy_means(tmp_path: Path) -> None:
    """POLICY with its rules and lists in another order, other spellings and comments,
    under another file name: the same table in every format, and no version in it."""
    reordered = """\
# The same rules as POLICY, written another way.
version: 1
http:
  "DELETE /api/zeta": deny
  "* /api/admin/**": {level: access, roles: [admin]}
  "GET /api/items": public
  "POST /api/items": access
methods:
  /a.Svc/Try: {level: access, mode: shadow}
  /a.Svc/Login: {level: public, rate_limit: [{limit: 10 per 1 minute, key: peer}]}
  /a.Svc/Once: {level: refresh, single_use: true, revoke_on_reuse: false}
  /a.Svc/Refresh:
    level: refresh
    rate_limit:
      - {limit: 10/hour, key: sid}
      - {limit: 100 per 2 hours, key: subject, fail_open: true}
    single_use: true
  /a.Svc/Admin:
    peers: ["CN=ops,O=Example", "spiffe://c/ns/x/*"]
    scopes: [a, b]
    permissions: [users:read, users:write]
    roles: [admin, ops]
    level: access
  /a.Svc/*: access
  /z.Last/Call: {level: public}
tokens:
  access:  {audience: [api-access, other-api], type: access}
  refresh: {type: refresh, audience: [token-refresh]}
issuer: test-issuer
default: {level: deny}
"""
    first = load_policy(write(tmp_path, POLICY))
    second = load_policy(write(tmp_path, reordered, "other-name.yaml"))
    assert first.version != second.version
    for fmt in ("text", "markdown", "json"):
        out = render(first, fmt)
        assert out == render(second, fmt)
        assert first.version not in out and "policy.yaml" not in out


def test_two_runs_print_the_same_bytes(tmp_path: Path) -> None:
    path = write(tmp_path, POLICY)
    runs = [authproxy("policy", "table", str(path), cwd=tmp_path) for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr
    assert runs[0].stdout == runs[1].stdout
    assert runs[0].stdout == render(load_policy(path), "text") + "\n"


# --- the command ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["text", "markdown", "json"])
def test_the_command_prints_each_format(tmp_path: Path, fmt: str) -> None:
    path = write(tmp_path, POLICY)
    result = authproxy("policy", "table", str(path), "--format", fmt, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout == render(load_policy(path), fmt) + "\n"


def test_a_broken_policy_exits_2_naming_file_and_line(tmp_path: Path) -> None:
    bad = write(tmp_path, "version: 1\nmethods:\n  /a.B/C: public\n  /a.B/D: acess\n")
    result = authproxy("policy", "table", str(bad), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines()[0].startswith(f"{bad}:4: unknown level 'acess'")
    assert "Traceback" not in result.stderr


def test_a_missing_file_exits_2(tmp_path: Path) -> None:
    result = authproxy("policy", "table", "absent.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("absent.yaml: cannot read policy")


def test_an_unknown_format_is_a_usage_error(tmp_path: Path) -> None:
    result = authproxy(
        "policy", "table", str(write(tmp_path, POLICY)), "--format", "csv", cwd=tmp_path
    )
    assert result.returncode == 2
    assert "authproxy: error:" in result.stderr and "csv" in result.stderr


# --- the README -----------------------------------------------------------------------------


def console_sample(text: str, command: str) -> list[str]:
    """The lines a `console` block shows after `$ COMMAND`, up to the block's end."""
    blocks = re.findall(r"^```console\n(.*?)^```", text, flags=re.S | re.M)
    prompt = f"$ {command}\n"
    found = [b[len(prompt) :] for b in blocks if b.startswith(prompt)]
    assert len(found) == 1, f"no single console block runs {command!r}"
    return found[0].splitlines()


def test_the_readme_table_is_the_commands_output_for_the_shipped_policy() -> None:
    command = "authproxy policy table policy.yaml"
    sample = console_sample(section(README, "### Policy table and diff"), command)
    result = authproxy(*command.split()[1:], cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == sample


def test_requirements_list_the_when_conditions(tmp_path: Path) -> None:
    policy = load_policy(
        write(
            tmp_path,
            "version: 1\ntokens:\n  access: {type: access, audience: api}\nmethods:\n"
            "  /a.B/C:\n    level: access\n    when:\n"
            "      - {claim: org.tier, in: [gold, silver]}\n"
            "      - {claim: tenant_id, equals_header: x-tenant-id}\n",
        )
    )
    assert requirements(policy.exact["/a.B/C"]) == [
        'when all of ["org.tier in [gold, silver]", "tenant_id equals header x-tenant-id"]'
    ]
