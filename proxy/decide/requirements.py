"""A rule's requirements on the verified identity (roles: any of; permissions and scopes:
all of) and on the client certificate (`peers:`), each with the deny it gives."""

from __future__ import annotations

from authproxy.decide.identity import Identity
from authproxy.decide.reasons import Denied, Reason
from authproxy.policy.model import Rule


def check_requirements(rule: Rule, identity: Identity) -> None:
    """Roles: any of. Permissions: all of. Scopes: all of."""
    if rule.roles and rule.roles.isdisjoint(identity.roles):
        raise Denied(
            Reason.INSUFFICIENT_ROLE, f"this method needs one of the roles {_names(rule.roles)}"
        )
    if rule.permissions:
        missing = rule.permissions.difference(identity.permissions)
        if missing:
            raise Denied(Reason.INSUFFICIENT_PERMISSION, f"missing permissions {_names(missing)}")
    if rule.scopes:
        missing = rule.scopes.difference(identity.scopes)
        if missing:
            raise Denied(Reason.INSUFFICIENT_SCOPE, f"missing scopes {_names(missing)}")


def _names(values: frozenset[str]) -> str:
    return ", ".join(sorted(values))


def peer_message(rule: Rule, principal: str | None) -> str:
    accepted = ", ".join(rule.peers[:5]) + (", ..." if len(rule.peers) > 5 else "")
    if principal is None:
        return f"this method needs a client certificate of {accepted}; the connection has none"
    return (
        f"this method accepts the peers {accepted}; the client certificate is {principal[:128]!r}"
    )
