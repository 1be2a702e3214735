"""Prometheus metrics (served on the admin listener's `/metrics`).

Labels are bounded: `method` is a method the policy names exactly, else `other`; `level`,
`decision` and `reason` come from fixed sets. Never a subject, token or raw path.

Per-call figures (decisions, their latency, upstream latency, shadow would-denies) are
recorded as they happen; counters the components already keep (token cache, upstream
errors, state failures, streams ended, ...) are read at scrape time by a collector, so
they cost nothing per call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .decision import Decision

OTHER = "other"
_DECISION_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5,
)  # fmt: skip

#: What the scrape-time collector reads: name -> (help, kind, read). `read` returns a
#: number, or a mapping of label values to numbers (one label: its value; several,
#: named "a,b": a tuple of values).
Reading = Callable[[], float | Mapping[str, float]]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "authproxy_requests",
            "Decisions, by method (named in the policy, else other), level, decision, reason",
            ["method", "level", "decision", "reason"],
            registry=r,
        )
        self.shadow = Counter(
            "authproxy_shadow_would_deny",
            "Calls allowed only because their rule is in shadow mode",
            ["method", "level", "reason"],
            registry=r,
        )
        self.decision_seconds = Histogram(
            "authproxy_decision_seconds",
            "Time to decide a call (the whole pipeline)",
            buckets=_DECISION_BUCKETS,
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "authproxy_upstream_seconds",
            "Time of calls relayed to the backend, from sending to the last response",
            ["kind"],
            registry=r,
        )
        self.policy_info = Gauge(
            "authproxy_policy_info", "The active policy (value 1)", ["version"], registry=r
        )
        self.policy_loaded = Gauge(
            "authproxy_policy_loaded_timestamp_seconds",
            "When the active policy was loaded",
            registry=r,
        )
        self._request_children: dict[tuple[str, str, str, str], Any] = {}
        self._readings = _Readings()
        r.register(self._readings)

    # --- per call ---------------------------------------------------------------------

    def observe(self, decision: Decision, seconds: float, peer: str | None) -> None:
        """An `Authorizer` observer: count the decision and its latency."""
        rule = decision.rule
        method = decision.method if rule.pattern == decision.method else OTHER
        verdict = "allow" if decision.allowed else "deny"
        reason = decision.reason.value if decision.reason is not None else ""
        key = (method, rule.level, verdict, "" if decision.shadow else reason)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(*key)
        child.inc()
        if decision.shadow:
            self.shadow.labels(method, rule.level, reason).inc()
        self.decision_seconds.observe(seconds)

    # --- at scrape time ---------------------------------------------------------------

    def read(
        self, name: str, help: str, read: Reading, kind: str = "counter", label: str = ""
    ) -> None:
        """Report `read()` as metric `name` on every scrape (kind `counter` or `gauge`)."""
        self._readings.items.append((name, help, read, kind, label))

    def policy_loaded_now(self, version: str, loaded_at: float) -> None:
        self.policy_info.clear()
        self.policy_info.labels(version).set(1)
        self.policy_loaded.set(loaded_at)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Readings:
    """A collector reporting counters other components keep, read at scrape time."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, Reading, str, str]] = []

    def collect(self) -> Iterable[Any]:
        for name, help, read, kind, label in self.items:
            family_type = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            value = read()
            if isinstance(value, Mapping):
                # One label, or several ("source,result") with tuple keys.
                names = label.split(",")
                family = family_type(name, help, labels=names)
                for label_value, number in sorted(value.items()):
                    values = label_value if isinstance(label_value, tuple) else (label_value,)
                    family.add_metric([str(v) for v in values], number)
            else:
                family = family_type(name, help, value=value)
            yield family

    def describe(self) -> Iterable[Any]:
        return ()  # read lazily; nothing to check at registration
