"""Tests for stscreds._metrics: histograms, labels, the bounded per-role counts, the METRICS
catalogue and ``samples()``; the reason labels once through a real broker and StrictSTS."""

from __future__ import annotations

import math
import re
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from servers.clock import FakeClock
from servers.sts import StrictSTS
from stscreds import (
    CredentialBroker,
    CredentialsRejected,
    CredentialsUnavailable,
    Role,
    SigningKey,
    STSUnavailable,
)
from stscreds._broker import PROCESS_WIDE_FAILURES, _ShortGrant
from stscreds._errors import (
    _BadResponse,
    _Closed,
    _SigningRejected,
    _SigningUnavailable,
    _Timeout,
    _Unreachable,
)
from stscreds._exchange import BudgetRefused
from stscreds._metrics import (
    DURATION_BUCKETS,
    KNOWN_CODES,
    METRICS,
    ROLE_METRIC,
    ExchangeOutcome,
    Histogram,
    MetricSpec,
    RoleCounts,
    error_label,
    outcome_label,
    samples,
)

ROLE = "arn:aws:iam::123456789012:role/metrics"
ISSUER = "http://127.0.0.1:1/metrics-issuer"
KEY = SigningKey.generate("ES256")
T0 = 1_800_000_000.0
# What Prometheus accepts as metric and label names (label names starting "__" are reserved).
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


# -- Histogram -------------------------------------------------------------------------------


def counts_by_bound(histogram: Histogram) -> dict[float, int]:
    """Per-bucket (not cumulative) counts, by upper bound."""
    return dict(zip((*histogram.bounds, math.inf), histogram.counts, strict=True))


def test_a_value_equal_to_a_bound_goes_in_that_bucket() -> None:
    # Prometheus ``le``: a bucket counts the observations less than or equal to its bound.
    histogram = Histogram((1.0, 2.0, 5.0))
    for value in (1.0, 2.0, 5.0):
        histogram.observe(value)
    assert counts_by_bound(histogram) == {1.0: 1, 2.0: 1, 5.0: 1, math.inf: 0}


def test_values_just_above_a_bound_go_in_the_next_bucket() -> None:
    histogram = Histogram((1.0, 2.0, 5.0))
    for value in (math.nextafter(1.0, 2.0), math.nextafter(2.0, 3.0), math.nextafter(5.0, 6.0)):
        histogram.observe(value)
    assert counts_by_bound(histogram) == {1.0: 0, 2.0: 1, 5.0: 1, math.inf: 1}


def test_values_below_the_first_bound_and_zero_go_in_the_first_bucket() -> None:
    histogram = Histogram((1.0, 2.0))
    for value in (0.0, -0.5, math.nextafter(1.0, 0.0)):
        histogram.observe(value)
    assert counts_by_bound(histogram) == {1.0: 3, 2.0: 0, math.inf: 0}


def test_every_default_bound_holds_its_own_value() -> None:
    histogram = Histogram()
    assert histogram.bounds == DURATION_BUCKETS
    assert list(DURATION_BUCKETS) == sorted(set(DURATION_BUCKETS))  # bisect needs sorted bounds
    for bound in DURATION_BUCKETS:
        histogram.observe(bound)
    histogram.observe(DURATION_BUCKETS[-1] * 10)
    snapshot = histogram.snapshot()
    assert snapshot["buckets"] == [
        *([bound, i + 1] for i, bound in enumerate(DURATION_BUCKETS)),
        [math.inf, len(DURATION_BUCKETS) + 1],
    ]


def test_snapshot_is_cumulative_with_sum_and_count() -> None:
    histogram = Histogram((0.1, 1.0, 10.0))
    values = [0.05, 0.1, 0.5, 0.7, 3.0, 10.0, 11.0, 100.0]
    for value in values:
        histogram.observe(value)
    snapshot = histogram.snapshot()
    assert snapshot == {
        "buckets": [[0.1, 2], [1.0, 4], [10.0, 6], [math.inf, 8]],
        "sum": pytest.approx(sum(values)),
        "count": 8,
    }
    # The last bucket (+Inf) is the count, as in the Prometheus exposition format.
    assert snapshot["buckets"][-1][1] == snapshot["count"]


def test_empty_histogram_snapshot() -> None:
    assert Histogram((1.0,)).snapshot() == {
        "buckets": [[1.0, 0], [math.inf, 0]],
        "sum": 0.0,
        "count": 0,
    }


def test_snapshot_is_a_copy() -> None:
    histogram = Histogram((1.0,))
    histogram.observe(0.5)
    before = histogram.snapshot()
    histogram.observe(0.5)
    assert before == {"buckets": [[1.0, 1], [math.inf, 1]], "sum": 0.5, "count": 1}
    assert histogram.snapshot()["count"] == 2


def test_buckets_agree_with_prometheus_client() -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    registry = prometheus_client.CollectorRegistry()
    theirs = prometheus_client.Histogram(
        "probe_seconds", "probe", buckets=DURATION_BUCKETS, registry=registry
    )
    ours = Histogram()
    values = [*DURATION_BUCKETS, 0.0, 0.003, 0.0051, 0.7, 19.999, 20.0, 20.0001, 90.0]
    for value in values:
        ours.observe(value)
        theirs.observe(value)
    exported = {
        float(sample.labels["le"]): sample.value
        for metric in registry.collect()
        for sample in metric.samples
        if sample.name == "probe_seconds_bucket"
    }
    assert {le: float(n) for le, n in ours.snapshot()["buckets"]} == exported


def test_listeners_get_every_observation_in_order() -> None:
    histogram = Histogram((1.0,))
    first: list[float] = []
    second: list[float] = []
    histogram.listeners.append(first.append)
    histogram.observe(0.25)
    histogram.listeners.append(second.append)
    histogram.observe(2.0)
    histogram.observe(1.0)
    assert first == [0.25, 2.0, 1.0]
    assert second == [2.0, 1.0]
    assert histogram.count == 3


def test_a_failing_listener_is_counted_and_fails_nothing() -> None:
    histogram = Histogram((1.0,))
    seen: list[float] = []

    def broken(value: float) -> None:
        raise RuntimeError("exporter down")

    histogram.listeners += [broken, seen.append]
    histogram.observe(0.5)
    histogram.observe(2.0)
    assert histogram.listener_errors == 2
    assert seen == [0.5, 2.0]  # the listeners after it still ran
    assert histogram.snapshot()["count"] == 2


def test_exchange_outcome_starts_at_zero_attempts() -> None:
    assert ExchangeOutcome().attempts == 0


# -- error_label / outcome_label --------------------------------------------------------------


def test_success_labels() -> None:
    assert outcome_label(None) == "success"
    assert error_label(None) == ""


@pytest.mark.parametrize("code", sorted(KNOWN_CODES))
def test_known_sts_codes_are_their_own_label(code: str) -> None:
    assert error_label(CredentialsRejected("refused", code=code)) == code
    assert error_label(STSUnavailable("down", code=code)) == code


@pytest.mark.parametrize("code", ["SomethingNew", "accessdenied", "AccessDenied ", "", "x" * 500])
def test_unknown_codes_are_other(code: str) -> None:
    assert error_label(CredentialsRejected("refused", code=code)) == "other"
    assert error_label(STSUnavailable("down", code=code)) == "other"


def test_no_code_and_no_reason_is_error() -> None:
    assert error_label(STSUnavailable("STS exchange failed: KeyError")) == "Error"
    assert error_label(CredentialsUnavailable("no")) == "Error"


@pytest.mark.parametrize(
    ("error", "label"),
    [
        (_Timeout("STS did not answer within 1s"), "Timeout"),
        (_Unreachable("STS unreachable: EndpointConnectionError"), "Unreachable"),
        (_BadResponse("unparseable"), "BadResponse"),
        (_Closed("credential broker is closed"), "Closed"),
        (_ShortGrant("10s left"), "ShortGrant"),
        # A reason wins over a code the error may also carry.
        (_Timeout("late", code="Throttling"), "Timeout"),
    ],
)
def test_reason_subclasses_are_labelled_by_their_reason(
    error: CredentialsUnavailable, label: str
) -> None:
    assert error_label(error) == label
    assert outcome_label(error) == "unavailable"
    # A negative-cache copy keeps its class, so it keeps its label.
    assert error_label(error._copy(retry_after=1.0)) == label


def test_budget_refusal_has_its_own_label() -> None:
    # It never reached STS: not counted as STS's Throttling answer, though it carries the code.
    refused = BudgetRefused("held back", code="Throttling", retry_after=1.0)
    assert error_label(refused) == "BudgetRefused"
    assert outcome_label(refused) == "unavailable"
    assert error_label(refused._copy()) == "BudgetRefused"


def test_outcome_label_by_class() -> None:
    assert outcome_label(CredentialsRejected("no", code="AccessDenied")) == "rejected"
    assert outcome_label(STSUnavailable("down", code="ServiceUnavailable")) == "unavailable"
    assert outcome_label(CredentialsUnavailable("?")) == "unavailable"


def test_process_wide_failures_are_labels_error_label_can_produce() -> None:
    # health() matches these against error_label's output: a typo would never match.
    reasons = {
        cls.reason
        for cls in (
            _Timeout,
            _Unreachable,
            _BadResponse,
            _Closed,
            _ShortGrant,
            BudgetRefused,
            _SigningUnavailable,
            _SigningRejected,
        )
        if cls.reason is not None
    }
    assert PROCESS_WIDE_FAILURES.issubset(KNOWN_CODES | reasons)
    assert "AccessDenied" not in PROCESS_WIDE_FAILURES
    assert "Closed" not in PROCESS_WIDE_FAILURES
    assert "BudgetRefused" not in PROCESS_WIDE_FAILURES  # our own rationing, not STS down


# -- reason labels from a real broker ----------------------------------------------------------


@pytest.fixture
async def make_broker(
    strict_sts: StrictSTS,
) -> AsyncIterator[Callable[..., CredentialBroker]]:
    clock = FakeClock(T0)
    strict_sts.clock = clock.time
    brokers: list[CredentialBroker] = []

    def make(**options: Any) -> CredentialBroker:
        options.setdefault("sts_endpoint_url", strict_sts.url)
        options.setdefault("max_attempts", 1)
        options.setdefault("connect_timeout", 1.0)
        broker = CredentialBroker(issuer=ISSUER, signing_keys=[KEY], clock=clock, **options)
        strict_sts.configure(issuer=broker.issuer, jwks=broker.jwks())
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        await broker.aclose()


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A loopback port bound but not listening: connections to it are refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def exchange_codes(broker: CredentialBroker) -> list[tuple[str, str, str, int]]:
    return [
        (row["trigger"], row["outcome"], row["code"], row["value"])
        for row in broker.metrics()["exchanges_total"]
    ]


async def test_short_grant_through_the_broker(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS
) -> None:
    broker = make_broker()
    strict_sts.expiration = lambda now, _requested: now + 10  # 10 s left on arrival
    with pytest.raises(STSUnavailable) as first:
        await broker.get(Role(ROLE))
    with pytest.raises(STSUnavailable) as remembered:  # the negative-cache copy
        await broker.get(Role(ROLE))
    assert strict_sts.calls == 1
    assert error_label(first.value) == error_label(remembered.value) == "ShortGrant"
    assert exchange_codes(broker) == [("request", "unavailable", "ShortGrant", 1)]


async def test_unreachable_through_the_broker(
    make_broker: Callable[..., CredentialBroker], refusing_port: int
) -> None:
    broker = make_broker(sts_endpoint_url=f"http://127.0.0.1:{refusing_port}")
    with pytest.raises(STSUnavailable) as info:
        await broker.get(Role(ROLE))
    assert error_label(info.value) == "Unreachable"
    assert outcome_label(info.value) == "unavailable"
    assert exchange_codes(broker) == [("request", "unavailable", "Unreachable", 1)]


async def test_timeout_through_the_broker(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS
) -> None:
    broker = make_broker(exchange_deadline=0.3, read_timeout=3.0)
    strict_sts.hang = True  # the STS holds the call past the exchange deadline
    try:
        with pytest.raises(STSUnavailable) as info:
            await broker.get(Role(ROLE))
    finally:
        strict_sts.release()
    assert error_label(info.value) == "Timeout"
    assert exchange_codes(broker) == [("request", "unavailable", "Timeout", 1)]


async def test_access_denied_through_the_broker(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS
) -> None:
    broker = make_broker()
    strict_sts.reject_roles.add(ROLE)
    with pytest.raises(CredentialsRejected) as info:
        await broker.get(Role(ROLE))
    assert (outcome_label(info.value), error_label(info.value)) == ("rejected", "AccessDenied")
    assert exchange_codes(broker) == [("request", "rejected", "AccessDenied", 1)]


async def test_unknown_sts_code_through_the_broker_is_other(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS
) -> None:
    broker = make_broker()
    strict_sts.fail_next(1, "BrandNewError", 400, "something new")
    with pytest.raises(CredentialsRejected) as info:
        await broker.get(Role(ROLE))
    assert info.value.code == "BrandNewError"  # the error keeps it; the label is bounded
    assert exchange_codes(broker) == [("request", "rejected", "other", 1)]
    assert broker.metrics()["role_exchanges_total"] == [
        {"role_arn": ROLE, "outcome": "rejected", "code": "other", "value": 1}
    ]


# -- RoleCounts -------------------------------------------------------------------------------


def test_role_counts_count_per_series() -> None:
    counts = RoleCounts()
    counts.add("arn:a", "success", "")
    counts.add("arn:a", "success", "")
    counts.add("arn:a", "rejected", "AccessDenied")
    counts.add("arn:b", "success", "")
    assert sorted(counts.items()) == [
        (("arn:a", "rejected", "AccessDenied"), 1),
        (("arn:a", "success", ""), 2),
        (("arn:b", "success", ""), 1),
    ]


def test_role_counts_are_bounded_dropping_the_series_counted_longest_ago() -> None:
    counts = RoleCounts(maxsize=2)
    counts.add("arn:a", "success", "")
    counts.add("arn:b", "success", "")
    counts.add("arn:a", "success", "")  # a hot series moves to the back: b goes first
    counts.add("arn:c", "success", "")
    assert counts.items() == [(("arn:a", "success", ""), 2), (("arn:c", "success", ""), 1)]
    for i in range(100):
        counts.add(f"arn:{i}", "success", "")
        assert len(counts.items()) <= 2
    assert counts.items() == [(("arn:98", "success", ""), 1), (("arn:99", "success", ""), 1)]


def test_role_counts_items_is_a_copy() -> None:
    counts = RoleCounts()
    counts.add("arn:a", "success", "")
    items = counts.items()
    counts.add("arn:a", "success", "")
    assert items == [(("arn:a", "success", ""), 1)]


# -- the METRICS catalogue ---------------------------------------------------------------------


def test_metric_names_are_unique_and_valid() -> None:
    names = [spec.name for spec in METRICS]
    assert len(names) == len(set(names))
    assert ROLE_METRIC.name not in names
    for spec in (*METRICS, ROLE_METRIC):
        assert _NAME.fullmatch(spec.name), spec.name
        assert not spec.name.startswith("stscreds_")  # the exporters add the prefix
        assert spec.help.endswith("."), spec.name
        assert len(set(spec.labels)) == len(spec.labels)
        for label in spec.labels:
            assert _LABEL.fullmatch(label) and not label.startswith("__"), label
            assert label not in ("le", "quantile")  # reserved by histograms and summaries


def test_counters_end_in_total_and_nothing_else_does() -> None:
    for spec in (*METRICS, ROLE_METRIC):
        assert spec.kind in ("counter", "gauge", "histogram")
        assert spec.name.endswith("_total") == (spec.kind == "counter"), spec.name


def test_seconds_metrics_end_in_seconds_and_say_so() -> None:
    for spec in (*METRICS, ROLE_METRIC):
        assert spec.name.endswith("_seconds") == (spec.unit == "seconds"), spec.name
    assert {spec.name for spec in METRICS if spec.kind == "histogram"} == {
        "exchange_duration_seconds",
        "request_wait_seconds",
    }
    assert all(not spec.labels for spec in METRICS if spec.kind == "histogram")


def test_store_metrics_are_labelled_by_store() -> None:
    for spec in METRICS:
        assert spec.name.startswith("store_") == ("store" in spec.labels), spec.name
    assert ROLE_METRIC.labels == ("role_arn", "outcome", "code")


# -- samples() --------------------------------------------------------------------------------


def spec(name: str) -> MetricSpec:
    return next(s for s in METRICS if s.name == name)


def test_samples_of_an_unlabelled_counter_and_gauge() -> None:
    snapshot = {"l1_hits_total": 7, "cached_identities": 0}
    assert list(samples(spec("l1_hits_total"), snapshot)) == [({}, 7)]
    assert list(samples(spec("cached_identities"), snapshot)) == [({}, 0)]


def test_samples_of_a_labelled_counter_give_string_labels() -> None:
    snapshot = {
        "exchanges_total": [
            {"trigger": "request", "outcome": "success", "code": "", "value": 3},
            {"trigger": "background", "outcome": "rejected", "code": "AccessDenied", "value": 1},
        ],
        "store_breaker_open": [{"store": "memory", "value": 0}],
    }
    assert list(samples(spec("exchanges_total"), snapshot)) == [
        ({"trigger": "request", "outcome": "success", "code": ""}, 3),
        ({"trigger": "background", "outcome": "rejected", "code": "AccessDenied"}, 1),
    ]
    assert list(samples(spec("store_breaker_open"), snapshot)) == [({"store": "memory"}, 0)]
    operations = {
        "store_operations_total": [{"store": 1, "operation": "get", "outcome": "ok", "value": 2}]
    }
    ((labels, value),) = samples(spec("store_operations_total"), operations)
    assert labels == {"store": "1", "operation": "get", "outcome": "ok"}
    assert value == 2


def test_samples_of_a_histogram_is_its_snapshot() -> None:
    histogram = Histogram((1.0,))
    histogram.observe(0.5)
    snapshot = {"request_wait_seconds": histogram.snapshot()}
    assert list(samples(spec("request_wait_seconds"), snapshot)) == [
        ({}, {"buckets": [[1.0, 1], [math.inf, 1]], "sum": 0.5, "count": 1})
    ]


def test_samples_of_a_missing_or_empty_metric_is_nothing() -> None:
    assert list(samples(spec("l1_hits_total"), {})) == []
    assert list(samples(spec("store_hits_total"), {"store_hits_total": []})) == []


async def test_samples_cover_every_metric_of_a_real_snapshot(
    make_broker: Callable[..., CredentialBroker],
) -> None:
    broker = make_broker()
    await broker.get(Role(ROLE))
    snapshot = broker.metrics()
    for metric in (*METRICS, ROLE_METRIC):
        pairs = list(samples(metric, snapshot))
        if metric.name.startswith("store_"):
            assert pairs == []  # no store
            continue
        assert pairs, metric.name
        for labels, value in pairs:
            assert set(labels) == (set() if metric.kind == "histogram" else set(metric.labels))
            assert all(isinstance(v, str) for v in labels.values())
            if metric.kind == "histogram":
                assert value["count"] == value["buckets"][-1][1]
            else:
                assert isinstance(value, int | float) and value >= 0
