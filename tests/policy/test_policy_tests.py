"""Policy tests (`policy/cases.py`, `decide/policy_tests.py`): the test-file format checked
as strictly as a policy, each case decided by the real pipeline on tokens minted for the
run, which files a policy's tests are in, and `authproxy policy test` / `policy check`
as a user runs them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from authproxy.cli.main import main
from authproxy.decide.policy_tests import (
    PolicyTestRun,
    PolicyTestsFailed,
    run_policy_tests,
    verify_policy,
)
from authproxy.decide.reasons import Reason
from authproxy.policy.cases import load_cases, policy_test_files
from authproxy.policy.loader import PolicyError, load_policy, parse_policy
from authproxy.runtime.serve import assemble_authorizer
from tests.support.cli import authproxy
from tests.support.policies import TEST_POLICY
from tests.support.readme import README, section

REPO = Path(__file__).resolve().parents[2]


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def policy_in(directory: Path, text: str = TEST_POLICY, name: str = "policy.yaml"):
    return parse_policy(text, str(write(directory, name, text)))


def cases_file(directory: Path, cases: str, name: str = "cases.yaml") -> Path:
    return write(directory, name, "tests:\n" + cases)


async def run(directory: Path, cases: str, policy_text: str = TEST_POLICY) -> PolicyTestRun:
    policy = policy_in(directory, policy_text)
    return await run_policy_tests(policy, assemble_authorizer, [cases_file(directory, cases)])


def outcomes(result: PolicyTestRun) -> list[tuple[str, bool, str]]:
    return [(r.case.name, r.passed, r.got) for r in result.results]


# --- the shipped tests --------------------------------------------------------------------


async def test_the_shipped_policy_passes_its_shipped_tests() -> None:
    policy = load_policy(REPO / "policy.yaml")
    assert policy_test_files(policy) == [REPO / "policy.tests.yaml"]
    result = await verify_policy(policy, assemble_authorizer)
    assert result.failed == []
    expected = {
        "/api.v1.AuthService/SignUp": {"allow"},
        "/api.v1.AuthService/Verify2FA": {"allow", "deny WRONG_TOKEN_TYPE"},
        "/api.v1.AuthService/RefreshToken": {"allow", "deny WRONG_TOKEN_TYPE"},
        "/api.v1.UserService/ListUsers": {"allow", "deny INSUFFICIENT_ROLE"},
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": {"deny METHOD_DENIED"},
        "/api.v1.BillingService/Charge": {"allow", "deny TOKEN_MISSING"},
    }
    seen: dict[str, set[str]] = {}
    for r in result.results:
        seen.setdefault(r.case.target, set()).add(r.got)
    for target, decisions in expected.items():
        assert decisions <= seen.get(target, set()), target
    assert "/api.v1.BillingService/Charge" not in policy.exact  # the default decides it


async def test_a_policy_edit_the_shipped_tests_catch(tmp_path: Path) -> None:
    """Opening ListUsers to every access token fails the admin-only case, with its line."""
    text = (REPO / "policy.yaml").read_text()
    edited = text.replace("/api.v1.UserService/ListUsers: {level: access, roles: [admin]}",
                          "/api.v1.UserService/ListUsers: access")  # fmt: skip
    assert edited != text
    policy = policy_in(tmp_path, edited)
    shipped = REPO / "policy.tests.yaml"
    result = await run_policy_tests(policy, assemble_authorizer, [shipped])
    (failed,) = result.failed
    line = shipped.read_text().splitlines().index("  - name: other users cannot list users") + 1
    assert str(failed.error()) == (
        f"{shipped}:{line}: test 'other users cannot list users' failed:"
        " expected deny INSUFFICIENT_ROLE, got allow"
    )


# --- deciding ----------------------------------------------------------------------------


async def test_a_failing_case_says_what_was_expected_and_what_came(tmp_path: Path) -> None:
    result = await run(
        tmp_path,
        "  - name: admin only\n"
        "    call: /test.Admin/Echo\n"
        "    token: {level: access, claims: {sub: bob, roles: [user]}}\n"
        "    expect: allow\n"
        "  - name: open\n"
        "    call: /test.Public/Echo\n"
        "    expect: {deny: METHOD_DENIED}\n",
    )
    assert [r.problem for r in result.failed] == [
        "expected allow, got deny INSUFFICIENT_ROLE: this method needs one of the roles admin",
        "expected deny METHOD_DENIED, got allow",
    ]
    assert [str(e) for e in result.errors()] == [
        f"{tmp_path / 'cases.yaml'}:2: test 'admin only' failed: expected allow, got deny"
        " INSUFFICIENT_ROLE: this method needs one of the roles admin",
        f"{tmp_path / 'cases.yaml'}:6: test 'open' failed: expected deny METHOD_DENIED, got allow",
    ]
    assert result.summary() == f"0 passed, 2 failed ({tmp_path / 'cases.yaml'})"
    with pytest.raises(PolicyTestsFailed) as raised:
        await verify_policy(
            policy_in(tmp_path, TEST_POLICY + "tests: [cases.yaml]\n"), assemble_authorizer
        )
    assert str(raised.value).splitlines() == [str(e) for e in result.errors()]


async def test_the_token_is_minted_for_its_level_and_changed_by_its_claims(tmp_path: Path) -> None:
    def case(name: str, token: str, expect: str, call: str = "/test.Access/Echo") -> str:
        return f"  - name: {name}\n    call: {call}\n    token: {token}\n    expect: {expect}\n"

    result = await run(
        tmp_path,
        case("valid", "{level: access}", "allow")
        + case("hmac level with named keys", "{level: refresh}", "allow", "/test.Refresh/Echo")
        + case("expired", "{level: access, expired: true}", "{deny: TOKEN_EXPIRED}")
        + case("other type", "{level: access, claims: {type: refresh}}", "{deny: WRONG_TOKEN_TYPE}")
        + case("other audience", "{level: access, claims: {aud: x}}", "{deny: WRONG_AUDIENCE}")
        + case("other issuer", "{level: access, claims: {iss: x}}", "{deny: WRONG_ISSUER}")
        + case("no subject", "{level: access, claims: {sub: null}}", "{deny: MISSING_CLAIM}")
        + case("2fa at access", "{level: 2fa}", "{deny: WRONG_TOKEN_TYPE}"),
    )
    assert [(name, passed) for name, passed, _ in outcomes(result)] == [
        (name, True)
        for name in ("valid", "hmac level with named keys", "expired", "other type",
                     "other audience", "other issuer", "no subject", "2fa at access")
    ]  # fmt: skip


async def test_http_headers_peers_and_repeats(tmp_path: Path) -> None:
    policy = (
        TEST_POLICY.replace(
            "  /test.Public/*: public\n",
            "  /test.Public/*: public\n"
            "  /test.Once/*: {level: access, single_use: true}\n"
            '  /test.Mesh/*: {level: public, peers: ["spiffe://cluster/ns/app/*"]}\n',
        )
        + "http:\n  GET /healthz: public\n  POST /items: {level: access, roles: [writer]}\n"
    )
    result = await run(
        tmp_path,
        "  - name: http public\n    http: GET /healthz\n    expect: allow\n"
        "  - name: http route needs a role\n    http: POST /items\n"
        "    token: {level: access, claims: {roles: [reader]}}\n"
        "    expect: {deny: INSUFFICIENT_ROLE}\n"
        "  - name: spent on the second call\n    call: /test.Once/Echo\n"
        "    token: {level: access}\n    repeat: 2\n    expect: {deny: REFRESH_REUSED}\n"
        "  - name: state is fresh for each test\n    call: /test.Once/Echo\n"
        "    token: {level: access}\n    expect: allow\n"
        "  - name: the right peer\n    call: /test.Mesh/Echo\n"
        "    peer: spiffe://cluster/ns/app/sa/web\n    expect: allow\n"
        "  - name: no certificate\n    call: /test.Mesh/Echo\n"
        "    expect: {deny: PEER_NOT_ALLOWED}\n"
        "  - name: a second authorization header\n    call: /test.Access/Echo\n"
        "    token: {level: access}\n    headers: {authorization: Bearer x.y.z}\n"
        "    expect: {deny: TOKEN_AMBIGUOUS}\n",
        policy,
    )
    assert result.failed == [], [r.problem for r in result.failed]
    assert len(result.results) == 7


async def test_shadow_mode_is_not_an_allow(tmp_path: Path) -> None:
    """A shadowed deny lets the call through, but the policy would deny it: `allow` fails
    and says so; `{deny: ...}` fails too (the call was let through)."""
    policy = TEST_POLICY + "  /test.Shadow/*: {level: access, roles: [admin], mode: shadow}\n"
    cases = "".join(
        f"  - name: '{expect}'\n    call: /test.Shadow/Echo\n    token: {{level: access}}\n"
        f"    expect: {expect}\n"
        for expect in ("allow", "{deny: INSUFFICIENT_ROLE}")
    )
    result = await run(tmp_path, cases, policy)
    assert [r.got for r in result.failed] == [
        "allow (shadow mode; would deny INSUFFICIENT_ROLE)",
    ] * 2


# --- the file format ------------------------------------------------------------------------

MALFORMED = """\
tests:
  - name: typo in a key
    call: /test.Admin/Echo
    token: {level: acess, claim: {sub: a}}
    expect: {deny: INSUFICIENT_ROLE}
  - name: typo in a key
    http: get /items
    expct: allow
  - nme: no name
    call: /test.Public/Echo
    headers: {X-Tenant: t1}
    expect: deny
  - name: both targets
    call: /test.Public/Echo
    http: GET /x
    repeat: 0
    expect: allow
  - just a string
"""


def test_a_malformed_test_file_lists_every_problem_with_its_line(tmp_path: Path) -> None:
    policy = policy_in(tmp_path)
    path = write(tmp_path, "bad.yaml", MALFORMED)
    with pytest.raises(PolicyError) as raised:
        load_cases([path], policy)
    assert str(raised.value).splitlines() == [
        f"{path}:{line}: {problem}"
        for line, problem in [
            (4, "unknown key in a token 'claim': did you mean 'claims'?"),
            (4, "unknown token level 'acess': did you mean 'access'? (the policy's token"
                " levels: 2fa, refresh, access)"),
            (5, "unknown reason 'INSUFICIENT_ROLE': did you mean INSUFFICIENT_ROLE?"),
            (6, "test 'typo in a key' is defined already on line 2"),
            (7, "'http' must be 'METHOD /path', like 'GET /healthz'"),
            (8, "unknown key in a test 'expct': did you mean 'expect'?"),
            (9, "unknown key in a test 'nme': did you mean 'name'?"),
            (11, "header name 'X-Tenant' must be lowercase"),
            (12, "'expect' must be allow, or {deny: REASON} with its reason, like"
                 " {deny: METHOD_DENIED}"),
            (13, "test 'both targets' needs one of 'call' (a gRPC method) or 'http'"),
            (16, "'repeat' must be between 1 and 1000, got 0"),
            (18, "a test must be a mapping with 'name', 'call' or 'http', 'expect'"),
        ]
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "the test file is empty"),
        ("tests: []\n", ":1: 'tests' must be a non-empty list of tests"),
        ("tests:\n  - name: a\n\tcall: /a.B/C\n", ":3: invalid YAML at column 1"),
        ("cases: []\n", ":1: unknown top-level key 'cases' (allowed: tests)"),
    ],
)
async def test_a_test_file_that_is_no_list_of_tests(tmp_path: Path, text: str, problem: str):
    with pytest.raises(PolicyError) as raised:
        await run_policy_tests(
            policy_in(tmp_path), assemble_authorizer, [write(tmp_path, "t.yaml", text)]
        )
    assert problem in str(raised.value)


async def test_a_level_the_policy_does_not_define(tmp_path: Path) -> None:
    policy = TEST_POLICY.replace("  2fa:     {type: 2fa_pending, audience: 2fa-verification}\n", "")
    cases = "  - name: a\n    call: /test.Access/Echo\n    token: {level: 2fa}\n    expect: allow\n"
    with pytest.raises(PolicyError) as raised:
        await run(tmp_path, cases, policy.replace("  /test.TwoFA/*: 2fa\n", ""))
    assert str(raised.value) == (
        f"{tmp_path / 'cases.yaml'}:4: the policy defines no '2fa' tokens (the policy's"
        " token levels: refresh, access)"
    )


# --- which files ------------------------------------------------------------------------------

PASSING = "  - name: public\n    call: /test.Public/Echo\n    expect: allow\n"
FAILING = "  - name: public\n    call: /test.Public/Echo\n    expect: {deny: METHOD_DENIED}\n"


def test_the_tests_beside_the_policy_or_those_it_names(tmp_path: Path) -> None:
    assert policy_test_files(policy_in(tmp_path)) == []  # none: nothing to run
    cases_file(tmp_path, PASSING, "policy.tests.yaml")
    assert policy_test_files(policy_in(tmp_path)) == [tmp_path / "policy.tests.yaml"]
    (tmp_path / "more").mkdir()
    named = policy_in(tmp_path, TEST_POLICY + "tests: [more/b.yaml, a.yaml]\n")
    assert named.tests == ("a.yaml", "more/b.yaml")
    assert policy_test_files(named) == [tmp_path / "a.yaml", tmp_path / "more/b.yaml"]
    assert policy_test_files(policy_in(tmp_path, TEST_POLICY + "tests: []\n")) == []


def test_a_bad_tests_key_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as raised:
        policy_in(tmp_path, TEST_POLICY + "tests: cases.yaml\n")
    assert str(raised.value) == (
        f"{tmp_path / 'policy.yaml'}:{len(TEST_POLICY.splitlines()) + 1}:"
        " 'tests' must be a non-empty list"
    )


async def test_a_missing_test_file_fails_the_gate(tmp_path: Path) -> None:
    policy = policy_in(tmp_path, TEST_POLICY + "tests: [absent.yaml]\n")
    with pytest.raises(PolicyTestsFailed) as raised:
        await verify_policy(policy, assemble_authorizer)
    assert str(raised.value) == (
        f"{tmp_path / 'absent.yaml'}: cannot read policy tests: No such file or directory"
    )


# --- the commands ---------------------------------------------------------------------------


def test_policy_test_exit_codes_and_output(tmp_path: Path) -> None:
    write(tmp_path, "policy.yaml", TEST_POLICY)
    cases_file(tmp_path, PASSING, "policy.tests.yaml")
    cases_file(tmp_path, PASSING + FAILING.replace("public", "closed", 1), "failing.yaml")
    write(tmp_path, "broken.yaml", "tests:\n  - name: x\n    call: /a.B/C\n")

    passed = authproxy("policy", "test", "policy.yaml", cwd=tmp_path)
    assert (passed.returncode, passed.stdout, passed.stderr) == (
        0, "PASS public\n1 passed (policy.tests.yaml)\n", ""
    )  # fmt: skip
    failed = authproxy("policy", "test", "policy.yaml", "failing.yaml", cwd=tmp_path)
    assert failed.returncode == 1, failed.stderr
    assert failed.stdout.splitlines() == [
        "PASS public",
        "FAIL closed: expected deny METHOD_DENIED, got allow",
        "1 passed, 1 failed (failing.yaml)",
    ]
    broken = authproxy("policy", "test", "policy.yaml", "broken.yaml", cwd=tmp_path)
    assert (broken.returncode, broken.stdout) == (2, "")
    assert broken.stderr == "broken.yaml:2: test 'x' has no 'expect' (allow, or {deny: REASON})\n"


def test_policy_test_exits_2_for_a_bad_policy_or_no_tests(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "bad.yaml", "version: 1\nmethods:\n  /a.B/C: acess\n")
    assert main(["policy", "test", "bad.yaml", "x.yaml"]) == 2
    assert capsys.readouterr().err.startswith("bad.yaml:3: unknown level 'acess'")
    write(tmp_path, "policy.yaml", TEST_POLICY)
    assert main(["policy", "test", "policy.yaml"]) == 2
    assert capsys.readouterr().err == (
        "policy.yaml: no policy tests: give test files after the policy, list them in its"
        " 'tests:', or write policy.tests.yaml beside it\n"
    )


def test_policy_test_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "policy.yaml", TEST_POLICY)
    cases_file(tmp_path, FAILING, "t.yaml")
    assert main(["policy", "test", "policy.yaml", "t.yaml", "--format", "json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["version"] == load_policy(tmp_path / "policy.yaml").version
    assert (report["policy"], report["files"], report["passed"], report["failed"]) == (
        "policy.yaml", ["t.yaml"], 0, 1
    )  # fmt: skip
    assert report["tests"] == [
        {
            "name": "public",
            "file": "t.yaml",
            "line": 2,
            "call": "/test.Public/Echo",
            "passed": False,
            "expected": f"deny {Reason.METHOD_DENIED}",
            "got": "allow",
            "reason": None,
            "message": "",
        }
    ]


def test_policy_check_runs_the_policy_tests(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "policy.yaml", TEST_POLICY)
    cases_file(tmp_path, PASSING, "policy.tests.yaml")
    assert main(["policy", "check", "policy.yaml"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1:] == ["policy.tests.yaml: 1 tests passed"]
    assert main(["policy", "check", "policy.yaml", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["tests"]["passed"] == 1

    cases_file(tmp_path, FAILING, "policy.tests.yaml")
    assert main(["policy", "check", "policy.yaml"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "policy.tests.yaml:2: test 'public' failed: expected deny METHOD_DENIED, got allow\n"
    )
    assert main(["policy", "check", "policy.yaml", "--format", "json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["valid"] is False
    assert report["tests"]["errors"] == [
        {
            "file": "policy.tests.yaml",
            "line": 2,
            "message": "test 'public' failed: expected deny METHOD_DENIED, got allow",
        }
    ]


def test_the_readme_sample_is_what_policy_test_prints() -> None:
    """The README's `policy test` sample is the command's real output on the shipped files."""
    text = section(README, "### Policy tests")
    command = "$ authproxy policy test policy.yaml\n"
    sample = text[text.index(command) + len(command) :].split("```", 1)[0]
    result = authproxy("policy", "test", "policy.yaml", cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout == sample
    assert re.search(r"^\d+ passed \(policy\.tests\.yaml\)$", sample, re.M)
