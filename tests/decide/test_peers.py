"""The `peers:` requirement (client-certificate identities) and `x-auth-peer`: the policy
syntax, the pipeline step, and Envoy ext_authz, where the identity is the
`source.principal` Envoy verified. The sidecar's mTLS path (the identity taken from the
TLS connection itself) is covered in test_tls.py."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from authproxy.decide.pipeline import Authorizer
from authproxy.decide.reasons import Reason
from authproxy.keys.issuer import TokenIssuer
from authproxy.keys.keyset import KeyLoadError, KeySet, hmac_key
from authproxy.policy.loader import PolicyError, parse_policy
from authproxy.runtime.serve import build_authorizer
from authproxy.state.store import MemoryState
from tests.support.ext_authz import (
    check,
    check_request,
    metadata,
    outcome,
    running_ext_authz,
    set_headers,
)
from tests.support.keys import Keys
from tests.support.policies import TEST_POLICY
from tests.support.running_proxy import config_for
from tests.support.tokens import bearer, minted

GOOD = "spiffe://cluster.local/ns/shop/sa/frontend"
OTHER = "spiffe://cluster.local/ns/shop/sa/batch"
PEERS_POLICY = (
    TEST_POLICY
    + f"""\
  /test.Peer/Exact: {{level: access, peers: ["{GOOD}"]}}
  /test.Peer/Prefix: {{level: access, peers: ["spiffe://cluster.local/ns/shop/*"]}}
  /test.Peer/Public: {{level: public, peers: ["{GOOD}", "CN=ops-client,O=Example"]}}
  /test.Peer/AnyCert: {{level: public, peers: ["*"]}}
"""
)


def authorizer(tmp_path: Path, keys: Keys, policy: str = PEERS_POLICY) -> Authorizer:
    """An authorizer as serve builds one (the test keys, in-memory state)."""
    return build_authorizer(config_for(tmp_path, keys, policy), MemoryState())


# --- policy syntax ---------------------------------------------------------------------


def test_peers_parse_sorted_into_the_rule():
    policy = parse_policy(PEERS_POLICY)
    assert policy.exact["/test.Peer/Exact"].peers == (GOOD,)
    assert policy.exact["/test.Peer/Public"].peers == ("CN=ops-client,O=Example", GOOD)


@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        ("{level: access, peers: []}", "'peers' must be a non-empty list"),
        ("{level: access, peers: spiffe://x}", "'peers' must be a non-empty list"),
        ("{level: access, peers: ['spiffe://*/sa/x']}", "'*' may only end a pattern"),
        ("{level: deny, peers: ['spiffe://a']}", "peers has no effect on a deny rule"),
        ("{level: access, peers: [1]}", "must contain only non-empty strings"),
    ],
)
def test_bad_peers_are_policy_errors_with_their_line(rule: str, problem: str):
    text = TEST_POLICY + f"  /test.Bad/Method: {rule}\n"
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "p.yaml")
    line = text.splitlines().index(f"  /test.Bad/Method: {rule}") + 1
    assert f"p.yaml:{line}:" in str(caught.value)
    assert problem in str(caught.value)


# --- the pipeline step -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "principal", "expected"),
    [
        ("/test.Peer/Exact", GOOD, None),
        ("/test.Peer/Exact", OTHER, Reason.PEER_NOT_ALLOWED),
        ("/test.Peer/Exact", None, Reason.PEER_NOT_ALLOWED),
        ("/test.Peer/Exact", GOOD + "x", Reason.PEER_NOT_ALLOWED),  # exact means exact
        ("/test.Peer/Prefix", OTHER, None),
        ("/test.Peer/Prefix", "spiffe://cluster.local/ns/shopping/sa/x", Reason.PEER_NOT_ALLOWED),
        ("/test.Peer/Public", "CN=ops-client,O=Example", None),
        ("/test.Peer/Public", "CN=ops-client,O=Other", Reason.PEER_NOT_ALLOWED),
        ("/test.Peer/AnyCert", "CN=anyone", None),
        ("/test.Peer/AnyCert", None, Reason.PEER_NOT_ALLOWED),
        ("/test.Access/Get", None, None),  # no peers: no certificate needed
    ],
)
async def test_peers_requirement(
    tmp_path: Path, keys: Keys, issuer: TokenIssuer, method, principal, expected
):
    decision = await authorizer(tmp_path, keys).decide(
        method, bearer(minted(issuer)), principal=principal
    )
    assert decision.reason == expected, decision.message
    assert decision.allowed is (expected is None)
    if expected is not None:
        assert decision.status.name == "PERMISSION_DENIED"


async def test_peer_message_names_what_is_accepted_and_what_came(
    tmp_path: Path, keys: Keys, issuer
):
    auth = authorizer(tmp_path, keys)
    denied = await auth.decide("/test.Peer/Exact", bearer(minted(issuer)), principal=OTHER)
    assert GOOD in denied.message and OTHER in denied.message
    missing = await auth.decide("/test.Peer/Exact", bearer(minted(issuer)))
    assert "needs a client certificate" in missing.message


async def test_token_problems_are_reported_before_the_peer(tmp_path: Path, keys: Keys):
    decision = await authorizer(tmp_path, keys).decide("/test.Peer/Exact", [], principal=OTHER)
    assert decision.reason is Reason.TOKEN_MISSING


async def test_principal_is_escaped_to_printable_ascii_for_its_header(tmp_path: Path, keys: Keys):
    principal = "CN=Jürgen\u2028,O=Example"
    decision = await authorizer(tmp_path, keys).decide("/test.Public/Get", [], principal=principal)
    assert decision.allowed
    assert decision.principal.isascii() and decision.principal.isprintable()
    assert decision.principal == "CN=J%C3%BCrgen%E2%80%A8,O=Example"
    literal = await authorizer(tmp_path, keys).decide("/test.Public/Get", [], principal="CN=%C3")
    assert literal.principal == "CN=%25C3"  # a literal "%" is escaped too: no ambiguity


async def test_recheck_keeps_judging_the_streams_certificate(tmp_path: Path, keys: Keys, issuer):
    auth = authorizer(tmp_path, keys)
    assert (await auth.recheck("/test.Peer/Exact", bearer(minted(issuer)), GOOD)).allowed
    assert not (await auth.recheck("/test.Peer/Exact", bearer(minted(issuer)), OTHER)).allowed


# --- Envoy ext_authz: source.principal ---------------------------------------------------


def with_principal(path: str, principal: str, **kwargs):
    request = check_request(path, **kwargs)
    request.attributes.source.principal = principal
    return request


async def test_ext_authz_uses_envoys_source_principal(tmp_path: Path, keys: Keys, issuer):
    token = issuer.mint("access", "alice", ttl=300).token
    async with running_ext_authz(tmp_path, keys, policy=PEERS_POLICY) as running:
        allowed = await check(running, with_principal("/test.Peer/Exact", GOOD, token=token))
        assert outcome(allowed) == "ALLOW"
        assert set_headers(allowed)["x-auth-peer"] == GOOD
        refused = await check(running, with_principal("/test.Peer/Exact", OTHER, token=token))
        assert outcome(refused) == Reason.PEER_NOT_ALLOWED
        assert refused.denied_response.status.code == 403
        none = await check(running, check_request("/test.Peer/Exact", token=token))
        assert outcome(none) == Reason.PEER_NOT_ALLOWED


async def test_ext_authz_never_lets_a_client_set_x_auth_peer(tmp_path: Path, keys: Keys, issuer):
    token = issuer.mint("access", "alice", ttl=300).token
    forged = [("x-auth-peer", GOOD)]
    async with running_ext_authz(tmp_path, keys, policy=PEERS_POLICY) as running:
        # no verified principal: the forged header is removed, and does not satisfy peers
        response = await check(
            running, check_request("/test.Access/Get", token=token, headers=forged)
        )
        assert "x-auth-peer" not in set_headers(response)
        assert "x-auth-peer" in response.ok_response.headers_to_remove
        refused = await check(
            running, check_request("/test.Peer/Exact", token=token, headers=forged)
        )
        assert outcome(refused) == Reason.PEER_NOT_ALLOWED
        # a verified principal overwrites the forged value (and is not also removed)
        mixed = with_principal(
            "/test.Peer/Exact", GOOD, token=token, headers=[("x-auth-peer", OTHER)]
        )
        answer = await check(running, mixed)
        assert set_headers(answer)["x-auth-peer"] == GOOD
        assert "x-auth-peer" not in answer.ok_response.headers_to_remove


async def test_ext_authz_allows_for_two_principals_are_not_shared(tmp_path: Path, keys, issuer):
    """Allows are cached per identity; the principal must be part of that key."""
    token = issuer.mint("access", "alice", ttl=300).token
    async with running_ext_authz(tmp_path, keys, policy=PEERS_POLICY) as running:
        first = await check(running, with_principal("/test.Peer/Prefix", GOOD, token=token))
        second = await check(running, with_principal("/test.Peer/Prefix", OTHER, token=token))
        assert set_headers(first)["x-auth-peer"] == GOOD
        assert set_headers(second)["x-auth-peer"] == OTHER
        assert metadata(second)["decision"] == "allow"


# --- key sets: one kid per issuer ------------------------------------------------------


def test_two_issuers_may_share_a_kid_but_one_issuer_may_not():
    a = hmac_key(b"a" * 32, "k1", "$A")
    b = hmac_key(b"b" * 32, "k1", "$B")
    with pytest.raises(KeyLoadError, match="already used"):
        KeySet([a, b])
    bound = [replace(a, issuer="https://one"), replace(b, issuer="https://two")]
    assert len(KeySet(bound).by_kid["k1"]) == 2
