"""The decision pipeline every front end calls.

    match the method's rule -> extract the token -> verify it for the rule's level
    -> check shared state -> check requirements -> Decision

`Authorizer.decide` never raises for a bad request: every problem becomes a deny
`Decision` with a `Reason`. The policy is read once per call, so swapping
`Authorizer.policy` (a reload) never affects a call already in progress.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from .bearer import extract_bearer
from .decision import Decision
from .identity import Identity, identity_of
from .policy import DENY, METHOD_PATH, PUBLIC, Policy, Rule
from .reasons import Denied, Reason
from .verify import TokenVerifier, VerifiedToken

#: A shared-state check (revocation, single use, rate limits): raise `Denied` to refuse.
StateCheck = Callable[[Rule, VerifiedToken], Awaitable[None]]

_MALFORMED_RULE = Rule("malformed", DENY)


class Authorizer:
    def __init__(
        self,
        policy: Policy,
        verifier: TokenVerifier,
        state_checks: Iterable[StateCheck] = (),
    ) -> None:
        self.policy = policy
        self.verifier = verifier
        self.state_checks = tuple(state_checks)

    async def decide(self, method: str, headers: Iterable[tuple[str, str | bytes]]) -> Decision:
        policy = self.policy
        rule = policy.exact.get(method)
        if rule is None:
            if METHOD_PATH.fullmatch(method) is None:
                return Decision(
                    False,
                    method,
                    _MALFORMED_RULE,
                    policy.version,
                    Reason.METHOD_MALFORMED,
                    "not a gRPC method path ('/package.Service/Method')",
                )
            rule = policy.match(method)
        if rule.level == PUBLIC:
            return Decision(True, method, rule, policy.version)
        if rule.level == DENY:
            return Decision(
                False, method, rule, policy.version, Reason.METHOD_DENIED, "this method is disabled"
            )
        try:
            spec = policy.tokens[rule.level]
            token = extract_bearer(headers, policy.max_token_bytes)
            verified = self.verifier.verify(token, spec, policy)
            identity = identity_of(verified, spec, policy)
            for check in self.state_checks:
                await check(rule, verified)
            check_requirements(rule, identity)
        except Denied as denied:
            return Decision(False, method, rule, policy.version, denied.reason, denied.message)
        return Decision(True, method, rule, policy.version, identity=identity)


def check_requirements(rule: Rule, identity: Identity) -> None:
    """Roles: any of. Permissions: all of. Scopes: all of."""
    if rule.roles and rule.roles.isdisjoint(identity.roles):
        raise Denied(
            Reason.INSUFFICIENT_ROLE, f"this method needs one of the roles {_names(rule.roles)}"
        )
    missing = rule.permissions.difference(identity.permissions)
    if missing:
        raise Denied(Reason.INSUFFICIENT_PERMISSION, f"missing permissions {_names(missing)}")
    missing = rule.scopes.difference(identity.scopes)
    if missing:
        raise Denied(Reason.INSUFFICIENT_SCOPE, f"missing scopes {_names(missing)}")


def _names(values: frozenset[str]) -> str:
    return ", ".join(sorted(values))
