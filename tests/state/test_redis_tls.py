"""Managed-Redis realities on a real `redis-server` with TLS: an ACL user with a password,
the server's certificate checked against a CA bundle, and a client certificate the server
requires (`rediss://user:pass@host:port/0?ssl_ca_certs=...&ssl_certfile=...&ssl_keyfile=...`),
and the same on a three-primary Redis Cluster whose nodes serve (and talk to each other
over) TLS only to clients (`rediss+cluster://...`). Each misconfiguration fails closed,
counted, within a bound: never a hang."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from limits import parse

from authproxy.state.redis_store import RedisState
from bench.redis_cluster import RedisCluster
from tests.support.certs import make_ca
from tests.support.redis_server import (
    START_TIMEOUT,
    assert_fails_closed,
    free_port,
    redis_server_binary,
    running_state,
)
from tests.support.waits import poll

PASSWORD = "s3cret pass/word"  # URL-encoded in the URL
QUOTED = "s3cret%20pass%2Fword"


@dataclass
class TlsRedis:
    ports: list[int]
    ca: Path
    cert: Path
    key: Path
    other_ca: Path
    cluster: bool = False

    def url(
        self,
        password: str = QUOTED,
        ca: Path | None = None,
        client_cert: bool = True,
        scheme: str | None = None,
    ) -> str:
        query = f"ssl_ca_certs={ca or self.ca}"
        if client_cert:
            query += f"&ssl_certfile={self.cert}&ssl_keyfile={self.key}"
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.ports)
        if self.cluster:
            return f"{scheme or 'rediss'}+cluster://proxy:{password}@{hosts}?{query}"
        return f"{scheme or 'rediss'}://proxy:{password}@{hosts}/0?{query}"


@pytest.fixture(params=["single", "cluster"])
def tls_redis(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TlsRedis]:
    ca = make_ca("redis test CA")
    server_cert, server_key = ca.issue("redis", ips=("127.0.0.1",)).write(tmp_path, "server")
    client_cert, client_key = ca.issue("proxy", server=False).write(tmp_path, "client")
    other_ca = make_ca("another CA").write(tmp_path / "other-ca.pem")
    if request.param == "cluster":
        ca.write(tmp_path / "ca.pem")
        yield from _tls_cluster(
            tmp_path, server_cert, server_key, client_cert, client_key, other_ca
        )
        return
    port = free_port()
    args = [
        redis_server_binary(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
        "--save", "", "--appendonly", "no", "--dir", str(tmp_path),
        "--tls-cert-file", str(server_cert), "--tls-key-file", str(server_key),
        "--tls-ca-cert-file", str(ca.write(tmp_path / "ca.pem")), "--tls-auth-clients", "yes",
        "--user", "proxy", "on", f">{PASSWORD}", "~*", "&*", "+@all", "--user", "default", "off",
    ]  # fmt: skip
    log = (tmp_path / "redis.log").open("w")
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        served = TlsRedis([port], tmp_path / "ca.pem", client_cert, client_key, other_ca)
        _wait_listening(port, process, tmp_path / "redis.log")
        yield served
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


def _tls_cluster(
    tmp_path: Path, cert: Path, key: Path, client_cert: Path, client_key: Path, other_ca: Path
) -> Iterator[TlsRedis]:
    """Three primaries; clients reach them over TLS only with a client certificate and the
    ACL user (the plain ports, with the default user, are the harness's)."""
    redis_server_binary()
    options = {
        "tls-cert-file": str(cert), "tls-key-file": str(key),
        "tls-ca-cert-file": str(tmp_path / "ca.pem"), "tls-auth-clients": "yes",
    }  # fmt: skip
    cluster = RedisCluster(tmp_path / "cluster", tls=options)
    for node in cluster.nodes:
        node.extra_args += ("--user", "proxy", "on", f">{PASSWORD}", "~*", "&*", "+@all")
    cluster.start()
    try:
        yield TlsRedis(
            cluster.tls_ports, tmp_path / "ca.pem", client_cert, client_key, other_ca, True
        )
    finally:
        cluster.stop()


def _wait_listening(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        assert process.poll() is None, f"redis-server exited:\n{log.read_text()}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"redis-server with TLS did not listen:\n{log.read_text()}")


async def test_an_acl_user_over_tls_with_a_client_certificate_shares_the_state(
    tls_redis: TlsRedis,
):
    exp = time.time() + 300
    async with (
        running_state(tls_redis.url(), timeout=5.0, staleness=5.0) as a,
        running_state(tls_redis.url(), timeout=5.0, staleness=5.0) as b,
    ):
        await a.revoke_token("jti-1", exp)

        async def seen() -> bool:
            return b.revoked("jti-1", "x", None)

        found, _ = await poll(seen, bool, 10)
        assert found
        assert await a.first_use("use-1", exp) is True
        assert await b.first_use("use-1", exp) is False
        b.check_fresh()
        limiter = a.rate_limit_storage()
        item = parse("2/minute")
        assert await limiter.incr(item.key_for("k"), item.get_expiry()) == 1


@pytest.mark.parametrize(
    "mistake", ["wrong password", "no client certificate", "another CA", "plain redis://"]
)
async def test_each_tls_or_acl_mistake_fails_closed_without_hanging(
    tls_redis: TlsRedis, mistake: str
):
    url = {
        "wrong password": tls_redis.url(password="wrong"),
        "no client certificate": tls_redis.url(client_cert=False),
        "another CA": tls_redis.url(ca=tls_redis.other_ca),
        "plain redis://": tls_redis.url(scheme="redis").partition("?")[0],
    }[mistake]
    state: RedisState = await assert_fails_closed(url)
    assert state.failures_total > 0
