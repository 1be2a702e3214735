"""Prometheus metrics (served on the admin listener's `/metrics`).

Labels are bounded: `method` is a method the policy names exactly, else `other`; `level`,
`decision` and `reason` come from fixed sets. Never a subject, token or raw path.

Per-call figures (decisions, their latency, upstream latency, shadow would-denies) are
plain numbers in dicts and lists, updated as calls happen and turned into metric
families only when scraped (`_PerCall`, a custom collector): a prometheus-client
`Counter.labels(...).inc()` or `Histogram.observe` takes a lock and several calls per
update, several times per call. The exposition is the one those classes produce: the
same names, labels, buckets, `_created` series, order. Updates and scrapes both run on
the event loop's thread, so the numbers need no lock.

Counters the components already keep (token cache, upstream errors, state failures,
streams ended, ...) are read at scrape time by another collector, so they cost nothing
per call.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client import metrics as _library
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from authproxy.decide.decision import Decision
from authproxy.policy.model import Policy

OTHER = "other"
_DECISION_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5,
)  # fmt: skip
_REQUEST_LABELS = ("method", "level", "decision", "reason")
_SHADOW_LABELS = ("method", "level", "reason")

#: What the scrape-time collector reads: name -> (help, kind, read). `read` returns a
#: number, or a mapping of label values to numbers (one label: its value; several,
#: named "a,b": a tuple of values).
Reading = Callable[[], float | Mapping[str, float]]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._per_call = per_call = _PerCall()
        r.register(per_call)
        #: Calls relayed to the backend by kind (`labels("unary"|"stream").observe(s)`).
        self.upstream_seconds = per_call.upstream_seconds
        self.policy_info = Gauge(
            "authproxy_policy_info", "The active policy (value 1)", ["version"], registry=r
        )
        self.policy_loaded = Gauge(
            "authproxy_policy_loaded_timestamp_seconds",
            "When the active policy was loaded",
            registry=r,
        )
        self._readings = _Readings()
        r.register(self._readings)

    # --- per call ---------------------------------------------------------------------

    def observe(self, decision: Decision, seconds: float, peer: str | None) -> None:
        """An `Authorizer` observer: count the decision and its latency."""
        rule = decision.rule
        method = decision.method if rule.pattern == decision.method else OTHER
        reason = decision.reason.value if decision.reason is not None else ""
        verdict = "allow" if decision.allowed else "deny"
        per_call = self._per_call
        if decision.shadow:
            _count(per_call.requests, (method, rule.level, verdict, ""))
            _count(per_call.shadow, (method, rule.level, reason))
        else:
            _count(per_call.requests, (method, rule.level, verdict, reason))
        per_call.decision_seconds.observe(seconds)

    # --- at scrape time ---------------------------------------------------------------

    def read(
        self, name: str, help: str, read: Reading, kind: str = "counter", label: str = ""
    ) -> None:
        """Report `read()` as metric `name` on every scrape (kind `counter` or `gauge`)."""
        self._readings.items.append((name, help, read, kind, label))

    async def policy_changed(self, old: Policy, new: Policy) -> None:
        """A reload put `new` in place (a `PolicyReloader` listener)."""
        self.policy_loaded_now(new.version, time.time())

    def policy_loaded_now(self, version: str, loaded_at: float) -> None:
        self.policy_info.clear()
        self.policy_info.labels(version).set(1)
        self.policy_loaded.set(loaded_at)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _count(counts: dict[tuple[str, ...], list[float]], key: tuple[str, ...]) -> None:
    """One more for `key`: [count, created]; created (a first sight) is when the series
    appeared, as prometheus-client's `_created`."""
    entry = counts.get(key)
    if entry is None:
        counts[key] = [1, time.time()]
    else:
        entry[0] += 1


class SecondsHistogram:
    """One histogram series in plain numbers: a count per bucket (not cumulative) and the
    sum. `observe` costs a bisection and two additions."""

    __slots__ = ("bounds", "counts", "created", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds  # ascending, the last +Inf
        self.counts = [0] * len(bounds)
        self.total = 0.0
        self.created = time.time()

    def observe(self, seconds: float) -> None:
        # `le` buckets: a value equal to a bound belongs to that bound's bucket.
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def buckets(self) -> list[tuple[str, float]]:
        """(le, cumulative count) pairs, as a HistogramMetricFamily takes them."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(self.bounds, self.counts, strict=True):
            running += count
            out.append((floatToGoString(bound), running))
        return out


class LabelledHistogram:
    """A histogram with one label (`kind`): a `SecondsHistogram` per value, made on first
    use of `labels`, as a prometheus-client `Histogram` makes its children."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.children: dict[str, SecondsHistogram] = {}

    def labels(self, value: str) -> SecondsHistogram:
        child = self.children.get(value)
        if child is None:
            child = self.children[value] = SecondsHistogram(self.bounds)
        return child


class _PerCall:
    """A collector of the figures updated per call, as metric families at scrape time."""

    def __init__(self) -> None:
        #: (method, level, decision, reason) -> [count, created]
        self.requests: dict[tuple[str, ...], list[float]] = {}
        #: (method, level, reason) -> [count, created]
        self.shadow: dict[tuple[str, ...], list[float]] = {}
        self.decision_seconds = SecondsHistogram((*_DECISION_BUCKETS, float("inf")))
        self.upstream_seconds = LabelledHistogram(tuple(Histogram.DEFAULT_BUCKETS))

    def collect(self) -> Iterable[Any]:
        created = getattr(_library, "_use_created", True)  # PROMETHEUS_DISABLE_CREATED_SERIES
        yield _counter(
            "authproxy_requests",
            "Decisions, by method (named in the policy, else other), level, decision, reason",
            _REQUEST_LABELS,
            self.requests,
            created,
        )
        yield _counter(
            "authproxy_shadow_would_deny",
            "Calls allowed only because their rule is in shadow mode",
            _SHADOW_LABELS,
            self.shadow,
            created,
        )
        decision = HistogramMetricFamily(
            "authproxy_decision_seconds", "Time to decide a call (the whole pipeline)", labels=()
        )
        _add_histogram(decision, {}, self.decision_seconds, created)
        yield decision
        upstream = HistogramMetricFamily(
            "authproxy_upstream_seconds",
            "Time of calls relayed to the backend, from sending to the last response",
            labels=("kind",),
        )
        for kind, child in self.upstream_seconds.children.items():
            _add_histogram(upstream, {"kind": kind}, child, created)
        yield upstream

    def describe(self) -> Iterable[Any]:
        return ()  # read lazily; nothing to check at registration


def _counter(
    name: str,
    help: str,
    labels: tuple[str, ...],
    counts: dict[tuple[str, ...], list[float]],
    created: bool,
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, help, labels=labels)
    for values, (count, since) in list(counts.items()):
        family.add_metric(values, count, created=since if created else None)
    return family


def _add_histogram(
    family: HistogramMetricFamily,
    labels: dict[str, str],
    series: SecondsHistogram,
    created: bool,
) -> None:
    family.add_metric(list(labels.values()), series.buckets(), series.total)
    if created:
        family.samples.append(Sample(family.name + "_created", labels, series.created))


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
