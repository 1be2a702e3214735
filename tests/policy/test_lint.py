"""`authproxy policy check --backend / --descriptor-set`: a policy against served methods.

The served methods come from the real example backend's server reflection (on loopback)
and from the echo backend's protoset; the CLI runs as a subprocess for exit codes.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from authproxy.cli.main import main
from authproxy.policy.lint import lint, uncovered
from authproxy.policy.loader import parse_policy
from authproxy.sidecar.catalog import CatalogError, MethodCatalog, reflect_backend
from examples.backend.api.v1 import api_pb2
from tests.support.echo_backend import UNARY, EchoBackend
from tests.support.example_backend import Example, free_port
from tests.support.policies import SERVICES, TEST_POLICY, descriptor_set

REPO = Path(__file__).resolve().parents[2]

#: For the example backend: a typo'd method, a service that does not exist, and
#: UserService/DeleteAccount without a rule.
TYPO_POLICY = """\
version: 1
default: access
tokens:
  access: {type: access, audience: api-access}
methods:
  /api.v1.AuthService/*: public
  /api.v1.UserService/GetProfil: access
  /api.v1.UserService/SearchPublicUsers: public
  /api.v1.UserService/ListUsers: {level: access, roles: [admin]}
  /api.v1.UserService/UpdateProfile: access
  /api.v1.DataService/*: access
  /api.v1.Records/*: access
  /grpc.health.v1.Health/*: public
  /grpc.reflection.v1alpha.ServerReflection/*: deny
"""
#: Every service the example backend serves has a rule, and every rule matches.
CLEAN_POLICY = """\
version: 1
default: deny
tokens:
  access: {type: access, audience: api-access}
methods:
  /api.v1.AuthService/*: public
  /api.v1.UserService/*: access
  /api.v1.DataService/*: access
  /grpc.health.v1.Health/*: public
  /grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo: deny
"""


def line_of(text: str, needle: str) -> int:
    """The 1-based line of the first line containing `needle`."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def methods_of(*services: Any) -> set[str]:
    return {f"/{s.full_name}/{m.name}" for s in services for m in s.methods}


def example_methods() -> set[str]:
    """What the example backend serves, from the descriptors it is built from."""
    return methods_of(
        *api_pb2.DESCRIPTOR.services_by_name.values(),
        health_pb2.DESCRIPTOR.services_by_name["Health"],
        reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
    )


def address(example: Example) -> str:
    return f"127.0.0.1:{example.backend.port}"


async def cli(*args: str, cwd: Path) -> tuple[int, str, str]:
    """`python -m authproxy ARGS` without blocking the event loop (the backend runs in it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHPROXY_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "authproxy",
        *args,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


# --- served methods ------------------------------------------------------------------------


async def test_reflection_lists_every_method_the_example_backend_serves(example: Example) -> None:
    catalog = await reflect_backend(address(example))
    assert set(catalog.kinds) == example_methods()
    assert "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo" in catalog.kinds


async def test_a_backend_without_reflection_is_one_clear_error(backend: EchoBackend) -> None:
    where = f"127.0.0.1:{backend.port}"
    with pytest.raises(CatalogError) as info:
        await reflect_backend(where)
    assert str(info.value) == (
        f"backend {where}: reflection failed"
        " (UNIMPLEMENTED: no gRPC server reflection service (grpc.reflection.v1alpha))"
    )


async def test_a_silent_backend_times_out_naming_the_address() -> None:
    with socket.socket() as listener:  # accepts connections, never speaks HTTP/2
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        where = f"127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(CatalogError) as info:
            await reflect_backend(where, timeout=0.3)
    assert str(info.value) == f"backend {where}: reflection not answering (no answer within 0.3s)"


# --- the lint ----------------------------------------------------------------------------


async def test_lint_reports_a_typo_and_a_missing_method_with_their_lines(
    example: Example,
) -> None:
    served = (await reflect_backend(address(example))).kinds
    result = lint(parse_policy(TYPO_POLICY, "typo.yaml"), served)

    assert result.uncovered == (
        "/api.v1.UserService/DeleteAccount",
        "/api.v1.UserService/GetProfile",
    )
    assert [(r.pattern, r.line) for r in result.unmatched] == [
        ("/api.v1.UserService/GetProfil", line_of(TYPO_POLICY, "GetProfil:")),
        ("/api.v1.Records/*", line_of(TYPO_POLICY, "Records")),
    ]
    assert [w.service for w in result.wildcard_only] == [
        "api.v1.AuthService",
        "api.v1.DataService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ]
    assert (result.by_exact, result.by_wildcard) == (3, len(served) - 3 - 2)
    assert result.findings == 4


async def test_lint_finds_nothing_in_a_policy_that_covers_the_backend(example: Example) -> None:
    served = (await reflect_backend(address(example))).kinds
    result = lint(parse_policy(CLEAN_POLICY, "clean.yaml"), served)
    assert (result.uncovered, result.unmatched, result.findings) == ((), (), 0)
    assert result.served == tuple(sorted(example_methods()))


def test_uncovered_is_the_served_methods_only_default_decides() -> None:
    policy = parse_policy(TYPO_POLICY, "typo.yaml")
    served = [
        "/api.v1.UserService/GetProfile",
        "/api.v1.AuthService/Login",  # wildcard
        "/api.v1.UserService/ListUsers",  # exact
        "/other.v1.Thing/Do",
        "/api.v1.UserService/GetProfile",  # listed twice: reported once
    ]
    assert uncovered(policy, served) == ["/api.v1.UserService/GetProfile", "/other.v1.Thing/Do"]


def test_protosets_lint_the_echo_backends_methods(tmp_path: Path) -> None:
    catalog = MethodCatalog()
    catalog.add_descriptor_set(str(descriptor_set(tmp_path / "echo.protoset")))
    result = lint(parse_policy(TEST_POLICY, "test.yaml"), catalog.kinds)
    other = sorted(f"/test.Other/{m}" for m in (*UNARY, "Count", "Sum", "Chat"))
    assert list(result.uncovered) == other  # TEST_POLICY has no rule for test.Other
    assert result.unmatched == ()
    assert sorted(w.service for w in result.wildcard_only) == sorted(
        f"test.{s}" for s in SERVICES if s != "Other"
    )


# --- the command ---------------------------------------------------------------------------


async def test_cli_warns_and_with_strict_fails_naming_lines(
    example: Example, tmp_path: Path
) -> None:
    policy = tmp_path / "typo.yaml"
    policy.write_text(TYPO_POLICY)
    check = ("policy", "check", str(policy), "--backend", address(example))
    (code, out, err), (strict_code, strict_out, _) = await asyncio.gather(
        cli(*check, cwd=tmp_path), cli(*check, "--strict", cwd=tmp_path)
    )
    assert (code, strict_code, err) == (0, 1, "")
    typo = (
        f"  {policy}:{line_of(TYPO_POLICY, 'GetProfil:')}: /api.v1.UserService/GetProfil (access)"
    )
    for text, kind in ((out, "warning"), (strict_out, "error")):
        lines = text.splitlines()
        assert lines[0].startswith(f"{policy}: OK (version ")
        assert f"served: {len(example_methods())} methods from reflection at" in lines[1]
        assert f"{kind}: 2 served methods without a rule, decided by default (access," in text
        assert "  /api.v1.UserService/DeleteAccount" in lines
        assert f"{kind}: 2 rules matching no served method:" in lines
        assert typo in lines
        assert lines[-1].startswith(f"summary: {len(example_methods())} served methods: 3 by exact")


async def test_cli_clean_policy_passes_strict_and_json_has_the_report(
    example: Example, tmp_path: Path
) -> None:
    clean, typo = tmp_path / "clean.yaml", tmp_path / "typo.yaml"
    clean.write_text(CLEAN_POLICY)
    typo.write_text(TYPO_POLICY)
    backend = ("--backend", address(example))
    (code, out, _), (json_code, json_out, _) = await asyncio.gather(
        cli("policy", "check", str(clean), *backend, "--strict", cwd=tmp_path),
        cli("policy", "check", str(typo), *backend, "--strict", "--format", "json", cwd=tmp_path),
    )
    assert code == 0
    assert out.splitlines()[-1].endswith("0 rules matching nothing; no findings")
    assert json_code == 1
    report = json.loads(json_out)
    assert report["lint"]["uncovered"][0] == {
        "method": "/api.v1.UserService/DeleteAccount",
        "level": "access",
        "reflection": False,
    }
    assert report["lint"]["unmatched"][0] == {
        "pattern": "/api.v1.UserService/GetProfil",
        "line": line_of(TYPO_POLICY, "GetProfil:"),
        "level": "access",
        "kind": "method",
    }
    assert report["lint"]["summary"]["findings"] == 4


def test_cli_unreachable_backend_exits_2_with_one_line(tmp_path: Path) -> None:
    where = f"127.0.0.1:{free_port()}"  # nothing listens there
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHPROXY_")}
    check = ["policy", "check", str(REPO / "policy.yaml"), "--backend", where]
    result = subprocess.run(
        [sys.executable, "-m", "authproxy", *check],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    prefix = f"authproxy: error: backend {where}: reflection not answering (UNAVAILABLE: "
    assert result.stderr.startswith(prefix), result.stderr


def test_json_report_has_the_documented_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "test.yaml"
    policy.write_text(TEST_POLICY)
    protoset = str(descriptor_set(tmp_path / "echo.protoset"))
    code = main(["policy", "check", str(policy), "--descriptor-set", protoset, "--format", "json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0  # findings are warnings without --strict
    assert set(report) == {"file", "valid", "version", "rules", "errors", "strict", "lint"}
    assert (report["valid"], report["rules"], report["errors"]) == (True, 7, [])
    lint_keys = {"sources", "served", "default", "uncovered", "unmatched", "wildcard_only"}
    assert set(report["lint"]) == lint_keys | {"summary"}
    assert report["lint"]["sources"] == [protoset]
    assert report["lint"]["default"] == {"level": "access", "line": 2}
    assert set(report["lint"]["wildcard_only"][0]) == {
        "service",
        "pattern",
        "line",
        "level",
        "methods",
    }
    assert report["lint"]["summary"] == {
        "served": 72,
        "by_exact": 0,
        "by_wildcard": 63,
        "by_default": 9,
        "unmatched": 0,
        "findings": 9,
    }


def test_strict_with_protosets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    protoset = str(descriptor_set(tmp_path / "echo.protoset"))
    partial, full = tmp_path / "partial.yaml", tmp_path / "full.yaml"
    partial.write_text(TEST_POLICY)
    full.write_text(TEST_POLICY + "  /test.Other/*: access\n")
    args = ["--descriptor-set", protoset, "--strict"]
    assert main(["policy", "check", str(partial), *args]) == 1
    assert "error: 9 served methods without a rule" in capsys.readouterr().out
    assert main(["policy", "check", str(full), *args]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("no findings")


def test_invalid_policy_keeps_exit_1_and_json_lists_the_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nmethods:\n  /a.B/C: public\n  /a.B/D: acess\n")
    protoset = str(descriptor_set(tmp_path / "echo.protoset"))
    code = main(["policy", "check", str(bad), "--descriptor-set", protoset, "--format", "json"])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.err.startswith(f"{bad}:4: unknown level 'acess'")
    report = json.loads(captured.out)
    assert (report["valid"], report["version"], report["lint"]) == (False, None, None)
    assert report["errors"][0]["line"] == 4
    assert report["errors"][0]["message"].startswith("unknown level 'acess'")


def test_unreadable_protoset_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "absent.protoset"
    code = main(["policy", "check", str(REPO / "policy.yaml"), "--descriptor-set", str(missing)])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert captured.err == (
        f"authproxy: error: {missing}: cannot read descriptor set: No such file or directory\n"
    )


async def test_the_readme_sample_is_what_policy_check_prints(example: Example) -> None:
    """The README's `policy check` sample against the example backend is the command's
    real output, line for line (the policy's version hash and the port aside)."""
    readme = (REPO / "README.md").read_text()
    command = "$ authproxy policy check policy.yaml --backend 127.0.0.1:50051 --strict\n"
    sample = readme[readme.index(command) + len(command) :].split("```", 1)[0].splitlines()
    code, out, err = await cli(
        "policy", "check", "policy.yaml", "--backend", address(example), "--strict", cwd=REPO
    )
    assert code == 1, err  # --strict: the sample's unmatched rule is an error
    real = out.splitlines()
    version = re.compile(r"version [0-9a-f]{12}")
    shown = [version.sub("version V", line.replace(address(example), "127.0.0.1:50051"))
             for line in real]  # fmt: skip
    assert shown == [version.sub("version V", line) for line in sample]
