"""OpenTelemetry for stscreds: miss-path spans and every documented metric (``stscreds[otel]``).

Needs only opentelemetry-api (``pip install 'stscreds[otel]'``); the application brings the
SDK, its exporters and its providers::

    from stscreds.otel import instrument

    instrumentation = instrument(broker)  # the global tracer and meter providers
    ...
    instrumentation.uninstrument()

Spans: a broker starts them on its miss path only (one ``STS/AssumeRoleWithWebIdentity``
CLIENT span per exchange, one ``stscreds.store <operation>`` span per shared-store call) and
sends them to the global tracer provider unless ``instrument`` names another. Role ARNs are
span attributes (``aws.sts.role_arn``), never metric attributes.

Metrics: one instrument per entry of ``stscreds._metrics.METRICS`` on the meter "stscreds",
named by ``otel_name`` (``stscreds.`` + the snapshot key without ``_total`` and without its
unit suffix: ``l1_hits_total`` -> ``stscreds.l1_hits``, ``exchange_duration_seconds`` ->
``stscreds.exchange_duration`` with unit ``s``), its labels as attributes with the same keys.
Counters are ObservableCounters and gauges ObservableGauges whose callbacks read
``broker.metrics()`` once per broker per collection (the cache-hit path is never touched):
counters report each broker's totals since it was made. The two histograms are synchronous
Histograms (bucket boundaries ``DURATION_BUCKETS``) fed by a listener on the broker's own
histogram, so they count observations from ``instrument`` on.

Several brokers on one meter provider (in one call or several) report as one: counters and
the identity/exchange gauges are summed per attribute set, ``soonest_expiry_seconds`` is the
minimum, the 0/1 gauges the maximum and ``clock_offset_seconds`` the largest offset either way.
The instruments are made once per meter provider and shared by every ``instrument`` call on it
(the OpenTelemetry API cannot unregister a callback; an uninstrumented broker is simply no
longer read). Call ``instrument`` with ``meter_provider=None`` before or after the SDK's global
provider is set: both report through the global provider.
"""

from __future__ import annotations

import functools
import inspect
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

try:
    from opentelemetry import metrics as _otel_metrics
    from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation
    from opentelemetry.metrics import Histogram as _OtelHistogram
    from opentelemetry.trace import TracerProvider
except ImportError as _error:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "stscreds.otel needs opentelemetry-api: pip install 'stscreds[otel]'"
    ) from _error

from . import __version__
from ._broker import CredentialBroker
from ._metrics import DURATION_BUCKETS, METRICS, Histogram, MetricSpec, combined

__all__ = ["Instrumentation", "instrument", "otel_name", "otel_unit"]

_METER = "stscreds"

#: The unit of each count (UCUM annotations); seconds are "s", anything not listed is "1".
_UNITS: Mapping[str, str] = {
    "l1_hits_total": "{request}",
    "misses_total": "{request}",
    "singleflight_joins_total": "{request}",
    "background_refreshes_total": "{refresh}",
    "negative_cache_hits_total": "{request}",
    "exchanges_total": "{exchange}",
    "sts_calls_total": "{call}",
    "sts_throttled_total": "{response}",
    "sts_budget_refusals_total": "{call}",
    "store_hits_total": "{read}",
    "store_leases_total": "{lease}",
    "store_waits_total": "{wait}",
    "store_rejected_values_total": "{value}",
    "store_operations_total": "{operation}",
    "store_breaker_openings_total": "{opening}",
    "cached_identities": "{identity}",
    "inflight_exchanges": "{exchange}",
    "mandatory_window_identities": "{identity}",
    "store_breaker_open": "1",
    "sts_budget_limited": "1",
}


#: The broker's own histogram behind each histogram metric (``broker.stats.<attribute>``).
_HISTOGRAMS: Mapping[str, str] = {
    "exchange_duration_seconds": "exchange_duration",
    "request_wait_seconds": "request_wait",
}


def otel_name(spec: MetricSpec) -> str:
    """``stscreds.`` + the snapshot key without ``_total`` and its unit suffix (``_seconds``)."""
    name = spec.name.removesuffix("_total")
    if spec.unit:
        name = name.removesuffix(f"_{spec.unit}")
    return f"{_METER}.{name}"


def otel_unit(spec: MetricSpec) -> str:
    """The UCUM unit of ``spec``: "s" for seconds, a ``{thing}`` for counts, else "1"."""
    if spec.unit == "seconds":
        return "s"
    return _UNITS.get(spec.name, "1")


class _Registry:
    """The instruments of one meter provider and the brokers they report."""

    def __init__(self, meter: Meter) -> None:
        self._lock = threading.Lock()
        self.brokers: tuple[CredentialBroker, ...] = ()
        # One snapshot per broker serves each instrument's callback at most once: the
        # first callback of the next collection finds its name served and takes new ones.
        self._snapshots: list[dict[str, Any]] | None = None
        self._served: set[str] = set()
        self.histograms: dict[str, _OtelHistogram] = {}
        advisory = "explicit_bucket_boundaries_advisory" in _parameters(meter.create_histogram)
        for spec in METRICS:
            name, unit = otel_name(spec), otel_unit(spec)
            if spec.kind == "histogram":
                if spec.name not in _HISTOGRAMS:
                    raise RuntimeError(f"stscreds.otel: no broker histogram for {spec.name}")
                if advisory:
                    histogram = meter.create_histogram(
                        name,
                        unit=unit,
                        description=spec.help,
                        explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS),
                    )
                else:  # pragma: no cover - opentelemetry-api before 1.23
                    histogram = meter.create_histogram(name, unit=unit, description=spec.help)
                self.histograms[spec.name] = histogram
            elif spec.kind == "counter":
                meter.create_observable_counter(
                    name, callbacks=[self._callback(spec)], unit=unit, description=spec.help
                )
            else:
                meter.create_observable_gauge(
                    name, callbacks=[self._callback(spec)], unit=unit, description=spec.help
                )

    def add(self, brokers: Iterable[CredentialBroker]) -> None:
        """Report ``brokers`` too; ValueError if one is reported already."""
        with self._lock:
            current = list(self.brokers)
            for broker in brokers:
                if any(broker is known for known in current):
                    raise ValueError(
                        f"{broker!r} is already instrumented for this meter provider: "
                        "uninstrument() it first"
                    )
                current.append(broker)
            self.brokers = tuple(current)
            self._snapshots = None

    def remove(self, brokers: Iterable[CredentialBroker]) -> None:
        """Stop reporting ``brokers``."""
        gone = list(brokers)
        with self._lock:
            self.brokers = tuple(b for b in self.brokers if not any(b is g for g in gone))
            self._snapshots = None

    def _callback(self, spec: MetricSpec) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return self._observe(spec)

        return observe

    def _observe(self, spec: MetricSpec) -> list[Observation]:
        return [
            Observation(value, labels) for labels, value in combined(spec, self._take(spec.name))
        ]

    def _take(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            if self._snapshots is None or name in self._served:
                self._snapshots = [broker.metrics() for broker in self.brokers]
                self._served = set()
            self._served.add(name)
            return self._snapshots


def _parameters(function: Callable[..., Any]) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(function).parameters
    except (TypeError, ValueError):  # pragma: no cover - a builtin without a signature
        return {}


_registries_lock = threading.Lock()
# Meter provider -> its instruments (weak: a provider dropped by the app takes them along).
_registries: weakref.WeakKeyDictionary[Any, _Registry] = weakref.WeakKeyDictionary()
# The global provider's, proxy or real: they are one provider to the app.
_global_registry: list[_Registry] = []


# Every Instrumentation made, for the fork hook below.
_instrumentations: weakref.WeakSet[Instrumentation] = weakref.WeakSet()


def _renew_locks_in_child() -> None:
    # A collection on the SDK's reader thread may hold a registry's lock (while it reads
    # broker.metrics()) at the moment of a fork: held forever in the child otherwise.
    global _registries_lock
    _registries_lock = threading.Lock()
    for registry in [*_registries.values(), *_global_registry]:
        registry._lock = threading.Lock()
    for instrumentation in list(_instrumentations):
        instrumentation._lock = threading.Lock()


os.register_at_fork(after_in_child=_renew_locks_in_child)


def _registry(meter_provider: MeterProvider | None) -> _Registry:
    global_provider = _otel_metrics.get_meter_provider()
    with _registries_lock:
        if meter_provider is None or meter_provider is global_provider:
            if not _global_registry:
                meter = _otel_metrics.get_meter(_METER, __version__)
                _global_registry.append(_Registry(meter))
            return _global_registry[0]
        registry = _registries.get(meter_provider)
        if registry is None:
            registry = _Registry(meter_provider.get_meter(_METER, __version__))
            _registries[meter_provider] = registry
        return registry


class Instrumentation:
    """What one ``instrument`` call set up for its brokers; ``uninstrument`` undoes it."""

    def __init__(
        self,
        brokers: tuple[CredentialBroker, ...],
        registry: _Registry,
        listeners: list[tuple[Histogram, Callable[[float], None]]],
    ) -> None:
        self._brokers = brokers
        self._registry = registry
        self._listeners = listeners
        self._lock = threading.Lock()
        _instrumentations.add(self)

    @property
    def brokers(self) -> tuple[CredentialBroker, ...]:
        """The brokers instrumented (empty once uninstrumented)."""
        return self._brokers

    def uninstrument(self) -> None:
        """Stop reporting these brokers' metrics; their spans go to the global provider again."""

        # Idempotent. The histogram listeners are removed; the API cannot unregister a
        # callback, so the shared callbacks simply stop reading these brokers.
        with self._lock:
            brokers, self._brokers = self._brokers, ()
            listeners, self._listeners = self._listeners, []
        for histogram, listener in listeners:
            for index, candidate in enumerate(histogram.listeners):
                if candidate is listener:
                    del histogram.listeners[index]
                    break
        self._registry.remove(brokers)
        for broker in brokers:
            broker._tracing.use(None)

    def __repr__(self) -> str:
        return f"Instrumentation(brokers={len(self._brokers)})"


def instrument(
    *brokers: CredentialBroker,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
) -> Instrumentation:
    """Send ``brokers``' spans and metrics to these providers (None: the global ones)."""

    # The global provider may be set before or after this call. ValueError if a broker is
    # already instrumented for that meter provider (uninstrument it first).
    for broker in brokers:
        if not isinstance(broker, CredentialBroker):
            raise TypeError(f"instrument: expected CredentialBroker, got {type(broker).__name__}")
    unique = tuple({id(broker): broker for broker in brokers}.values())
    registry = _registry(meter_provider)
    registry.add(unique)
    listeners: list[tuple[Histogram, Callable[[float], None]]] = []
    for broker in unique:
        broker._tracing.use(tracer_provider)
        for name, attribute in _HISTOGRAMS.items():
            source: Histogram = getattr(broker.stats, attribute)
            # A partial of its own per broker: uninstrument removes exactly this one.
            listener: Callable[[float], None] = functools.partial(registry.histograms[name].record)
            source.listeners.append(listener)
            listeners.append((source, listener))
    return Instrumentation(unique, registry, listeners)
