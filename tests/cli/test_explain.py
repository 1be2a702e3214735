"""`authproxy explain`: the verdict is the runtime's decision, and the steps say where.

Every case is decided twice on the same inputs and at the same instant: by `explain`
and by the `Authorizer` that `serve` builds (`build_authorizer`, fresh state).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest

from authproxy.cli.explain import FAIL, OFFLINE, OK, Explanation, explain_offline
from authproxy.cli.explain_report import json_report, text_report
from authproxy.cli.main import main
from authproxy.decide.pipeline import Authorizer
from authproxy.decide.reasons import Reason
from authproxy.keys.issuer import TokenIssuer
from authproxy.runtime.serve import ServeConfig, build_authorizer
from authproxy.state.store import MemoryState
from tests.support.keys import REFRESH_ENV, REFRESH_SECRET, Keys
from tests.support.policies import SERVICES, TEST_POLICY
from tests.support.running_proxy import config_for
from tests.support.tokens import b64url, b64url_decode

REPO = Path(__file__).resolve().parents[2]

POLICY = (
    TEST_POLICY
    + """\
  /test.Perm/Write: {level: access, permissions: [records:write]}
  /test.Scoped/Read: {level: access, scopes: [read]}
  /test.Once/Use: {level: refresh, single_use: true}
  /test.Limited/Login: {level: public, rate_limit: {limit: 5/minute, key: peer}}
  /test.Session/Refresh: {level: refresh, rate_limit: {limit: 10/hour, key: sid}}
http:
  "GET /items/{id}": access
  "* /admin/**": {level: access, roles: [admin]}
"""
)
METHODS = [
    *(f"/test.{s}/Report" for s in SERVICES),  # one per level, and test.Other: default
    "/test.Perm/Write",
    "/test.Scoped/Read",
    "/test.Once/Use",
    "/test.Limited/Login",
    "/test.Session/Refresh",
    "not-a-method",
]
HTTP = [
    ("GET", "/items/7"),
    ("DELETE", "/admin/users/1"),
    ("GET", "/nowhere"),  # default
    ("POST", "/test.Admin/Report"),  # a listed method: judged by its rule
    ("GET", "/items/../admin"),  # refused path
]
TOKENS = [
    "none",
    "access",
    "admin",
    "refresh",
    "refresh-with-sid",
    "refresh-without-jti",
    "2fa",
    "expired",
    "wrong-audience",
    "wrong-role",
    "tampered",
    "alg-none",
]


@pytest.fixture(scope="module")
def tokens(issuer: TokenIssuer) -> dict[str, str | None]:
    access = issuer.mint("access", "alice", ttl=600, roles=["user"]).token
    header, payload, signature = access.split(".")
    refresh = issuer.mint("refresh", "alice", ttl=600).claims
    no_jti = {k: v for k, v in refresh.items() if k != "jti"}
    forged = {**json.loads(b64url_decode(payload)), "sub": "mallory"}
    return {
        "none": None,
        "access": access,
        "admin": issuer.mint(
            "access", "root", ttl=600, roles=["admin"], permissions=["records:write"]
        ).token,
        "refresh": issuer.mint("refresh", "alice", ttl=600).token,
        "refresh-with-sid": issuer.mint("refresh", "alice", ttl=600, extra={"sid": "s1"}).token,
        "refresh-without-jti": jwt.encode(  # single use needs a jti
            no_jti, REFRESH_SECRET, algorithm="HS256", headers={"kid": "refresh-hmac"}
        ),
        "2fa": issuer.mint("2fa", "alice", ttl=600).token,
        "expired": issuer.mint("access", "alice", ttl=-3600).token,
        "wrong-audience": issuer.mint("access", "alice", ttl=600, extra={"aud": "other"}).token,
        "wrong-role": issuer.mint("access", "alice", ttl=600, roles=["support"]).token,
        "tampered": f"{header}.{b64url(json.dumps(forged))}.{signature}",
        "alg-none": f"{b64url(json.dumps({'alg': 'none', 'typ': 'JWT'}))}.{payload}.",
    }


@pytest.fixture
def cfg(tmp_path: Path, keys: Keys) -> ServeConfig:
    return config_for(tmp_path, keys, POLICY)


def runtime(cfg: ServeConfig, now: float) -> Authorizer:
    """The authorizer `serve` builds, on fresh state, with its clock at `now`."""
    authorizer = build_authorizer(cfg, MemoryState())
    authorizer.verifier.clock = lambda: now
    return authorizer


def headers(token: str | None) -> list[tuple[str, str]]:
    return [] if token is None else [("authorization", f"Bearer {token}")]


def assert_same_verdict(explained: Explanation, decision) -> None:
    ours = explained.decision
    assert (ours.allowed, ours.reason, ours.message) == (
        decision.allowed,
        decision.reason,
        decision.message,
    )
    assert (ours.rule, ours.status, ours.method) == (
        decision.rule,
        decision.status,
        decision.method,
    )
    assert (ours.identity and ours.identity.headers) == (
        decision.identity and decision.identity.headers
    )


def assert_names_rule_and_level(explained: Explanation, policy_file: str) -> None:
    rule = explained.decision.rule
    text = text_report(explained)
    if rule.line is not None:
        assert f"{policy_file}:{rule.line}: {rule.pattern} (" in text
    assert re.search(rf"^level +{re.escape(rule.level)}: ", text, re.M), text
    verdict = "ALLOW" if explained.allowed else f"DENY {explained.decision.status.name}"
    assert re.search(rf"^verdict +{verdict}", text, re.M), text


@pytest.mark.parametrize("token_name", TOKENS)
async def test_verdict_equals_the_runtime_decision(
    cfg: ServeConfig, tokens: dict[str, str | None], token_name: str
) -> None:
    token = tokens[token_name]
    for method in METHODS:
        now = time.time()
        decision = await runtime(cfg, now).decide(method, headers(token))
        explained = await explain_offline(cfg, method, token, now=now)
        assert_same_verdict(explained, decision)
        assert_names_rule_and_level(explained, cfg.policy)


@pytest.mark.parametrize("token_name", ["none", "access", "admin", "expired", "tampered"])
async def test_http_verdict_equals_decide_http(
    cfg: ServeConfig, tokens: dict[str, str | None], token_name: str
) -> None:
    token = tokens[token_name]
    for http_method, path in HTTP:
        now = time.time()
        decision = await runtime(cfg, now).decide_http(
            http_method, path, headers(token), grpc=False
        )
        explained = await explain_offline(cfg, path, token, http_method, now=now)
        assert_same_verdict(explained, decision)
        assert_names_rule_and_level(explained, cfg.policy)


@pytest.mark.parametrize(
    ("method", "token_name", "steps"),
    [
        ("/test.Access/Report", "none", [("token", Reason.TOKEN_MISSING)]),
        ("/test.Access/Report", "tampered", [("token", OK), ("signature", Reason.BAD_SIGNATURE)]),
        (
            "/test.Access/Report",
            "alg-none",
            [("token", OK), ("signature", Reason.ALGORITHM_NOT_ALLOWED)],
        ),
        (
            "/test.Access/Report",
            "expired",
            [("token", OK), ("signature", OK), ("claims", Reason.TOKEN_EXPIRED)],
        ),
        (
            "/test.Access/Report",
            "wrong-audience",
            [("token", OK), ("signature", OK), ("claims", Reason.WRONG_AUDIENCE)],
        ),
        (
            "/test.Access/Report",
            "2fa",
            [("token", OK), ("signature", OK), ("claims", Reason.WRONG_TOKEN_TYPE)],
        ),
        (
            "/test.Admin/Report",
            "wrong-role",
            [
                ("token", OK),
                ("signature", OK),
                ("claims", OK),
                ("identity", OK),
                ("revocation", OFFLINE),
                ("requirements", Reason.INSUFFICIENT_ROLE),
            ],
        ),
        (
            "/test.Once/Use",
            "refresh",
            [
                ("token", OK),
                ("signature", OK),
                ("claims", OK),
                ("identity", OK),
                ("revocation", OFFLINE),
                ("requirements", OK),
                ("single use", OFFLINE),
            ],
        ),
        ("/test.Limited/Login", "none", [("token", "not needed"), ("rate limits", OFFLINE)]),
        ("/test.Denied/Report", "admin", []),
    ],
)
async def test_steps_name_where_the_call_stops(
    cfg: ServeConfig,
    tokens: dict[str, str | None],
    method: str,
    token_name: str,
    steps: list[tuple[str, object]],
) -> None:
    explained = await explain_offline(cfg, method, tokens[token_name])
    got = [(s.name, s.reason or s.outcome) for s in explained.steps]
    assert got == steps
    failed = [s for s in explained.steps if s.outcome == FAIL]
    if failed:  # the failing step is the decision's reason
        assert (failed[0].reason, failed[0].detail) == (
            explained.decision.reason,
            explained.decision.message,
        )


async def test_a_token_over_the_size_bound_is_refused_before_the_signature_layer(
    cfg: ServeConfig, issuer: TokenIssuer
) -> None:
    # Between the limit and the slack the header check allows ("Bearer " and spaces), the
    # verifier's own size bound refuses the token before its signature layer runs.
    limit = 8192

    def padded(n: int) -> str:
        return issuer.mint("access", "a", ttl=600, extra={"pad": "x" * n}).token

    guess = (limit + 5 - len(padded(0))) * 3 // 4  # base64url: 4 characters per 3 bytes
    token = next(t for n in range(guess - 8, guess + 8) if limit < len(t := padded(n)) <= limit + 9)
    now = time.time()
    explained = await explain_offline(cfg, "/test.Access/Report", token, now=now)
    decision = await runtime(cfg, now).decide("/test.Access/Report", headers(token))
    assert_same_verdict(explained, decision)
    assert [(s.name, s.reason or s.outcome) for s in explained.steps] == [
        ("token", OK),
        ("verify", Reason.TOKEN_TOO_LARGE),
    ]


async def test_report_says_what_is_not_checked_offline(
    cfg: ServeConfig, tokens: dict[str, str | None]
) -> None:
    explained = await explain_offline(cfg, "/test.Once/Use", tokens["refresh"])
    text = text_report(explained)
    assert "  revocation   --    not checked offline: nothing is revoked in an empty state" in text
    assert "  single use   --    not checked offline: needs a 'jti'" in text
    assert "offline       explain starts from an empty state" in text
    assert json_report(explained)["not_checked_offline"] == ["revocation", "single use"]


async def test_json_report_has_stable_keys(cfg: ServeConfig, tokens: dict[str, str | None]) -> None:
    explained = await explain_offline(cfg, "/test.Admin/Report", tokens["admin"])
    report = json.loads(json.dumps(json_report(explained)))
    assert set(report) == {
        "target",
        "http",
        "judged_as",
        "policy",
        "rule",
        "steps",
        "not_checked_offline",
        "decision",
    }
    assert report["rule"]["pattern"] == "/test.Admin/*"
    assert (
        report["rule"]["line"]
        == POLICY.splitlines().index("  /test.Admin/*: {level: access, roles: [admin]}") + 1
    )
    assert (report["rule"]["match"], report["rule"]["roles"]) == ("service wildcard", ["admin"])
    assert report["rule"]["token"]["audiences"] == ["api-access"]
    assert report["steps"][0] == {
        "step": "token",
        "outcome": OK,
        "reason": None,
        "detail": report["steps"][0]["detail"],
    }
    assert report["decision"]["allowed"] is True
    assert report["decision"]["status"] == "OK"
    assert report["decision"]["identity"]["subject"] == "root"


# --- the command ---------------------------------------------------------------------------


def key_args(keys: Keys) -> list[str]:
    return ["--jwks", str(keys.jwks), "--hmac-secret-env", f"refresh-hmac={REFRESH_ENV}"]


def test_exit_codes(
    cfg: ServeConfig,
    keys: Keys,
    tokens: dict[str, str | None],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"{tokens['access']}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHPROXY_")}
    command = [sys.executable, "-m", "authproxy", "explain", "--policy", cfg.policy]
    allowed = subprocess.run(
        [*command, "/test.Access/Report", "--token-file", str(token_file), *key_args(keys)],
        cwd=tmp_path,
        env={**env, REFRESH_ENV: REFRESH_SECRET.decode()},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (allowed.returncode, allowed.stderr) == (0, "")
    assert allowed.stdout.splitlines()[-1] == "verdict       ALLOW as 'alice'"

    explain = ["explain", "--policy", cfg.policy, "--token-file", str(token_file)]
    assert main([*explain, "/test.Admin/Report", *key_args(keys)]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == (
        "verdict       DENY PERMISSION_DENIED INSUFFICIENT_ROLE:"
        " this method needs one of the roles admin"
    )
    assert main([*explain, "/test.Access/Report"]) == 2  # a token, and no keys to verify it
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("authproxy: error: ")
    assert "no verification keys configured" in captured.err


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ([], "give a gRPC method path or --http"),
        (["/test.Public/Report", "--http", "GET /x"], "give a gRPC method path or --http"),
        (["--http", "GET"], "expected 'METHOD /path'"),
        (["/test.Public/Report", "--token-file", "absent"], "--token-file absent: No such file"),
    ],
)
def test_usage_errors_exit_2(
    cfg: ServeConfig, capsys: pytest.CaptureFixture[str], args: list[str], words: str
) -> None:
    assert main(["explain", "--policy", cfg.policy, *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("authproxy: error: ")
    assert words in captured.err


def test_an_invalid_policy_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nmethods:\n  /a.B/C: acess\n")
    assert main(["explain", "--policy", str(bad), "/a.B/C"]) == 2
    assert capsys.readouterr().err.startswith(f"authproxy: error: {bad}:3: unknown level 'acess'")


def test_token_and_token_file_together_are_a_usage_error(
    cfg: ServeConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["explain", "--policy", cfg.policy, "/a.B/C", "--token", "t", "--token-file", "f"])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_public_method_without_token_needs_no_keys(
    cfg: ServeConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["explain", "--policy", cfg.policy, "/test.Public/Report", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["rule"]["level"], report["decision"]["allowed"]) == ("public", True)
