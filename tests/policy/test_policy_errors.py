"""Policy errors an operator can act on: YAML syntax errors with line, column and a hint in
plain words, and misspelled keys with a did-you-mean and nothing derived from them.

Files are real files loaded with `load_policy` (what `authproxy policy check` runs); a few go
through the command itself, as a subprocess."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from authproxy.policy import yaml_source
from authproxy.policy.loader import PolicyError, load_policy
from tests.support.cli import authproxy

TOKENS = "version: 1\ntokens:\n  access: {type: access, audience: api}\n"  # lines 1-3

TAB = "tabs are not allowed for indentation in YAML: use spaces"
INDENT = "check the indentation of this line against the line above"
QUOTE = "a quote opened here is never closed"

#: (id, text, line, column, hint): line and column are where the fix goes.
YAML_CASES = [
    ("tab-indentation", TOKENS + "methods:\n\t/a.B/C: access\n", 5, 1, TAB),
    ("tab-after-spaces", TOKENS + "methods:\n  /a.B/C:\n  \tlevel: access\n", 6, 3, TAB),
    (
        "under-indented-key",
        TOKENS + "methods:\n  /a.B/C:\n    level: access\n   roles: [admin]\n",
        7,
        4,
        INDENT,
    ),
    (
        "over-indented-key",
        TOKENS + "methods:\n  /a.B/C: access\n   /a.B/D: access\n",
        6,
        10,
        INDENT,
    ),
    ("unclosed-double-quote", TOKENS + 'default: "access\nleeway: 5s\n', 4, 10, QUOTE),
    ("unclosed-single-quote", TOKENS + "methods:\n  '/a.B/C: access\n", 5, 3, QUOTE),
    (
        "quote-closed-lines-later",
        TOKENS + 'default: "access\nmethods:\n  /a.B/C: "deny"\n',
        4,
        10,
        QUOTE + ": the value runs on to line 6",
    ),
    (
        "unclosed-brace",
        TOKENS + "methods:\n  /a.B/C: {level: access, roles: [a]\n  /a.B/D: deny\n",
        5,
        11,
        "a '{' opened here is never closed: add the '}'",
    ),
    (
        "unclosed-bracket-at-end",
        TOKENS + "methods:\n  /a.B/C: {level: access, roles: [a, b\n",
        5,
        34,
        "a '[' opened here is never closed: add the ']'",
    ),
    (
        "missing-comma",
        TOKENS + "methods:\n  /a.B/C: {level: access roles: [a]}\n",
        5,
        31,
        "a ',' is missing between two items here, or the '{' at column 11 is never closed",
    ),
    (
        "colon-in-value",
        TOKENS + "issuer: https: x\n",
        4,
        14,
        "a value that contains ': ' must be put in quotes",
    ),
    (
        "missing-space",
        TOKENS + "default:access\nleeway: 5s\n",
        4,
        1,
        "put a space after ':', like 'key: value'",
    ),
]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


def problems(path: Path) -> list[str]:
    """The lines `authproxy policy check` prints for an invalid file."""
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    return str(info.value).splitlines()


@pytest.mark.parametrize(
    ("text", "line", "column", "hint"), [c[1:] for c in YAML_CASES], ids=[c[0] for c in YAML_CASES]
)
def test_yaml_syntax_error_names_line_column_and_a_hint(
    tmp_path: Path, text: str, line: int, column: int, hint: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    (error,) = info.value.errors
    assert (error.line, error.column) == (line, column)
    (shown,) = str(info.value).splitlines()
    assert shown.startswith(f"{path}:{line}: invalid YAML at column {column}: "), shown
    assert shown.endswith(f" (hint: {hint})"), shown
    assert "Traceback" not in shown


@pytest.mark.parametrize(
    ("text", "line", "column", "hint"), [c[1:] for c in YAML_CASES], ids=[c[0] for c in YAML_CASES]
)
def test_hints_are_the_same_with_the_pure_python_parser(
    text: str, line: int, column: int, hint: str
) -> None:
    """libyaml and PyYAML's own parser word errors differently: the hint reads the text."""
    with pytest.raises(yaml.MarkedYAMLError) as info:
        yaml.load(text, Loader=yaml.SafeLoader)
    error = yaml_source._syntax_error(info.value, text, "p.yaml")
    assert (error.line, error.column) == (line, column)
    assert error.problem.endswith(f" (hint: {hint})"), error.problem


def test_an_impossible_date_is_a_located_error_not_an_exception(tmp_path: Path) -> None:
    path = write(tmp_path, TOKENS + "default: 2024-13-45\n")
    (shown,) = problems(path)
    assert shown.startswith(f"{path}:4: invalid date '2024-13-45': "), shown
    assert shown.endswith("(hint: put the value in quotes if it is no date)")


def test_deep_nesting_is_a_policy_error_not_a_crash(tmp_path: Path) -> None:
    path = write(tmp_path, TOKENS + "default: " + "[" * 400 + "]" * 400 + "\n")
    assert problems(path) == [f"{path}: invalid YAML: nested too deeply"]


# --- misspelled keys ------------------------------------------------------------------------


def test_misspelled_level_in_a_rule_is_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, TOKENS + "methods:\n  /a.B/C:\n    levle: access\n    roles: [admin]\n")
    assert problems(path) == [
        f"{path}:6: unknown key in rule /a.B/C 'levle': did you mean 'level'?"
    ]


def test_misspelled_top_level_key_is_one_line(tmp_path: Path) -> None:
    text = "version: 1\ntokns:\n  access: {type: access, audience: api}\n"
    path = write(tmp_path, text + "default: access\nmethods:\n  /a.B/C: access\n")
    assert problems(path) == [f"{path}:2: unknown top-level key 'tokns': did you mean 'tokens'?"]


def test_misspelled_token_key_is_one_line(tmp_path: Path) -> None:
    text = "version: 1\ntokens:\n  access: {type: access, audiense: api}\n"
    path = write(tmp_path, text + "methods:\n  /a.B/C: access\n  /a.B/D: access\n")
    assert problems(path) == [
        f"{path}:3: unknown key in tokens.access 'audiense': did you mean 'audience'?"
    ]


def test_misspelled_token_level_is_one_line(tmp_path: Path) -> None:
    text = "version: 1\ntokens:\n  acess: {type: access, audience: api}\n"
    path = write(tmp_path, text + "methods:\n  /a.B/C: access\n")
    assert problems(path) == [f"{path}:3: unknown token level 'acess': did you mean 'access'?"]


def test_misspelled_rate_limit_key_is_one_line(tmp_path: Path) -> None:
    path = write(
        tmp_path, TOKENS + "methods:\n  /a.B/C: {level: access, rate_limit: {limt: 5/second}}\n"
    )
    assert problems(path) == [
        f"{path}:5: unknown key in the rate limit of /a.B/C 'limt': did you mean 'limit'?"
    ]


def test_a_misspelling_and_other_errors_are_all_reported_in_file_order(tmp_path: Path) -> None:
    text = (
        TOKENS
        + "methods:\n"  # 4
        + "  /a.B/C:\n"  # 5
        + "    levle: access\n"  # 6
        + "    roles: [admin]\n"  # 7
        + "  /a.B/D: acess\n"  # 8
        + "  /a.B/E: {levle: public, single_use: true}\n"  # 9
        + "leeway: 10m\n"  # 10
    )
    path = write(tmp_path, text)
    assert problems(path) == [
        f"{path}:6: unknown key in rule /a.B/C 'levle': did you mean 'level'?",
        f"{path}:8: unknown level 'acess' for /a.B/D "
        "(expected one of public, 2fa, refresh, access, deny)",
        f"{path}:9: unknown key in rule /a.B/E 'levle': did you mean 'level'?",
        # still wrong once the key is fixed, so it is reported
        f"{path}:9: /a.B/E: single_use needs a token level, not 'public'",
        f"{path}:10: 'leeway' must be between 0 and 300, got '10m'",
    ]


def test_a_missing_level_is_not_judged_as_deny(tmp_path: Path) -> None:
    """No close key: the rule has no level, and that is all that is said about levels."""
    path = write(tmp_path, TOKENS + "methods:\n  /a.B/C: {tier: access, roles: [admin]}\n")
    assert problems(path) == [
        f"{path}:5: unknown key in rule /a.B/C 'tier' (allowed: level, roles, permissions,"
        " scopes, forward_token, single_use, revoke_on_reuse, rate_limit, end_streams, mode,"
        " peers, when, request)",
        f"{path}:5: rule /a.B/C has no 'level'",
    ]


def test_a_broken_token_level_is_not_reported_again_by_each_rule(tmp_path: Path) -> None:
    text = "version: 1\ntokens:\n  access: {type: access, aud: api}\n"
    path = write(tmp_path, text + "methods:\n  /a.B/C: access\n  /a.B/D: access\n")
    assert problems(path) == [
        f"{path}:3: unknown key in tokens.access 'aud' (allowed: type, audience, issuer, keys,"
        " type_claim, claims)",
        f"{path}:3: tokens.access has no 'audience': every token type needs one",
    ]


def test_a_suggestion_is_only_a_key_not_already_set(tmp_path: Path) -> None:
    rule = "{level: access, levle: deny, rols: [admin]}"
    path = write(tmp_path, TOKENS + f"methods:\n  /a.B/C: {rule}\n")
    levle, rols = problems(path)
    assert levle.startswith(f"{path}:5: unknown key in rule /a.B/C 'levle' (allowed: level,")
    assert rols == f"{path}:5: unknown key in rule /a.B/C 'rols': did you mean 'roles'?"


# --- through the command --------------------------------------------------------------------


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return authproxy(*args, cwd=tmp_path)


def test_policy_check_prints_one_line_for_a_misspelled_key(tmp_path: Path) -> None:
    path = write(tmp_path, TOKENS + "methods:\n  /a.B/C:\n    levle: access\n")
    result = run(tmp_path, "policy", "check", str(path))
    assert result.returncode == 1, result.stderr  # 1: invalid policy (README, Other commands)
    assert result.stderr == f"{path}:6: unknown key in rule /a.B/C 'levle': did you mean 'level'?\n"
    assert result.stdout == ""


def test_policy_check_prints_one_line_for_a_tab(tmp_path: Path) -> None:
    path = write(tmp_path, TOKENS + "methods:\n\t/a.B/C: access\n")
    result = run(tmp_path, "policy", "check", str(path))
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"{path}:5: invalid YAML at column 1: ")
    assert line.endswith(f"(hint: {TAB})")


def test_serve_exits_2_with_the_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, TOKENS + "methods:\n  /a.B/C:\n    levle: access\n")
    args = ["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1"]
    result = run(tmp_path, "serve", "--policy", str(path), *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"authproxy: error: {path}:6: unknown key in rule /a.B/C 'levle': did you mean 'level'?\n"
    )
