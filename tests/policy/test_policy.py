"""Policy files: parsing, rule matching, and validation errors that name file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from authproxy.policy.loader import PolicyError, load_policy, parse_policy
from authproxy.policy.model import Policy
from authproxy.policy.values import parse_duration

REPO = Path(__file__).resolve().parents[2]
FILE = "bad-policy.yaml"

SPEC_EXAMPLE = """\
version: 1                 # required; the only version so far
default: access            # level (or rule) for methods no rule names; missing = deny
issuer: auth-service       # accepted `iss` (a string or a list); omit to not check iss
leeway: 30s                # clock skew allowed on exp/nbf/iat (0-5m; 30, 30s, 2m, 500ms)
max_token_bytes: 8192      # larger tokens are refused (TOKEN_TOO_LARGE); 256-65536
forward_token: false       # pass the client's authorization header to the backend
claim_headers:             # extra identity headers: header -> claim
  x-auth-tenant: tenant_id
tokens:                    # what each token level accepts
  2fa:     {type: 2fa_pending, audience: 2fa-verification}
  refresh: {type: refresh,     audience: token-refresh, keys: [refresh-hmac]}
  access:  {type: access,      audience: api-access}
methods:
  /api.v1.AuthService/SignUp: public
  /api.v1.AuthService/Verify2FA: 2fa
  /api.v1.AuthService/RefreshToken: refresh
  /api.v1.UserService/ListUsers: {level: access, roles: [admin]}
  /api.v1.DataService/*: access
  /admin.v1.Ops/Shutdown: deny
"""

#: Three valid lines; extra lines of a case start at line 4.
BASE = "version: 1\ntokens:\n  access: {type: access, audience: api}\n"


def errors(text: str | bytes, file: str = FILE) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, file)
    return [str(e) for e in info.value.errors]


def test_spec_example_parses() -> None:
    p = parse_policy(SPEC_EXAMPLE, "spec.yaml")
    assert isinstance(p, Policy)
    assert p.leeway == 30.0
    assert p.default.level == "access"
    assert {lvl: (s.type, s.audiences) for lvl, s in p.tokens.items()} == {
        "2fa": ("2fa_pending", frozenset({"2fa-verification"})),
        "refresh": ("refresh", frozenset({"token-refresh"})),
        "access": ("access", frozenset({"api-access"})),
    }
    assert all(s.issuers == frozenset({"auth-service"}) for s in p.tokens.values())
    admin = p.match("/api.v1.UserService/ListUsers")
    assert (admin.level, admin.roles, admin.line) == ("access", frozenset({"admin"}), 17)
    assert p.match("/api.v1.DataService/Anything").level == "access"
    assert p.match("/api.v1.AuthService/SignUp").level == "public"
    assert p.match("/api.v1.AuthService/Login").level == "access"  # the default
    assert p.match("/admin.v1.Ops/Shutdown").level == "deny"
    assert p.rule_count == 6
    assert p.max_token_bytes == 8192
    assert p.claim_headers == (("x-auth-tenant", "tenant_id"),)
    assert p.tokens["refresh"].key_ids == frozenset({"refresh-hmac"})
    assert p.tokens["access"].key_ids is None
    assert not p.default.forward_token


def test_repo_policy_parses() -> None:
    p = load_policy(REPO / "policy.yaml")
    assert p.source.endswith("policy.yaml")
    assert p.match("/api.v1.UserService/ListUsers").roles == frozenset({"admin"})
    assert p.tokens["refresh"].key_ids == frozenset({"refresh-hmac"})
    assert p.match("/grpc.health.v1.Health/Check").level == "public"


# --- matching -----------------------------------------------------------------------------

MATCHING = """\
version: 1
default: public
tokens:
  access: {type: access, audience: api}
methods:
  /pkg.Service/Get: deny
  /pkg.Service/*: access
  /pkg/*: deny
"""


@pytest.mark.parametrize(
    ("method", "level", "pattern"),
    [
        ("/pkg.Service/Get", "deny", "/pkg.Service/Get"),  # exact beats wildcard
        ("/pkg.Service/List", "access", "/pkg.Service/*"),  # wildcard beats default
        ("/pkg.Other/List", "public", "default"),
        ("/pkg.ServiceX/Get", "public", "default"),  # another service
        ("/pkg.Service.Sub/Get", "public", "default"),  # a longer service name
        ("/other.pkg.Service/Get", "public", "default"),
        ("/pkg.Service2/List", "public", "default"),
        ("/pkg/List", "deny", "/pkg/*"),  # service named "pkg"
        ("/pkg.Service/get", "access", "/pkg.Service/*"),  # case-sensitive exact
        ("/pkg.service/List", "public", "default"),  # case-sensitive service
        ("/PKG.Service/Get", "public", "default"),
    ],
)
def test_matching_precedence(method: str, level: str, pattern: str) -> None:
    rule = parse_policy(MATCHING, "m.yaml").match(method)
    assert (rule.level, rule.pattern) == (level, pattern)


def test_package_wildcard_does_not_cover_services_in_the_package() -> None:
    rule = parse_policy(MATCHING, "m.yaml").match("/pkg.Service/List")
    assert rule.pattern == "/pkg.Service/*"
    p = parse_policy("version: 1\ndefault: public\nmethods:\n  /pkg/*: deny\n", "m.yaml")
    assert p.match("/pkg.Service/List").level == "public"


def test_missing_default_means_deny() -> None:
    p = parse_policy("version: 1\nmethods:\n  /a.B/C: public\n", "m.yaml")
    assert p.default.level == "deny"
    assert p.match("/a.B/Other").level == "deny"
    assert p.match("/x.Y/Z").level == "deny"
    assert p.match("/a.B/C").level == "public"


# --- validation errors --------------------------------------------------------------------

CASES = [
    ("unknown-top-level", BASE + "colour: blue\n", 4, "unknown top-level key 'colour'"),
    ("unknown-rule-key", BASE + "methods:\n  /a.B/C: {level: access, role: [x]}\n", 5, "'role'"),
    (
        "unknown-token-key",
        "version: 1\ntokens:\n  access: {type: access, audience: api, audiences: x}\n",
        3,
        "'audiences'",
    ),
    ("unknown-token-level", BASE + "  admin: {type: a, audience: b}\n", 4, "'admin'"),
    ("unknown-level", BASE + "methods:\n  /a.B/C: acess\n", 5, "unknown level 'acess'"),
    ("unknown-level-map", BASE + "methods:\n  /a.B/C: {level: acess}\n", 5, "'acess'"),
    ("unknown-level-default", BASE + "default: acess\n", 4, "unknown level 'acess'"),
    ("rule-without-level", BASE + "methods:\n  /a.B/C: {roles: [x]}\n", 5, "no 'level'"),
    ("method-no-slash", BASE + "methods:\n  a.B/C: public\n", 5, "malformed"),
    ("method-missing", BASE + "methods:\n  /a.B/: public\n", 5, "malformed"),
    ("method-only-service", BASE + "methods:\n  /a.B: public\n", 5, "malformed"),
    ("method-three-parts", BASE + "methods:\n  /a/b/c: public\n", 5, "malformed"),
    ("method-space", BASE + "methods:\n  /a.B/Get Thing: public\n", 5, "malformed"),
    ("method-empty", BASE + 'methods:\n  "": public\n', 5, "malformed"),
    ("method-double-dot", BASE + "methods:\n  /a..B/C: public\n", 5, "malformed"),
    ("method-partial-star", BASE + "methods:\n  /a.B/Get*: public\n", 5, "malformed"),
    ("method-not-string", BASE + "methods:\n  42: public\n", 5, "malformed"),
    (
        "duplicate-method",
        BASE + "methods:\n  /a.B/C: deny\n  /a.B/D: public\n  /a.B/C: public\n",
        7,
        "duplicate key '/a.B/C' (first defined on line 5)",
    ),
    ("duplicate-top-level", "version: 1\ndefault: deny\ndefault: public\n", 3, "duplicate"),
    (
        "duplicate-in-token",
        "version: 1\ntokens:\n  access:\n    type: access\n    audience: api\n    type: x\n",
        6,
        "duplicate key 'type'",
    ),
    ("duplicate-token-level", BASE + "  access: {type: x, audience: y}\n", 4, "duplicate"),
    (
        "token-without-audience",
        "version: 1\ntokens:\n  access: {type: access}\n",
        3,
        "no 'audience'",
    ),
    ("token-without-type", "version: 1\ntokens:\n  access: {audience: a}\n", 3, "'type'"),
    ("level-not-in-tokens", BASE + "methods:\n  /a.B/C: refresh\n", 5, "'refresh'"),
    ("default-not-in-tokens", "version: 1\ndefault: access\n", 2, "does not define 'access'"),
    (
        "roles-on-public",
        BASE + "methods:\n  /a.B/C: {level: public, roles: [admin]}\n",
        5,
        "roles/permissions/scopes",
    ),
    (
        "scopes-on-deny",
        BASE + "methods:\n  /a.B/C: {level: deny, scopes: [read]}\n",
        5,
        "roles/permissions/scopes",
    ),
    ("roles-on-default", BASE + "default: {level: deny, permissions: [p]}\n", 4, "not 'deny'"),
    ("leeway-negative", "version: 1\nleeway: -5\n", 2, "'leeway' must be between 0 and 300"),
    ("leeway-too-big", "version: 1\nleeway: 6m\n", 2, "'leeway' must be between 0 and 300"),
    ("leeway-not-duration", "version: 1\nleeway: soon\n", 2, "must be a duration"),
    ("leeway-negative-unit", "version: 1\nleeway: -5s\n", 2, "must be a duration"),
    ("leeway-bool", "version: 1\nleeway: true\n", 2, "must be a duration"),
    ("version-2", "version: 2\ndefault: deny\n", 1, "unsupported version 2"),
    ("version-string", 'version: "1"\n', 1, "unsupported version"),
    ("version-bool", "version: true\n", 1, "unsupported version"),
    ("version-missing", "default: deny\nleeway: 5s\n", 1, "missing key 'version'"),
    ("claim-header-case", BASE + "claim_headers:\n  X-Auth-Tenant: t\n", 5, "lowercase"),
    ("claim-header-chars", BASE + "claim_headers:\n  x-auth-a_b: t\n", 5, "lowercase"),
    ("claim-header-builtin", BASE + "claim_headers:\n  x-auth-roles: r\n", 5, "already"),
    ("claim-header-prefix", BASE + "claim_headers:\n  x-tenant: tenant\n", 5, "'x-auth-'"),
    ("claim-header-no-claim", BASE + "claim_headers:\n  x-auth-t: ''\n", 5, "name a claim"),
    ("forward-token-string", "version: 1\nforward_token: 'yes please'\n", 2, "true or false"),
    (
        "forward-token-in-rule",
        BASE + "methods:\n  /a.B/C: {level: access, forward_token: 1}\n",
        5,
        "'forward_token' must be true or false",
    ),
    ("max-token-bytes", "version: 1\nmax_token_bytes: 10\n", 2, "'max_token_bytes'"),
    ("methods-not-map", "version: 1\nmethods: [a]\n", 2, "'methods'"),
    ("roles-not-list", BASE + "methods:\n  /a.B/C: {level: access, roles: admin}\n", 5, "'roles'"),
    ("yaml-syntax", "version: 1\nmethods:\n  /a.B/C: public\n   x: y\n", 4, "invalid YAML"),
    ("yaml-tab", "version: 1\n\tdefault: public\n", 2, "invalid YAML"),
    ("not-a-mapping", "- version\n", 1, "mapping"),
    (
        "single-use-on-public",
        BASE + "methods:\n  /a.B/C: {level: public, single_use: true}\n",
        5,
        "single_use needs a token level",
    ),
    (
        "single-use-not-bool",
        BASE + "methods:\n  /a.B/C: {level: access, single_use: yes please}\n",
        5,
        "'single_use' must be true or false",
    ),
    (
        "revoke-on-reuse-without-single-use",
        BASE + "methods:\n  /a.B/C: {level: access, revoke_on_reuse: false}\n",
        5,
        "revoke_on_reuse only applies with single_use: true",
    ),
]


def test_single_use_rules() -> None:
    p = parse_policy(
        BASE
        + "methods:\n"
        + "  /a.B/Refresh: {level: access, single_use: true}\n"
        + "  /a.B/Quiet: {level: access, single_use: true, revoke_on_reuse: false}\n"
        + "  /a.B/Plain: access\n",
        FILE,
    )
    refresh, quiet, plain = (p.match(f"/a.B/{m}") for m in ("Refresh", "Quiet", "Plain"))
    assert (refresh.single_use, refresh.revoke_on_reuse) == (True, True)
    assert (quiet.single_use, quiet.revoke_on_reuse) == (True, False)
    assert plain.single_use is False


@pytest.mark.parametrize(
    ("text", "line", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_validation_error_names_file_and_line(text: str, line: int, words: str) -> None:
    found = errors(text)
    assert any(e.startswith(f"{FILE}:{line}: ") and words in e for e in found), found


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "policy is empty"),
        (b"# only a comment\n", "policy is empty"),
        (b"version: 1\ndefault: \xff\xfe\n", "not UTF-8"),
    ],
    ids=["empty", "comment-only", "non-utf8"],
)
def test_file_level_errors_name_the_file(data: bytes, words: str) -> None:
    (found,) = errors(data)
    assert found.startswith(f"{FILE}: ") and words in found


def test_missing_file_is_a_policy_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(info.value).startswith(f"{path}: ")
    assert "cannot read policy" in str(info.value)


def test_load_policy_reports_the_path(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(BASE + "methods:\n  /a.B/C: acess\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(info.value) == (
        f"{path}:5: unknown level 'acess' for /a.B/C "
        "(expected one of public, 2fa, refresh, access, deny)"
    )


def test_all_errors_in_a_file_are_reported() -> None:
    text = (
        "version: 1\n"  # 1
        "colour: blue\n"  # 2
        "leeway: 10m\n"  # 3
        "tokens:\n"  # 4
        "  access: {type: access}\n"  # 5
        "methods:\n"  # 6
        "  /a.B/C: acess\n"  # 7
        "  nope: public\n"  # 8
        "  /a.B/D: {level: public, roles: [x]}\n"  # 9
    )
    with pytest.raises(PolicyError) as info:
        parse_policy(text, FILE)
    lines = sorted(e.line for e in info.value.errors)
    assert lines == [2, 3, 5, 7, 8, 9]
    assert all(e.file == FILE for e in info.value.errors)
    assert len(str(info.value).splitlines()) == 6


def test_a_bad_policy_yields_no_policy_object(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(SPEC_EXAMPLE + "  /a.B/C: acess\n")
    result = None
    with pytest.raises(PolicyError):
        result = load_policy(path)
    assert result is None


# --- durations and version ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("yaml_value", "seconds"),
    [("30", 30.0), ("30s", 30.0), ("2m", 120.0), ("500ms", 0.5), ("1.5s", 1.5), ("0", 0.0)],
)
def test_leeway_durations(yaml_value: str, seconds: float) -> None:
    p = parse_policy(f"version: 1\nleeway: {yaml_value}\n", "d.yaml")
    assert p.leeway == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (30, 30.0),
        ("30s", 30.0),
        ("2m", 120.0),
        ("500ms", 0.5),
        ("1.5s", 1.5),
        ("1h", 3600.0),
        ("30d", 30 * 86400.0),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["30x", "", "s", "1.5.5s", True, None, [30]])
def test_parse_duration_rejects(value: object) -> None:
    assert parse_duration(value) is None


def test_version_hash_follows_content(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(SPEC_EXAMPLE)
    first = load_policy(path).version
    assert load_policy(path).version == first
    path.write_text(SPEC_EXAMPLE.replace("leeway: 30s", "leeway: 20s"))
    second = load_policy(path).version
    assert second != first
    path.write_text(SPEC_EXAMPLE + "# a comment\n")
    assert load_policy(path).version not in (first, second)


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        (
            "version: 1\ntokens:\n  access:\n    type: access\n    issuer: x\n",
            3,
            "has no 'audience'",
        ),
        (
            BASE + "methods:\n  /a.B/C:\n    roles: [x]\n",
            5,
            "has no 'level'",
        ),
    ],
    ids=["block-token-without-audience", "block-rule-without-level"],
)
def test_block_style_errors_point_at_the_key_line(text: str, line: int, words: str) -> None:
    found = errors(text)
    assert any(e.startswith(f"{FILE}:{line}:") and words in e for e in found), found
