"""Where a token's claims are read from, and the conditions a rule puts on them.

A `ClaimPath` names a claim, possibly nested: `realm_access.roles` reads
`claims["realm_access"]["roles"]`. A claim whose own name holds dots (Auth0's namespaced
`https://example.com/roles`) is written as a list of names, one per level:
`["https://example.com/roles"]`, `[resource_access, my-client, roles]`.

`ClaimMap` is where one token level finds the subject, roles, permissions and scopes
(`tokens.<level>.claims`); `ClaimCondition` is one entry of a rule's `when:` list;
`RequestOwnership` is a rule's `request:` block (fields of the request message that
must equal claims).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: What `ClaimPath.read` returns for a claim the token does not have.
MISSING: Any = object()


@dataclass(frozen=True, slots=True)
class ClaimPath:
    names: tuple[str, ...]

    def read(self, claims: Mapping[str, Any]) -> Any:
        """The claim's value, or `MISSING` (a name absent, or a level that is no object)."""
        value: Any = claims
        for name in self.names:
            if not isinstance(value, dict):
                return MISSING
            value = value.get(name, MISSING)
            if value is MISSING:
                return MISSING
        return value

    def __str__(self) -> str:
        """As the policy writes it: dotted, or a list when a name holds a dot."""
        if any("." in name for name in self.names):
            return "[" + ", ".join(self.names) + "]"
        return ".".join(self.names)


_SUB = ClaimPath(("sub",))
_ROLES = ClaimPath(("roles",))
_PERMISSIONS = ClaimPath(("permissions",))
_SCOPES = (ClaimPath(("scope",)), ClaimPath(("scp",)))


@dataclass(frozen=True, slots=True)
class ClaimMap:
    """Which claims of a token level carry the identity (defaults: the common names)."""

    subject: ClaimPath = _SUB
    roles: ClaimPath = _ROLES
    permissions: ClaimPath = _PERMISSIONS
    #: Tried in order; the first the token has is used (`scope`, else `scp`).
    scopes: tuple[ClaimPath, ...] = _SCOPES

    def mapped(self) -> dict[str, str]:
        """What differs from the defaults, as written (explain, the decision log)."""
        out = {}
        for name in ("subject", "roles", "permissions"):
            path = getattr(self, name)
            if path != getattr(DEFAULT_CLAIMS, name):
                out[name] = str(path)
        if self.scopes != DEFAULT_CLAIMS.scopes:
            out["scopes"] = ", ".join(str(p) for p in self.scopes)
        return out


DEFAULT_CLAIMS = ClaimMap()

#: `ClaimCondition.operator` values.
EQUALS = "equals"
IN = "in"
PRESENT = "present"
EQUALS_HEADER = "equals_header"
OPERATORS = (EQUALS, IN, PRESENT, EQUALS_HEADER)

#: A claim value a condition compares with: string, integer, or boolean (JSON types).
Scalar = str | int | bool


@dataclass(frozen=True, slots=True)
class ClaimCondition:
    """One `when:` entry. `equals`/`in`: the claim (or, for a list claim, one of its items)
    is one of `values`, same JSON type. `present`: the claim exists (`values` is
    `(True,)`) or does not (`(False,)`). `equals_header`: the request carries `header`
    exactly once and its value is the claim's (a string or integer claim)."""

    claim: ClaimPath
    operator: str
    values: tuple[Scalar, ...] = ()
    header: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        if self.operator == EQUALS_HEADER:
            return f"{self.claim} equals header {self.header}"
        if self.operator == PRESENT:
            return f"{self.claim} {'present' if self.values[0] else 'absent'}"
        if self.operator == EQUALS:
            return f"{self.claim} = {_json(self.values[0])}"
        return f"{self.claim} in [{', '.join(_json(v) for v in self.values)}]"


def _json(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True, slots=True)
class RequestOwnership:
    """`request: {equal_claims: {user_id: sub}, allow_unset: false, unless_roles: [admin]}`:
    each named field of every request message must equal its claim (a string field the
    claim's text, an integer field the integer), unless the caller has one of
    `unless_roles`. `allow_unset`: a field left at its default ("" or 0) passes (an API
    that reads it as "the caller's own")."""

    #: (field path, claim) pairs; a field path is field names, one per nested message.
    equal_claims: tuple[tuple[tuple[str, ...], ClaimPath], ...]
    allow_unset: bool = False
    unless_roles: frozenset[str] = frozenset()
    line: int | None = None

    def __str__(self) -> str:
        pairs = ", ".join(f"{'.'.join(f)} = claim {c}" for f, c in self.equal_claims)
        unless = (
            f" unless roles {', '.join(sorted(self.unless_roles))}" if self.unless_roles else ""
        )
        unset = " (unset allowed)" if self.allow_unset else ""
        return f"request {pairs}{unset}{unless}"
