"""The tests' policy (`TEST_POLICY`: one service per level under `/test.<Service>/*`), its
services, its single-use variant, and `descriptor_set`, a protoset naming the echo
backend's methods for each of those services; `HEAD` and `problems` for validation tests
that append rules to a minimal policy."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from authproxy.policy.loader import PolicyError, parse_policy
from tests.support.echo_backend import UNARY

TEST_POLICY = """\
version: 1
default: access
issuer: test-issuer
leeway: 5s
tokens:
  2fa:     {type: 2fa_pending, audience: 2fa-verification}
  refresh: {type: refresh, audience: token-refresh, keys: [refresh-hmac]}
  access:  {type: access, audience: api-access}
methods:
  /test.Public/*: public
  /test.TwoFA/*: 2fa
  /test.Refresh/*: refresh
  /test.Access/*: access
  /test.Admin/*: {level: access, roles: [admin]}
  /test.Denied/*: deny
  /test.Forward/*: {level: access, forward_token: true}
"""
SERVICES = ("Public", "TwoFA", "Refresh", "Access", "Admin", "Denied", "Forward", "Other")

#: TEST_POLICY's refresh rule, which its single-use variants replace.
REFRESH_LINE = "  /test.Refresh/*: refresh\n"
assert REFRESH_LINE in TEST_POLICY
SINGLE_USE_POLICY = TEST_POLICY.replace(
    REFRESH_LINE, "  /test.Refresh/*: {level: refresh, single_use: true}\n"
)


def descriptor_set(path: Path) -> Path:
    """A protoset naming the echo backend's methods with their real kinds."""
    fd = descriptor_pb2.FileDescriptorProto(name="test/echo.proto", package="test")
    for service in SERVICES:
        svc = fd.service.add(name=service)
        for name in (*UNARY, "Count", "Sum", "Chat"):
            svc.method.add(
                name=name,
                input_type=".test.Bytes",
                output_type=".test.Bytes",
                client_streaming=name in ("Sum", "Chat"),
                server_streaming=name in ("Count", "Chat"),
            )
    path.write_bytes(descriptor_pb2.FileDescriptorSet(file=[fd]).SerializeToString())
    return path


#: A policy's first five lines, up to `methods:`: rules appended to it start on line 6.
HEAD = """\
version: 1
default: deny
tokens:
  access: {type: access, audience: api}
methods:
"""


def problems(methods: str) -> list[str]:
    """The `p.yaml:line: problem` lines of HEAD + `methods`, which must not load."""
    with pytest.raises(PolicyError) as caught:
        parse_policy(HEAD + methods, "p.yaml")
    return [str(e) for e in caught.value.errors]
