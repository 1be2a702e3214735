"""A verified token's identity (`decide/identity.py`): made once per token and level by
the `Authorizer`'s own memo, never cached on another module's objects."""

from __future__ import annotations

from authproxy.decide.identity import Identities, identity_of
from authproxy.keys.verify import TokenVerifier
from tests.support.tokens import METHOD_FOR, Clock, authorizer, bearer, keyset, policy, token


def test_the_same_verified_token_gets_the_same_identity_object():
    p = policy()
    verifier = TokenVerifier(keyset(), clock=Clock())
    spec = p.tokens["access"]
    tok = token()
    verified = verifier.verify(tok, spec, p)
    identities = Identities()
    first = identities.of(verified, spec, p)
    assert identities.of(verifier.verify(tok, spec, p), spec, p) is first  # cache hit
    assert first == identity_of(verified, spec, p)  # what the memo keeps is the real thing


def test_another_token_or_level_gets_its_own_identity():
    p = policy()
    verifier = TokenVerifier(keyset(), clock=Clock())
    spec = p.tokens["access"]
    identities = Identities()
    alice = identities.of(verifier.verify(token(sub="alice"), spec, p), spec, p)
    bob = identities.of(verifier.verify(token(sub="bob"), spec, p), spec, p)
    assert (alice.subject, bob.subject) == ("alice", "bob")


def test_the_memo_is_bounded():
    p = policy()
    verifier = TokenVerifier(keyset(), clock=Clock())
    spec = p.tokens["access"]
    identities = Identities()
    identities.LIMIT = 3
    for i in range(10):
        identities.of(verifier.verify(token(sub=f"user{i}"), spec, p), spec, p)
    assert len(identities._made) <= 3


async def test_two_calls_with_one_token_carry_one_identity():
    auth = authorizer(Clock())
    headers = bearer(token())
    first = await auth.decide(METHOD_FOR["access"], headers)
    second = await auth.decide(METHOD_FOR["access"], headers)
    assert first.allowed and second.allowed
    assert first.identity is second.identity
