"""What operators see of a running proxy: metrics, the decision log, live policy reloads
and readiness — wired around one `Authorizer` and served by the admin listener (this is
the `AdminStatus` that `runtime/admin.py` reports)."""

from __future__ import annotations

import logging
import time
from typing import Any

from authproxy.decide.pipeline import Authorizer
from authproxy.decide.request_fields import missing_types
from authproxy.keys.ring import KeyRing
from authproxy.runtime.metrics import Metrics
from authproxy.runtime.policy_reload import PolicyReloader
from authproxy.state.store import StateStore, StateUnavailable
from authproxy.wire.message_types import MessageTypes

log = logging.getLogger("authproxy")

#: How long `/readyz` waits for a connection to the backend.
UPSTREAM_PROBE_TIMEOUT = 1.0


class Operations:
    def __init__(
        self,
        authorizer: Authorizer,
        state: StateStore,
        keys: KeyRing,
        reloader: PolicyReloader,
        metrics: Metrics,
        keys_wait: bool = True,
        types: MessageTypes | None = None,
    ) -> None:
        """The parts are built by `runtime/serve.py`, which also makes `metrics` one of
        the authorizer's observers and one of the reloader's listeners."""
        self.authorizer = authorizer
        self.state = state
        self.keys = keys
        #: Readiness waits for every remote key set's first load.
        self.keys_wait = keys_wait
        #: The request types `request:` rules read: readiness says which are missing.
        self.types = types
        self.draining = False
        self.upstream: Any = None  # the sidecar's `UpstreamPool`
        self.metrics_registry = metrics
        self.reloader = reloader
        metrics.policy_loaded_now(authorizer.policy.version, self.reloader.loaded_at)
        self._read_counters(metrics)

    def _read_counters(self, metrics: Metrics) -> None:
        """The counters the parts keep anyway, read when /metrics is scraped."""
        keys, state = self.keys, self.state
        metrics.read(
            "authproxy_policy_reloads",
            "Policy reloads by result (unchanged: the file changed back or not at all)",
            lambda: dict(self.reloader.results),
            label="result",
        )
        metrics.read(
            "authproxy_keys_loaded",
            "Verification keys in use",
            lambda: len(keys.current),
            "gauge",
        )
        metrics.read(
            "authproxy_key_fetches",
            "Key set loads after start, by source (URL or file) and result (ok, unchanged,"
            " error, throttled: an unknown-kid fetch refused by the refetch interval)",
            lambda: {(s.name, result): n for s in keys.sources for result, n in s.results.items()},
            label="source,result",
        )
        metrics.read(
            "authproxy_key_set_age_seconds",
            "Seconds since each key source last loaded successfully",
            lambda: {
                s.name: time.time() - s.loaded_at for s in keys.sources if s.loaded_at is not None
            },
            "gauge",
            label="source",
        )
        verifier = self.authorizer.verifier
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
        metrics.read(
            "authproxy_state_resets",
            "Times Redis was found emptied (restart without persistence, failover, flush)"
            " and this replica wrote back the records it holds",
            lambda: getattr(state, "resets_total", 0),
        )
        metrics.read(
            "authproxy_state_unreplicated",
            "Token uses and revocations fewer replicas acknowledged in time than --redis's"
            " wait_replicas asks for",
            lambda: getattr(state, "unreplicated_total", 0),
        )

    # --- wiring -------------------------------------------------------------------------

    def watch_sidecar(self, upstream: Any, guard: Any, tls: Any = None) -> None:
        """Report the sidecar's upstream errors, ended streams and certificates (`tls`: its
        `ServerTls`); probe its upstream."""
        self.upstream = upstream
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
        sides = {"inbound": tls, "upstream": upstream.tls}
        sides = {name: side for name, side in sides.items() if side is not None}
        if not sides:
            return
        self.metrics_registry.read(
            "authproxy_tls_reloads",
            "Certificate reloads after start, by listener (inbound, upstream) and result",
            lambda: {
                (name, result): n
                for name, side in sides.items()
                for result, n in side.reloads.items()
            },
            label="listener,result",
        )
        self.metrics_registry.read(
            "authproxy_tls_cert_expiry_timestamp_seconds",
            "notAfter of the serving certificate (inbound) and the upstream client certificate",
            lambda: _expiries(sides),
            "gauge",
            label="listener",
        )

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

    # --- AdminStatus --------------------------------------------------------------------

    async def readiness(self) -> tuple[bool, dict[str, str]]:
        policy = self.authorizer.policy
        checks = {"policy": f"ok (version {policy.version})"}
        refused = self.reloader.last_error
        if refused:  # still serving the last good version: ready, and saying why
            first = refused.splitlines()[0]
            checks["policy"] = (
                f"ok (version {policy.version}; the last reload was refused: {first})"
            )
        checks["keys"] = self._keys_check(bool(policy.tokens))
        try:
            self.state.check_fresh()
            checks["state"] = "ok"
        except StateUnavailable as e:
            checks["state"] = str(e)
        if self.types is not None and (missing := missing_types(policy, self.types)):
            # Not a reason to take every other method out of service: these calls alone
            # are refused (FIELDS_UNAVAILABLE) until a descriptor names their types.
            shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            checks["request types"] = f"ok (not known yet: {shown}; refused meanwhile)"
        if self.upstream is not None:
            ready = await self.upstream.ready(UPSTREAM_PROBE_TIMEOUT)
            checks["upstream"] = "ok" if ready else "not reachable"
        if self.draining:
            checks["draining"] = "shutting down"
        ready = all(v.startswith("ok") for k, v in checks.items() if k != "draining")
        return ready and not self.draining, checks

    def _keys_check(self, needed: bool) -> str:
        keys = self.keys
        waiting = [s for s in keys.remote if not s.loaded]
        count = len(keys.current)
        if waiting:
            first = waiting[0]
            why = f"keys from {first.name} ({first.last_error or 'first fetch'})"
            # --no-keys-wait: ready anyway (calls needing those keys: KEYS_UNAVAILABLE)
            return f"waiting for {why}" if self.keys_wait else f"ok ({count} loaded; no {why})"
        return f"ok ({count} loaded)" if count or not needed else "no keys"

    def published_jwks(self) -> dict[str, Any]:
        return self.keys.published_jwks()

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


def _expiries(sides: dict[str, Any]) -> dict[str, float]:
    """notAfter (unix time) of each side's own certificate, where it has one."""
    out = {}
    inbound = sides.get("inbound")
    if inbound is not None:
        out["inbound"] = inbound.not_after
    upstream = sides.get("upstream")
    cert = upstream.client_cert if upstream is not None else None
    if cert is not None:
        out["upstream"] = cert.not_valid_after_utc.timestamp()
    return out
