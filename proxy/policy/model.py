"""The policy model: which security level and requirements each gRPC method has.

A `Policy` is immutable once built (see `policy_file.load_policy`), so a running proxy can
swap the whole object atomically and a request keeps the version it started with.
Matching is two dictionary lookups — exact method, then `/pkg.Service/*` — then the
default, so its cost does not grow with the number of rules.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from limits import RateLimitItem

from authproxy.policy.claims import DEFAULT_CLAIMS, ClaimCondition, ClaimMap, RequestOwnership
from authproxy.policy.http_routes import HttpRoutes
from authproxy.policy.strip_headers import DEFAULT_STRIP, StripHeaders

PUBLIC = "public"
TWO_FA = "2fa"
REFRESH = "refresh"
ACCESS = "access"
DENY = "deny"

#: Every level, in the order the docs list them.
LEVELS = (PUBLIC, TWO_FA, REFRESH, ACCESS, DENY)
#: Levels that need a verified token (and so a `tokens:` entry).
TOKEN_LEVELS = (TWO_FA, REFRESH, ACCESS)

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
SERVICE_NAME = re.compile(rf"{_IDENT}(?:\.{_IDENT})*")
#: A gRPC method path as it appears on the wire: `/package.Service/Method`.
METHOD_PATH = re.compile(rf"/({SERVICE_NAME.pattern})/({_IDENT})")
#: What a `methods:` key may be: a method path or a service wildcard `/package.Service/*`.
METHOD_PATTERN = re.compile(rf"/({SERVICE_NAME.pattern})/({_IDENT}|\*)")

#: Names of the identity headers the proxy sets; clients can never set them.
IDENTITY_HEADER_PREFIX = "x-auth-"


@dataclass(frozen=True, slots=True)
class TokenSpec:
    """What a token must look like to satisfy one level."""

    level: str
    type: str
    audiences: frozenset[str]
    #: Accepted `iss` values; None means the issuer is not checked.
    issuers: frozenset[str] | None = None
    #: Key ids allowed to sign tokens of this level; None means any configured key.
    key_ids: frozenset[str] | None = None
    #: The claim that carries the token type.
    type_claim: str = "type"
    #: Which claims carry the subject, roles, permissions and scopes (`claims:`).
    claims: ClaimMap = DEFAULT_CLAIMS
    #: Where in the policy file this level's `keys` (or the level) is, for messages.
    line: int | None = None


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most `item` calls (a `limits` rate, e.g. 5 per minute, moving window) per key."""

    item: RateLimitItem
    #: `peer` (the client address), `subject` (the token's `sub`), or a claim name.
    key: str
    #: When the state backend cannot be reached: allow (True) or refuse (False, default).
    fail_open: bool = False


@dataclass(frozen=True, slots=True)
class Rule:
    """The level and requirements of a method (or of a service wildcard, or the default)."""

    pattern: str
    level: str
    roles: frozenset[str] = frozenset()  # any of
    permissions: frozenset[str] = frozenset()  # all of
    scopes: frozenset[str] = frozenset()  # all of
    forward_token: bool = False
    #: Each token (jti) is accepted once; a second presentation is refused (REFRESH_REUSED).
    single_use: bool = False
    #: On reuse of a single-use token, revoke every token of its subject (reuse detection).
    revoke_on_reuse: bool = True
    #: Checked in order after every other step; each counts only calls that reach it.
    rate_limits: tuple[RateLimit, ...] = ()
    #: End an open stream (UNAUTHENTICATED) once its token expires or is revoked.
    end_streams: bool = True
    #: Shadow mode: a deny is computed, logged and counted, but the call is allowed.
    shadow: bool = False
    #: Client-certificate identities (mTLS) accepted, any of: exact, or a prefix ending
    #: in `*`. Empty: any peer (no certificate needed).
    peers: tuple[str, ...] = ()
    #: Conditions on the token's claims and the request's headers, all must hold (`when:`).
    when: tuple[ClaimCondition, ...] = ()
    #: Fields of the request message that must equal claims (`request:`).
    request: RequestOwnership | None = None
    line: int | None = None

    def peer_allowed(self, principal: str | None) -> bool:
        if not self.peers:
            return True
        if principal is None:
            return False
        for pattern in self.peers:
            if pattern[-1:] == "*":
                if principal.startswith(pattern[:-1]):
                    return True
            elif principal == pattern:
                return True
        return False

    @property
    def needs_token(self) -> bool:
        return self.level in TOKEN_LEVELS


@dataclass(frozen=True, slots=True)
class Policy:
    source: str
    version: str  # content hash prefix, for logs and metrics
    default: Rule
    exact: Mapping[str, Rule]
    services: Mapping[str, Rule]  # "pkg.Service" -> rule for "/pkg.Service/*"
    tokens: Mapping[str, TokenSpec]
    leeway: float = 30.0
    max_token_bytes: int = 8192
    #: Extra identity headers: (header name, claim name).
    claim_headers: tuple[tuple[str, str], ...] = ()
    #: Route rules for plain HTTP requests seen through Envoy ext_authz.
    http: HttpRoutes = field(default_factory=HttpRoutes)
    rule_count: int = field(default=0)
    #: Headers removed on every call besides `x-auth-*` (`strip_headers:`, `policy/strip_headers.py`).
    strip_headers: StripHeaders = DEFAULT_STRIP
    #: Test files `tests:` names, relative to the policy file; None: no `tests:` key.
    tests: tuple[str, ...] | None = None

    def match(self, method: str) -> Rule:
        """The rule for a method path: exact, then `/pkg.Service/*`, then the default."""
        return self.listed(method) or self.default

    def listed(self, method: str) -> Rule | None:
        """The exact or `/pkg.Service/*` rule for a method path; None if neither lists it."""
        rule = self.exact.get(method)
        if rule is not None:
            return rule
        slash = method.rfind("/")
        return self.services.get(method[1:slash]) if slash > 0 else None
