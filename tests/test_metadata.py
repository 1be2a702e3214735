"""What the backend receives: client metadata minus forged identity, hop-by-hop and the token."""

from __future__ import annotations

import pytest

from proxy.decision import Decision
from proxy.metadata import InvalidMetadata, upstream_metadata
from proxy.pipeline import Authorizer
from proxy.verify import TokenVerifier
from tests.helpers_tokens import (
    METHOD_FOR,
    POLICY_YAML,
    Clock,
    authorizer,
    bearer,
    keyset,
    policy,
    token,
)

FORGED = [
    ("x-auth-subject", "root"),
    ("X-Auth-Subject", "root"),
    ("X-AUTH-ROLES", "admin"),
    ("x-auth-roles", "admin,superuser"),
    ("x-Auth-Token-Type", "access"),
    ("x-auth-claims", "eyJzdWIiOiJyb290In0"),
    ("x-auth-issuer", "auth-service"),
    ("x-auth-tenant", "other"),
    ("x-auth-claims-bin", b"\x00\x01"),
    ("x-auth-", "empty-suffix"),
    ("x-auth-subject", "root-again"),
    # Backends that fold underscores into dashes would read these as x-auth-*.
    ("x_auth_subject", "root"),
    ("x-auth_roles", "admin"),
    ("X_AUTH_CLAIMS", "eyJzdWIiOiJyb290In0"),
]
HOP_BY_HOP = [
    ("connection", "keep-alive"),
    ("keep-alive", "timeout=5"),
    ("proxy-connection", "close"),
    ("proxy-authorization", "Basic Zm9vOmJhcg"),
    ("transfer-encoding", "chunked"),
    ("upgrade", "h2c"),
    ("te", "trailers"),
    ("host", "backend:50051"),
    ("content-length", "10"),
    ("content-type", "application/grpc"),
    ("user-agent", "grpc-python/1.0"),
    ("grpc-timeout", "5S"),
    ("grpc-encoding", "gzip"),
    ("grpc-accept-encoding", "gzip"),
    ("Connection", "close"),
    (":authority", "backend"),
    (":path", "/api.v1.User/Get"),
]
BINARY = bytes(range(256))
KEPT = [
    ("x-request-id", "req-1"),
    ("trace-bin", BINARY),
    ("x-authorization-hint", "not an identity header"),
    ("xauth-subject", "not an identity header either"),
    ("x-request-id", "req-2"),
]


async def decide(method: str, headers: list[tuple[str, str | bytes]]) -> Decision:
    decision = await authorizer().decide(method, headers)
    assert decision.allowed, decision.message
    return decision


def keys_of(metadata: tuple[tuple[str, str | bytes], ...]) -> list[str]:
    return [k for k, _ in metadata]


async def test_strips_every_identity_header_in_any_case() -> None:
    decision = await decide(METHOD_FOR["public"], FORGED + KEPT)
    out = upstream_metadata(FORGED + KEPT, decision)
    assert not [k for k in keys_of(out) if k.lower().startswith("x-auth-")]
    assert list(out) == KEPT


async def test_strips_hop_by_hop_and_pseudo_headers() -> None:
    decision = await decide(METHOD_FOR["public"], HOP_BY_HOP)
    out = upstream_metadata(HOP_BY_HOP + KEPT, decision)
    assert list(out) == KEPT


async def test_keeps_binary_metadata_byte_for_byte() -> None:
    decision = await decide(METHOD_FOR["public"], [])
    out = dict(upstream_metadata([("trace-bin", BINARY), ("blob-bin", b"")], decision))
    assert out["trace-bin"] == BINARY
    assert type(out["trace-bin"]) is bytes
    assert out["blob-bin"] == b""


async def test_authorization_is_removed_by_default() -> None:
    headers = [*bearer(token()), *KEPT]
    decision = await decide(METHOD_FOR["access"], headers)
    assert not decision.forward_token
    out = upstream_metadata(headers, decision)
    assert "authorization" not in keys_of(out)
    assert list(out[: len(KEPT)]) == KEPT


async def test_authorization_is_forwarded_when_the_rule_says_so() -> None:
    tok = token()
    headers = [("Authorization", f"Bearer {tok}"), *KEPT]
    decision = await decide("/api.v1.User/Forward", headers)
    assert decision.forward_token
    out = upstream_metadata(headers, decision)
    assert ("authorization", f"Bearer {tok}") in out
    assert keys_of(out).count("authorization") == 1


async def test_top_level_forward_token_applies_to_rules() -> None:
    text = POLICY_YAML.replace("leeway: 30s\n", "leeway: 30s\nforward_token: true\n")
    auth = Authorizer(policy(text), TokenVerifier(keyset(), clock=Clock()))
    headers = bearer(token())
    decision = await auth.decide(METHOD_FOR["access"], headers)
    assert decision.allowed and decision.forward_token
    assert "authorization" in keys_of(upstream_metadata(headers, decision))


async def test_appends_the_verified_identity_headers() -> None:
    headers = [*bearer(token(roles=["admin", "ops"])), *KEPT]
    decision = await decide(METHOD_FOR["access"], headers)
    out = upstream_metadata(headers, decision)
    identity = decision.identity.headers
    assert out == (*KEPT, *identity)
    assert dict(identity)["x-auth-roles"] == "admin,ops"


@pytest.mark.parametrize("level", ["public", "2fa", "refresh", "access"])
async def test_forged_identity_never_survives(level: str) -> None:
    headers = [*FORGED, *KEPT]
    if level != "public":
        headers = [*bearer(token(level)), *headers]
    decision = await decide(METHOD_FOR[level], headers)
    out = upstream_metadata(headers, decision)
    identity = [(k, v) for k, v in out if k.lower().startswith("x-auth-")]
    if level == "public":
        assert decision.identity is None
        assert identity == []
    else:
        assert identity == list(decision.identity.headers)
        values = dict(identity)
        assert keys_of(tuple(identity)).count("x-auth-subject") == 1
        assert values["x-auth-subject"] == "alice"
        assert "x-auth-roles" not in values  # the token has no roles
        assert "x-auth-tenant" not in values
        assert "x-auth-claims-bin" not in values
    assert [kv for kv in out if not kv[0].startswith("x-auth-")] == KEPT


async def test_identity_headers_for_another_subject_are_not_reused() -> None:
    # One authorizer, two tokens: each call gets the identity of its own token.
    auth = authorizer()
    first = await auth.decide(METHOD_FOR["access"], bearer(token(sub="alice")))
    second = await auth.decide(METHOD_FOR["access"], bearer(token(sub="bob", jti="j2")))
    assert dict(upstream_metadata([], first))["x-auth-subject"] == "alice"
    assert dict(upstream_metadata([], second))["x-auth-subject"] == "bob"


@pytest.mark.parametrize("value", ["a\x00b", "a\r\nx-auth-subject: root", "caf\u00e9", "tab\there"])
async def test_text_values_that_are_not_printable_ascii_are_refused(value: str) -> None:
    decision = await decide(METHOD_FOR["access"], [*bearer(token()), ("x-custom", value)])
    with pytest.raises(InvalidMetadata, match="x-custom"):
        upstream_metadata([*bearer(token()), ("x-custom", value)], decision)
