"""Prometheus exposition of ``broker.metrics()`` (extra ``stscreds[prometheus]``).

One process::

    from prometheus_client import REGISTRY
    from stscreds.prometheus import StscredsCollector

    REGISTRY.register(StscredsCollector(broker))

The collector reads each broker's snapshot when Prometheus scrapes: the request path pays
nothing. Under prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set, as
with gunicorn or ``uvicorn --workers``), scrapes are answered from files every worker writes:
there the collector copies its brokers' figures into prometheus_client metrics every
``sync_interval`` seconds (and histogram observations at once), and its ``collect()`` adds
nothing, so the series are neither missing nor counted twice.

Names: ``stscreds_`` + the snapshot key (``stscreds_exchanges_total``, ...), base units.
Labels are bounded (trigger, outcome, code, operation, store); a role ARN becomes a label
only on ``stscreds_role_exchanges_total``, and only for the ARNs given in ``role_arns``.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping
from functools import partial
from typing import Any

try:
    from prometheus_client import Counter, Gauge
    from prometheus_client import Histogram as PromHistogram
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import Collector
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError(
        "stscreds.prometheus needs prometheus_client: pip install 'stscreds[prometheus]'"
    ) from error

from ._broker import CredentialBroker
from ._metrics import DURATION_BUCKETS, METRICS, ROLE_METRIC, MetricSpec, combined

__all__ = ["MAX_ROLE_ARNS", "PREFIX", "StscredsCollector", "prometheus_name"]

#: Every series name starts with this.
PREFIX = "stscreds_"
#: The most role ARNs ``role_arns`` may name: each one adds up to a few dozen series.
MAX_ROLE_ARNS = 100

# prometheus_client's multiprocess mode of each gauge: live (a dead worker's value goes once
# it is marked dead) and combined as the catalogue says ("max" is the largest signed value
# there: prometheus_client cannot take the farthest from 0).
_GAUGE_MODES: dict[str, str] = {
    spec.name: "live" + spec.combine for spec in METRICS if spec.kind == "gauge"
}


def prometheus_name(spec: MetricSpec) -> str:
    """The series name of a catalogue entry (counters keep their ``_total``)."""
    return PREFIX + spec.name


class StscredsCollector(Collector):
    """A prometheus_client collector for one or more brokers (their figures are summed).

    ``role_arns``: role ARNs whose exchanges are also counted per role (at most 100; a role
    ARN is never a label otherwise). ``multiprocess``: None follows
    ``PROMETHEUS_MULTIPROC_DIR``. ``sync_interval``: seconds between copies in that mode.
    """

    def __init__(
        self,
        *brokers: CredentialBroker,
        role_arns: Iterable[str] = (),
        multiprocess: bool | None = None,
        sync_interval: float = 5.0,
    ) -> None:
        if not brokers:
            raise ValueError("brokers: StscredsCollector needs at least one CredentialBroker")
        for broker in brokers:
            if not isinstance(broker, CredentialBroker):
                raise TypeError(f"brokers: expected CredentialBroker, got {type(broker).__name__}")
        if isinstance(role_arns, str) or not isinstance(role_arns, Iterable):
            raise TypeError("role_arns: must be an iterable of role ARNs (not one string)")
        arns = frozenset(role_arns)
        if len(arns) > MAX_ROLE_ARNS:
            raise ValueError(f"role_arns: at most {MAX_ROLE_ARNS} role ARNs (got {len(arns)})")
        if not all(isinstance(arn, str) and arn.startswith("arn:") for arn in arns):
            raise ValueError("role_arns: every entry must be a role ARN string")
        if (
            isinstance(sync_interval, bool)
            or not isinstance(sync_interval, int | float)
            or not 0 < sync_interval < math.inf
        ):
            raise ValueError("sync_interval: must be a positive number of seconds")
        self._brokers = tuple(brokers)
        self._role_arns = arns
        self.multiprocess = (
            bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
            if multiprocess is None
            else bool(multiprocess)
        )
        self.sync_interval = float(sync_interval)
        self._mirror: _Mirror | None = None
        if self.multiprocess:
            self._mirror = _Mirror(self._brokers, arns)
            self._mirror.start(self.sync_interval)

    def describe(self) -> Iterable[Metric]:
        """The families this collector yields (none in multiprocess mode)."""
        if self.multiprocess:
            return []
        return list(self._families(with_samples=False))

    def collect(self) -> Iterable[Metric]:
        """Every metric of every broker, read now (multiprocess mode: sync, yield none)."""
        if self._mirror is not None:
            # The scrape reads the files: a failed copy here only makes them a sync older.
            with contextlib.suppress(Exception):
                self._mirror.sync()
            return []
        return list(self._families(with_samples=True))

    def sync(self) -> None:
        """Multiprocess mode: copy the brokers' figures to this process's files now."""
        if self._mirror is not None:
            self._mirror.sync()

    def close(self) -> None:
        """Multiprocess mode: a last sync, then stop the sync thread."""
        if self._mirror is not None:
            self._mirror.stop()

    def _families(self, *, with_samples: bool) -> Iterator[Metric]:
        snapshots = [broker.metrics() for broker in self._brokers] if with_samples else []
        for spec in _specs(self._role_arns):
            name = prometheus_name(spec)
            if spec.kind == "counter":
                counter = CounterMetricFamily(
                    name.removesuffix("_total"), spec.help, labels=spec.labels
                )
                for labels, value in _combined(spec, snapshots, self._role_arns):
                    counter.add_metric([labels[k] for k in spec.labels], value)
                yield counter
            elif spec.kind == "gauge":
                gauge = GaugeMetricFamily(name, spec.help, labels=spec.labels)
                for labels, value in _combined(spec, snapshots, self._role_arns):
                    gauge.add_metric([labels[k] for k in spec.labels], value)
                yield gauge
            else:
                histogram = HistogramMetricFamily(name, spec.help)
                if snapshots:
                    buckets, total = _histogram_sum(spec, snapshots)
                    histogram.add_metric([], buckets, total)
                yield histogram


def _specs(role_arns: frozenset[str]) -> tuple[MetricSpec, ...]:
    return (*METRICS, ROLE_METRIC) if role_arns else METRICS


def _combined(
    spec: MetricSpec, snapshots: list[dict[str, Any]], role_arns: frozenset[str]
) -> list[tuple[dict[str, str], float]]:
    """One value per label set across brokers (a role ARN only if allow-listed)."""
    rows = combined(spec, snapshots)
    if spec is ROLE_METRIC:
        rows = [(labels, value) for labels, value in rows if labels["role_arn"] in role_arns]
    return rows


def _histogram_sum(
    spec: MetricSpec, snapshots: list[dict[str, Any]]
) -> tuple[list[tuple[str, float]], float]:
    cumulative: list[float] = []
    total = 0.0
    bounds: list[float] = []
    for snapshot in snapshots:
        data = snapshot[spec.name]
        if not cumulative:
            bounds = [bound for bound, _ in data["buckets"]]
            cumulative = [0.0] * len(bounds)
        for i, (_, count) in enumerate(data["buckets"]):
            cumulative[i] += count
        total += data["sum"]
    return [(_le(bound), count) for bound, count in zip(bounds, cumulative, strict=True)], total


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


# ((metric, label values), labels, value) of one counter series.
_CounterSample = tuple[tuple[str, tuple[str, ...]], dict[str, str], float]


class _Mirror:
    """Copies broker figures into prometheus_client metrics (multiprocess files).

    A process writes nothing until its brokers have served a request: a gunicorn master that
    made the broker (``--preload``) and never serves adds no gauge to the workers' figures.
    The metrics are made on first use in each process, and a forked child copies only what
    happens after the fork (the parent copies its own figures).
    """

    def __init__(self, brokers: tuple[CredentialBroker, ...], role_arns: frozenset[str]) -> None:
        self._brokers = brokers
        self._role_arns = role_arns
        self._specs = {spec.name: spec for spec in _specs(role_arns)}
        self._lock = threading.Lock()
        self._metrics: dict[str, Any] = {}
        # (metric, label values) -> the count already copied, so each sync adds the change.
        self._copied: dict[tuple[str, tuple[str, ...]], float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._interval = 5.0
        #: Syncs that raised (the thread goes on; the next sync retries).
        self.errors = 0
        self._listeners: list[tuple[list[Any], Any]] = []
        for name, attribute in _HISTOGRAMS.items():
            # Observations go to the file as they happen: a histogram's buckets cannot be
            # copied as a change.
            for broker in brokers:
                listeners = getattr(broker.stats, attribute).listeners
                listener = partial(self._observe, name)
                listeners.append(listener)
                self._listeners.append((listeners, listener))
        # prometheus_client writes its files under one module-level lock that a fork can
        # copy held. Every write of ours is made under self._lock, taken around the fork:
        # no thread of ours is inside that lock when the child is made.
        ref = weakref.ref(self)
        os.register_at_fork(
            before=partial(_lock_for_fork, ref),
            after_in_parent=partial(_unlock_after_fork, ref),
            after_in_child=partial(_restart_in_child, ref),
        )

    def _metric(self, name: str) -> Any:
        metric = self._metrics.get(name)
        if metric is not None:
            return metric
        spec = self._specs[name]
        full = prometheus_name(spec)
        if spec.kind == "counter":
            metric = Counter(full.removesuffix("_total"), spec.help, spec.labels, registry=None)
        elif spec.kind == "gauge":
            metric = Gauge(
                full,
                spec.help,
                spec.labels,
                registry=None,
                multiprocess_mode=_GAUGE_MODES[name],  # type: ignore[arg-type]
            )
        else:
            metric = PromHistogram(full, spec.help, registry=None, buckets=DURATION_BUCKETS)
        self._metrics[name] = metric
        return metric

    def _observe(self, name: str, value: float) -> None:
        with self._lock:
            self._metric(name).observe(value)

    def start(self, interval: float) -> None:
        self._interval = interval
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name="stscreds-prometheus-sync", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.sync()
            except Exception:  # a bad sync must not end the copies for good
                self.errors += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread = None
        for listeners, listener in self._listeners:
            if listener in listeners:
                listeners.remove(listener)
        self._listeners = []
        self.sync()

    def _served(self) -> bool:
        # Requests, not a start-up warm-up: a gunicorn master that warmed up before forking
        # never serves, and its gauges would sit in the workers' figures, never refreshed.
        # Each warm-up call is one hit or one miss (a role warmed up again may be cached).
        return any(b.stats.hits + b.stats.misses > b.stats.warm_ups for b in self._brokers)

    def _counters(
        self, snapshots: list[dict[str, Any]]
    ) -> Iterator[tuple[tuple[str, tuple[str, ...]], dict[str, str], float]]:
        for spec in self._specs.values():
            if spec.kind != "counter":
                continue
            for labels, value in _combined(spec, snapshots, self._role_arns):
                yield (spec.name, tuple(labels[k] for k in spec.labels)), labels, value

    def sync(self) -> None:
        # The snapshots and their sums are made outside the lock: it covers only the writes.
        snapshots = [broker.metrics() for broker in self._brokers]
        counters = list(self._counters(snapshots))
        gauges = [
            (spec.name, _combined(spec, snapshots, self._role_arns))
            for spec in self._specs.values()
            if spec.kind == "gauge"
        ]
        # Counters are always copied (a warm-up's exchanges happened); gauges only by a
        # process that serves requests.
        served = self._served()
        clock_known = any(broker.sts_clock.known for broker in self._brokers)
        with self._lock:
            for key, labels, value in counters:
                copied = self._copied.get(key)
                if copied is not None and value < copied:
                    # The broker's series restarted (a per-role series evicted and counted
                    # anew): copy its increases from here.
                    self._copied[key] = value
                elif copied is None or value > copied:
                    # First sight makes the series (at 0 if nothing happened yet).
                    metric = self._metric(key[0])
                    child = metric.labels(**labels) if labels else metric
                    if value > (copied or 0.0):
                        child.inc(value - (copied or 0.0))
                    self._copied[key] = value
            if not served:
                return
            for name, rows in gauges:
                if name == "clock_offset_seconds" and not clock_known:
                    # A 0 from a process that has not heard STS would hide a negative offset
                    # under livemax: such a process reports no offset at all.
                    continue
                metric = self._metric(name)
                for labels, value in rows:
                    (metric.labels(**labels) if labels else metric).set(value)

    def _after_fork(self) -> None:
        # The parent's thread does not exist here; its lock may have been held at the fork,
        # and so may its stop event's (taken as that thread enters and leaves its wait).
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # Metrics made in the parent write the parent's files: make new ones on first use.
        self._metrics = {}
        # The parent copies its own figures; this child copies only what it adds from now.
        snapshots = [broker.metrics() for broker in self._brokers]
        self._copied = {key: value for key, _, value in self._counters(snapshots)}
        if self._thread is not None:
            self.start(self._interval)


_HISTOGRAMS: Mapping[str, str] = {
    "exchange_duration_seconds": "exchange_duration",
    "request_wait_seconds": "request_wait",
}


def _lock_for_fork(ref: weakref.ref[_Mirror]) -> None:
    mirror = ref()
    if mirror is not None:
        mirror._lock.acquire()


def _unlock_after_fork(ref: weakref.ref[_Mirror]) -> None:
    mirror = ref()
    if mirror is not None:
        mirror._lock.release()


def _restart_in_child(ref: weakref.ref[_Mirror]) -> None:
    mirror = ref()
    if mirror is not None:
        mirror._after_fork()
