"""The policy as a review table (`authproxy policy table`): one row per `methods:` rule, per
`http:` route and for the default, with what a call needs — level, requirements, single
use, rate limits, mode, and the level's token (type and audience from `tokens:`).

The table is a function of the policy's meaning only: rows in a fixed order (`methods:`
sorted by pattern, then `http:` routes sorted by path and method, then the default),
every set sorted, and no version, file name or time, so a copy committed next to the
policy changes exactly when a rule does. `requirements(rule)` is the one place that
lists a rule's requirement fields; `policy diff` (`policy/diff.py`) compares rules
through it too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from authproxy.policy.model import Policy, RateLimit, Rule, TokenSpec

FORMATS = ("text", "markdown", "json")
COLUMNS = ("pattern", "level", "requirements", "single use", "rate limits", "mode", "token")
#: A requirement needs one of its values (roles, peers) or every one (permissions, scopes).
ANY_OF = "any of"
ALL_OF = "all of"
#: An empty cell: the rule sets nothing there.
NONE = "-"
#: Values shown without quotes; any other is shown as a JSON string.
_PLAIN = re.compile(r'[^\s,;\[\]"|]+')
#: Characters GitHub would read as markup; `_` only where it could start or end emphasis.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*|<]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9]))")
_SECTIONS = ("methods", "http", "default")


@dataclass(frozen=True, slots=True)
class Row:
    """One rule of the policy and the token its level accepts (None: public or deny)."""

    section: str  # "methods", "http" or "default"
    rule: Rule
    token: TokenSpec | None


def requirements(rule: Rule) -> list[str]:
    """What a caller must show besides the level's token, one `NAME HOW [VALUES]` entry per
    requirement the rule sets (none: empty), in a fixed order. NAME is the `Rule` field,
    HOW is `any of` or `all of`, VALUES are sorted. A new requirement field is one more
    line here: the table, and `policy diff` (which compares entries by NAME), follow."""
    fields: tuple[tuple[str, str, Iterable[str]], ...] = (
        ("roles", ANY_OF, rule.roles),
        ("permissions", ALL_OF, rule.permissions),
        ("scopes", ALL_OF, rule.scopes),
        ("peers", ANY_OF, rule.peers),
        ("when", ALL_OF, [str(condition) for condition in rule.when]),
    )
    return [f"{name} {how} [{listed(values)}]" for name, how, values in fields if values]


def listed(values: Iterable[str]) -> str:
    """Values sorted and comma-separated; one with a space, comma, bracket or quote in it
    is shown as a JSON string, so the list reads back unambiguously."""
    return ", ".join(v if _PLAIN.fullmatch(v) else json.dumps(v) for v in sorted(values))


def rate_text(limit: RateLimit) -> str:
    """`10/minute per peer`, `100 per 2 hours per subject (fail open)`."""
    item = limit.item
    unit = item.GRANULARITY.name
    rate = (
        f"{item.amount}/{unit}"
        if item.multiples == 1
        else f"{item.amount} per {item.multiples} {unit}s"
    )
    return f"{rate} per {limit.key}" + (" (fail open)" if limit.fail_open else "")


def single_use_text(rule: Rule) -> str:
    if not rule.single_use:
        return NONE
    return "yes (revoke on reuse)" if rule.revoke_on_reuse else "yes"


def mode_text(rule: Rule) -> str:
    return "shadow" if rule.shadow else "enforce"


def token_text(spec: TokenSpec | None) -> str:
    """`access (aud api-access)`: the token type and audiences a level accepts."""
    if spec is None:
        return NONE
    return f"{spec.type} (aud {listed(spec.audiences)})"


def order_key(section: str, pattern: str) -> tuple[int, str, str]:
    """Where a rule's row goes: methods by pattern, http routes by path then method, the
    default last."""
    if section == "http":
        method, _, path = pattern.partition(" ")
        return (_SECTIONS.index(section), path, method)
    return (_SECTIONS.index(section), pattern, "")


def rows(policy: Policy) -> list[Row]:
    """Every rule of the policy, in the table's order."""
    found = [("methods", rule) for rule in (*policy.exact.values(), *policy.services.values())]
    found += [("http", route.rule) for route in policy.http.routes]
    found.sort(key=lambda item: order_key(item[0], item[1].pattern))
    found.append(("default", policy.default))
    return [
        Row(section, rule, policy.tokens.get(rule.level) if rule.needs_token else None)
        for section, rule in found
    ]


def cells(row: Row) -> list[str]:
    """The row's text, one string per column of `COLUMNS`."""
    rule = row.rule
    return [
        rule.pattern,
        rule.level,
        "; ".join(requirements(rule)) or NONE,
        single_use_text(rule),
        "; ".join(rate_text(limit) for limit in rule.rate_limits) or NONE,
        mode_text(rule),
        token_text(row.token),
    ]


def row_json(row: Row) -> dict[str, Any]:
    rule, spec = row.rule, row.token
    return {
        "pattern": rule.pattern,
        "section": row.section,
        "level": rule.level,
        "requirements": requirements(rule),
        "single_use": rule.single_use,
        "revoke_on_reuse": rule.single_use and rule.revoke_on_reuse,
        "rate_limits": [rate_text(limit) for limit in rule.rate_limits],
        "mode": mode_text(rule),
        "token": None if spec is None else {"type": spec.type, "audiences": sorted(spec.audiences)},
    }


def text_table(table: list[Row]) -> str:
    """Columns padded to their widest cell, two spaces apart, under a dashed header rule."""
    header = [c.upper() for c in COLUMNS]
    body = [cells(row) for row in table]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(COLUMNS))]
    dashes = ["-" * w for w in widths]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in [header, dashes, *body]
    )


def markdown_table(table: list[Row]) -> str:
    """A GitHub table: patterns in code spans (their `*` stay literal), other cells
    escaped."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in table:
        pattern, *rest = cells(row)
        shown = ["`" + pattern + "`", *(_MARKDOWN_SPECIAL.sub(r"\\\1", cell) for cell in rest)]
        lines.append("| " + " | ".join(shown) + " |")
    return "\n".join(lines)


def render(policy: Policy, fmt: str = "text") -> str:
    """The table in one of `FORMATS`."""
    table = rows(policy)
    if fmt == "json":
        return json.dumps([row_json(row) for row in table], indent=2)
    if fmt == "markdown":
        return markdown_table(table)
    if fmt == "text":
        return text_table(table)
    raise ValueError(f"unknown table format {fmt!r} (expected one of {', '.join(FORMATS)})")
