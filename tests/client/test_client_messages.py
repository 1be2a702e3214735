"""The client library ships the auth API messages it calls (`authproxy.client.auth_api_pb2`)
instead of importing a backend's generated code. They must stay byte-compatible with the
example backend's api.v1: same fields, numbers and types, message by message."""

from __future__ import annotations

from authproxy.client import auth_api_pb2
from examples.backend.api.v1 import api_pb2


def _fields(descriptor) -> dict[str, tuple[int, int, bool]]:
    return {f.name: (f.number, f.type, f.is_repeated) for f in descriptor.fields}


def test_every_client_message_has_the_fields_of_the_backend_message_of_its_name():
    ours = auth_api_pb2.DESCRIPTOR.message_types_by_name
    theirs = api_pb2.DESCRIPTOR.message_types_by_name
    assert set(ours) == {
        "LoginRequest", "LoginResponse", "Verify2FARequest", "TokenResponse",
        "ResendCodeRequest", "ResendCodeResponse", "RefreshTokenRequest", "LogoutRequest",
    }  # fmt: skip
    for name, descriptor in ours.items():
        assert _fields(descriptor) == _fields(theirs[name]), name


def test_a_backend_answer_parses_as_the_client_message_and_back():
    sent = api_pb2.LoginResponse(
        requires_2fa=True, temp_token="t", access_token="a", refresh_token="r", expires_in=300
    )
    read = auth_api_pb2.LoginResponse.FromString(sent.SerializeToString())
    assert (read.requires_2fa, read.temp_token, read.expires_in) == (True, "t", 300)
    back = api_pb2.LoginResponse.FromString(read.SerializeToString())
    assert back == sent


def test_the_client_package_imports_no_example_code():
    import subprocess
    import sys

    probe = (
        "import sys, authproxy.client\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] in ('examples', 'tests')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd="/", capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
