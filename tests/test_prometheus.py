"""stscreds.prometheus: every documented metric, in one process and across real workers.

Single-process tests register a StscredsCollector in a CollectorRegistry and parse
``generate_latest`` with prometheus_client's own parser: the families, labels and values are
the brokers' ``metrics()`` snapshots (summed, or combined by gauge mode, over brokers).

The multiprocess test runs 2 real uvicorn processes of ``servers/fleet_app.py`` with
``FLEET_PROMETHEUS=1`` under prometheus_client's multiprocess mode (one
``PROMETHEUS_MULTIPROC_DIR``), sharing a real redis-server, against StrictSTS. It drives a
scripted failure matrix over HTTP and scrapes ``/metrics`` between phases: every series of the
METRICS catalogue (and the allow-listed per-role counter) has to move, summed over both
workers. Each scrape polls until the expected change shows (the workers copy their figures
every 0.2 s), with a bounded deadline; time moves only through the workers' ``/_clock``.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from servers.fleet import Fleet, Response, Worker
from servers.redis import RedisServer
from servers.sts import RecordedCall, StrictSTS
from stscreds import CredentialBroker, CredentialsRejected, Role, SigningKey
from stscreds._metrics import METRICS, ROLE_METRIC, MetricSpec, samples
from stscreds.prometheus import MAX_ROLE_ARNS, StscredsCollector, prometheus_name
from stscreds.stores import MemoryStore, generate_key

ACCOUNT = "123456789012"
ISSUER = "http://127.0.0.1:9/prometheus"
SPECS = (*METRICS, ROLE_METRIC)


def arn(tenant: str) -> str:
    """The role fleet_app resolves ``?tenant=`` to (and the in-process tests use)."""
    return f"arn:aws:iam::{ACCOUNT}:role/fleet-{tenant}"


@pytest.fixture(autouse=True)
def _single_process_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    # The collector follows PROMETHEUS_MULTIPROC_DIR; only the fleet's workers get one.
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)


# -- parsing an exposition ---------------------------------------------------------------------

Labels = frozenset[tuple[str, str]]


class Scrape:
    """One exposition, parsed: family types and sample values by (sample name, labels)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.values: dict[str, dict[Labels, float]] = {}
        for family in self.families.values():
            for sample in family.samples:
                rows = self.values.setdefault(sample.name, {})
                rows[frozenset(sample.labels.items())] = sample.value

    def rows(self, name: str) -> dict[Labels, float]:
        return self.values.get(name, {})

    def value(self, name: str, **labels: str) -> float:
        """The sample with exactly these labels; NaN (equal to nothing) when absent."""
        return self.rows(name).get(frozenset(labels.items()), math.nan)

    def total(self, name: str, **labels: str) -> float:
        """The sum of the samples whose labels include these."""
        wanted = set(labels.items())
        return sum(v for k, v in self.rows(name).items() if wanted <= k)

    def label_values(self, name: str, label: str) -> set[str]:
        return {dict(k)[label] for k in self.rows(name) if label in dict(k)}


def scrape_registry(*collectors: StscredsCollector) -> Scrape:
    registry = CollectorRegistry()
    for collector in collectors:
        registry.register(collector)
    return Scrape(generate_latest(registry).decode())


def family_name(spec: MetricSpec) -> str:
    """The family name prometheus_client's parser gives (counters without ``_total``)."""
    name = prometheus_name(spec)
    return name.removesuffix("_total") if spec.kind == "counter" else name


def expected_rows(spec: MetricSpec, *snapshots: dict[str, Any]) -> dict[Labels, float]:
    """A counter's rows summed over snapshots (or one snapshot's gauge rows)."""
    rows: dict[Labels, float] = {}
    for snapshot in snapshots:
        for labels, value in samples(spec, snapshot):
            key = frozenset(labels.items())
            rows[key] = rows.get(key, 0.0) + float(value)
    return rows


def secrets_of(requests: Iterable[RecordedCall]) -> dict[str, str]:
    """Every secret STS handed out or was handed: label -> value."""
    found: dict[str, str] = {}
    for n, rec in enumerate(requests):
        for name in ("AccessKeyId", "SecretAccessKey", "SessionToken"):
            if rec.credentials:
                found[f"call {n} {name}"] = rec.credentials[name]
        token = rec.params.get("WebIdentityToken")
        if token:
            found[f"call {n} JWT"] = token
            for part, segment in zip(("header", "payload", "sig"), token.split("."), strict=True):
                found[f"call {n} JWT {part}"] = segment
    return found


# -- one process ---------------------------------------------------------------------------------


@pytest.fixture
async def make_broker(strict_sts: StrictSTS) -> AsyncIterator[Callable[..., CredentialBroker]]:
    """Brokers (one signing key, so any one's JWKS verifies all) with a MemoryStore each."""
    signing_key = SigningKey.generate("ES256")
    brokers: list[CredentialBroker] = []

    def make(sts: StrictSTS | None = None, *, store: bool = True) -> CredentialBroker:
        broker = CredentialBroker(
            issuer=ISSUER,
            signing_keys=[signing_key],
            sts_endpoint_url=(sts or strict_sts).url,
            store=MemoryStore(encryption_keys=[generate_key()]) if store else None,
            exchange_deadline=5.0,
            negative_ttl=(30.0, 30.0),  # a repeat is a negative-cache hit, however slow the host
        )
        brokers.append(broker)
        return broker

    strict_sts.configure(issuer=ISSUER, jwks=lambda: brokers[0].jwks())
    yield make
    for broker in brokers:
        await broker.aclose()


@pytest.fixture(scope="module")
def idle_broker() -> Iterator[CredentialBroker]:
    """A broker that never exchanges (nothing listens at its STS endpoint)."""
    broker = CredentialBroker(
        issuer=ISSUER,
        signing_keys=[SigningKey.generate("ES256")],
        sts_endpoint_url="http://127.0.0.1:9",
    )
    yield broker
    broker.close()


async def exercise(broker: CredentialBroker, sts: StrictSTS) -> None:
    """A miss, a hit, a rejected exchange and a negative-cache hit."""
    alpha = Role(arn("alpha"), subject="alice")
    mallory = Role(arn("mallory"), subject="mallory")
    sts.reject_roles.add(mallory.arn)
    await broker.get(alpha)
    await broker.get(alpha)
    for _ in range(2):  # the second within negative_ttl: no STS call
        with pytest.raises(CredentialsRejected):
            await broker.get(mallory)


async def test_every_catalogue_entry_is_a_family_with_its_labels_and_the_brokers_values(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS
) -> None:
    broker = make_broker()
    await exercise(broker, strict_sts)
    scrape = scrape_registry(StscredsCollector(broker))
    snapshot = broker.metrics()

    assert set(scrape.families) == {family_name(spec) for spec in METRICS}
    for spec in METRICS:
        family = scrape.families[family_name(spec)]
        assert (family.type, family.documentation) == (spec.kind, spec.help), spec.name
        name = prometheus_name(spec)
        if spec.kind == "histogram":
            data = snapshot[spec.name]
            parts = ("bucket", "count", "sum")
            assert {s.name for s in family.samples} == {f"{name}_{part}" for part in parts}
            buckets = {
                float(dict(labels)["le"]): value
                for labels, value in scrape.rows(f"{name}_bucket").items()
            }
            assert buckets == {float(le): float(count) for le, count in data["buckets"]}
            assert scrape.value(f"{name}_count") == data["count"] > 0
            assert scrape.value(f"{name}_sum") == pytest.approx(data["sum"])
            continue
        # Counters expose their ``_total`` sample only; every sample has the documented labels.
        assert {s.name for s in family.samples} <= {name}, spec.name
        assert all(set(s.labels) == set(spec.labels) for s in family.samples), spec.name
        rows, expected = scrape.rows(name), expected_rows(spec, snapshot)
        if spec.name == "soonest_expiry_seconds":  # time passed between the two reads
            assert rows.keys() == expected.keys()
            assert rows[frozenset()] == pytest.approx(expected[frozenset()], abs=5)
            continue
        assert rows == expected, spec.name

    # Positive controls: the figures the exercise made are there, the store ones labelled.
    assert scrape.value("stscreds_l1_hits_total") == 1
    assert scrape.value("stscreds_misses_total") == 3
    assert scrape.value("stscreds_negative_cache_hits_total") == 1
    assert scrape.value("stscreds_cached_identities") == 1
    assert 3000 < scrape.value("stscreds_soonest_expiry_seconds") <= 3600
    exchanges = "stscreds_exchanges_total"
    assert scrape.value(exchanges, trigger="request", outcome="success", code="") == 1
    assert scrape.value(exchanges, trigger="request", outcome="rejected", code="AccessDenied") == 1
    assert scrape.value("stscreds_sts_calls_total", operation="AssumeRoleWithWebIdentity") == 2
    assert scrape.value("stscreds_store_leases_total", store="memory") == 2
    assert scrape.value("stscreds_store_breaker_open", store="memory") == 0
    assert scrape.total("stscreds_store_operations_total", store="memory", outcome="ok") > 0
    assert "role_arn" not in scrape.text and arn("alpha") not in scrape.text


async def test_without_a_store_or_a_cached_identity_the_families_are_still_there(
    make_broker: Callable[..., CredentialBroker],
) -> None:
    scrape = scrape_registry(StscredsCollector(make_broker(store=False)))
    assert set(scrape.families) == {family_name(spec) for spec in METRICS}
    # Nothing cached: no expiry is near (+Inf), and no store series at all.
    assert scrape.value("stscreds_soonest_expiry_seconds") == math.inf
    assert scrape.value("stscreds_cached_identities") == 0
    assert scrape.rows("stscreds_store_operations_total") == {}
    assert scrape.families["stscreds_store_breaker_open"].samples == []
    assert scrape.value("stscreds_request_wait_seconds_count") == 0


async def test_two_brokers_are_summed_and_their_gauges_combined(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS
) -> None:
    first = make_broker()
    await exercise(first, strict_sts)
    # The second talks to an STS 90 s ahead that throttles once: its budget stays limited.
    skewed = StrictSTS(clock=lambda: time.time() + 90).start()
    try:
        skewed.configure(issuer=ISSUER, jwks=first.jwks)
        second = make_broker(skewed)
        skewed.fail_next(1, "Throttling", 400, "Rate exceeded")
        await second.get(Role(arn("carol"), subject="carol"))
        await second.get(Role(arn("carol"), subject="carol"))
    finally:
        skewed.stop()
    scrape = scrape_registry(StscredsCollector(first, second))
    snapshots = first.metrics(), second.metrics()

    for spec in METRICS:
        name = prometheus_name(spec)
        if spec.kind == "counter":
            assert scrape.rows(name) == expected_rows(spec, *snapshots), spec.name
        elif spec.kind == "histogram":
            counts = [s[spec.name]["count"] for s in snapshots]
            assert scrape.value(f"{name}_count") == sum(counts) and min(counts) > 0
            assert scrape.value(f"{name}_sum") == pytest.approx(
                sum(s[spec.name]["sum"] for s in snapshots)
            )
    # Counters add up across the brokers (each contributed).
    assert scrape.value("stscreds_l1_hits_total") == 2
    assert scrape.value("stscreds_sts_throttled_total") == 1
    calls = scrape.value("stscreds_sts_calls_total", operation="AssumeRoleWithWebIdentity")
    assert calls == 2 + 2  # the first's two exchanges, the second's throttled call and retry
    assert scrape.value("stscreds_store_leases_total", store="memory") == 3
    # Gauges: identities add up; the soonest expiry is the sooner; a flag is set if any is;
    # the clock offset is the one farthest from zero.
    assert scrape.value("stscreds_cached_identities") == 2
    assert scrape.value("stscreds_soonest_expiry_seconds") == pytest.approx(
        min(s["soonest_expiry_seconds"] for s in snapshots), abs=5
    )
    assert [s["sts_budget_limited"] for s in snapshots] == [0, 1]
    assert scrape.value("stscreds_sts_budget_limited") == 1
    assert abs(snapshots[0]["clock_offset_seconds"]) < 5
    assert scrape.value("stscreds_clock_offset_seconds") == pytest.approx(90, abs=5)
    assert scrape.value("stscreds_store_breaker_open", store="memory") == 0
    assert scrape.value("stscreds_inflight_exchanges") == 0


async def test_a_role_arn_is_a_label_only_for_the_allow_listed_roles(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS
) -> None:
    broker = make_broker()
    await exercise(broker, strict_sts)
    await broker.get(Role(arn("bob"), subject="bob"))
    listed = {name: value for (name, *_), value in broker.stats.roles.items()}
    assert set(listed) == {arn("alpha"), arn("mallory"), arn("bob")}  # the broker counts all

    plain = scrape_registry(StscredsCollector(broker))
    assert "role_arn" not in plain.text and "stscreds_role_exchanges" not in plain.text

    name = prometheus_name(ROLE_METRIC)
    scrape = scrape_registry(StscredsCollector(broker, role_arns=[arn("alpha"), arn("unused")]))
    assert scrape.families[family_name(ROLE_METRIC)].type == "counter"
    assert scrape.rows(name) == {
        frozenset({("role_arn", arn("alpha")), ("outcome", "success"), ("code", "")}): 1.0
    }
    for other in ("mallory", "bob", "unused"):
        assert arn(other) not in scrape.text

    rejected = scrape_registry(StscredsCollector(broker, role_arns=(arn("mallory"),)))
    labels = {("role_arn", arn("mallory")), ("outcome", "rejected"), ("code", "AccessDenied")}
    assert rejected.rows(name) == {frozenset(labels): 1.0}
    assert arn("alpha") not in rejected.text and arn("bob") not in rejected.text
    # At the limit, the allow-list is accepted.
    assert MAX_ROLE_ARNS == 100
    many = [arn(f"r{i}") for i in range(MAX_ROLE_ARNS - 1)] + [arn("alpha")]
    at_limit = scrape_registry(StscredsCollector(broker, role_arns=many))
    assert at_limit.value(name, role_arn=arn("alpha"), outcome="success", code="") == 1


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "parameter"),
    [
        ((), {}, ValueError, "brokers"),
        (("not a broker",), {}, TypeError, "brokers"),
        ((None,), {}, TypeError, "brokers"),
        ((...,), {"role_arns": arn("alpha")}, TypeError, "role_arns"),
        ((...,), {"role_arns": [arn(f"r{i}") for i in range(101)]}, ValueError, "role_arns"),
        ((...,), {"role_arns": ["fleet-alpha"]}, ValueError, "role_arns"),
        ((...,), {"role_arns": [arn("alpha"), 42]}, ValueError, "role_arns"),
        ((...,), {"sync_interval": 0}, ValueError, "sync_interval"),
        ((...,), {"sync_interval": -1.0}, ValueError, "sync_interval"),
        ((...,), {"sync_interval": math.inf}, ValueError, "sync_interval"),
        ((...,), {"sync_interval": math.nan}, ValueError, "sync_interval"),
        ((...,), {"sync_interval": True}, ValueError, "sync_interval"),
        ((...,), {"sync_interval": "5"}, ValueError, "sync_interval"),
    ],
)
def test_constructor_errors_name_the_parameter(
    idle_broker: CredentialBroker,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    error: type[Exception],
    parameter: str,
) -> None:
    args = tuple(idle_broker if a is ... else a for a in args)
    with pytest.raises(error, match=parameter):
        StscredsCollector(*args, **kwargs)


async def test_registering_the_same_names_twice_raises(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS
) -> None:
    broker = make_broker()
    await exercise(broker, strict_sts)
    collector = StscredsCollector(broker, role_arns=[arn("alpha")])
    described = list(collector.describe())
    collected = list(collector.collect())
    # describe() names what collect() yields, without reading the brokers.
    assert [f.name for f in described] == [f.name for f in collected]
    assert len(described) == len(SPECS)
    assert all(f.samples == [] for f in described)
    assert any(f.samples for f in collected)

    registry = CollectorRegistry()
    registry.register(collector)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(StscredsCollector(broker))
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(collector)
    # The first registration still answers, once per series.
    scrape = Scrape(generate_latest(registry).decode())
    assert scrape.value("stscreds_l1_hits_total") == 1


async def test_no_secret_in_the_exposition(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS
) -> None:
    broker = make_broker()
    await exercise(broker, strict_sts)
    await broker.get(Role(arn("bob"), subject="bob"))
    text = scrape_registry(StscredsCollector(broker, role_arns=[arn("alpha")])).text
    found = secrets_of(strict_sts.requests)
    assert sum(label.endswith("SessionToken") for label in found) == 2
    assert sum(label.endswith(" JWT") for label in found) == 3  # mallory's token too
    assert [label for label, value in found.items() if value in text] == []
    assert arn("alpha") in text  # positive control: labels are in the scanned text


# -- real workers, multiprocess mode ---------------------------------------------------------

ALLOWED = arn("alpha")
# Inside the advisory window of 1 h credentials (15 min), outside the mandatory one (1 min).
ADVISORY_OFFSET = 50 * 60.0
SKEW = 120.0
ROLE_SERIES = prometheus_name(ROLE_METRIC)
FLEET_ENV = {
    "FLEET_PROMETHEUS": "1",
    "FLEET_PROMETHEUS_SYNC": "0.2",
    "FLEET_PROMETHEUS_ROLES": ALLOWED,
    # As in test_shared: a loaded host's loop must not turn a slow Redis answer into an outage.
    "FLEET_STORE_TIMEOUT": "1",
    "FLEET_STORE_COOLDOWN": "1",
    "FLEET_DEADLINE": "10",
}


@pytest.fixture
def prometheus_fleet(
    tmp_path: Path, strict_sts: StrictSTS, redis_url: str, redis_server: RedisServer
) -> Iterator[Fleet]:
    """2 fleet_app workers with a StscredsCollector each, one multiprocess directory."""
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    fleet = Fleet(
        2,
        workdir=tmp_path / "fleet",
        sts_url=strict_sts.url,
        store="redis",
        store_url=redis_url,
        store_key=generate_key(),
        env={**FLEET_ENV, "PROMETHEUS_MULTIPROC_DIR": str(multiproc)},
    )
    strict_sts.configure(issuer=fleet.issuer, jwks=None)
    fleet.start()
    try:
        yield fleet
    finally:
        strict_sts.release()
        fleet.stop()
        redis_server.start()  # if a test left it stopped


class Movement:
    """Which catalogue series moved since the baseline scrape, and in which phase first."""

    def __init__(self, baseline: Scrape) -> None:
        self.baseline = baseline
        self.first: dict[str, str] = {}

    def update(self, phase: str, scrape: Scrape) -> None:
        for spec in SPECS:
            if spec.name not in self.first and self._moved(spec, scrape):
                self.first[spec.name] = phase

    def _moved(self, spec: MetricSpec, scrape: Scrape) -> bool:
        name = prometheus_name(spec) + ("_count" if spec.kind == "histogram" else "")
        before = self.baseline.rows(name)
        for labels, value in scrape.rows(name).items():
            start = before.get(labels, 0.0)
            # Counters and histogram counts increase; a gauge takes another value.
            if value > start if spec.kind != "gauge" else value != start:
                return True
        return False

    def missing(self) -> list[str]:
        return [spec.name for spec in SPECS if spec.name not in self.first]


async def fetch_scrape(worker: Worker) -> Scrape:
    response = await worker.get("/metrics", timeout=10.0)
    assert response.status == 200, response
    scrape = Scrape(response.body.decode())
    # Every scrape: a role ARN only for the allow-listed role, and each gauge combined over
    # the processes (live* modes: one sample per label set, no pid label).
    labelled = {
        (family.name, sample.labels["role_arn"])
        for family in scrape.families.values()
        for sample in family.samples
        if "role_arn" in sample.labels
    }
    assert labelled <= {(family_name(ROLE_METRIC), ALLOWED)}
    assert set(re.findall(r"arn:aws:iam::\d+:role/[\w-]+", scrape.text)) <= {ALLOWED}
    for spec in METRICS:
        if spec.kind == "gauge":
            for labels in scrape.rows(prometheus_name(spec)):
                assert "pid" not in dict(labels), (spec.name, labels)
    return scrape


async def until(
    worker: Worker,
    what: str,
    predicate: Callable[[Scrape], bool],
    *,
    action: Callable[[], Awaitable[object]] | None = None,
    timeout: float = 30.0,
) -> Scrape:
    """Scrape ``worker`` (after ``action``, if any) until ``predicate`` holds; fail at the
    deadline with the stscreds lines of the last scrape."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if action is not None:
            await action()
        scrape = await fetch_scrape(worker)
        if predicate(scrape):
            return scrape
        if loop.time() > deadline:
            lines = [line for line in scrape.text.splitlines() if line.startswith("stscreds_")]
            pytest.fail(
                f"not seen within {timeout:g}s: {what}\n"
                + "\n".join(lines)
                + f"\n--- log of {worker!r} ---\n{worker.log()[-3000:]}"
            )
        await asyncio.sleep(0.05)


def exchanges(m: Scrape, trigger: str, outcome: str, code: str = "") -> float:
    return m.value("stscreds_exchanges_total", trigger=trigger, outcome=outcome, code=code)


def succeeded(responses: Iterable[Response | BaseException]) -> list[dict[str, Any]]:
    responses = list(responses)
    failed = [r for r in responses if isinstance(r, BaseException) or r.status != 200]
    assert not failed, failed[:3]
    return [r.json() for r in responses if isinstance(r, Response)]


async def move_clocks(fleet: Fleet, sts: StrictSTS, offset: float, skew: float = 0.0) -> None:
    # STS first: a worker must never mint a token that STS would see as issued in the future.
    sts.clock = lambda: time.time() + offset + skew
    await fleet.set_clock(offset)


async def test_every_documented_series_moves_across_real_workers(
    prometheus_fleet: Fleet, strict_sts: StrictSTS, redis_server: RedisServer, redis_url: str
) -> None:
    fleet = prometheus_fleet
    await fleet.ready()
    w0, w1 = fleet[0], fleet[1]

    def creds(worker: Worker, tenant: str) -> Awaitable[Response]:
        return worker.get(f"/creds?tenant={tenant}", timeout=30.0)

    # Baseline: a process writes nothing until its broker has served a request (a gunicorn
    # master that never serves must not add its gauges), so before any request there is no
    # stscreds series at all, though both workers have run several syncs by now.
    await asyncio.sleep(0)
    baseline = await fetch_scrape(w0)
    assert not [name for name in baseline.values if name.startswith("stscreds_")]
    movement = Movement(baseline)

    # 1. A cold burst at both workers while STS holds the one exchange: worker 0 wins the
    # lease and exchanges, worker 1 waits for it; 5 more requests join at each worker. (The
    # hold lasts a few scrapes, well under botocore's 5 s read timeout, which would retry.)
    strict_sts.hang = True
    held = [asyncio.ensure_future(creds(w0, "alpha")) for _ in range(6)]
    assert await asyncio.to_thread(strict_sts.wait_for_calls, 1, 15.0)
    held += [asyncio.ensure_future(creds(w1, "alpha")) for _ in range(6)]
    m = await until(
        w0,
        "an exchange in flight at each worker, one waiting on the store, 10 joins",
        lambda m: (
            m.value("stscreds_inflight_exchanges") == 2
            and m.value("stscreds_store_waits_total", store="redis") >= 1
            and m.value("stscreds_singleflight_joins_total") == 10
        ),
    )
    movement.update("cold burst (held)", m)
    strict_sts.release()
    bodies = succeeded(await asyncio.gather(*held, return_exceptions=True))
    assert {b["pid"] for b in bodies} == {w0.pid, w1.pid}
    assert len({b["access_key_id"] for b in bodies}) == 1  # one exchange for the fleet
    assert strict_sts.calls_for(ALLOWED) == 1
    m = await until(
        w0,
        "the cold burst's figures",
        lambda m: (
            m.value("stscreds_misses_total") == 12
            and m.value("stscreds_request_wait_seconds_count") == 12
            and m.value("stscreds_exchange_duration_seconds_count") == 1
            and m.value("stscreds_cached_identities") == 2
            and m.value("stscreds_inflight_exchanges") == 0
            and m.value("stscreds_store_leases_total", store="redis") == 1
            and m.value("stscreds_store_hits_total", store="redis") == 1
            and exchanges(m, "request", "success") == 1
            and m.value(ROLE_SERIES, role_arn=ALLOWED, outcome="success", code="") == 1
            and m.value("stscreds_sts_calls_total", operation="AssumeRoleWithWebIdentity") == 1
            # Worker 1 asked STS for its clock (an unsigned GetCallerIdentity) before judging
            # the value it read from the store.
            and m.value("stscreds_sts_calls_total", operation="GetCallerIdentity") >= 1
        ),
    )
    assert 3000 < m.value("stscreds_soonest_expiry_seconds") <= 3600
    assert m.total("stscreds_store_operations_total", store="redis", outcome="ok") > 0
    assert m.value("stscreds_exchange_duration_seconds_bucket", le="+Inf") == 1
    movement.update("cold burst", m)

    # 2. Repeats are L1 hits; a second identity goes cold to worker 0, then to worker 1 (from
    # the store). Every counter is the sum over both processes, whichever worker is scraped.
    for worker in fleet:
        succeeded([await creds(worker, "alpha") for _ in range(5)])
    beta = succeeded([await creds(w0, "beta"), await creds(w1, "beta")])
    assert beta[0]["access_key_id"] == beta[1]["access_key_id"]
    stats = [(await worker.get("/stats")).json() for worker in fleet]
    hits = [s["hits"] for s in stats]
    assert hits == [5, 5], stats
    store = {name: sum(s["store"][name] for s in stats) for name in stats[0]["store"]}
    exchanged = sum(s["exchanges"] for s in stats)

    def sums_match(m: Scrape) -> bool:
        return (
            m.value("stscreds_l1_hits_total") == sum(hits)
            and m.total("stscreds_exchanges_total") == exchanged
            and m.value("stscreds_store_hits_total", store="redis") == store["hits"]
            and m.value("stscreds_store_leases_total", store="redis") == store["leases"]
            and m.value("stscreds_store_waits_total", store="redis") == store["waits"]
            and m.value("stscreds_store_rejected_values_total", store="redis") == store["rejected"]
            and m.value("stscreds_store_breaker_openings_total", store="redis") == store["outages"]
            and m.value("stscreds_cached_identities") == 4
        )

    m = await until(w0, f"the sums of both workers' /stats {stats}", sums_match)
    assert (store["hits"], store["leases"], exchanged) == (2, 2, 2)
    assert sums_match(await fetch_scrape(w1))  # the other worker answers the same sums
    movement.update("repeats", m)

    # 3. A role STS refuses: a rejected exchange, then the remembered failure (no STS call).
    strict_sts.reject_roles.add(arn("mallory"))

    async def mallory() -> None:
        response = await creds(w0, "mallory")
        assert response.status == 502 and response.json()["code"] == "AccessDenied", response

    m = await until(
        w0,
        "a rejected exchange and a negative-cache hit",
        lambda m: (
            exchanges(m, "request", "rejected", "AccessDenied") >= 1
            and m.value("stscreds_negative_cache_hits_total") >= 1
        ),
        action=mallory,
    )
    assert strict_sts.calls_for(arn("mallory")) >= 1  # its exchanges happened, unlabelled
    movement.update("rejected role", m)

    # 4. The workers' clocks (and STS's) move into the advisory window: hits start one
    # background refresh per worker, and the fleet exchanges once more for alpha.
    await move_clocks(fleet, strict_sts, ADVISORY_OFFSET)

    async def touch_alpha() -> None:
        for worker in fleet:
            succeeded([await creds(worker, "alpha")])

    m = await until(
        w0,
        "a background refresh and its exchange",
        lambda m: (
            m.value("stscreds_background_refreshes_total") >= 2
            and exchanges(m, "background", "success") >= 1
        ),
        action=touch_alpha,
    )
    movement.update("advisory window", m)

    # 5. Then to 30 s before beta's expiry: beta (cached by both, untouched since) is in the
    # mandatory window until a request refreshes it at each worker.
    offset = beta[0]["expiration"] - 30.0 - time.time()
    await move_clocks(fleet, strict_sts, offset)
    m = await until(
        w0,
        "identities in the mandatory window",
        lambda m: m.value("stscreds_mandatory_window_identities") == 2,
    )
    assert m.value("stscreds_soonest_expiry_seconds") < 60
    movement.update("mandatory window", m)

    async def touch_all() -> None:
        for worker in fleet:
            succeeded([await creds(worker, "beta"), await creds(worker, "alpha")])

    await until(
        w0,
        "the mandatory window emptied by requests",
        lambda m: (
            m.value("stscreds_mandatory_window_identities") == 0
            and m.value("stscreds_soonest_expiry_seconds") > 1800
        ),
        action=touch_all,
    )

    # 6. STS's clock runs 120 s ahead: worker 0 learns it from the next answer's Date.
    await move_clocks(fleet, strict_sts, offset, skew=SKEW)
    succeeded([await creds(w0, "skewed")])
    m = await until(
        w0,
        "the clock offset learned from STS",
        lambda m: abs(m.value("stscreds_clock_offset_seconds") - SKEW) < 5,
    )
    movement.update("skewed STS clock", m)

    # 7. Garbage in every stored value (TTLs kept): worker 1, which never had "skewed",
    # reads it from the store, rejects it and exchanges again.
    client = redis.Redis.from_url(redis_url)
    try:
        corrupted = [
            name
            for name in client.scan_iter(match="stscreds:v:*")
            # xx: a value (or failure marker) that expired since the scan stays gone.
            if client.set(name, b"\x00garbage" + secrets.token_bytes(48), keepttl=True, xx=True)
        ]
        assert corrupted
        assert -1 not in [client.pttl(name) for name in corrupted]  # every TTL kept
    finally:
        client.close()
    succeeded([await creds(w1, "skewed")])
    assert strict_sts.calls_for(arn("skewed")) == 2
    m = await until(
        w0,
        "rejected store values",
        lambda m: m.value("stscreds_store_rejected_values_total", store="redis") >= 1,
    )
    movement.update("corrupted store", m)

    # 8. Redis goes down: worker 0's store calls fail, its breaker opens, requests go to STS
    # directly. Redis comes back: the breaker closes at the first probe after its cooldown.
    def failed_store_operations(m: Scrape) -> float:
        operations = "stscreds_store_operations_total"
        return sum(m.total(operations, store="redis", outcome=o) for o in ("error", "timeout"))

    redis_server.stop()
    succeeded([await creds(w0, "outage")])
    m = await until(
        w0,
        "failed store operations and an open breaker",
        lambda m: (
            m.value("stscreds_store_breaker_open", store="redis") == 1
            and m.value("stscreds_store_breaker_openings_total", store="redis") >= 1
            and failed_store_operations(m) >= 1
        ),
    )
    movement.update("redis down", m)
    redis_server.start()
    probes = 0

    async def probe() -> None:
        nonlocal probes
        probes += 1
        succeeded([await creds(w0, f"back-{probes}")])

    m = await until(
        w0,
        "the breaker closed again",
        lambda m: m.value("stscreds_store_breaker_open", store="redis") == 0,
        action=probe,
    )
    assert m.total("stscreds_store_operations_total", store="redis", outcome="skipped") >= 1
    movement.update("redis back", m)

    # 9. STS throttles every call: a storm of new identities at worker 1 closes its budget,
    # which then holds calls back (refusals) and stays limited.
    strict_sts.fail_always("Throttling", 400, "Rate exceeded")
    storms = 0

    async def storm() -> None:
        nonlocal storms
        storms += 1
        responses = await asyncio.gather(
            *(creds(w1, f"storm-{storms}-{i}") for i in range(16)), return_exceptions=True
        )
        assert all(isinstance(r, Response) and r.status == 503 for r in responses), responses[:3]

    m = await until(
        w0,
        "throttling, budget refusals and a limited budget",
        lambda m: (
            m.value("stscreds_sts_throttled_total") >= 1
            and m.value("stscreds_sts_budget_refusals_total") >= 1
            and m.value("stscreds_sts_budget_limited") == 1
            and exchanges(m, "request", "unavailable", "Throttling") >= 1
        ),
        action=storm,
    )
    strict_sts.clear_faults()
    movement.update("throttling", m)

    # Every documented series moved, summed over the two processes.
    assert movement.missing() == [], movement.first
    assert m.label_values("stscreds_exchanges_total", "trigger") == {"request", "background"}
    assert m.label_values("stscreds_exchanges_total", "outcome") == {
        "success",
        "rejected",
        "unavailable",
    }
    assert {"ok", "skipped"} <= m.label_values("stscreds_store_operations_total", "outcome")
    assert m.value(ROLE_SERIES, role_arn=ALLOWED, outcome="success", code="") >= 2
    found = secrets_of(strict_sts.requests)
    assert len(found) > 20
    assert [label for label, value in found.items() if value in m.text] == []


# -- gunicorn --preload: a warm-up in the master, real sync workers ------------------------------

TESTS = Path(__file__).resolve().parent
PRELOAD_APP = "servers.preload_app:app"
# prometheus_client's documented gunicorn hook: a dead worker's live* gauges leave the sums.
GUNICORN_CONF = """\
from prometheus_client import multiprocess


def child_exit(server, worker):
    multiprocess.mark_process_dead(worker.pid)
"""


def preload_arn(tenant: str) -> str:
    """The role preload_app resolves ``?tenant=`` to."""
    return f"arn:aws:iam::{ACCOUNT}:role/preload-{tenant}"


def http_get(port: int, path: str, conn: socket.socket | None = None) -> tuple[int, bytes]:
    """GET ``path`` (HTTP/1.0: never chunked) on ``conn`` or a new connection; read to EOF."""
    conn = conn or socket.create_connection(("127.0.0.1", port), timeout=30.0)
    with conn:
        conn.settimeout(30.0)
        conn.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    head, sep, body = b"".join(chunks).partition(b"\r\n\r\n")
    if not sep:
        raise ConnectionError(f"incomplete HTTP response on port {port}: {head[:80]!r}")
    return int(head.split()[1]), body


def process_scrape(multiproc: Path, pid: int, into: Path) -> Scrape:
    """The series one process wrote, alone: a copy of its files, read by prometheus_client."""
    into.mkdir()
    for file in multiproc.glob(f"*_{pid}.db"):
        shutil.copy(file, into)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(into))
    return Scrape(generate_latest(registry).decode())


@pytest.mark.parametrize("warm_up", ["middleware", "broker.get"])
def test_gunicorn_preload_counts_the_masters_warm_up_once(
    tmp_path: Path, strict_sts: StrictSTS, warm_up: str
) -> None:
    """``gunicorn --preload -w 2`` of servers/preload_app.py: the master imports the app, whose
    StscredsCollector (multiprocess mode) and one synchronous exchange for "warm" are made
    before the 2 sync workers are forked; ``warm_up`` is how the app makes that exchange.

    The workers serve "warm" from the cache they inherited (no STS call), and their broker,
    driven from the WSGI middleware's own loop thread, exchanges for "cold". The master's
    exchange is counted once in the fleet's sums, by the master; the workers count from the
    fork. Gauges: the middleware's warm-up (the documented way) is no request, so the master
    writes none and stscreds_cached_identities is what the 2 workers hold. An
    ``asyncio.run(broker.get(...))`` at import is a request as far as the broker can tell:
    then the master writes its gauges too, its warm identity (never refreshed: the master
    serves nothing) in the fleet's cached_identities and soonest expiry.
    """
    master_writes_gauges = warm_up == "broker.get"
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    key = SigningKey.generate("ES256")
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(key.to_pem())
    key_file.chmod(0o600)
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text(GUNICORN_CONF)
    # gunicorn takes this bound socket (fd://): the port is known for the issuer URL and
    # cannot be taken by anyone else before gunicorn listens on it.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    issuer = f"http://127.0.0.1:{port}"
    # The warm-up runs in the master before anything listens: STS gets the keys directly.
    strict_sts.configure(issuer=issuer, jwks={"keys": [key.public_jwk()]})
    env = {
        **os.environ,
        "PYTHONPATH": str(TESTS),
        "NO_PROXY": "127.0.0.1,localhost",
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
        "PRELOAD_ISSUER": issuer,
        "PRELOAD_KEY_FILE": str(key_file),
        "PRELOAD_STS": strict_sts.url,
        "PRELOAD_WARM_UP": warm_up,
    }
    command = [sys.executable, "-m", "gunicorn", "--preload", "--workers", "2"]
    command += ["--config", str(conf), "--bind", f"fd://{listener.fileno()}"]
    # No control socket: by default gunicorn makes one in $HOME, shared by concurrent runs.
    command += ["--no-control-socket", "--timeout", "60", "--graceful-timeout", "10"]
    command.append(PRELOAD_APP)
    log = tmp_path / "gunicorn.log"
    with open(log, "wb") as out:
        master = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=out, stderr=out, pass_fds=[listener.fileno()]
        )
    held: socket.socket | None = None

    def output() -> str:
        return f"\n--- gunicorn log ---\n{log.read_text(errors='replace')[-4000:]}"

    try:
        deadline = time.monotonic() + 60
        while True:  # waits for an event (a worker serving), never to let time pass
            if master.poll() is not None:
                pytest.fail(f"gunicorn exited with {master.returncode}{output()}")
            try:
                if http_get(port, "/.well-known/openid-configuration")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"gunicorn did not serve within 60s{output()}")
            time.sleep(0.1)
        listener.close()  # gunicorn has its own copy
        # The master exchanged once, at import: the workers were forked warm.
        assert strict_sts.calls == 1
        (warm_call,) = strict_sts.requests_for(preload_arn("warm"))
        assert warm_call.credentials is not None
        warm_key = warm_call.credentials["AccessKeyId"]

        def creds(tenant: str, conn: socket.socket | None = None) -> dict[str, Any]:
            status, body = http_get(port, f"/creds?tenant={tenant}", conn)
            assert status == 200, (status, body, output())
            answer: dict[str, Any] = json.loads(body)
            return answer

        # A sync worker serves one connection at a time: one that sends nothing yet holds
        # the worker that accepted it (x) in its read, so every other connection goes to the
        # other worker (y), which the cold tenant then reaches alone.
        held = socket.create_connection(("127.0.0.1", port), timeout=30.0)
        at_y = [creds("warm") for _ in range(5)] + [creds("cold") for _ in range(3)]
        at_x = creds("warm", held)
        held = None
        (y,) = {answer["pid"] for answer in at_y}
        x = at_x["pid"]
        assert len({x, y, master.pid}) == 3
        assert {answer["ppid"] for answer in [*at_y, at_x]} == {master.pid}
        # Both workers served warm from the master's cache; y exchanged once for cold.
        assert {a["access_key_id"] for a in [*at_y[:5], at_x]} == {warm_key}
        (cold_call,) = strict_sts.requests_for(preload_arn("cold"))
        assert cold_call.credentials is not None
        assert {a["access_key_id"] for a in at_y[5:]} == {cold_call.credentials["AccessKeyId"]}
        assert strict_sts.calls == 2

        # x: 1 hit; y: 5 warm hits, then the cold miss and 2 hits. Each process copies every
        # 0.2 s: wait for both workers' last hits and their gauges (a sync writes its
        # counters, then its gauges).
        hits = 1 + 5 + 2
        cached = (1 if master_writes_gauges else 0) + 1 + 2
        deadline = time.monotonic() + 30
        while True:
            status, body = http_get(port, "/metrics")
            assert status == 200, (status, body)
            m = Scrape(body.decode())
            if (
                m.value("stscreds_l1_hits_total") == hits
                and m.value("stscreds_cached_identities") == cached
            ):
                break
            if time.monotonic() > deadline:
                lines = [line for line in m.text.splitlines() if line.startswith("stscreds_")]
                pytest.fail(
                    f"not seen within 30s: {hits} hits and {cached} cached identities\n"
                    + "\n".join(lines)
                    + output()
                )
            time.sleep(0.05)

        # The fleet's sums: the master's warm-up once (not once per worker), y's cold one.
        assert m.total("stscreds_exchanges_total") == 2
        assert exchanges(m, "request", "success") == 2
        assert m.value("stscreds_misses_total") == 2
        arww = m.value("stscreds_sts_calls_total", operation="AssumeRoleWithWebIdentity")
        assert arww == m.total("stscreds_sts_calls_total") == strict_sts.calls == 2
        assert m.value("stscreds_exchange_duration_seconds_count") == 2
        assert m.value("stscreds_request_wait_seconds_count") == 2
        assert m.value("stscreds_inflight_exchanges") == 0
        assert m.value("stscreds_mandatory_window_identities") == 0
        assert 3000 < m.value("stscreds_soonest_expiry_seconds") <= 3600

        # Who wrote what: each process's own files.
        alone = {
            name: process_scrape(multiproc, pid, tmp_path / name)
            for name, pid in (("master", master.pid), ("x", x), ("y", y))
        }
        figures = {
            name: {
                "hits": s.total("stscreds_l1_hits_total"),
                "misses": s.total("stscreds_misses_total"),
                "exchanges": s.total("stscreds_exchanges_total"),
                "sts_calls": s.total("stscreds_sts_calls_total"),
                "exchange_durations": s.total("stscreds_exchange_duration_seconds_count"),
                "cached_identities": s.rows("stscreds_cached_identities").get(frozenset()),
            }
            for name, s in alone.items()
        }
        assert figures == {
            # The master counted its warm-up; whether it writes gauges depends on the kind.
            "master": {
                "hits": 0,
                "misses": 1,
                "exchanges": 1,
                "sts_calls": 1,
                "exchange_durations": 1,
                "cached_identities": 1 if master_writes_gauges else None,
            },
            # The workers count from the fork on: x only its hit. Both served a request, so
            # both write their gauges, the warm identity each inherited included.
            "x": {
                "hits": 1,
                "misses": 0,
                "exchanges": 0,
                "sts_calls": 0,
                "exchange_durations": 0,
                "cached_identities": 1,
            },
            "y": {
                "hits": 7,
                "misses": 1,
                "exchanges": 1,
                "sts_calls": 1,
                "exchange_durations": 1,
                "cached_identities": 2,
            },
        }
        master_gauge_files = list(multiproc.glob(f"gauge_live*_{master.pid}.db"))
        assert len(master_gauge_files) == (3 if master_writes_gauges else 0)
        assert (multiproc / f"counter_{master.pid}.db").exists()
    finally:
        if held is not None:
            held.close()
        listener.close()
        master.send_signal(signal.SIGTERM)
        try:
            master.wait(timeout=30)
        except subprocess.TimeoutExpired:
            master.kill()
            master.wait()

    assert master.returncode == 0, output()
    assert "Traceback" not in log.read_text(errors="replace"), output()
    # child_exit marked both workers dead: their live gauges left the files (their counters
    # stay, as documented); the master's gauges, if any, stay until the directory is emptied.
    for pid in (x, y):
        assert list(multiproc.glob(f"gauge_live*_{pid}.db")) == [], pid
        assert (multiproc / f"counter_{pid}.db").exists()
    assert len(list(multiproc.glob(f"gauge_live*_{master.pid}.db"))) == len(master_gauge_files)


async def test_a_warm_up_is_not_serving_even_for_a_role_already_cached(
    make_broker: Callable[..., CredentialBroker],
) -> None:
    # Multiprocess mode's gauges are written only by a process that served a request: each
    # warm-up call is one hit or one miss, and neither counts, even when the role is cached.
    from stscreds._asgi import run_warm_up

    broker = make_broker()
    collector = StscredsCollector(broker, multiprocess=True, sync_interval=3600)
    try:
        mirror = collector._mirror
        assert mirror is not None
        role = Role(f"arn:aws:iam::{ACCOUNT}:role/warm", subject="tenant:warm")
        assert await run_warm_up(broker, [role]) == 1  # a miss
        assert await run_warm_up(broker, [role]) == 1  # a hit: already cached
        assert (broker.stats.misses, broker.stats.hits) == (1, 1)
        assert not mirror._served()
        await broker.get(role)  # a request
        assert mirror._served()
    finally:
        collector.close()
