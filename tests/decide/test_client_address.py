"""Which client a call comes from (`proxy/decide/client_address.py`): parsing the peer forms gRPC,
Envoy and `x-forwarded-for` use, and believing `x-forwarded-for` only from trusted proxies.
"""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address, IPv6Address, ip_address

import grpc
import pytest

from authproxy.decide.client_address import LOCAL, MAX_HOPS, TrustedProxies, parse_address

# --- parse_address --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # gRPC peers (`context.peer()`)
        ("ipv4:203.0.113.7:51234", "203.0.113.7"),
        ("ipv6:[2001:db8::7]:51234", "2001:db8::7"),
        ("ipv6:[::1]:443", "::1"),
        # gRPC percent-encodes the brackets of an IPv6 peer (grpcio 1.85: `ipv6:%5B::1%5D:5`)
        ("ipv6:%5B::1%5D:37880", "::1"),
        ("ipv6:%5B2001:db8::7%5D:51234", "2001:db8::7"),
        # bare addresses (Envoy's source address, aiohttp's remote)
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8::7", "2001:db8::7"),
        ("::1", "::1"),
        # x-forwarded-for entries, with a port or spaces
        ("[2001:db8::7]:8443", "2001:db8::7"),
        ("203.0.113.7:8443", "203.0.113.7"),
        ("  203.0.113.7 ", "203.0.113.7"),
        ("[::1]", "::1"),
        # zone ids are dropped
        ("fe80::1%eth0", "fe80::1"),
        ("[fe80::1%eth0]:5", "fe80::1"),
        ("ipv6:[fe80::1%25eth0]:5", "fe80::1"),
        ("ipv6:%5Bfe80::1%25eth0%5D:5", "fe80::1"),
        # IPv4-mapped IPv6 is shown as the IPv4 address it maps
        ("::ffff:198.51.100.9", "198.51.100.9"),
        ("ipv6:[::ffff:198.51.100.9]:5", "198.51.100.9"),
        ("[::ffff:198.51.100.9]:5", "198.51.100.9"),
    ],
)
def test_parse_address_forms(value: str, expected: str) -> None:
    assert parse_address(value) == ip_address(expected)


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "   ",
        "unix:/run/authproxy.sock",
        "unix-abstract:authproxy",
        "unix:",
        "garbage",
        "unknown",
        "1.2.3",
        "256.1.1.1",
        "01.2.3.4",
        "example.com:443",
        "ipv4:",
        "ipv6:[nope]:5",
        "[]:5",
    ],
)
def test_parse_address_without_an_ip_is_none(value: str | None) -> None:
    assert parse_address(value) is None


def test_parse_address_types() -> None:
    assert isinstance(parse_address("ipv4:10.0.0.1:1"), IPv4Address)
    assert isinstance(parse_address("ipv6:[2001:db8::1]:1"), IPv6Address)
    assert isinstance(parse_address("::ffff:10.0.0.1"), IPv4Address)


async def test_parse_address_reads_the_peers_grpc_really_reports() -> None:
    """The peer strings of a real gRPC server, over IPv4 and IPv6 loopback."""
    peers: list[str] = []

    def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        peers.append(context.peer())
        return request

    class Handler(grpc.GenericRpcHandler):
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(echo)

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((Handler(),))
    port = server.add_insecure_port("[::]:0")
    await server.start()
    try:
        for target in (f"127.0.0.1:{port}", f"[::1]:{port}"):
            async with grpc.aio.insecure_channel(target) as channel:
                await asyncio.wait_for(channel.unary_unary("/a.B/C")(b"x"), 10)
    finally:
        await server.stop(None)
    ipv4, ipv6 = peers
    assert parse_address(ipv4) == IPv4Address("127.0.0.1"), ipv4
    assert parse_address(ipv6) == IPv6Address("::1"), ipv6
    assert TrustedProxies().client(ipv6, ()) == "::1", ipv6


# --- TrustedProxies.client ------------------------------------------------------------------

PROXY = "ipv4:10.0.0.5:40000"  # inside the trusted networks below
TRUSTED = TrustedProxies(["10.0.0.0/24", "192.168.7.1", "2001:db8:ffff::/48"])


def xff(*values: str) -> tuple[tuple[str, str], ...]:
    return tuple(("x-forwarded-for", v) for v in values)


def test_without_trusted_proxies_x_forwarded_for_is_ignored() -> None:
    untrusting = TrustedProxies()
    assert not untrusting
    assert untrusting.client("ipv4:10.0.0.5:1", xff("203.0.113.1")) == "10.0.0.5"
    assert untrusting.client("ipv4:10.0.0.5:1", ()) == "10.0.0.5"
    assert untrusting.client("ipv6:[2001:db8::9]:1", xff("203.0.113.1")) == "2001:db8::9"


def test_an_untrusted_direct_peer_is_the_client_whatever_it_forwards() -> None:
    assert TRUSTED
    assert TRUSTED.client("ipv4:198.51.100.20:1", xff("203.0.113.1")) == "198.51.100.20"
    assert TRUSTED.client("198.51.100.20", xff("10.0.0.9")) == "198.51.100.20"


def test_a_trusted_peer_forwards_the_rightmost_untrusted_address() -> None:
    assert TRUSTED.client(PROXY, xff("203.0.113.1")) == "203.0.113.1"
    assert TRUSTED.client(PROXY, xff("203.0.113.1, 198.51.100.2")) == "198.51.100.2"


def test_spoofed_leftmost_entries_are_ignored() -> None:
    """The client wrote everything left of what the trusted proxy appended."""
    spoofed = xff("10.0.0.7, 1.1.1.1, 203.0.113.66")
    assert TRUSTED.client(PROXY, spoofed) == "203.0.113.66"
    # Changing the client-written part never changes the answer.
    assert TRUSTED.client(PROXY, xff("9.9.9.9, 203.0.113.66")) == "203.0.113.66"
    assert TRUSTED.client(PROXY, xff("garbage, 203.0.113.66")) == "203.0.113.66"


def test_a_chain_of_trusted_hops_is_skipped() -> None:
    chain = xff("1.1.1.1, 203.0.113.9, 192.168.7.1, 10.0.0.3, 2001:db8:ffff::2")
    assert TRUSTED.client(PROXY, chain) == "203.0.113.9"


def test_when_every_hop_is_trusted_the_leftmost_is_the_client() -> None:
    assert TRUSTED.client(PROXY, xff("10.0.0.1, 10.0.0.2, 192.168.7.1")) == "10.0.0.1"


def test_only_the_last_hops_are_examined() -> None:
    trusted_hops = ", ".join(f"10.0.0.{i}" for i in range(1, MAX_HOPS + 5))
    assert TRUSTED.client(PROXY, xff(f"203.0.113.1, {trusted_hops}")) == "10.0.0.5"


def test_garbage_next_to_a_trusted_hop_stops_at_the_last_good_hop() -> None:
    assert TRUSTED.client(PROXY, xff("203.0.113.1, not-an-ip")) == "10.0.0.5"
    assert TRUSTED.client(PROXY, xff("203.0.113.1, not-an-ip, 10.0.0.8")) == "10.0.0.8"
    assert TRUSTED.client(PROXY, xff("203.0.113.1,, 10.0.0.8")) == "10.0.0.8"


def test_several_header_copies_are_joined_in_order() -> None:
    headers = (
        ("x-forwarded-for", "1.1.1.1, 203.0.113.1"),
        ("user-agent", "test"),
        ("x-forwarded-for", "203.0.113.2"),
        ("x-forwarded-for", "10.0.0.3"),
    )
    assert TRUSTED.client(PROXY, headers) == "203.0.113.2"
    reordered = (headers[2], headers[0], headers[3])
    assert TRUSTED.client(PROXY, reordered) == "203.0.113.1"


def test_header_names_in_any_case_and_bytes_values() -> None:
    assert TRUSTED.client(PROXY, (("X-Forwarded-For", "203.0.113.1"),)) == "203.0.113.1"
    assert TRUSTED.client(PROXY, (("X-FORWARDED-FOR", b"203.0.113.2"),)) == "203.0.113.2"
    assert TRUSTED.client(PROXY, (("x-forwarded-for", b"1.1.1.1, [2001:db8::5]:9"),)) == (
        "2001:db8::5"
    )
    # Names that only look alike are not the header.
    assert TRUSTED.client(PROXY, (("x-forwarded-for-x", "203.0.113.1"),)) == "10.0.0.5"
    assert TRUSTED.client(PROXY, (("x_forwarded_for", "203.0.113.1"),)) == "10.0.0.5"


def test_a_trusted_peer_without_the_header_is_the_client() -> None:
    assert TRUSTED.client(PROXY, ()) == "10.0.0.5"


def test_addresses_are_normalised() -> None:
    assert TRUSTED.client("ipv6:[::ffff:10.0.0.5]:1", xff("::ffff:203.0.113.1")) == "203.0.113.1"
    assert TrustedProxies().client("ipv6:[2001:DB8:0::1]:1", ()) == "2001:db8::1"


def test_a_peer_without_an_ip_is_local() -> None:
    assert TRUSTED.client("unix:/run/authproxy.sock", xff("203.0.113.1")) == LOCAL
    assert TRUSTED.client(None, xff("203.0.113.1")) == LOCAL
    assert TrustedProxies().client("garbage", ()) == LOCAL


def test_single_addresses_and_host_bits_are_accepted_as_networks() -> None:
    proxies = TrustedProxies([" 10.1.2.3 ", "10.9.9.9/8", "::1"])
    assert proxies.trusted(IPv4Address("10.200.0.1"))
    assert proxies.trusted(IPv4Address("10.1.2.3"))
    assert proxies.trusted(IPv6Address("::1"))
    assert not proxies.trusted(IPv4Address("11.0.0.1"))
    assert not proxies.trusted(IPv6Address("::2"))


@pytest.mark.parametrize("network", ["10.0.0.0/33", "not-a-network", "10.0.0.0/24/1", ""])
def test_a_malformed_network_raises_value_error(network: str) -> None:
    with pytest.raises(ValueError):
        TrustedProxies(["10.0.0.0/8", network])
