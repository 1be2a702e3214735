"""The Envoy ext_authz HTTP front end (Envoy's `http_service` mode) over real loopback
sockets, with an aiohttp client (and raw sockets where a client would tidy the request).

Envoy sends the original method, the path prefix plus the original path, and the
original headers; the proxy answers 200 with identity headers and
`x-envoy-auth-headers-to-remove`, or a deny with the same body and headers as the gRPC
front end, or 500 when something breaks (an error for Envoy, never an allow).
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import aiohttp
import pytest
from yarl import URL

from authproxy.keys.issuer import TokenIssuer
from authproxy.policy.strip_headers import DEFAULT_STRIP
from tests.support.ext_authz import (
    ROUTES_POLICY,
    check_path,
    running_ext_authz,
    set_headers,
    status_details,
)
from tests.support.ext_authz_http import header_values, raw_http
from tests.support.keys import Keys
from tests.support.policies import TEST_POLICY
from tests.support.running_proxy import RunningProxy
from tests.support.tokens import bearer, minted

GRPC = {"content-type": "application/grpc"}
TO_REMOVE = "x-envoy-auth-headers-to-remove"


@pytest.fixture
async def routes(tmp_path: Path, keys: Keys) -> AsyncIterator[RunningProxy]:
    async with running_ext_authz(tmp_path, keys, policy=ROUTES_POLICY) as running:
        yield running


@pytest.fixture
async def prefixed(tmp_path: Path, keys: Keys) -> AsyncIterator[RunningProxy]:
    async with running_ext_authz(tmp_path, keys, path_prefix="/check") as running:
        yield running


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        yield s


class Answer:
    """What the HTTP mode answered: status, headers, body."""

    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def json(self) -> dict[str, Any]:
        assert self.headers.get("content-type") == "application/json"
        return json.loads(self.body)

    @property
    def to_remove(self) -> list[str]:
        values = self.headers.getall(TO_REMOVE, [])
        assert len(values) <= 1
        return values[0].split(",") if values else []

    def identity(self) -> dict[str, str]:
        return {k.lower(): v for k, v in self.headers.items() if k.lower().startswith("x-auth-")}


async def ask(
    session: aiohttp.ClientSession,
    running: RunningProxy,
    path: str,
    method: str = "POST",
    headers: Any = None,
) -> Answer:
    """One check; `path` is sent exactly as written (no client-side normalisation)."""
    url = URL(running.http_url + path, encoded=True)
    async with session.request(method, url, headers=headers, allow_redirects=False) as resp:
        return Answer(resp.status, resp.headers, await resp.read())


def base_url(running: RunningProxy) -> str:
    return f"http://127.0.0.1:{running.proxy.check_http.port}"


# --- allow -------------------------------------------------------------------------------


@pytest.mark.parametrize("grpc_request", [True, False], ids=["grpc", "plain-http"])
async def test_allow_is_200_with_identity_headers_and_headers_to_remove(
    ext_authz: RunningProxy, session, issuer: TokenIssuer, grpc_request: bool
):
    issued = issuer.mint("access", "alice", ttl=300, roles=["user", "ops"], scopes=["read"])
    headers = {
        **(GRPC if grpc_request else {}),
        **dict(bearer(issued.token)),
        "x-auth-permissions": "all",
        "x_auth_roles": "admin",
        "X-Auth-Extra": "1",
        "x-custom": "kept",
    }
    answer = await ask(session, ext_authz, "/test.Access/Echo", headers=headers)
    assert answer.status == 200
    assert answer.body == b""
    assert answer.identity() == {
        "x-auth-subject": "alice",
        "x-auth-token-type": "access",
        "x-auth-roles": "user,ops",
        "x-auth-scopes": "read",
        "x-auth-jti": issued.jti,
        "x-auth-issuer": "test-issuer",
        "x-auth-claims": issued.token.split(".")[1],
    }
    remove = answer.to_remove
    assert len(remove) == len(set(remove))
    assert {"x-auth-permissions", "x_auth_roles", "x-auth-extra", "authorization"} <= set(remove)
    assert "x-custom" not in remove
    assert not set(remove) & set(answer.identity()), "a header both set and removed"


async def test_spoofed_identity_headers_are_replaced_and_never_both_set_and_removed(
    ext_authz: RunningProxy, session, issuer: TokenIssuer
):
    headers = {
        **dict(bearer(minted(issuer, subject="alice"))),
        "x-auth-subject": "mallory",
        "x-auth-token-type": "refresh",
        "x-auth-roles": "admin",
    }
    answer = await ask(session, ext_authz, "/test.Access/Echo", headers=headers)
    assert answer.status == 200
    assert answer.headers.getall("x-auth-subject") == ["alice"]
    assert answer.headers.getall("x-auth-token-type") == ["access"]
    assert "x-auth-roles" not in answer.headers
    assert "x-auth-roles" in answer.to_remove
    assert "x-auth-subject" not in answer.to_remove
    assert "x-auth-token-type" not in answer.to_remove


async def test_forward_token_rule_keeps_authorization(
    ext_authz: RunningProxy, session, issuer: TokenIssuer
):
    headers = {**GRPC, **dict(bearer(minted(issuer)))}
    forwarded = await ask(session, ext_authz, "/test.Forward/Echo", headers=headers)
    stripped = await ask(session, ext_authz, "/test.Access/Echo", headers=headers)
    assert forwarded.status == stripped.status == 200
    assert "authorization" not in forwarded.to_remove
    assert "authorization" in stripped.to_remove


async def test_public_request_gets_no_identity_and_spoofed_headers_removed(
    ext_authz: RunningProxy, session
):
    headers = {**GRPC, "x-auth-subject": "mallory", "x_auth_roles": "admin"}
    answer = await ask(session, ext_authz, "/test.Public/Echo", headers=headers)
    assert answer.status == 200
    assert answer.identity() == {}
    assert {"x-auth-subject", "x_auth_roles"} <= set(answer.to_remove)


@pytest.mark.parametrize("path", ["/test.Public/Echo", "/test.Access/Echo"])
async def test_every_allow_removes_foreign_identity_and_override_headers(
    ext_authz: RunningProxy, session, issuer: TokenIssuer, path: str
):
    headers = {
        **dict(bearer(minted(issuer))),
        "X-Forwarded-User": "root",
        "remote-user": "root",
        "x-pomerium-claim-email": "root@example.com",
        "x_remote_user": "root",
        "x-forwarded-for": "10.0.0.1",
    }
    answer = await ask(session, ext_authz, path, headers=headers)
    assert answer.status == 200
    remove = set(answer.to_remove)
    # Every exact default name and override header, whether Envoy forwarded it or not.
    assert DEFAULT_STRIP.names <= remove
    assert {"x-http-method-override", "x-original-url"} <= remove
    assert {"x-pomerium-claim-email", "x_remote_user"} <= remove  # seen: prefix, underscore
    assert "x-forwarded-for" not in remove
    assert not remove & set(answer.identity())


async def test_strip_headers_in_the_policy_add_and_keep_names(
    tmp_path: Path, keys: Keys, session, issuer: TokenIssuer
):
    policy = TEST_POLICY + "strip_headers: {add: [x-tenant], keep: [x-forwarded-email]}\n"
    async with running_ext_authz(tmp_path, keys, policy=policy) as running:
        answer = await ask(session, running, "/test.Public/Echo")
    assert answer.status == 200
    assert {"x-tenant", "x-forwarded-user"} <= set(answer.to_remove)
    assert "x-forwarded-email" not in answer.to_remove


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("X-HTTP-Method-Override", "DELETE"),
        ("X-Method-Override", "DELETE"),
        ("X-Original-Method", "DELETE"),
        ("X-Original-URL", "/api/admin/users"),
        ("X-Rewrite-URL", "/api/admin/users"),
    ],
)
async def test_override_header_naming_another_method_or_url_is_refused(
    routes: RunningProxy, session, header: str, value: str
):
    path = "/api/public/docs"  # `GET /api/public/**` is public; DELETE there is denied
    plain = await ask(session, routes, path, method="GET")
    assert plain.status == 200
    refused = await ask(session, routes, path, method="GET", headers={header: value})
    assert (refused.status, refused.json["reason"]) == (400, "REQUEST_MALFORMED")
    assert header.lower() in refused.json["message"]
    own = "GET" if "Method" in header else path
    same = await ask(session, routes, path, method="GET", headers={header: own})
    assert same.status == 200
    assert header.lower() in same.to_remove


# --- what is judged ----------------------------------------------------------------------


async def test_method_and_path_are_taken_from_the_request_line(
    routes: RunningProxy, session, issuer: TokenIssuer
):
    user = dict(bearer(minted(issuer)))
    refresh = dict(bearer(minted(issuer, level="refresh")))
    got = {}
    for method, path, headers in (
        ("GET", "/api/messages/room1", user),
        ("POST", "/api/messages/room1", user),
        ("DELETE", "/api/messages/room1", user),
        ("POST", "/api/auth/refresh", refresh),
        ("GET", "/api/auth/refresh", refresh),
        ("PUT", "/api/auth/refresh", refresh),
        ("GET", "/api/public/docs", None),
        ("POST", "/api/public/docs", None),
    ):
        answer = await ask(session, routes, path, method=method, headers=headers)
        got[method, path] = (answer.status, answer.json["reason"] if answer.status != 200 else "")
    assert got == {
        ("GET", "/api/messages/room1"): (200, ""),
        ("POST", "/api/messages/room1"): (403, "METHOD_DENIED"),
        ("DELETE", "/api/messages/room1"): (403, "METHOD_DENIED"),
        ("POST", "/api/auth/refresh"): (200, ""),
        ("GET", "/api/auth/refresh"): (403, "METHOD_DENIED"),
        ("PUT", "/api/auth/refresh"): (403, "METHOD_DENIED"),
        ("GET", "/api/public/docs"): (200, ""),
        ("POST", "/api/public/docs"): (403, "METHOD_DENIED"),
    }


async def test_refresh_route_sets_the_refresh_identity(
    routes: RunningProxy, session, issuer: TokenIssuer
):
    answer = await ask(
        session,
        routes,
        "/api/auth/refresh",
        headers=dict(bearer(minted(issuer, level="refresh", subject="bob"))),
    )
    assert answer.status == 200
    assert answer.headers["x-auth-subject"] == "bob"
    assert answer.headers["x-auth-token-type"] == "refresh"


async def test_query_and_escapes_do_not_change_which_rule_applies(
    routes: RunningProxy, session, issuer: TokenIssuer
):
    user = dict(bearer(minted(issuer, roles=["user"])))
    got = {}
    for path in (
        "/api/messages/room1?x=1",
        "/api/messages/r%6Fom1/",
        "/api/%61dmin/users",
        "/test.Admin/Ec%68o",
        "/test.Admin/Echo?admin=true",
        "/api/public/%2e%2e/admin/users",
    ):
        answer = await ask(session, routes, path, method="GET", headers=user)
        got[path] = (answer.status, answer.json["reason"] if answer.status != 200 else "")
    assert got == {
        "/api/messages/room1?x=1": (200, ""),
        "/api/messages/r%6Fom1/": (200, ""),
        "/api/%61dmin/users": (403, "INSUFFICIENT_ROLE"),
        "/test.Admin/Ec%68o": (403, "INSUFFICIENT_ROLE"),
        "/test.Admin/Echo?admin=true": (403, "INSUFFICIENT_ROLE"),
        "/api/public/%2e%2e/admin/users": (400, "REQUEST_MALFORMED"),
    }


async def test_path_prefix_is_required_and_stripped(
    prefixed: RunningProxy, session, issuer: TokenIssuer
):
    assert prefixed.http_url.endswith("/check")
    headers = dict(bearer(minted(issuer)))
    base = base_url(prefixed)
    got = {}
    for path in (
        "/check/test.Access/Echo",
        "/check/test.Access/Echo?x=1",
        "/other/test.Access/Echo",
        "/checkx/test.Access/Echo",
        "/check",
        "/check?/test.Access/Echo",
        "/test.Access/Echo",
        "/CHECK/test.Access/Echo",
    ):
        url = URL(base + path, encoded=True)
        async with session.post(url, headers=headers) as resp:
            body = await resp.read()
            reason = "" if resp.status == 200 else json.loads(body)["reason"]
            got[path] = (resp.status, reason)
    malformed = (400, "REQUEST_MALFORMED")
    assert got == {
        "/check/test.Access/Echo": (200, ""),
        "/check/test.Access/Echo?x=1": (200, ""),
        "/other/test.Access/Echo": malformed,
        "/checkx/test.Access/Echo": malformed,
        "/check": malformed,
        "/check?/test.Access/Echo": malformed,
        "/test.Access/Echo": malformed,
        "/CHECK/test.Access/Echo": malformed,
    }
    # A gRPC request outside the prefix is malformed too (not judged as a method path).
    answer = await ask(session, prefixed, "x/test.Access/Echo", headers={**GRPC, **headers})
    assert (answer.status, answer.headers["grpc-status"]) == (400, "3")
    assert answer.body.decode().startswith("REQUEST_MALFORMED: ")
    assert "/check/" in answer.body.decode()


async def test_path_prefix_does_not_hide_the_rule_of_the_stripped_path(
    prefixed: RunningProxy, session, issuer: TokenIssuer
):
    user = dict(bearer(minted(issuer, roles=["user"])))
    admin_path = await ask(session, prefixed, "/test.Admin/Echo", headers={**GRPC, **user})
    denied = await ask(session, prefixed, "/test.Denied/Echo", headers=user)
    assert (admin_path.status, admin_path.headers["grpc-status"]) == (403, "7")
    assert (denied.status, denied.json["reason"]) == (403, "METHOD_DENIED")


# --- deny --------------------------------------------------------------------------------


async def test_deny_bodies_are_json_with_reason_and_challenges(
    ext_authz: RunningProxy, session, issuer: TokenIssuer
):
    user = dict(bearer(minted(issuer, roles=["user"])))
    missing = await ask(session, ext_authz, "/test.Access/Echo", method="GET")
    invalid = await ask(
        session, ext_authz, "/test.Access/Echo", method="GET", headers=dict(bearer("a.b"))
    )
    role = await ask(session, ext_authz, "/test.Admin/Echo", method="GET", headers=user)
    denied = await ask(session, ext_authz, "/test.Denied/Echo", method="GET", headers=user)
    malformed = await ask(session, ext_authz, "/api/a/../b", method="GET", headers=user)

    assert missing.status == 401
    assert missing.json == {
        "error": "unauthenticated",
        "reason": "TOKEN_MISSING",
        "message": "no authorization header with a bearer token",
    }
    assert missing.headers.getall("www-authenticate") == ["Bearer"]

    assert invalid.status == 401
    assert invalid.json["reason"] == "TOKEN_MALFORMED"
    assert invalid.headers["www-authenticate"] == (
        'Bearer error="invalid_token", error_description="'
        + invalid.json["message"].replace('"', "?")
        + '"'
    )

    assert role.status == 403
    assert role.json == {
        "error": "permission_denied",
        "reason": "INSUFFICIENT_ROLE",
        "message": "this method needs one of the roles admin",
    }
    assert role.headers["www-authenticate"] == (
        'Bearer error="insufficient_scope",'
        ' error_description="this method needs one of the roles admin"'
    )

    assert denied.status == 403
    assert denied.json["reason"] == "METHOD_DENIED"
    assert "www-authenticate" not in denied.headers

    assert malformed.status == 400
    assert malformed.json["reason"] == "REQUEST_MALFORMED"
    assert malformed.json["error"] == "invalid_argument"
    assert "www-authenticate" not in malformed.headers

    for answer in (missing, invalid, role, denied, malformed):
        assert "grpc-status" not in answer.headers
        assert TO_REMOVE not in answer.headers
        assert answer.identity() == {}


async def test_grpc_deny_carries_grpc_status_message_and_details(
    ext_authz: RunningProxy, session, issuer: TokenIssuer
):
    missing = await ask(session, ext_authz, "/test.Access/Echo", headers=GRPC)
    role = await ask(
        session,
        ext_authz,
        "/test.Admin/Echo",
        headers={"content-type": "application/grpc+proto", **dict(bearer(minted(issuer)))},
    )
    for answer, status, code, reason in (
        (missing, 401, "16", "TOKEN_MISSING"),
        (role, 403, "7", "INSUFFICIENT_ROLE"),
    ):
        assert answer.status == status
        assert answer.headers["grpc-status"] == code
        message = answer.body.decode()
        assert message.startswith(f"{reason}: ")
        assert unquote(answer.headers["grpc-message"]) == message
        details, info = status_details(answer.headers["grpc-status-details-bin"])
        assert str(details.code) == code
        assert details.message == message
        assert (info.reason, info.domain) == (reason, "authproxy")
        assert answer.headers.get("content-type") != "application/json"
    assert missing.headers["www-authenticate"] == "Bearer"


async def test_token_larger_than_max_token_bytes_is_token_too_large_from_the_pipeline(
    ext_authz: RunningProxy, session
):
    big = "a" * 9000  # over TEST_POLICY's default max_token_bytes (8192)
    answer = await ask(session, ext_authz, "/test.Access/Echo", headers=dict(bearer(big)))
    assert answer.status == 401
    assert answer.json["reason"] == "TOKEN_TOO_LARGE"
    assert answer.headers["www-authenticate"].startswith('Bearer error="invalid_token"')


async def test_token_up_to_the_highest_max_token_bytes_reaches_the_pipeline(
    tmp_path: Path, keys: Keys, session
):
    policy = TEST_POLICY.replace("leeway: 5s\n", "leeway: 5s\nmax_token_bytes: 65536\n")
    async with running_ext_authz(tmp_path, keys, policy=policy) as running:
        at_limit = await ask(
            session, running, "/test.Access/Echo", headers=dict(bearer("a" * 65536))
        )
        over = await ask(session, running, "/test.Access/Echo", headers=dict(bearer("a" * 65560)))
    # Judged by the pipeline (a 401 with a reason), not refused by the HTTP parser (400).
    assert (at_limit.status, at_limit.json["reason"]) == (401, "TOKEN_MALFORMED")
    assert (over.status, over.json["reason"]) == (401, "TOKEN_TOO_LARGE")


async def test_two_authorization_headers_on_the_wire_are_denied(
    ext_authz: RunningProxy, issuer: TokenIssuer
):
    alice, bob = minted(issuer, subject="alice"), minted(issuer, subject="bob")
    port = ext_authz.proxy.check_http.port
    for first, second in (("Authorization", "Authorization"), ("authorization", "AUTHORIZATION")):
        request = (
            "GET /test.Access/Echo HTTP/1.1\r\nHost: authz\r\n"
            f"{first}: Bearer {alice}\r\n{second}: Bearer {bob}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        status, head, body = await raw_http(port, request)
        assert status == 401, (first, second)
        assert json.loads(body)["reason"] == "TOKEN_AMBIGUOUS"
        assert header_values(head, "x-auth-subject") == []
    # One header holding both (what a proxy that merges repeated headers sends).
    request = (
        "GET /test.Access/Echo HTTP/1.1\r\nHost: authz\r\n"
        f"Authorization: Bearer {alice},Bearer {bob}\r\nConnection: close\r\n\r\n"
    ).encode()
    status, head, _ = await raw_http(port, request)
    assert status == 401
    assert header_values(head, "x-auth-subject") == []


# --- the server --------------------------------------------------------------------------


async def test_server_header_names_no_library(
    ext_authz: RunningProxy, session, issuer: TokenIssuer
):
    answers = [
        await ask(session, ext_authz, "/test.Access/Echo", headers=dict(bearer(minted(issuer)))),
        await ask(session, ext_authz, "/test.Access/Echo"),
        await ask(session, ext_authz, "/test.Admin/Echo", headers=dict(bearer(minted(issuer)))),
        await ask(session, ext_authz, "/api/a/../b"),
    ]
    assert [a.status for a in answers] == [200, 401, 403, 400]
    for answer in answers:
        assert answer.headers.getall("server") == ["authproxy"]


@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [
        (b"NOT A REQUEST\r\n\r\n", 400),
        (
            b"GET /test.Access/Echo HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
            431,
        ),
        (b"GET /" + b"a" * 17_000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    ],
    ids=["garbage", "header-too-large", "request-line-too-long"],
)
async def test_requests_the_parser_refuses_get_a_json_answer_without_library_versions(
    ext_authz: RunningProxy, request_bytes: bytes, expected: int
):
    status, head, body = await raw_http(ext_authz.proxy.check_http.port, request_bytes)
    assert status == expected
    assert "aiohttp" not in head.decode("latin-1").lower()
    assert "python" not in head.decode("latin-1").lower()
    assert b"content-type: application/json" in head.lower()
    assert header_values(head, "server") == ["authproxy"]
    assert header_values(head, "connection") == ["close"]
    answer = json.loads(body)
    assert answer["reason"] == "REQUEST_MALFORMED"
    assert b"NOT A REQUEST" not in body and b"aaaa" not in body  # the input is not echoed


class _BrokenVerifier:
    """A verifier that fails unexpectedly (fault injection into the real pipeline)."""

    def verify(self, *args, **kwargs):
        raise RuntimeError("verifier exploded")


async def test_internal_error_answers_500_not_an_allow(
    ext_authz: RunningProxy, session, issuer: TokenIssuer
):
    front = ext_authz.proxy.check_http
    before = front.errors_total
    ext_authz.proxy.authorizer.verifier = _BrokenVerifier()
    answer = await ask(
        session,
        ext_authz,
        "/test.Access/Echo",
        headers={**GRPC, **dict(bearer(minted(issuer))), "x-auth-subject": "mallory"},
    )
    assert answer.status == 500
    assert answer.identity() == {}
    assert TO_REMOVE not in answer.headers
    assert b"verifier exploded" not in answer.body
    assert answer.headers.getall("server") == ["authproxy"]
    assert front.errors_total == before + 1
    public = await ask(session, ext_authz, "/test.Public/Echo")
    assert public.status == 200
    assert front.errors_total == before + 1


async def test_grpc_and_http_front_ends_share_one_decision(
    ext_authz: RunningProxy, session, issuer: TokenIssuer
):
    """The HTTP answer's identity equals what the gRPC Check sets for the same token."""
    token = minted(issuer, roles=["user"], scopes=["read"])
    over_http = await ask(session, ext_authz, "/test.Access/Echo", headers=dict(bearer(token)))
    over_grpc = await check_path(ext_authz, "/test.Access/Echo", token=token, grpc=False)
    assert over_http.status == 200
    assert over_http.identity() == set_headers(over_grpc)
    assert sorted(over_http.to_remove) == sorted(over_grpc.ok_response.headers_to_remove)
    claims = json.loads(base64.urlsafe_b64decode(over_http.headers["x-auth-claims"] + "=="))
    assert claims["sub"] == "alice"
