"""The `http:` section of a policy, and `Authorizer.decide_http` choosing between
`methods:`, `http:` routes and the default for requests seen through Envoy."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from authproxy.decide.pipeline import Authorizer
from authproxy.decide.reasons import Reason
from authproxy.keys.issuer import TokenIssuer
from authproxy.keys.keyset import KeySet, load_jwks_file
from authproxy.keys.verify import TokenVerifier
from authproxy.policy.loader import PolicyError, load_policy, parse_policy
from authproxy.policy.model import Policy
from tests.support.keys import Keys
from tests.support.policies import TEST_POLICY
from tests.support.tokens import bearer, minted

FILE = "http-policy.yaml"
#: Three valid lines; extra lines of a case start at line 4.
BASE = "version: 1\ntokens:\n  access: {type: access, audience: api}\n"


def errors(text: str, file: str = FILE) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, file)
    return [str(e) for e in info.value.errors]


# --- parsing --------------------------------------------------------------------------------

ROUTES = """\
version: 1
default: deny
forward_token: true
tokens:
  access: {type: access, audience: api}
  2fa:    {type: 2fa_pending, audience: 2fa}
methods:
  /a.B/*: public
http:
  GET /api/messages/{room}: access
  "* /api/**": {level: access, roles: [admin, ops], permissions: [p1, p2], scopes: [s]}
  POST /api/messages/{room}: {level: access, forward_token: false}
  GET /health: public
  GET /login/2fa: 2fa
  DELETE /**: deny
  M-SEARCH /: public
"""


def test_http_rules_get_levels_and_requirements_like_methods() -> None:
    p = parse_policy(ROUTES, FILE)
    get = p.http.match("GET", ("api", "messages", "general"))
    assert get is not None
    assert (get.pattern, get.level, get.line, get.forward_token) == (
        "GET /api/messages/{room}",
        "access",
        10,
        True,  # the top-level forward_token applies
    )
    assert (get.roles, get.permissions, get.scopes) == (frozenset(),) * 3
    anything = p.http.match("PUT", ("api", "x"))
    assert anything is not None
    assert (anything.pattern, anything.level, anything.line) == ("* /api/**", "access", 11)
    assert anything.roles == frozenset({"admin", "ops"})
    assert anything.permissions == frozenset({"p1", "p2"})
    assert anything.scopes == frozenset({"s"})
    post = p.http.match("POST", ("api", "messages", "general"))
    assert post is not None
    assert (post.pattern, post.forward_token, post.line) == ("POST /api/messages/{room}", False, 12)


@pytest.mark.parametrize(
    ("method", "segments", "pattern", "level"),
    [
        ("GET", ("health",), "GET /health", "public"),
        ("GET", ("login", "2fa"), "GET /login/2fa", "2fa"),
        ("DELETE", ("x", "y"), "DELETE /**", "deny"),
        ("DELETE", ("api", "x"), "* /api/**", "access"),  # more specific path wins
        ("M-SEARCH", (), "M-SEARCH /", "public"),
    ],
)
def test_rule_pattern_is_the_route_key(
    method: str, segments: tuple[str, ...], pattern: str, level: str
) -> None:
    rule = parse_policy(ROUTES, FILE).http.match(method, segments)
    assert rule is not None
    assert (rule.pattern, rule.level) == (pattern, level)


def test_unmatched_http_request_has_no_route() -> None:
    p = parse_policy(ROUTES, FILE)
    assert p.http.match("GET", ("nothing",)) is None
    assert p.http.match("GET", ()) is None


def test_rule_count_includes_http_routes() -> None:
    p = parse_policy(ROUTES, FILE)
    assert len(p.http) == 7
    assert p.rule_count == 1 + 7
    only_http = parse_policy(BASE + "http:\n  GET /a: public\n  '* /a': access\n", FILE)
    assert (len(only_http.http), only_http.rule_count) == (2, 2)


def test_no_http_section_means_no_routes() -> None:
    p = parse_policy(BASE + "methods:\n  /a.B/C: public\n", FILE)
    assert len(p.http) == 0
    assert p.http.match("GET", ("a.B", "C")) is None
    assert p.rule_count == 1


def test_routes_differing_only_in_method_are_not_duplicates() -> None:
    text = BASE + "http:\n  GET /a/{x}: public\n  '* /a/*': access\n  POST /a/{y}: deny\n"
    p = parse_policy(text, FILE)
    assert [p.http.match(m, ("a", "b")).level for m in ("GET", "PUT", "POST")] == [
        "public",
        "access",
        "deny",
    ]


def test_block_style_http_rule() -> None:
    text = BASE + "http:\n  GET /a:\n    level: access\n    roles: [admin]\n"
    rule = parse_policy(text, FILE).http.match("GET", ("a",))
    assert rule is not None
    assert (rule.level, rule.roles, rule.line) == ("access", frozenset({"admin"}), 5)


# --- validation errors ----------------------------------------------------------------------

HTTP_CASES = [
    ("lowercase-method", "  get /a: public\n", 5, "malformed http route 'get /a': method 'get'"),
    ("no-path", "  GET: public\n", 5, "malformed http route 'GET': expected 'METHOD /path'"),
    ("relative-path", "  GET a/b: public\n", 5, "must start with '/'"),
    ("rest-not-last", "  GET /a/**/b: public\n", 5, "'**' may only be the last segment"),
    ("trailing-slash", "  GET /a/: public\n", 5, "empty path segment"),
    ("dot-segment", "  GET /a/../b: public\n", 5, "dot segment '..'"),
    ("partial-wildcard", "  GET /api/foo*: public\n", 5, "segment 'foo*'"),
    ("percent", "  GET /a%2Fb: public\n", 5, "segment 'a%2Fb'"),
    ("non-string-key", "  42: public\n", 5, "malformed http route 42"),
    (
        "param-and-star",
        "  GET /a/{x}: public\n  GET /a/*: access\n",
        6,
        "http route 'GET /a/*' matches the same requests as the route on line 5",
    ),
    (
        "two-param-names",
        "  GET /x: deny\n  '* /a/{x}/b': public\n  '* /a/{y}/b': access\n",
        7,
        "http route '* /a/{y}/b' matches the same requests as the route on line 6",
    ),
    (
        "same-key",
        "  GET /a: public\n  GET /a: access\n",
        6,
        "duplicate key 'GET /a' (first defined on line 5)",
    ),
    ("unknown-level", "  GET /a: acess\n", 5, "unknown level 'acess' for GET /a"),
    ("unknown-level-map", "  GET /a: {level: acess}\n", 5, "unknown level 'acess' for GET /a"),
    (
        "level-not-in-tokens",
        "  GET /a: refresh\n",
        5,
        "GET /a uses level 'refresh', but 'tokens' does not define 'refresh'",
    ),
    (
        "map-level-not-in-tokens",
        "  GET /a: {level: 2fa, roles: [x]}\n",
        5,
        "'tokens' does not define '2fa'",
    ),
    ("rule-without-level", "  GET /a: {roles: [x]}\n", 5, "rule GET /a has no 'level'"),
    ("unknown-rule-key", "  GET /a: {level: access, role: [x]}\n", 5, "'role'"),
    ("roles-on-public", "  GET /a: {level: public, roles: [x]}\n", 5, "roles/permissions/scopes"),
    ("rule-not-level", "  GET /a: [access]\n", 5, "must be a level name or a mapping"),
    (
        "forward-not-bool",
        "  GET /a: {level: access, forward_token: yes please}\n",
        5,
        "'forward_token' must be true or false",
    ),
]


@pytest.mark.parametrize(
    ("entries", "line", "words"), [c[1:] for c in HTTP_CASES], ids=[c[0] for c in HTTP_CASES]
)
def test_http_error_names_file_and_line(entries: str, line: int, words: str) -> None:
    found = errors(BASE + "http:\n" + entries)
    assert any(e.startswith(f"{FILE}:{line}: ") and words in e for e in found), found


@pytest.mark.parametrize(
    "section", ["http: [GET /a]", "http: public", "http: 1", "http: ''"], ids=str
)
def test_http_must_be_a_mapping(section: str) -> None:
    found = errors(BASE + section + "\n")
    assert found == [f"{FILE}:4: 'http' must map 'METHOD /path' keys to levels"]


def test_empty_http_section_is_an_error_like_empty_methods() -> None:
    assert errors(BASE + "http:\n") == [f"{FILE}:4: 'http' is empty"]


def test_methods_and_http_errors_are_reported_together() -> None:
    text = (
        BASE  # 1-3
        + "methods:\n"  # 4
        + "  /a.B/C: acess\n"  # 5
        + "  nope: public\n"  # 6
        + "  /a.B/D: public\n"  # 7
        + "http:\n"  # 8
        + "  get /a: public\n"  # 9
        + "  GET /b: refresh\n"  # 10
        + "  GET /c/{x}: public\n"  # 11
        + "  GET /c/*: public\n"  # 12
        + "  GET /d: public\n"  # 13
    )
    with pytest.raises(PolicyError) as info:
        parse_policy(text, FILE)
    assert sorted(e.line for e in info.value.errors) == [5, 6, 9, 10, 12]
    assert all(e.file == FILE for e in info.value.errors)
    assert len(str(info.value).splitlines()) == 5
    assert str(info.value).splitlines()[-1] == (
        f"{FILE}:12: http route 'GET /c/*' matches the same requests as the route on line 11"
    )


def test_valid_methods_with_bad_http_yield_no_policy(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(TEST_POLICY + "http:\n  GET /ok: public\n  GET /bad/: public\n")
    result = None
    with pytest.raises(PolicyError) as info:
        result = load_policy(path)
    assert result is None
    assert [e.line for e in info.value.errors] == [len(TEST_POLICY.splitlines()) + 3]


def test_bad_methods_with_valid_http_yield_no_policy() -> None:
    result = None
    with pytest.raises(PolicyError) as info:
        result = parse_policy(BASE + "methods:\n  /a.B/C: acess\nhttp:\n  GET /a: public\n", FILE)
    assert result is None
    assert [e.line for e in info.value.errors] == [5]


# --- decide_http: which rule judges a request -----------------------------------------------

#: TEST_POLICY (default: access) plus an exact method and http routes. Some routes would open
#: listed methods if they were consulted for them: they must not be.
HTTP_POLICY = (
    TEST_POLICY
    + """\
  /test.Exact/Get: deny
http:
  GET /api/messages/{room}: access
  GET /api/messages/general: public
  "* /api/admin/**": {level: access, roles: [admin]}
  POST /api/**: {level: access, scopes: [write]}
  GET /health: public
  "* /test.Admin/*": public
  "* /test.Denied/**": public
  "* /test.Exact/Get": public
  "* /test.Other/*": public
  DELETE /**: deny
"""
)


@pytest.fixture(scope="module")
def policy() -> Policy:
    return parse_policy(HTTP_POLICY, "http-policy.yaml")


@pytest.fixture
def auth(policy: Policy, keys: Keys) -> Authorizer:
    return Authorizer(policy, TokenVerifier(KeySet(load_jwks_file(str(keys.jwks)))))


def test_http_policy_parses(policy: Policy) -> None:
    assert len(policy.http) == 10
    assert policy.rule_count == 7 + 1 + 10


async def test_grpc_request_is_judged_by_methods(auth: Authorizer, issuer: TokenIssuer) -> None:
    path = "/test.Admin/Echo"
    plain = await auth.decide_http("POST", path, bearer(minted(issuer, roles=["user"])), grpc=True)
    assert (plain.allowed, plain.reason, plain.method) == (
        False,
        Reason.INSUFFICIENT_ROLE,
        "/test.Admin/Echo",
    )
    assert plain.rule.pattern == "/test.Admin/*"
    admin = await auth.decide_http("POST", path, bearer(minted(issuer, roles=["admin"])), grpc=True)
    assert (admin.allowed, admin.method, admin.rule.pattern) == (
        True,
        "/test.Admin/Echo",
        "/test.Admin/*",
    )
    assert admin.identity is not None and admin.identity.subject == "alice"


@pytest.mark.parametrize(
    "path",
    [
        "/test.Admin/Echo?x=1",
        "/test.Public/Echo?x=/test.Admin/Echo",
        "/test.Public/Echo#/a",
        "/test.Public/Echo?",
    ],
)
async def test_grpc_request_with_a_query_or_fragment_is_method_malformed_as_in_the_sidecar(
    auth: Authorizer, issuer: TokenIssuer, path: str
) -> None:
    decision = await auth.decide_http(
        "POST", path, bearer(minted(issuer, roles=["admin"])), grpc=True
    )
    assert (decision.allowed, decision.reason, decision.method) == (
        False,
        Reason.METHOD_MALFORMED,
        path,
    )
    # The same path as plain HTTP keeps its query handling: the method's rule, query removed.
    plain = await auth.decide_http(
        "POST", path, bearer(minted(issuer, roles=["admin"])), grpc=False
    )
    assert plain.allowed and plain.method == path.partition("?")[0].partition("#")[0]


async def test_grpc_request_ignores_http_routes(auth: Authorizer) -> None:
    # "* /test.Other/*" is public, but a gRPC call to an unlisted method gets the default.
    decision = await auth.decide_http("POST", "/test.Other/Echo", [], grpc=True)
    assert (decision.allowed, decision.reason) == (False, Reason.TOKEN_MISSING)
    assert (decision.rule.pattern, decision.method) == ("default", "/test.Other/Echo")


async def test_grpc_request_to_an_exact_method(auth: Authorizer, issuer: TokenIssuer) -> None:
    decision = await auth.decide_http("POST", "/test.Exact/Get", bearer(minted(issuer)), grpc=True)
    assert (decision.allowed, decision.reason) == (False, Reason.METHOD_DENIED)
    assert decision.rule.pattern == "/test.Exact/Get"


@pytest.mark.parametrize(
    "path",
    [
        "/api/messages/general",
        "/health",
        "/",
        "",
        "/test.Admin/Ec%68o",  # escapes are not decoded for gRPC
        "/test.Admin/Echo/",
        "/test.Admin/Echo/extra",
        "/test.Admin",
        "//test.Admin/Echo",
    ],
    ids=repr,
)
async def test_grpc_request_with_a_non_method_path_is_malformed(
    auth: Authorizer, issuer: TokenIssuer, path: str
) -> None:
    decision = await auth.decide_http(
        "POST", path, bearer(minted(issuer, roles=["admin"])), grpc=True
    )
    assert (decision.allowed, decision.reason) == (False, Reason.METHOD_MALFORMED)
    assert decision.status == grpc.StatusCode.PERMISSION_DENIED


ADMIN_PATHS = [
    "/test.Admin/Echo",
    "/test.Admin/Ec%68o",
    "/test%2EAdmin/Echo",
    "/%74est.Admin/Echo",
    "/test.Admin/Echo/",
    "/test.Admin/Echo?role=admin",
    "/test.Admin/Echo#frag",
]


@pytest.mark.parametrize("http_method", ["GET", "POST", "DELETE"])
@pytest.mark.parametrize("path", ADMIN_PATHS)
async def test_non_grpc_request_to_a_listed_method_is_judged_by_methods(
    auth: Authorizer, issuer: TokenIssuer, http_method: str, path: str
) -> None:
    # "* /test.Admin/*" (public) and "DELETE /**" (deny) must not decide a listed method.
    anonymous = await auth.decide_http(http_method, path, [], grpc=False)
    assert (anonymous.allowed, anonymous.reason) == (False, Reason.TOKEN_MISSING)
    assert anonymous.rule.pattern == "/test.Admin/*"
    user = await auth.decide_http(
        http_method, path, bearer(minted(issuer, roles=["user"])), grpc=False
    )
    assert (user.allowed, user.reason, user.rule.pattern) == (
        False,
        Reason.INSUFFICIENT_ROLE,
        "/test.Admin/*",
    )
    admin = await auth.decide_http(
        http_method, path, bearer(minted(issuer, roles=["admin"])), grpc=False
    )
    assert (admin.allowed, admin.rule.pattern) == (True, "/test.Admin/*")


@pytest.mark.parametrize(
    ("path", "pattern", "reason"),
    [
        ("/test.Exact/Get", "/test.Exact/Get", Reason.METHOD_DENIED),  # exact, not "* ..."
        ("/test.Exact/G%65t", "/test.Exact/Get", Reason.METHOD_DENIED),
        ("/test.Denied/Echo", "/test.Denied/*", Reason.METHOD_DENIED),  # not "* /test.Denied/**"
        ("/test.D%65nied/Echo/", "/test.Denied/*", Reason.METHOD_DENIED),
        ("/test.Access/Echo", "/test.Access/*", None),
    ],
)
async def test_listed_method_rules_win_over_http_routes(
    auth: Authorizer, issuer: TokenIssuer, path: str, pattern: str, reason: Reason | None
) -> None:
    decision = await auth.decide_http("GET", path, bearer(minted(issuer)), grpc=False)
    assert (decision.allowed, decision.reason, decision.rule.pattern) == (
        reason is None,
        reason,
        pattern,
    )


async def test_listed_method_decision_names_the_decoded_method(auth: Authorizer) -> None:
    decision = await auth.decide_http("GET", "/test.Admin/Ec%68o/", [], grpc=False)
    assert decision.method == "/test.Admin/Echo"


@pytest.mark.parametrize(
    ("http_method", "path", "allowed", "pattern"),
    [
        ("GET", "/test.Other/Echo", True, "* /test.Other/*"),  # unlisted: http route
        ("POST", "/test.Other/Ec%68o", True, "* /test.Other/*"),
        ("GET", "/test.Exact/Other", False, "default"),  # exact lists only Get
        ("GET", "/test.Unrouted/Echo", False, "default"),
        ("DELETE", "/test.Unrouted/Echo", False, "DELETE /**"),
    ],
)
async def test_non_grpc_request_to_an_unlisted_method_uses_http_then_default(
    auth: Authorizer, http_method: str, path: str, allowed: bool, pattern: str
) -> None:
    decision = await auth.decide_http(http_method, path, [], grpc=False)
    assert (decision.allowed, decision.rule.pattern) == (allowed, pattern)
    assert decision.method == f"{http_method} {path}"


@pytest.mark.parametrize(
    ("http_method", "path", "pattern", "level"),
    [
        ("GET", "/api/messages/general", "GET /api/messages/general", "public"),
        ("GET", "/api/messages/gen%65ral/", "GET /api/messages/general", "public"),
        ("GET", "/api/messages/random", "GET /api/messages/{room}", "access"),
        ("POST", "/api/messages/general", "POST /api/**", "access"),
        ("GET", "/api/admin/users", "* /api/admin/**", "access"),
        ("DELETE", "/api/admin", "* /api/admin/**", "access"),
        ("DELETE", "/api/messages/general", "DELETE /**", "deny"),
        ("GET", "/health", "GET /health", "public"),
        ("HEAD", "/health", "default", "access"),
        ("PUT", "/api/messages/x", "default", "access"),
        ("GET", "/", "default", "access"),
        ("GET", "/nothing/here", "default", "access"),
    ],
)
async def test_most_specific_http_route_else_default(
    auth: Authorizer, http_method: str, path: str, pattern: str, level: str
) -> None:
    decision = await auth.decide_http(http_method, path, [], grpc=False)
    assert (decision.rule.pattern, decision.level) == (pattern, level)
    assert decision.allowed is (level == "public")
    assert decision.method == f"{http_method} {path}"


async def test_http_route_roles_are_enforced(auth: Authorizer, issuer: TokenIssuer) -> None:
    path = "/api/admin/users"
    user = await auth.decide_http("GET", path, bearer(minted(issuer, roles=["user"])), grpc=False)
    assert (user.allowed, user.reason, user.status) == (
        False,
        Reason.INSUFFICIENT_ROLE,
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert user.rule.pattern == "* /api/admin/**"
    admin = await auth.decide_http("GET", path, bearer(minted(issuer, roles=["admin"])), grpc=False)
    assert (admin.allowed, admin.rule.pattern) == (True, "* /api/admin/**")
    assert admin.identity is not None and admin.identity.roles == ("admin",)


async def test_http_route_scopes_are_enforced(auth: Authorizer, issuer: TokenIssuer) -> None:
    path = "/api/messages/general"
    none = await auth.decide_http("POST", path, bearer(minted(issuer, scopes=["read"])), grpc=False)
    assert (none.allowed, none.reason) == (False, Reason.INSUFFICIENT_SCOPE)
    write = await auth.decide_http(
        "POST", path, bearer(minted(issuer, scopes=["write"])), grpc=False
    )
    assert (write.allowed, write.rule.pattern) == (True, "POST /api/**")


async def test_http_route_deny_and_missing_token(auth: Authorizer, issuer: TokenIssuer) -> None:
    denied = await auth.decide_http(
        "DELETE", "/x", bearer(minted(issuer, roles=["admin"])), grpc=False
    )
    assert (denied.allowed, denied.reason) == (False, Reason.METHOD_DENIED)
    missing = await auth.decide_http("GET", "/api/messages/random", [], grpc=False)
    assert (missing.allowed, missing.reason) == (False, Reason.TOKEN_MISSING)
    assert missing.status == grpc.StatusCode.UNAUTHENTICATED


async def test_unmatched_request_gets_the_default_rule(
    auth: Authorizer, issuer: TokenIssuer
) -> None:
    anonymous = await auth.decide_http("GET", "/nothing", [], grpc=False)
    assert (anonymous.allowed, anonymous.reason, anonymous.rule.pattern) == (
        False,
        Reason.TOKEN_MISSING,
        "default",
    )
    signed = await auth.decide_http("GET", "/nothing", bearer(minted(issuer)), grpc=False)
    assert (signed.allowed, signed.rule.pattern, signed.method) == (True, "default", "GET /nothing")


async def test_default_deny_for_unmatched_requests(keys: Keys) -> None:
    policy = parse_policy(HTTP_POLICY.replace("default: access", "default: deny"), FILE)
    auth = Authorizer(policy, TokenVerifier(KeySet(load_jwks_file(str(keys.jwks)))))
    decision = await auth.decide_http("GET", "/nothing", [], grpc=False)
    assert (decision.allowed, decision.reason, decision.rule.pattern) == (
        False,
        Reason.METHOD_DENIED,
        "default",
    )


@pytest.mark.parametrize(
    ("request_", "method"),
    [
        ("GET /api/messages/general?x=1", "GET /api/messages/general"),
        ("GET /api/messages/general#top", "GET /api/messages/general"),
        ("GET /api/messages/general?a=/b#c?d", "GET /api/messages/general"),
        ("GET /api/messages/general/", "GET /api/messages/general/"),
        ("PATCH /api/x", "PATCH /api/x"),
    ],
)
async def test_http_decision_method_is_method_and_path(
    auth: Authorizer, request_: str, method: str
) -> None:
    http_method, _, path = request_.partition(" ")
    decision = await auth.decide_http(http_method, path, [], grpc=False)
    assert decision.method == method


@pytest.mark.parametrize(
    "path",
    [
        "/api/../test.Public/Echo",
        "/test.Admin/%2e%2e/Echo",
        "/test.Admin%2FEcho",
        "/api/messages/general;x=1",
        "/api//messages",
        "/api/%zz",
        "/api/%ff",
        "/api/%00",
        "/api\\messages",
        "api/messages",
        "",
        "/" + "a" * 9000,
    ],
    ids=lambda v: repr(v) if len(v) < 40 else f"long-{len(v)}",
)
async def test_malformed_path_is_refused(auth: Authorizer, issuer: TokenIssuer, path: str) -> None:
    decision = await auth.decide_http(
        "GET", path, bearer(minted(issuer, roles=["admin"])), grpc=False
    )
    assert (decision.allowed, decision.reason) == (False, Reason.REQUEST_MALFORMED)
    assert decision.status == grpc.StatusCode.INVALID_ARGUMENT
    assert decision.method == f"GET {path}"
    assert decision.identity is None


async def test_malformed_query_does_not_matter(auth: Authorizer) -> None:
    decision = await auth.decide_http("GET", "/health?x=%zz;/../", [], grpc=False)
    assert (decision.allowed, decision.rule.pattern) == (True, "GET /health")


# --- what decide_http remembers ---------------------------------------------------------------


async def test_repeated_requests_get_the_same_decisions_as_the_first(
    auth: Authorizer, issuer: TokenIssuer
) -> None:
    """`decide_http` remembers which rule a (method, path) gets; the steps after that —
    token, requirements — still run for every request."""
    user, admin = bearer(minted(issuer, roles=["user"])), bearer(minted(issuer, roles=["admin"]))
    requests = [
        ("GET", "/api/admin/users", user),
        ("GET", "/api/admin/users", admin),
        ("GET", "/api/admin/users?x=1", []),
        ("GET", "/api/../admin", admin),
        ("GET", "/test.Exact/Get", admin),
        ("DELETE", "/api/messages/general", admin),
        ("GET", "/api/messages/general", []),
    ]
    first = [await auth.decide_http(m, p, h, grpc=False) for m, p, h in requests]
    again = [await auth.decide_http(m, p, h, grpc=False) for m, p, h in requests]
    assert first == again
    assert [(d.allowed, d.reason) for d in first] == [
        (False, Reason.INSUFFICIENT_ROLE),
        (True, None),
        (False, Reason.TOKEN_MISSING),
        (False, Reason.REQUEST_MALFORMED),
        (False, Reason.METHOD_DENIED),
        (False, Reason.METHOD_DENIED),
        (True, None),
    ]


async def test_a_new_policy_is_not_answered_from_the_old_ones_routes(
    auth: Authorizer, policy: Policy
) -> None:
    before = await auth.decide_http("GET", "/health", [], grpc=False)
    auth.policy = parse_policy(HTTP_POLICY.replace("GET /health: public", "GET /health: deny"))
    after = await auth.decide_http("GET", "/health", [], grpc=False)
    snapshot = await auth.decide_http("GET", "/health", [], grpc=False, policy=policy)
    assert (before.allowed, after.allowed, snapshot.allowed) == (True, False, True)
    assert after.reason == Reason.METHOD_DENIED


async def test_remembered_routes_are_bounded(auth: Authorizer) -> None:
    for i in range(5000):
        await auth.decide_http("GET", f"/api/messages/{i}", [], grpc=False)
    await auth.decide_http("GET", "/api/messages/" + "x" * 600, [], grpc=False)
    assert 0 < len(auth._routes.answers) <= 4096
    assert ("GET", "/api/messages/" + "x" * 600) not in auth._routes.answers
