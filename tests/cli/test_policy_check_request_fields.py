"""`authproxy policy check --descriptor-set`: a `request:` field the method's type lacks
(or cannot compare) is an error naming the file and line, as the proxy would refuse it at
start; a field the type has passes to the usual lint report."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.cli import authproxy
from tests.support.owned_messages import owned_protoset

POLICY = """\
version: 1
default: deny
tokens:
  access: {{type: access, audience: api}}
methods:
  /test.Owned/Echo:
    level: access
    request: {{equal_claims: {{{field}: sub}}}}
"""


@pytest.mark.parametrize(
    ("field", "problem"),
    [
        ("user_idd", "owned.Owned has no field 'user_idd'"),
        ("tags", "field tags is repeated"),
        ("blob", "field blob is not a string or an integer"),
        ("filter", "field filter is not a string or an integer"),
        ("filter.nope", "owned.Inner has no field 'nope'"),
    ],
)
def test_a_field_the_type_cannot_check_is_an_error_on_its_line(
    tmp_path: Path, field: str, problem: str
):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(field=field))
    protoset = owned_protoset(tmp_path / "owned.protoset")
    done = authproxy(
        "policy", "check", str(policy), "--descriptor-set", str(protoset), cwd=tmp_path
    )
    assert done.returncode == 1, done.stdout
    assert done.stderr.startswith(f"{policy}:8: /test.Owned/Echo: request field {field} of ")
    assert problem in done.stderr


def test_fields_the_type_has_pass_to_the_lint(tmp_path: Path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(field="filter.owner_id"))
    protoset = owned_protoset(tmp_path / "owned.protoset")
    done = authproxy(
        "policy", "check", str(policy), "--descriptor-set", str(protoset), cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
