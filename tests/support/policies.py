"""The tests' policy (`TEST_POLICY`: one service per level under `/test.<Service>/*`), its
services, its single-use variant, and `descriptor_set`, a protoset naming the echo
backend's methods for each of those services."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import descriptor_pb2

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
