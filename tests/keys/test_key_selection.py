"""Tokens without `kid` are tried against a bounded number of keys.

A kid-less token could be checked against every configured key that accepts its
algorithm: N signature checks per bad token with a large key set. With 50 real ES256
keys the tests count the signature checks the verifier makes (a counting subclass around
the real check) and the answer it gives.
"""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from authproxy.decide.reasons import Denied, Reason
from authproxy.keys.keyset import KeySet, VerificationKey, key_from_jwk, public_jwk
from authproxy.keys.selection import MAX_KIDLESS_KEYS
from authproxy.keys.verify import TokenVerifier


class CountingVerifier(TokenVerifier):
    """The real verifier, counting the signature checks it makes."""

    checks = 0

    def _signature_ok(self, token: str, key: VerificationKey, alg: str) -> bool:  # type: ignore[override]
        self.checks += 1
        return TokenVerifier._signature_ok(token, key, alg)


@pytest.fixture(scope="module")
def private_keys() -> list[ec.EllipticCurvePrivateKey]:
    return [ec.generate_private_key(ec.SECP256R1()) for _ in range(50)]


def key_set(private_keys: list[Any], issuers: bool = False) -> KeySet:
    keys = []
    for i, private in enumerate(private_keys):
        jwk = {**public_jwk(private.public_key()), "kid": f"k{i}", "alg": "ES256"}
        key = key_from_jwk(jwk, f"test[{i}]", issuer=f"iss-{i}" if issuers else None)
        assert key is not None
        keys.append(key)
    return KeySet(keys)


def token(private: Any, iss: str = "iss-0", kid: str | None = None) -> str:
    claims = {"sub": "alice", "iss": iss, "exp": int(time.time()) + 300}
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims, private, algorithm="ES256", headers=headers)


def refused(verifier: TokenVerifier, raw: str) -> Denied:
    with pytest.raises(Denied) as denied:
        verifier.signature(raw)
    return denied.value


def test_a_kidless_token_is_refused_without_any_check_when_50_keys_could_verify_it(
    private_keys: list[Any],
):
    verifier = CountingVerifier(key_set(private_keys), cache_size=0)
    for signer in (private_keys[7], ec.generate_private_key(ec.SECP256R1())):
        denied = refused(verifier, token(signer))
        assert denied.reason == Reason.KEY_NOT_FOUND
        assert "no 'kid'" in denied.message and f"at most {MAX_KIDLESS_KEYS}" in denied.message
    assert verifier.checks == 0


def test_a_token_with_a_kid_is_checked_against_that_key_only(private_keys: list[Any]):
    verifier = CountingVerifier(key_set(private_keys), cache_size=0)
    assert verifier.signature(token(private_keys[7], kid="k7")).kid == "k7"
    assert refused(verifier, token(private_keys[8], kid="k7")).reason == Reason.BAD_SIGNATURE
    assert verifier.checks == 2


def test_issuer_bound_keys_narrow_a_kidless_token_to_its_issuers_keys(private_keys: list[Any]):
    verifier = CountingVerifier(key_set(private_keys, issuers=True), cache_size=0)
    assert verifier.signature(token(private_keys[37], iss="iss-37")).kid == "k37"
    assert verifier.checks == 1
    # Signed by another issuer's key while claiming iss-37: one check, then refused.
    assert refused(verifier, token(private_keys[12], iss="iss-37")).reason == Reason.BAD_SIGNATURE
    assert verifier.checks == 2
    # An issuer no key is bound to: nothing to try.
    denied = refused(verifier, token(private_keys[0], iss="someone-else"))
    assert denied.reason == Reason.KEY_NOT_FOUND
    assert verifier.checks == 2


def test_a_few_keys_still_verify_a_kidless_token(private_keys: list[Any]):
    few = private_keys[:MAX_KIDLESS_KEYS]
    verifier = CountingVerifier(key_set(few), cache_size=0)
    assert verifier.signature(token(few[-1])).kid == f"k{len(few) - 1}"
    assert verifier.checks <= MAX_KIDLESS_KEYS
    stranger = ec.generate_private_key(ec.SECP256R1())
    before = verifier.checks
    assert refused(verifier, token(stranger)).reason == Reason.BAD_SIGNATURE
    assert verifier.checks - before == MAX_KIDLESS_KEYS
