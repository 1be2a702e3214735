"""Request-field ownership (`request:` rules) through the real sidecar: request messages
are read with the types of a descriptor set, held until they pass, and a message naming
someone else never reaches the backend. On streams, messages before a refused one went
through and the stream ends there. Compressed and large messages are read; what cannot
be read is refused; a type the proxy lacks makes those calls unavailable (readiness names
it). A policy naming a field its type lacks does not start, and does not reload."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from authproxy.keys.issuer import TokenIssuer
from authproxy.policy.loader import parse_policy
from authproxy.runtime.serve import AuthProxy, ConfigError
from tests.support.ext_authz import status_details
from tests.support.keys import Keys
from tests.support.operations import watched_proxy, write_atomically
from tests.support.owned_messages import (
    OWNED_METHODS,
    RecordingBackend,
    deflated,
    frame,
    gzipped,
    owned,
    owned_protoset,
    raw_grpc_call,
    start_recording_backend,
)
from tests.support.policies import TEST_POLICY
from tests.support.running_proxy import (
    RunningProxy,
    config_for,
    error_info,
    http_json,
    start_sidecar,
)
from tests.support.tokens import bearer
from tests.support.waits import eventually, poll

DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
MISMATCH = (DENIED, "FIELD_MISMATCH")
#: Services whose methods take `test.Owned` in the protoset.
SERVICES = ("Owned", "Nested", "Tenant", "Unset", "Support", "Shadowed")
RULES = """\
  /test.Owned/*:
    level: access
    request:
      equal_claims: {user_id: sub}
  /test.Nested/*:
    level: access
    request: {equal_claims: {filter.owner_id: sub}}
  /test.Tenant/*:
    level: access
    request: {equal_claims: {tenant: tenant_id}}
  /test.Unset/*:
    level: access
    request: {equal_claims: {user_id: sub}, allow_unset: true}
  /test.Support/*:
    level: access
    request: {equal_claims: {user_id: sub}, unless_roles: [support]}
  /test.Shadowed/*:
    level: access
    mode: shadow
    request: {equal_claims: {user_id: sub}}
"""
POLICY = TEST_POLICY + RULES
#: Line of the `request:` key of the /test.Owned/* rule in POLICY.
OWNED_REQUEST_LINE = TEST_POLICY.count("\n") + 3
assert POLICY.splitlines()[OWNED_REQUEST_LINE - 1] == "    request:"
#: A method the protoset does not describe, named exactly.
UNDESCRIBED = "/test.Undescribed/Echo"
UNDESCRIBED_POLICY = POLICY + (
    f"  {UNDESCRIBED}:\n    level: access\n    request: {{equal_claims: {{user_id: sub}}}}\n"
)
BOUND = 10.0  # seconds any single call may take (a stall shows as a deadline)
MiB = 1024 * 1024


@pytest.fixture
async def recording() -> AsyncIterator[RecordingBackend]:
    backend = await start_recording_backend()
    yield backend
    await backend.server.stop(None)


@pytest.fixture
def protoset(tmp_path: Path) -> Path:
    return owned_protoset(tmp_path / "owned.protoset", SERVICES)


async def _sidecar(
    tmp_path: Path, backend: RecordingBackend, keys: Keys, protoset: Path, policy: str
) -> RunningProxy:
    return await start_sidecar(
        tmp_path,
        backend.port,
        keys,
        policy,
        descriptor_sets=[str(protoset)],
        admin="127.0.0.1:0",
    )


@pytest.fixture
async def node(
    tmp_path: Path, recording: RecordingBackend, keys: Keys, protoset: Path
) -> AsyncIterator[RunningProxy]:
    running = await _sidecar(tmp_path, recording, keys, protoset, POLICY)
    yield running
    await running.stop()


def token_of(issuer: TokenIssuer, subject: str = "alice", **extra: Any) -> str:
    roles = extra.pop("roles", None)
    return issuer.mint("access", subject, ttl=300, roles=roles, extra=extra or None).token


async def echo(
    node: RunningProxy, method: str, message: bytes, token: str | None, **kwargs: Any
) -> bytes:
    assert node.channel is not None
    call = node.channel.unary_unary(method)(
        message, metadata=bearer(token) if token else (), timeout=BOUND, **kwargs
    )
    return await call


async def refusal(
    node: RunningProxy, method: str, message: bytes, token: str | None, **kwargs: Any
) -> tuple[grpc.StatusCode, str | None, str]:
    """(status, ErrorInfo reason, message) of a unary call expected to fail."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await echo(node, method, message, token, **kwargs)
    info = error_info(raised.value)
    return raised.value.code(), info.reason if info else None, raised.value.details() or ""


def reason_of(error: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str | None]:
    info = error_info(error)
    return error.code(), info.reason if info else None


# --- unary ---------------------------------------------------------------------------------


async def test_a_caller_names_only_themselves_and_a_refusal_never_reaches_the_backend(
    node: RunningProxy, recording: RecordingBackend, issuer: TokenIssuer
):
    alice = token_of(issuer)
    own = owned("alice", tenant=7, blob=b"payload")
    assert await echo(node, "/test.Owned/Echo", own, alice) == own
    assert recording.received["Echo"] == [own]

    before = len(recording.calls)
    code, reason, message = await refusal(node, "/test.Owned/Echo", owned("bob"), alice)
    assert (code, reason) == MISMATCH
    assert "user_id" in message and "sub" in message and "bob" not in message
    code, reason, _ = await refusal(node, "/test.Owned/Echo", owned(""), alice)  # unset
    assert (code, reason) == MISMATCH
    code, reason, _ = await refusal(node, "/test.Owned/Echo", owned("alice "), alice)
    assert (code, reason) == MISMATCH  # equal, not similar
    assert len(recording.calls) == before
    assert recording.received["Echo"] == [own]


async def test_a_nested_field_is_compared(
    node: RunningProxy, recording: RecordingBackend, issuer: TokenIssuer
):
    alice = token_of(issuer)
    own = owned("bob", owner_id="alice")  # user_id is not what this rule reads
    assert await echo(node, "/test.Nested/Echo", own, alice) == own
    before = len(recording.calls)
    for other in (owned("alice", owner_id="bob"), owned("alice"), owned("alice", owner_id="")):
        code, reason, message = await refusal(node, "/test.Nested/Echo", other, alice)
        assert (code, reason) == MISMATCH
        assert "filter.owner_id" in message
    assert len(recording.calls) == before


async def test_an_integer_field_equals_an_integer_claim_or_its_decimal_text(
    node: RunningProxy, recording: RecordingBackend, issuer: TokenIssuer
):
    as_number = token_of(issuer, tenant_id=42)
    as_text = token_of(issuer, tenant_id="42")
    mine = owned(tenant=42)
    assert await echo(node, "/test.Tenant/Echo", mine, as_number) == mine
    assert await echo(node, "/test.Tenant/Echo", mine, as_text) == mine
    big = owned(tenant=2**62)
    assert await echo(node, "/test.Tenant/Echo", big, token_of(issuer, tenant_id=2**62)) == big

    before = len(recording.calls)
    for message, token in [
        (owned(tenant=43), as_number),
        (owned(tenant=-42), as_number),
        (owned(tenant=43), as_text),
        (owned(tenant=42), token_of(issuer, tenant_id="042")),
        (owned(tenant=42), token_of(issuer, tenant_id=42.0)),
        (owned(tenant=1), token_of(issuer, tenant_id=True)),
        (owned(tenant=0), as_number),  # unset
    ]:
        code, reason, message_text = await refusal(node, "/test.Tenant/Echo", message, token)
        assert (code, reason) == MISMATCH, (message, token)
        assert "tenant" in message_text
    assert len(recording.calls) == before


async def test_a_claim_the_token_lacks_refuses_before_the_backend(
    node: RunningProxy, recording: RecordingBackend, issuer: TokenIssuer
):
    before = len(recording.calls)
    for token in (
        token_of(issuer),
        token_of(issuer, tenant_id=None),
        token_of(issuer, tenant_id=[42]),
        token_of(issuer, tenant_id={"id": 42}),
    ):
        code, reason, message = await refusal(node, "/test.Tenant/Echo", owned(tenant=0), token)
        assert (code, reason) == MISMATCH
        assert "tenant_id" in message
    assert len(recording.calls) == before


async def test_an_unset_field_passes_only_where_the_rule_allows_it(
    node: RunningProxy, recording: RecordingBackend, issuer: TokenIssuer
):
    alice = token_of(issuer)
    unset = owned("", blob=b"x")
    assert await echo(node, "/test.Unset/Echo", unset, alice) == unset
    assert await echo(node, "/test.Unset/Echo", owned("alice"), alice) == owned("alice")
    before = len(recording.calls)
    assert (await refusal(node, "/test.Unset/Echo", owned("bob"), alice))[:2] == MISMATCH
    assert (await refusal(node, "/test.Owned/Echo", unset, alice))[:2] == MISMATCH
    assert len(recording.calls) == before


async def test_a_caller_with_an_exempt_role_may_name_anyone(
    node: RunningProxy, recording: RecordingBackend, issuer: TokenIssuer
):
    support = token_of(issuer, "sam", roles=["support"])
    other = owned("bob")
    assert await echo(node, "/test.Support/Echo", other, support) == other
    assert recording.received["Echo"] == [other]
    # Not exempt: another role, or the role on a rule without `unless_roles`.
    user = token_of(issuer, "sam", roles=["user"])
    assert (await refusal(node, "/test.Support/Echo", other, user))[:2] == MISMATCH
    assert (await refusal(node, "/test.Owned/Echo", other, support))[:2] == MISMATCH
    assert recording.received["Echo"] == [other]


async def test_the_token_is_judged_before_the_fields(
    node: RunningProxy, recording: RecordingBackend
):
    code, reason, _ = await refusal(node, "/test.Owned/Echo", owned("alice"), None)
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MISSING")
    assert recording.calls == []


@pytest.mark.parametrize(
    "message",
    [
        b"\xff\xff\xff\xff",  # no valid tag
        b"\x0a\x10alice",  # a length past the end
        b"\x0a\x05al\xffce",  # a proto3 string that is not UTF-8
        b"\x12\x03\x0a\x10a",  # a nested message cut short
    ],
)
async def test_a_message_that_does_not_parse_is_refused(
    node: RunningProxy, recording: RecordingBackend, issuer: TokenIssuer, message: bytes
):
    code, reason, text = await refusal(node, "/test.Owned/Echo", message, token_of(issuer))
    assert (code, reason) == MISMATCH
    assert "owned.Owned" in text
    assert recording.calls == []


# --- streams -------------------------------------------------------------------------------


async def test_client_streaming_relays_own_messages_and_ends_at_another_users(
    node: RunningProxy, recording: RecordingBackend, issuer: TokenIssuer
):
    assert node.channel is not None
    md = bearer(token_of(issuer))
    whole = node.channel.stream_unary("/test.Owned/Sum")(metadata=md, timeout=BOUND)
    mine = [owned("alice", tenant=i) for i in range(3)]
    for message in mine:
        await whole.write(message)
    await whole.done_writing()
    assert json.loads(await whole) == {"messages": 3, "bytes": sum(map(len, mine))}
    assert recording.received["Sum"] == mine
    recording.received["Sum"].clear()
    recording.ended["Sum"].clear()

    call = node.channel.stream_unary("/test.Owned/Sum")(metadata=md, timeout=BOUND)
    first, second = owned("alice", tenant=1), owned("alice", tenant=2)
    await call.write(first)
    assert await eventually(lambda: recording.received["Sum"] == [first], within=5)
    await call.write(second)
    assert await eventually(lambda: recording.received["Sum"] == [first, second], within=5)
    await call.write(owned("bob", tenant=3))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert reason_of(raised.value) == MISMATCH
    # The backend's stream is cancelled; it never saw the refused message.
    await asyncio.wait_for(recording.ended["Sum"].wait(), BOUND)
    assert recording.received["Sum"] == [first, second]


async def test_bidi_echoes_own_messages_and_ends_at_another_users(
    node: RunningProxy, recording: RecordingBackend, issuer: TokenIssuer
):
    assert node.channel is not None
    chat = node.channel.stream_stream("/test.Owned/Chat")(
        metadata=bearer(token_of(issuer)), timeout=BOUND
    )
    first, second = owned("alice", tenant=1), owned("alice", tenant=2)
    received = []
    await chat.write(first)
    received.append(await chat.read())
    await chat.write(second)
    received.append(await chat.read())
    await chat.write(owned("bob"))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        while True:
            response = await chat.read()
            if response is grpc.aio.EOF:
                break
            received.append(response)
    assert reason_of(raised.value) == MISMATCH
    assert received == [b"echo:" + first, b"echo:" + second]
    await asyncio.wait_for(recording.ended["Chat"].wait(), BOUND)
    assert recording.received["Chat"] == [first, second]


async def test_a_stream_whose_first_message_is_refused_never_reaches_the_backend(
    node: RunningProxy, recording: RecordingBackend, issuer: TokenIssuer
):
    assert node.channel is not None
    md = bearer(token_of(issuer))
    chat = node.channel.stream_stream("/test.Owned/Chat")(metadata=md, timeout=BOUND)
    await chat.write(owned("bob"))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await chat.read()
    assert reason_of(raised.value) == MISMATCH
    count = node.channel.unary_stream("/test.Owned/Count")(owned("bob"), metadata=md, timeout=BOUND)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in count:
            pass
    assert reason_of(raised.value) == MISMATCH
    assert recording.calls == []


async def test_server_streaming_with_an_own_request_streams(
    node: RunningProxy, recording: RecordingBackend, issuer: TokenIssuer
):
    assert node.channel is not None
    own = owned("alice", tenant=5)
    count = node.channel.unary_stream("/test.Owned/Count")(
        own, metadata=bearer(token_of(issuer)), timeout=BOUND
    )
    assert [m async for m in count] == [own, own]


# --- flow control and compression ------------------------------------------------------------


async def test_a_first_message_larger_than_the_stream_window_passes(
    node: RunningProxy, recording: RecordingBackend, issuer: TokenIssuer
):
    """The held message is 3 MiB, three times the 1 MiB window: the proxy must take it in
    whole before it can judge it (a stall shows as DEADLINE_EXCEEDED)."""
    alice = token_of(issuer)
    big = owned("alice", blob=bytes(range(256)) * (3 * MiB // 256))
    assert len(big) > 3 * MiB
    assert await echo(node, "/test.Owned/Echo", big, alice) == big
    code, reason, _ = await refusal(node, "/test.Owned/Echo", owned("bob", blob=big), alice)
    assert (code, reason) == MISMATCH
    assert recording.echoed == [len(big)]

    assert node.channel is not None
    chat = node.channel.stream_stream("/test.Owned/Chat")(metadata=bearer(alice), timeout=BOUND)
    await chat.write(big)
    assert await chat.read() == b"echo:" + big
    await chat.write(big)  # a later large message, on a stream already open
    assert await chat.read() == b"echo:" + big
    await chat.done_writing()
    assert await chat.read() is grpc.aio.EOF


async def test_gzip_compressed_messages_are_read(
    node: RunningProxy, recording: RecordingBackend, issuer: TokenIssuer
):
    alice = token_of(issuer)
    own = owned("alice", blob=bytes(64 * 1024))  # compresses well: the client compresses it
    gz = grpc.Compression.Gzip
    assert await echo(node, "/test.Owned/Echo", own, alice, compression=gz) == own
    code, reason, message = await refusal(
        node, "/test.Owned/Echo", owned("bob", blob=bytes(64 * 1024)), alice, compression=gz
    )
    assert (code, reason) == MISMATCH
    assert "user_id" in message  # read and compared, not refused as unreadable
    assert recording.received["Echo"] == [own]


async def test_hand_compressed_messages_are_read_as_their_encoding_says(
    node: RunningProxy, recording: RecordingBackend, issuer: TokenIssuer
):
    port, alice = node.sidecar_port, token_of(issuer)
    own = owned("alice", tenant=1)
    for encoding, pack in ((b"gzip", gzipped), (b"deflate", deflated)):
        extra = [(b"grpc-encoding", encoding)]
        response = await raw_grpc_call(
            port, "/test.Owned/Echo", frame(pack(own), compressed=True), alice, extra
        )
        assert response.grpc_status == 0, (encoding, response)
        refused = await raw_grpc_call(
            port, "/test.Owned/Echo", frame(pack(owned("bob")), compressed=True), alice, extra
        )
        assert _raw_reason(refused) == (7, "FIELD_MISMATCH")
    assert recording.received["Echo"] == [own, own]


async def test_compressed_messages_the_proxy_cannot_read_are_refused(
    node: RunningProxy, recording: RecordingBackend, issuer: TokenIssuer
):
    port, alice = node.sidecar_port, token_of(issuer)
    own = owned("alice")
    packed = frame(gzipped(own), compressed=True)
    bomb = frame(gzip.compress(owned("alice", blob=bytes(17 * MiB))), compressed=True)
    cases = [
        (packed, [(b"grpc-encoding", b"snappy")]),  # an encoding the proxy cannot read
        (packed, []),  # compressed, without saying how
        (frame(b"not gzip at all", compressed=True), [(b"grpc-encoding", b"gzip")]),
        (bomb, [(b"grpc-encoding", b"gzip")]),  # inflates past max_message_bytes
    ]
    for body, extra in cases:
        response = await raw_grpc_call(port, "/test.Owned/Echo", body, alice, extra)
        assert _raw_reason(response) == (7, "FIELD_MISMATCH"), extra
    assert recording.calls == []


async def test_a_refusal_never_echoes_the_callers_encoding(
    node: RunningProxy, recording: RecordingBackend, issuer: TokenIssuer
):
    """`grpc-encoding` is the caller's header: the deny (and so the decision log's detail)
    names the encodings the proxy reads, never the one sent."""
    packed = frame(gzipped(owned("alice")), compressed=True)
    for encoding in (b"x-secret-codec", b"gzip-but-not-codec"):
        response = await raw_grpc_call(
            node.sidecar_port, "/test.Owned/Echo", packed, token_of(issuer),
            [(b"grpc-encoding", encoding)],
        )  # fmt: skip
        assert _raw_reason(response) == (7, "FIELD_MISMATCH"), encoding
        message = response.get(b"grpc-message") or b""
        assert b"gzip and deflate" in message and b"codec" not in message
    assert recording.calls == []


async def test_a_request_that_ends_inside_a_message_is_refused(
    node: RunningProxy, recording: RecordingBackend, issuer: TokenIssuer
):
    whole = frame(owned("alice", blob=b"x" * 100))
    response = await raw_grpc_call(
        node.sidecar_port, "/test.Owned/Echo", whole[:-10], token_of(issuer)
    )
    assert _raw_reason(response) == (7, "FIELD_MISMATCH")
    assert recording.calls == []


@pytest.mark.parametrize("state", ["memory", "redis"])
async def test_messages_that_arrive_with_the_headers_are_judged_once(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    keys: Keys,
    recording: RecordingBackend,
    protoset: Path,
    issuer: TokenIssuer,
    decision_lines: list[str],
    state: str,
):
    """Several DATA frames come with the HEADERS: the first message is refused, and the call
    is over — the messages after it open no backend stream. With Redis the decision waits
    (revocations are looked up), so the frames are all held when it comes."""
    extra = {"redis": request.getfixturevalue("redis_server").url} if state == "redis" else {}
    running = await start_sidecar(
        tmp_path,
        recording.port,
        keys,
        POLICY,
        descriptor_sets=[str(protoset)],
        **extra,
    )
    try:
        alice = token_of(issuer)
        frames = [frame(owned("bob")), frame(owned("alice")), frame(owned("alice", tenant=2))]
        for method in ("/test.Owned/Chat", "/test.Owned/Sum"):
            response = await raw_grpc_call(running.sidecar_port, method, frames, alice)
            assert _raw_reason(response) == (7, "FIELD_MISMATCH"), method
        # A later call on the same backend connection: once it is served, an earlier
        # stream would have been seen first.
        assert await echo(running, "/test.Owned/Echo", owned("alice"), alice) == owned("alice")
        assert [method for method, _ in recording.calls] == ["/test.Owned/Echo"]
        refused = [json.loads(x) for x in decision_lines if "FIELD_MISMATCH" in x]
        assert [x["method"] for x in refused] == ["/test.Owned/Chat", "/test.Owned/Sum"]
    finally:
        await running.stop()


def _raw_reason(response) -> tuple[int | None, str | None]:
    details = response.get(b"grpc-status-details-bin")
    if details is None:
        return response.grpc_status, None
    _, info = status_details(details.decode())
    return response.grpc_status, info.reason


# --- types the proxy lacks, shadow mode ------------------------------------------------------


async def test_a_method_without_a_descriptor_is_unavailable_and_named_by_readiness(
    tmp_path: Path,
    recording: RecordingBackend,
    keys: Keys,
    protoset: Path,
    issuer: TokenIssuer,
):
    running = await _sidecar(tmp_path, recording, keys, protoset, UNDESCRIBED_POLICY)
    try:
        code, reason, message = await refusal(
            running, UNDESCRIBED, owned("alice"), token_of(issuer)
        )
        assert (code, reason) == (UNAVAILABLE, "FIELDS_UNAVAILABLE")
        assert UNDESCRIBED in message
        assert recording.calls == []
        # Readiness names the missing type, without taking the other methods out of
        # service: only these calls are refused meanwhile.
        status, body = await http_json(f"{running.admin_base}/readyz")
        assert status == 200, body
        assert body["ready"] is True
        assert body["checks"]["request types"] == (
            f"ok (not known yet: {UNDESCRIBED}; refused meanwhile)"
        )
        mine = owned("alice")
        assert await echo(running, "/test.Owned/Echo", mine, token_of(issuer)) == mine
    finally:
        await running.stop()


async def test_a_proxy_with_every_type_it_reads_is_ready(node: RunningProxy):
    status, body = await http_json(f"{node.admin_base}/readyz")
    assert status == 200, body
    assert "request types" not in body["checks"]


async def test_shadow_mode_lets_the_call_through_and_reports_the_would_be_deny(
    node: RunningProxy,
    recording: RecordingBackend,
    issuer: TokenIssuer,
    decision_lines: list[str],
):
    alice = token_of(issuer)
    other = owned("bob")
    assert await echo(node, "/test.Shadowed/Echo", other, alice) == other
    assert recording.received["Echo"] == [other]
    assert await eventually(lambda: len(decision_lines) >= 1, within=5)
    line = json.loads(decision_lines[-1])
    assert line["method"] == "/test.Shadowed/Echo"
    assert line["reason"] == "FIELD_MISMATCH"
    assert line["shadow"] is True
    assert line["decision"] == "allow"
    assert line["sub"] == "alice"
    assert "bob" not in "".join(decision_lines)

    # On a stream: reported once, and every message goes on.
    assert node.channel is not None
    chat = node.channel.stream_stream("/test.Shadowed/Chat")(metadata=bearer(alice), timeout=BOUND)
    messages = [owned("alice"), owned("bob"), owned("carol"), owned("alice")]
    for message in messages:
        await chat.write(message)
        assert await chat.read() == b"echo:" + message
    await chat.done_writing()
    assert await chat.read() is grpc.aio.EOF
    assert recording.received["Chat"] == messages
    shadowed = [json.loads(x) for x in decision_lines if "Shadowed/Chat" in x]
    assert [(x["reason"], x.get("shadow")) for x in shadowed] == [("FIELD_MISMATCH", True)]


# --- fields the types lack: at start and on reload ------------------------------------------


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ("user_idd: sub", "owned.Owned has no field 'user_idd'"),
        ("tags: sub", "field tags is repeated"),
        ("blob: sub", "field blob is not a string or an integer"),
        ("filter: sub", "field filter is not a string or an integer"),
        ("user_id.x: sub", "field user_id is not a message"),
        ("filter.owner: sub", "owned.Inner has no field 'owner'"),
    ],
)
def test_a_field_the_type_cannot_compare_stops_the_start(
    tmp_path: Path, keys: Keys, protoset: Path, fields: str, problem: str
):
    policy = POLICY.replace(
        "      equal_claims: {user_id: sub}\n", f"      equal_claims: {{{fields}}}\n"
    )
    assert policy != POLICY
    cfg = config_for(
        tmp_path,
        keys,
        policy,
        listen="127.0.0.1:0",
        upstream="127.0.0.1:1",
        upstream_reflection=False,
        watch_policy=False,
        descriptor_sets=[str(protoset)],
    )
    with pytest.raises(ConfigError) as raised:
        AuthProxy(cfg)
    text = str(raised.value)
    field = fields.split(":", 1)[0]
    for method in OWNED_METHODS:
        assert (
            f"{cfg.policy}:{OWNED_REQUEST_LINE}: /test.Owned/*: request field {field} of"
            f" /test.Owned/{method}: {problem}"
        ) in text.splitlines(), text


def test_an_exact_rule_on_a_field_the_type_lacks_stops_the_start(
    tmp_path: Path, keys: Keys, protoset: Path
):
    policy = POLICY + (
        "  /test.Owned/Echo:\n    level: access\n    request:\n"
        "      equal_claims: {user_idd: sub}\n"
    )
    line = policy.count("\n") - 1
    cfg = config_for(
        tmp_path,
        keys,
        policy,
        ext_authz_grpc="127.0.0.1:0",
        descriptor_sets=[str(protoset)],
    )
    with pytest.raises(ConfigError) as raised:
        AuthProxy(cfg)
    assert str(raised.value) == (
        f"{cfg.policy}:{line}: /test.Owned/Echo: request field user_idd of /test.Owned/Echo:"
        " owned.Owned has no field 'user_idd'"
    )


async def test_a_reload_naming_a_field_the_type_lacks_is_refused(
    tmp_path: Path, keys: Keys, recording: RecordingBackend, protoset: Path, issuer: TokenIssuer
):
    bad = POLICY.replace(
        "      equal_claims: {user_id: sub}\n", "      equal_claims: {user_idd: sub}\n"
    )
    assert bad != POLICY
    alice = token_of(issuer)
    async with watched_proxy(
        keys, recording, tmp_path / "policy.yaml", POLICY, descriptor_sets=[str(protoset)]
    ) as node:
        write_atomically(node.policy_path, bad)

        async def results() -> dict[str, int]:
            return node.reloads()

        counted, _ = await poll(results, lambda r: r["error"] >= 1, within=5)
        assert (counted["ok"], counted["error"]) == (0, 1)
        status = await node.policy()
        assert status["last_reload_error"] == "\n".join(
            f"{node.policy_path}:{OWNED_REQUEST_LINE}: /test.Owned/*: request field user_idd"
            f" of /test.Owned/{method}: owned.Owned has no field 'user_idd'"
            for method in OWNED_METHODS
        )
        assert status["version"] == parse_policy(POLICY).version
        # The last good policy keeps deciding.
        assert await echo(node, "/test.Owned/Echo", owned("alice"), alice) == owned("alice")
        code, reason, _ = await refusal(node, "/test.Owned/Echo", owned("bob"), alice)
        assert (code, reason) == MISMATCH

        good = POLICY.replace(
            "      equal_claims: {user_id: sub}\n", "      equal_claims: {tenant: tid}\n"
        )
        write_atomically(node.policy_path, good)
        counted, _ = await poll(results, lambda r: r["ok"] >= 1, within=5)
        assert (counted["ok"], counted["error"]) == (1, 1)
        assert (await node.policy())["last_reload_error"] is None
        assert await echo(node, "/test.Owned/Echo", owned("bob", tenant=3), token_of(issuer, tid=3))
