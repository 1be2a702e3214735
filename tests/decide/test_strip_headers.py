"""`strip_headers:` and the default set of identity-looking headers of other auth proxies:
parsing and validation (`file:line: problem`), and what `relay_headers` removes.

Over the wire: `test_sidecar.py` (the backend never sees them), `test_ext_authz_grpc.py`
and `test_ext_authz_http.py` (`headers_to_remove`, override headers refused).
"""

from __future__ import annotations

import base64

import pytest

from authproxy.decide.auth_headers import relay_headers
from authproxy.decide.pipeline import Authorizer
from authproxy.keys.verify import TokenVerifier
from authproxy.policy.loader import PolicyError, parse_policy
from authproxy.policy.strip_headers import DEFAULT_IDENTITY, DEFAULT_STRIP, OVERRIDE_HEADERS
from tests.support.tokens import METHOD_FOR, POLICY_YAML, Clock, bearer, keyset, token

FILE = "strip.yaml"
#: Two valid lines; a case's own lines start at line 3.
BASE = "version: 1\ndefault: public\n"

#: Identity-looking headers a client may forge, as they might arrive (case, underscores).
FORGED = [
    ("x-forwarded-user", "root"),
    ("X-Forwarded-Email", "root@example.com"),
    ("x-forwarded-groups", "admins"),
    ("x-forwarded-preferred-username", "root"),
    ("x-forwarded-access-token", "ey..."),
    ("x-auth-request-user", "root"),  # oauth2-proxy: covered by x-auth-*
    ("remote-user", "root"),
    ("Remote-Groups", "admins"),
    ("x-remote-user", "root"),
    ("x-remote-group", "system:masters"),
    ("x-remote-extra-scopes", "all"),
    ("x-pomerium-claim-email", "root@example.com"),
    ("X-Pomerium-Jwt-Assertion", "ey..."),
    ("x-user", "root"),
    ("x-email", "root@example.com"),
    ("x-webauth-user", "admin"),
    ("x-goog-authenticated-user-email", "accounts.google.com:root@example.com"),
    ("x-amzn-oidc-identity", "root"),
    ("x-ms-client-principal-name", "root"),
    ("cf-access-authenticated-user-email", "root@example.com"),
    # Underscore spellings, which backends that fold `_` into `-` would read the same.
    ("x_forwarded_user", "root"),
    ("X_Remote_User", "root"),
    ("x_pomerium_claim_groups", "admins"),
    ("remote_user", "root"),
    # Method and URL overrides.
    ("x-http-method-override", "DELETE"),
    ("X-Method-Override", "DELETE"),
    ("x-original-url", "/admin"),
    ("x_rewrite_url", "/admin"),
]
KEPT = [
    ("x-request-id", "r1"),
    ("x-forwarded-for", "10.0.0.1"),
    ("x-forwarded-proto", "https"),
    ("x-user-agent-hint", "not an identity header"),
    ("x-users", "not one either"),
    ("remote-address", "kept"),
    ("x-original-forwarded-for", "kept"),
    ("trace-bin", b"\x00\x01"),
]


def errors(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(BASE + text, FILE)
    return [str(e) for e in info.value.errors]


def auth(text: str = POLICY_YAML) -> Authorizer:
    return Authorizer(parse_policy(text, "p.yaml"), TokenVerifier(keyset(), clock=Clock()))


# --- the policy file ---------------------------------------------------------------------


def test_without_strip_headers_the_default_set_applies() -> None:
    policy = parse_policy(BASE, FILE)
    assert policy.strip_headers == DEFAULT_STRIP
    for entry in DEFAULT_IDENTITY:
        name = entry.replace("*", "anything")
        assert policy.strip_headers.matches(name), entry
    assert policy.strip_headers.names >= OVERRIDE_HEADERS


def test_a_list_adds_names_and_prefixes_normalized() -> None:
    policy = parse_policy(BASE + "strip_headers: [X-Internal-User, x_legacy_auth-*]\n", FILE)
    strip = policy.strip_headers
    assert strip.matches("x-internal-user")
    assert strip.matches("x_internal_user")
    assert strip.matches("x-legacy-auth-name")
    assert not strip.matches("x-legacy-auth")
    assert strip.matches("x-forwarded-user")  # the defaults stay


def test_keep_removes_only_the_named_defaults() -> None:
    text = "strip_headers:\n  add: [x-internal-user]\n  keep: [X-Forwarded-Email, x-pomerium-*]\n"
    strip = parse_policy(BASE + text, FILE).strip_headers
    assert not strip.matches("x-forwarded-email")
    assert not strip.matches("x-pomerium-claim-email")
    assert strip.matches("x-forwarded-user")
    assert strip.matches("x-internal-user")
    assert strip.matches("x-http-method-override")


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("strip_headers: x-internal-user\n", 3, "must be a list of header names"),
        ("strip_headers: []\n", 3, "must be a list of header names"),
        ("strip_headers: {}\n", 3, "'strip_headers' is empty"),
        ("strip_headers: {add: x-a}\n", 3, "strip_headers.add must be a non-empty list"),
        ("strip_headers: {drop: [x-a]}\n", 3, "unknown key in strip_headers 'drop'"),
        ("strip_headers:\n  - x-a\n  - x a\n", 5, "'x a' is not a header name"),
        ("strip_headers:\n  - x-a\n  - 7\n", 5, "7 is not a header name"),
        ("strip_headers: ['*']\n", 3, "is not a header name"),
        ("strip_headers: [x-a*]\n", 3, "is not a header name"),
        ("strip_headers: [x-*-b]\n", 3, "is not a header name"),
        ("strip_headers:\n  - x-a\n  - X_A\n", 5, "'X_A' is listed twice (line 4)"),
        ("strip_headers: [x-auth-tenant]\n", 3, "would remove x-auth-* headers"),
        ("strip_headers: [x-*]\n", 3, "would remove x-auth-* headers"),
        ("strip_headers: [x-auth-legacy-*]\n", 3, "would remove x-auth-* headers"),
        ("strip_headers: [Authorization]\n", 3, "authorization is removed unless"),
        ("strip_headers: [content-type]\n", 3, "a header the transport needs"),
        ("strip_headers: [grpc-*]\n", 3, "a header the transport needs"),
        ("strip_headers: [x-forwarded-user]\n", 3, "removed by default already"),
        ("strip_headers: [x-pomerium-claim-x]\n", 3, "(default entry 'x-pomerium-*')"),
        ("strip_headers: [x-original-url]\n", 3, "override header: always removed"),
        ("strip_headers: {keep: [x-forwarded-for]}\n", 3, "is not in the default set"),
        ("strip_headers: {keep: [x-pomerium-claim-email]}\n", 3, "is not in the default set"),
        ("strip_headers: {keep: [x-auth-request-user]}\n", 3, "every incoming x-auth-*"),
        ("strip_headers: {keep: [x-auth-*]}\n", 3, "every incoming x-auth-*"),
        ("strip_headers: {keep: [authorization]}\n", 3, "removed unless the rule has forward"),
        ("strip_headers: {keep: [x-http-method-override]}\n", 3, "override headers are always"),
        ("strip_headers:\n  keep:\n    - x-user\n    - x-user\n", 6, "listed twice (line 5)"),
    ],
)
def test_strip_headers_errors_name_file_and_line(text: str, line: int, words: str) -> None:
    found = errors(text)
    assert any(e.startswith(f"{FILE}:{line}: ") and words in e for e in found), found


def test_every_strip_headers_problem_is_reported_and_no_policy_exists() -> None:
    text = (
        "strip_headers:\n"
        "  add: [x-ok, x-auth-a, content-type]\n"
        "  keep: [x-unknown, x-user]\n"
        "methods:\n"
        "  /a.B/C: nonsense\n"
    )
    found = errors(text)
    assert sorted(e.split(": ", 1)[0] for e in found) == [
        f"{FILE}:4",
        f"{FILE}:4",
        f"{FILE}:5",
        f"{FILE}:7",
    ]


# --- relay_headers ---------------------------------------------------------------------


def h2(pairs: list[tuple[str, str | bytes]]) -> list[tuple[bytes, bytes]]:
    """`pairs` as HTTP/2 header fields: names lower case (an upper-case name is a malformed
    request, refused before any decision: tests/security/test_http2_tricks.py), `-bin`
    values base64."""
    return [
        (k.lower().encode(), v.encode() if isinstance(v, str) else base64.b64encode(v))
        for k, v in pairs
    ]


def as_metadata(headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]


@pytest.mark.parametrize("level", ["public", "access"])
async def test_default_set_and_override_headers_never_reach_the_backend(level: str) -> None:
    headers = h2([*FORGED, *KEPT])
    if level != "public":
        headers = h2(bearer(token())) + headers
    decision = await auth().decide(METHOD_FOR[level], as_metadata(headers))
    assert decision.allowed, decision.message
    out = relay_headers(headers, decision)
    identity = h2(list(decision.identity.headers)) if decision.identity else []
    assert out == h2(KEPT) + identity


async def test_the_policy_strip_list_decides_what_is_removed() -> None:
    text = POLICY_YAML + "strip_headers:\n  add: [x-tenant, x-legacy-*]\n  keep: [x-email]\n"
    headers = h2(
        [
            ("x-tenant", "t1"),
            ("X_Legacy_User", "root"),
            ("x-email", "alice@example.com"),
            ("x-forwarded-user", "root"),
            *KEPT,
        ]
    )
    authorizer = auth(text)
    decision = await authorizer.decide(METHOD_FOR["public"], as_metadata(headers))
    out = relay_headers(headers, decision, authorizer.policy.strip_headers)
    assert out == h2([("x-email", "alice@example.com"), *KEPT])


# --- one rule for both front ends ---------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "forwards"),
    [(METHOD_FOR["public"], False), (METHOD_FOR["access"], False), ("/api.v1.User/Forward", True)],
)
async def test_the_sidecar_and_ext_authz_remove_the_same_client_headers(
    method: str, forwards: bool
) -> None:
    """The sidecar drops, and ext_authz tells Envoy to remove, exactly the same names of
    those a client sent (hop-by-hop fields aside, which Envoy handles itself), and both
    set the same identity headers: one strip rule and one inject rule
    (`decide/auth_headers.py`)."""
    from authproxy.ext_authz.answer import Allows, allow_for

    text = POLICY_YAML + "strip_headers:\n  add: [x-tenant, x-legacy-*]\n  keep: [x-email]\n"
    sent = [
        ("x-tenant", "t1"),
        ("x_legacy_user", "root"),
        ("x-email", "alice@example.com"),
        ("x_auth_subject", "root"),
        *FORGED,
        *KEPT,
    ]
    headers = h2(bearer(token())) + h2(sent)
    authorizer = auth(text)
    metadata = as_metadata(headers)
    decision = await authorizer.decide(method, metadata)
    assert decision.allowed, decision.message
    relayed = relay_headers(headers, decision, authorizer.policy.strip_headers)
    identity = {k for k, _ in decision.identity.headers} if decision.identity else set()
    kept_by_sidecar = {k.decode() for k, _ in relayed} - identity
    allow = allow_for(decision, tuple(metadata), authorizer.policy, Allows())
    removed = set(allow.remove)
    kept_by_envoy = {k for k, _ in metadata if k not in removed}
    assert kept_by_sidecar == kept_by_envoy
    assert ("authorization" in kept_by_envoy) == forwards
    assert [(k.encode(), v.encode()) for k, v in allow.headers] == relayed[
        len(relayed) - len(allow.headers) :
    ]
