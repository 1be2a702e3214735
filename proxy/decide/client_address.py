"""Which client a call comes from, for rate limits keyed by `peer`.

The client is the address of the connection's peer. `x-forwarded-for` is believed only
when that peer is a configured trusted proxy (`--trusted-proxy CIDR`): then the entries
are read from the right, skipping every trusted hop, and the first untrusted address is
the client (the address the nearest trusted proxy saw). Entries left of it were written
by the client itself and are never used. Without trusted proxies the header is ignored,
so a client cannot pick its own rate-limit bucket.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import unquote

from authproxy.decide.pipeline import Headers

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

FORWARDED_FOR = "x-forwarded-for"
#: How many hops from the right are examined; a chain of trusted proxies is short.
MAX_HOPS = 16
#: The key of a peer that has no IP address (a unix socket, or unknown).
LOCAL = "local"


class TrustedProxies:
    def __init__(self, networks: Iterable[str] = ()) -> None:
        """`networks`: CIDRs or addresses; ValueError names the first malformed one."""
        self.networks = tuple(ipaddress.ip_network(n.strip(), strict=False) for n in networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusted(self, address: Address) -> bool:
        return any(address in network for network in self.networks)

    def client(self, peer: str | None, headers: Headers) -> str:
        """The client address as a string (IPv4-mapped IPv6 shown as IPv4)."""
        address = parse_address(peer)
        if address is None:
            return LOCAL
        if not self.networks or not self.trusted(address):
            return str(address)
        for hop in reversed(_forwarded_for(headers)):
            previous = parse_address(hop)
            if previous is None:
                break  # a trusted proxy passed on garbage: the last good hop is the client
            address = previous
            if not self.trusted(address):
                break
        return str(address)


def parse_address(value: str | None) -> Address | None:
    """An IP from a gRPC peer (`ipv4:1.2.3.4:5`, `ipv6:%5B::1%5D:5`), an `x-forwarded-for`
    entry (`1.2.3.4`, `1.2.3.4:5`, `[::1]:5`, `::1`) or a bare address; None if none."""
    if not value:
        return None
    text = value.strip()
    if text.startswith(("ipv4:", "ipv6:")):
        text = unquote(text[5:])  # gRPC writes IPv6 peers as `ipv6:%5B::1%5D:5`
    elif text.startswith("unix"):
        return None
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:  # IPv4 with a port
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _forwarded_for(headers: Headers) -> list[str]:
    """Every `x-forwarded-for` entry, all copies of the header joined in order."""
    entries: list[str] = []
    for key, value in headers:
        if len(key) == len(FORWARDED_FOR) and key.lower() == FORWARDED_FOR:
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            entries.extend(text.split(","))
    return entries[-MAX_HOPS:]
