"""Which configured keys may verify a token: chosen by its `kid` and `alg` (and, for a
token without `kid`, its claimed `iss`), from configuration only, never from the token.

A token with a `kid` is tried against the keys with that `kid` that accept its `alg`.
A token without one could be tried against every key, N signature checks per bad token:
that work is bounded. Keys bound to another issuer are skipped (they could only refuse
it), and when more than `MAX_KIDLESS_KEYS` keys remain the token is refused with
`KEY_NOT_FOUND` without trying any: an issuer with that many keys must name them.
"""

from __future__ import annotations

from collections.abc import Iterable

from authproxy.decide.reasons import Denied, Reason, shown
from authproxy.keys.jsonstrict import loads_strict
from authproxy.keys.keyset import KeySet, VerificationKey, b64url_decode

#: The most keys a token without `kid` is tried against (after the issuer filter).
MAX_KIDLESS_KEYS = 4


class UnknownKey(Denied):
    """No key has the token's `kid` (KEY_NOT_FOUND). Remote key sets may have rotated:
    `TokenVerifier.verify_refreshing` fetches them again (throttled) and retries once."""

    def __init__(self, kid: str, payload_b64: str) -> None:
        super().__init__(Reason.KEY_NOT_FOUND, f"no configured key has kid {shown(kid)}")
        self.kid = kid
        self.payload_b64 = payload_b64

    def claimed_issuer(self) -> str | None:
        """The `iss` the token claims (unverified: used only to pick which key set to
        fetch again, never to accept anything)."""
        return claimed_issuer(self.payload_b64)


def claimed_issuer(payload_b64: str) -> str | None:
    """The token's unverified `iss`, to narrow the keys tried (never to accept it)."""
    try:
        iss = loads_strict(b64url_decode(payload_b64)).get("iss")
    except (ValueError, AttributeError):
        return None
    return iss if isinstance(iss, str) else None


def only_other_issuers(keys: Iterable[VerificationKey], payload_b64: str) -> bool:
    """Every key is bound to an issuer other than the one the token claims: the kid is
    known, but not for this token's issuer (two issuers may use one kid), so the key the
    token names is unknown — its issuer may just have started using that kid."""
    claimed = claimed_issuer(payload_b64)
    return all(key.issuer is not None and key.issuer != claimed for key in keys)


def candidates(keys: KeySet, kid: str | None, alg: str, payload_b64: str) -> list[VerificationKey]:
    """The keys to try, in order; raises `Denied` (or `UnknownKey`) when none may."""
    if kid is None:
        return _kidless(keys, alg, payload_b64)
    named = keys.by_kid.get(kid)
    if named is None:
        raise UnknownKey(kid, payload_b64)
    accepting = [key for key in named if alg in key.algorithms]
    if not accepting and only_other_issuers(named, payload_b64):
        raise UnknownKey(kid, payload_b64)
    if not accepting:
        raise Denied(
            Reason.ALGORITHM_NOT_ALLOWED,
            f"key {shown(kid)} does not accept algorithm {shown(alg)} "
            f"(accepts {', '.join(named[0].algorithms)})",
        )
    return accepting


def _kidless(keys: KeySet, alg: str, payload_b64: str) -> list[VerificationKey]:
    accepting = keys.for_algorithm(alg)
    if not accepting:
        raise Denied(
            Reason.ALGORITHM_NOT_ALLOWED, f"no configured key accepts algorithm {shown(alg)}"
        )
    if any(key.issuer is not None for key in accepting):
        claimed = claimed_issuer(payload_b64)
        accepting = [key for key in accepting if key.issuer in (None, claimed)]
        if not accepting:
            raise Denied(
                Reason.KEY_NOT_FOUND,
                f"the token has no 'kid' and no key of its issuer {shown(claimed)} accepts"
                f" algorithm {shown(alg)}",
            )
    if len(accepting) > MAX_KIDLESS_KEYS:
        raise Denied(
            Reason.KEY_NOT_FOUND,
            f"the token has no 'kid' and {len(accepting)} keys accept algorithm {shown(alg)};"
            f" a token without 'kid' is tried against at most {MAX_KIDLESS_KEYS}",
        )
    return accepting
