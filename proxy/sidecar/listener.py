"""The gRPC sidecar front end, assembled: the frame relay (`sidecar/relay.py`) on its listener, its
backend connections (`sidecar/upstream_pool.py`), the `StreamGuard` that ends open streams, and
the `MethodCatalog` of method kinds.

Method kinds come from descriptor sets (at once) and from the backend's server reflection
(learned in the background, retried with backoff while the backend does not answer).
They feed the stream guard's unary shortcut (a known unary call is decided once and never
watched), the `unary` label of `authproxy_upstream_seconds` and the startup log of served
methods no rule names. Reflection is a gRPC call of its own, on a channel that uses the
same upstream TLS settings as the relay's connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

import grpc

from authproxy.decide.pipeline import Authorizer
from authproxy.decide.request_fields import missing_types, request_field_problems
from authproxy.policy.lint import uncovered
from authproxy.runtime.config import ConfigError, ServeConfig, check_address, tls_from
from authproxy.runtime.metrics import LabelledHistogram
from authproxy.runtime.tls import UpstreamTls
from authproxy.sidecar.catalog import MethodCatalog, reflection_problem
from authproxy.sidecar.peer_identity import transport_principal
from authproxy.sidecar.relay import Relay
from authproxy.sidecar.stream_guard import StreamGuard
from authproxy.sidecar.upstream_pool import UpstreamPool
from authproxy.state.store import StateStore
from authproxy.wire.h2_engine import Limits

if TYPE_CHECKING:
    from authproxy.runtime.tracing import Tracing

log = logging.getLogger("authproxy")

#: Longest pause between two reflection attempts while the backend does not answer.
MAX_REFLECTION_DELAY = 30.0
#: How long one reflection attempt waits for the backend's answer.
REFLECTION_TIMEOUT = 5.0


class Sidecar:
    """A sidecar: listener, stream guard, method kinds and backend connections around the
    one `Authorizer` the process shares."""

    def __init__(
        self,
        cfg: ServeConfig,
        authorizer: Authorizer,
        state: StateStore,
        catalog: MethodCatalog,
        upstream_seconds: LabelledHistogram | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        """The `StreamGuard` watches open streams against `state` (revocations, staleness);
        `tracing` (None: off) traces each decision and relayed call. `catalog`: the methods
        known from descriptor sets; reflection adds to it. Nothing listens before `start`,
        so a sidecar that is never started is a configuration check."""
        if cfg.upstream is None:
            raise ConfigError("the sidecar needs --upstream HOST:PORT")
        check_address("--listen", cfg.listen)
        check_address("--upstream", cfg.upstream)
        self.cfg = cfg
        self.authorizer = authorizer
        self.guard = StreamGuard(state, authorizer, reload_ends_streams=cfg.reload_ends_streams)
        self.catalog = catalog
        self.tls, self.upstream_tls = tls_from(cfg)
        dirty: set = set()  # connections (both sides) with frames to write: `sidecar/relay.py`
        limits = Limits(max_concurrent_streams=cfg.max_concurrent_streams or 2**31 - 1)
        #: The backend connections (readiness probes them: `ready`).
        self.upstream = UpstreamPool(cfg.upstream, limits, dirty, self.upstream_tls)
        self.relay = Relay(
            authorizer,
            self.upstream,
            limits,
            dirty,
            cfg.max_message_bytes,
            self.guard,
            upstream_seconds,
            principal_of=transport_principal if cfg.tls_client_ca else None,
            preface_timeout=cfg.preface_timeout,
            kinds=self.catalog.kinds,
            types=self.catalog.types,
            tracing=tracing,
        )
        self.port = 0
        #: Learning method kinds by reflection; done once they are learned.
        self.learning: asyncio.Task[None] | None = None
        #: Set once the first reflection attempt ended (learned or failed).
        self.first_attempt = asyncio.Event()

    async def start(self) -> None:
        """Listen on `--listen` (OSError when the port cannot be had), then start the
        backend connections and learning method kinds."""
        self.port = await self.relay.listen(
            self.cfg.listen,
            self.tls.context if self.tls is not None else None,
            reuse_port=self.cfg.workers > 1,
        )
        if self.tls is not None:
            self.tls.start()
        self.upstream.start()
        policy = self.authorizer.policy
        if self.cfg.upstream_reflection:
            self.learning = asyncio.create_task(self._learn_methods())
            if missing_types(policy, self.catalog.types):
                # `request:` rules need their types: a moment for the first reflection
                # attempt (their calls are refused FIELDS_UNAVAILABLE until one succeeds).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(REFLECTION_TIMEOUT):
                        await self.first_attempt.wait()
        log.info(
            "authproxy listening on port %d, upstream %s, policy %s (version %s, %d rules)",
            self.port,
            self.cfg.upstream,
            policy.source,
            policy.version,
            policy.rule_count,
        )

    async def _learn_methods(self) -> None:
        """Learn method kinds by reflection; retry with backoff while the backend is down.
        Until then unknown methods are relayed just the same (and watched as streams)."""
        delay = 0.5
        while True:
            try:
                async with reflection_channel(self.upstream.target, self.upstream_tls) as channel:
                    count = await self.catalog.add_from_reflection(channel, REFLECTION_TIMEOUT)
                log.info("learned %d method kinds from upstream reflection", count)
                self.first_attempt.set()
                self._log_uncovered()
                for problem in request_field_problems(self.authorizer.policy, self.catalog.types):
                    log.warning("%s (calls to it are refused: FIELD_MISMATCH)", problem)
                return
            except Exception as e:  # any failure: kinds stay unknown for now, retry later
                if (task := asyncio.current_task()) is not None and task.cancelling():
                    raise asyncio.CancelledError from e  # stopping: a library ate the cancel
                silent, problem = reflection_problem(e, REFLECTION_TIMEOUT)
                log.info(
                    "reflection on %s %s (%s); retrying in %gs",
                    self.upstream.target,
                    "not answering" if silent else "failed",
                    problem,
                    delay,
                )
            self.first_attempt.set()
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_REFLECTION_DELAY)

    def _log_uncovered(self) -> None:
        policy = self.authorizer.policy
        missing = uncovered(policy, self.catalog.kinds)
        if missing:
            log.warning(
                "%d served methods have no rule; policy %s's default (%s) decides them: %s",
                len(missing),
                policy.version,
                policy.default.level,
                ", ".join(missing),
            )

    async def stop(self, grace: float | None = None) -> None:
        """GOAWAY, then `grace` seconds (default `--shutdown-grace`) for the calls in
        flight; those still open then end UNAVAILABLE, and the backend connections close
        (`Relay.stop`)."""
        if self.learning is not None:
            self.learning.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.learning
        grace = self.cfg.shutdown_grace if grace is None else grace
        await self.relay.stop(grace)
        if self.tls is not None:
            await self.tls.stop()
        await self.guard.close()


def reflection_channel(target: str, tls: UpstreamTls | None) -> grpc.aio.Channel:
    """A gRPC channel to the backend for server reflection: h2c, or TLS with the trust
    roots, client certificate and server name the relay's connections use (`UpstreamTls`,
    as last reloaded)."""
    if tls is None:
        return grpc.aio.insecure_channel(target)
    return grpc.aio.secure_channel(target, tls.channel_credentials(), options=tls.channel_options())
