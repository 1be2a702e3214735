"""Building the example backend's grpc.aio server.

It serves AuthService, UserService and DataService, the standard health service
(`grpc.health.v1`, SERVING) and server reflection, from which the proxy learns each
method's kind (unary or streaming).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from authproxy.keys.issuer import SigningKey
from authproxy.policy.model import Policy
from examples.backend.api.v1 import api_pb2, api_pb2_grpc
from examples.backend.auth_service import AuthService
from examples.backend.data_service import DataService
from examples.backend.key_reload import SigningKeyReload
from examples.backend.passwords import Passwords
from examples.backend.revocations import DEFAULT_TIMEOUT, ProxyRevocations
from examples.backend.sessions import SessionLedger
from examples.backend.store import Store
from examples.backend.tokens import ACCESS_TTL, Tokens, build_issuer
from examples.backend.user_service import UserService

SERVICES = ("AuthService", "UserService", "DataService")


@dataclass(frozen=True, slots=True)
class BackendConfig:
    policy: Policy
    #: Signs access and 2FA tokens (a PEM private key).
    signing_key: SigningKey
    #: Signs refresh tokens (an HMAC secret; its kid must be the one the policy names).
    refresh_key: SigningKey
    admin_emails: frozenset[str] = frozenset()
    access_ttl: float = ACCESS_TTL
    #: The proxy's admin API (`http://HOST:PORT`): logouts revoke tokens there. None: access
    #: tokens stay valid until they expire.
    proxy_admin: str | None = None
    #: The admin API's bearer secret, if it needs one.
    proxy_admin_token: str | None = field(default=None, repr=False)
    proxy_admin_timeout: float = DEFAULT_TIMEOUT
    #: The PEM file `signing_key` came from: when it changes (`authproxy keygen --rotate`),
    #: new access and 2FA tokens are signed with the key it then holds. None: never reloaded.
    signing_key_path: str | None = None


@dataclass(slots=True)
class Backend:
    server: grpc.aio.Server
    port: int
    store: Store
    ledger: SessionLedger
    health: health.aio.HealthServicer
    auth: AuthService = field(repr=False)
    #: Follows `BackendConfig.signing_key_path`, if one was given.
    signing_key_reload: SigningKeyReload | None = field(default=None, repr=False)

    async def stop(self, grace: float | None = 1.0) -> None:
        if self.signing_key_reload is not None:
            await self.signing_key_reload.stop()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self.auth.revocations is not None:
            await self.auth.revocations.close()


def service_names() -> list[str]:
    """Full names of every service the backend serves (for reflection)."""
    names = [api_pb2.DESCRIPTOR.services_by_name[s].full_name for s in SERVICES]
    return [*names, health.SERVICE_NAME, reflection.SERVICE_NAME]


async def start_backend(
    config: BackendConfig,
    listen: str = "127.0.0.1:0",
    passwords: Passwords | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> Backend:
    """Build, bind and start the server; `Backend.port` is the port it got.

    `passwords`: how passwords are hashed (None: argon2-cffi's defaults). `interceptors`:
    server interceptors for every call the backend receives, first one outermost (tests
    use them to see what reaches the backend)."""
    issuer = build_issuer(config.policy, config.signing_key, config.refresh_key)
    tokens = Tokens(issuer, config.access_ttl)
    store = Store()
    ledger = SessionLedger()
    revocations = None
    if config.proxy_admin is not None:
        revocations = ProxyRevocations(
            config.proxy_admin, config.proxy_admin_token, config.proxy_admin_timeout
        )
    auth = AuthService(
        store,
        tokens,
        ledger,
        passwords,
        config.admin_emails,
        revocations=revocations,
    )

    server = grpc.aio.server(interceptors=list(interceptors))
    api_pb2_grpc.add_AuthServiceServicer_to_server(auth, server)
    api_pb2_grpc.add_UserServiceServicer_to_server(UserService(store), server)
    api_pb2_grpc.add_DataServiceServicer_to_server(DataService(store), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(service_names(), server)

    port = _bind(server, listen)
    await server.start()
    for name in ("", *service_names()[: len(SERVICES)]):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    key_reload = None
    if config.signing_key_path is not None:
        key_reload = SigningKeyReload(issuer, config.signing_key_path, config.signing_key)
        key_reload.start()
    return Backend(server, port, store, ledger, health_servicer, auth, key_reload)


def _bind(server: grpc.aio.Server, listen: str) -> int:
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as e:
        raise OSError(f"cannot listen on {listen}: {e}") from None
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    return port


def hostport(listen: str) -> tuple[str, int]:
    """Split `HOST:PORT` (or `[v6]:PORT`); raises ValueError naming the problem."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"--listen must be HOST:PORT, got {listen!r}")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port {port} is out of range (0-65535)")
    if host.startswith("[") != host.endswith("]"):
        raise ValueError(f"--listen has an unbalanced IPv6 bracket: {listen!r}")
    return host, port


def admin_set(emails: Iterable[str]) -> frozenset[str]:
    return frozenset(e.strip().lower() for e in emails if e.strip())
