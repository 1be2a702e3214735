"""The example UserService and DataService (no auth code: they read x-auth-subject and
x-auth-roles), the backend's health and reflection services, and its command line.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import empty_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from authproxy.keys.keygen import keygen
from examples.backend.api.v1 import api_pb2, api_pb2_grpc
from tests.support.example_backend import (
    ADMIN_EMAIL,
    POLICY,
    REPO,
    rpc_error,
)

# --- UserService -----------------------------------------------------------------------


async def test_search_public_users_matches_usernames_and_shows_public_fields_only(example):
    for name in ("Mallory", "mallard", "oscar"):
        await example.signup(f"{name.lower()}@example.com", username=name)
    found = await example.users.SearchPublicUsers(api_pb2.SearchRequest(query="MALL"))
    assert found.total_count == 2
    assert sorted(u.username for u in found.users) == ["Mallory", "mallard"]
    for user in found.users:
        assert user.user_id and user.created_at.seconds > 0
        assert user.email == "" and list(user.roles) == []

    second = await example.users.SearchPublicUsers(api_pb2.SearchRequest(limit=1, offset=1))
    assert second.total_count == 3
    assert [u.username for u in second.users] == ["mallard"]


async def test_update_profile_changes_the_callers_own_username(example):
    user_id, login = await example.account("peggy@example.com", username="peggy")
    md = example.md(login.access_token)
    updated = await example.users.UpdateProfile(
        api_pb2.UpdateProfileRequest(username="Peggy S."), metadata=md
    )
    assert (updated.user_id, updated.username) == (user_id, "Peggy S.")
    error = await rpc_error(
        example.users.UpdateProfile(api_pb2.UpdateProfileRequest(), metadata=md)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_list_users_lists_everyone_and_names_the_subject_it_saw(example):
    await example.account("sybil@example.com")
    admin_id, admin = await example.account(ADMIN_EMAIL)
    listed = await example.users.ListUsers(
        api_pb2.ListUsersRequest(), metadata=example.md(admin.access_token)
    )
    assert listed.total_count == 2
    assert {u.email for u in listed.users} == {"sybil@example.com", ADMIN_EMAIL}
    assert listed.requested_by == admin_id


# --- DataService -----------------------------------------------------------------------


async def test_records_belong_to_the_subject_and_others_are_not_found(example):
    trent_id, trent = await example.account("trent@example.com")
    _, victor = await example.account("victor@example.com")
    mine, theirs = example.md(trent.access_token), example.md(victor.access_token)

    created = await example.data.CreateRecord(api_pb2.CreateRecordRequest(data="v1"), metadata=mine)
    assert (created.owner, created.data) == (trent_id, "v1")
    await example.data.CreateRecord(api_pb2.CreateRecordRequest(data="victor's"), metadata=theirs)

    got = await example.data.GetRecord(api_pb2.GetRecordRequest(id=created.id), metadata=mine)
    assert got.data == "v1"
    updated = await example.data.UpdateRecord(
        api_pb2.UpdateRecordRequest(id=created.id, data="v2"), metadata=mine
    )
    assert (
        updated.data == "v2"
        and updated.updated_at.ToNanoseconds() >= got.updated_at.ToNanoseconds()
    )

    listed = await example.data.ListRecords(api_pb2.ListRecordsRequest(), metadata=mine)
    assert listed.total_count == 1 and [r.id for r in listed.records] == [created.id]

    for call in (
        example.data.GetRecord(api_pb2.GetRecordRequest(id=created.id), metadata=theirs),
        example.data.UpdateRecord(api_pb2.UpdateRecordRequest(id=created.id), metadata=theirs),
        example.data.DeleteRecord(api_pb2.DeleteRecordRequest(id=created.id), metadata=theirs),
    ):
        assert (await rpc_error(call)).code() == grpc.StatusCode.NOT_FOUND

    await example.data.DeleteRecord(api_pb2.DeleteRecordRequest(id=created.id), metadata=mine)
    error = await rpc_error(
        example.data.GetRecord(api_pb2.GetRecordRequest(id=created.id), metadata=mine)
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND


# --- public answers, health and reflection ---------------------------------------------


async def test_public_health_check_and_password_reset_answers(example):
    assert (await example.auth.HealthCheck(empty_pb2.Empty())).status == "SERVING"
    await example.signup("wendy@example.com")
    known = await example.auth.InitiatePasswordReset(
        api_pb2.PasswordResetRequest(email="wendy@example.com")
    )
    unknown = await example.auth.InitiatePasswordReset(
        api_pb2.PasswordResetRequest(email="nobody@example.com")
    )
    assert known.message == unknown.message != ""


async def test_grpc_health_is_serving_and_reflection_lists_the_services(example):
    health = health_pb2_grpc.HealthStub(example.channel)
    for service in ("", "api.v1.AuthService", "api.v1.UserService", "api.v1.DataService"):
        answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING

    stub = reflection_pb2_grpc.ServerReflectionStub(example.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = [r async for r in stub.ServerReflectionInfo(iter([request]))]
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"api.v1.AuthService", "api.v1.UserService", "api.v1.DataService"} <= names
    assert "grpc.health.v1.Health" in names


# --- the command line ------------------------------------------------------------------


def _cli(tmp_path: Path, *extra: str) -> list[str]:
    key = tmp_path / "signing.pem"
    if not key.exists():
        keygen("ES256", key, tmp_path / "jwks.json")
    return [
        sys.executable,
        "-m",
        "examples.backend",
        "--policy",
        str(POLICY),
        "--signing-key",
        str(key),
        "--refresh-secret-env",
        "EXAMPLE_TEST_REFRESH_SECRET",
        *extra,
    ]


def test_cli_serves_and_says_where(tmp_path: Path):
    env = {**os.environ, "EXAMPLE_TEST_REFRESH_SECRET": secrets.token_urlsafe(40)}
    proc = subprocess.Popen(
        _cli(tmp_path, "--listen", "127.0.0.1:0"),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("backend listening on 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = api_pb2_grpc.AuthServiceStub(channel)
            assert stub.HealthCheck(empty_pb2.Empty(), timeout=10).status == "SERVING"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert proc.returncode == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--listen", "127.0.0.1"], "--listen must be HOST:PORT"),
        (["--listen", "127.0.0.1:0", "--access-ttl", "-5"], "--access-ttl"),
        (["--listen", "127.0.0.1:0", "--refresh-kid", "other"], "refresh-hmac"),
        (["--listen", "127.0.0.1:0", "--policy", "missing.yaml"], "missing.yaml"),
        (["--listen", "127.0.0.1:0", "--proxy-admin", "127.0.0.1:9901"], "http:// or https://"),
        (["--listen", "127.0.0.1:0", "--proxy-admin", "http://h:70000"], "--proxy-admin"),
        (
            ["--listen", "127.0.0.1:0", "--proxy-admin-token-env", "EXAMPLE_TEST_REFRESH_SECRET"],
            "--proxy-admin-token-env needs --proxy-admin",
        ),
        (
            [
                "--listen",
                "127.0.0.1:0",
                "--proxy-admin",
                "http://127.0.0.1:9901",
                "--proxy-admin-token-env",
                "EXAMPLE_TEST_UNSET_ADMIN_TOKEN",
            ],
            "EXAMPLE_TEST_UNSET_ADMIN_TOKEN is not set",
        ),
    ],
)
def test_cli_reports_bad_flags_in_one_line(tmp_path: Path, extra: list[str], message: str):
    env = {**os.environ, "EXAMPLE_TEST_REFRESH_SECRET": secrets.token_urlsafe(40)}
    done = subprocess.run(
        _cli(tmp_path, *extra), cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("examples.backend: error:"), done.stderr
    assert message in lines[0]


def test_cli_refuses_a_missing_refresh_secret(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k != "EXAMPLE_TEST_REFRESH_SECRET"}
    done = subprocess.run(
        _cli(tmp_path, "--listen", "127.0.0.1:0"),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "EXAMPLE_TEST_REFRESH_SECRET is not set" in done.stderr
