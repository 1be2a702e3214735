"""Request-field ownership (`request:` rules) through Envoy ext_authz: the gRPC Check API
judges the gRPC messages Envoy packs into `attributes.request.http.raw_body`
(`with_request_body`, `pack_as_bytes: true`) as the sidecar does; without a body it cannot
judge (FIELDS_UNAVAILABLE), and the HTTP mode, which never gets a body, refuses such
rules the same way."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from authproxy.keys.issuer import TokenIssuer
from tests.support.ext_authz import (
    check,
    check_request,
    denied_headers,
    grpc_code,
    metadata,
    outcome,
    running_ext_authz,
)
from tests.support.ext_authz_http import get, raw_http
from tests.support.keys import Keys
from tests.support.owned_messages import deflated, frame, gzipped, owned, owned_protoset
from tests.support.policies import TEST_POLICY
from tests.support.running_proxy import RunningProxy

POLICY = TEST_POLICY + (
    "  /test.Owned/*:\n"
    "    level: access\n"
    "    request: {equal_claims: {user_id: sub, tenant: tenant_id}, unless_roles: [support]}\n"
    "  /test.Shadowed/*:\n"
    "    level: access\n"
    "    mode: shadow\n"
    "    request: {equal_claims: {user_id: sub}}\n"
    "  /test.Undescribed/Echo:\n"
    "    level: access\n"
    "    request: {equal_claims: {user_id: sub}}\n"
)
ECHO = "/test.Owned/Echo"
MISMATCH = "FIELD_MISMATCH"
UNAVAILABLE = "FIELDS_UNAVAILABLE"


@pytest.fixture
async def node(tmp_path: Path, keys: Keys) -> AsyncIterator[RunningProxy]:
    protoset = owned_protoset(tmp_path / "owned.protoset", ("Owned", "Shadowed"))
    async with running_ext_authz(
        tmp_path, keys, policy=POLICY, descriptor_sets=[str(protoset)]
    ) as running:
        yield running


def alice(issuer: TokenIssuer, **extra) -> str:
    roles = extra.pop("roles", None)
    claims = {"tenant_id": 7, **extra}
    return issuer.mint("access", "alice", ttl=300, roles=roles, extra=claims).token


async def judged(
    node: RunningProxy,
    body: bytes | None,
    token: str,
    path: str = ECHO,
    headers: tuple[tuple[str, str], ...] = (),
):
    request = check_request(path, token=token, headers=headers)
    if body is not None:
        request.attributes.request.http.raw_body = body
    return await check(node, request)


async def test_own_fields_are_allowed_and_others_refused_with_403(
    node: RunningProxy, issuer: TokenIssuer
):
    token = alice(issuer)
    allowed = await judged(node, frame(owned("alice", tenant=7)), token)
    assert outcome(allowed) == "ALLOW"

    for message in (owned("bob", tenant=7), owned("alice", tenant=8), owned("", tenant=7)):
        response = await judged(node, frame(message), token)
        assert outcome(response) == MISMATCH
        assert response.status.code == grpc_code(MISMATCH) == 7
        assert response.denied_response.status.code == 403
        assert metadata(response)["decision"] == "deny"
        assert "bob" not in response.status.message
        assert denied_headers(response)["grpc-status"] == "7"


async def test_every_message_of_the_body_must_hold(node: RunningProxy, issuer: TokenIssuer):
    token = alice(issuer)
    mine = frame(owned("alice", tenant=7))
    assert outcome(await judged(node, mine * 3, token)) == "ALLOW"
    other = frame(owned("bob", tenant=7))
    assert outcome(await judged(node, mine + other + mine, token)) == MISMATCH


async def test_a_body_that_cannot_be_read_is_refused(node: RunningProxy, issuer: TokenIssuer):
    token = alice(issuer)
    whole = frame(owned("alice", tenant=7, blob=b"x" * 64))
    for body in (
        whole[:-1],  # cut inside the message (max_request_bytes reached)
        whole[:3],  # cut inside the prefix
        whole + whole[:10],  # a second message cut short
        frame(b"\xff\xff\xff"),  # not a valid message
        frame(gzipped(owned("alice", tenant=7)), compressed=True),  # no grpc-encoding
    ):
        response = await judged(node, body, token)
        assert outcome(response) == MISMATCH, body[:12]
        assert response.denied_response.status.code == 403


async def test_compressed_messages_are_read_as_the_encoding_header_says(
    node: RunningProxy, issuer: TokenIssuer
):
    token = alice(issuer)
    for encoding, pack in (("gzip", gzipped), ("deflate", deflated)):
        headers = (("grpc-encoding", encoding),)
        mine = frame(pack(owned("alice", tenant=7)), compressed=True)
        other = frame(pack(owned("bob", tenant=7)), compressed=True)
        assert outcome(await judged(node, mine, token, headers=headers)) == "ALLOW"
        assert outcome(await judged(node, other, token, headers=headers)) == MISMATCH
    snappy = (("grpc-encoding", "snappy"),)
    packed = frame(gzipped(owned("alice", tenant=7)), compressed=True)
    assert outcome(await judged(node, packed, token, headers=snappy)) == MISMATCH


async def test_without_a_body_the_fields_are_unavailable(node: RunningProxy, issuer: TokenIssuer):
    token = alice(issuer)
    response = await judged(node, None, token)
    assert outcome(response) == UNAVAILABLE
    assert response.status.code == grpc_code(UNAVAILABLE) == 14
    assert response.denied_response.status.code == 503
    assert "with_request_body" in response.status.message
    # Envoy without pack_as_bytes puts the body in the `body` string: not read as frames.
    request = check_request(ECHO, token=token)
    request.attributes.request.http.body = "\x00\x00\x00\x00\x07\n\x05alice"
    assert outcome(await check(node, request)) == UNAVAILABLE


async def test_a_method_without_a_descriptor_is_unavailable(
    node: RunningProxy, issuer: TokenIssuer
):
    response = await judged(
        node, frame(owned("alice", tenant=7)), alice(issuer), path="/test.Undescribed/Echo"
    )
    assert outcome(response) == UNAVAILABLE
    assert response.denied_response.status.code == 503


async def test_an_exempt_caller_needs_no_body_and_may_name_anyone(
    node: RunningProxy, issuer: TokenIssuer
):
    support = alice(issuer, roles=["support"])
    assert outcome(await judged(node, frame(owned("bob", tenant=9)), support)) == "ALLOW"
    assert outcome(await judged(node, None, support)) == "ALLOW"
    user = alice(issuer, roles=["user"])
    assert outcome(await judged(node, frame(owned("bob", tenant=9)), user)) == MISMATCH


async def test_a_claim_the_token_lacks_refuses(node: RunningProxy, issuer: TokenIssuer):
    token = issuer.mint("access", "alice", ttl=300).token  # no tenant_id
    response = await judged(node, frame(owned("alice", tenant=7)), token)
    assert outcome(response) == MISMATCH
    assert "tenant_id" in response.status.message


async def test_a_shadow_rule_allows_and_reports_the_would_be_deny(
    node: RunningProxy, issuer: TokenIssuer
):
    response = await judged(node, frame(owned("bob")), alice(issuer), path="/test.Shadowed/Echo")
    assert outcome(response) == "ALLOW"


async def test_the_http_mode_refuses_a_rule_on_request_fields(
    node: RunningProxy, issuer: TokenIssuer
):
    front = node.proxy.check_http
    assert front is not None
    auth = ("authorization", f"Bearer {alice(issuer)}")
    grpc_type = ("content-type", "application/grpc")
    status, head, body = await raw_http(front.port, get(ECHO, auth, grpc_type, method="POST"))
    assert status == 503, (head, body)
    assert b"FIELDS_UNAVAILABLE" in head + body
    # A rule without `request:` is answered as usual by the same front end.
    status, _, _ = await raw_http(front.port, get("/test.Access/Echo", auth, grpc_type))
    assert status == 200
