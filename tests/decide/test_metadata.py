"""What the backend receives (`relay_headers`): the client's HTTP/2 header fields minus
forged identity, hop-by-hop fields and the token, plus the verified identity."""

from __future__ import annotations

import base64

import pytest

from authproxy.decide.auth_headers import InvalidMetadata, relay_headers
from authproxy.decide.decision import Decision
from authproxy.decide.pipeline import Authorizer
from authproxy.keys.verify import TokenVerifier
from tests.support.tokens import (
    METHOD_FOR,
    POLICY_YAML,
    Clock,
    authorizer,
    bearer,
    keyset,
    policy,
    token,
)

Fields = list[tuple[bytes, bytes]]


def fields(pairs: list[tuple[str, str]]) -> Fields:
    """Header fields as the relay hands them over (bytes; `-bin` values base64 text)."""
    return [(k.encode(), v.encode()) for k, v in pairs]


def as_metadata(headers: Fields) -> list[tuple[str, str]]:
    """The same fields as the pipeline is given them (`sidecar/relay.py`: latin-1 text)."""
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


FORGED = fields(
    [
        ("x-auth-subject", "root"),
        ("X-Auth-Subject", "root"),  # not valid on HTTP/2, refused earlier; dropped anyway
        ("X-AUTH-ROLES", "admin"),
        ("x-auth-roles", "admin,superuser"),
        ("x-Auth-Token-Type", "access"),
        ("x-auth-claims", "eyJzdWIiOiJyb290In0"),
        ("x-auth-issuer", "auth-service"),
        ("x-auth-tenant", "other"),
        ("x-auth-claims-bin", b64(b"\x00\x01")),
        ("x-auth-", "empty-suffix"),
        ("x-auth-subject", "root-again"),
        # Backends that fold underscores into dashes would read these as x-auth-*.
        ("x_auth_subject", "root"),
        ("x-auth_roles", "admin"),
        ("X_AUTH_CLAIMS", "eyJzdWIiOiJyb290In0"),
    ]
)
HOP_BY_HOP = fields(
    [
        ("connection", "keep-alive"),
        ("keep-alive", "timeout=5"),
        ("proxy-connection", "close"),
        ("proxy-authorization", "Basic Zm9vOmJhcg"),
        ("transfer-encoding", "chunked"),
        ("upgrade", "h2c"),
        ("host", "backend:50051"),
        ("content-length", "10"),
        ("grpc-timeout", "5S"),  # the relay sends the time remaining instead
        (":authority", "backend"),
        (":path", "/api.v1.User/Get"),
    ]
)
#: Per-call fields of gRPC itself: the messages are relayed as they are, so these go too.
TRANSPORT = fields(
    [
        ("te", "trailers"),
        ("content-type", "application/grpc"),
        ("user-agent", "grpc-python/1.0"),
        ("grpc-encoding", "gzip"),
        ("grpc-accept-encoding", "gzip"),
    ]
)
BINARY = bytes(range(256))
KEPT = fields(
    [
        ("x-request-id", "req-1"),
        ("trace-bin", b64(BINARY)),
        ("x-authorization-hint", "not an identity header"),
        ("xauth-subject", "not an identity header either"),
        ("x-request-id", "req-2"),
    ]
)


async def decide(method: str, headers: Fields) -> Decision:
    decision = await authorizer().decide(method, as_metadata(headers))
    assert decision.allowed, decision.message
    return decision


def identity_fields(decision: Decision) -> Fields:
    assert decision.identity is not None
    return fields(list(decision.identity.headers))


def names_of(headers: Fields) -> list[bytes]:
    return [k for k, _ in headers]


async def test_strips_every_identity_header_in_any_case() -> None:
    decision = await decide(METHOD_FOR["public"], FORGED + KEPT)
    out = relay_headers(FORGED + KEPT, decision)
    assert not [k for k in names_of(out) if k.lower().startswith(b"x-auth-")]
    assert out == KEPT


async def test_strips_hop_by_hop_and_pseudo_headers_and_keeps_grpc_transport_fields() -> None:
    decision = await decide(METHOD_FOR["public"], HOP_BY_HOP)
    out = relay_headers(HOP_BY_HOP + TRANSPORT + KEPT, decision)
    assert out == TRANSPORT + KEPT


async def test_keeps_binary_metadata_byte_for_byte() -> None:
    decision = await decide(METHOD_FOR["public"], [])
    raw = [(b"trace-bin", b64(BINARY).encode()), (b"blob-bin", b""), (b"odd-bin", b"\x00\xff")]
    assert relay_headers(raw, decision) == raw  # -bin values are not text: never refused


async def test_authorization_is_removed_by_default() -> None:
    headers = fields(bearer(token())) + KEPT
    decision = await decide(METHOD_FOR["access"], headers)
    assert not decision.forward_token
    out = relay_headers(headers, decision)
    assert b"authorization" not in names_of(out)
    assert out[: len(KEPT)] == KEPT


async def test_authorization_is_forwarded_when_the_rule_says_so() -> None:
    tok = token()
    headers = fields([("authorization", f"Bearer {tok}")]) + KEPT
    decision = await decide("/api.v1.User/Forward", headers)
    assert decision.forward_token
    out = relay_headers(headers, decision)
    assert (b"authorization", f"Bearer {tok}".encode()) in out
    assert names_of(out).count(b"authorization") == 1


async def test_top_level_forward_token_applies_to_rules() -> None:
    text = POLICY_YAML.replace("leeway: 30s\n", "leeway: 30s\nforward_token: true\n")
    auth = Authorizer(policy(text), TokenVerifier(keyset(), clock=Clock()))
    headers = fields(bearer(token()))
    decision = await auth.decide(METHOD_FOR["access"], as_metadata(headers))
    assert decision.allowed and decision.forward_token
    assert b"authorization" in names_of(relay_headers(headers, decision))


async def test_appends_the_verified_identity_headers() -> None:
    headers = fields(bearer(token(roles=["admin", "ops"]))) + KEPT
    decision = await decide(METHOD_FOR["access"], headers)
    out = relay_headers(headers, decision)
    identity = identity_fields(decision)
    assert out == KEPT + identity
    assert dict(identity)[b"x-auth-roles"] == b"admin,ops"


@pytest.mark.parametrize("level", ["public", "2fa", "refresh", "access"])
async def test_forged_identity_never_survives(level: str) -> None:
    headers = FORGED + KEPT
    if level != "public":
        headers = fields(bearer(token(level))) + headers
    decision = await decide(METHOD_FOR[level], headers)
    out = relay_headers(headers, decision)
    identity = [(k, v) for k, v in out if k.lower().startswith(b"x-auth-")]
    if level == "public":
        assert decision.identity is None
        assert identity == []
    else:
        assert identity == identity_fields(decision)
        values = dict(identity)
        assert names_of(identity).count(b"x-auth-subject") == 1
        assert values[b"x-auth-subject"] == b"alice"
        assert b"x-auth-roles" not in values  # the token has no roles
        assert b"x-auth-tenant" not in values
        assert b"x-auth-claims-bin" not in values
    assert [kv for kv in out if not kv[0].startswith(b"x-auth-")] == KEPT


async def test_identity_headers_for_another_subject_are_not_reused() -> None:
    # One authorizer, two tokens: each call gets the identity of its own token.
    auth = authorizer()
    first = await auth.decide(METHOD_FOR["access"], bearer(token(sub="alice")))
    second = await auth.decide(METHOD_FOR["access"], bearer(token(sub="bob", jti="j2")))
    assert dict(relay_headers([], first))[b"x-auth-subject"] == b"alice"
    assert dict(relay_headers([], second))[b"x-auth-subject"] == b"bob"


@pytest.mark.parametrize("value", ["a\x00b", "a\r\nx-auth-subject: root", "caf\u00e9", "tab\there"])
async def test_text_values_that_are_not_printable_ascii_are_refused(value: str) -> None:
    headers = fields([*bearer(token()), ("x-custom", value)])
    decision = await decide(METHOD_FOR["access"], headers)
    with pytest.raises(InvalidMetadata, match="x-custom"):
        relay_headers(headers, decision)
