"""Which tokens the example issues, with the product's own `TokenIssuer`.

* 2FA token (after a password, when the account has 2FA): 10 minutes, scope
  `verify_2fa`, claim `2fa_method: totp`; signed with the private key.
* Access token: 1 hour by default, the user's roles and permissions, scopes
  `read write`; signed with the private key.
* Refresh token: 7 days, scope `refresh_token`; signed with the HMAC secret whose key id
  the policy reserves for refresh tokens (`refresh-hmac`), so no other key can mint one.

Access and refresh tokens carry `sid`, the login session they belong to; rotation keeps it.

How minting meets a revocation of every token of a subject at the proxy ("log out
everywhere", a password change) is `Tokens.revoking`'s business: see there.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from authproxy.keys.issuer import MintedToken, SigningKey, TokenIssuer
from authproxy.policy.model import ACCESS, REFRESH, TWO_FA, Policy

TWO_FA_TTL = 10 * 60
ACCESS_TTL = 60 * 60
REFRESH_TTL = 7 * 24 * 60 * 60

USER_PERMISSIONS = ("user:read", "user:write")
ADMIN_PERMISSIONS = ("admin:read",)
ACCESS_SCOPES = ("read", "write")

#: A settled revocation is remembered this long past its `before`: long enough for any
#: exchange the proxy let through just before the revocation reached it to finish.
FENCE_MEMORY = 300.0


class Revoked(Exception):
    """The token presented for this exchange was revoked while the exchange was under way."""


@dataclass(frozen=True, slots=True)
class TokenPair:
    access: MintedToken
    refresh: MintedToken


@dataclass(slots=True)
class _Fence:
    """A revocation of every token of a subject with `iat` < `before`."""

    before: int
    settled: asyncio.Event = field(default_factory=asyncio.Event)


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
        self._fences: dict[str, _Fence] = {}  # subject -> its latest revocation

    @asynccontextmanager
    async def revoking(self, subject: str) -> AsyncIterator[int]:
        """Revoke every token of `subject` minted so far: yields the `before` to revoke with.

        The proxy refuses a subject's tokens whose `iat` is before `before`, and `iat`
        counts whole seconds. With `before` = now, a token minted a moment later in the
        same second would carry `iat` = that second, below `before`, and be refused with
        the old ones: a login right after "log out everywhere" or a password change would
        be dead on arrival. So `before` is the *next* whole second — it covers every token
        minted up to now, whatever its fraction of a second — and this subject's tokens
        are minted no earlier than that second from now on, so their `iat` is never
        before `before`. Minting for the subject waits for that (at most a second, only
        for this subject); tokens keep their true `iat`, nothing is dated in the future.

        Inside the block the caller tells the proxy; leaving it normally means the
        revocation is in force. Until then, minting for the subject waits too, and
        afterwards an exchange of a token issued before `before` (a refresh or 2FA token
        the proxy let through just before it learnt of the revocation) raises `Revoked`
        instead of minting tokens that would outlive the revocation. If the block raises,
        the revocation did not happen and nothing is held back.
        """
        now = self.issuer.clock()
        self._fences = {
            s: f
            for s, f in self._fences.items()
            if not f.settled.is_set() or f.before + FENCE_MEMORY > now
        }
        previous = self._fences.get(subject)
        fence = _Fence(max(int(now) + 1, previous.before if previous else 0))
        self._fences[subject] = fence
        try:
            yield fence.before
        except BaseException:
            if self._fences.get(subject) is fence:
                if previous is None:
                    del self._fences[subject]
                else:
                    self._fences[subject] = previous
            raise
        finally:
            fence.settled.set()

    async def _ready(self, subject: str, exchanged_iat: float | None) -> None:
        """Wait until `subject` may be minted for; `exchanged_iat`: see `pair`."""
        while (fence := self._fences.get(subject)) is not None:
            await fence.settled.wait()
            while (now := self.issuer.clock()) < fence.before:
                await asyncio.sleep(fence.before - now)
            if self._fences.get(subject) is fence:  # else a newer one, or this one failed
                if exchanged_iat is not None and exchanged_iat < fence.before:
                    raise Revoked
                return

    async def two_factor(self, subject: str) -> MintedToken:
        await self._ready(subject, None)
        return self.issuer.mint(
            TWO_FA,
            subject,
            ttl=TWO_FA_TTL,
            scopes=["verify_2fa"],
            extra={"2fa_method": "totp"},
        )

    async def pair(
        self,
        subject: str,
        roles: tuple[str, ...],
        session_id: str,
        exchanged_iat: float | None = None,
    ) -> TokenPair:
        """A new access + refresh pair. `exchanged_iat`: the `iat` of the token given in
        exchange (refresh or 2FA token), None after a password; raises `Revoked` if a
        revocation of the subject covers it (see `revoking`)."""
        await self._ready(subject, exchanged_iat)
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
