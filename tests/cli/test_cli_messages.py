"""What `authproxy` says to someone who has not read its help yet: a command group given no
command lists its commands, a mistyped flag is named with the closest real one and the
`--help` of the command it was typed under, and a busy port is one clean error line."""

from __future__ import annotations

import argparse
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from authproxy.cli.main import build_parser, main
from authproxy.keys import keygen
from tests.support.cli import authproxy

REPO = Path(__file__).resolve().parents[2]
POLICY = str(REPO / "policy.yaml")
SECRET_ENV = "CLI_MESSAGES_REFRESH_SECRET"


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return authproxy(
        *args, cwd=cwd, env={SECRET_ENV: "cli-messages-refresh-secret-0123456789abcdef"}
    )


def usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """`authproxy ARGV`'s one error line (exit 2, nothing else on stdout or stderr)."""
    with pytest.raises(SystemExit) as ended:
        main(argv)
    assert ended.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("authproxy: error: "), err
    return lines[0]


def groups(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple]:
    """(the words naming a command group, its commands), for every group at any depth."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield path, list(action.choices)
            for name, sub in action.choices.items():
                yield from groups(sub, (*path, name))


# --- a command group without a command ------------------------------------------------------


def test_every_command_group_lists_its_commands(capsys: pytest.CaptureFixture[str]) -> None:
    found = list(groups(build_parser()))
    assert {path for path, _ in found} >= {(), ("policy",), ("token",)}
    for path, commands in found:
        line = usage_error(list(path), capsys)
        prog = " ".join(("authproxy", *path))
        listed = ", ".join(commands)
        where = "" if not path else f"{prog}: "
        assert line == (
            f"authproxy: error: {where}choose a command: {listed} (see '{prog} --help')"
        )
        assert "the following arguments are required" not in line


def test_policy_without_a_command_names_check(tmp_path: Path) -> None:
    result = run("policy", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(
        "authproxy: error: authproxy policy: choose a command: check, test, table, diff"
    ), result.stderr
    assert result.stderr.rstrip().endswith("(see 'authproxy policy --help')")
    assert "policy_command" not in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_bare_authproxy_names_its_commands(tmp_path: Path) -> None:
    result = run(cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == (
        "authproxy: error: choose a command: serve, policy, explain, keygen, token"
        " (see 'authproxy --help')\n"
    )


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["polcy"], "unknown command 'polcy' (did you mean policy?); choose a command: serve,"
         " policy, explain, keygen, token (see 'authproxy --help')"),
        (["policy", "chek"], "authproxy policy: unknown command 'chek' (did you mean check?);"
         " choose a command: check, test, table, diff (see 'authproxy policy --help')"),
        (["token", "zzz"], "authproxy token: unknown command 'zzz'; choose a command: mint"
         " (see 'authproxy token --help')"),
    ],
)  # fmt: skip
def test_an_unknown_command_names_the_closest_and_the_others(
    capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    line = usage_error(argv, capsys)
    assert line == f"authproxy: error: {expected}"
    assert "_command" not in line  # no argparse destination names


# --- a mistyped flag ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "typed", "meant", "command"),
    [
        (["serve", "--polcy", "x"], "--polcy x", "--policy", "authproxy serve"),
        (["serve", "--polcy=x"], "--polcy=x", "--policy", "authproxy serve"),
        (["serve", "--lisen", "127.0.0.1:0"], "--lisen 127.0.0.1:0", "--listen", "authproxy serve"),
        (["policy", "check", "p.yaml", "--strct"], "--strct", "--strict", "authproxy policy check"),
        (["keygen", "--alg2", "ES256"], "--alg2 ES256", "--alg", "authproxy keygen"),
        (["explain", "/a.B/C", "--tokn", "t"], "--tokn t", "--token", "authproxy explain"),
        # A mistyped required flag is named as mistyped, not as missing.
        (["token", "mint", "--tpe", "access", "--sub", "al"], "--tpe access", "--type",
         "authproxy token mint"),
    ],
)  # fmt: skip
def test_a_mistyped_flag_names_the_closest_one_and_its_commands_help(
    capsys: pytest.CaptureFixture[str], argv: list[str], typed: str, meant: str, command: str
) -> None:
    line = usage_error(argv, capsys)
    assert line == (
        f"authproxy: error: unrecognized arguments: {typed}; did you mean {meant}?"
        f" (see '{command} --help')"
    )


def test_an_unknown_flag_with_no_close_one_suggests_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    line = usage_error(["token", "mint", "--type", "access", "--sub", "al", "--frob"], capsys)
    assert line == (
        "authproxy: error: unrecognized arguments: --frob (see 'authproxy token mint --help')"
    )


def test_a_missing_flag_is_still_named_as_missing(capsys: pytest.CaptureFixture[str]) -> None:
    line = usage_error(["token", "mint", "--sub", "al"], capsys)
    assert line == (
        "authproxy: error: the following arguments are required: --type"
        " (see 'authproxy token mint --help')"
    )


def test_a_mistyped_serve_flag_as_the_user_sees_it(tmp_path: Path) -> None:
    result = run("serve", "--polcy", "x", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == (
        "authproxy: error: unrecognized arguments: --polcy x; did you mean --policy?"
        " (see 'authproxy serve --help')\n"
    )


# --- a port already in use ------------------------------------------------------------------


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port something else listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize(
    ("flag", "others"),
    [
        ("--listen", ["--upstream", "127.0.0.1:1"]),
        ("--ext-authz-grpc", []),
        ("--ext-authz-http", []),
        ("--admin", ["--ext-authz-grpc", "127.0.0.1:0"]),
    ],
)
def test_a_busy_port_is_one_clean_error_line(
    tmp_path: Path, busy_port: int, flag: str, others: list[str]
) -> None:
    jwks = tmp_path / "jwks.json"
    keygen.keygen_run("ES256", tmp_path / "signing.pem", jwks)
    address = f"127.0.0.1:{busy_port}"
    result = run(
        "serve", "--policy", POLICY, "--jwks", str(jwks),
        "--hmac-secret-env", f"refresh-hmac={SECRET_ENV}",
        "--state-file", str(tmp_path / "state.json"), "--log-level", "warning",
        flag, address, *others,
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    # Only the error: no gRPC core log line (`E1205 ... add_port.cc`), no traceback.
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("authproxy: error: "), result.stderr
    assert f"{flag} {address}" in lines[0]  # names the flag and the address
    assert "address already in use" in lines[0].lower()
