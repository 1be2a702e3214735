"""The Envoy ext_authz gRPC front end (`envoy.service.auth.v3.Authorization/Check`) over
real loopback sockets, with a client built from the xds-protos stubs.

Covers the decisions (the same pipeline as the sidecar), the exact CheckResponse Envoy
acts on for an allow (headers set with overwrite, headers removed, dynamic metadata) and
for a deny (HTTP status, challenge, gRPC status headers, body), HTTP route rules and the
path checks in front of them, and that failures are errors, never allows.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import unquote

import aiohttp
import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from authproxy.keys.issuer import TokenIssuer
from authproxy.policy.strip_headers import DEFAULT_STRIP, OVERRIDE_HEADERS
from tests.support.ext_authz import (
    HTTP_CODE,
    ROUTES_POLICY,
    check,
    check_path,
    check_request,
    denied_headers,
    grpc_code,
    metadata,
    outcome,
    outcomes,
    running_ext_authz,
    set_headers,
    status_details,
    wrap,
)
from tests.support.jws import craft
from tests.support.keys import Keys
from tests.support.policies import TEST_POLICY
from tests.support.running_proxy import RunningProxy
from tests.support.tokens import minted

ALLOW = "ALLOW"
OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
LEVELS = ("2fa", "refresh", "access")
HttpRequest = attribute_context_pb2.AttributeContext.HttpRequest


@pytest.fixture
async def routes(tmp_path: Path, keys: Keys) -> AsyncIterator[RunningProxy]:
    """The ext_authz front ends with ROUTES_POLICY (TEST_POLICY plus `http:` routes)."""
    async with running_ext_authz(tmp_path, keys, policy=ROUTES_POLICY) as running:
        yield running


def summary(response: external_auth_pb2.CheckResponse) -> tuple[str, int, int]:
    """(outcome, gRPC status code, HTTP status); an allow is 200."""
    http = 200 if response.HasField("ok_response") else response.denied_response.status.code
    return outcome(response), response.status.code, http


def expected(result: str) -> tuple[str, int, int]:
    if result == ALLOW:
        return ALLOW, 0, 200
    code = grpc_code(result)
    return result, code, HTTP_CODE[code]


# --- decisions ---------------------------------------------------------------------------

#: service -> token level (None: no token) -> outcome, for TEST_POLICY.
_NEEDS_ACCESS = {
    None: "TOKEN_MISSING",
    "2fa": "WRONG_TOKEN_TYPE",
    "refresh": "WRONG_TOKEN_TYPE",
    "access": ALLOW,
}
MATRIX = {
    "Public": {None: ALLOW, "2fa": ALLOW, "refresh": ALLOW, "access": ALLOW},
    "TwoFA": {
        None: "TOKEN_MISSING",
        "2fa": ALLOW,
        "refresh": "WRONG_TOKEN_TYPE",
        "access": "WRONG_TOKEN_TYPE",
    },
    "Refresh": {
        None: "TOKEN_MISSING",
        "2fa": "WRONG_TOKEN_TYPE",
        "refresh": ALLOW,
        "access": "WRONG_TOKEN_TYPE",
    },
    "Access": _NEEDS_ACCESS,
    "Admin": {**_NEEDS_ACCESS, "access": "INSUFFICIENT_ROLE"},
    "Denied": dict.fromkeys((None, *LEVELS), "METHOD_DENIED"),
    "Forward": _NEEDS_ACCESS,
    "Other": _NEEDS_ACCESS,  # not listed: `default: access`
}


@pytest.mark.parametrize("grpc_request", [True, False], ids=["grpc", "plain-http"])
async def test_allow_deny_matrix_across_levels_and_token_types(
    ext_authz: RunningProxy, issuer: TokenIssuer, grpc_request: bool
):
    tokens = {None: None, **{level: minted(issuer, level=level) for level in LEVELS}}
    requests = {
        f"{service}/{level}": check_request(
            f"/test.{service}/Echo", token=tokens[level], grpc=grpc_request
        )
        for service in MATRIX
        for level in tokens
    }
    requests["Admin/access+admin"] = check_request(
        "/test.Admin/Echo", token=minted(issuer, roles=["admin"]), grpc=grpc_request
    )
    want = {
        f"{service}/{level}": expected(result)
        for service, row in MATRIX.items()
        for level, result in row.items()
    }
    want["Admin/access+admin"] = expected(ALLOW)
    responses = {label: await check(ext_authz, r) for label, r in requests.items()}
    assert {label: summary(r) for label, r in responses.items()} == want


async def test_unknown_method_falls_to_the_default_access_rule(
    ext_authz: RunningProxy, issuer: TokenIssuer
):
    allowed = await check_path(ext_authz, "/test.Other/Echo", token=minted(issuer))
    denied = await check_path(ext_authz, "/test.Other/Echo", token=minted(issuer, level="refresh"))
    assert outcome(allowed) == ALLOW
    assert metadata(allowed)["rule"] == "default"
    assert metadata(allowed)["level"] == "access"
    assert outcome(denied) == "WRONG_TOKEN_TYPE"
    assert metadata(denied)["rule"] == "default"


async def test_wrong_token_type_message_says_what_the_method_needs(
    ext_authz: RunningProxy, issuer: TokenIssuer
):
    response = await check_path(
        ext_authz, "/test.Access/Echo", token=minted(issuer, level="refresh")
    )
    assert response.status.code == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert response.status.message == (
        "WRONG_TOKEN_TYPE: this method needs an access token; got a refresh token"
    )


# --- the allow response ------------------------------------------------------------------


async def test_allow_sets_identity_headers_from_the_token_with_overwrite(
    ext_authz: RunningProxy, issuer: TokenIssuer
):
    minted = issuer.mint(
        "access", "alice", ttl=300, roles=["user", "ops"], permissions=["msg:read"], scopes=["read"]
    )
    response = await check_path(ext_authz, "/test.Access/Echo", token=minted.token)
    assert response.status.code == 0
    assert response.HasField("ok_response") and not response.HasField("denied_response")
    for option in response.ok_response.headers:
        assert option.append_action == OVERWRITE, option.header.key
        assert not option.HasField("append"), option.header.key
    headers = set_headers(response)
    claims_segment = minted.token.split(".")[1]
    assert headers == {
        "x-auth-subject": "alice",
        "x-auth-token-type": "access",
        "x-auth-roles": "user,ops",
        "x-auth-permissions": "msg:read",
        "x-auth-scopes": "read",
        "x-auth-jti": minted.jti,
        "x-auth-issuer": "test-issuer",
        "x-auth-claims": claims_segment,
    }
    assert json.loads(base64.urlsafe_b64decode(claims_segment + "==")) == minted.claims


@pytest.mark.parametrize("form", ["headers", "header_map", "raw"])
async def test_allow_removes_incoming_identity_headers_it_does_not_set_and_authorization(
    ext_authz: RunningProxy, issuer: TokenIssuer, form: str
):
    spoofed = (
        ("x-auth-roles", "admin"),  # the token has no roles: nothing sets this
        ("x_auth_roles", "admin"),  # underscore spelling
        ("X-Auth-Permissions", "all"),  # mixed case
        ("X_AUTH_Extra", "1"),
        ("x-auth-anything", "x"),
        ("x-custom", "kept"),
    )
    response = await check_path(
        ext_authz, "/test.Access/Echo", token=minted(issuer), headers=spoofed, form=form
    )
    assert outcome(response) == ALLOW
    remove = list(response.ok_response.headers_to_remove)
    assert len(remove) == len(set(remove))
    for name in ("x-auth-roles", "x_auth_roles", "x-auth-permissions", "x_auth_extra"):
        assert name in remove
    assert "x-auth-anything" in remove
    assert "authorization" in remove
    assert "x-custom" not in remove
    assert "content-type" not in remove


async def test_headers_to_remove_never_names_a_header_that_is_set(
    ext_authz: RunningProxy, issuer: TokenIssuer
):
    minted = issuer.mint("access", "alice", ttl=300, roles=["user"], scopes=["read"])
    response = await check_path(ext_authz, "/test.Access/Echo", token=minted.token)
    setting = set(set_headers(response))
    # Every header the allow sets, sent by the client too, in several spellings.
    spoofed = [(name, "forged") for name in setting]
    spoofed += [(name.upper(), "forged") for name in setting]
    spoofed += [(name.title(), "forged") for name in setting]
    response = await check_path(
        ext_authz, "/test.Access/Echo", token=minted.token, headers=spoofed, form="header_map"
    )
    assert outcome(response) == ALLOW
    assert set(set_headers(response)) == setting
    remove = {name.lower() for name in response.ok_response.headers_to_remove}
    assert not remove & setting, "Envoy removes after it sets: these would be lost"
    assert set_headers(response)["x-auth-subject"] == "alice"


async def test_forward_token_rule_keeps_authorization(ext_authz: RunningProxy, issuer: TokenIssuer):
    bearer = minted(issuer)
    forwarded = await check_path(ext_authz, "/test.Forward/Echo", token=bearer)
    stripped = await check_path(ext_authz, "/test.Access/Echo", token=bearer)
    assert outcome(forwarded) == ALLOW and outcome(stripped) == ALLOW
    assert "authorization" not in forwarded.ok_response.headers_to_remove
    assert "authorization" not in set_headers(forwarded)
    assert "authorization" in stripped.ok_response.headers_to_remove


async def test_allow_dynamic_metadata_carries_decision_identity_and_claims(
    ext_authz: RunningProxy, issuer: TokenIssuer
):
    minted = issuer.mint("access", "alice", ttl=300, roles=["user", "ops"], scopes=["read"])
    response = await check_path(ext_authz, "/test.Access/Echo", token=minted.token)
    md = metadata(response)
    assert md["decision"] == "allow"
    assert md["level"] == "access"
    assert md["rule"] == "/test.Access/*"
    assert md["policy_version"] == ext_authz.proxy.authorizer.policy.version
    assert md["subject"] == "alice"
    assert md["token_type"] == "access"
    assert md["roles"] == ["user", "ops"]
    assert md["scopes"] == ["read"]
    assert md["claims"] == minted.claims
    assert "reason" not in md


async def test_spoofed_subject_is_replaced_by_the_verified_one(
    ext_authz: RunningProxy, issuer: TokenIssuer
):
    response = await check_path(
        ext_authz,
        "/test.Access/Echo",
        token=minted(issuer, subject="alice"),
        headers=(("x-auth-subject", "mallory"), ("x-auth-roles", "admin")),
    )
    assert outcome(response) == ALLOW
    headers = set_headers(response)
    assert headers["x-auth-subject"] == "alice"
    assert "mallory" not in {o.header.value for o in response.ok_response.headers}
    assert "x-auth-roles" not in headers
    assert "x-auth-roles" in response.ok_response.headers_to_remove
    assert "x-auth-subject" not in response.ok_response.headers_to_remove
    assert metadata(response)["subject"] == "alice"


async def test_public_method_removes_every_spoofed_identity_header_and_sets_none(
    ext_authz: RunningProxy,
):
    spoofed = (
        ("x-auth-subject", "mallory"),
        ("x-auth-roles", "admin"),
        ("x_auth_subject", "mallory"),
        ("X-Auth-Token-Type", "access"),
        ("x-auth-whatever", "1"),
    )
    response = await check_path(ext_authz, "/test.Public/Echo", headers=spoofed)
    assert outcome(response) == ALLOW
    assert list(response.ok_response.headers) == []
    remove = set(response.ok_response.headers_to_remove)
    assert {key.lower() for key, _ in spoofed} <= remove
    md = metadata(response)
    assert md["decision"] == "allow" and md["level"] == "public"
    assert "subject" not in md and "claims" not in md


async def test_public_method_still_strips_an_authorization_header_it_was_sent(
    ext_authz: RunningProxy, issuer: TokenIssuer
):
    response = await check_path(ext_authz, "/test.Public/Echo", token=minted(issuer))
    assert outcome(response) == ALLOW
    assert "authorization" in response.ok_response.headers_to_remove
    assert list(response.ok_response.headers) == []


# --- identity headers of other proxies, method and URL overrides -------------------------

#: Identity-looking headers of other auth proxies a client may forge, as sent.
FOREIGN_IDENTITY = (
    ("x-forwarded-user", "root"),
    ("X-Forwarded-Groups", "admins"),
    ("remote-user", "root"),
    ("x-remote-user", "root"),
    ("x-pomerium-claim-email", "root@example.com"),  # a default prefix: listed when seen
    ("x_forwarded_email", "root@example.com"),  # an underscore spelling: listed as sent
)
OTHER_HEADERS = (("x-forwarded-for", "10.0.0.1"), ("x-request-id", "r1"))


@pytest.mark.parametrize("service", ["Public", "Access"])
@pytest.mark.parametrize("grpc_request", [True, False], ids=["grpc", "plain-http"])
async def test_every_allow_removes_foreign_identity_and_override_headers(
    ext_authz: RunningProxy, issuer: TokenIssuer, service: str, grpc_request: bool
):
    response = await check_path(
        ext_authz,
        f"/test.{service}/Echo",
        token=minted(issuer) if service == "Access" else None,
        headers=FOREIGN_IDENTITY + OTHER_HEADERS,
        grpc=grpc_request,
    )
    assert outcome(response) == ALLOW
    remove = list(response.ok_response.headers_to_remove)
    assert len(remove) == len(set(remove))
    # Every exact default name and every override header, whether Envoy sent it or not
    # (in HTTP mode Envoy sends only the headers `allowed_headers` lets through)...
    assert DEFAULT_STRIP.names <= set(remove)
    assert set(remove) >= OVERRIDE_HEADERS
    # ...and the ones a prefix or an underscore spelling matches, as they were sent.
    assert {"x-pomerium-claim-email", "x_forwarded_email"} <= set(remove)
    assert not {"x-forwarded-for", "x-request-id", "content-type"} & set(remove)
    assert not set(remove) & set(set_headers(response))


async def test_strip_headers_in_the_policy_add_and_keep_names(
    tmp_path: Path, keys: Keys, issuer: TokenIssuer
):
    policy = TEST_POLICY + "strip_headers:\n  add: [x-tenant, x-legacy-*]\n  keep: [x-email]\n"
    async with running_ext_authz(tmp_path, keys, policy=policy) as running:
        response = await check_path(
            running,
            "/test.Access/Echo",
            token=minted(issuer),
            headers=(("x-legacy-user", "root"), ("x-email", "a@example.com")),
        )
    assert outcome(response) == ALLOW
    remove = set(response.ok_response.headers_to_remove)
    assert {"x-tenant", "x-legacy-user", "x-forwarded-user", "x-http-method-override"} <= remove
    assert "x-email" not in remove


#: Override header -> (a value naming another method or URL, the request's own).
OVERRIDES = {
    "X-HTTP-Method-Override": ("DELETE", "get"),
    "x-http-method": ("DELETE", "GET"),
    "X-Method-Override": ("PUT", "GET"),
    "x-original-method": ("DELETE", "GET"),
    "X-Original-URL": ("/api/admin/users", "/api/public/docs"),
    "x-original-uri": ("/api/admin/users", "/api/public/docs?page=2"),
    "X-Rewrite-URL": ("/api/admin/users", "/api/public/docs"),
    "x_http_method_override": ("DELETE", "GET"),  # underscore spelling
}


@pytest.mark.parametrize("form", ["headers", "raw"])
@pytest.mark.parametrize("header", list(OVERRIDES))
async def test_override_header_naming_another_method_or_url_is_refused(
    routes: RunningProxy, header: str, form: str
):
    # `GET /api/public/**` is public; DELETE there is denied and /api/admin/** needs admin.
    # A backend honouring the override would run what was never authorized: refuse.
    other, own = OVERRIDES[header]
    path = "/api/public/docs?page=2"
    plain = await check_path(routes, path, method="GET", grpc=False, form=form)
    assert outcome(plain) == ALLOW
    refused = await check_path(
        routes, path, method="GET", grpc=False, form=form, headers=((header, other),)
    )
    assert summary(refused) == ("REQUEST_MALFORMED", 3, 400)
    body = json.loads(refused.denied_response.body)
    assert body["reason"] == "REQUEST_MALFORMED"
    assert header.lower() in body["message"] and "override" in body["message"]
    # The request's own method or URL changes nothing: allowed, and still removed.
    same = await check_path(
        routes, path, method="GET", grpc=False, form=form, headers=((header, own),)
    )
    assert outcome(same) == ALLOW
    assert header.lower().replace("_", "-") in same.ok_response.headers_to_remove


async def test_override_header_on_a_grpc_request_is_refused(ext_authz: RunningProxy):
    for header, value in (
        ("x-original-url", "/test.Admin/Echo"),
        ("x-http-method-override", "GET"),
    ):
        response = await check_path(ext_authz, "/test.Public/Echo", headers=((header, value),))
        assert summary(response) == ("REQUEST_MALFORMED", 3, 400)
        assert denied_headers(response)["grpc-status"] == "3"


# --- the deny response -------------------------------------------------------------------


async def test_missing_token_deny_for_a_grpc_request(ext_authz: RunningProxy):
    response = await check_path(ext_authz, "/test.Access/Echo")
    assert not response.HasField("ok_response")
    assert response.status.code == 16
    assert response.status.message.startswith("TOKEN_MISSING: ")
    assert response.denied_response.status.code == 401
    headers = denied_headers(response)
    assert headers["www-authenticate"] == "Bearer"  # RFC 6750 3.1: no error code
    assert headers["grpc-status"] == "16"
    assert unquote(headers["grpc-message"]) == response.status.message
    status, info = status_details(headers["grpc-status-details-bin"])
    assert status.code == 16
    assert status.message == response.status.message
    assert info.reason == "TOKEN_MISSING"
    assert info.domain == "authproxy"
    assert info.metadata["level"] == "access"
    assert response.denied_response.body == response.status.message
    # Plain text, never JSON: Envoy makes the body the grpc-message of its gRPC reply.
    assert headers["content-type"] == "text/plain; charset=utf-8"
    md = metadata(response)
    assert md["decision"] == "deny"
    assert md["reason"] == "TOKEN_MISSING"
    assert md["level"] == "access"
    assert md["rule"] == "/test.Access/*"
    assert md["policy_version"] == ext_authz.proxy.authorizer.policy.version
    assert "subject" not in md and "claims" not in md


async def test_missing_token_deny_for_a_plain_http_request_has_a_json_body(
    ext_authz: RunningProxy,
):
    response = await check_path(ext_authz, "/test.Access/Echo", method="GET", grpc=False)
    assert response.status.code == 16
    assert response.denied_response.status.code == 401
    headers = denied_headers(response)
    assert headers["content-type"] == "application/json"
    assert headers["www-authenticate"] == "Bearer"
    assert not {"grpc-status", "grpc-message", "grpc-status-details-bin"} & set(headers)
    body = json.loads(response.denied_response.body)
    assert body == {
        "error": "unauthenticated",
        "reason": "TOKEN_MISSING",
        "message": "no authorization header with a bearer token",
    }
    assert metadata(response)["reason"] == "TOKEN_MISSING"


async def test_invalid_token_challenge_names_invalid_token_and_describes_it(
    ext_authz: RunningProxy,
):
    response = await check_path(ext_authz, "/test.Access/Echo", token="not-a-jwt", grpc=False)
    assert response.denied_response.status.code == 401
    assert denied_headers(response)["www-authenticate"] == (
        'Bearer error="invalid_token",'
        ' error_description="a JWT has 3 dot-separated parts; this token has 1"'
    )
    body = json.loads(response.denied_response.body)
    assert body["reason"] == "TOKEN_MALFORMED"
    assert body["error"] == "unauthenticated"


async def test_insufficient_role_is_403_with_an_insufficient_scope_challenge(
    ext_authz: RunningProxy, issuer: TokenIssuer
):
    response = await check_path(ext_authz, "/test.Admin/Echo", token=minted(issuer, roles=["user"]))
    assert response.status.code == 7
    assert response.denied_response.status.code == 403
    headers = denied_headers(response)
    assert headers["www-authenticate"] == (
        'Bearer error="insufficient_scope",'
        ' error_description="this method needs one of the roles admin"'
    )
    assert headers["grpc-status"] == "7"
    _, info = status_details(headers["grpc-status-details-bin"])
    assert info.reason == "INSUFFICIENT_ROLE"
    assert metadata(response)["reason"] == "INSUFFICIENT_ROLE"


async def test_denied_method_is_403_without_a_bearer_challenge(
    ext_authz: RunningProxy, issuer: TokenIssuer
):
    response = await check_path(ext_authz, "/test.Denied/Echo", token=minted(issuer), grpc=False)
    assert response.status.code == 7
    assert response.denied_response.status.code == 403
    headers = denied_headers(response)
    assert "www-authenticate" not in headers
    body = json.loads(response.denied_response.body)
    assert body == {
        "error": "permission_denied",
        "reason": "METHOD_DENIED",
        "message": "this method is disabled",
    }


async def test_grpc_message_is_percent_encoded_and_challenge_is_rfc6750_safe(
    ext_authz: RunningProxy,
):
    # An unknown kid is echoed in the deny message: non-ASCII, '%', '"' and '\' included.
    kid = 'clé "100%" \\'
    forged = craft({"alg": "ES256", "kid": kid}, {"sub": "alice"}, signature=b"sig")
    response = await check_path(ext_authz, "/test.Access/Echo", token=forged)
    headers = denied_headers(response)
    message = response.status.message
    assert message == f"KEY_NOT_FOUND: no configured key has kid {kid!r}"
    assert headers["grpc-message"] == (
        "KEY_NOT_FOUND: no configured key has kid 'cl%C3%A9 \"100%25\" \\\\'"
    )
    assert unquote(headers["grpc-message"]) == message
    assert response.denied_response.body == message
    challenge = headers["www-authenticate"]
    prefix = 'Bearer error="invalid_token", error_description="'
    assert challenge.startswith(prefix) and challenge.endswith('"')
    description = challenge[len(prefix) : -1]
    assert description == "no configured key has kid 'cl? ?100%? ??'"
    assert all(0x20 <= ord(c) <= 0x7E and c not in '"\\' for c in description)


@pytest.mark.parametrize(
    ("path", "grpc_request", "reason"),
    [
        ("/test.Access/Echo", True, "TOKEN_MISSING"),
        ("/test.Access/Echo", False, "TOKEN_MISSING"),
        ("/test.Admin/Echo", True, "INSUFFICIENT_ROLE"),
        ("/test.Denied/Echo", False, "METHOD_DENIED"),
        ("/test.Access", True, "METHOD_MALFORMED"),
        ("/api/a/../b", False, "REQUEST_MALFORMED"),
    ],
)
async def test_deny_status_codes_match_the_reason(
    ext_authz: RunningProxy, issuer: TokenIssuer, path: str, grpc_request: bool, reason: str
):
    bearer = minted(issuer) if reason == "INSUFFICIENT_ROLE" else None
    response = await check_path(ext_authz, path, token=bearer, grpc=grpc_request)
    assert summary(response) == expected(reason)
    assert metadata(response)["decision"] == "deny"
    code = response.status.code
    if grpc_request:
        assert denied_headers(response)["grpc-status"] == str(code)
    else:
        assert (
            json.loads(response.denied_response.body)["error"]
            == {
                16: "unauthenticated",
                7: "permission_denied",
                3: "invalid_argument",
            }[code]
        )


# --- what the request looks like ---------------------------------------------------------


#: path -> outcome for a plain HTTP request: the query (or fragment) is not part of the method.
QUERY_PATHS = {
    "/test.Access/Echo?x=1": ALLOW,
    "/test.Admin/Echo?role=admin": "INSUFFICIENT_ROLE",
    "/test.Public/Echo?a=b&c=d": ALLOW,
    "/test.Denied/Echo?/test.Public/Echo": "METHOD_DENIED",
    "/test.Admin/Echo#/test.Public/Echo": "INSUFFICIENT_ROLE",
}


async def test_query_string_is_not_part_of_the_method_of_a_plain_http_request(
    ext_authz: RunningProxy, issuer: TokenIssuer
):
    bearer = minted(issuer)
    requests = {path: check_request(path, token=bearer, grpc=False) for path in QUERY_PATHS}
    assert await outcomes(ext_authz, requests) == QUERY_PATHS
    response = await check_path(ext_authz, "/test.Access/Echo?x=1", token=bearer, grpc=False)
    assert metadata(response)["rule"] == "/test.Access/*"


async def test_grpc_request_with_a_query_or_fragment_is_method_malformed_like_the_sidecar(
    ext_authz: RunningProxy, issuer: TokenIssuer
):
    # The sidecar refuses such a path (not '/package.Service/Method'); Envoy's Check must
    # not judge it by the part before '?' instead (here: Public, for a path naming Admin).
    bearer = minted(issuer)
    paths = [*QUERY_PATHS, "/test.Public/Echo?x=/test.Admin/Echo", "/test.Public/Echo?"]
    requests = {path: check_request(path, token=bearer) for path in paths}
    assert await outcomes(ext_authz, requests) == dict.fromkeys(paths, "METHOD_MALFORMED")
    response = await check_path(ext_authz, "/test.Public/Echo?x=/test.Admin/Echo")
    assert summary(response) == ("METHOD_MALFORMED", 7, 403)


async def test_headers_and_header_map_give_the_same_decision(
    ext_authz: RunningProxy, issuer: TokenIssuer
):
    minted = issuer.mint("access", "alice", ttl=300, roles=["user"])
    cases = {
        "allow": ("/test.Access/Echo", minted.token),
        "missing": ("/test.Access/Echo", None),
        "wrong-type": ("/test.Refresh/Echo", minted.token),
        "role": ("/test.Admin/Echo", minted.token),
    }
    results = {}
    for form in ("headers", "header_map", "raw"):
        for label, (path, bearer) in cases.items():
            response = await check_path(
                ext_authz, path, token=bearer, form=form, headers=(("x-auth-subject", "m"),)
            )
            results[form, label] = (
                summary(response),
                set_headers(response),
                sorted(response.ok_response.headers_to_remove),
            )
    for form in ("header_map", "raw"):
        for label in cases:
            assert results[form, label] == results["headers", label], (form, label)
    assert results["raw", "allow"][0] == expected(ALLOW)
    assert results["raw", "allow"][1]["x-auth-subject"] == "alice"
    assert results["raw", "missing"][0] == expected("TOKEN_MISSING")


async def test_header_map_raw_value_is_read_when_value_is_empty(
    ext_authz: RunningProxy, issuer: TokenIssuer
):
    http = HttpRequest(method="POST", path="/test.Access/Echo")
    http.header_map.headers.add(key="content-type", raw_value=b"application/grpc")
    http.header_map.headers.add(key="authorization", raw_value=f"Bearer {minted(issuer)}".encode())
    response = await check(ext_authz, wrap(http))
    assert outcome(response) == ALLOW
    assert set_headers(response)["x-auth-subject"] == "alice"


@pytest.mark.parametrize(
    "request_",
    [
        external_auth_pb2.CheckRequest(),
        wrap(HttpRequest()),
        wrap(HttpRequest(method="POST", path="", headers={"content-type": "application/grpc"})),
        wrap(HttpRequest(method="GET", path="")),
        wrap(HttpRequest(method="", path="/test.Public/Echo")),
    ],
    ids=["no-attributes", "empty-http", "grpc-no-path", "http-no-path", "no-method"],
)
async def test_check_without_http_method_and_path_is_request_malformed(
    ext_authz: RunningProxy, request_: external_auth_pb2.CheckRequest
):
    response = await check(ext_authz, request_)  # an answer, not an RPC error
    assert summary(response) == ("REQUEST_MALFORMED", 3, 400)
    assert response.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert metadata(response)["decision"] == "deny"
    assert "www-authenticate" not in denied_headers(response)


async def test_check_without_attributes_is_malformed_even_with_a_valid_token_elsewhere(
    ext_authz: RunningProxy, issuer: TokenIssuer
):
    http = HttpRequest(headers={"authorization": f"Bearer {minted(issuer)}"})
    response = await check(ext_authz, wrap(http))
    assert outcome(response) == "REQUEST_MALFORMED"
    assert ext_authz.proxy.check_grpc.service.errors_total == 0


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/test.Access",
        "/test.Access/",
        "/test.Access/Echo/",
        "/test.Access/Echo/extra",
        "/api/messages/room1",
        "/test.Access/Ec%68o",
        "test.Access/Echo",
    ],
)
async def test_grpc_request_to_a_path_that_is_not_a_method_is_method_malformed(
    ext_authz: RunningProxy, issuer: TokenIssuer, path: str
):
    response = await check_path(ext_authz, path, token=minted(issuer, roles=["admin"]))
    assert summary(response) == ("METHOD_MALFORMED", 7, 403)


PLAIN_VARIANTS = {
    "json": ("/test.Admin/Echo", (("content-type", "application/json"),)),
    "no-content-type": ("/test.Admin/Echo", ()),
    "text": ("/test.Admin/Echo", (("content-type", "text/plain"),)),
    "escaped-method": ("/test.Admin/Ec%68o", ()),
    "escaped-service": ("/test.%41dmin/Echo", (("content-type", "application/json"),)),
    "trailing-slash": ("/test.Admin/Echo/", ()),
    "query": ("/test.Admin/Echo?admin=1", ()),
}


async def test_plain_http_to_a_listed_method_is_judged_by_its_method_rule(
    ext_authz: RunningProxy, issuer: TokenIssuer
):
    user = minted(issuer, roles=["user"])
    admin = minted(issuer, roles=["admin"])
    requests = {}
    for label, (path, headers) in PLAIN_VARIANTS.items():
        for who, bearer in (("user", user), ("admin", admin)):
            requests[f"{label}/{who}"] = check_request(
                path, method="POST", token=bearer, headers=headers, grpc=False
            )
    requests["denied"] = check_request("/test.Denied/Ech%6F", token=admin, grpc=False)
    got = await outcomes(ext_authz, requests)
    want = {f"{label}/user": "INSUFFICIENT_ROLE" for label in PLAIN_VARIANTS}
    want.update({f"{label}/admin": ALLOW for label in PLAIN_VARIANTS})
    want["denied"] = "METHOD_DENIED"
    assert got == want


async def test_http_route_cannot_open_a_listed_method_to_plain_http(
    routes: RunningProxy, issuer: TokenIssuer
):
    # ROUTES_POLICY has `"* /test.Admin/**": public`; /test.Admin/* in methods: still wins.
    user = minted(issuer, roles=["user"])
    requests = {
        label: check_request(path, token=user, headers=headers, grpc=False)
        for label, (path, headers) in PLAIN_VARIANTS.items()
    }
    requests["grpc"] = check_request("/test.Admin/Echo", token=user)
    requests["unlisted-under-route"] = check_request("/test.Admin/Echo/more", grpc=False)
    got = await outcomes(routes, requests)
    want = dict.fromkeys(PLAIN_VARIANTS, "INSUFFICIENT_ROLE")
    want["grpc"] = "INSUFFICIENT_ROLE"
    want["unlisted-under-route"] = ALLOW  # not a method path: the http route applies
    assert got == want
    response = await check_path(routes, "/test.Admin/Ec%68o", token=user, grpc=False)
    assert metadata(response)["rule"] == "/test.Admin/*"


async def test_expired_token_is_token_expired_401(ext_authz: RunningProxy, issuer: TokenIssuer):
    expired = issuer.mint("access", "alice", ttl=-600).token
    response = await check_path(ext_authz, "/test.Access/Echo", token=expired)
    assert summary(response) == ("TOKEN_EXPIRED", 16, 401)
    challenge = denied_headers(response)["www-authenticate"]
    assert challenge.startswith('Bearer error="invalid_token", error_description="token expired')


async def test_authorization_values_merged_by_envoy_are_denied(
    ext_authz: RunningProxy, issuer: TokenIssuer
):
    first, second = minted(issuer, subject="alice"), minted(issuer, subject="bob")
    two = (("authorization", f"Bearer {first}"), ("authorization", f"Bearer {second}"))
    merged = await check_path(ext_authz, "/test.Access/Echo", headers=two, form="headers")
    assert summary(merged)[1:] == (16, 401)
    assert outcome(merged) == "TOKEN_MALFORMED"
    repeated = await check_path(ext_authz, "/test.Access/Echo", headers=two, form="raw")
    assert summary(repeated) == ("TOKEN_AMBIGUOUS", 16, 401)
    comma = await check_path(
        ext_authz,
        "/test.Access/Echo",
        headers=(("authorization", f"Bearer {first},Bearer {second}"),),
    )
    assert summary(comma) == ("TOKEN_MALFORMED", 16, 401)


# --- the server --------------------------------------------------------------------------


@pytest.mark.parametrize("service", ["", "envoy.service.auth.v3.Authorization"])
async def test_health_service_on_the_check_port_reports_serving(
    ext_authz: RunningProxy, service: str
):
    stub = health_pb2_grpc.HealthStub(ext_authz.check)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


class _BrokenVerifier:
    """A verifier that fails unexpectedly (fault injection into the real pipeline)."""

    def verify(self, *args, **kwargs):
        raise RuntimeError("verifier exploded")


async def test_internal_error_fails_the_rpc_with_internal_not_an_allow(
    ext_authz: RunningProxy, issuer: TokenIssuer
):
    service = ext_authz.proxy.check_grpc.service
    bearer = minted(issuer)
    before = service.errors_total
    ext_authz.proxy.authorizer.verifier = _BrokenVerifier()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await check_path(ext_authz, "/test.Access/Echo", token=bearer)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "verifier exploded" not in (caught.value.details() or "")
    assert service.errors_total == before + 1
    # The server keeps answering: a check that needs no verifier still works.
    public = await check_path(ext_authz, "/test.Public/Echo")
    assert outcome(public) == ALLOW
    assert service.errors_total == before + 1


# --- http: route rules -------------------------------------------------------------------


async def test_http_routes_most_specific_wins_whatever_the_file_order(
    routes: RunningProxy, issuer: TokenIssuer
):
    user = minted(issuer, roles=["user"])
    admin = minted(issuer, roles=["admin"])
    ops = minted(issuer, roles=["ops"])
    refresh = minted(issuer, level="refresh")
    cases = {
        # (method, path, token): (outcome, rule)
        ("GET", "/api/messages/room1", None): ("TOKEN_MISSING", "GET /api/messages/{room}"),
        ("GET", "/api/messages/room1", user): (ALLOW, "GET /api/messages/{room}"),
        ("POST", "/api/messages/room1", user): ("METHOD_DENIED", "* /api/messages/*"),
        ("DELETE", "/api/messages/room1", admin): (
            "METHOD_DENIED",
            "DELETE /api/messages/{room}",
        ),
        ("GET", "/api/messages/pinned", None): (ALLOW, "GET /api/messages/pinned"),
        ("GET", "/api/public/a/b/c", None): (ALLOW, "GET /api/public/**"),
        ("GET", "/api/public", None): (ALLOW, "GET /api/public/**"),
        ("POST", "/api/public/a", None): ("METHOD_DENIED", "* /api/**"),
        ("GET", "/api/other", user): ("METHOD_DENIED", "* /api/**"),
        ("GET", "/api", user): ("METHOD_DENIED", "* /api/**"),
        ("POST", "/api/auth/refresh", refresh): (ALLOW, "POST /api/auth/refresh"),
        ("POST", "/api/auth/refresh", user): ("WRONG_TOKEN_TYPE", "POST /api/auth/refresh"),
        ("GET", "/api/auth/refresh", refresh): ("METHOD_DENIED", "* /api/**"),
        ("GET", "/api/admin/users", user): ("INSUFFICIENT_ROLE", "* /api/admin/**"),
        ("PUT", "/api/admin/users/7", admin): (ALLOW, "* /api/admin/**"),
        ("GET", "/api/admin", user): ("INSUFFICIENT_ROLE", "* /api/admin/**"),
        ("GET", "/api/status", user): ("INSUFFICIENT_ROLE", "GET /api/status"),
        ("GET", "/api/status", ops): (ALLOW, "GET /api/status"),
        ("GET", "/api/status/health", None): (ALLOW, "GET /api/status/**"),
        ("GET", "/other/page", None): ("TOKEN_MISSING", "default"),
        ("GET", "/other/page", user): (ALLOW, "default"),
        ("GET", "/", None): ("TOKEN_MISSING", "default"),
        ("GET", "/API/public/x", None): ("TOKEN_MISSING", "default"),
    }
    got = {}
    for method, path, bearer in cases:
        response = await check_path(routes, path, method=method, token=bearer, grpc=False)
        got[method, path, bearer] = (outcome(response), metadata(response)["rule"])
    assert got == cases


async def test_http_route_paths_are_normalised_once_before_matching(
    routes: RunningProxy, issuer: TokenIssuer
):
    user = minted(issuer, roles=["user"])
    cases = {
        # trailing slash ignored
        "/api/messages/room1/": (ALLOW, "GET /api/messages/{room}"),
        "/api/public/": (ALLOW, "GET /api/public/**"),
        "/api/status/": ("INSUFFICIENT_ROLE", "GET /api/status"),
        # query removed, whatever it holds
        "/api/messages/room1?x=1&next=/../admin": (ALLOW, "GET /api/messages/{room}"),
        "/api/public/x?/api/admin/y": (ALLOW, "GET /api/public/**"),
        # percent-escapes decoded once
        "/api/messages/r%6Fom1": (ALLOW, "GET /api/messages/{room}"),
        "/api/%61dmin/users": ("INSUFFICIENT_ROLE", "* /api/admin/**"),
        "/api/%70ublic/x": (ALLOW, "GET /api/public/**"),
    }
    got = {}
    for path in cases:
        response = await check_path(routes, path, method="GET", token=user, grpc=False)
        got[path] = (outcome(response), metadata(response)["rule"])
    assert got == cases
    # Decoded once: "pinn%65d" is "pinned", "pinn%2565d" is the segment "pinn%65d".
    once = await check_path(routes, "/api/messages/pinn%65d", method="GET", grpc=False)
    twice = await check_path(routes, "/api/messages/pinn%2565d", method="GET", grpc=False)
    assert (outcome(once), metadata(once)["rule"]) == (ALLOW, "GET /api/messages/pinned")
    assert (outcome(twice), metadata(twice)["rule"]) == (
        "TOKEN_MISSING",
        "GET /api/messages/{room}",
    )


AMBIGUOUS_PATHS = [
    "/api/public/../admin/users",
    "/api/public/./x",
    "/api/public/..",
    "/api/public/%2e%2e/admin/users",
    "/api/public/%2E%2E/admin/users",
    "/api/public/.%2e/admin/users",
    "/api/public/x%2Fy",
    "/api/public/x%2fy",
    "/api/public/..%2Fadmin",
    "/api/public\\..\\admin/users",
    "/api/public/x%5Cy",
    "/api/public/x;jsessionid=1",
    "/api/public/x%3By",
    "//api/public/x",
    "/api//public/x",
    "/api/public/x//",
    "/api/public/%00",
    "/api/public/x%0Ay",
    "/api/public/x%",
    "/api/public/x%zz",
    "/api/public/%E9",
    "api/public/x",
]


async def test_ambiguous_paths_are_request_malformed(routes: RunningProxy, issuer: TokenIssuer):
    admin = minted(issuer, roles=["admin"])
    got = {}
    for path in AMBIGUOUS_PATHS:
        response = await check_path(routes, path, method="GET", token=admin, grpc=False)
        got[path] = summary(response)
    assert got == dict.fromkeys(AMBIGUOUS_PATHS, ("REQUEST_MALFORMED", 3, 400))
    response = await check_path(routes, "/api/public/%2e%2e/admin", method="GET", grpc=False)
    md = metadata(response)
    assert md == {
        "decision": "deny",
        "reason": "REQUEST_MALFORMED",
        "level": "deny",
        "rule": "malformed",
        "policy_version": routes.proxy.authorizer.policy.version,
    }
    body = json.loads(response.denied_response.body)
    assert body["error"] == "invalid_argument" and body["reason"] == "REQUEST_MALFORMED"


async def test_overlong_path_is_request_malformed(routes: RunningProxy):
    path = "/api/public/" + "a" * 9000
    response = await check_path(routes, path, method="GET", grpc=False)
    assert summary(response) == ("REQUEST_MALFORMED", 3, 400)
    message = json.loads(response.denied_response.body)["message"]
    assert message.startswith(f"path is {len(path)} ") and message.endswith("limit 8192")


async def test_metrics_are_served_with_both_ext_authz_listeners_and_count_their_checks(
    tmp_path: Path, keys: Keys, issuer: TokenIssuer
):
    async with running_ext_authz(tmp_path, keys, admin="127.0.0.1:0") as running:
        allowed = await check_path(running, "/test.Access/Report", token=minted(issuer))
        denied = await check_path(running, "/test.Access/Report")
        assert (outcome(allowed), outcome(denied)) == (ALLOW, "TOKEN_MISSING")
        admin = f"http://127.0.0.1:{running.proxy.admin.port}/metrics"  # type: ignore[union-attr]
        async with aiohttp.ClientSession() as session, session.get(admin) as response:
            assert response.status == 200
            text = await response.text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("authproxy_ext_authz_grpc_errors_total", ())] == 0
    assert samples[("authproxy_ext_authz_http_errors_total", ())] == 0
    decisions = {
        labels: value for (name, labels), value in samples.items()
        if name == "authproxy_requests_total"
    }  # fmt: skip
    by_decision = {dict(labels)["decision"]: value for labels, value in decisions.items()}
    assert by_decision == {"allow": 1, "deny": 1}
