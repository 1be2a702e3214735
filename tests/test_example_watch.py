"""DataService.WatchRecords, the example's server-streaming method: the caller's records
(x-auth-subject), the existing ones first when asked, then each create and update as it
happens; never another owner's. Real gRPC over loopback, directly (with the identity
headers the proxy sets) and through the real proxy, whose stream guard ends a watch when
its access token expires. Also `start_backend(interceptors=...)`.

`HANG_GUARD` only turns a hang into a failure; no assertion is about how long anything took.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authproxy.decide.reasons import Reason
from authproxy.keys.issuer import hmac_signing_key
from authproxy.keys.keygen import keygen
from authproxy.policy.loader import load_policy
from examples.backend.api.v1 import api_pb2
from examples.backend.data_service import WATCH_FELL_BEHIND
from examples.backend.server import BackendConfig, start_backend
from examples.backend.store import Store
from tests.support.example_backend import (
    POLICY,
    UNAUTH,
    Example,
    bearer,
    reason_of,
    running_behind_proxy,
)

HANG_GUARD = 10.0
WATCH = "/api.v1.DataService/WatchRecords"


def watch(example: Any, metadata: Any, include_existing: bool = False) -> Any:
    """Open a WatchRecords stream on `example`'s DataService stub (backend or proxy)."""
    request = api_pb2.WatchRecordsRequest(include_existing=include_existing)
    return example.data.WatchRecords(request, metadata=metadata)


async def next_record(call: Any) -> api_pb2.Record:
    async with asyncio.timeout(HANG_GUARD):
        message = await call.read()
    assert message is not grpc.aio.EOF, "the watch ended"
    return message


async def until(condition: Callable[[], bool]) -> None:
    """Wait for something the backend does on its own time (subscribing, unsubscribing)."""
    async with asyncio.timeout(HANG_GUARD):
        while not condition():
            await asyncio.sleep(0.01)


async def watching(store: Store, owner: str, count: int = 1) -> None:
    await until(lambda: store.watcher_count(owner) == count)


async def ended_with(call: Any) -> grpc.aio.AioRpcError:
    """Read the stream to its end; it must end with an error, which is returned."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async with asyncio.timeout(HANG_GUARD):
            while await call.read() is not grpc.aio.EOF:
                pass
    return info.value


def fields(record: api_pb2.Record) -> tuple[str, str, str]:
    return record.id, record.owner, record.data


async def create(example: Any, md: Any, data: str) -> api_pb2.Record:
    return await example.data.CreateRecord(api_pb2.CreateRecordRequest(data=data), metadata=md)


async def update(example: Any, md: Any, record_id: str, data: str) -> api_pb2.Record:
    request = api_pb2.UpdateRecordRequest(id=record_id, data=data)
    return await example.data.UpdateRecord(request, metadata=md)


# --- directly, with the identity headers -----------------------------------------------


async def test_watch_sends_existing_records_then_live_changes_in_order(example: Example):
    alice_id, alice = await example.account("alice@example.com")
    md = example.md(alice.access_token)
    first = await create(example, md, "one")
    second = await create(example, md, "two")

    call = watch(example, md, include_existing=True)
    try:
        assert [fields(await next_record(call)) for _ in range(2)] == [
            fields(first),
            fields(second),
        ]
        third = await create(example, md, "three")
        changed = await update(example, md, first.id, "one, changed")
        fourth = await create(example, md, "four")
        live = [await next_record(call) for _ in range(3)]
        assert [fields(r) for r in live] == [fields(third), fields(changed), fields(fourth)]
        assert live[1].updated_at == changed.updated_at
        assert {r.owner for r in live} == {alice_id}
    finally:
        call.cancel()


async def test_watch_never_sends_another_owners_records(example: Example):
    alice_id, alice = await example.account("alice@example.com")
    bob_id, bob = await example.account("bob@example.com")
    alice_md, bob_md = example.md(alice.access_token), example.md(bob.access_token)
    bobs_old = await create(example, bob_md, "bob's old")
    alices_old = await create(example, alice_md, "alice's old")

    alice_call = watch(example, alice_md, include_existing=True)
    bob_call = watch(example, bob_md)
    try:
        assert fields(await next_record(alice_call)) == fields(alices_old)  # not bob's
        await watching(example.backend.store, bob_id)
        await create(example, bob_md, "bob's new")
        await update(example, bob_md, bobs_old.id, "bob's changed")
        # Bob cannot touch alice's record either, so nothing of this reaches anyone.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await update(example, bob_md, alices_old.id, "bob was here")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        alices_new = await create(example, alice_md, "alice's new")

        # Streams keep order: bob's changes came before alice's new record, so had any
        # of them been sent to alice, it would be read here instead.
        assert fields(await next_record(alice_call)) == fields(alices_new)
        bobs = [await next_record(bob_call) for _ in range(2)]
        assert [(r.owner, r.data) for r in bobs] == [
            (bob_id, "bob's new"),
            (bob_id, "bob's changed"),
        ]
        mark = await create(example, bob_md, "bob's mark")
        assert fields(await next_record(bob_call)) == fields(mark)  # alice's never came
        assert alices_new.owner == alice_id
    finally:
        alice_call.cancel()
        bob_call.cancel()


async def test_watch_without_include_existing_sends_only_later_changes(example: Example):
    alice_id, alice = await example.account("alice@example.com")
    md = example.md(alice.access_token)
    await create(example, md, "before the watch")

    call = watch(example, md, include_existing=False)
    try:
        await watching(example.backend.store, alice_id)
        later = await create(example, md, "after the watch")
        assert fields(await next_record(call)) == fields(later)
    finally:
        call.cancel()


async def test_watch_without_identity_is_unauthenticated(example: Example):
    _, alice = await example.account("alice@example.com")
    await create(example, example.md(alice.access_token), "alice's")

    error = await ended_with(watch(example, (), include_existing=True))
    assert error.code() == UNAUTH
    assert example.backend.store.watcher_count() == 0


async def test_cancelling_a_watch_unsubscribes_it(example: Example):
    alice_id, alice = await example.account("alice@example.com")
    md = example.md(alice.access_token)
    store = example.backend.store
    first, second = watch(example, md), watch(example, md, include_existing=True)
    await watching(store, alice_id, 2)

    first.cancel()
    await watching(store, alice_id, 1)
    record = await create(example, md, "still watched")
    assert fields(await next_record(second)) == fields(record)
    second.cancel()
    await until(lambda: store.watcher_count() == 0)
    assert await first.code() == await second.code() == grpc.StatusCode.CANCELLED


async def test_a_watch_that_falls_behind_ends_with_resource_exhausted(example: Example):
    alice_id, alice = await example.account("alice@example.com")
    store = example.backend.store
    store.watch_buffer = 2
    call = watch(example, example.md(alice.access_token))
    await watching(store, alice_id)

    # No await in between: the watch cannot take any of them before the third overflows.
    for n in range(3):
        store.create_record(alice_id, f"record {n}")
    assert store.watcher_count() == 0  # dropped at once, not left to pile up

    error = await ended_with(call)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details() == WATCH_FELL_BEHIND


async def test_stopping_the_backend_ends_open_watches(example: Example):
    alice_id, alice = await example.account("alice@example.com")
    call = watch(example, example.md(alice.access_token))
    await watching(example.backend.store, alice_id)

    await example.backend.server.stop(None)
    error = await ended_with(call)
    assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    # The client may hear the GOAWAY before the server has cancelled the handler.
    await until(lambda: example.backend.store.watcher_count() == 0)


# --- start_backend(interceptors=...) ---------------------------------------------------


class Seen(grpc.aio.ServerInterceptor):
    """Records the method and the x-auth-subject of every call that reaches the backend."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        headers = dict(details.invocation_metadata or ())
        self.calls.append((details.method, headers.get("x-auth-subject")))
        return await continuation(details)


async def test_start_backend_runs_the_given_interceptors(tmp_path: Path):
    config = BackendConfig(
        policy=load_policy(POLICY),
        signing_key=keygen("ES256", tmp_path / "signing.pem", tmp_path / "jwks.json"),
        refresh_key=hmac_signing_key(b"x" * 32, "refresh-hmac"),
    )
    seen = Seen()
    backend = await start_backend(config, interceptors=[seen])
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{backend.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            await health.Check(health_pb2.HealthCheckRequest())
            md = (("x-auth-subject", "someone"),)
            call = channel.unary_stream(WATCH)(b"", metadata=md)
            await watching(backend.store, "someone")
            call.cancel()
    finally:
        await backend.stop(None)
    assert seen.calls == [("/grpc.health.v1.Health/Check", None), (WATCH, "someone")]


# --- through the real proxy ------------------------------------------------------------


@pytest.fixture
async def proxied(tmp_path: Path) -> AsyncIterator[Any]:
    async with running_behind_proxy(tmp_path) as running:
        yield running


async def test_watch_through_the_proxy_with_an_access_token(proxied: Any):
    alice_id, alice = await proxied.account("alice@example.com")
    md = bearer(alice.access_token)
    existing = await create(proxied, md, "existing")

    call = watch(proxied, md, include_existing=True)
    try:
        assert fields(await next_record(call)) == fields(existing)
        live = await create(proxied, md, "live")
        assert fields(await next_record(call)) == fields(live)
        assert live.owner == alice_id
    finally:
        call.cancel()
    await until(lambda: proxied.example.backend.store.watcher_count() == 0)

    error = await ended_with(watch(proxied, ()))
    assert (error.code(), reason_of(error)) == (UNAUTH, Reason.TOKEN_MISSING)


async def test_through_the_proxy_a_watch_ends_when_its_access_token_expires(proxied: Any):
    """The proxy accepts a token until `exp` plus the policy's leeway (30 s in policy.yaml),
    and its stream guard ends the stream at that moment. The token is minted so that this
    moment is about two seconds away: its `exp` is `leeway - 2` seconds in the past."""
    alice_id, alice = await proxied.account("alice@example.com")
    store = proxied.example.backend.store
    leeway = proxied.example.policy.leeway
    issuer = proxied.example.backend.auth.tokens.issuer
    short = issuer.mint("access", alice_id, ttl=2 - leeway, roles=["user"])

    call = watch(proxied, bearer(short.token))
    await watching(store, alice_id)
    record = await create(proxied, bearer(alice.access_token), "seen before expiry")
    assert fields(await next_record(call)) == fields(record)

    error = await ended_with(call)
    assert (error.code(), reason_of(error)) == (UNAUTH, Reason.TOKEN_EXPIRED)
    await until(lambda: store.watcher_count() == 0)  # the backend's watch ended too
    # The long-lived token's calls go on.
    assert (await proxied.profile(alice.access_token)).user_id == alice_id
