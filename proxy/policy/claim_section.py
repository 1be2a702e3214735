"""Checking `tokens.<level>.claims` (where a level's identity comes from) and a rule's
`when:` conditions (see `policy/claims.py` for their meaning)."""

from __future__ import annotations

import re
from typing import Any

from authproxy.policy.claims import (
    DEFAULT_CLAIMS,
    EQUALS,
    IN,
    OPERATORS,
    PRESENT,
    ClaimCondition,
    ClaimMap,
    ClaimPath,
    RequestOwnership,
)
from authproxy.policy.model import IDENTITY_HEADER_PREFIX, PUBLIC
from authproxy.policy.values import ValueChecks
from authproxy.policy.yaml_source import LineList, LineMap

CLAIM_MAP_KEYS = ("subject", "roles", "permissions", "scopes")
CONDITION_KEYS = ("claim", *OPERATORS)
REQUEST_KEYS = ("equal_claims", "allow_unset", "unless_roles")
#: A protobuf field name.
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_DEPTH = 8
MAX_NAME = 256
MAX_VALUES = 256
#: A header a condition may read: lowercase, as HTTP/2 and Envoy hand it over.
_HEADER = re.compile(r"[a-z0-9][a-z0-9_.-]*")
#: Headers no condition may read: the token itself, and what the proxy sets.
_NOT_BINDABLE = ("authorization", "cookie")


class ClaimChecks(ValueChecks):
    def claim_map(self, spec: LineMap, where: str) -> ClaimMap:
        """`claims: {subject: oid, roles: realm_access.roles, scopes: scp, ...}`."""
        if "claims" not in spec:
            return DEFAULT_CLAIMS
        section = spec["claims"]
        line = spec.line_of("claims")
        if not isinstance(section, LineMap) or not section:
            self.error(line, f"{where}.claims must map subject/roles/permissions/scopes to claims")
            return DEFAULT_CLAIMS
        self.unknown_keys(section, CLAIM_MAP_KEYS, f"key in {where}.claims")
        found: dict[str, Any] = {}
        for name in CLAIM_MAP_KEYS:
            if name in section:
                path = self.claim_path(
                    section[name], section.line_of(name), f"{where}.claims.{name}"
                )
                if path is not None:
                    found[name] = (path,) if name == "scopes" else path
        return ClaimMap(**{**_defaults(), **found})

    def claim_path(self, value: Any, line: int, where: str) -> ClaimPath | None:
        """A dotted name (`realm_access.roles`) or a list of names, one per level."""
        if isinstance(value, str):
            if "/" in value or (":" in value and "." in value):  # a URL or URN claim name
                self.error(
                    line,
                    f"{where}: {value!r} reads as nested claims split at each dot; a claim"
                    f" whose name holds dots is written as a list: [{value!r}]",
                )
                return None
            names: Any = value.split(".")
        elif isinstance(value, LineList):
            names = list(value)
        else:
            self.error(line, f"{where}: a claim is a name (a.b for nested) or a list of names")
            return None
        if not names or not all(isinstance(n, str) and 0 < len(n) <= MAX_NAME for n in names):
            self.error(line, f"{where}: {value!r} has an empty or over-long claim name")
            return None
        if len(names) > MAX_DEPTH:
            self.error(line, f"{where}: claims nest at most {MAX_DEPTH} levels deep")
            return None
        return ClaimPath(tuple(names))

    def conditions(self, spec: LineMap, where: str, level: str) -> tuple[ClaimCondition, ...]:
        """`when: [{claim: email_verified, equals: true}, {claim: tenant_id,
        equals_header: x-tenant-id}, ...]`: every entry must hold."""
        if "when" not in spec:
            return ()
        line = spec.line_of("when")
        entries = spec["when"]
        if level == PUBLIC or level == "deny":
            self.error(line, f"{where}: 'when' conditions need a token level, not {level!r}")
            return ()
        if not isinstance(entries, LineList) or not entries:
            self.error(line, f"{where}: 'when' must be a list like [{{claim: x, equals: y}}]")
            return ()
        out = []
        for index, entry in enumerate(entries):
            at = entries.line_of(index)
            if not isinstance(entry, LineMap):
                self.error(
                    at, f"{where}: each 'when' entry is a mapping {{claim: ..., equals: ...}}"
                )
                continue
            condition = self.condition(entry, at, where)
            if condition is not None:
                out.append(condition)
        return tuple(out)

    def condition(self, entry: LineMap, line: int, where: str) -> ClaimCondition | None:
        self.unknown_keys(entry, CONDITION_KEYS, f"key in a 'when' entry of {where}")
        operators = [op for op in OPERATORS if op in entry]
        if "claim" not in entry or len(operators) != 1:
            self.error(
                line,
                f"{where}: a 'when' entry names one 'claim' and exactly one of"
                f" {', '.join(OPERATORS)}",
            )
            return None
        path = self.claim_path(entry["claim"], entry.line_of("claim"), f"{where}: when")
        (operator,) = operators
        value, at = entry[operator], entry.line_of(operator)
        values: tuple[Any, ...] = ()
        header = None
        if operator == EQUALS:
            values = (value,) if self.scalar(value, at, where, EQUALS) else ()
        elif operator == IN:
            if isinstance(value, LineList) and 0 < len(value) <= MAX_VALUES:
                values = tuple(v for v in value if self.scalar(v, at, where, IN))
                if len(values) != len(value):
                    return None
            else:
                self.error(at, f"{where}: 'in' takes a list of 1 to {MAX_VALUES} values")
        elif operator == PRESENT:
            values = (value,) if isinstance(value, bool) else ()
            if not values:
                self.error(at, f"{where}: 'present' is true or false")
        else:
            header = self.bindable_header(value, at, where)
        if path is None or (not values and header is None):
            return None
        return ClaimCondition(path, operator, values, header, line)

    def scalar(self, value: Any, line: int, where: str, operator: str) -> bool:
        if isinstance(value, str | bool | int) and not isinstance(value, float):
            return True
        self.error(
            line,
            f"{where}: '{operator}' compares with strings, integers or booleans, not {value!r}",
        )
        return False

    def bindable_header(self, value: Any, line: int, where: str) -> str | None:
        if not isinstance(value, str) or not _HEADER.fullmatch(value):
            self.error(line, f"{where}: 'equals_header' names a lowercase header, not {value!r}")
            return None
        if value.startswith(IDENTITY_HEADER_PREFIX) or value in _NOT_BINDABLE:
            self.error(
                line,
                f"{where}: header {value!r} cannot be bound to a claim (the proxy removes"
                " x-auth-* headers, and the token's own headers prove nothing)",
            )
            return None
        return value


class RequestChecks(ClaimChecks):
    def request_ownership(self, spec: LineMap, where: str, level: str) -> RequestOwnership | None:
        """`request: {equal_claims: {user_id: sub, filter.owner_id: sub}, ...}`."""
        if "request" not in spec:
            return None
        block, line = spec["request"], spec.line_of("request")
        if level in (PUBLIC, "deny"):
            self.error(line, f"{where}: 'request' needs a token level, not {level!r}")
            return None
        if isinstance(block, LineMap):  # first: a misspelled key is renamed, then judged
            self.unknown_keys(block, REQUEST_KEYS, f"key in 'request' of {where}")
        if not isinstance(block, LineMap) or not isinstance(block.get("equal_claims"), LineMap):
            self.error(line, f"{where}: 'request' is {{equal_claims: {{FIELD: CLAIM, ...}}}}")
            return None
        pairs = []
        fields = block["equal_claims"]
        for field, claim in fields.items():
            at = fields.line_of(field)
            names = field.split(".") if isinstance(field, str) else []
            if not names or not all(_FIELD.fullmatch(n) for n in names) or len(names) > MAX_DEPTH:
                self.error(at, f"{where}: {field!r} is not a field path (name or a.b.c)")
                continue
            path = self.claim_path(claim, at, f"{where}: request field {field}")
            if path is not None:
                pairs.append((tuple(names), path))
        if not fields:
            self.error(line, f"{where}: 'equal_claims' names no field")
        unless = self.strings(block, "unless_roles") or frozenset()
        allow_unset = self.boolean(block, "allow_unset", default=False)
        if not pairs:
            return None
        return RequestOwnership(tuple(pairs), allow_unset, unless, line)


def _defaults() -> dict[str, Any]:
    return {name: getattr(DEFAULT_CLAIMS, name) for name in CLAIM_MAP_KEYS}
