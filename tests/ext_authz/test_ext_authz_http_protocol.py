"""HTTP/1.1 of the ext_authz HTTP mode over real loopback sockets, bytes as they are:
keep-alive, pipelining, `connection: close`, HTTP/1.0, bodies, the limits (414, 431, 413,
400), the request and idle timeouts, checks that wait for I/O, SO_REUSEPORT and stopping.

Timeouts are shortened through `HttpLimits`; waits are bounded (never a bare sleep that a
test relies on), and a test about time checks both sides: not too early, not never.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from authproxy.ext_authz.http_check import CheckHttpServer
from authproxy.ext_authz.http_request import HttpLimits
from authproxy.keys.issuer import TokenIssuer
from tests.support.ext_authz import running_ext_authz
from tests.support.ext_authz_http import WAIT, Answer, Client, front, get, with_limits
from tests.support.keys import Keys
from tests.support.running_proxy import RunningProxy
from tests.support.tokens import bearer, minted

PUBLIC = "/test.Public/Echo"
ACCESS = "/test.Access/Echo"


@pytest.fixture
async def client(ext_authz: RunningProxy) -> AsyncIterator[Client]:
    c = await Client.open(ext_authz.proxy.check_http.port)
    yield c
    c.close()


Check = Callable[..., Awaitable]


def slowed(running: RunningProxy, when: str, wait: Callable[[], Awaitable[None]]) -> None:
    """Checks of paths containing `when` first await `wait()` (a check waiting for I/O);
    for connections opened from now on."""
    server = front(running)
    original: Check = server.check

    async def check(method, path, headers, peer):
        if when in path:
            await wait()
        return await original(method, path, headers, peer)

    server.check = check  # type: ignore[method-assign]


# --- keep-alive, pipelining, connection: close, HTTP/1.0 ---------------------------------


async def test_keep_alive_connection_answers_request_after_request(
    ext_authz: RunningProxy, client: Client, issuer: TokenIssuer
):
    await client.send(get(PUBLIC))
    first = await client.answer()
    await client.send(get(ACCESS, *bearer(minted(issuer))))
    second = await client.answer()
    await client.send(get(ACCESS))
    third = await client.answer()
    assert [a.status for a in (first, second, third)] == [200, 200, 401]
    assert second.values("x-auth-subject") == ["alice"]
    for answer in (first, second, third):
        assert answer.version == "HTTP/1.1"
        assert answer.values("connection") == []
        assert answer.values("server") == ["authproxy"]
        assert len(answer.values("date")) == 1
    assert len(front(ext_authz).connections) == 1


async def test_pipelined_requests_are_answered_in_order_even_when_one_waits(
    ext_authz: RunningProxy, issuer: TokenIssuer
):
    slowed(ext_authz, "slow", lambda: asyncio.sleep(0.05))
    client = await Client.open(front(ext_authz).port)
    try:
        await client.send(
            get(PUBLIC + "?slow")  # waits: the ones behind it are ready first
            + get(ACCESS)
            + get("/api/a/../b")
            + get(ACCESS + "?slow", *bearer(minted(issuer)))
            + get(PUBLIC, method="HEAD")
            + get(PUBLIC)
        )
        answers = [await client.answer() for _ in range(4)]
        answers.append(await client.answer(head_request=True))
        answers.append(await client.answer())
    finally:
        client.close()
    assert [a.status for a in answers] == [200, 401, 400, 200, 200, 200]
    assert answers[1].reason == "TOKEN_MISSING"
    assert answers[2].reason == "REQUEST_MALFORMED"
    assert answers[3].values("x-auth-subject") == ["alice"]
    assert answers[0].values("x-auth-subject") == answers[5].values("x-auth-subject") == []


async def test_connection_close_is_answered_then_the_connection_closed(
    ext_authz: RunningProxy, client: Client
):
    await client.send(get(PUBLIC, "Connection: close") + get(PUBLIC))  # the 2nd is not read
    answer = await client.answer()
    assert answer.status == 200
    assert answer.values("connection") == ["close"]
    assert await client.closed()


async def test_http_1_0_closes_unless_keep_alive_is_asked_for(ext_authz: RunningProxy):
    port = front(ext_authz).port
    plain = await Client.open(port)
    kept = await Client.open(port)
    try:
        await plain.send(get(PUBLIC, version="1.0"))
        answer = await plain.answer()
        assert (answer.version, answer.status) == ("HTTP/1.0", 200)
        assert await plain.closed()

        for _ in range(2):
            await kept.send(get(PUBLIC, "Connection: keep-alive", version="1.0"))
            answer = await kept.answer()
            assert (answer.version, answer.status) == ("HTTP/1.0", 200)
            assert answer.values("connection") == ["keep-alive"]
    finally:
        plain.close()
        kept.close()


async def test_head_answer_has_no_body_and_the_connection_stays_in_step(
    ext_authz: RunningProxy, client: Client
):
    await client.send(get(ACCESS, method="HEAD") + get(ACCESS))
    head = await client.answer(head_request=True)
    full = await client.answer()
    assert head.status == full.status == 401
    assert head.values("content-length") == full.values("content-length") != ["0"]
    assert full.reason == "TOKEN_MISSING"


# --- bodies --------------------------------------------------------------------------------


async def test_request_bodies_are_read_and_the_next_request_follows(
    ext_authz: RunningProxy, client: Client
):
    body = b"x" * 3000
    chunked = b"5\r\nhello\r\n0\r\n\r\n"
    await client.send(
        get(PUBLIC, f"Content-Length: {len(body)}", method="POST")
        + body
        + get(PUBLIC, "Transfer-Encoding: chunked", method="POST")
        + chunked
        + get(ACCESS)
    )
    answers = [await client.answer() for _ in range(3)]
    assert [a.status for a in answers] == [200, 200, 401]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_body_over_the_limit_is_413_and_closes(ext_authz: RunningProxy, framing: str):
    with_limits(ext_authz, max_body=1000)
    client = await Client.open(front(ext_authz).port)
    try:
        if framing == "content-length":
            await client.send(get(PUBLIC, "Content-Length: 1001", method="POST") + b"x" * 1001)
        else:
            chunk = b"%x\r\n%s\r\n" % (600, b"x" * 600)
            await client.send(
                get(PUBLIC, "Transfer-Encoding: chunked", method="POST") + chunk + chunk
            )
        answer = await client.answer()
        assert answer.status == 413
        assert answer.reason == "REQUEST_MALFORMED"
        assert answer.values("connection") == ["close"]
        assert await client.closed()
    finally:
        client.close()


async def test_body_at_the_limit_is_accepted(ext_authz: RunningProxy):
    with_limits(ext_authz, max_body=1000)
    client = await Client.open(front(ext_authz).port)
    try:
        await client.send(get(PUBLIC, "Content-Length: 1000", method="POST") + b"x" * 1000)
        assert (await client.answer()).status == 200
    finally:
        client.close()


# --- limits and unreadable requests --------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (get("/" + "a" * 17_000), 414),
        (get(PUBLIC, "X-Big: " + "a" * 70_000), 431),
        (get(PUBLIC, *(f"X-H{i}: v" for i in range(300))), 431),
        (b"GET / HTTP/1.1\r\nHost authz\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),  # TLS to a plain port
        (get(PUBLIC, "Content-Length: 5", "Transfer-Encoding: chunked"), 400),
    ],
    ids=["uri-too-long", "field-too-large", "too-many-fields", "no-colon", "tls", "smuggling"],
)
async def test_refused_requests_get_their_status_then_the_connection_closes(
    client: Client, request_bytes: bytes, status: int
):
    await client.send(get(PUBLIC) + request_bytes)
    assert (await client.answer()).status == 200  # what came before is answered first
    answer = await client.answer()
    assert answer.status == status
    assert answer.reason == "REQUEST_MALFORMED"
    assert answer.values("connection") == ["close"]
    assert answer.values("server") == ["authproxy"]
    assert b"aaaa" not in answer.body
    assert await client.closed()


async def trickle(client: Client, pieces: Callable[[], bytes], every: float) -> Answer:
    """Send `pieces()` every `every` seconds until the server answers; that answer."""
    answer = asyncio.create_task(client.answer())
    deadline = time.monotonic() + WAIT
    while not answer.done():
        assert time.monotonic() < deadline, "the server never answered the trickle"
        try:
            await client.send(pieces())
        except ConnectionError:
            break
        await asyncio.wait({answer}, timeout=every)
    return await answer


async def test_a_header_block_arriving_in_pieces_is_bounded(ext_authz: RunningProxy):
    with_limits(ext_authz, max_head=8192, max_field=4096)
    client = await Client.open(front(ext_authz).port)
    try:
        await client.send(b"GET / HTTP/1.1\r\nX-Endless: ")
        answer = await trickle(client, lambda: b"a" * 1024, 0.01)  # a field with no end
        assert answer.status == 431
        assert await client.closed()
    finally:
        client.close()


async def test_limits_leave_room_for_the_largest_token(ext_authz: RunningProxy, client: Client):
    await client.send(get(ACCESS, "Authorization: Bearer " + "a" * 65536))
    answer = await client.answer()
    assert (answer.status, answer.reason) == (401, "TOKEN_TOO_LARGE")  # the pipeline's word


# --- timeouts ------------------------------------------------------------------------------


async def test_a_request_trickling_in_is_cut_off_at_the_request_timeout(ext_authz: RunningProxy):
    with_limits(ext_authz, request_timeout=0.5, idle_timeout=60)
    client = await Client.open(front(ext_authz).port)
    started = time.monotonic()
    try:
        await client.send(b"GET /test.Public/Echo HTTP/1.1\r\nHost: a\r\n")
        answer = await trickle(client, lambda: b"X: y\r\n", 0.05)  # never the end
        assert answer.status == 408
        assert await client.closed()
    finally:
        client.close()
    assert time.monotonic() - started >= 0.5  # not before the timeout


async def test_an_idle_connection_is_closed_after_the_idle_timeout(ext_authz: RunningProxy):
    with_limits(ext_authz, idle_timeout=0.5, request_timeout=60)
    client = await Client.open(front(ext_authz).port)
    try:
        await client.send(get(PUBLIC))
        assert (await client.answer()).status == 200
        answered = time.monotonic()
        assert await client.closed()
        assert time.monotonic() - answered >= 0.5
    finally:
        client.close()


async def test_a_connection_that_never_sends_is_closed_too(ext_authz: RunningProxy):
    with_limits(ext_authz, idle_timeout=0.5)
    client = await Client.open(front(ext_authz).port)
    try:
        assert await client.closed()
    finally:
        client.close()


# --- checks that wait for I/O --------------------------------------------------------------


async def test_a_check_may_use_asyncio_timeout_and_wait(
    ext_authz: RunningProxy, client: Client, issuer: TokenIssuer
):
    """The first step of a check runs outside any task of its own: what it starts (here a
    timeout, as redis-py does) must see a current task, and survive a wait."""

    async def with_timeout(rule, verified):
        async with asyncio.timeout(WAIT):
            await asyncio.sleep(0)
            await asyncio.sleep(0.01)

    authorizer = ext_authz.proxy.authorizer
    authorizer.state_checks = (*authorizer.state_checks, with_timeout)
    await client.send(get(ACCESS, *bearer(minted(issuer))) + get(ACCESS, *bearer(minted(issuer))))
    assert [(await client.answer()).status for _ in range(2)] == [200, 200]


async def test_a_timeout_set_in_the_first_step_cancels_the_check_not_the_connection(
    ext_authz: RunningProxy, client: Client, issuer: TokenIssuer
):
    fired = asyncio.Event()

    async def stuck(rule, verified):
        try:
            async with asyncio.timeout(0.05):
                await asyncio.Event().wait()  # never set
        except TimeoutError:
            fired.set()
            raise

    authorizer = ext_authz.proxy.authorizer
    checks = authorizer.state_checks
    authorizer.state_checks = (*checks, stuck)
    errors = front(ext_authz).errors_total
    await client.send(get(ACCESS, *bearer(minted(issuer))))
    answer = await client.answer()
    assert fired.is_set()
    assert answer.status == 500  # the check failed: an error for Envoy, never an allow
    assert front(ext_authz).errors_total == errors + 1
    authorizer.state_checks = checks
    await client.send(get(ACCESS, *bearer(minted(issuer))))
    assert (await client.answer()).status == 200  # the same connection goes on


# --- listening and stopping ----------------------------------------------------------------


async def test_reuse_port_lets_two_servers_share_a_port(ext_authz: RunningProxy):
    authorizer = ext_authz.proxy.authorizer
    first = CheckHttpServer(authorizer, "127.0.0.1:0", reuse_port=True)
    await first.start()
    second = CheckHttpServer(authorizer, f"127.0.0.1:{first.port}", reuse_port=True)
    alone = CheckHttpServer(authorizer, f"127.0.0.1:{first.port}")
    try:
        await second.start()
        assert second.port == first.port
        with pytest.raises(OSError):
            await alone.start()
    finally:
        await first.stop(0)
        await second.stop(0)


async def test_stop_lets_a_check_in_flight_finish_with_connection_close(tmp_path: Path, keys: Keys):
    release = asyncio.Event()
    async with running_ext_authz(tmp_path, keys) as running:
        slowed(running, "slow", release.wait)
        server = front(running)
        busy = await Client.open(server.port)
        idle = await Client.open(server.port)
        try:
            await idle.send(get(PUBLIC))
            assert (await idle.answer()).status == 200
            await busy.send(get(PUBLIC + "?slow"))
            deadline = time.monotonic() + WAIT
            while not any(c.busy for c in server.connections):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            stopping = asyncio.create_task(server.stop(WAIT))
            assert await idle.closed()  # idle: closed at once
            assert not stopping.done()
            release.set()
            answer = await busy.answer()
            assert answer.status == 200
            assert answer.values("connection") == ["close"]
            assert await busy.closed()
            await asyncio.wait_for(stopping, WAIT)
        finally:
            busy.close()
            idle.close()


def test_default_limits_are_the_documented_ones():
    limits = HttpLimits()
    assert (limits.max_line, limits.max_field) == (16 * 1024, 64 * 1024 + 64)
    assert limits.idle_timeout == 75.0  # aiohttp's keep-alive default, as before


async def test_a_client_that_never_reads_its_answers_is_dropped(ext_authz: RunningProxy):
    with_limits(ext_authz, idle_timeout=0.5)
    server = front(ext_authz)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting
    sock.connect(("127.0.0.1", server.port))
    sock.setblocking(False)
    _, writer = await asyncio.open_connection(sock=sock)
    try:
        deadline = time.monotonic() + WAIT
        while not server.connections:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        (connection,) = server.connections
        server_socket = connection._transport.get_extra_info("socket")  # type: ignore[union-attr]
        server_socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        writer.write(get(PUBLIC) * 400)  # answers far beyond what the buffers hold
        while connection in server.connections:  # never reading: dropped, not waited on
            assert time.monotonic() < deadline, "the server waits for a client that never reads"
            await asyncio.sleep(0.05)
    finally:
        writer.transport.abort()


@pytest.mark.parametrize(
    "request_bytes",
    [
        get(PUBLIC, "Connection: Upgrade", "Upgrade: websocket"),
        get("authz:443", method="CONNECT"),
    ],
    ids=["upgrade", "connect"],
)
async def test_upgrade_and_connect_are_answered_then_closed(client: Client, request_bytes: bytes):
    await client.send(get(PUBLIC) + request_bytes + get(PUBLIC))
    assert (await client.answer()).status == 200
    answer = await client.answer()  # judged like any request; nothing is tunnelled
    assert answer.values("connection") == ["close"]
    assert await client.closed()
