"""Verified identity and the `x-auth-*` headers that carry it to the backend.

Backends trust these headers, so the proxy removes every incoming `x-auth-*` key (any
case, any number of copies) from every call and sets only values it verified itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from authproxy.decide.reasons import Denied, Reason
from authproxy.keys.verify import HEADER_SAFE, VerifiedToken, claim_list, scopes
from authproxy.policy.claims import DEFAULT_CLAIMS, MISSING, ClaimPath
from authproxy.policy.model import IDENTITY_HEADER_PREFIX, Policy, TokenSpec

SUBJECT = "x-auth-subject"
TOKEN_TYPE = "x-auth-token-type"
ROLES = "x-auth-roles"
PERMISSIONS = "x-auth-permissions"
SCOPES = "x-auth-scopes"
JTI = "x-auth-jti"
ISSUER = "x-auth-issuer"
CLAIMS = "x-auth-claims"
#: The verified client certificate's identity (mTLS): its SPIFFE id, else its subject.
PEER = "x-auth-peer"
#: Every identity header the proxy itself may set (policies add more via `claim_headers`).
BUILTIN_HEADERS = frozenset(
    (SUBJECT, TOKEN_TYPE, ROLES, PERMISSIONS, SCOPES, JTI, ISSUER, CLAIMS, PEER)
)


@dataclass(frozen=True, slots=True)
class Identity:
    subject: str
    token_type: str
    roles: tuple[str, ...]
    permissions: tuple[str, ...]
    scopes: tuple[str, ...]
    jti: str | None
    issuer: str | None
    claims: dict[str, Any]
    #: The identity headers for the backend, in a stable order.
    headers: tuple[tuple[str, str], ...]
    #: The claims the level maps instead of the usual names (`tokens.<level>.claims`):
    #: {"roles": "realm_access.roles", ...}; empty when it maps none.
    claims_from: Mapping[str, str] = field(default_factory=dict)


_PREFIX_LEN = len(IDENTITY_HEADER_PREFIX)


def is_identity_header(key: str) -> bool:
    """`x-auth-*` in any case, and underscore spellings (`x_auth_subject`) too: some
    backends fold underscores into dashes."""
    return key[:_PREFIX_LEN].lower().replace("_", "-") == IDENTITY_HEADER_PREFIX


class Identities:
    """The identity of each verified token, made once per token and level (the verifier
    hands out the same `VerifiedToken` while it caches it). Bounded: starts over when full."""

    LIMIT = 10_000

    def __init__(self) -> None:
        self._made: dict[int, tuple[VerifiedToken, Identity]] = {}

    def of(self, verified: VerifiedToken, spec: TokenSpec, policy: Policy) -> Identity:
        found = self._made.get(id(verified))
        if found is not None and found[0] is verified and found[1].token_type == spec.type:
            return _with_claim_headers(found[1], verified, policy)
        base = _build(verified, spec)
        if len(self._made) >= self.LIMIT:
            self._made.clear()
        self._made[id(verified)] = (verified, base)
        return _with_claim_headers(base, verified, policy)


def identity_of(verified: VerifiedToken, spec: TokenSpec, policy: Policy) -> Identity:
    """The identity a verified token carries (made anew; `Identities` remembers them)."""
    return _with_claim_headers(_build(verified, spec), verified, policy)


def _with_claim_headers(base: Identity, verified: VerifiedToken, policy: Policy) -> Identity:
    """`base` plus the policy's `claim_headers` the token's claims fill."""
    if not policy.claim_headers:
        return base
    extra = tuple(
        (header, text)
        for header, claim in policy.claim_headers
        if (text := _header_text(verified.claims.get(claim))) is not None
    )
    if not extra:
        return base
    return dataclasses.replace(base, headers=base.headers + extra)


def _build(verified: VerifiedToken, spec: TokenSpec) -> Identity:
    claims = verified.claims
    mapping = spec.claims
    subject = _subject(claims, mapping.subject)
    roles = claim_list(claims, mapping.roles)
    permissions = claim_list(claims, mapping.permissions)
    token_scopes = scopes(claims, mapping.scopes)
    jti = claims.get("jti")
    iss = claims.get("iss") if isinstance(claims.get("iss"), str) else None
    headers = [(SUBJECT, subject), (TOKEN_TYPE, spec.type)]
    if roles:
        headers.append((ROLES, ",".join(roles)))
    if permissions:
        headers.append((PERMISSIONS, ",".join(permissions)))
    if token_scopes:
        headers.append((SCOPES, ",".join(token_scopes)))
    if jti:
        headers.append((JTI, jti))
    if iss and HEADER_SAFE.fullmatch(iss):
        headers.append((ISSUER, iss))
    # The payload segment is base64url of exactly the JSON whose signature was verified, so
    # it is forwarded as is: no re-encoding, and never larger than the token.
    headers.append((CLAIMS, verified.token.split(".", 2)[1]))
    return Identity(
        subject=subject,
        token_type=spec.type,
        roles=roles,
        permissions=permissions,
        scopes=token_scopes,
        jti=jti,
        issuer=iss,
        claims=claims,
        headers=tuple(headers),
        claims_from=mapping.mapped(),
    )


def _subject(claims: dict[str, Any], path: ClaimPath) -> str:
    """The subject: `sub` (checked with the other claims), or the claim the level maps."""
    if path == DEFAULT_CLAIMS.subject:
        return claims["sub"]
    value = path.read(claims)
    if value is MISSING:
        raise Denied(Reason.MISSING_CLAIM, f"the token has no '{path}' claim (its subject)")
    if not isinstance(value, str) or not value or not HEADER_SAFE.fullmatch(value):
        raise Denied(Reason.INVALID_CLAIM, f"claim '{path}' (the subject) must be a plain string")
    return value


def _header_text(value: Any) -> str | None:
    """A claim value as header text: scalars as-is, lists comma-joined; None if unsafe."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str | int | float):
        text = str(value)
    elif isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        text = ",".join(str(v) for v in value)
    else:
        return None
    return text if text and HEADER_SAFE.fullmatch(text) else None
