"""Open streams keep their token's limits (`proxy/sidecar/stream_guard.py`): a stream through the
sidecar ends with UNAUTHENTICATED when its token expires (TOKEN_EXPIRED) or is revoked
(TOKEN_REVOKED), and with UNAVAILABLE (STATE_UNAVAILABLE) when revocations can no longer
be known; `end_streams: false` keeps it open. Real sidecars, a real echo backend, a real
`redis-server` for the shared cases.

Timing assertions are the documented functional bounds only: a stream never ends before
its token's `exp` plus leeway, and a revocation reaches an open stream on another replica
within `state_staleness` (1 s).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from authproxy.decide.reasons import Reason
from authproxy.keys.issuer import TokenIssuer
from tests.support.admin import admin, revocations_url
from tests.support.chat import Chat
from tests.support.echo_backend import EchoBackend
from tests.support.keys import Keys
from tests.support.policies import TEST_POLICY, descriptor_set
from tests.support.redis_server import RedisServer
from tests.support.running_proxy import error_info, running_node
from tests.support.tokens import bearer

CHAT = "/test.Access/Chat"
COUNT = "/test.Access/Count"
PUBLIC_CHAT = "/test.Public/Chat"
KEEP_CHAT = "/test.Keep/Chat"
PROPAGATION_BOUND = 1.0  # state_staleness
FAIL_CLOSED_BOUND = 2.0  # staleness (1 s) plus the guard's and the feed's check intervals

POLICY = TEST_POLICY.replace("leeway: 5s", "leeway: 0s") + (
    "  /test.Keep/*: {level: access, end_streams: false}\n"
)
assert "leeway: 0s" in POLICY


async def test_a_stream_ends_when_its_token_expires_not_before(
    tmp_path: Path, keys: Keys, issuer: TokenIssuer, backend: EchoBackend
):
    async with running_node(tmp_path, keys, backend, "a", POLICY) as node:
        token = issuer.mint("access", "alice", ttl=2)
        chat = Chat(node.channel, CHAT, token.token)
        assert await chat.roundtrip(b"one") == b"echo:one"
        code, reason, when = await chat.ended(within=10)
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, Reason.TOKEN_EXPIRED)
        assert when >= token.exp  # leeway 0: not a moment before the token expired
        guard = node.proxy.sidecar.guard
        assert guard.ended_total == {Reason.TOKEN_EXPIRED: 1}
        assert len(guard) == 0


async def test_a_server_stream_ends_when_its_token_expires(
    tmp_path: Path, keys: Keys, issuer: TokenIssuer, backend: EchoBackend
):
    """A long server-streaming call is cut at expiry too (the backend streams slowly)."""
    async with running_node(tmp_path, keys, backend, "a", POLICY) as node:
        token = issuer.mint("access", "alice", ttl=1)
        md = bearer(token.token)
        call = node.channel.unary_stream(COUNT)(b'{"n": 100000000}', metadata=md, timeout=30)
        received = 0
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call:
                received += 1
        assert received > 0
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_info(caught.value).reason == Reason.TOKEN_EXPIRED


async def test_end_streams_false_keeps_a_stream_open_past_expiry(
    tmp_path: Path, keys: Keys, issuer: TokenIssuer, backend: EchoBackend
):
    async with running_node(tmp_path, keys, backend, "a", POLICY) as node:
        token = issuer.mint("access", "alice", ttl=1)
        chat = Chat(node.channel, KEEP_CHAT, token.token)
        assert await chat.roundtrip(b"before") == b"echo:before"
        while time.time() < token.exp + 0.5:
            await asyncio.sleep(0.1)
        assert await chat.roundtrip(b"after") == b"echo:after"
        assert await chat.finish() == grpc.StatusCode.OK


async def test_revoking_the_token_ends_its_open_stream_and_only_that_one(
    tmp_path: Path, keys: Keys, issuer: TokenIssuer, backend: EchoBackend
):
    async with running_node(tmp_path, keys, backend, "a", POLICY) as node:
        revoked = issuer.mint("access", "alice", ttl=300)
        kept = issuer.mint("access", "alice", ttl=300)  # same subject, another jti
        chat = Chat(node.channel, CHAT, revoked.token)
        other = Chat(node.channel, CHAT, kept.token)
        assert await chat.roundtrip() == b"echo:hi"
        assert await other.roundtrip() == b"echo:hi"

        status, _, _ = await admin(
            revocations_url(node), body={"jti": revoked.jti, "exp": revoked.exp}
        )
        assert status == 201
        code, reason, _ = await chat.ended(within=5)
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, Reason.TOKEN_REVOKED)
        assert await other.roundtrip(b"still") == b"echo:still"
        assert await other.finish() == grpc.StatusCode.OK


async def test_logging_out_every_device_ends_the_subjects_streams(
    tmp_path: Path, keys: Keys, issuer: TokenIssuer, backend: EchoBackend
):
    async with running_node(tmp_path, keys, backend, "a", POLICY) as node:
        alice = Chat(node.channel, CHAT, issuer.mint("access", "alice", ttl=300).token)
        bob = Chat(node.channel, CHAT, issuer.mint("access", "bob", ttl=300).token)
        assert await alice.roundtrip() == b"echo:hi"
        assert await bob.roundtrip() == b"echo:hi"
        await node.proxy.state.revoke_subject("alice", time.time() + 1)
        code, reason, _ = await alice.ended(within=5)
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, Reason.TOKEN_REVOKED)
        assert await bob.roundtrip(b"bob") == b"echo:bob"
        bob.call.cancel()


async def test_public_streams_are_not_held_to_a_token_and_finished_streams_are_released(
    tmp_path: Path, keys: Keys, issuer: TokenIssuer, backend: EchoBackend
):
    """A public stream is followed only for policy changes: no timer, no revocation check,
    and no freshness ticker on its account."""
    async with running_node(tmp_path, keys, backend, "a", POLICY) as node:
        guard = node.proxy.sidecar.guard
        public = Chat(node.channel, PUBLIC_CHAT, None)
        assert await public.roundtrip() == b"echo:hi"
        assert len(guard) == 1
        (watch,) = guard._watches
        assert watch.sub is None and watch.timer is None
        assert guard._ticker is None
        chat = Chat(node.channel, CHAT, issuer.mint("access", "alice", ttl=300).token)
        assert await chat.roundtrip() == b"echo:hi"
        assert len(guard) == 2
        assert await chat.finish() == grpc.StatusCode.OK
        assert await public.finish() == grpc.StatusCode.OK
        for _ in range(100):  # the handler releases its watch as it returns
            if len(guard) == 0:
                break
            await asyncio.sleep(0.01)
        assert len(guard) == 0
        assert guard.ended_total == {}


async def test_a_client_cancel_is_not_mistaken_for_a_guard_end(
    tmp_path: Path, keys: Keys, issuer: TokenIssuer, backend: EchoBackend
):
    async with running_node(tmp_path, keys, backend, "a", POLICY) as node:
        guard = node.proxy.sidecar.guard
        chat = Chat(node.channel, CHAT, issuer.mint("access", "alice", ttl=300).token)
        assert await chat.roundtrip() == b"echo:hi"
        chat.call.cancel()
        for _ in range(200):
            if len(guard) == 0:
                break
            await asyncio.sleep(0.01)
        assert len(guard) == 0
        assert guard.ended_total == {}


async def test_a_unary_call_in_flight_is_not_cut_by_a_revocation(
    tmp_path: Path, keys: Keys, issuer: TokenIssuer, backend: EchoBackend
):
    """Known unary methods take the unary path: decided once, never watched."""
    kinds = [str(descriptor_set(tmp_path / "echo.protoset"))]
    async with running_node(tmp_path, keys, backend, "a", POLICY, descriptor_sets=kinds) as node:
        token = issuer.mint("access", "alice", ttl=300)
        md = bearer(token.token)
        call = node.channel.unary_unary("/test.Access/Hang")(b"{}", metadata=md, timeout=30)
        await asyncio.wait_for(backend.hang_started.wait(), 10)
        assert len(node.proxy.sidecar.guard) == 0
        await node.proxy.state.revoke_token(token.jti, token.exp)
        await asyncio.sleep(0.5)
        assert not call.done()
        call.cancel()


async def test_a_call_of_unknown_kind_is_watched_like_a_stream(
    tmp_path: Path, keys: Keys, issuer: TokenIssuer, backend: EchoBackend
):
    """Without reflection or a descriptor set a unary method is relayed as a stream, and
    ended like one when its token is revoked."""
    async with running_node(tmp_path, keys, backend, "a", POLICY) as node:
        token = issuer.mint("access", "alice", ttl=300)
        md = bearer(token.token)
        call = node.channel.unary_unary("/test.Access/Hang")(b"{}", metadata=md, timeout=30)
        await asyncio.wait_for(backend.hang_started.wait(), 10)
        assert len(node.proxy.sidecar.guard) == 1
        await node.proxy.state.revoke_token(token.jti, token.exp)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(call, 5)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_info(caught.value).reason == Reason.TOKEN_REVOKED
        await asyncio.wait_for(backend.cancelled.wait(), 5)  # the backend call is cancelled


async def test_a_call_of_unknown_kind_revoked_while_awaiting_its_answer_still_gets_it(
    tmp_path: Path, keys: Keys, issuer: TokenIssuer, backend: EchoBackend
):
    """A unary call relayed as a stream whose token is revoked while the backend works on
    it (a logout revoking its own token) gets the backend's answer, as a unary call would:
    the request was accepted before the revocation."""
    async with running_node(tmp_path, keys, backend, "a", POLICY) as node:
        # A grace no busy machine exceeds: what is proven is what passes within it.
        node.proxy.sidecar.guard.answer_grace = 60.0
        token = issuer.mint("access", "alice", ttl=300)
        md = bearer(token.token)
        call = node.channel.unary_unary("/test.Access/Held")(b"{}", metadata=md, timeout=30)
        await asyncio.wait_for(backend.held.wait(), 10)
        await node.proxy.state.revoke_token(token.jti, token.exp)
        backend.release.set()
        assert await asyncio.wait_for(call, 10) == b"held"
        # A new call with the token is refused.
        again = node.channel.unary_unary("/test.Access/Echo")(b"x", metadata=md, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await again
        assert error_info(caught.value).reason == Reason.TOKEN_REVOKED


async def test_a_stream_revoked_while_awaiting_its_answer_gets_one_message_at_most(
    tmp_path: Path, keys: Keys, issuer: TokenIssuer, backend: EchoBackend
):
    """A server stream whose request was accepted before the revocation: the answer's
    first message passes, the second is not relayed and the stream ends TOKEN_REVOKED."""
    async with running_node(tmp_path, keys, backend, "a", POLICY) as node:
        # A grace no busy machine exceeds: what is proven is what passes within it.
        node.proxy.sidecar.guard.answer_grace = 60.0
        token = issuer.mint("access", "alice", ttl=300)
        md = bearer(token.token)
        call = node.channel.unary_stream("/test.Access/HeldCount")(b"{}", metadata=md, timeout=30)
        await asyncio.wait_for(backend.held.wait(), 10)
        await node.proxy.state.revoke_token(token.jti, token.exp)
        backend.release.set()
        received = []
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async with asyncio.timeout(10):
                async for message in call:
                    received.append(message)
        assert received == [b"0"]
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_info(caught.value).reason == Reason.TOKEN_REVOKED


# --- shared state -----------------------------------------------------------------------------


async def test_a_revocation_on_one_replica_ends_a_stream_on_another_within_1s(
    tmp_path: Path,
    keys: Keys,
    issuer: TokenIssuer,
    backend: EchoBackend,
    redis_url: str,
):
    async with (
        running_node(tmp_path, keys, backend, "a", POLICY, redis=redis_url) as a,
        running_node(tmp_path, keys, backend, "b", POLICY, redis=redis_url) as b,
    ):
        token = issuer.mint("access", "alice", ttl=300)
        chat = Chat(b.channel, CHAT, token.token)
        assert await chat.roundtrip() == b"echo:hi"
        started = time.time()
        status, _, _ = await admin(revocations_url(a), body={"jti": token.jti, "exp": token.exp})
        assert status == 201
        code, reason, when = await chat.ended(within=5)
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, Reason.TOKEN_REVOKED)
        assert when - started <= PROPAGATION_BOUND


async def test_open_streams_fail_closed_when_redis_is_gone(
    tmp_path: Path,
    keys: Keys,
    issuer: TokenIssuer,
    backend: EchoBackend,
    redis_server: RedisServer,
):
    async with running_node(tmp_path, keys, backend, "a", POLICY, redis=redis_server.url) as a:
        chat = Chat(a.channel, CHAT, issuer.mint("access", "alice", ttl=300).token)
        assert await chat.roundtrip() == b"echo:hi"
        killed = time.time()
        redis_server.kill()
        code, reason, when = await chat.ended(within=10)
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, Reason.STATE_UNAVAILABLE)
        assert when - killed <= FAIL_CLOSED_BOUND
        redis_server.restart()


async def test_streams_ended_mid_send_all_get_their_status(
    tmp_path: Path, keys: Keys, issuer: TokenIssuer, backend: EchoBackend
):
    """The guard ends 24 streams whose relays are busy sending to clients that do not
    read: each still gets its TOKEN_REVOKED status instead of hanging until its deadline.
    (The relay finishes a send it is cancelled in before the deny is sent: gRPC refuses
    a second send batch while one is in flight. That race is rare; this test exercises
    the path, it does not force the race every time.)"""
    async with running_node(tmp_path, keys, backend, "a", POLICY) as node:
        minted = issuer.mint("access", "carol", ttl=300)
        md = bearer(minted.token)
        calls = [
            node.channel.unary_stream(COUNT)(b'{"n": 100000000}', metadata=md, timeout=20)
            for _ in range(24)
        ]
        for call in calls:  # every stream is flowing
            assert await call.read() == b"0"

        async def drain(call) -> tuple[grpc.StatusCode, str | None]:
            try:
                while await call.read() is not grpc.aio.EOF:
                    pass
            except grpc.aio.AioRpcError as e:
                info = error_info(e)
                return e.code(), info.reason if info is not None else None
            return grpc.StatusCode.OK, None

        # Nobody reads: flow control stops each relay inside a send to its client. The
        # guard ends the streams there.
        await asyncio.sleep(0.3)
        status, _, _ = await admin(
            revocations_url(node), body={"sub": "carol", "before": time.time() + 1}
        )
        assert status == 201
        await asyncio.sleep(0.3)
        results = await asyncio.gather(*(drain(call) for call in calls))
        assert set(results) == {(grpc.StatusCode.UNAUTHENTICATED, Reason.TOKEN_REVOKED)}
