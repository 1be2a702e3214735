"""What `authproxy policy test` prints, and the tests' part in `authproxy policy check`.

`policy test POLICY [TESTS...]` prints one `PASS name` or `FAIL name: expected ..., got
...: message` line per test and a summary line, and exits 0 when all pass, 1 when any
fails, 2 when the policy or a test file is invalid (its `file:line` problems on stderr) or
there is no test to run. `--format json` prints the same as one object.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from authproxy.decide.policy_tests import Assemble, PolicyTestRun, run_policy_tests
from authproxy.policy.cases import policy_test_files
from authproxy.policy.loader import PolicyError, load_policy
from authproxy.policy.model import Policy
from authproxy.policy.yaml_source import SourceError


def text_report(run: PolicyTestRun) -> str:
    lines = [
        f"PASS {r.case.name}" if r.passed else f"FAIL {r.case.name}: {r.problem}"
        for r in run.results
    ]
    lines.append(run.summary())
    return "\n".join(lines)


def json_report(run: PolicyTestRun) -> dict[str, Any]:
    """`{policy, version, files, passed, failed, tests: [...]}`; each test has `name`,
    `file`, `line`, `call`, `passed`, `expected`, `got`, `reason` and `message`."""
    return {
        "policy": run.policy.source,
        "version": run.policy.version,
        "files": list(run.files),
        "passed": len(run.passed),
        "failed": len(run.failed),
        "tests": [
            {
                "name": r.case.name,
                "file": r.case.file,
                "line": r.case.line,
                "call": r.case.shown_target,
                "passed": r.passed,
                "expected": r.case.expected,
                "got": r.got,
                "reason": None if r.decision.reason is None else str(r.decision.reason),
                "message": r.decision.message,
            }
            for r in run.results
        ],
    }


def errors_json(errors: Sequence[SourceError]) -> list[dict[str, Any]]:
    return [{"file": e.file, "line": e.line, "message": e.problem} for e in errors]


def policy_test_command(args: Any, assemble: Assemble) -> int:
    """`authproxy policy test` (`args`: its `file`, `tests` and `format`): the exit code,
    after printing the report."""
    policy_file, test_files, as_json = args.file, args.tests, args.format == "json"
    try:
        policy = load_policy(policy_file)
        files = list(test_files) or policy_test_files(policy)
        if not files:
            sibling = f"{Path(policy_file).stem}.tests.yaml"
            problem = (
                "no policy tests: give test files after the policy, list them in its"
                f" 'tests:', or write {sibling} beside it"
            )
            raise PolicyError([SourceError(policy_file, None, problem)])
        run = asyncio.run(run_policy_tests(policy, assemble, files))
    except PolicyError as e:
        print(e, file=sys.stderr)
        if as_json:
            print(json.dumps({"policy": policy_file, "errors": errors_json(e.errors)}, indent=2))
        return 2
    print(json.dumps(json_report(run), indent=2) if as_json else text_report(run))
    return 1 if run.failed else 0


@dataclass(frozen=True, slots=True)
class CheckedTests:
    """The policy's own tests as `policy check` reports them."""

    #: The failures, or the test files' problems; empty when every test passed.
    errors: list[SourceError] = field(default_factory=list)
    #: `\\nFILES: N tests passed` for the text report ("" without tests).
    line: str = ""
    #: `{"tests": ...}` for the JSON report ({} without tests).
    json: dict[str, Any] = field(default_factory=dict)


def check_tests(policy: Policy, assemble: Assemble) -> CheckedTests:
    """Run the policy's own tests (`policy_test_files`), for `policy check`."""
    if not policy_test_files(policy):
        return CheckedTests()
    try:
        run = asyncio.run(run_policy_tests(policy, assemble))
    except PolicyError as e:
        return CheckedTests(e.errors, json={"tests": {"errors": errors_json(e.errors)}})
    report = {"tests": {**json_report(run), "errors": errors_json(run.errors())}}
    line = f"\n{', '.join(run.files)}: {len(run.results)} tests passed"
    return CheckedTests(run.errors(), "" if run.failed else line, report)
