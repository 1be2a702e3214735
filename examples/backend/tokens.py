"""Which tokens the example issues, with the product's own `TokenIssuer`.

* 2FA token (after a password, when the account has 2FA): 10 minutes, scope
  `verify_2fa`, claim `2fa_method: totp`; signed with the private key.
* Access token: 1 hour by default, the user's roles and permissions, scopes
  `read write`; signed with the private key.
* Refresh token: 7 days, scope `refresh_token`; signed with the HMAC secret whose key id
  the policy reserves for refresh tokens (`refresh-hmac`), so no other key can mint one.

Access and refresh tokens carry `sid`, the login session they belong to; rotation keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.issuer import MintedToken, SigningKey, TokenIssuer
from proxy.policy import ACCESS, REFRESH, TWO_FA, Policy

TWO_FA_TTL = 10 * 60
ACCESS_TTL = 60 * 60
REFRESH_TTL = 7 * 24 * 60 * 60

USER_PERMISSIONS = ("user:read", "user:write")
ADMIN_PERMISSIONS = ("admin:read",)
ACCESS_SCOPES = ("read", "write")


@dataclass(frozen=True, slots=True)
class TokenPair:
    access: MintedToken
    refresh: MintedToken


def build_issuer(policy: Policy, signing_key: SigningKey, refresh_key: SigningKey) -> TokenIssuer:
    """An issuer for the policy's three token levels."""
    return TokenIssuer(policy, {ACCESS: signing_key, TWO_FA: signing_key, REFRESH: refresh_key})


def permissions_for(roles: tuple[str, ...]) -> list[str]:
    permissions = list(USER_PERMISSIONS)
    if "admin" in roles:
        permissions += ADMIN_PERMISSIONS
    return permissions


class Tokens:
    def __init__(self, issuer: TokenIssuer, access_ttl: float = ACCESS_TTL) -> None:
        if access_ttl <= 0:
            raise ValueError("the access token lifetime must be positive")
        self.issuer = issuer
        self.access_ttl = access_ttl

    def two_factor(self, subject: str) -> MintedToken:
        return self.issuer.mint(
            TWO_FA,
            subject,
            ttl=TWO_FA_TTL,
            scopes=["verify_2fa"],
            extra={"2fa_method": "totp"},
        )

    def pair(self, subject: str, roles: tuple[str, ...], session_id: str) -> TokenPair:
        access = self.issuer.mint(
            ACCESS,
            subject,
            ttl=self.access_ttl,
            roles=roles,
            permissions=permissions_for(roles),
            scopes=ACCESS_SCOPES,
            extra={"sid": session_id},
        )
        refresh = self.issuer.mint(
            REFRESH,
            subject,
            ttl=REFRESH_TTL,
            scopes=["refresh_token"],
            extra={"sid": session_id},
        )
        return TokenPair(access, refresh)
