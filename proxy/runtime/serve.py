"""Assembling and running the proxy: one `Authorizer` shared by up to three front ends —
the gRPC sidecar (`--upstream`), the Envoy ext_authz gRPC server (`--ext-authz-grpc`) and
the Envoy ext_authz HTTP server (`--ext-authz-http`) — built from a `ServeConfig`
(`runtime/config.py`, which finds every configuration problem before anything listens).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Iterable
from time import monotonic

from authproxy.decide.client_address import TrustedProxies
from authproxy.decide.pipeline import Authorizer, Observer
from authproxy.decide.policy_tests import verify_policy
from authproxy.decide.rate_limits import RateLimiter
from authproxy.decide.request_fields import missing_types, request_field_problems
from authproxy.decide.state_checks import SingleUse, revocation_check
from authproxy.ext_authz.grpc_check import CheckServer
from authproxy.ext_authz.http_check import CheckHttpServer
from authproxy.keys.ring import KeyRing
from authproxy.keys.verify import TokenVerifier
from authproxy.policy.loader import PolicyError
from authproxy.policy.model import Policy
from authproxy.runtime.admin import AdminServer
from authproxy.runtime.config import (
    DEFAULT_LISTEN,
    DEFAULT_MAX_MESSAGE_BYTES,
    ConfigError,
    ServeConfig,
    build_state,
    check_address,
    check_policy_keys,
    load_keys,
    read_policy,
    warn_volatile_state,
)
from authproxy.runtime.decision_log import DecisionLog
from authproxy.runtime.metrics import Metrics
from authproxy.runtime.operations import Operations
from authproxy.runtime.policy_reload import OnReload, PolicyReloader
from authproxy.runtime.tracing import Tracing, build_tracing
from authproxy.sidecar.catalog import CatalogError, MethodCatalog
from authproxy.sidecar.listener import Sidecar
from authproxy.state.store import StateStore

#: Names other modules import from here (the configuration lives in `runtime/config.py`).
__all__ = [
    "DEFAULT_LISTEN",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "AuthProxy",
    "ConfigError",
    "ServeConfig",
    "Sidecar",
    "assemble_authorizer",
    "build_authorizer",
    "build_state",
    "check",
    "check_policy_keys",
    "check_policy_tests",
    "load_keys",
    "read_policy",
    "run",
]

log = logging.getLogger("authproxy")
#: Seconds queued spans get to be exported when the proxy stops, however short the grace.
MIN_FLUSH = 1.0


def build_authorizer(
    cfg: ServeConfig,
    state: StateStore,
    policy: Policy | None = None,
    keys: KeyRing | None = None,
    observers: Iterable[Observer] = (),
) -> Authorizer:
    """`policy`: already read with `read_policy` (default: read it now); `keys`: from
    `load_keys` (default: load them now; remote sets are fetched once the ring starts);
    `observers`: told every decision (metrics, the decision log)."""
    if policy is None:
        policy, _ = read_policy(cfg)
    if keys is None:
        keys = load_keys(cfg)
    check_policy_keys(policy, keys)
    try:
        trusted = TrustedProxies(cfg.trusted_proxies)
    except ValueError as e:
        raise ConfigError(f"--trusted-proxy: {e}") from None
    verifier = TokenVerifier(
        keys, cache_size=cfg.token_cache_size, refresher=keys.refresh_for if keys.remote else None
    )
    return assemble_authorizer(policy, verifier, state, trusted, observers)


def assemble_authorizer(
    policy: Policy,
    verifier: TokenVerifier,
    state: StateStore,
    trusted: TrustedProxies | None = None,
    observers: Iterable[Observer] = (),
) -> Authorizer:
    """The pipeline's steps on a state store: revocation and "already used?", then rate
    limits, then the single-use record (last: only a call let through spends its token).
    `serve` and `explain` both build theirs here."""
    single_use = SingleUse(state)
    return Authorizer(
        policy,
        verifier,
        (revocation_check(state), single_use.check),
        RateLimiter(state.rate_limit_storage(), trusted),
        recorders=(single_use.record,),
        observers=observers,
    )


async def check_policy_tests(policy: Policy) -> None:
    """The policy's own tests (`decide/policy_tests.py`) must pass: ConfigError listing
    the failures, or the test files' problems, otherwise."""
    try:
        await verify_policy(policy, assemble_authorizer)
    except PolicyError as e:
        raise ConfigError(str(e)) from None


def warn_unreadable_fields(cfg: ServeConfig, policy: Policy, catalog: MethodCatalog) -> None:
    """Say which `request:` rules can never be checked (no descriptor set names their
    methods and no backend reflection will): their calls are refused FIELDS_UNAVAILABLE."""
    if cfg.upstream and cfg.upstream_reflection:
        return  # readiness waits for reflection to name them
    missing = missing_types(policy, catalog.types)
    if missing:
        log.warning(
            "no descriptor names the request types of %s (give --descriptor-set): calls to"
            " them are refused (FIELDS_UNAVAILABLE)",
            ", ".join(missing),
        )


def build_catalog(cfg: ServeConfig, policy: Policy) -> MethodCatalog:
    """The methods the descriptor sets name (`--descriptor-set`); the sidecar adds what the
    backend's reflection lists. ConfigError when a `request:` rule of `policy` names a field
    its method's type lacks (reflection's types are checked when it answers)."""
    catalog = MethodCatalog()
    try:
        for path in cfg.descriptor_sets:
            catalog.add_descriptor_set(path)
    except CatalogError as e:
        raise ConfigError(str(e)) from None
    problems = request_field_problems(policy, catalog.types)
    if problems:
        raise ConfigError(str(PolicyError(problems)))
    return catalog


def build_admin(cfg: ServeConfig, state: StateStore, ops: Operations) -> AdminServer:
    """The admin listener (`--admin`), with its bearer secret from `--admin-token-env`."""
    assert cfg.admin is not None
    check_address("--admin", cfg.admin)
    token = None
    if cfg.admin_token_env:
        token = os.environ.get(cfg.admin_token_env)
        if not token or len(token) < 16:
            raise ConfigError(
                f"--admin-token-env {cfg.admin_token_env}: the variable must hold a"
                " secret of at least 16 characters"
            )
    if cfg.admin_metrics_auth and token is None:
        raise ConfigError("--admin-metrics-auth needs --admin-token-env")
    return AdminServer(state, cfg.admin, token, ops, cfg.admin_metrics_auth)


def check_front_ends(cfg: ServeConfig) -> None:
    """At least one front end, and the ext_authz addresses well-formed (ConfigError)."""
    if not (cfg.upstream or cfg.ext_authz_grpc or cfg.ext_authz_http):
        raise ConfigError(
            "nothing to serve: give --upstream (the sidecar) and/or --ext-authz-grpc"
            " / --ext-authz-http (Envoy ext_authz)"
        )
    for flag, value in (
        ("--ext-authz-grpc", cfg.ext_authz_grpc),
        ("--ext-authz-http", cfg.ext_authz_http),
    ):
        if value is not None:
            check_address(flag, value)


class AuthProxy:
    """The whole process: one authorizer, and each front end the configuration asks for."""

    def __init__(self, cfg: ServeConfig) -> None:
        """Builds every part and checks the configuration (ConfigError); nothing listens
        before `start`, so a proxy that is never started is a configuration check."""
        check_front_ends(cfg)
        self.state = build_state(cfg)
        policy, policy_text = read_policy(cfg)
        self.keys = load_keys(cfg)
        self.catalog = build_catalog(cfg, policy)
        # The composition root: every part is built here, once, and given what it works
        # with in its constructor.
        self.tracing = tracing = build_tracing(cfg.tracing)  # None: tracing off
        metrics = Metrics()
        decisions = DecisionLog(cfg.log_allows, trace_ids=tracing and tracing.current_ids)
        self.authorizer = build_authorizer(
            cfg, self.state, policy, self.keys, (metrics.observe, decisions)
        )
        self.sidecar = None
        reload_listeners: list[OnReload] = [metrics.policy_changed]
        if cfg.upstream:
            self.sidecar = Sidecar(
                cfg, self.authorizer, self.state, self.catalog, metrics.upstream_seconds, tracing
            )
            reload_listeners.append(self.sidecar.guard.policy_changed)
        reloader = PolicyReloader(
            cfg.policy, self.authorizer, self.keys, check_policy_keys, policy_text,
            reload_listeners, self._gate,
        )  # fmt: skip
        self.ops = Operations(
            self.authorizer, self.state, self.keys, reloader, metrics, cfg.keys_wait,
            self.catalog.types,
        )  # fmt: skip
        if self.sidecar is not None:
            self.ops.watch_sidecar(self.sidecar.upstream, self.sidecar.guard, self.sidecar.tls)
        self.admin = build_admin(cfg, self.state, self.ops) if cfg.admin else None
        self.check_grpc, self.check_http = self._ext_authz(cfg, tracing)
        for mode, server in (("grpc", self.check_grpc), ("http", self.check_http)):
            if server is not None:
                self.ops.watch_ext_authz(mode, server)
        self.cfg = cfg

    def _ext_authz(
        self, cfg: ServeConfig, tracing: Tracing | None
    ) -> tuple[CheckServer | None, CheckHttpServer | None]:
        """The Envoy ext_authz front ends the configuration asks for."""
        check_grpc = check_http = None
        shared = cfg.workers > 1  # every worker listens on the same ports
        if cfg.ext_authz_grpc:
            check_grpc = CheckServer(
                self.authorizer, cfg.ext_authz_grpc, shared, tracing, types=self.catalog.types
            )
        if cfg.ext_authz_http:
            try:
                check_http = CheckHttpServer(
                    self.authorizer, cfg.ext_authz_http, cfg.ext_authz_http_path_prefix, shared,
                    tracing=tracing,
                )  # fmt: skip
            except ValueError as e:
                raise ConfigError(f"--ext-authz-http {cfg.ext_authz_http}: {e}") from None
        return check_grpc, check_http

    async def _gate(self, policy: Policy) -> None:
        """What a reloaded version must pass besides validation (PolicyError otherwise: the
        reload is refused): request fields its methods' types have, and its tests."""
        problems = request_field_problems(policy, self.catalog.types)
        if problems:
            raise PolicyError(problems)
        await verify_policy(policy, assemble_authorizer)

    @property
    def reloader(self) -> PolicyReloader:
        return self.ops.reloader

    async def start(self) -> None:
        try:  # before anything runs or listens
            await check_policy_tests(self.authorizer.policy)
        except ConfigError:
            await self.stop(0)
            raise
        # Said once the configuration has passed every check (a refused one gets only
        # its error).
        warn_volatile_state(self.cfg, self.authorizer.policy)
        await self.state.start()
        await self.keys.start()
        if self.keys.remote:  # a moment for the first fetches; readiness waits for them anyway
            await self.keys.wait_loaded(self.cfg.jwks_fetch.timeout)
        try:
            await self._open_listeners()
        except ConfigError:
            await self.stop(0)  # what did open closes again
            raise
        warn_unreadable_fields(self.cfg, self.authorizer.policy, self.catalog)
        if self.cfg.watch_policy:
            self.reloader.start()

    async def _open_listeners(self) -> None:
        """Each listener binds now, in this order; a port it cannot have is a ConfigError
        naming its flag and address."""
        cfg = self.cfg
        listeners = (
            ("--admin", cfg.admin, self.admin, "admin API"),
            ("--listen", cfg.listen, self.sidecar, None),  # the sidecar logs its own line
            ("--ext-authz-grpc", cfg.ext_authz_grpc, self.check_grpc, "ext_authz gRPC (Check)"),
            ("--ext-authz-http", cfg.ext_authz_http, self.check_http, "ext_authz HTTP"),
        )
        for flag, address, listener, what in listeners:
            if listener is None:
                continue
            try:
                await listener.start()
            except OSError as e:
                raise ConfigError(f"{flag} {address}: {e.strerror or e}") from None
            if what is not None:
                log.info("%s listening on port %d", what, listener.port)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: readiness goes false, the front ends stop taking calls and let the ones
        in flight (streams too) finish for up to `grace` seconds; the admin listener
        answers (`/readyz` 503) until they are done. Spans still queued are exported for
        the rest of the grace (at least `MIN_FLUSH` seconds)."""
        grace = self.cfg.shutdown_grace if grace is None else grace
        stopping = monotonic()
        self.ops.draining = True
        await self.reloader.stop()
        fronts = (self.sidecar, self.check_grpc, self.check_http)
        await asyncio.gather(*(front.stop(grace) for front in fronts if front is not None))
        if self.admin is not None:
            await self.admin.stop()
        await self.keys.close()
        await self.state.close()
        if self.tracing is not None:  # spans still queued: for the rest of the grace
            await self.tracing.close(max(MIN_FLUSH, grace - (monotonic() - stopping)))


async def check(cfg: ServeConfig) -> None:
    """Build everything `run` would from `cfg`, without starting it (nothing listens): a
    configuration problem raises the `ConfigError` `run` would (the workers' supervisor
    checks this way before it starts any worker; a port it cannot bind, a worker finds)."""
    proxy = AuthProxy(cfg)
    try:
        await check_policy_tests(proxy.authorizer.policy)
    finally:
        await proxy.stop(0)


async def run(cfg: ServeConfig, stopping: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or until `stopping` is set), then drain in-flight calls
    for up to the grace period."""
    proxy = AuthProxy(cfg)
    await proxy.start()
    if stopping is None:
        stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    reloads: set[asyncio.Task] = set()

    def reload() -> None:
        task = loop.create_task(proxy.reloader.reload("SIGHUP"))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    # A worker starts with SIGHUP blocked (`runtime/workers.py`): a reload asked for while it was
    # starting waits until now instead of ending it.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    await stopping.wait()
    log.info("shutting down (grace %.0fs)", cfg.shutdown_grace)
    await proxy.stop()
