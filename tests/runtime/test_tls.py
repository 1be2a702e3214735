"""TLS over real loopback sockets: the TLS and mTLS listener, the client certificate's
identity (`x-auth-peer`, `peers:` rules), certificate rotation without dropped
connections, TLS and mTLS to the backend with new connections on rotation, server
reflection through the same upstream TLS, and one-line errors for unusable files.
Certificates come from `tests/support/certs.py` (EC P-256)."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection as grpc_reflection

from authproxy.runtime.serve import ConfigError
from authproxy.runtime.tls import (
    ServerTls,
    ServerTlsFiles,
    TlsError,
    UpstreamTls,
    UpstreamTlsFiles,
)
from authproxy.sidecar.catalog import Kind
from authproxy.sidecar.peer_identity import principal_of
from tests.support.certs import CA, Leaf, make_ca
from tests.support.echo_backend import EchoBackend
from tests.support.keys import Keys
from tests.support.policies import TEST_POLICY
from tests.support.running_proxy import RunningProxy, config_for, error_info, start_proxy
from tests.support.tokens import bearer, minted

HEALTH = "grpc.health.v1.Health"
GOOD = "spiffe://cluster/ns/a/sa/good"
OTHER = "spiffe://cluster/ns/b/sa/other"
PEER_POLICY = TEST_POLICY + f"  /test.Peer/*: {{level: access, peers: [{GOOD}]}}\n"


# -- certificates (once per session) ------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: CA  # the proxy's server cert, client certs, the backend's cert
    other_ca: CA  # trusted by nobody (until a rotation moves to it)
    server: Leaf  # localhost / 127.0.0.1, from `ca`
    server_next: Leaf  # the same names, from `other_ca`: the rotated certificate
    client_good: Leaf  # URI SAN GOOD
    client_other: Leaf  # URI SAN OTHER
    client_dn: Leaf  # no URI SAN: the subject is the principal
    client_untrusted: Leaf  # URI SAN GOOD, but from `other_ca`
    backend: Leaf  # DNS backend.test only
    proxy_v1: Leaf  # the proxy's client certificate to the backend
    proxy_v2: Leaf  # ... after rotation


@pytest.fixture(scope="session")
def pki() -> Pki:
    ca, other = make_ca("test CA"), make_ca("other CA")
    local = {"dns": ("localhost",), "ips": ("127.0.0.1",)}
    return Pki(
        ca=ca,
        other_ca=other,
        server=ca.issue("proxy", **local),
        server_next=other.issue("proxy next", **local),
        client_good=ca.issue("good", uris=(GOOD,)),
        client_other=ca.issue("other", uris=(OTHER,)),
        client_dn=ca.issue("batch-job", organization="Example Corp"),
        client_untrusted=other.issue("good", uris=(GOOD,)),
        backend=ca.issue("backend", dns=("backend.test",)),
        proxy_v1=ca.issue("proxy-v1"),
        proxy_v2=ca.issue("proxy-v2"),
    )


def write_server_files(d: Path, leaf: Leaf, client_ca: CA | None = None) -> ServerTlsFiles:
    cert, key = leaf.write(d, "tls")
    ca = client_ca.write(d / "client-ca.pem") if client_ca else None
    return ServerTlsFiles(str(cert), str(key), str(ca) if ca else None)


class SecretDir:
    """A directory laid out like a mounted Kubernetes Secret: `tls.crt -> ..data/tls.crt`,
    `..data -> ..vN`; `publish` swaps `..data` atomically, as the kubelet does."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.version = 0
        root.mkdir(parents=True, exist_ok=True)

    def publish(self, files: dict[str, bytes]) -> None:
        self.version += 1
        version = self.root / f"..v{self.version}"
        version.mkdir()
        for name, data in files.items():
            (version / name).write_bytes(data)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(version.name)
        os.replace(tmp, self.root / "..data")
        for name in files:
            link = self.root / name
            if not link.is_symlink():
                link.symlink_to(f"..data/{name}")

    def path(self, name: str) -> str:
        return str(self.root / name)


# -- a proxy and a backend ------------------------------------------------------------------


async def start_tls_proxy(
    tmp_path: Path,
    keys: Keys,
    backend_port: int,
    tls: ServerTlsFiles | None = None,
    upstream_tls: UpstreamTlsFiles | None = None,
    policy: str = TEST_POLICY,
    reflection: bool = False,
) -> RunningProxy:
    """The whole proxy (`AuthProxy`) with a TLS listener and/or TLS to the backend;
    `reflection`: it learns method kinds from the backend's server reflection."""
    fields = {}
    if tls is not None:
        fields.update(tls_cert=tls.cert, tls_key=tls.key, tls_client_ca=tls.client_ca)
    if upstream_tls is not None:
        fields.update(
            upstream_tls=True,
            upstream_ca=upstream_tls.ca,
            upstream_cert=upstream_tls.cert,
            upstream_key=upstream_tls.key,
            upstream_server_name=upstream_tls.server_name,
        )
    cfg = config_for(
        tmp_path,
        keys,
        policy,
        listen="127.0.0.1:0",
        upstream=f"127.0.0.1:{backend_port}",
        upstream_reflection=reflection,
        watch_policy=False,
        **fields,
    )
    return await start_proxy(cfg)


class WhoAmIBackend(EchoBackend):
    """The echo backend, plus `WhoAmI`: the client certificate's CN it saw (JSON)."""

    async def _whoami(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        names = context.auth_context().get("x509_common_name", [])
        return json.dumps([n.decode() for n in names]).encode()


async def start_tls_backend(
    leaf: Leaf, client_ca: CA | None = None, reflection: bool = False
) -> WhoAmIBackend:
    """`reflection`: it also serves grpc.health.v1 and server reflection listing it."""
    backend = WhoAmIBackend()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    if reflection:
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        grpc_reflection.enable_server_reflection((HEALTH, grpc_reflection.SERVICE_NAME), server)
    server.add_generic_rpc_handlers((backend,))
    credentials = grpc.ssl_server_credentials(
        [(leaf.key_pem, leaf.chain_pem)],
        root_certificates=client_ca.pem if client_ca else None,
        require_client_auth=client_ca is not None,
    )
    backend.port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    backend.server = server
    return backend


@pytest.fixture
async def proxies() -> AsyncIterator[list[RunningProxy]]:
    """Proxies a test starts; closed at its end."""
    started: list[RunningProxy] = []
    yield started
    for p in started:
        await p.stop()


# -- clients ----------------------------------------------------------------------------------


def client(port: int, root: CA | None = None, cert: Leaf | None = None) -> grpc.aio.Channel:
    """A TLS client (trusting `root`, presenting `cert`), or plaintext without `root`. Its
    own subchannel pool: every client makes its own connection (its own handshake)."""
    target, options = f"127.0.0.1:{port}", [("grpc.use_local_subchannel_pool", 1)]
    if root is None:
        return grpc.aio.insecure_channel(target, options=options)
    credentials = grpc.ssl_channel_credentials(
        root.pem, cert.key_pem if cert else None, cert.chain_pem if cert else None
    )
    return grpc.aio.secure_channel(target, credentials, options=options)


async def report(
    channel: grpc.aio.Channel, method: str, token: str | None = None, metadata: tuple = ()
) -> dict[str, list[str]]:
    """Call an echo backend's Report method; the metadata it received, grouped by key."""
    md = metadata + (bearer(token) if token else ())
    response = await channel.unary_unary(method)(b"{}", metadata=md, timeout=10)
    grouped: dict[str, list[str]] = {}
    for k, v in json.loads(response)["metadata"]:
        grouped.setdefault(k, []).append(v)
    return grouped


async def refused(channel: grpc.aio.Channel, method: str = "/test.Public/Report") -> bool:
    """The call fails as a failed connection does (UNAVAILABLE), never reaching a backend."""
    try:
        async with channel:
            await channel.unary_unary(method)(b"{}", timeout=10)
    except grpc.aio.AioRpcError as e:
        assert e.code() == grpc.StatusCode.UNAVAILABLE, e
        return True
    return False


async def connects(channel: grpc.aio.Channel, method: str = "/test.Public/Echo") -> bool:
    try:
        async with channel:
            return await channel.unary_unary(method)(b"hi", timeout=10) == b"hi"
    except grpc.aio.AioRpcError as e:
        assert e.code() == grpc.StatusCode.UNAVAILABLE, e
        return False


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# -- TLS inbound ------------------------------------------------------------------------------


async def test_tls_client_trusting_the_ca_reaches_the_backend(
    tmp_path: Path, keys: Keys, issuer, backend: EchoBackend, pki: Pki, proxies
):
    p = await start_tls_proxy(
        tmp_path, keys, backend.port, write_server_files(tmp_path, pki.server)
    )
    proxies.append(p)
    async with client(p.sidecar_port, pki.ca) as channel:
        md = await report(channel, "/test.Access/Report", minted(issuer), (("x-auth-peer", GOOD),))
    assert md["x-auth-subject"] == ["alice"]
    assert "x-auth-peer" not in md  # forged; and without mTLS there is no principal
    assert not p.sidecar.tls.requires_client_cert
    assert p.sidecar.tls.not_after == pki.server.cert.not_valid_after_utc.timestamp()


async def test_plaintext_client_is_refused_by_the_tls_listener(
    tmp_path: Path, keys: Keys, backend: EchoBackend, pki: Pki, proxies
):
    p = await start_tls_proxy(
        tmp_path, keys, backend.port, write_server_files(tmp_path, pki.server)
    )
    proxies.append(p)
    assert await refused(client(p.sidecar_port))
    assert backend.calls == []


async def test_client_trusting_another_ca_is_refused(
    tmp_path: Path, keys: Keys, backend: EchoBackend, pki: Pki, proxies
):
    p = await start_tls_proxy(
        tmp_path, keys, backend.port, write_server_files(tmp_path, pki.server)
    )
    proxies.append(p)
    assert await refused(client(p.sidecar_port, pki.other_ca))
    assert backend.calls == []


# -- mTLS --------------------------------------------------------------------------------------


async def start_mtls_proxy(
    tmp_path, keys, backend, pki, proxies, policy=TEST_POLICY
) -> RunningProxy:
    files = write_server_files(tmp_path, pki.server, client_ca=pki.ca)
    p = await start_tls_proxy(tmp_path, keys, backend.port, files, policy=policy)
    proxies.append(p)
    assert p.sidecar.tls.requires_client_cert
    return p


async def test_mtls_client_certificate_from_the_ca_passes(
    tmp_path: Path, keys: Keys, issuer, backend: EchoBackend, pki: Pki, proxies
):
    p = await start_mtls_proxy(tmp_path, keys, backend, pki, proxies)
    async with client(p.sidecar_port, pki.ca, pki.client_good) as channel:
        md = await report(channel, "/test.Access/Report", minted(issuer))
    assert md["x-auth-subject"] == ["alice"]


async def test_mtls_without_client_certificate_fails_the_handshake(
    tmp_path: Path, keys: Keys, backend: EchoBackend, pki: Pki, proxies
):
    p = await start_mtls_proxy(tmp_path, keys, backend, pki, proxies)
    assert await refused(client(p.sidecar_port, pki.ca))
    assert backend.calls == []


async def test_mtls_client_certificate_from_untrusted_ca_fails(
    tmp_path: Path, keys: Keys, backend: EchoBackend, pki: Pki, proxies
):
    p = await start_mtls_proxy(tmp_path, keys, backend, pki, proxies)
    assert await refused(client(p.sidecar_port, pki.ca, pki.client_untrusted))
    assert backend.calls == []


async def test_spiffe_id_reaches_backend_as_x_auth_peer_and_forged_one_is_stripped(
    tmp_path: Path, keys: Keys, issuer, backend: EchoBackend, pki: Pki, proxies
):
    p = await start_mtls_proxy(tmp_path, keys, backend, pki, proxies)
    forged = (("x-auth-peer", OTHER), ("x-auth-peer", "CN=root"), ("x_auth_peer", "x"))
    async with client(p.sidecar_port, pki.ca, pki.client_good) as channel:
        md = await report(channel, "/test.Access/Report", minted(issuer), forged)
        public = await report(channel, "/test.Public/Report", metadata=forged)
    assert md["x-auth-peer"] == [GOOD]
    assert public["x-auth-peer"] == [GOOD]
    assert "x_auth_peer" not in md


async def test_peers_rule_allows_listed_spiffe_id_and_denies_another_certificate(
    tmp_path: Path, keys: Keys, issuer, backend: EchoBackend, pki: Pki, proxies
):
    p = await start_mtls_proxy(tmp_path, keys, backend, pki, proxies, policy=PEER_POLICY)
    token = minted(issuer)
    async with client(p.sidecar_port, pki.ca, pki.client_good) as channel:
        md = await report(channel, "/test.Peer/Report", token)
    assert md["x-auth-peer"] == [GOOD]
    assert md["x-auth-subject"] == ["alice"]
    backend.calls.clear()
    async with client(p.sidecar_port, pki.ca, pki.client_other) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            # Claiming the allowed identity in metadata changes nothing.
            await report(channel, "/test.Peer/Report", token, (("x-auth-peer", GOOD),))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(caught.value).reason == "PEER_NOT_ALLOWED"
    assert "PEER_NOT_ALLOWED" in caught.value.details()
    assert backend.calls == []


async def test_certificate_without_uri_san_has_its_subject_dn_as_principal(
    tmp_path: Path, keys: Keys, issuer, backend: EchoBackend, pki: Pki, proxies
):
    p = await start_mtls_proxy(tmp_path, keys, backend, pki, proxies)
    async with client(p.sidecar_port, pki.ca, pki.client_dn) as channel:
        md = await report(channel, "/test.Access/Report", minted(issuer))
    assert md["x-auth-peer"] == ["CN=batch-job,O=Example Corp"]


def test_certificate_with_two_spiffe_ids_has_no_principal(pki: Pki):
    two = pki.ca.issue("two", uris=(GOOD, OTHER))
    assert principal_of(two.cert_pem) is None
    # One SPIFFE id next to another URI SAN: the SPIFFE id.
    mixed = pki.ca.issue("mixed", uris=("https://example.com/x", GOOD))
    assert principal_of(mixed.cert_pem) == GOOD


# -- reloading the listener's certificate -------------------------------------------------------


async def test_rotation_keeps_open_stream_and_new_connections_get_the_new_certificate(
    tmp_path: Path, keys: Keys, issuer, backend: EchoBackend, pki: Pki, proxies
):
    secret = SecretDir(tmp_path / "secret")
    secret.publish({"tls.crt": pki.server.chain_pem, "tls.key": pki.server.key_pem})
    files = ServerTlsFiles(secret.path("tls.crt"), secret.path("tls.key"))
    p = await start_tls_proxy(tmp_path, keys, backend.port, files)
    proxies.append(p)
    old = client(p.sidecar_port, pki.ca)
    stream = old.stream_stream("/test.Access/Chat")(
        metadata=(("authorization", f"Bearer {minted(issuer)}"),), timeout=30
    )
    await stream.write(b"1")
    assert await stream.read() == b"echo:1"
    assert not await connects(client(p.sidecar_port, pki.other_ca))

    secret.publish({"tls.crt": pki.server_next.chain_pem, "tls.key": pki.server_next.key_pem})
    await eventually(lambda: p.sidecar.tls.reloads["ok"] == 1, "the reload")

    assert await connects(client(p.sidecar_port, pki.other_ca))  # a new connection: the new cert
    assert not await connects(client(p.sidecar_port, pki.ca))
    assert p.sidecar.tls.not_after == pki.server_next.cert.not_valid_after_utc.timestamp()
    await stream.write(b"2")  # the connection made before keeps going
    assert await stream.read() == b"echo:2"
    await stream.done_writing()
    assert await stream.code() == grpc.StatusCode.OK
    assert await old.unary_unary("/test.Public/Echo")(b"x", timeout=10) == b"x"
    await old.close()
    assert p.sidecar.tls.reloads == {"ok": 1, "error": 0}
    assert not p.sidecar.tls.check()  # nothing changed since


async def test_mismatched_new_pair_keeps_the_old_certificate_and_counts_an_error(
    tmp_path: Path, keys: Keys, backend: EchoBackend, pki: Pki, proxies
):
    files = write_server_files(tmp_path / "tls", pki.server)
    p = await start_tls_proxy(tmp_path, keys, backend.port, files)
    proxies.append(p)
    # cert-manager style: the new certificate first, its key a moment later.
    Path(files.cert).write_bytes(pki.server_next.chain_pem)
    await eventually(lambda: p.sidecar.tls.reloads["error"] >= 1, "the refused reload")
    assert p.sidecar.tls.reloads["ok"] == 0
    assert await connects(
        client(p.sidecar_port, pki.ca)
    )  # the old pair still serves new connections
    assert not await connects(client(p.sidecar_port, pki.other_ca))
    assert p.sidecar.tls.not_after == pki.server.cert.not_valid_after_utc.timestamp()
    errors = p.sidecar.tls.reloads["error"]
    assert not p.sidecar.tls.check()  # the same bad set is not counted twice
    assert p.sidecar.tls.reloads["error"] == errors

    Path(files.key).write_bytes(pki.server_next.key_pem)
    await eventually(lambda: p.sidecar.tls.reloads["ok"] == 1, "the reload")
    assert await connects(client(p.sidecar_port, pki.other_ca))


async def test_expired_server_certificate_is_served_with_a_warning(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
):
    now = datetime.datetime.now(datetime.UTC)
    expired = pki.ca.issue(
        "old",
        dns=("localhost",),
        not_before=now - datetime.timedelta(days=2),
        not_after=now - datetime.timedelta(days=1),
    )
    with caplog.at_level(logging.WARNING, logger="authproxy.tls"):
        tls = ServerTls(write_server_files(tmp_path, expired))
    assert "the certificate expired at" in caplog.text
    assert tls.not_after < now.timestamp()


# -- TLS to the backend -------------------------------------------------------------------------


def upstream_files(d: Path, ca: CA, cert: Leaf | None = None) -> UpstreamTlsFiles:
    ca_path = ca.write(d / "upstream-ca.pem")
    crt = key = None
    if cert is not None:
        crt, key = (str(p) for p in cert.write(d, "upstream-client"))
    return UpstreamTlsFiles(str(ca_path), crt, key, server_name="backend.test")


async def test_upstream_tls_with_server_name_reaches_the_backend(
    tmp_path: Path, keys: Keys, issuer, pki: Pki, proxies
):
    tls_backend = await start_tls_backend(pki.backend)
    try:
        files = upstream_files(tmp_path, pki.ca)
        p = await start_tls_proxy(tmp_path, keys, tls_backend.port, upstream_tls=files)
        proxies.append(p)
        async with client(p.sidecar_port) as channel:
            md = await report(channel, "/test.Access/Report", minted(issuer))
        assert md["x-auth-subject"] == ["alice"]
    finally:
        await tls_backend.server.stop(None)


async def test_upstream_tls_with_the_wrong_ca_is_unavailable(
    tmp_path: Path, keys: Keys, issuer, pki: Pki, proxies
):
    tls_backend = await start_tls_backend(pki.backend)
    try:
        files = upstream_files(tmp_path, pki.other_ca)
        p = await start_tls_proxy(tmp_path, keys, tls_backend.port, upstream_tls=files)
        proxies.append(p)
        async with client(p.sidecar_port) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await report(channel, "/test.Access/Report", minted(issuer))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"upstream 127.0.0.1:{tls_backend.port} is unavailable" in caught.value.details()
        assert tls_backend.calls == []
    finally:
        await tls_backend.server.stop(None)


async def whoami(channel: grpc.aio.Channel) -> list[str]:
    return json.loads(await channel.unary_unary("/test.Public/WhoAmI")(b"", timeout=10))


async def test_upstream_mtls_presents_the_client_certificate(
    tmp_path: Path, keys: Keys, pki: Pki, proxies
):
    tls_backend = await start_tls_backend(pki.backend, client_ca=pki.ca)
    try:
        with_cert = upstream_files(tmp_path / "a", pki.ca, pki.proxy_v1)
        p = await start_tls_proxy(tmp_path, keys, tls_backend.port, upstream_tls=with_cert)
        proxies.append(p)
        async with client(p.sidecar_port) as channel:
            assert await whoami(channel) == ["proxy-v1"]
        without = upstream_files(tmp_path / "b", pki.ca)
        q = await start_tls_proxy(tmp_path, keys, tls_backend.port, upstream_tls=without)
        proxies.append(q)
        async with client(q.sidecar_port) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await whoami(channel)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await tls_backend.server.stop(None)


async def test_upstream_certificate_rotation_opens_new_connections_and_calls_keep_working(
    tmp_path: Path, keys: Keys, pki: Pki, proxies
):
    tls_backend = await start_tls_backend(pki.backend, client_ca=pki.ca)
    try:
        files = upstream_files(tmp_path / "upstream", pki.ca, pki.proxy_v1)
        p = await start_tls_proxy(tmp_path, keys, tls_backend.port, upstream_tls=files)
        proxies.append(p)
        channel = client(p.sidecar_port)
        assert await whoami(channel) == ["proxy-v1"]
        stream = channel.stream_stream("/test.Public/Chat")(timeout=30)
        await stream.write(b"1")
        assert await stream.read() == b"echo:1"
        [first] = p.sidecar.upstream.connections

        pki.proxy_v2.write(tmp_path / "upstream", "upstream-client")
        await eventually(lambda: p.sidecar.upstream.tls.reloads["ok"] == 1, "the reload")
        assert await whoami(channel) == ["proxy-v2"]  # new calls: a new connection
        assert first.going_away  # it takes no new calls

        await stream.write(b"2")  # the stream on the old connection keeps going
        assert await stream.read() == b"echo:2"
        await stream.done_writing()
        assert await stream.code() == grpc.StatusCode.OK
        # Its last call done, the old connection is closed.
        await eventually(lambda: first.closed, "the old connection to close")
        await channel.close()
    finally:
        await tls_backend.server.stop(None)


async def learned_kinds(p: RunningProxy) -> dict[str, Kind]:
    """The method kinds once reflection has learned them (it retries while it fails)."""
    assert p.sidecar.learning is not None
    async with asyncio.timeout(15):
        await asyncio.shield(p.sidecar.learning)
    return p.sidecar.catalog.kinds


async def test_method_kinds_are_learned_by_reflection_through_upstream_mtls(
    tmp_path: Path, keys: Keys, pki: Pki, proxies
):
    """The backend takes only mTLS connections with its name's certificate: reflection
    gets through with the upstream CA, client certificate and server name."""
    tls_backend = await start_tls_backend(pki.backend, client_ca=pki.ca, reflection=True)
    try:
        files = upstream_files(tmp_path, pki.ca, pki.proxy_v1)
        p = await start_tls_proxy(
            tmp_path, keys, tls_backend.port, upstream_tls=files, reflection=True
        )
        proxies.append(p)
        kinds = await learned_kinds(p)
        assert kinds[f"/{HEALTH}/Check"] is Kind.UNARY
        assert kinds[f"/{HEALTH}/Watch"] is Kind.SERVER_STREAMING
    finally:
        await tls_backend.server.stop(None)


async def test_without_upstream_ca_calls_and_reflection_trust_the_system_store(
    tmp_path: Path, keys: Keys, pki: Pki, proxies, monkeypatch: pytest.MonkeyPatch
):
    """No --upstream-ca: the relay's connections and reflection's channel both trust the
    system store (here `SSL_CERT_FILE`, holding the test CA), not grpcio's own bundle."""
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca.write(tmp_path / "system-roots.pem")))
    tls_backend = await start_tls_backend(pki.backend, reflection=True)
    try:
        files = UpstreamTlsFiles(server_name="backend.test")
        p = await start_tls_proxy(
            tmp_path, keys, tls_backend.port, upstream_tls=files, reflection=True
        )
        proxies.append(p)
        async with client(p.sidecar_port) as channel:
            assert await whoami(channel) == []  # relayed over TLS (no client certificate)
        kinds = await learned_kinds(p)
        assert kinds[f"/{HEALTH}/Check"] is Kind.UNARY
    finally:
        await tls_backend.server.stop(None)


# -- files the proxy cannot use ------------------------------------------------------------------


def _encrypted_key(leaf: Leaf) -> bytes:
    return leaf.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )


BAD_SERVER_FILES = {
    # case: (what to write over tls.crt / tls.key / client-ca.pem, or None to delete;
    #        the flag and file the message names; the problem it states)
    "missing cert": ({"tls.crt": None}, "--tls-cert", "tls.crt", "cannot read it: No such file"),
    "garbage cert": ({"tls.crt": b"hello\n"}, "--tls-cert", "tls.crt", "no PEM certificate"),
    "broken cert": (
        {"tls.crt": b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"},
        "--tls-cert",
        "tls.crt",
        "cannot be parsed",
    ),
    "key as cert": ({"tls.crt": "key"}, "--tls-cert", "tls.crt", "holds a private key"),
    "garbage key": ({"tls.key": b"\x00\x01"}, "--tls-key", "tls.key", "no PEM private key"),
    "encrypted key": ({"tls.key": "encrypted"}, "--tls-key", "tls.key", "encrypted"),
    "mismatch": (
        {"tls.key": "other key"},
        "--tls-key",
        "tls.key",
        "does not match the certificate in --tls-cert ",
    ),
    "ca without certs": (
        {"client-ca.pem": b"# empty bundle\n"},
        "--tls-client-ca",
        "client-ca.pem",
        "contains no PEM certificates",
    ),
}


@pytest.mark.parametrize("case", BAD_SERVER_FILES)
def test_bad_server_files_raise_one_line_error_naming_flag_and_file(
    tmp_path: Path, pki: Pki, case: str
):
    changes, flag, name, problem = BAD_SERVER_FILES[case]
    files = write_server_files(tmp_path, pki.server, client_ca=pki.ca)
    special = {
        "key": pki.server.key_pem,
        "encrypted": _encrypted_key(pki.server),
        "other key": pki.server_next.key_pem,
    }
    for file, data in changes.items():
        path = tmp_path / file
        if data is None:
            path.unlink()
        else:
            path.write_bytes(special[data] if isinstance(data, str) else data)
    with pytest.raises(TlsError) as caught:
        ServerTls(files)
    message = str(caught.value)
    assert message.startswith(f"{flag} {tmp_path / name}: ")
    assert problem in message
    assert "\n" not in message


def test_bad_upstream_files_raise_one_line_error(tmp_path: Path, pki: Pki):
    cert, key = pki.proxy_v1.write(tmp_path, "client")
    with pytest.raises(TlsError, match=r"^--upstream-cert .*client\.crt: needs --upstream-key"):
        UpstreamTls(UpstreamTlsFiles(cert=str(cert)))
    other_cert, _ = pki.proxy_v2.write(tmp_path, "other")
    with pytest.raises(TlsError, match=r"^--upstream-key .*client\.key: does not match"):
        UpstreamTls(UpstreamTlsFiles(cert=str(other_cert), key=str(key)))
    with pytest.raises(TlsError, match=r"^--upstream-ca .*missing\.pem: cannot read it"):
        UpstreamTls(UpstreamTlsFiles(ca=str(tmp_path / "missing.pem")))
    with pytest.raises(TlsError, match=r"^--upstream-server-name 'a b': not a host name"):
        UpstreamTls(UpstreamTlsFiles(server_name="a b"))


async def test_the_proxy_does_not_start_with_an_unusable_tls_file(
    tmp_path: Path, keys: Keys, backend: EchoBackend, pki: Pki
):
    files = write_server_files(tmp_path, pki.server)
    Path(files.key).write_bytes(pki.server_next.key_pem)
    with pytest.raises(ConfigError) as caught:
        await start_tls_proxy(tmp_path, keys, backend.port, files)
    assert str(caught.value) == (
        f"--tls-key {files.key}: does not match the certificate in --tls-cert {files.cert}"
    )


def test_a_chain_not_starting_with_the_leaf_is_named(tmp_path: Path, pki: Pki):
    files = write_server_files(tmp_path, pki.server)
    Path(files.cert).write_bytes(pki.ca.pem + pki.server.cert_pem)
    with pytest.raises(TlsError, match=r"it matches certificate 2; put the leaf first\)$"):
        ServerTls(files)
