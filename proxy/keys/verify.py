"""Token verification: is this JWT genuine, and is it the token a level asks for?

Two layers:

1. `signature` — size bound, strict compact-JWS structure, strict header (no duplicate
   keys, no `alg: none`, no `crit`/`b64`), key selection by `kid` from configuration only
   (`keys/selection.py`; bounded for tokens without `kid`), then PyJWT's JWS layer checks the signature with an algorithm bound to the key. The
   result (header, claims, which key) is cached until the token's `exp`, so a hot token
   costs a dictionary lookup instead of a signature check.
2. `check_claims` — runs on every request, cached or not: key allowed for the level,
   `type`, `aud`, `iss`, `exp`/`nbf`/`iat` with leeway, `sub`, and the shape of identity
   claims that become headers. Only the clock changes between two calls with the same
   token and level, so once a token has passed for a level (`TokenSpec`), later calls
   re-check `exp`/`nbf`/`iat` alone, with the same comparisons.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import jwt

from authproxy.decide.reasons import Denied, Reason, shown
from authproxy.keys.jsonstrict import loads_strict
from authproxy.keys.keyset import CurrentKeys, KeySet, VerificationKey, b64url_decode
from authproxy.keys.selection import UnknownKey, only_other_issuers
from authproxy.keys.selection import candidates as key_candidates
from authproxy.policy.claims import MISSING, ClaimPath
from authproxy.policy.model import ACCESS, REFRESH, TWO_FA, Policy, TokenSpec

log = logging.getLogger("authproxy.verify")

_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")
#: Header parameters we refuse outright: extensions we do not implement.
_REFUSED_HEADER_PARAMS = ("crit", "b64")
#: Printable ASCII: what a claim must be to travel in an identity header.
HEADER_SAFE = re.compile(r"[\x20-\x7e]*")
_LEVEL_NAMES = {TWO_FA: "a 2FA", REFRESH: "a refresh", ACCESS: "an access"}
_JWS = jwt.PyJWS(options={"enforce_minimum_key_length": True})


#: Asked for fresh keys when a token names an unknown `kid`: (kid, claimed iss) -> whether
#: the key set changed (`key_ring.KeyRing.refresh_for`). It raises `Denied` itself when the
#: keys cannot be had at all (KEYS_UNAVAILABLE).
Refresher = Callable[[str, str | None], Awaitable[bool]]


class VerifiedToken:
    """A token whose signature checked out: its header, claims and the key that verified it."""

    __slots__ = ("alg", "checked", "claims", "exp", "header", "kid", "token")

    def __init__(
        self,
        token: str,
        header: dict[str, Any],
        claims: dict[str, Any],
        key: VerificationKey,
        exp: float,
    ) -> None:
        self.token = token
        self.header = header
        self.claims = claims
        self.kid = key.kid
        self.alg = header["alg"]
        #: `exp` as validated by `_require_time` (a finite number).
        self.exp = exp
        #: (spec, nbf, iat) once every claim check but the clock's passed for that level's
        #: `TokenSpec` (held here, so `is` cannot match a new spec at a recycled address).
        self.checked: tuple[TokenSpec, float | None, float | None] | None = None


class TokenVerifier:
    def __init__(
        self,
        keys: KeySet | CurrentKeys,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.time,
        refresher: Refresher | None = None,
    ) -> None:
        """`keys`: a fixed `KeySet`, or what keeps one current (a `KeyRing`): its set is
        read before each verification, and a new set empties the cache. `refresher`:
        asked for fresh keys when a token names a kid no key has (remote key sets)."""
        self._source = None if isinstance(keys, KeySet) else keys
        #: The keys in use.
        self.keys = keys if isinstance(keys, KeySet) else keys.current
        self.refresher = refresher
        self.clock = clock
        self.cache_size = cache_size
        self._cache: OrderedDict[str, VerifiedToken] = OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0

    def verify(self, token: str, spec: TokenSpec, policy: Policy) -> VerifiedToken:
        """The verified token if it satisfies `spec`; raises `Denied` otherwise."""
        if len(token) > policy.max_token_bytes:
            raise Denied(
                Reason.TOKEN_TOO_LARGE,
                f"token is {len(token)} bytes; the limit is {policy.max_token_bytes}",
            )
        self._follow_keys()
        now = self.clock()
        verified = self._cached(token, now)
        if verified is None:
            verified = self.signature(token)
            self._remember(verified, now)
        check_claims(verified, spec, policy, now)
        return verified

    async def verify_refreshing(
        self, token: str, spec: TokenSpec, policy: Policy, unknown: UnknownKey
    ) -> VerifiedToken:
        """After `verify` raised `UnknownKey`: ask for fresh keys, then verify once more."""
        if self.refresher is None or not await self.refresher(
            unknown.kid, unknown.claimed_issuer()
        ):
            raise unknown
        return self.verify(token, spec, policy)

    def _follow_keys(self) -> None:
        source = self._source
        if source is not None and source.current is not self.keys:
            self.keys_changed(source.current)

    def keys_changed(self, keys: KeySet) -> None:
        """Use a new key set; tokens verified with the old one are checked again."""
        self.keys = keys
        self._cache.clear()

    # --- layer 1: the signature --------------------------------------------------------

    def signature(self, token: str) -> VerifiedToken:
        self._follow_keys()
        header_b64, payload_b64, signature_b64 = _segments(token)
        header = _json_segment(header_b64, "header")
        alg = header.get("alg")
        if not isinstance(alg, str) or not alg:
            raise Denied(Reason.TOKEN_MALFORMED, "token header has no 'alg'")
        if alg.lower() == "none":
            raise Denied(Reason.ALGORITHM_NOT_ALLOWED, "unsigned tokens (alg 'none') are refused")
        if not signature_b64:
            raise Denied(Reason.TOKEN_MALFORMED, "token has no signature")
        for param in _REFUSED_HEADER_PARAMS:
            if param in header:
                raise Denied(
                    Reason.TOKEN_MALFORMED, f"unsupported token header parameter {param!r}"
                )
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise Denied(Reason.TOKEN_MALFORMED, "token header 'kid' must be a string")
        foreign: VerificationKey | None = None
        candidates = key_candidates(self.keys, kid, alg, payload_b64)
        for key in candidates:
            if self._signature_ok(token, key, alg):
                claims = _json_segment(payload_b64, "payload")
                if key.issuer is not None and claims.get("iss") != key.issuer:
                    foreign = key  # a genuine signature, but by another issuer's key
                    continue
                exp = _require_time(claims, "exp", required=True)
                assert exp is not None  # required=True raises instead
                return VerifiedToken(token, header, claims, key, exp)
        if foreign is not None:
            raise Denied(
                Reason.WRONG_ISSUER,
                f"key {shown(foreign.kid)} verifies only tokens of issuer "
                f"{shown(foreign.issuer)}; this token claims another issuer",
            )
        if kid is not None and only_other_issuers(candidates, payload_b64):
            raise UnknownKey(kid, payload_b64)
        raise Denied(Reason.BAD_SIGNATURE, "token signature does not verify")

    @staticmethod
    def _signature_ok(token: str, key: VerificationKey, alg: str) -> bool:
        try:
            _JWS.decode_complete(token, key=key.algorithms[alg])
        except jwt.InvalidSignatureError:
            return False
        except jwt.InvalidTokenError as e:
            raise Denied(Reason.TOKEN_MALFORMED, f"token rejected: {e}") from None
        except Exception as e:  # a crypto backend must never turn a bad token into a crash
            log.debug("signature check raised %r", e)
            return False
        return True

    # --- the cache -------------------------------------------------------------------

    def _cached(self, token: str, now: float) -> VerifiedToken | None:
        verified = self._cache.get(token)
        if verified is None:
            self.cache_misses += 1
            return None
        if now >= verified.exp:
            del self._cache[token]
            self.cache_misses += 1
            return None
        self.cache_hits += 1
        self._cache.move_to_end(token)
        return verified

    def _remember(self, verified: VerifiedToken, now: float) -> None:
        if self.cache_size <= 0 or now >= verified.exp:
            return
        self._cache[verified.token] = verified
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)


# --- layer 2: the claims ----------------------------------------------------------------


def check_claims(v: VerifiedToken, spec: TokenSpec, policy: Policy, now: float) -> None:
    """Raise `Denied` unless the verified token is the kind of token `spec` asks for.

    The first pass for a level runs every check; it is remembered on the token, and later
    calls for the same level compare only the times (in the same order, with the same
    arithmetic), which are all that can change: the claims are the signed bytes, and the
    spec is immutable (a reloaded policy brings new spec objects, checked afresh).
    """
    leeway = policy.leeway
    checked = v.checked
    if checked is not None and checked[0] is spec:
        _check_times(v.exp, checked[1], checked[2], leeway, now)
        return
    claims = v.claims
    token_type = claims.get(spec.type_claim)
    if token_type is None:
        raise Denied(
            Reason.MISSING_CLAIM, f"{_needs(spec)}; the token has no '{spec.type_claim}' claim"
        )
    if token_type != spec.type:
        raise Denied(
            Reason.WRONG_TOKEN_TYPE, f"{_needs(spec)}; got {_describe_type(token_type, policy)}"
        )

    if spec.key_ids is not None and v.kid not in spec.key_ids:
        raise Denied(
            Reason.KEY_NOT_FOUND,
            f"{_needs(spec)}; key {v.kid!r} does not sign {spec.level} tokens",
        )

    aud = claims.get("aud")
    audiences = _string_set(aud, "aud")
    if aud is None:
        raise Denied(Reason.MISSING_CLAIM, f"{_needs(spec)}; the token has no 'aud' claim")
    if audiences.isdisjoint(spec.audiences):
        raise Denied(
            Reason.WRONG_AUDIENCE,
            f"{_needs(spec)} for audience {_quote(spec.audiences)};"
            f" the token is for {_quote(audiences)}",
        )

    if spec.issuers is not None:
        iss = claims.get("iss")
        if iss is None:
            raise Denied(Reason.MISSING_CLAIM, "the token has no 'iss' claim")
        if not isinstance(iss, str):
            raise Denied(Reason.INVALID_CLAIM, "claim 'iss' must be a string")
        if iss not in spec.issuers:
            raise Denied(
                Reason.WRONG_ISSUER,
                f"token issuer {shown(iss)} is not accepted (expected {_quote(spec.issuers)})",
            )

    # Each time claim is checked as soon as it is read: an expired token is TOKEN_EXPIRED
    # whatever its `nbf`/`iat` hold.
    _check_times(v.exp, None, None, leeway, now)
    nbf = _require_time(claims, "nbf")
    _check_times(None, nbf, None, leeway, now)
    iat = _require_time(claims, "iat")
    _check_times(None, None, iat, leeway, now)

    sub = claims.get("sub")
    if sub is None:
        raise Denied(Reason.MISSING_CLAIM, "the token has no 'sub' claim")
    _header_safe(sub, "sub")
    if "jti" in claims:
        _header_safe(claims["jti"], "jti")
    v.checked = (spec, nbf, iat)


def _check_times(
    exp: float | None, nbf: float | None, iat: float | None, leeway: float, now: float
) -> None:
    """`exp`, `nbf`, `iat` (each when given) against the clock with `leeway`: a token is
    refused from the first instant after `exp + leeway`."""
    if exp is not None and now > exp + leeway:
        raise Denied(Reason.TOKEN_EXPIRED, f"token expired {now - exp:.0f}s ago")
    if nbf is not None and now + leeway < nbf:
        raise Denied(Reason.TOKEN_NOT_YET_VALID, f"token is not valid for another {nbf - now:.0f}s")
    if iat is not None and now + leeway < iat:
        raise Denied(Reason.TOKEN_NOT_YET_VALID, f"token is issued {iat - now:.0f}s in the future")


def _needs(spec: TokenSpec) -> str:
    return f"this method needs {_LEVEL_NAMES[spec.level]} token"


def claim_list(claims: Mapping[str, Any], path: ClaimPath) -> tuple[str, ...]:
    """A list-of-strings claim (`roles`, `permissions`), validated for use in a header."""
    value = path.read(claims)
    name = str(path)
    if value is None or value is MISSING:
        return ()
    if not isinstance(value, list):
        raise Denied(Reason.INVALID_CLAIM, f"claim '{name}' must be a list of strings")
    for item in value:
        _header_safe(item, name, list_item=True)
    return tuple(value)


def scopes(claims: Mapping[str, Any], paths: tuple[ClaimPath, ...]) -> tuple[str, ...]:
    """Scopes from the first of `paths` the token has (by default `scope`, else `scp`): a
    space-separated string or a list."""
    for path in paths:
        value = path.read(claims)
        if isinstance(value, str):
            items = value.split()
            for item in items:
                _header_safe(item, str(path), list_item=True)
            return tuple(items)
        if value is not None and value is not MISSING:
            return claim_list(claims, path)
    return ()


def _header_safe(value: Any, name: str, list_item: bool = False) -> None:
    if not isinstance(value, str) or not value:
        raise Denied(Reason.INVALID_CLAIM, f"claim '{name}' must contain non-empty strings")
    if not HEADER_SAFE.fullmatch(value) or (list_item and "," in value):
        raise Denied(
            Reason.INVALID_CLAIM,
            f"claim '{name}' contains characters that cannot be forwarded in a header",
        )


def _require_time(claims: Mapping[str, Any], name: str, required: bool = False) -> float | None:
    value = claims.get(name)
    if value is None:
        if required:
            raise Denied(Reason.MISSING_CLAIM, f"the token has no '{name}' claim")
        return None
    if not isinstance(value, bool) and isinstance(value, int | float):
        try:
            number = float(value)  # OverflowError for integers beyond float range
        except OverflowError:
            number = math.inf
        if math.isfinite(number):
            return number
    raise Denied(Reason.INVALID_CLAIM, f"claim '{name}' must be a number (NumericDate)")


def _string_set(value: Any, name: str) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str):
        return frozenset((value,))
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return frozenset(value)
    raise Denied(Reason.INVALID_CLAIM, f"claim '{name}' must be a string or a list of strings")


def _describe_type(token_type: Any, policy: Policy) -> str:
    for spec in policy.tokens.values():
        if spec.type == token_type:
            return f"{_LEVEL_NAMES[spec.level]} token"
    return f"a token of type {shown(token_type)}"


def _quote(values: frozenset[str]) -> str:
    return ", ".join(shown(v) for v in sorted(values)[:5]) + (", ..." if len(values) > 5 else "")


def _segments(token: str) -> tuple[str, str, str]:
    parts = token.split(".")
    if len(parts) != 3:
        raise Denied(
            Reason.TOKEN_MALFORMED, f"a JWT has 3 dot-separated parts; this token has {len(parts)}"
        )
    for part, name in zip(parts, ("header", "payload", "signature"), strict=True):
        if name == "signature" and not part:
            continue  # checked once the header is known (an unsigned token gets its own reason)
        if not _SEGMENT.fullmatch(part) or len(part) % 4 == 1:
            raise Denied(Reason.TOKEN_MALFORMED, f"token {name} is empty or not base64url")
    return parts[0], parts[1], parts[2]


def _json_segment(segment: str, name: str) -> dict[str, Any]:
    try:
        value = loads_strict(b64url_decode(segment))
    except ValueError as e:
        raise Denied(Reason.TOKEN_MALFORMED, f"token {name} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise Denied(Reason.TOKEN_MALFORMED, f"token {name} must be a JSON object")
    return value
