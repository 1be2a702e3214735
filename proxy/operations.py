"""What operators see of a running proxy: metrics, the decision log, live policy reloads
and readiness — wired around one `Authorizer` and served by the admin listener (this is
the `AdminStatus` that `admin.py` reports)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import grpc

from .decision_log import DecisionLog
from .keys import KeySet
from .metrics import Metrics
from .pipeline import Authorizer
from .policy import Policy
from .policy_reload import PolicyReloader
from .state import StateStore, StateUnavailable

log = logging.getLogger("authproxy")

#: How long `/readyz` waits for the upstream channel to connect.
UPSTREAM_PROBE_TIMEOUT = 1.0


class Operations:
    def __init__(
        self,
        authorizer: Authorizer,
        state: StateStore,
        policy_path: str,
        policy_text: bytes,
        check_keys: Callable[[Policy, KeySet], None],
        log_allows: float = 0.0,
    ) -> None:
        self.authorizer = authorizer
        self.state = state
        self.draining = False
        self.upstream: grpc.aio.Channel | None = None
        self.metrics_registry = metrics = Metrics()
        authorizer.observers.append(metrics.observe)
        authorizer.observers.append(DecisionLog(log_allows))
        keys: KeySet = authorizer.verifier.keys
        self.reloader = PolicyReloader(policy_path, authorizer, keys, check_keys, policy_text)
        self.reloader.listeners.append(self._policy_loaded)
        metrics.policy_loaded_now(authorizer.policy.version, self.reloader.loaded_at)
        metrics.read(
            "authproxy_policy_reloads",
            "Policy reloads by result (unchanged: the file changed back or not at all)",
            lambda: dict(self.reloader.results),
            label="result",
        )
        metrics.key_loads.labels("ok").inc()
        metrics.read(
            "authproxy_keys_loaded", "Verification keys loaded", lambda: len(keys), "gauge"
        )
        verifier = authorizer.verifier
        metrics.read(
            "authproxy_token_cache_hits", "Verified-token cache hits", lambda: verifier.cache_hits
        )
        metrics.read(
            "authproxy_token_cache_misses",
            "Verified-token cache misses (a signature was checked)",
            lambda: verifier.cache_misses,
        )
        metrics.read(
            "authproxy_state_failures",
            "Failed shared-state operations, by part (revocation feed and records, rate limits)",
            self._state_failures,
            label="part",
        )

    # --- wiring -------------------------------------------------------------------------

    def watch_sidecar(self, upstream: Any, guard: Any) -> None:
        """Report the sidecar's upstream errors and ended streams; probe its upstream."""
        self.upstream = upstream.channel
        self.metrics_registry.read(
            "authproxy_upstream_errors",
            "Calls the backend could not be reached for, or relayed with an error",
            lambda: upstream.errors_total,
        )
        self.metrics_registry.read(
            "authproxy_streams_ended",
            "Open streams the proxy ended, by reason",
            lambda: {str(reason): n for reason, n in guard.ended_total.items()},
            label="reason",
        )
        self.reloader.listeners.append(guard.policy_changed)

    def watch_ext_authz(self, mode: str, server: Any) -> None:
        self.metrics_registry.read(
            f"authproxy_ext_authz_{mode}_errors",
            f"ext_authz {mode} checks that failed unexpectedly (answered as an error)",
            lambda: server.errors_total,
        )

    def _state_failures(self) -> dict[str, float]:
        failures = {"state": float(getattr(self.state, "failures_total", 0))}
        limiter = self.authorizer.limiter
        failures["rate_limit"] = float(getattr(limiter, "failures_total", 0))
        return failures

    async def _policy_loaded(self, old: Policy, new: Policy) -> None:
        self.metrics_registry.policy_loaded_now(new.version, self.reloader.loaded_at)

    # --- AdminStatus --------------------------------------------------------------------

    async def readiness(self) -> tuple[bool, dict[str, str]]:
        policy = self.authorizer.policy
        checks = {"policy": f"ok (version {policy.version})"}
        keys = len(self.authorizer.verifier.keys)
        checks["keys"] = f"ok ({keys} loaded)" if keys or not policy.tokens else "no keys"
        try:
            self.state.check_fresh()
            checks["state"] = "ok"
        except StateUnavailable as e:
            checks["state"] = str(e)
        if self.upstream is not None:
            try:
                await asyncio.wait_for(self.upstream.channel_ready(), UPSTREAM_PROBE_TIMEOUT)
                checks["upstream"] = "ok"
            except TimeoutError:
                checks["upstream"] = "not reachable"
        if self.draining:
            checks["draining"] = "shutting down"
        ready = all(v.startswith("ok") for k, v in checks.items() if k != "draining")
        return ready and not self.draining, checks

    def policy_status(self) -> dict[str, Any]:
        policy = self.authorizer.policy
        reloader = self.reloader
        return {
            "version": policy.version,
            "source": policy.source,
            "loaded_at": reloader.loaded_at,
            "rules": policy.rule_count,
            "last_reload_error": reloader.last_error,
            "reloads": dict(reloader.results),
            "text": reloader.text.decode("utf-8", errors="replace"),
        }

    def metrics(self) -> bytes:
        return self.metrics_registry.exposition()
