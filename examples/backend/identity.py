"""Who is calling: the identity headers the proxy set, read as they are.

The backend has no token code. It runs behind the proxy, which removes every incoming
`x-auth-*` header and sets these from a token it verified, so this module trusts them.
Never expose a backend like this one without the proxy in front of it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc

# The header names are the proxy's contract with backends; take them from the source.
from authproxy.decide.identity import (
    CLAIMS,
    ISSUER,
    JTI,
    PERMISSIONS,
    ROLES,
    SCOPES,
    SUBJECT,
    TOKEN_TYPE,
)
from authproxy.keys.keyset import b64url_decode

NO_IDENTITY = "no identity from the proxy"


@dataclass(frozen=True, slots=True)
class Caller:
    subject: str
    token_type: str = ""
    roles: frozenset[str] = frozenset()
    permissions: frozenset[str] = frozenset()
    scopes: frozenset[str] = frozenset()
    jti: str = ""
    issuer: str = ""
    #: The verified token payload (`x-auth-claims`); empty if the header is absent.
    claims: dict[str, Any] = field(default_factory=dict)

    def has_role(self, role: str) -> bool:
        return role in self.roles


def caller_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> Caller | None:
    """The caller the identity headers describe, or None when there is no subject."""
    headers: dict[str, str] = {}
    for key, value in metadata or ():
        if isinstance(value, str):
            headers[key.lower()] = value
    subject = headers.get(SUBJECT, "")
    if not subject:
        return None
    return Caller(
        subject=subject,
        token_type=headers.get(TOKEN_TYPE, ""),
        roles=_items(headers.get(ROLES)),
        permissions=_items(headers.get(PERMISSIONS)),
        scopes=_items(headers.get(SCOPES)),
        jti=headers.get(JTI, ""),
        issuer=headers.get(ISSUER, ""),
        claims=decode_claims(headers.get(CLAIMS)),
    )


def caller_of(context: grpc.aio.ServicerContext) -> Caller | None:
    return caller_from_metadata(context.invocation_metadata())


async def require_caller(context: grpc.aio.ServicerContext) -> Caller:
    """The caller; answers UNAUTHENTICATED when the proxy sent no identity."""
    caller = caller_of(context)
    if caller is None:
        await abort(context, grpc.StatusCode.UNAUTHENTICATED, NO_IDENTITY)
    return caller


def decode_claims(value: str | None) -> dict[str, Any]:
    """`x-auth-claims`: base64url (unpadded) JSON of the verified payload."""
    if not value:
        return {}
    try:
        claims = json.loads(b64url_decode(value))
    except ValueError:
        return {}
    return claims if isinstance(claims, dict) else {}


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the call with `code`; `context.abort` raises, this tells type checkers so."""
    await context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")


def _items(value: str | None) -> frozenset[str]:
    if not value:
        return frozenset()
    return frozenset(item.strip() for item in value.split(",") if item.strip())
