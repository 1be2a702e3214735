"""`authproxy policy ...`: check (validate, run the policy's tests, lint against a
backend's methods), test (run policy tests, `cli/policy_test.py`), table (the rules to
review, `policy/table.py`) and diff (what changed between two versions, `policy/diff.py`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from authproxy.cli import policy_test as test_report
from authproxy.cli.settings import duration
from authproxy.decide.request_fields import request_field_problems
from authproxy.policy import diff as policy_diff
from authproxy.policy import table as policy_table
from authproxy.policy.loader import PolicyError, load_policy
from authproxy.runtime.serve import ConfigError, assemble_authorizer


def add_policy_commands(policy_sub: argparse._SubParsersAction) -> None:
    """Register the `policy` sub-commands."""
    _add_policy_check(policy_sub)
    _add_policy_test(policy_sub)
    _add_policy_table(policy_sub)
    _add_policy_diff(policy_sub)


def _add_policy_check(policy_sub: argparse._SubParsersAction) -> None:
    check = policy_sub.add_parser(
        "check", help="validate a policy file; lint it against the methods a backend serves"
    )
    check.add_argument("file")
    check.add_argument(
        "--backend", help="HOST:PORT: lint against the methods its gRPC server reflection lists"
    )
    check.add_argument(
        "--descriptor-set",
        action="append",
        default=[],
        help="lint against the methods of a FileDescriptorSet (protoset) (repeatable)",
    )
    check.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 if a served method has no rule or a rule matches no served method",
    )
    check.add_argument("--format", choices=("text", "json"), default="text")
    check.add_argument(
        "--timeout", type=duration, default="5s", help="how long to wait for --backend"
    )
    check.set_defaults(func=_policy_check)


def _policy_check(args: argparse.Namespace) -> int:
    from authproxy.policy import lint
    from authproxy.sidecar.catalog import CatalogError, MethodCatalog, reflect_backend

    as_json = args.format == "json"
    try:
        policy = load_policy(args.file)
        tests = test_report.check_tests(policy, assemble_authorizer)  # its tests, when it has any
    except PolicyError as e:
        tests = test_report.CheckedTests(e.errors)
    if tests.errors:
        print("\n".join(map(str, tests.errors)), file=sys.stderr)
        if as_json:
            report = lint.json_report(args.file, errors=tests.errors, strict=args.strict)
            print(json.dumps(report | tests.json))
        return 1
    if not (args.backend or args.descriptor_set):
        if as_json:
            report = lint.json_report(args.file, policy=policy, strict=args.strict)
            print(json.dumps(report | tests.json))
        else:
            ok = f"{args.file}: OK (version {policy.version}, {policy.rule_count} rules)"
            print(ok + tests.line)
        return 0
    catalog, sources = MethodCatalog(), list(args.descriptor_set)
    catalogs = [catalog]
    try:
        for path in args.descriptor_set:
            catalog.add_descriptor_set(path)
        if args.backend:
            catalogs.append(asyncio.run(reflect_backend(args.backend, args.timeout)))
            catalog.kinds.update(catalogs[-1].kinds)
            sources.append(f"reflection at {args.backend}")
    except CatalogError as e:
        raise ConfigError(str(e)) from None
    # `request:` fields the methods' types lack: errors, as the proxy would refuse them.
    problems = [p for c in catalogs for p in request_field_problems(policy, c.types)]
    if problems:
        print("\n".join(map(str, problems)), file=sys.stderr)
        return 1
    result = lint.lint(policy, catalog.kinds)
    if as_json:
        report = lint.json_report(
            args.file, policy=policy, result=result, sources=sources, strict=args.strict
        )
        print(json.dumps(report, indent=2))
    else:
        print(lint.text_report(result, sources, args.strict))
    return 1 if args.strict and result.findings else 0


def _add_policy_test(policy_sub: argparse._SubParsersAction) -> None:
    p = policy_sub.add_parser("test", help="run policy tests: calls and the decision each must get")
    p.add_argument("file", help="the policy file")
    p.add_argument("tests", nargs="*", help="test files (default: the policy's own)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=lambda a: test_report.policy_test_command(a, assemble_authorizer))


def _add_policy_table(policy_sub: argparse._SubParsersAction) -> None:
    p = policy_sub.add_parser("table", help="print the rules as a table to review")
    p.add_argument("file")
    p.add_argument("--format", choices=policy_table.FORMATS, default="text")
    p.set_defaults(func=_policy_table)


def _policy_table(args: argparse.Namespace) -> int:
    """Print the table; a policy that does not load prints its `file:line: problem`
    lines to stderr and exits 2 (as `policy diff` does)."""
    try:
        policy = load_policy(args.file)
    except PolicyError as e:
        print(e, file=sys.stderr)
        return 2
    print(policy_table.render(policy, args.format))
    return 0


def _add_policy_diff(policy_sub: argparse._SubParsersAction) -> None:
    p = policy_sub.add_parser("diff", help="what changed between two policies (exit 1: changes)")
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--format", choices=policy_diff.FORMATS, default="text")
    p.set_defaults(func=_policy_diff)


def _policy_diff(args: argparse.Namespace) -> int:
    """Exit 0 when the policies mean the same, 1 when they differ (as `diff` does), 2 when
    either does not load (its `file:line: problem` lines go to stderr)."""
    loaded, failed = [], False
    for file in (args.old, args.new):
        try:
            loaded.append(load_policy(file))
        except PolicyError as e:
            print(e, file=sys.stderr)
            failed = True
    if failed:
        return 2
    changes = policy_diff.diff(*loaded)
    if args.format == "json":
        print(json.dumps(policy_diff.json_report(changes), indent=2))
    elif changes:
        print(policy_diff.text_report(changes))
    return 1 if changes else 0
