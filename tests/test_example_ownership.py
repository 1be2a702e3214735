"""Request-field ownership with the example backend behind the real proxy: GetProfile and
DeleteAccount take a `user_id`, and policy.yaml's `request:` rule lets a caller name only
themselves (or nobody: their own), admins anyone. The backend holds no such check: a
refused call never reaches it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from examples.backend.api.v1 import api_pb2
from tests.support.example_backend import ADMIN_EMAIL, Proxied, reason_of, running_behind_proxy
from tests.support.tokens import bearer


class Seen(grpc.aio.ServerInterceptor):
    """The backend's record of the calls that reached it."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    async def intercept_service(self, continuation, details):
        self.methods.append(details.method)
        return await continuation(details)


@pytest.fixture
async def proxied(tmp_path: Path) -> AsyncIterator[tuple[Proxied, Seen]]:
    seen = Seen()
    async with running_behind_proxy(tmp_path, interceptors=[seen]) as running:
        yield running, seen  # once the backend's reflection named the request types


async def test_a_user_reads_only_their_own_profile_and_an_admin_any(proxied):
    p, seen = proxied
    alice_id, alice = await p.account("alice@example.com")
    bob_id, _ = await p.account("bob@example.com")
    _, admin = await p.account(ADMIN_EMAIL)
    as_alice = bearer(alice.access_token)

    own = await p.users.GetProfile(api_pb2.GetProfileRequest(), metadata=as_alice)
    assert own.user_id == alice_id  # unset: the caller's own (allow_unset)
    named = await p.users.GetProfile(api_pb2.GetProfileRequest(user_id=alice_id), metadata=as_alice)
    assert named.user_id == alice_id

    before = list(seen.methods)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await p.users.GetProfile(api_pb2.GetProfileRequest(user_id=bob_id), metadata=as_alice)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason_of(refused.value) == "FIELD_MISMATCH"
    assert "user_id" in refused.value.details() and bob_id not in refused.value.details()
    assert seen.methods == before  # the backend never saw it

    other = await p.users.GetProfile(
        api_pb2.GetProfileRequest(user_id=bob_id), metadata=bearer(admin.access_token)
    )
    assert other.email == "bob@example.com"


async def test_only_an_admin_deletes_another_account(proxied):
    p, _ = proxied
    _, quinn = await p.account("quinn@example.com")
    rupert_id, _ = await p.account("rupert@example.com")
    _, admin = await p.account(ADMIN_EMAIL)
    other = api_pb2.DeleteAccountRequest(user_id=rupert_id)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await p.users.DeleteAccount(other, metadata=bearer(quinn.access_token))
    assert reason_of(refused.value) == "FIELD_MISMATCH"
    assert p.example.backend.store.user(rupert_id) is not None
    deleted = await p.users.DeleteAccount(other, metadata=bearer(admin.access_token))
    assert deleted.user_id == rupert_id
    own = await p.users.DeleteAccount(
        api_pb2.DeleteAccountRequest(), metadata=bearer(quinn.access_token)
    )
    assert p.example.backend.store.user(own.user_id) is None
