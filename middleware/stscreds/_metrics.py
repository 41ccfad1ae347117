"""One metrics model: plain counters the broker bumps, read (never pushed) at scrape time.

The cache-hit path only increments an int attribute it already incremented before; every
other figure is counted on the miss path or computed when a scraper asks. ``METRICS`` is the
catalogue the Prometheus collector, the OpenTelemetry instruments and the Operations page are
all made from, so they cannot drift apart.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ._errors import CredentialsRejected, CredentialsUnavailable

__all__ = [
    "DURATION_BUCKETS",
    "KNOWN_CODES",
    "METRICS",
    "ExchangeOutcome",
    "Histogram",
    "MetricSpec",
    "combined",
    "error_label",
    "outcome_label",
    "samples",
]

#: Upper bounds (seconds) of the duration histograms: from a loopback STS to the deadline.
DURATION_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
)

#: STS error codes reported as themselves in the ``code`` label; any other code is "other",
#: so an unexpected answer cannot add series without bound.
KNOWN_CODES = frozenset(
    {
        "AccessDenied",
        "ExpiredTokenException",
        "IDPCommunicationError",
        "IDPRejectedClaim",
        "InternalError",
        "InternalFailure",
        "InvalidAction",
        "InvalidIdentityToken",
        "InvalidParameterValue",
        "MalformedPolicyDocument",
        "MissingParameter",
        "PackedPolicyTooLarge",
        "RegionDisabledException",
        "RequestLimitExceeded",
        "RequestTimeout",
        "ServiceUnavailable",
        "Throttling",
        "ThrottlingException",
        "TooManyRequestsException",
        "ValidationError",
    }
)

#: Role ARNs remembered for per-role exchange counts (read only for an allow-list).
ROLE_SERIES_MAX = 4096

Kind = Literal["counter", "gauge", "histogram"]
Combine = Literal["sum", "min", "max"]


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One documented metric: its snapshot key (the Prometheus name without ``stscreds_``)."""

    name: str
    kind: Kind
    labels: tuple[str, ...]
    help: str
    unit: str = ""
    #: How one label set's values from several brokers (or processes) become one: counters
    #: and histograms add; a gauge adds, takes the least, or the farthest from 0 ("max").
    combine: Combine = "sum"


#: Every metric stscreds reports, in the order the Operations page lists them.
METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("l1_hits_total", "counter", (), "Requests served from this process's cache."),
    MetricSpec(
        "misses_total", "counter", (), "Requests that found no usable credentials in the cache."
    ),
    MetricSpec(
        "singleflight_joins_total",
        "counter",
        (),
        "Cache misses that joined an exchange already in flight instead of starting one.",
    ),
    MetricSpec(
        "background_refreshes_total",
        "counter",
        (),
        "Refreshes started ahead of expiry while the cached credentials were still served.",
    ),
    MetricSpec(
        "negative_cache_hits_total",
        "counter",
        (),
        "Requests answered with a remembered failure, without a new STS call.",
    ),
    MetricSpec(
        "exchanges_total",
        "counter",
        ("trigger", "outcome", "code"),
        "STS AssumeRoleWithWebIdentity exchanges, by what started them and how they ended.",
    ),
    MetricSpec(
        "sts_calls_total",
        "counter",
        ("operation",),
        "HTTP requests sent to STS (retries and clock probes included).",
    ),
    MetricSpec(
        "sts_throttled_total",
        "counter",
        (),
        "Throttling answers from STS (they tighten the STS budget).",
    ),
    MetricSpec(
        "sts_budget_refusals_total",
        "counter",
        (),
        "STS calls the budget held back after throttling (never sent).",
    ),
    MetricSpec(
        "store_hits_total",
        "counter",
        ("store",),
        "Credentials taken from the shared store instead of STS.",
    ),
    MetricSpec(
        "store_leases_total",
        "counter",
        ("store",),
        "Leases won: this process exchanged at STS on behalf of the fleet.",
    ),
    MetricSpec(
        "store_waits_total",
        "counter",
        ("store",),
        "Waits for another process's exchange (one per wait slice).",
    ),
    MetricSpec(
        "store_rejected_values_total",
        "counter",
        ("store",),
        "Store values that failed to open or parse (tampered, foreign key, garbage).",
    ),
    MetricSpec(
        "store_operations_total",
        "counter",
        ("store", "operation", "outcome"),
        "Shared-store operations by outcome: ok, error, timeout, skipped (breaker open).",
    ),
    MetricSpec(
        "store_breaker_openings_total",
        "counter",
        ("store",),
        "Times the store's circuit breaker opened after the store had been healthy.",
    ),
    MetricSpec("cached_identities", "gauge", (), "Identities with credentials in the cache."),
    MetricSpec("inflight_exchanges", "gauge", (), "Refreshes in flight right now."),
    MetricSpec(
        "mandatory_window_identities",
        "gauge",
        (),
        "Cached identities in the mandatory window: their next request waits on STS.",
    ),
    MetricSpec(
        "soonest_expiry_seconds",
        "gauge",
        (),
        "Seconds until the soonest cached credentials expire (+Inf when none are cached).",
        "seconds",
        "min",
    ),
    MetricSpec(
        "clock_offset_seconds",
        "gauge",
        (),
        "STS's clock minus the local clock, learned from STS's Date header (0 until known).",
        "seconds",
        "max",
    ),
    MetricSpec(
        "store_breaker_open",
        "gauge",
        ("store",),
        "1 while the shared store is considered down (requests go to STS directly), else 0.",
        combine="max",
    ),
    MetricSpec(
        "sts_budget_limited",
        "gauge",
        (),
        "1 while the STS budget rations calls after throttling, else 0.",
        combine="max",
    ),
    MetricSpec(
        "exchange_duration_seconds",
        "histogram",
        (),
        "Duration of STS exchanges (signing, every attempt and backoff), any outcome.",
        "seconds",
    ),
    MetricSpec(
        "request_wait_seconds",
        "histogram",
        (),
        "How long requests that missed the cache waited for credentials.",
        "seconds",
    ),
)

#: Per-role exchange counts, reported only for role ARNs the user allow-lists.
ROLE_METRIC = MetricSpec(
    "role_exchanges_total",
    "counter",
    ("role_arn", "outcome", "code"),
    "STS exchanges per allow-listed role ARN (opt-in: role_arns=...).",
)


class Histogram:
    """Bucketed observations with fixed upper bounds; recorded on the miss path only."""

    __slots__ = ("bounds", "count", "counts", "listener_errors", "listeners", "sum")

    def __init__(self, bounds: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0
        #: Called with each observation (exporters whose histograms are push-only).
        self.listeners: list[Callable[[float], None]] = []
        #: Listener calls that raised (swallowed: an exporter must not fail a request).
        self.listener_errors = 0

    def observe(self, value: float) -> None:
        """Record one observation (seconds)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1
        for listener in self.listeners:
            try:
                listener(value)
            except Exception:  # an exporter's failure must never fail a request
                self.listener_errors += 1

    def snapshot(self) -> dict[str, Any]:
        """``{"buckets": [[le, cumulative count], ...], "sum": s, "count": n}``; the last
        bucket's ``le`` is ``inf``."""
        cumulative = 0
        buckets: list[list[float]] = []
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            cumulative += count
            buckets.append([bound, cumulative])
        return {"buckets": buckets, "sum": self.sum, "count": self.count}


class ExchangeOutcome:
    """Filled in by one exchange as it runs: attempts sent, and the error if it failed."""

    __slots__ = ("attempts",)

    def __init__(self) -> None:
        self.attempts = 0


def outcome_label(error: CredentialsUnavailable | None) -> str:
    """``success``, ``rejected`` (STS refused: fix the setup) or ``unavailable`` (retry)."""
    if error is None:
        return "success"
    return "rejected" if isinstance(error, CredentialsRejected) else "unavailable"


def error_label(error: CredentialsUnavailable | None) -> str:
    """A bounded label for an error: the STS code, or stscreds' own reason ("" on success)."""
    if error is None:
        return ""
    reason: str | None = getattr(error, "reason", None)
    if reason is not None:
        return reason
    code = error.code
    if code is None:
        return "Error"
    return code if code in KNOWN_CODES else "other"


class RoleCounts:
    """Exchange counts per (role ARN, outcome, code), bounded: the series counted longest ago
    goes first."""

    __slots__ = ("_counts", "maxsize")

    def __init__(self, maxsize: int = ROLE_SERIES_MAX) -> None:
        # A plain dict: a scrape thread copies it in one C call, never mid-update.
        self._counts: dict[tuple[str, str, str], int] = {}
        self.maxsize = maxsize

    def add(self, role_arn: str, outcome: str, code: str) -> None:
        """Count one exchange."""
        key = (role_arn, outcome, code)
        counts = self._counts
        # Re-inserted on every count: the series counted longest ago goes first.
        count = counts.pop(key, None)
        if count is None and counts and len(counts) >= self.maxsize:
            del counts[next(iter(counts))]
        counts[key] = (count or 0) + 1

    def items(self) -> list[tuple[tuple[str, str, str], int]]:
        """A copy of the counts."""
        return list(self._counts.items())


def combined(
    spec: MetricSpec, snapshots: Iterable[Mapping[str, Any]]
) -> list[tuple[dict[str, str], float]]:
    """One ``(labels, value)`` per label set of a counter or gauge across several snapshots,
    joined by ``spec.combine``."""
    values: dict[tuple[str, ...], float] = {}
    labelled: dict[tuple[str, ...], dict[str, str]] = {}
    for snapshot in snapshots:
        for labels, value in samples(spec, snapshot):
            key = tuple(labels[k] for k in spec.labels)
            labelled[key] = labels
            previous = values.get(key)
            value = float(value)
            if previous is None:
                values[key] = value
            elif spec.combine == "sum":
                values[key] = previous + value
            elif spec.combine == "min":
                values[key] = min(previous, value)
            else:
                values[key] = max(previous, value, key=abs)
    return [(labelled[key], value) for key, value in values.items()]


def samples(spec: MetricSpec, snapshot: Mapping[str, Any]) -> Iterator[tuple[dict[str, str], Any]]:
    """``(labels, value)`` pairs of one counter or gauge in a ``broker.metrics()`` snapshot
    (a histogram yields its one snapshot dict with empty labels)."""
    value = snapshot.get(spec.name)
    if value is None:
        return
    if not spec.labels or spec.kind == "histogram":
        yield {}, value
        return
    for row in value:
        yield {label: str(row[label]) for label in spec.labels}, row["value"]
