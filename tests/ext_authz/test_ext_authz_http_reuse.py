"""What the ext_authz HTTP mode reuses between checks, over real loopback sockets: an
allow's answer is rendered once and served again only for an equal check (same identity,
rule, policy version and headers to remove); header names are classified once per policy;
the kept message is renewed when the `date` second changes. And the reader measures header
fields in the bytes that were sent, whatever characters they decode to, and decodes them
as UTF-8 without losing a byte.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from authproxy.keys.issuer import TokenIssuer
from tests.support.ext_authz import running_ext_authz
from tests.support.ext_authz_http import Answer, Client, front, get, with_limits
from tests.support.keys import Keys
from tests.support.policies import TEST_POLICY
from tests.support.running_proxy import RunningProxy
from tests.support.tokens import bearer, minted

PUBLIC = "/test.Public/Echo"
ACCESS = "/test.Access/Echo"
FORWARD = "/test.Forward/Echo"
TO_REMOVE = "x-envoy-auth-headers-to-remove"
#: Headers whose names start like this are removed (a `strip_headers` prefix).
CORP_POLICY = TEST_POLICY + "strip_headers: {add: [x-corp-*]}\n"


def removed(answer: Answer) -> set[str]:
    (value,) = answer.values(TO_REMOVE)
    return set(value.split(","))


def without_date(answer: Answer) -> list[tuple[str, str]]:
    return [(k, v) for k, v in answer.headers if k != "date"]


@pytest.fixture
async def client(ext_authz: RunningProxy) -> AsyncIterator[Client]:
    c = await Client.open(front(ext_authz).port)
    yield c
    c.close()


@pytest.fixture
async def corp(tmp_path: Path, keys: Keys) -> AsyncIterator[RunningProxy]:
    async with running_ext_authz(tmp_path, keys, policy=CORP_POLICY) as running:
        yield running


async def test_pipelined_checks_each_get_their_own_identity(client: Client, issuer: TokenIssuer):
    alice, bob, alice_again = (bearer(minted(issuer, sub)) for sub in ("alice", "bob", "alice"))
    await client.send(
        get(ACCESS, *alice)
        + get(ACCESS, *bob)
        + get(ACCESS, *alice_again)  # same subject, another token
        + get(ACCESS, *alice)
        + get(PUBLIC)
    )
    answers = [await client.answer() for _ in range(5)]
    assert [a.status for a in answers] == [200] * 5
    subjects = [a.values("x-auth-subject") for a in answers]
    assert subjects == [["alice"], ["bob"], ["alice"], ["alice"], []]
    assert answers[0].values("x-auth-jti") != answers[2].values("x-auth-jti")
    assert without_date(answers[3]) == without_date(answers[0])


async def test_a_spoofed_header_changes_the_answer_and_the_next_plain_check_is_clean(
    client: Client, issuer: TokenIssuer
):
    alice = bearer(minted(issuer, "alice"))
    await client.send(
        get(ACCESS, *alice)
        + get(ACCESS, *alice, "X-Auth-Spoof: admin", "X-Pomerium-Claim-Email: root@corp")
        + get(ACCESS, *alice)
    )
    plain, spoofed, again = [await client.answer() for _ in range(3)]
    assert plain.status == spoofed.status == again.status == 200
    assert {"x-auth-spoof", "x-pomerium-claim-email"} <= removed(spoofed)
    assert not {"x-auth-spoof", "x-pomerium-claim-email"} & removed(plain)
    assert without_date(again) == without_date(plain)  # the same allow, served again


async def test_forwarding_and_stripping_rules_keep_their_own_authorization_answer(
    client: Client, issuer: TokenIssuer
):
    alice = bearer(minted(issuer, "alice"))
    grpc = "Content-Type: application/grpc"
    await client.send(
        get(FORWARD, *alice, grpc) + get(ACCESS, *alice, grpc) + get(FORWARD, *alice, grpc)
    )
    forwarded, stripped, forwarded_again = [await client.answer() for _ in range(3)]
    assert forwarded.status == stripped.status == forwarded_again.status == 200
    assert "authorization" not in removed(forwarded) | removed(forwarded_again)
    assert "authorization" in removed(stripped)


async def test_header_names_are_classified_whatever_their_case(corp: RunningProxy):
    client = await Client.open(front(corp).port)
    try:
        await client.send(get(PUBLIC, "x-corp-user: a") + get(PUBLIC, "X-CORP-USER: a"))
        lower, upper = [await client.answer() for _ in range(2)]
    finally:
        client.close()
    assert "x-corp-user" in removed(lower)
    assert "x-corp-user" in removed(upper)


async def test_a_policy_reload_classifies_header_names_again(corp: RunningProxy, tmp_path: Path):
    client = await Client.open(front(corp).port)
    try:
        await client.send(get(PUBLIC, "X-Corp-User: a"))
        before = await client.answer()
        (tmp_path / "policy.yaml").write_text(TEST_POLICY)  # no more x-corp-*
        assert await corp.proxy.reloader.reload("test") is True
        await client.send(get(PUBLIC, "X-Corp-User: a"))
        after = await client.answer()
    finally:
        client.close()
    assert "x-corp-user" in removed(before)
    assert "x-corp-user" not in removed(after)


async def test_header_names_past_the_remembered_ones_are_still_classified(corp: RunningProxy):
    """Header names come from clients: more distinct names than are remembered (1,024)
    must still be judged one by one."""
    client = await Client.open(front(corp).port)
    try:
        for batch in range(5):
            names = [f"X-Corp-{batch}-{i}" for i in range(250)]
            await client.send(get(PUBLIC, *(f"{name}: v" for name in names)))
            answer = await client.answer()
            assert {n.lower() for n in names} <= removed(answer)
        await client.send(get(PUBLIC, "X-Corp-Last: v", "X-Auth-Late: v", "X-Other-Late: v"))
        last = await client.answer()
    finally:
        client.close()
    assert {"x-corp-last", "x-auth-late"} <= removed(last)
    assert "x-other-late" not in removed(last)


async def test_the_kept_answer_follows_the_date(client: Client, issuer: TokenIssuer):
    request = get(ACCESS, *bearer(minted(issuer, "alice")))
    await client.send(request)
    first = await client.answer()
    await asyncio.sleep(int(time.time()) + 1.05 - time.time())  # into the next second
    await client.send(request)
    second = await client.answer()
    assert first.values("date") != second.values("date")
    assert without_date(first) == without_date(second)


# --- header fields: measured in the bytes sent, decoded without loss ---------------------


@pytest.mark.parametrize(
    ("value", "status"),
    [
        ("€" * 1300, 200),  # 3,900 bytes: under the limit
        ("€" * 1400, 431),  # 4,200 bytes, 1,400 characters: over it
        (b"\xff" * 4100, 431),  # not UTF-8 at all: every byte counts
    ],
    ids=["multibyte-under", "multibyte-over", "undecodable-over"],
)
async def test_a_header_field_arriving_in_pieces_is_measured_in_bytes(
    ext_authz: RunningProxy, value: str | bytes, status: int
):
    with_limits(ext_authz, max_field=4096)
    client = await Client.open(front(ext_authz).port)
    try:
        raw = value if isinstance(value, bytes) else value.encode()
        await client.send(f"GET {PUBLIC} HTTP/1.1\r\nHost: authz\r\nX-Big: ".encode())
        await client.send(raw[: len(raw) // 2])
        await client.send(raw[len(raw) // 2 :] + b"\r\n\r\n")
        answer = await client.answer()
    finally:
        client.close()
    assert answer.status == status


@pytest.mark.parametrize(
    ("sent", "read"),
    [
        (b"caf\xc3\xa9", "'caf\u00e9'"),  # UTF-8
        (b"caf\xe9", "'caf\\udce9'"),  # not UTF-8: the byte kept as a surrogate
    ],
    ids=["utf8", "not-utf8"],
)
async def test_header_values_are_read_as_utf8_and_no_byte_is_lost(
    client: Client, sent: bytes, read: str
):
    """The refusal of an override header quotes its value as the pipeline read it."""
    await client.send(
        f"GET {PUBLIC} HTTP/1.1\r\nHost: authz\r\nX-Original-URL: ".encode() + sent + b"\r\n\r\n"
    )
    answer = await client.answer()
    assert (answer.status, answer.reason) == (400, "REQUEST_MALFORMED")
    assert f"asks for {read}" in json.loads(answer.body)["message"]


async def test_a_nul_in_a_header_is_refused_by_the_parser(client: Client):
    await client.send(f"GET {PUBLIC} HTTP/1.1\r\nHost: authz\r\nX-A: a\0b\r\n\r\n".encode())
    answer = await client.answer()
    assert (answer.status, answer.reason) == (400, "REQUEST_MALFORMED")
