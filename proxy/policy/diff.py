"""What changed between two policies, and which changes weaken them (`authproxy policy diff`).

Rules are compared by pattern (each `methods:` key, each `http:` route, the default),
token levels by name. Each difference is one line: `+ PATTERN: RULE` (added),
`- PATTERN (was RULE)` (removed), `~ PATTERN: ASPECT OLD -> NEW` (one line per changed
aspect: level, each requirement of `table.requirements`, single use, rate limits, mode,
forward token, end streams), and the same for `tokens.LEVEL` (type, type claim,
audience, issuer, keys).

A line starts with `!` when the change needs a security review because it lets more
through: a rule that becomes `public`, a `deny` that becomes anything else, a
requirement removed or widened (a role or peer added to an any-of list, a permission
or scope dropped from an all-of list), single use or reuse revocation switched off, a
rate limit removed or loosened, shadow mode switched on, the token forwarded, streams
no longer ended, a token level accepting more audiences, issuers, keys or another type
— and any change of the default's level, which decides every method no rule names. An
added rule is judged against the rule that decided its pattern before, a removed one
against the rule that decides it now.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from authproxy.policy import table
from authproxy.policy.http_routes import REST, parse_route_key
from authproxy.policy.model import DENY, LEVELS, PUBLIC, Policy, RateLimit, Rule, TokenSpec

FORMATS = ("text", "json")
ADDED, REMOVED, CHANGED = "added", "removed", "changed"
_SIGNS = {ADDED: "+", REMOVED: "-", CHANGED: "~"}
_NOTHING = "none"
#: Requirements whose values may be prefix patterns ending in `*` (`Rule.peer_allowed`).
_PREFIX_PATTERNS = frozenset({"peers"})


@dataclass(frozen=True, slots=True)
class Change:
    """One line of the diff."""

    kind: str  # ADDED, REMOVED or CHANGED
    section: str  # "methods", "http", "default" or "tokens"
    subject: str  # the rule's pattern, "default", or "tokens.LEVEL"
    detail: str  # what follows the subject on the line
    flagged: bool  # lets more through (or changes the default's level)
    aspect: str | None = None  # for CHANGED: what changed
    old: str | None = None
    new: str | None = None

    @property
    def line(self) -> str:
        return f"{'!' if self.flagged else ' '} {_SIGNS[self.kind]} {self.subject}{self.detail}"


# --- rules -------------------------------------------------------------------------------


def aspects(rule: Rule) -> dict[str, tuple[str, Callable[[Rule, Rule], bool]]]:
    """A rule's comparable aspects: name -> (shown value, whether going from the first
    rule to the second lets more through)."""
    out: dict[str, tuple[str, Callable[[Rule, Rule], bool]]] = {
        "level": (rule.level, _level_weaker)
    }
    for entry in table.requirements(rule):
        name, _, value = entry.partition(" ")
        how = next((h for h in (table.ANY_OF, table.ALL_OF) if value.startswith(h + " ")), "")
        out[name] = (value.removeprefix(how).strip(), _requirement_weaker(name, how))
    single = table.single_use_text(rule)
    out["single use"] = ("no" if single == table.NONE else single, _single_use_weaker)
    out["rate limits"] = ("; ".join(map(table.rate_text, rule.rate_limits)), _rates_weaker)
    out["mode"] = (table.mode_text(rule), lambda a, b: b.shadow and not a.shadow)
    out["forward token"] = (
        _yes(rule.forward_token),
        lambda a, b: b.forward_token > a.forward_token,
    )
    out["end streams"] = (_yes(rule.end_streams), lambda a, b: a.end_streams > b.end_streams)
    return out


def rule_changes(old: Rule, new: Rule) -> list[tuple[str, str, str, bool]]:
    """(aspect, old value, new value, lets more through) for each aspect that differs."""
    before, after = aspects(old), aspects(new)
    out = []
    for name in [*before, *(n for n in after if n not in before)]:
        was, weaker = before.get(name, ("", None))
        now, weaker_now = after.get(name, ("", None))
        if was != now:
            check = weaker or weaker_now
            out.append((name, was or _NOTHING, now or _NOTHING, bool(check and check(old, new))))
    return out


def summary(rule: Rule) -> str:
    """`access, roles any of [admin], rate limits 10/minute per peer`: the level, the
    requirements, and every other aspect that is not at its default."""
    plain = aspects(Rule(rule.pattern, rule.level))
    parts = [rule.level, *table.requirements(rule)]
    for name, (value, _) in aspects(rule).items():
        if name in plain and value != plain[name][0]:
            parts.append(f"{name} {value or _NOTHING}")
    return ", ".join(parts)


def _level_weaker(old: Rule, new: Rule) -> bool:
    return (new.level == PUBLIC != old.level) or (old.level == DENY != new.level)


def _requirement_weaker(name: str, how: str) -> Callable[[Rule, Rule], bool]:
    def weaker(old: Rule, new: Rule) -> bool:
        was, now = _values(old, name), _values(new, name)
        if was is None or now is None or not how:  # unknown shape: any change of a set one
            return any(e.partition(" ")[0] == name for e in table.requirements(old))
        if how == table.ALL_OF:
            return not was <= now
        # any of; none listed: anyone
        return bool(was) and (not now or not all(_covered(v, was, name) for v in now))

    return weaker


def _covered(value: str, accepted: frozenset[str], name: str) -> bool:
    """Whether `accepted` lets `value` through: equal, or (peers) a prefix pattern `p*`
    that `value` (itself a prefix pattern or not) starts with."""
    if value in accepted:
        return True
    prefixes = (p[:-1] for p in accepted if name in _PREFIX_PATTERNS and p.endswith("*"))
    return any(value.startswith(prefix) for prefix in prefixes)


def _values(rule: Rule, name: str) -> frozenset[str] | None:
    value = getattr(rule, name, None)
    if isinstance(value, frozenset | tuple):
        return frozenset(str(v) for v in value)
    return None


def _single_use_weaker(old: Rule, new: Rule) -> bool:
    if not old.single_use:
        return False
    return not new.single_use or (old.revoke_on_reuse and not new.revoke_on_reuse)


def _rates_weaker(old: Rule, new: Rule) -> bool:
    """Some old limit is not implied by a new one on the same key."""
    return any(not any(_implies(n, o) for n in new.rate_limits) for o in old.rate_limits)


def _implies(new: RateLimit, old: RateLimit) -> bool:
    """Whether `new` lets at most what `old` does through: any window of `old`'s length
    is covered by ceil(old window / new window) windows of `new`'s."""
    if new.key != old.key or (new.fail_open and not old.fail_open):
        return False
    windows = math.ceil(old.item.get_expiry() / new.item.get_expiry())
    return new.item.amount * windows <= old.item.amount


def _yes(value: bool) -> str:
    return "yes" if value else "no"


# --- what decides a pattern -------------------------------------------------------------


def deciding_rule(policy: Policy, section: str, pattern: str) -> Rule:
    """The rule of `policy` that decides calls matching `pattern` (a rule's own pattern,
    or what they fall to when the policy has no such rule). An `http:` route is looked up
    as a request of its method to its path, wildcards standing for any segment."""
    if section == "default":
        return policy.default
    if section == "methods":
        return policy.match(pattern)
    method, segments = parse_route_key(pattern)
    path = tuple(s for s in segments if s != REST)
    return policy.http.match(method, path) or policy.default


def _rule_lines(
    old: Policy, new: Policy, key: tuple[str, str], was: Rule | None, now: Rule | None
) -> list[Change]:
    """The lines for one pattern: `was` is its rule in `old`, `now` in `new` (None: none)."""
    section, pattern = key
    if was is None and now is not None:
        before = deciding_rule(old, section, pattern)
        weaker = any(flag for *_, flag in rule_changes(before, now))
        until = f" (until now {before.pattern}: {summary(before)})" if weaker else ""
        return [Change(ADDED, section, pattern, f": {summary(now)}{until}", weaker)]
    if now is None and was is not None:
        after = deciding_rule(new, section, pattern)
        weaker = any(flag for *_, flag in rule_changes(was, after))
        then = f"; now {after.pattern}: {summary(after)}" if weaker else ""
        return [Change(REMOVED, section, pattern, f" (was {summary(was)}{then})", weaker)]
    assert was is not None and now is not None
    out = []
    for aspect, a, b, weaker in rule_changes(was, now):
        flagged = weaker or (section == "default" and aspect == "level")
        out.append(
            Change(CHANGED, section, pattern, f": {aspect} {a} -> {b}", flagged, aspect, a, b)
        )
    return out


def _by_pattern(policy: Policy) -> dict[tuple[str, str], Rule]:
    return {(row.section, row.rule.pattern): row.rule for row in table.rows(policy)}


# --- token levels ------------------------------------------------------------------------


def token_aspects(spec: TokenSpec) -> dict[str, tuple[str, frozenset[str] | None]]:
    """name -> (shown value, the values accepted; None: any)."""
    return {
        "type": (spec.type, frozenset((spec.type,))),
        "type claim": (spec.type_claim, frozenset((spec.type_claim,))),
        "audience": (f"[{table.listed(spec.audiences)}]", spec.audiences),
        "issuer": _any(spec.issuers, "not checked"),
        "keys": _any(spec.key_ids, "any key"),
        # Which claims carry the identity: any change is flagged (it moves what is checked).
        "claims": (claims := _mapping(spec), frozenset((claims,))),
    }


def _mapping(spec: TokenSpec) -> str:
    mapped = spec.claims.mapped()
    return ", ".join(f"{k} from {v}" for k, v in mapped.items()) if mapped else "the usual names"


def _any(values: frozenset[str] | None, unset: str) -> tuple[str, frozenset[str] | None]:
    return (unset if values is None else f"[{table.listed(values)}]", values)


def _token_lines(level: str, old: TokenSpec | None, new: TokenSpec | None) -> list[Change]:
    subject = f"tokens.{level}"
    if old is None or new is None:
        spec = new or old
        assert spec is not None
        shown = ", ".join(f"{k} {v}" for k, (v, _) in token_aspects(spec).items())
        if old is None:
            return [Change(ADDED, "tokens", subject, f": {shown}", False)]
        return [Change(REMOVED, "tokens", subject, f" (was {shown})", False)]
    before, after = token_aspects(old), token_aspects(new)
    out = []
    for name, (was, accepted) in before.items():
        now, accepting = after[name]
        if was != now:
            weaker = accepting is None or (accepted is not None and not accepting <= accepted)
            out.append(
                Change(
                    CHANGED, "tokens", subject, f": {name} {was} -> {now}", weaker, name, was, now
                )
            )
    return out


# --- the whole diff ----------------------------------------------------------------------


def diff(old: Policy, new: Policy) -> list[Change]:
    """Every difference, rules in the table's order, then token levels in level order."""
    before, after = _by_pattern(old), _by_pattern(new)
    changes: list[Change] = []
    for key in sorted(before.keys() | after.keys(), key=lambda k: table.order_key(*k)):
        changes += _rule_lines(old, new, key, before.get(key), after.get(key))
    for level in LEVELS:
        if old.tokens.get(level) != new.tokens.get(level):
            changes += _token_lines(level, old.tokens.get(level), new.tokens.get(level))
    return changes


def summary_line(changes: list[Change]) -> str:
    counts = {kind: sum(c.kind == kind for c in changes) for kind in _SIGNS}
    flagged = sum(c.flagged for c in changes)
    total = f"{len(changes)} change" + ("" if len(changes) == 1 else "s")
    return (
        f"summary: {total} ({counts[ADDED]} added, {counts[REMOVED]} removed,"
        f" {counts[CHANGED]} changed); {flagged} flagged (!) for security review"
    )


def text_report(changes: list[Change]) -> str:
    """One line per change and the summary; nothing at all when there is no change."""
    if not changes:
        return ""
    return "\n".join([*(c.line for c in changes), summary_line(changes)])


def json_report(changes: list[Change]) -> dict[str, Any]:
    return {
        "changes": [
            {
                "change": c.kind,
                "section": c.section,
                "subject": c.subject,
                "aspect": c.aspect,
                "old": c.old,
                "new": c.new,
                "flagged": c.flagged,
                "line": c.line,
            }
            for c in changes
        ],
        "summary": {
            "changes": len(changes),
            **{kind: sum(c.kind == kind for c in changes) for kind in _SIGNS},
            "flagged": sum(c.flagged for c in changes),
        },
    }
