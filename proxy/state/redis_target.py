"""Where the shared Redis is, from `--redis`: one server, a Sentinel-managed primary, or a
Redis Cluster.

    redis://[user:password@]host:port[/db]          one server (rediss:// for TLS)
    redis+sentinel://[user:password@]host:port[,host:port...]/SERVICE[/db]
        the primary that the sentinels at those addresses name for SERVICE; after a
        failover, new connections go to the new primary (`rediss+sentinel://`: TLS to
        the primary; `sentinel_username` / `sentinel_password` when the sentinels
        require their own credentials)
    redis+cluster://[user:password@]host:port[,host:port...]
        a Redis Cluster, found from any of those seed nodes (`rediss+cluster://`: TLS)

Query parameters: `ssl_ca_certs` / `ssl_certfile` / `ssl_keyfile` (TLS files), `retries`
(how many times a command that failed on a broken connection is sent again, after a short
jittered backoff; default 1), and `wait_replicas` (after recording a token's use or
revocation, wait until that many replicas have it — Redis's WAIT, up to the operation
timeout; default 0: replication stays asynchronous). The user and password in the URL
are the Redis ACL user of the data nodes (URL-encoded). Any other scheme is refused at
start with a message naming the supported ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import SplitResult, parse_qsl, unquote, urlencode, urlsplit, urlunsplit

SINGLE_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_SENTINEL_AUTH = ("sentinel_username", "sentinel_password")
#: A retry rides over a pooled connection that broke (a restarted server, a failover);
#: more retries only make a call wait longer in an outage, where it must fail closed.
DEFAULT_RETRIES = 1
MAX_RETRIES = 10
MAX_WAIT_REPLICAS = 10
_OWN = ("retries", "wait_replicas")  # the proxy's parameters, not redis-py's

Mode = Literal["single", "sentinel", "cluster"]


class RedisUrlError(ValueError):
    """A `--redis` URL the proxy cannot use; `str()` says why and what would work."""


@dataclass(frozen=True, slots=True)
class RedisTarget:
    #: For one server, the URL redis-py reads (without the proxy's own parameters).
    url: str
    mode: Mode = "single"
    #: The sentinels' addresses (Sentinel) or the seed nodes (Cluster).
    nodes: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    sentinel_auth: dict[str, str] = field(default_factory=dict)
    tls_files: dict[str, str] = field(default_factory=dict)
    retries: int = DEFAULT_RETRIES
    #: Replicas that must have a use or revocation before the proxy goes on (WAIT).
    wait_replicas: int = 0

    @property
    def sentinel(self) -> bool:
        return self.mode == "sentinel"

    @property
    def cluster(self) -> bool:
        return self.mode == "cluster"


def parse_redis_url(url: str) -> RedisTarget:
    """The target `url` names; RedisUrlError for a scheme or form the proxy cannot use."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in (*SINGLE_SCHEMES, *SENTINEL_SCHEMES, *CLUSTER_SCHEMES):
        supported = ", ".join(
            f"{s}://" for s in (*SINGLE_SCHEMES, *SENTINEL_SCHEMES, *CLUSTER_SCHEMES)
        )
        raise RedisUrlError(
            f"--redis: unsupported scheme {parts.scheme!r} (supported: {supported})"
        )
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    query = dict(pairs)
    own = {
        "retries": _count(query, "retries", DEFAULT_RETRIES, MAX_RETRIES),
        "wait_replicas": _count(query, "wait_replicas", 0, MAX_WAIT_REPLICAS),
    }
    if scheme in SINGLE_SCHEMES:  # redis-py reads the rest of the URL and its parameters
        if set(query) & set(_OWN):
            rest = urlencode([(k, v) for k, v in pairs if k not in _OWN])
            url = urlunsplit(parts._replace(query=rest))
        return RedisTarget(url, **own)
    return _of_nodes(url, parts, query, own)


def _of_nodes(url: str, parts: SplitResult, query: dict[str, str], own: dict) -> RedisTarget:
    """A Sentinel or Cluster target: a list of nodes rather than one server."""
    scheme = parts.scheme.lower()
    known = (*_OWN, *TLS_FILES, *(_SENTINEL_AUTH if scheme in SENTINEL_SCHEMES else ()))
    unknown = sorted(set(query) - set(known))
    if unknown:
        raise RedisUrlError(
            f"--redis: unknown parameter(s) {', '.join(unknown)} (known: {', '.join(known)})"
        )
    hosts = parts.netloc.rpartition("@")[2]
    nodes = tuple(_address(h) for h in hosts.split(",") if h)
    path = [p for p in parts.path.split("/") if p]
    common = {
        "nodes": nodes,
        "username": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
        "tls": scheme.startswith("rediss"),
        "tls_files": {k: v for k, v in query.items() if k in TLS_FILES},
        **own,
    }
    if scheme in CLUSTER_SCHEMES:
        if not nodes or path:
            raise RedisUrlError(
                "--redis: a Cluster URL is redis+cluster://[user:password@]host:port[,host:port"
                "...] (a cluster has no databases: no /db)"
            )
        return RedisTarget(url, mode="cluster", **common)
    if not nodes or not 1 <= len(path) <= 2 or (len(path) == 2 and not path[1].isdigit()):
        raise RedisUrlError(
            "--redis: a Sentinel URL is redis+sentinel://[user:password@]host:port[,host:port"
            "...]/SERVICE[/db]"
        )
    sentinel_auth = {
        k.removeprefix("sentinel_"): v for k, v in query.items() if k in _SENTINEL_AUTH
    }
    return RedisTarget(
        url,
        mode="sentinel",
        service=path[0],
        db=int(path[1]) if len(path) == 2 else 0,
        sentinel_auth=sentinel_auth,
        **common,
    )


def _count(query: dict[str, str], name: str, default: int, most: int) -> int:
    text = query.get(name, str(default))
    if not text.isdigit() or int(text) > most:
        raise RedisUrlError(f"--redis: {name} must be a whole number from 0 to {most}")
    return int(text)


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RedisUrlError(f"--redis: address {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)
