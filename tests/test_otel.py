"""stscreds.otel against a real StrictSTS (and a real redis-server) over loopback.

Spans go to an SDK TracerProvider with an InMemorySpanExporter, metrics to an SDK
MeterProvider with an InMemoryMetricReader; both are passed to ``instrument`` explicitly and
never set as this process's global providers (the one test of the global default runs in a
subprocess of its own).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from servers.clock import FakeClock
from servers.sts import StrictSTS
from stscreds import CredentialBroker, CredentialsRejected, Role, SigningKey, STSUnavailable
from stscreds._metrics import DURATION_BUCKETS, METRICS, ROLE_METRIC, samples
from stscreds.otel import Instrumentation, instrument, otel_name, otel_unit
from stscreds.stores import CredentialStore, MemoryStore, RedisStore, generate_key

ROLE = "arn:aws:iam::123456789012:role/app/reader"
OTHER_ROLE = "arn:aws:iam::123456789012:role/app/writer"
DENIED_ROLE = "arn:aws:iam::123456789012:role/app/denied"
ISSUER = "http://127.0.0.1:1/otel-issuer"
KEY = SigningKey.generate("ES256")
T0 = 1_800_000_000.0
EXCHANGE_SPAN = "STS/AssumeRoleWithWebIdentity"
MIDDLEWARE = Path(__file__).resolve().parents[1] / "middleware"


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """A TracerProvider (never global) whose finished spans land in the exporter."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


@pytest.fixture
def meters() -> Iterator[tuple[MeterProvider, InMemoryMetricReader]]:
    """A MeterProvider (never global) read by an InMemoryMetricReader."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    yield provider, reader
    provider.shutdown()


@pytest.fixture
def clock(strict_sts: StrictSTS) -> FakeClock:
    """One FakeClock for the brokers and the STS: gauges read at two moments agree."""
    fake = FakeClock(T0)
    strict_sts.clock = fake.time
    return fake


@pytest.fixture
async def make_broker(strict_sts: StrictSTS) -> AsyncIterator[Callable[..., CredentialBroker]]:
    brokers: list[CredentialBroker] = []
    strict_sts.configure(issuer=ISSUER, jwks={"keys": [KEY.public_jwk()]})
    strict_sts.reject_roles.add(DENIED_ROLE)

    def make(**kwargs: Any) -> CredentialBroker:
        kwargs.setdefault("exchange_deadline", 5.0)
        broker = CredentialBroker(
            issuer=ISSUER, signing_keys=[KEY], sts_endpoint_url=strict_sts.url, **kwargs
        )
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        await broker.aclose()


@pytest.fixture
def instrumentations() -> Iterator[list[Instrumentation]]:
    """Instrumentations to undo after the test (append each one)."""
    made: list[Instrumentation] = []
    yield made
    for instrumentation in made:
        instrumentation.uninstrument()


def secrets_of(sts: StrictSTS) -> list[str]:
    """Every secret STS issued and every web identity token it was sent."""
    found: list[str] = []
    for rec in sts.requests:
        found.append(rec.params["WebIdentityToken"])
        if rec.credentials is not None:
            found += [rec.credentials["SecretAccessKey"], rec.credentials["SessionToken"]]
    return found


def assert_no_secret(finished: tuple[ReadableSpan, ...], sts: StrictSTS) -> None:
    """No span name, attribute, status description or event holds a secret or a token."""
    texts: list[str] = []
    for span in finished:
        texts.append(span.name)
        texts += [f"{key}={value}" for key, value in (span.attributes or {}).items()]
        texts.append(span.status.description or "")
        for event in span.events:
            texts.append(event.name)
            texts += [f"{key}={value}" for key, value in (event.attributes or {}).items()]
    secrets = secrets_of(sts)
    assert secrets, "the test made no exchange"
    assert len(secrets[0]) > 100  # a JWT, not something that would match anything
    for secret in secrets:
        assert all(secret not in text for text in texts)
    # Not even a fragment shaped like a JWT.
    jwt_like = re.compile(r"eyJ[\w-]{8,}\.[\w-]{8,}")
    assert not any(jwt_like.search(text) for text in texts)


def exchange_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == EXCHANGE_SPAN]


def store_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name.startswith("stscreds.store ")]


def collect(reader: InMemoryMetricReader) -> dict[str, Any]:
    """One collection: metric name -> the Metric (scope "stscreds" only)."""
    data = reader.get_metrics_data()
    found: dict[str, Any] = {}
    if data is None:
        return found
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            if scope_metrics.scope.name == "stscreds":
                for metric in scope_metrics.metrics:
                    found[metric.name] = metric
    return found


def values(metric: Any) -> dict[frozenset[tuple[str, Any]], Any]:
    """A counter's or gauge's data points: attribute set -> value."""
    if metric is None:
        return {}
    return {
        frozenset((point.attributes or {}).items()): point.value
        for point in metric.data.data_points
    }


def expected(spec: Any, *snapshots: dict[str, Any]) -> dict[frozenset[tuple[str, Any]], Any]:
    """What one spec's data points must be for brokers with these ``metrics()`` snapshots
    (the same attribute set from several brokers: summed)."""
    found: dict[frozenset[tuple[str, Any]], Any] = {}
    for snapshot in snapshots:
        for labels, value in samples(spec, snapshot):
            key = frozenset(labels.items())
            found[key] = found.get(key, 0) + value
    return found


# -- spans ---------------------------------------------------------------------------------


async def test_a_miss_makes_one_client_span_and_a_hit_none(
    make_broker: Callable[..., CredentialBroker],
    strict_sts: StrictSTS,
    spans: tuple[TracerProvider, InMemorySpanExporter],
    instrumentations: list[Instrumentation],
) -> None:
    provider, exporter = spans
    broker = make_broker(region="eu-west-1")
    instrumentations.append(instrument(broker, tracer_provider=provider))
    role = Role(ROLE)

    await broker.get(role)

    (span,) = exporter.get_finished_spans()
    assert span.name == EXCHANGE_SPAN
    assert span.kind is SpanKind.CLIENT
    attributes = dict(span.attributes or {})
    assert attributes["rpc.system"] == "aws-api"
    assert attributes["rpc.service"] == "STS"
    assert attributes["rpc.method"] == "AssumeRoleWithWebIdentity"
    assert attributes["cloud.region"] == "eu-west-1"
    assert attributes["server.address"] == "127.0.0.1"
    assert attributes["aws.sts.role_arn"] == ROLE
    assert attributes["stscreds.attempts"] == 1
    assert attributes["stscreds.trigger"] == "request"
    assert span.status.status_code is StatusCode.UNSET
    assert span.instrumentation_scope is not None
    assert span.instrumentation_scope.name == "stscreds"

    for _ in range(5):
        await broker.get(role)
        assert broker.get_cached(role) is not None
    assert broker.stats.hits == 10
    assert len(exporter.get_finished_spans()) == 1  # hits start no span
    assert strict_sts.calls == 1
    assert_no_secret(exporter.get_finished_spans(), strict_sts)


async def test_the_exchange_span_is_a_child_of_the_first_callers_span(
    make_broker: Callable[..., CredentialBroker],
    strict_sts: StrictSTS,
    spans: tuple[TracerProvider, InMemorySpanExporter],
    instrumentations: list[Instrumentation],
) -> None:
    provider, exporter = spans
    broker = make_broker()
    instrumentations.append(instrument(broker, tracer_provider=provider))
    tracer = provider.get_tracer("app")
    strict_sts.hang = True
    role = Role(ROLE)

    async def request(name: str) -> None:
        with tracer.start_as_current_span(name):
            await broker.get(role)

    first = asyncio.ensure_future(request("first request"))
    assert await asyncio.to_thread(strict_sts.wait_for_calls, 1, 15.0)
    second = asyncio.ensure_future(request("second request"))
    for _ in range(1000):  # until the second caller has joined the exchange in flight
        if broker.stats.joins:
            break
        await asyncio.sleep(0)
    strict_sts.release()
    await asyncio.gather(first, second)

    finished = {span.name: span for span in exporter.get_finished_spans()}
    exchange = finished[EXCHANGE_SPAN]
    assert exchange.parent is not None
    assert exchange.parent.span_id == finished["first request"].context.span_id
    assert len(exchange_spans(exporter)) == 1  # the joining caller started none
    assert broker.stats.joins == 1


class _BrokenProcessor(SpanProcessor):
    """A span processor that raises wherever the SDK calls it (a buggy exporter)."""

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        raise RuntimeError("on_start broke")

    def on_end(self, span: ReadableSpan) -> None:
        raise RuntimeError("on_end broke")


async def test_a_failing_tracing_sdk_never_fails_an_exchange(
    make_broker: Callable[..., CredentialBroker],
    strict_sts: StrictSTS,
    instrumentations: list[Instrumentation],
) -> None:
    provider = TracerProvider()
    provider.add_span_processor(_BrokenProcessor())
    broker = make_broker(store=MemoryStore(encryption_keys=[generate_key()]))
    instrumentations.append(instrument(broker, tracer_provider=provider))

    credentials = await broker.get(Role(ROLE))

    assert credentials.access_key_id
    assert strict_sts.calls == 1
    (row,) = broker.metrics()["exchanges_total"]
    assert (row["outcome"], row["code"]) == ("success", "")
    assert broker.stats.exchange_failures == 0


async def test_attempts_count_the_retries_of_one_exchange(
    make_broker: Callable[..., CredentialBroker],
    strict_sts: StrictSTS,
    spans: tuple[TracerProvider, InMemorySpanExporter],
    instrumentations: list[Instrumentation],
) -> None:
    provider, exporter = spans
    broker = make_broker()
    instrumentations.append(instrument(broker, tracer_provider=provider))
    strict_sts.fail_next(1, code="ServiceUnavailable", status=503, message="Service unavailable")

    await broker.get(Role(ROLE))

    (span,) = exchange_spans(exporter)
    assert strict_sts.calls == 2
    assert span.attributes is not None and span.attributes["stscreds.attempts"] == 2
    assert span.status.status_code is StatusCode.UNSET


async def test_a_rejected_exchange_is_an_error_span_with_the_sts_code(
    make_broker: Callable[..., CredentialBroker],
    strict_sts: StrictSTS,
    spans: tuple[TracerProvider, InMemorySpanExporter],
    instrumentations: list[Instrumentation],
) -> None:
    provider, exporter = spans
    broker = make_broker()
    instrumentations.append(instrument(broker, tracer_provider=provider))

    with pytest.raises(CredentialsRejected) as info:
        await broker.get(Role(DENIED_ROLE))

    (span,) = exporter.get_finished_spans()
    assert span.name == EXCHANGE_SPAN
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == info.value.message
    assert "AccessDenied" in (span.status.description or "")
    assert span.attributes is not None
    assert span.attributes["error.type"] == "AccessDenied"
    assert span.attributes["aws.sts.role_arn"] == DENIED_ROLE
    assert span.attributes["stscreds.attempts"] == 1
    assert span.events == ()  # exceptions are not recorded (a traceback holds the token)

    # The remembered failure answers the next request: no STS call, no span.
    with pytest.raises(CredentialsRejected):
        await broker.get(Role(DENIED_ROLE))
    assert broker.stats.negative_hits == 1
    assert len(exporter.get_finished_spans()) == 1
    assert_no_secret(exporter.get_finished_spans(), strict_sts)


async def test_an_unreachable_sts_is_an_error_span(
    spans: tuple[TracerProvider, InMemorySpanExporter],
    instrumentations: list[Instrumentation],
) -> None:
    provider, exporter = spans
    stopped = StrictSTS().start()
    url = stopped.url
    stopped.stop()  # nothing listens on that port any more
    broker = CredentialBroker(
        issuer=ISSUER,
        signing_keys=[KEY],
        sts_endpoint_url=url,
        connect_timeout=0.5,
        exchange_deadline=2.0,
        max_attempts=1,
    )
    try:
        instrumentations.append(instrument(broker, tracer_provider=provider))
        with pytest.raises(STSUnavailable) as info:
            await broker.get(Role(ROLE))
    finally:
        await broker.aclose()
    (span,) = exchange_spans(exporter)
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["error.type"] == "Unreachable"
    assert span.status.description == info.value.message


async def _store_spans_on_miss_and_hit(
    make_store: Callable[[], CredentialStore],
    kind: str,
    make_broker: Callable[..., CredentialBroker],
    strict_sts: StrictSTS,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    instrumentations: list[Instrumentation],
) -> None:
    first = make_broker(store=make_store(), store_timeout=2.0)
    instrumentations.append(instrument(first, tracer_provider=provider))
    role = Role(ROLE)

    await first.get(role)

    operations = {
        (span.attributes or {}).get("db.operation.name") for span in store_spans(exporter)
    }
    assert {"get", "acquire", "put", "release"} <= operations
    for span in store_spans(exporter):
        assert span.kind is SpanKind.CLIENT
        assert span.attributes is not None
        assert span.attributes["db.system.name"] == kind
        assert span.name == f"stscreds.store {span.attributes['db.operation.name']}"
        assert span.status.status_code is StatusCode.UNSET
    assert len(exchange_spans(exporter)) == 1

    # A hit: no span of any kind.
    before = len(exporter.get_finished_spans())
    for _ in range(3):
        await first.get(role)
    assert first.stats.hits == 3
    assert len(exporter.get_finished_spans()) == before

    # Another worker's miss is answered by the store: a store read, no exchange.
    second = make_broker(store=make_store(), store_timeout=2.0)
    instrumentations.append(instrument(second, tracer_provider=provider))
    exporter.clear()
    assert (await second.get(role)).access_key_id == (await first.get(role)).access_key_id
    assert strict_sts.calls == 1
    assert exchange_spans(exporter) == []
    read = {"db.system.name": kind, "db.operation.name": "get"}
    assert [span for span in store_spans(exporter) if span.attributes == read]
    assert_no_secret(exporter.get_finished_spans(), strict_sts)


async def test_store_operations_make_spans_on_a_miss_memory(
    make_broker: Callable[..., CredentialBroker],
    strict_sts: StrictSTS,
    spans: tuple[TracerProvider, InMemorySpanExporter],
    instrumentations: list[Instrumentation],
) -> None:
    store = MemoryStore(encryption_keys=[generate_key()])
    await _store_spans_on_miss_and_hit(
        lambda: store, "memory", make_broker, strict_sts, *spans, instrumentations
    )


async def test_store_operations_make_spans_on_a_miss_redis(
    make_broker: Callable[..., CredentialBroker],
    strict_sts: StrictSTS,
    redis_url: str,
    spans: tuple[TracerProvider, InMemorySpanExporter],
    instrumentations: list[Instrumentation],
) -> None:
    store_key = generate_key()
    await _store_spans_on_miss_and_hit(
        lambda: RedisStore(redis_url, encryption_keys=[store_key]),
        "redis",
        make_broker,
        strict_sts,
        *spans,
        instrumentations,
    )


async def test_a_failing_store_marks_its_span_failed(
    make_broker: Callable[..., CredentialBroker],
    strict_sts: StrictSTS,
    redis_server: Any,
    spans: tuple[TracerProvider, InMemorySpanExporter],
    instrumentations: list[Instrumentation],
) -> None:
    provider, exporter = spans
    redis_server.start()
    store = RedisStore(redis_server.url, encryption_keys=[generate_key()])
    broker = make_broker(store=store, store_timeout=0.5)
    instrumentations.append(instrument(broker, tracer_provider=provider))
    redis_server.stop()
    try:
        await broker.get(Role(ROLE))  # the store is down: STS directly
    finally:
        redis_server.start()
    failed = [s for s in store_spans(exporter) if s.status.status_code is StatusCode.ERROR]
    assert failed
    for span in failed:
        assert span.attributes is not None and span.attributes["error.type"]
        assert span.status.description in ("error", "timeout")
    assert len(exchange_spans(exporter)) == 1
    assert_no_secret(exporter.get_finished_spans(), strict_sts)


async def test_uninstrument_sends_spans_back_to_the_global_provider(
    make_broker: Callable[..., CredentialBroker],
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    broker = make_broker()
    instrumentation = instrument(broker, tracer_provider=provider)
    await broker.get(Role(ROLE))
    assert len(exporter.get_finished_spans()) == 1

    instrumentation.uninstrument()
    instrumentation.uninstrument()  # idempotent
    assert instrumentation.brokers == ()
    await broker.get(Role(OTHER_ROLE))
    assert broker.stats.exchanges == 2
    assert len(exporter.get_finished_spans()) == 1


# -- metrics -------------------------------------------------------------------------------


def test_otel_names_and_units() -> None:
    names = [otel_name(spec) for spec in METRICS]
    assert len(set(names)) == len(names)
    for name in names:
        # The API's instrument-name syntax.
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_./-]{0,254}", name), name
        assert name.startswith("stscreds.")
        assert not name.endswith(("_total", "_seconds"))
    by_key = {spec.name: spec for spec in METRICS}
    assert otel_name(by_key["l1_hits_total"]) == "stscreds.l1_hits"
    assert otel_name(by_key["exchanges_total"]) == "stscreds.exchanges"
    assert otel_name(by_key["store_breaker_open"]) == "stscreds.store_breaker_open"
    assert otel_name(by_key["exchange_duration_seconds"]) == "stscreds.exchange_duration"
    assert otel_name(by_key["request_wait_seconds"]) == "stscreds.request_wait"
    assert otel_name(by_key["soonest_expiry_seconds"]) == "stscreds.soonest_expiry"
    for spec in METRICS:
        unit = otel_unit(spec)
        if spec.unit == "seconds":
            assert unit == "s"
        elif spec.kind == "counter" or spec.name.endswith(("identities", "exchanges")):
            assert re.fullmatch(r"\{[a-z]+\}", unit), (spec.name, unit)
        else:
            assert unit == "1", (spec.name, unit)


async def test_metrics_equal_the_broker_snapshot(
    make_broker: Callable[..., CredentialBroker],
    strict_sts: StrictSTS,
    clock: FakeClock,
    meters: tuple[MeterProvider, InMemoryMetricReader],
    instrumentations: list[Instrumentation],
) -> None:
    provider, reader = meters
    broker = make_broker(clock=clock)
    instrumentations.append(instrument(broker, meter_provider=provider))

    await broker.get(Role(ROLE))
    for _ in range(3):
        await broker.get(Role(ROLE))
    await asyncio.gather(*(broker.get(Role(OTHER_ROLE)) for _ in range(5)))
    with pytest.raises(CredentialsRejected):
        await broker.get(Role(DENIED_ROLE))
    with pytest.raises(CredentialsRejected):
        await broker.get(Role(DENIED_ROLE))  # remembered: a negative-cache hit

    metrics = collect(reader)
    snapshot = broker.metrics()
    for spec in METRICS:
        if spec.kind == "histogram":
            continue
        assert values(metrics.get(otel_name(spec))) == expected(spec, snapshot), spec.name

    # The figures the test caused, spelled out.
    assert values(metrics["stscreds.l1_hits"]) == {frozenset(): broker.stats.hits}
    assert broker.stats.hits == 3 + 4 - broker.stats.joins
    assert values(metrics["stscreds.misses"]) == {frozenset(): broker.stats.misses}
    assert values(metrics["stscreds.negative_cache_hits"]) == {frozenset(): 1}
    assert values(metrics["stscreds.exchanges"]) == {
        frozenset({("trigger", "request"), ("outcome", "success"), ("code", "")}): 2,
        frozenset({("trigger", "request"), ("outcome", "rejected"), ("code", "AccessDenied")}): 1,
    }
    assert values(metrics["stscreds.cached_identities"]) == {frozenset(): 2}
    assert values(metrics["stscreds.soonest_expiry"]) == {
        frozenset(): snapshot["soonest_expiry_seconds"]
    }
    assert 3500 < snapshot["soonest_expiry_seconds"] <= 3600
    assert metrics["stscreds.l1_hits"].unit == "{request}"
    assert metrics["stscreds.l1_hits"].data.is_monotonic
    assert metrics["stscreds.soonest_expiry"].unit == "s"
    assert metrics["stscreds.l1_hits"].description == METRICS[0].help

    # Histograms: the same observations in the same buckets.
    for name, source in (
        ("stscreds.exchange_duration", broker.stats.exchange_duration),
        ("stscreds.request_wait", broker.stats.request_wait),
    ):
        metric = metrics[name]
        assert metric.unit == "s"
        (point,) = metric.data.data_points
        assert point.attributes == {}
        assert tuple(point.explicit_bounds) == DURATION_BUCKETS
        assert list(point.bucket_counts) == source.counts
        assert point.count == source.count
        assert point.sum == pytest.approx(source.sum)
    assert metrics["stscreds.exchange_duration"].data.data_points[0].count == 3
    # Every miss waited, except the one answered by the remembered failure.
    assert metrics["stscreds.request_wait"].data.data_points[0].count == broker.stats.misses - 1

    # Role ARNs are never metric attributes (spans only).
    assert otel_name(ROLE_METRIC) not in metrics
    for metric in metrics.values():
        for point in metric.data.data_points:
            assert "role_arn" not in (point.attributes or {})
            assert all(ROLE not in str(value) for value in (point.attributes or {}).values())

    # Counters are cumulative: the next collection has the new totals.
    for _ in range(4):
        await broker.get(Role(OTHER_ROLE))
    metrics = collect(reader)
    assert values(metrics["stscreds.l1_hits"]) == {frozenset(): broker.stats.hits}
    assert broker.stats.hits == 3 + 4 - broker.stats.joins + 4


async def test_store_metrics_carry_the_store_label(
    make_broker: Callable[..., CredentialBroker],
    clock: FakeClock,
    meters: tuple[MeterProvider, InMemoryMetricReader],
    instrumentations: list[Instrumentation],
) -> None:
    provider, reader = meters
    broker = make_broker(clock=clock, store=MemoryStore(encryption_keys=[generate_key()]))
    instrumentations.append(instrument(broker, meter_provider=provider))
    await broker.get(Role(ROLE))

    metrics = collect(reader)
    snapshot = broker.metrics()
    for spec in METRICS:
        if spec.kind != "histogram":
            assert values(metrics.get(otel_name(spec))) == expected(spec, snapshot), spec.name
    assert values(metrics["stscreds.store_leases"]) == {frozenset({("store", "memory")}): 1}
    assert values(metrics["stscreds.store_breaker_open"]) == {frozenset({("store", "memory")}): 0}
    acquired = frozenset({("store", "memory"), ("operation", "acquire"), ("outcome", "ok")})
    assert values(metrics["stscreds.store_operations"])[acquired] == 1


async def test_each_collection_reads_each_broker_once(
    make_broker: Callable[..., CredentialBroker],
    clock: FakeClock,
    meters: tuple[MeterProvider, InMemoryMetricReader],
    instrumentations: list[Instrumentation],
) -> None:
    provider, reader = meters
    brokers = [make_broker(clock=clock), make_broker(clock=clock)]
    reads = [0, 0]
    for index, broker in enumerate(brokers):
        original = broker.metrics

        def counted(index: int = index, original: Any = original) -> dict[str, Any]:
            reads[index] += 1
            return original()  # type: ignore[no-any-return]

        broker.metrics = counted  # type: ignore[method-assign]
    instrumentations.append(instrument(*brokers, meter_provider=provider))
    await brokers[0].get(Role(ROLE))

    collect(reader)
    assert reads == [1, 1]
    metrics = collect(reader)
    assert reads == [2, 2]
    assert values(metrics["stscreds.misses"]) == {frozenset(): 1}


async def test_several_brokers_report_as_one(
    make_broker: Callable[..., CredentialBroker],
    clock: FakeClock,
    meters: tuple[MeterProvider, InMemoryMetricReader],
    instrumentations: list[Instrumentation],
) -> None:
    provider, reader = meters
    one, two, three = (make_broker(clock=clock) for _ in range(3))
    # One call for two brokers, a second call on the same meter provider for the third.
    instrumentations.append(instrument(one, two, meter_provider=provider))
    instrumentations.append(instrument(three, meter_provider=provider))
    with pytest.raises(ValueError, match="already instrumented"):
        instrument(two, meter_provider=provider)

    await one.get(Role(ROLE))
    await one.get(Role(ROLE))
    clock.advance(600)
    await two.get(Role(OTHER_ROLE))
    await three.get(Role(ROLE))
    await three.get(Role(OTHER_ROLE))

    metrics = collect(reader)
    snapshots = [broker.metrics() for broker in (one, two, three)]
    for name in ("l1_hits_total", "misses_total", "exchanges_total", "sts_calls_total"):
        spec = next(spec for spec in METRICS if spec.name == name)
        assert values(metrics[otel_name(spec)]) == expected(spec, *snapshots), name
    assert values(metrics["stscreds.misses"]) == {frozenset(): 4}
    assert values(metrics["stscreds.cached_identities"]) == {frozenset(): 4}
    # The soonest expiry of all: the broker whose credentials were taken first.
    soonest = [snapshot["soonest_expiry_seconds"] for snapshot in snapshots]
    assert soonest[0] < soonest[1]
    assert values(metrics["stscreds.soonest_expiry"]) == {frozenset(): min(soonest)}
    (point,) = metrics["stscreds.exchange_duration"].data.data_points
    assert point.count == 4


async def test_uninstrument_removes_the_listeners_and_stops_reading(
    make_broker: Callable[..., CredentialBroker],
    clock: FakeClock,
    meters: tuple[MeterProvider, InMemoryMetricReader],
) -> None:
    provider, reader = meters
    broker = make_broker(clock=clock)
    theirs = broker.stats.exchange_duration.listeners
    other_listener: list[float] = []
    theirs.append(other_listener.append)  # someone else's listener stays
    instrumentation = instrument(broker, meter_provider=provider)
    assert len(theirs) == 2 and len(broker.stats.request_wait.listeners) == 1
    await broker.get(Role(ROLE))
    assert values(collect(reader)["stscreds.misses"]) == {frozenset(): 1}

    instrumentation.uninstrument()
    assert theirs == [other_listener.append]
    assert broker.stats.request_wait.listeners == []
    await broker.get(Role(OTHER_ROLE))
    assert len(other_listener) == 2

    metrics = collect(reader)
    assert values(metrics.get("stscreds.misses")) == {}
    # The SDK keeps the cumulative state it had; the second exchange was not recorded.
    histogram = metrics["stscreds.exchange_duration"]
    assert [point.count for point in histogram.data.data_points] == [1]

    # Instrumented again on the same provider: read again.
    again = instrument(broker, meter_provider=provider)
    try:
        assert values(collect(reader)["stscreds.misses"]) == {frozenset(): 2}
    finally:
        again.uninstrument()


def test_instrument_takes_only_brokers() -> None:
    with pytest.raises(TypeError, match="CredentialBroker"):
        instrument(object())  # type: ignore[arg-type]


# -- the global providers (a process of its own: they can be set only once) ---------------

GLOBAL_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from stscreds import CredentialBroker, Role, SigningKey
    from stscreds.otel import instrument

    async def main():
        key = SigningKey.from_pem(os.environ["TEST_KEY_PEM"])
        def broker():
            return CredentialBroker(
                issuer=os.environ["TEST_ISSUER"],
                signing_keys=[key],
                sts_endpoint_url=os.environ["TEST_STS_URL"],
            )
        early, late, plain = broker(), broker(), broker()
        instrument(early)  # before the app set its providers: through the API's proxies
        exporter = InMemorySpanExporter()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(tracer_provider)
        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        instrument(late)  # after
        await early.get(Role(os.environ["TEST_ROLE"] + "-early"))
        await late.get(Role(os.environ["TEST_ROLE"] + "-late"))
        await late.get(Role(os.environ["TEST_ROLE"] + "-late"))
        await plain.get(Role(os.environ["TEST_ROLE"] + "-plain"))  # never instrumented
        found = {}
        for rm in reader.get_metrics_data().resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    found[metric.name] = [
                        [dict(p.attributes), getattr(p, "value", None), getattr(p, "count", None)]
                        for p in metric.data.data_points
                    ]
        spans = exporter.get_finished_spans()
        print(json.dumps({
            "spans": [[s.name, s.attributes["aws.sts.role_arn"]] for s in spans],
            "metrics": found,
        }))
        for b in (early, late, plain):
            await b.aclose()

    asyncio.run(main())
    """
)


def test_the_global_providers_are_the_default(strict_sts: StrictSTS) -> None:
    key = SigningKey.generate("ES256")
    strict_sts.configure(issuer=ISSUER, jwks={"keys": [key.public_jwk()]})
    env = {
        **os.environ,
        "PYTHONPATH": str(MIDDLEWARE),
        "TEST_KEY_PEM": key.to_pem().decode(),
        "TEST_ISSUER": ISSUER,
        "TEST_STS_URL": strict_sts.url,
        "TEST_ROLE": ROLE,
    }
    done = subprocess.run(
        [sys.executable, "-c", GLOBAL_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    # Every broker's spans reach the global provider, instrumented or not, set before or after.
    assert sorted(result["spans"]) == sorted(
        [EXCHANGE_SPAN, f"{ROLE}-{name}"] for name in ("early", "late", "plain")
    )
    assert strict_sts.calls == 3
    # Metrics: the two instrumented brokers, as one (the plain one is not reported).
    found = result["metrics"]
    assert found["stscreds.misses"] == [[{}, 2, None]]
    assert found["stscreds.l1_hits"] == [[{}, 1, None]]
    assert found["stscreds.exchanges"] == [
        [{"trigger": "request", "outcome": "success", "code": ""}, 2, None]
    ]
    assert found["stscreds.exchange_duration"] == [[{}, None, 2]]
    assert not math.isnan(found["stscreds.soonest_expiry"][0][1])
