"""The ext_authz gRPC listener as an HTTP/2 server (`CheckServer` on `wire/grpc_server.py`):
what a request must be, the answer's wire form, connection limits and failures in the
decision, over real loopback sockets with real grpc clients and, where a grpc client
cannot send what is needed, raw HTTP/2 frames (`tests/support/ext_authz_h2.py`).

A request must be a POST with a gRPC content type to a known method, carrying exactly
one uncompressed message within 4 MiB that parses; the answer is headers, one message
and `grpc-status: 0`. Limits: the preface timeout, the stream limit, what unfinished
requests may hold; a burst of concurrent checks is answered, never cancelled. A failure
in the decision is INTERNAL, never an allow. The decisions themselves are
`test_ext_authz_grpc.py`'s; health, binding and stopping `test_ext_authz_grpc_lifecycle.py`'s.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from hyperframe.frame import DataFrame

from authproxy.ext_authz.grpc_check import SERVICE_NAME
from authproxy.keys.issuer import TokenIssuer
from authproxy.wire.h2_engine import Limits
from tests.support.ext_authz import check_request, outcome
from tests.support.ext_authz_h2 import CHECK, Served, access_check, frames, serving
from tests.support.h2_streams import MAX_CONCURRENT_STREAMS, REFUSED_STREAM, read_to_eof
from tests.support.h2client import grpc_frame, grpc_request_headers, h2_call
from tests.support.keys import Keys

MiB = 1024 * 1024


@pytest.fixture
async def served(tmp_path: Path, keys: Keys) -> AsyncIterator[Served]:
    async with serving(tmp_path, keys) as running:
        yield running


# --- what a request must be --------------------------------------------------------------


async def test_an_answer_is_headers_one_message_and_ok_trailers(served: Served):
    message = check_request("/test.Public/Echo").SerializeToString()
    response = await h2_call(served.port, grpc_request_headers(served.port, CHECK), message, 10)
    assert dict(response.headers)[b":status"] == b"200"
    assert dict(response.headers)[b"content-type"] == b"application/grpc"
    assert b"grpc-status" not in dict(response.headers)
    assert response.trailers == [(b"grpc-status", b"0")]
    assert (
        response.data[0] == 0
        and int.from_bytes(response.data[1:5], "big") == len(response.data) - 5
    )
    answer = external_auth_pb2.CheckResponse.FromString(response.data[5:])
    assert outcome(answer) == "ALLOW"


@pytest.mark.parametrize(
    "path",
    [f"/{SERVICE_NAME}/Report", "/test.Access/Echo", "/grpc.health.v1.Health/List", "/"],
)
async def test_an_unknown_method_is_unimplemented_trailers_only(served: Served, path: str):
    response = await h2_call(served.port, grpc_request_headers(served.port, path), b"", 10)
    headers = dict(response.headers)
    assert headers[b":status"] == b"200"
    assert headers[b"grpc-status"] == str(grpc.StatusCode.UNIMPLEMENTED.value[0]).encode()
    assert response.trailers == [] and response.data == b""  # trailers-only
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.channel.unary_unary(path)(b"", timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_requests_that_are_not_grpc_posts_are_refused_as_the_relay_refuses_them(
    served: Served,
):
    headers = grpc_request_headers(served.port, CHECK)
    get = [(k, b"GET" if k == b":method" else v) for k, v in headers]
    json = [(k, b"application/json" if k == b"content-type" else v) for k, v in headers]
    assert dict((await h2_call(served.port, get, b"", 10)).headers)[b":status"] == b"405"
    assert dict((await h2_call(served.port, json, b"", 10)).headers)[b":status"] == b"415"


async def test_a_header_list_over_the_advertised_limit_is_resource_exhausted(served: Served):
    message = check_request("/test.Public/Echo").SerializeToString()
    big = [(f"x-big-{n}".encode(), b"h" * (30 * 1024)) for n in range(3)]  # 90 KiB in all
    headers = [*grpc_request_headers(served.port, CHECK), *big]
    response = await h2_call(served.port, headers, message, 10)
    assert response.grpc_status == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert response.data == b""  # refused before the message was read
    ok = await h2_call(served.port, grpc_request_headers(served.port, CHECK), message, 10)
    assert ok.grpc_status == 0


async def test_a_message_that_is_not_a_check_request_is_invalid_argument(served: Served):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.channel.unary_unary(CHECK)(b"\xff\xff\xff\xff", timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_message_over_4_mib_is_resource_exhausted(served: Served):
    request = check_request("/test.Public/Echo", headers=(("x-big", "b" * (4 * MiB)),))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.check(request)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in (caught.value.details() or "")
    # Under the limit, a check spread over hundreds of DATA frames is read whole.
    request = check_request("/test.Public/Echo", headers=(("x-big", "b" * (4 * MiB - 512)),))
    assert await served.check(request) == "ALLOW"


async def test_a_compressed_message_is_refused_since_only_identity_is_accepted(served: Served):
    message = check_request("/test.Public/Echo").SerializeToString()
    compressed = b"\x01" + len(message).to_bytes(4, "big") + message
    async with frames(served.port) as conn:
        bare = conn.request(CHECK, compressed)
        gzip = conn.request(CHECK, compressed, [(b"grpc-encoding", b"gzip")])
        code, text = await conn.answer(bare)
        assert code == grpc.StatusCode.INTERNAL.value[0] and "identity" in text
        code, text = await conn.answer(gzip)
        assert code == grpc.StatusCode.UNIMPLEMENTED.value[0] and "gzip" in text
        assert conn.streams[gzip].fields["grpc-accept-encoding"] == "identity"


async def test_a_check_must_carry_exactly_one_whole_message(served: Served):
    message = grpc_frame(check_request("/test.Public/Echo").SerializeToString())
    async with frames(served.port) as conn:
        empty = conn.request(CHECK, b"")
        two = conn.request(CHECK, message + message)
        cut = conn.request(CHECK, message[:-3])
        whole = conn.request(CHECK, message)
        for stream_id in (empty, two, cut):
            code, _ = await conn.answer(stream_id)
            assert code == grpc.StatusCode.INTERNAL.value[0]
        assert await conn.answer(whole) == (0, "")
        assert outcome(external_auth_pb2.CheckResponse.FromString(conn.data[whole][5:])) == "ALLOW"


# --- connections -------------------------------------------------------------------------


async def test_a_connection_that_never_sends_the_preface_is_closed(tmp_path: Path, keys: Keys):
    async with serving(tmp_path, keys, preface_timeout=2.0) as running:
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        try:
            writer.write(b"PRI * HTTP/2.0\r\n")  # half a preface, then nothing
            await read_to_eof(reader, 30)  # closed by the server, well within 30 s
        finally:
            writer.close()
        assert await running.check(check_request("/test.Public/Echo")) == "ALLOW"


async def test_streams_beyond_the_limit_are_refused_and_the_others_answered(
    tmp_path: Path, keys: Keys
):
    """Limit 10, 15 checks opened at once by a client that has not yet acknowledged the
    limit: the 5 beyond it are reset REFUSED_STREAM (which gRPC clients retry), the 10
    are answered once their requests arrive, and the connection goes on."""
    async with (
        serving(tmp_path, keys, limits=Limits(max_concurrent_streams=10)) as running,
        frames(running.port, ack_settings=False) as conn,
    ):
        assert conn.settings.get(MAX_CONCURRENT_STREAMS) == 10
        ids = [conn.open_stream(CHECK) for _ in range(15)]
        await conn.read_until(lambda: all(conn.streams[i].done for i in ids[10:]), 30)
        await conn.ping()
        assert [conn.streams[i].outcome for i in ids[10:]] == [("reset", REFUSED_STREAM)] * 5
        assert [conn.streams[i].outcome for i in ids[:10]] == [("open", None)] * 10
        message = grpc_frame(check_request("/test.Public/Echo").SerializeToString())
        for stream_id in ids[:10]:
            conn.send_body(stream_id, message)
        assert [await conn.answer(i) for i in ids[:10]] == [(0, "")] * 10
        assert conn.goaway is None and not conn.closed


async def test_requests_still_arriving_on_a_connection_hold_a_bounded_amount(served: Served):
    """Request data is acknowledged as it is kept (a message may be larger than the
    stream window), so what unfinished requests may hold is bounded per connection (a
    connection window plus one message at the limit, 8 MiB): the stream that would go
    beyond it is refused RESOURCE_EXHAUSTED, and the connection serves on."""
    assert served.server.server.max_held_bytes == 8 * MiB
    chunk = b"\x00" + (4 * MiB).to_bytes(4, "big") + b"x" * (16_384 - 5)
    async with frames(served.port) as conn:
        ids = []
        for _ in range(9):  # 1 MiB each (the stream window), none finished
            stream_id = conn.open_stream(CHECK)
            ids.append(stream_id)
            frames_ = [DataFrame(stream_id, chunk)]
            frames_ += [DataFrame(stream_id, b"x" * 16_384) for _ in range(63)]
            conn.writer.write(b"".join(f.serialize() for f in frames_))
        await conn.read_until(lambda: conn.streams[ids[-1]].done, 30)
        code, text = await conn.answer(ids[-1])
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and "hold more than" in text
        assert [conn.streams[i].outcome for i in ids[:-1]] == [("open", None)] * 8
        whole = conn.request(
            CHECK, grpc_frame(check_request("/test.Public/Echo").SerializeToString())
        )
        assert await conn.answer(whole) == (0, "")


async def test_a_burst_of_2000_concurrent_checks_is_answered_never_cancelled(
    served: Served, issuer: TokenIssuer
):
    channels = [
        grpc.aio.insecure_channel(
            f"127.0.0.1:{served.port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        for _ in range(8)
    ]
    requests = [access_check(issuer), check_request("/test.Public/Echo")]
    try:
        stubs = [external_auth_pb2_grpc.AuthorizationStub(c) for c in channels]

        async def one(n: int) -> str:
            try:
                answer = await stubs[n % len(stubs)].Check(requests[n % 2], timeout=120)
            except grpc.aio.AioRpcError as e:
                return e.code().name
            return outcome(answer)

        answers = Counter(await asyncio.gather(*(one(n) for n in range(2000))))
    finally:
        for channel in channels:
            await channel.close()
    assert answers == {"ALLOW": 2000}, answers


# --- failures in the decision ------------------------------------------------------------


async def test_an_exception_in_the_decision_is_internal_never_an_allow(
    served: Served, issuer: TokenIssuer
):
    async def broken(rule, verified) -> None:
        raise RuntimeError("state store exploded")

    served.authorizer.state_checks = (*served.authorizer.state_checks, broken)
    before = served.server.errors_total
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.check(access_check(issuer))
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "exploded" not in (caught.value.details() or "")
    assert served.server.errors_total == before + 1
    # The server goes on: a check that takes no state step is answered.
    assert await served.check(check_request("/test.Public/Echo")) == "ALLOW"
    assert served.server.errors_total == before + 1


async def test_equal_allows_share_one_serialized_answer(served: Served, issuer: TokenIssuer):
    """An allow is serialized once and kept with the shared `Allow`: an equal check costs
    no protobuf work for its answer."""
    request = access_check(issuer)
    first = await served.server.service.check(request)
    again = await served.server.service.check(
        external_auth_pb2.CheckRequest.FromString(request.SerializeToString())
    )
    assert again is first
    answer = external_auth_pb2.CheckResponse.FromString(first[5:])
    assert outcome(answer) == "ALLOW" and answer.ok_response.headers
