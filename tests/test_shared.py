"""The shared tier: one STS exchange per identity for a whole fleet of worker processes.

Multi-process proofs run 4 real uvicorn processes of ``servers/fleet_app.py`` (see
``servers/fleet.py``) against StrictSTS, which counts every call. The workers are 4 separate
processes on 4 ports rather than ``uvicorn --workers 4`` on one port: the spread of a burst is
then exact (every worker gets a quarter of it, so "responses came from all 4 pids" cannot fail by
the kernel's choice), a request can be aimed at the worker to kill, and a killed worker stays dead
(uvicorn's supervisor would respawn it). The issuer is worker 0's URL: StrictSTS discovers the
JWKS from it, as AWS would. Each worker's store timeout is 1 s instead of the 0.25 s default:
these tests prove the sharing, not latency, and on a loaded host an event loop busy with a
100-request burst can take longer than 0.25 s to see Redis's answer, which counts as a store
failure (the breaker opens and that worker goes to STS by itself).

In-process tests drive SharedTier directly with a MemoryStore (a few also with a RedisStore)
and a fake exchange; time is a FakeClock, except where a cold miss really waits on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.asyncio import Redis as AsyncRedis

from servers.fleet import Fleet, Response, Worker
from servers.redis import RedisServer
from servers.sts import RecordedCall, StrictSTS
from stscreds import (
    CredentialBroker,
    Credentials,
    CredentialsRejected,
    Role,
    SigningKey,
    STSUnavailable,
)
from stscreds._clock import StsClock
from stscreds._shared import SharedTier, _encode
from stscreds.stores import MemoryStore, RedisStore, StoreCipher, generate_key

ACCOUNT = "123456789012"
# Inside the advisory window of 1 h credentials (15 min), outside the mandatory one (1 min).
ADVISORY_OFFSET = 50 * 60.0
PREFIX = "stscreds:"
FLEET_ENV = {"FLEET_STORE_TIMEOUT": "1", "FLEET_DEADLINE": "5"}


def arn(tenant: str) -> str:
    """The role fleet_app resolves ``?tenant=`` to."""
    return f"arn:aws:iam::{ACCOUNT}:role/fleet-{tenant}"


# -- helpers for fleets -------------------------------------------------------------------------


async def burst(
    workers: Sequence[Worker], tenants: Sequence[str], total: int, timeout: float = 60.0
) -> list[Response | BaseException]:
    """``total`` concurrent requests, one connection each, spread evenly over workers x tenants."""
    n = len(workers)
    return await asyncio.gather(
        *(
            workers[i % n].get(f"/creds?tenant={tenants[(i // n) % len(tenants)]}", timeout=timeout)
            for i in range(total)
        ),
        return_exceptions=True,
    )


def answers(responses: Sequence[Response | BaseException]) -> list[dict[str, Any]]:
    """The JSON bodies; fails with the first few failures if any request did not get a 200."""
    failed = [r for r in responses if isinstance(r, BaseException) or r.status != 200]
    assert not failed, f"{len(failed)} of {len(responses)} requests failed: {failed[:5]!r}"
    return [r.json() for r in responses if isinstance(r, Response)]


async def settled(sts: StrictSTS, timeout: float = 15.0) -> None:
    """Wait until every call that reached STS has been answered (and so is counted)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(sts.requests) < sts.calls:
        assert loop.time() < deadline, f"STS calls still in flight: {sts.calls}"
        await asyncio.sleep(0.02)


def issued_keys(sts: StrictSTS, role_arn: str) -> list[str]:
    return [r.credentials["AccessKeyId"] for r in sts.requests_for(role_arn) if r.credentials]


async def serving(worker: Worker, tenant: str) -> str:
    response = await worker.get(f"/creds?tenant={tenant}")
    assert response.status == 200, (response, worker.log()[-2000:])
    return str(response.json()["access_key_id"])


async def until_all_serve_new(
    workers: Sequence[Worker], tenant: str, old: str, timeout: float = 20.0
) -> dict[int, str]:
    """Poll ``/creds`` on each worker until it serves a key other than ``old``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    keys: dict[int, str] = {}
    for worker in workers:
        while (key := await serving(worker, tenant)) == old:
            assert loop.time() < deadline, f"{worker!r} still serves the old key for {tenant}"
            await asyncio.sleep(0.05)
        keys[worker.index] = key
    return keys


async def advance_fleet_clocks(fleet: Fleet, sts: StrictSTS, offset: float) -> None:
    # STS first: a worker must never mint a token that STS would see as issued in the future.
    sts.clock = lambda: time.time() + offset
    await fleet.set_clock(offset)


@pytest.fixture
def make_fleet(tmp_path: Path) -> Iterator[Callable[..., Fleet]]:
    """Start 4-worker fleets against a StrictSTS (configured to discover their JWKS)."""
    fleets: list[Fleet] = []

    def make(sts: StrictSTS, *, env: Mapping[str, str] | None = None, **kwargs: Any) -> Fleet:
        fleet = Fleet(
            4,
            workdir=tmp_path / f"fleet-{len(fleets)}",
            sts_url=sts.url,
            store_key=generate_key(),
            env={**FLEET_ENV, **(env or {})},
            **kwargs,
        )
        fleets.append(fleet)
        sts.configure(issuer=fleet.issuer, jwks=None)
        return fleet.start()

    try:
        yield make
    finally:
        for fleet in fleets:
            fleet.stop()


# -- secrets in clear -------------------------------------------------------------------------


def secrets_of(requests: Sequence[RecordedCall]) -> dict[str, str]:
    """Everything that must never be readable in a store: label -> value."""
    found: dict[str, str] = {}
    for n, rec in enumerate(requests):
        if rec.credentials:
            for name in ("AccessKeyId", "SecretAccessKey", "SessionToken"):
                found[f"call {n} {name}"] = rec.credentials[name]
        token = rec.params.get("WebIdentityToken")
        if token:
            found[f"call {n} JWT"] = token
            for part, segment in zip(
                ("header", "payload", "signature"), token.split("."), strict=True
            ):
                found[f"call {n} JWT {part}"] = segment
        for name, value in (
            ("role ARN", rec.role_arn),
            ("session name", rec.session_name),
            ("subject", (rec.claims or {}).get("sub")),
        ):
            if value:
                found[f"call {n} {name}"] = value
    return found


def unkeyed_names(identity_keys: Mapping[str, str]) -> dict[str, str]:
    """Names a store must not use for these identities: label -> name.

    The identity key itself (the store name before keyed names), its plain SHA-256, and the
    unkeyed digests a failure marker was or could be named by.
    """
    found: dict[str, str] = {}
    for label, key in identity_keys.items():
        found[f"{label} identity key"] = key
        found[f"{label} sha256(identity key)"] = hashlib.sha256(key.encode()).hexdigest()
        found[f"{label} old marker name"] = hashlib.sha256(
            b"stscreds/failure|" + key.encode()
        ).hexdigest()
        found[f"{label} sha256(f|identity key)"] = hashlib.sha256(f"f|{key}".encode()).hexdigest()
    return found


def in_clear(blobs: Mapping[str, bytes], secrets: Mapping[str, str]) -> list[str]:
    """Which secrets appear (as UTF-8, or JSON-escaped) in which blob."""
    hits = []
    for label, value in secrets.items():
        forms = {value.encode(), json.dumps(value)[1:-1].encode()}
        for where, blob in blobs.items():
            if any(form in blob for form in forms):
                hits.append(f"{label} in {where}")
    return hits


def redis_dump(url: str) -> dict[str, bytes]:
    """Every key and its value, whatever its type (raw client: SCAN, TYPE, then read)."""
    client = redis.Redis.from_url(url)
    try:
        dump: dict[str, bytes] = {}
        for key in client.scan_iter(count=1000):
            kind = client.type(key).decode()
            if kind == "string":
                parts: list[Any] = [client.get(key)]
            elif kind == "hash":
                parts = [b for pair in client.hgetall(key).items() for b in pair]
            elif kind == "list":
                parts = client.lrange(key, 0, -1)
            elif kind == "set":
                parts = list(client.smembers(key))
            elif kind == "zset":
                parts = [member for member, _ in client.zrange(key, 0, -1, withscores=True)]
            elif kind == "stream":
                parts = [repr(entry).encode() for entry in client.xrange(key)]
            else:
                parts = []
            dump[f"redis {kind} {key!r}"] = key + b"\0" + b"\0".join(p or b"" for p in parts)
        return dump
    finally:
        client.close()


def sqlite_dump(path: Path) -> dict[str, bytes]:
    """The raw bytes of the database file and its -wal and -shm files (those that exist)."""
    files = [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]
    return {f"file {p.name}": p.read_bytes() for p in files if p.exists()}


# -- 1 and 5: a recorded fleet run per backend --------------------------------------------------


@dataclass
class FleetRun:
    """What one 4-worker fleet did: a cold burst, then a refresh cycle; and what it stored."""

    backend: str
    pids: set[int] = field(default_factory=set)
    burst: list[dict[str, Any]] = field(default_factory=list)
    calls_after_burst: dict[str, int] = field(default_factory=dict)
    keys_after_burst: dict[str, list[str]] = field(default_factory=dict)
    refreshed: dict[str, dict[int, str]] = field(default_factory=dict)
    calls_after_refresh: dict[str, int] = field(default_factory=dict)
    keys_after_refresh: dict[str, list[str]] = field(default_factory=dict)
    requests: list[RecordedCall] = field(default_factory=list)
    stored: dict[str, bytes] = field(default_factory=dict)
    store_keys: list[str] = field(default_factory=list)  # value names, stored in clear
    store_key: str = ""  # the fleet's store encryption key
    identity_keys: dict[str, str] = field(default_factory=dict)  # tenant -> identity key
    stats: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase, for reports
    logs: str = ""  # the workers' stdout and stderr
    error: BaseException | None = None


TENANTS = ("alpha", "beta")


async def record_run(backend: str, workdir: Path, redis_server: RedisServer) -> FleetRun:
    run = FleetRun(backend, store_key=generate_key())
    sts = StrictSTS().start()
    sqlite_path = workdir / "store.db"
    if backend == "redis":
        redis_server.start()
        redis_server.flushall()
        store_url = redis_server.url
    else:
        store_url = str(sqlite_path)
    fleet = Fleet(
        4,
        workdir=workdir,
        sts_url=sts.url,
        store=backend,
        store_url=store_url,
        store_key=run.store_key,
        env=FLEET_ENV,
    )
    sts.configure(issuer=fleet.issuer, jwks=None)
    sts.delay = 0.2  # the burst's requests overlap the exchange
    published: list[bytes] = []
    listener: asyncio.Task[None] | None = None
    subscriber: AsyncRedis | None = None
    pubsub: Any = None
    try:
        # The identity keys the workers compute (fleet_app's roles, the broker's defaults).
        probe = CredentialBroker(
            issuer=fleet.issuer,
            signing_keys=[SigningKey.generate("ES256")],
            sts_endpoint_url=sts.url,
        )
        run.identity_keys = {
            t: probe.identity_key(Role(arn(t), subject=f"tenant:{t}")) for t in TENANTS
        }
        await probe.aclose()
        if backend == "redis":
            # Also record every pub/sub message the fleet sends (not stored, but on the wire).
            subscriber = AsyncRedis.from_url(store_url)
            pubsub = subscriber.pubsub()
            await pubsub.psubscribe("*")

            async def listen() -> None:
                async for message in pubsub.listen():
                    published.append(repr(message).encode())

            listener = asyncio.create_task(listen())
        started = time.monotonic()
        fleet.start()
        await fleet.ready()
        run.pids = {worker.pid for worker in fleet}
        run.timings["start"] = time.monotonic() - started

        started = time.monotonic()
        run.burst = answers(await burst(fleet.workers, TENANTS, 400))
        run.timings["burst"] = time.monotonic() - started
        await settled(sts)
        run.calls_after_burst = {t: sts.calls_for(arn(t)) for t in TENANTS}
        run.keys_after_burst = {t: issued_keys(sts, arn(t)) for t in TENANTS}
        run.stats = [(await w.get("/stats")).json() for w in fleet]
        run.stored.update(
            {f"{k} (after burst)": v for k, v in _dump(backend, store_url, sqlite_path).items()}
        )

        started = time.monotonic()
        await advance_fleet_clocks(fleet, sts, ADVISORY_OFFSET)
        for tenant in TENANTS:
            old = run.keys_after_burst[tenant][0]
            run.refreshed[tenant] = await until_all_serve_new(fleet.workers, tenant, old)
        run.timings["refresh"] = time.monotonic() - started
        await settled(sts)
        run.calls_after_refresh = {t: sts.calls_for(arn(t)) for t in TENANTS}
        run.keys_after_refresh = {t: issued_keys(sts, arn(t)) for t in TENANTS}
        run.stored.update(
            {f"{k} (after refresh)": v for k, v in _dump(backend, store_url, sqlite_path).items()}
        )
    except Exception as error:  # reported by the tests, with the workers' logs
        run.error = error
    finally:
        fleet.stop()
        run.logs = fleet.logs()
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await listener
            await pubsub.aclose()
        if subscriber is not None:
            await subscriber.aclose()
        sts.stop()
    run.requests = list(sts.requests)
    run.stored["redis pub/sub messages"] = b"\n".join(published)
    if backend == "sqlite":
        run.stored.update({f"{k} (after shutdown)": v for k, v in sqlite_dump(sqlite_path).items()})
        with contextlib.closing(sqlite3.connect(sqlite_path)) as conn:
            run.store_keys = [k for (k,) in conn.execute("SELECT key FROM stscreds_values")]
    else:
        run.store_keys = sorted(
            {m for name in run.stored for m in re.findall(rf"'{PREFIX}v:([0-9a-f]+)'", name)}
        )
    return run


def _dump(backend: str, store_url: str, sqlite_path: Path) -> dict[str, bytes]:
    return redis_dump(store_url) if backend == "redis" else sqlite_dump(sqlite_path)


@pytest.fixture(scope="module", params=["redis", "sqlite"])
def fleet_run(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer,
) -> FleetRun:
    """One recorded run per backend, shared by the burst test and the secrets scan."""
    workdir = tmp_path_factory.mktemp(f"fleet-{request.param}")
    return asyncio.run(record_run(request.param, workdir, redis_server))


def succeeded(run: FleetRun) -> FleetRun:
    if run.error is not None:
        raise AssertionError(f"the {run.backend} run failed:\n{run.logs[-6000:]}") from run.error
    return run


def test_cold_burst_over_four_processes_makes_one_sts_call_per_identity(
    fleet_run: FleetRun,
) -> None:
    succeeded(fleet_run)
    run = fleet_run
    assert len(run.burst) == 400  # every one a 200 (answers() checked)
    assert {b["pid"] for b in run.burst} == run.pids and len(run.pids) == 4
    assert run.calls_after_burst == {"alpha": 1, "beta": 1}, run.stats
    # Every worker served each identity the one key STS issued for it.
    served: dict[tuple[int, str], set[str]] = {}
    for index, body in enumerate(run.burst):
        tenant = TENANTS[(index // 4) % 2]  # the order burst() spread them in
        served.setdefault((body["pid"], tenant), set()).add(body["access_key_id"])
    assert served == {
        (pid, tenant): set(run.keys_after_burst[tenant]) for pid in run.pids for tenant in TENANTS
    }
    assert run.keys_after_burst["alpha"] != run.keys_after_burst["beta"]
    # The refresh cycle: one more STS call per identity for the whole fleet, served by all.
    assert run.calls_after_refresh == {"alpha": 2, "beta": 2}
    for tenant in TENANTS:
        new = run.keys_after_refresh[tenant][1]
        assert run.refreshed[tenant] == {0: new, 1: new, 2: new, 3: new}


def test_no_secret_in_clear_in_the_store(fleet_run: FleetRun) -> None:
    succeeded(fleet_run)
    secrets = secrets_of(fleet_run.requests)
    # 2 identities x (cold + refresh) calls, each with 3 credential parts and a JWT.
    assert sum(label.endswith("SessionToken") for label in secrets) == 4
    assert sum(label.endswith(" JWT") for label in secrets) == 4
    blobs = fleet_run.stored
    assert in_clear(blobs, secrets) == []
    # Positive control: the scan reads real store content (value names are stored in clear).
    assert len(fleet_run.store_keys) == 2, list(blobs)
    for key in fleet_run.store_keys:
        assert any(key.encode() in blob for blob in blobs.values()), key
    # Those names are keyed digests of the identity keys (under the fleet's store key), and
    # neither the identity keys nor unkeyed digests of them appear anywhere: a digest of a
    # role ARN and subject can be reversed with a word list.
    cipher = StoreCipher([fleet_run.store_key])
    assert sorted(fleet_run.store_keys) == sorted(
        cipher.store_key(key) for key in fleet_run.identity_keys.values()
    )
    assert in_clear(blobs, unkeyed_names(fleet_run.identity_keys)) == []
    if fleet_run.backend == "redis":
        assert b"pmessage" in blobs["redis pub/sub messages"]  # notifications were seen
    # Nor in the workers' logs (role ARNs may be logged; credentials and tokens never).
    secret_parts = ("AccessKeyId", "SecretAccessKey", "SessionToken", "JWT")
    credentials_and_tokens = {
        label: value for label, value in secrets.items() if any(p in label for p in secret_parts)
    }
    assert in_clear({"worker logs": fleet_run.logs.encode()}, credentials_and_tokens) == []


# -- 2: kill -9 of the lease holder ------------------------------------------------------------


def live_leases(backend: str, store_url: str) -> int:
    """How many leases the store holds right now (raw access, not through stscreds)."""
    if backend == "redis":
        client = redis.Redis.from_url(store_url)
        try:
            return len(list(client.scan_iter(match=f"{PREFIX}l:*")))
        finally:
            client.close()
    with contextlib.closing(sqlite3.connect(store_url, timeout=5)) as conn:
        query = "SELECT count(*) FROM stscreds_leases WHERE expires_at > ?"
        return int(conn.execute(query, (time.time(),)).fetchone()[0])


@pytest.mark.parametrize("backend", ["redis", "sqlite"])
async def test_killed_lease_holder_does_not_block_the_fleet(
    make_fleet: Callable[..., Fleet],
    strict_sts: StrictSTS,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    backend: str,
) -> None:
    lease_ttl = 2.0
    if backend == "redis":
        store_url = str(request.getfixturevalue("redis_url"))
    else:
        store_url = str(tmp_path / "store.db")
    fleet = make_fleet(
        strict_sts, store=backend, store_url=store_url, env={"FLEET_LEASE_TTL": str(lease_ttl)}
    )
    await fleet.ready()
    holder, survivors = fleet[1], [fleet[0], fleet[2], fleet[3]]  # worker 0 is the issuer
    role_arn = arn("phoenix")
    try:
        strict_sts.hang = True
        doomed = asyncio.create_task(holder.get("/creds?tenant=phoenix", timeout=30))
        assert await asyncio.to_thread(strict_sts.wait_for_calls, 1, 15.0)
        assert live_leases(backend, store_url) == 1  # the holder's, taken before STS
        holder.kill(signal.SIGKILL)
        strict_sts.release()
        with pytest.raises((ConnectionError, OSError)):
            await doomed  # the client of the dead worker got no answer

        started = time.monotonic()
        bodies = answers(await burst(survivors, ["phoenix"], 30))
        elapsed = time.monotonic() - started
        assert elapsed < lease_ttl + 5.0, elapsed  # a hang bound, not a benchmark
        await settled(strict_sts)
        # The dead holder's call (answered into a closed socket) and exactly one takeover.
        assert strict_sts.calls_for(role_arn) == 2
        served = {b["access_key_id"] for b in bodies}
        assert len(served) == 1 and served <= set(issued_keys(strict_sts, role_arn))
        assert {b["pid"] for b in bodies} == {w.pid for w in survivors}
        (old,) = served

        # Later refreshes are not blocked either: one refresh call for the whole fleet.
        await advance_fleet_clocks(fleet, strict_sts, ADVISORY_OFFSET)
        new = await until_all_serve_new(survivors, "phoenix", old)
        await settled(strict_sts)
        assert strict_sts.calls_for(role_arn) == 3
        assert set(new.values()) == {issued_keys(strict_sts, role_arn)[-1]}
        assert live_leases(backend, store_url) == 0  # every lease released
    finally:
        strict_sts.release()


# -- 3: Redis goes down and comes back -----------------------------------------------------------


async def test_redis_outage_fails_open_and_sharing_resumes(
    make_fleet: Callable[..., Fleet],
    strict_sts: StrictSTS,
    redis_url: str,
    redis_server: RedisServer,
) -> None:
    cooldown = 1.0
    fleet = make_fleet(
        strict_sts, store="redis", store_url=redis_url, env={"FLEET_STORE_COOLDOWN": str(cooldown)}
    )
    strict_sts.delay = 0.1
    await fleet.ready()
    try:
        answers(await burst(fleet.workers, ["before"], 40))
        await settled(strict_sts)
        assert strict_sts.calls_for(arn("before")) == 1

        redis_server.stop()
        down_since = time.monotonic()
        rounds = 0
        # Keep firing, old and new identities, past a few breaker cooldowns.
        while rounds < 3 or time.monotonic() - down_since < 3 * cooldown:
            assert rounds < 30
            answers(await burst(fleet.workers, [f"down-{rounds}", "before"], 32))
            rounds += 1
        await settled(strict_sts)
        assert strict_sts.calls_for(arn("before")) == 1  # served from each worker's L1
        for n in range(rounds):
            # Each worker went to STS by itself (single-flight within the process).
            assert 1 <= strict_sts.calls_for(arn(f"down-{n}")) <= 4

        redis_server.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20.0
        attempts: list[int] = []
        while not attempts or attempts[-1] != 1:
            assert loop.time() < deadline, f"sharing did not resume: calls per attempt {attempts}"
            tenant = f"back-{len(attempts)}"
            answers(await burst(fleet.workers, [tenant], 40))
            await settled(strict_sts)
            attempts.append(strict_sts.calls_for(arn(tenant)))
    finally:
        redis_server.start()
    errors = outages = 0
    for worker in fleet:
        log, stats = worker.log(), (await worker.get("/stats")).json()["store"]
        # One warning for the outage, not one per failed call (the breaker retried every 1 s),
        # and no second one after the restart for a pooled connection Redis had dropped
        # (see test_a_redis_connection_dropped_while_idle_is_not_an_outage).
        assert stats["outages"] == 1, (stats, log)
        assert log.count("shared store unavailable") == 1, log
        assert log.count("shared store is back") == 1, log
        errors, outages = errors + stats["errors"], outages + stats["outages"]
    assert errors > outages


async def test_a_redis_connection_dropped_while_idle_is_not_an_outage(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis closing an idle pooled connection must not count as the store being down.

    Servers and proxies close idle connections (Redis ``timeout``, cloud proxies, NAT, a
    failover or restart). ``Redis.from_url`` gives its connections no retry (unlike
    ``Redis(host=...)``), so until RedisStore asked for one retry on ConnectionError, the next
    command on the dead connection failed, the tier opened its breaker (5 s by default), went
    to STS alone and logged an outage while Redis was fine.
    """
    caplog.set_level(logging.INFO, logger="stscreds")
    clock = FakeClock(time.time())
    store = RedisStore(redis_url, encryption_keys=[generate_key()])
    tier = make_tier(store, clock, breaker_cooldown=60.0)
    exchange = Exchange(clock)
    raw = AsyncRedis.from_url(redis_url)
    try:
        await tier.obtain(KEY, exchange, newer_than=None)  # pools a connection
        assert await raw.client_kill_filter(_type="normal", skipme=True) >= 1
        await tier.obtain(OTHER_KEY, exchange, newer_than=None)
        assert (tier.stats.errors, tier.stats.outages, tier.stats.leases) == (0, 0, 2)
        # Shared with the fleet, under its keyed store name.
        assert await raw.exists(f"{PREFIX}v:{value_name(store, OTHER_KEY)}")
        assert "unavailable" not in caplog.text
    finally:
        await raw.aclose()
        await store.aclose()


# -- 4: tampered and swapped values in Redis ------------------------------------------------------


@pytest.fixture
async def redis_brokers(
    strict_sts: StrictSTS, redis_url: str
) -> AsyncIterator[Callable[..., CredentialBroker]]:
    """Fresh brokers (as fresh worker processes would be) sharing one RedisStore config.

    ``make(keys=[...])`` gives a broker other store encryption keys (a rotation)."""
    signing_key, store_key = SigningKey.generate("ES256"), generate_key()
    brokers: list[CredentialBroker] = []

    def make(keys: Sequence[str] | None = None) -> CredentialBroker:
        broker = CredentialBroker(
            issuer="http://127.0.0.1:9/fleet",
            signing_keys=[signing_key],
            sts_endpoint_url=strict_sts.url,
            store=RedisStore(redis_url, encryption_keys=list(keys or [store_key])),
            store_timeout=2.0,
            exchange_deadline=5.0,
        )
        brokers.append(broker)
        return broker

    strict_sts.configure(issuer="http://127.0.0.1:9/fleet", jwks=lambda: brokers[0].jwks())
    yield make
    for broker in brokers:
        await broker.aclose()


def store_name(broker: CredentialBroker, role: Role) -> str:
    """The keyed name under which ``broker``'s store keeps ``role``'s credentials."""
    assert broker._shared is not None
    return str(broker._shared.store.cipher.store_key(broker.identity_key(role)))


async def test_tampered_or_swapped_redis_values_are_refetched_never_served(
    redis_brokers: Callable[..., CredentialBroker], strict_sts: StrictSTS, redis_url: str
) -> None:
    alice = Role(arn("tenant-a"), subject="alice")
    bob = Role(arn("tenant-b"), subject="bob")
    writer = redis_brokers()
    first = {alice: await writer.get(alice), bob: await writer.get(bob)}
    assert strict_sts.calls == 2
    raw = AsyncRedis.from_url(redis_url)
    try:
        names = {role: f"{PREFIX}v:{store_name(writer, role)}" for role in (alice, bob)}
        stored = sorted([k.decode() async for k in raw.scan_iter(match=f"{PREFIX}v:*")])
        assert stored == sorted(names.values())

        # One flipped bit anywhere (format byte, key id, nonce, ciphertext, tag) is refused.
        # The reader is a fresh broker; before each round its L1 is emptied, so it starts
        # cold, like a new worker process (a new broker per round costs a botocore client).
        reader = redis_brokers()
        stats = reader.store_stats
        assert stats is not None
        served: list[str] = []
        # Positions relative to each round's value: lengths vary (the expiry, the offset).
        for where in (0, 1, 6, 0.5, -1):
            reader.invalidate(alice)
            tampered = bytearray(await raw.get(names[alice]))
            position = int(len(tampered) * where) if isinstance(where, float) else where
            tampered[position] ^= 0x01
            assert await raw.set(names[alice], bytes(tampered), keepttl=True)
            calls, rejected = strict_sts.calls_for(alice.arn), stats.rejected
            got = await reader.get(alice)
            assert strict_sts.calls_for(alice.arn) == calls + 1, position
            assert stats.rejected > rejected, position
            assert got.access_key_id == issued_keys(strict_sts, alice.arn)[-1]
            served.append(got.access_key_id)
        assert stats.hits == 0
        assert first[alice].access_key_id not in served and len(set(served)) == 5
        # The last refetch replaced the tampered value: the next cold reader shares it. A new
        # broker, not `reader` after invalidate(): invalidating marks the dropped key as
        # rejected, and that broker never takes it from the store again.
        fresh = redis_brokers()
        assert (await fresh.get(alice)).access_key_id == served[-1]
        assert fresh.store_stats is not None and fresh.store_stats.hits == 1
        assert strict_sts.calls_for(alice.arn) == 6

        # Swap the two identities' values between their keys: neither is served to the other.
        a_value, b_value = await raw.get(names[alice]), await raw.get(names[bob])
        assert await raw.set(names[alice], b_value, keepttl=True)
        assert await raw.set(names[bob], a_value, keepttl=True)
        before = {role: strict_sts.calls_for(role.arn) for role in (alice, bob)}
        reader = redis_brokers()
        got = {alice: await reader.get(alice), bob: await reader.get(bob)}
        for role, other in ((alice, bob), (bob, alice)):
            assert strict_sts.calls_for(role.arn) == before[role] + 1
            assert got[role].access_key_id == issued_keys(strict_sts, role.arn)[-1]
            assert got[role].access_key_id not in issued_keys(strict_sts, other.arn)
            claims = strict_sts.requests_for(role.arn)[-1].claims
            assert claims is not None and claims["sub"] == role.subject
        assert reader.store_stats is not None and reader.store_stats.rejected >= 2
        assert reader.store_stats.hits == 0
    finally:
        await raw.aclose()


async def redis_listing(redis_url: str) -> list[str]:
    """``KEYS *`` on the server: every key name a store left there, as anyone listing sees."""
    raw = AsyncRedis.from_url(redis_url)
    try:
        return sorted(k.decode() for k in await raw.keys("*"))
    finally:
        await raw.aclose()


async def test_redis_key_names_reveal_no_identity(
    redis_brokers: Callable[..., CredentialBroker], strict_sts: StrictSTS, redis_url: str
) -> None:
    alice = Role(arn("tenant-a"), subject="alice")
    bob = Role(arn("tenant-b"), subject="bob")
    strict_sts.reject_roles.add(bob.arn)
    writer, reader = redis_brokers(), redis_brokers()
    got = await writer.get(alice)
    assert (await reader.get(alice)).access_key_id == got.access_key_id  # shared
    with pytest.raises(CredentialsRejected):
        await writer.get(bob)  # leaves a failure marker for the fleet (1 s at least)
    listing = await redis_listing(redis_url)
    assert strict_sts.calls_for(alice.arn) == 1 and strict_sts.calls_for(bob.arn) == 1
    assert writer._shared is not None
    cipher = writer._shared.store.cipher
    keys = {"alice": writer.identity_key(alice), "bob": writer.identity_key(bob)}
    # Alice's value and Bob's failure marker, under keyed names; the leases were released.
    assert listing == sorted(
        [
            f"{PREFIX}v:{cipher.store_key(keys['alice'])}",
            f"{PREFIX}v:{cipher.store_key('f|' + keys['bob'])}",
        ]
    )
    dump = {"KEYS *": "\n".join(listing).encode()}
    assert in_clear(dump, unkeyed_names(keys)) == []
    for needle in (alice.arn, bob.arn, "tenant-a", "alice", "bob"):
        assert needle not in "\n".join(listing)


async def test_stores_with_other_encryption_keys_name_an_identity_differently(
    redis_brokers: Callable[..., CredentialBroker], strict_sts: StrictSTS, redis_url: str
) -> None:
    alice = Role(arn("tenant-a"), subject="alice")
    one, two = redis_brokers(keys=[generate_key()]), redis_brokers(keys=[generate_key()])
    assert one.identity_key(alice) == two.identity_key(alice)  # one identity...
    assert store_name(one, alice) != store_name(two, alice)  # ...two names
    first, second = await one.get(alice), await two.get(alice)
    # Neither could open the other's value anyway: each exchanged for itself.
    assert strict_sts.calls_for(alice.arn) == 2
    assert first.access_key_id != second.access_key_id
    assert await redis_listing(redis_url) == sorted(
        f"{PREFIX}v:{store_name(broker, alice)}" for broker in (one, two)
    )


async def test_a_key_rotation_renames_values_once_and_both_rings_get_credentials(
    redis_brokers: Callable[..., CredentialBroker], strict_sts: StrictSTS, redis_url: str
) -> None:
    alice = Role(arn("tenant-a"), subject="alice")
    old, new = generate_key(), generate_key()
    before = redis_brokers(keys=[old])  # a worker not rotated yet
    during = redis_brokers(keys=[new, old])  # a worker rotated: new key first, old kept
    identity = before.identity_key(alice)
    assert store_name(during, alice) == StoreCipher([new]).store_key(identity)
    assert store_name(before, alice) == StoreCipher([old]).store_key(identity)
    assert store_name(during, alice) != store_name(before, alice)

    got_old = await before.get(alice)
    got_new = await during.get(alice)  # a miss under the new name: one extra exchange
    assert strict_sts.calls_for(alice.arn) == 2
    assert [got_old.access_key_id, got_new.access_key_id] == issued_keys(strict_sts, alice.arn)
    assert await redis_listing(redis_url) == sorted(
        f"{PREFIX}v:{store_name(broker, alice)}" for broker in (before, during)
    )
    # From then on each ring shares its own value, without another exchange; once the old
    # key is dropped, the new name still serves (its value was sealed with the new key).
    for keys, expected in (([old], got_old), ([new, old], got_new), ([new], got_new)):
        cold = redis_brokers(keys=keys)
        assert (await cold.get(alice)).access_key_id == expected.access_key_id, keys
        assert cold.store_stats is not None and cold.store_stats.hits == 1, keys
    assert strict_sts.calls_for(alice.arn) == 2


# -- in process: SharedTier with a MemoryStore --------------------------------------------------

T0 = 1_800_000_000.0
KEY = "a" * 64
OTHER_KEY = "b" * 64


class FakeClock:
    """Time that moves only when told to (both the tier's wall clock and a store's clock)."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def credentials(expires_at: float, name: str = "A") -> Credentials:
    return Credentials(
        access_key_id=f"ASIA{name:0>16}",
        secret_access_key=f"secret-{name}",
        session_token=f"token-{name}",
        expiration=datetime.fromtimestamp(expires_at, timezone.utc),
    )


class Exchange:
    """A fake STS: counts calls, answers credentials expiring ``lifetime`` after ``clock``."""

    def __init__(self, clock: FakeClock, lifetime: float = 3600.0) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.calls = 0
        self.gate: asyncio.Event | None = None
        self.error: BaseException | None = None

    async def __call__(self) -> tuple[Credentials, float]:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return credentials(self.clock.time() + self.lifetime, f"X{self.calls}"), self.lifetime


def value_name(store: Any, key: str) -> str:
    """The store key under which the tier keeps the value (and lease) of identity ``key``."""
    return str(store.cipher.store_key(key))


def marker_name(store: Any, key: str) -> str:
    """The store key of identity ``key``'s failure marker."""
    return str(store.cipher.store_key(f"f|{key}"))


def plant(store: MemoryStore, key: str, creds: Credentials) -> None:
    """Put a value the way a worker would: sealed under identity ``key``'s store name."""
    name = value_name(store, key)
    value = store.cipher.seal(name, _encode(key, creds, 3600.0))
    store._values[name] = (value, float("inf"))


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Let real I/O and tasks run until ``predicate()`` (never used to let fake time pass)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def make_tier(
    store: Any, clock: FakeClock, *, sts_clock: StsClock | None = None, **kwargs: Any
) -> SharedTier:
    """A tier on ``clock`` (as STS's clock, offset unknown unless ``sts_clock`` is given)."""
    return SharedTier(store, sts_clock=sts_clock or StsClock(clock), **kwargs)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> MemoryStore:
    return MemoryStore(encryption_keys=[generate_key()], clock=clock)


async def test_tiers_sharing_a_store_make_one_exchange(
    store: MemoryStore, clock: FakeClock
) -> None:
    exchange = Exchange(clock)
    exchange.gate = asyncio.Event()
    tiers = [make_tier(store, clock, wait_slice=30.0) for _ in range(8)]
    tasks = [asyncio.create_task(t.obtain(KEY, exchange, newer_than=None)) for t in tiers]
    await eventually(lambda: sum(t.stats.waits for t in tiers) == 7)
    exchange.gate.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks), 5.0)
    assert exchange.calls == 1
    assert {c.access_key_id for c, _ in results} == {"ASIA00000000000000X1"}
    assert {lifetime for _, lifetime in results} == {3600.0}
    assert sum(t.stats.leases for t in tiers) == 1
    assert sum(t.stats.hits for t in tiers) == 7  # woken by the notify, not by the 30 s slice
    assert store._leases == {}


async def test_dead_holders_lease_is_taken_over_once_it_expires(
    store: MemoryStore, clock: FakeClock
) -> None:
    assert await store.acquire(value_name(store, KEY), "killed-worker", 10.0)
    # Patient enough that only the lease's expiry, not giving up, can end the wait.
    tier = make_tier(store, clock, lease_ttl=30.0, lease_wait=30.0, wait_slice=0.02)
    exchange = Exchange(clock)
    task = asyncio.create_task(tier.obtain(KEY, exchange, newer_than=None))
    await eventually(lambda: tier.stats.waits >= 2)
    assert exchange.calls == 0 and not task.done()  # the lease is still live: it waits

    clock.advance(10.0)  # the dead worker's lease runs out; nobody notifies
    got, _ = await asyncio.wait_for(task, 5.0)
    assert exchange.calls == 1 and tier.stats.leases == 1
    assert store._leases == {}  # released after the put
    fresh = make_tier(store, clock)
    assert (await fresh.obtain(KEY, exchange, newer_than=None))[0] == got
    assert exchange.calls == 1


async def test_a_holder_still_exchanging_keeps_its_lease(clock: FakeClock) -> None:
    """A lease must not run out under a live holder whose exchange is merely slow.

    ``lease_ttl`` is public and may be set below the exchange time (for a fast take-over
    after a crash): the holder extends its lease every ``lease_ttl / 3`` while it exchanges
    (a dead holder stops extending, so its lease still runs out). Real time here: the lease
    is held in a MemoryStore on the monotonic clock, the heartbeat runs on the loop.
    """
    store = MemoryStore(encryption_keys=[generate_key()])
    lease_ttl = 0.5
    holder, waiter = (
        make_tier(store, clock, lease_ttl=lease_ttl, lease_wait=4 * lease_ttl, wait_slice=0.02)
        for _ in "ab"
    )
    exchange = Exchange(clock)
    exchange.gate = asyncio.Event()
    holding = asyncio.create_task(holder.obtain(KEY, exchange, newer_than=None))
    await eventually(lambda: exchange.calls == 1)
    waiting = asyncio.create_task(waiter.obtain(KEY, exchange, newer_than=None))
    try:
        # The exchange outlasts the lease TTL, but not the waiter's patience (lease_wait,
        # after which it would go to STS alone, lease or not).
        await asyncio.wait({waiting}, timeout=1.5 * lease_ttl)
        assert exchange.calls == 1, "a waiter took the lease of a live holder and exchanged"
    finally:
        exchange.gate.set()
        results = await asyncio.wait_for(asyncio.gather(holding, waiting), 5.0)
    assert results[0] == results[1]


async def test_failed_exchange_wakes_the_waiters_and_frees_the_lease(
    store: MemoryStore, clock: FakeClock
) -> None:
    holder_exchange, waiter_exchange = Exchange(clock), Exchange(clock)
    holder_exchange.gate = asyncio.Event()
    holder_exchange.error = RuntimeError("STS said no")
    holder, waiter = make_tier(store, clock, wait_slice=30.0), make_tier(store, clock)
    waiter.wait_slice = 30.0
    failing = asyncio.create_task(holder.obtain(KEY, holder_exchange, newer_than=None))
    await eventually(lambda: holder_exchange.calls == 1)
    waiting = asyncio.create_task(waiter.obtain(KEY, waiter_exchange, newer_than=None))
    await eventually(lambda: waiter.stats.waits == 1)
    holder_exchange.gate.set()
    with pytest.raises(RuntimeError):
        await failing
    # Woken at once (its slice is 30 s), it takes the lease and exchanges itself.
    got, _ = await asyncio.wait_for(waiting, 5.0)
    assert waiter_exchange.calls == 1 and waiter.stats.leases == 1
    assert got.access_key_id == "ASIA00000000000000X1"


async def test_refresh_never_accepts_credentials_that_are_not_newer(
    store: MemoryStore, clock: FakeClock
) -> None:
    current = T0 + 600.0  # what the caller holds: it wants something expiring later
    plant(store, KEY, credentials(current, "OLD"))
    tier = make_tier(store, clock, wait_slice=30.0)
    exchange = Exchange(clock)

    # The store's value is the one the caller already has: exchange.
    got, _ = await tier.obtain(KEY, exchange, newer_than=current)
    assert exchange.calls == 1 and got.expiration.timestamp() == T0 + 3600.0
    # A cold reader (newer_than=None) or an older holder takes what is stored.
    got, _ = await tier.obtain(KEY, exchange, newer_than=current)
    assert exchange.calls == 1 and got.access_key_id == "ASIA00000000000000X1"
    # Exactly as new as the caller's is not newer.
    got, _ = await tier.obtain(KEY, exchange, newer_than=T0 + 3600.0)
    assert exchange.calls == 2

    # While another worker holds the lease, a put that is not newer does not end the wait.
    other = "c" * 64
    plant(store, other, credentials(current, "OLD"))
    assert await store.acquire(value_name(store, other), "other-worker", 60.0)
    waiting = asyncio.create_task(tier.obtain(other, exchange, newer_than=current))
    await eventually(lambda: tier.stats.waits == 1)
    plant(store, other, credentials(current - 100.0, "OLDER"))
    await store.notify(value_name(store, other))
    await eventually(lambda: tier.stats.waits == 2)
    assert not waiting.done()
    plant(store, other, credentials(current + 1.0, "NEWER"))
    await store.notify(value_name(store, other))
    got, _ = await asyncio.wait_for(waiting, 5.0)
    assert got.access_key_id == "ASIA00000000000NEWER"
    assert exchange.calls == 2


@pytest.mark.parametrize(("left", "served"), [(30, False), (60, False), (65, False), (66, True)])
async def test_values_with_65s_or_less_left_are_not_served(
    store: MemoryStore, clock: FakeClock, left: float, served: bool
) -> None:
    plant(store, KEY, credentials(T0 + left, "STORED"))
    exchange = Exchange(clock)
    got, _ = await make_tier(store, clock).obtain(KEY, exchange, newer_than=None)
    assert (got.access_key_id == "ASIA0000000000STORED") is served
    assert exchange.calls == (0 if served else 1)


async def test_values_that_do_not_open_for_this_key_are_rejected(
    store: MemoryStore, clock: FakeClock
) -> None:
    planted = credentials(T0 + 3600.0, "PLANTED")
    foreign = MemoryStore(encryption_keys=[generate_key()])
    here, there = value_name(store, KEY), value_name(store, OTHER_KEY)

    def encoded(key: str) -> bytes:
        return _encode(key, planted, 1.0)

    cases: dict[str, Any] = {
        # Sealed for another key and copied here: the associated data does not match.
        "copied from another key": store.cipher.seal(there, encoded(OTHER_KEY)),
        # Sealed for this key but naming another one inside.
        "names another key": store.cipher.seal(here, encoded(OTHER_KEY)),
        # Sealed under the identity key itself (not its store name), as before keyed names.
        "sealed for the identity key": store.cipher.seal(KEY, encoded(KEY)),
        # Sealed under this identity's failure marker name and copied to its value name.
        "sealed for the marker name": store.cipher.seal(marker_name(store, KEY), encoded(KEY)),
        "another encryption key": foreign.cipher.seal(here, encoded(KEY)),
        "plaintext": b"\x00" + encoded(KEY),
        "garbage": b"\x01" + bytes(64),
        "empty": b"",
        "not bytes": encoded(KEY).decode(),
        "not JSON": store.cipher.seal(here, b"{"),
        "missing fields": store.cipher.seal(here, json.dumps({"k": KEY}).encode()),
        "empty secret": store.cipher.seal(here, encoded(KEY).replace(b'"secret-PLANTED"', b'""')),
    }
    assert store.cipher.open(here, cases["copied from another key"]) is None
    assert store.cipher.open(there, cases["copied from another key"]) == encoded(OTHER_KEY)
    for name, value in cases.items():
        store._values[here] = (value, float("inf"))
        tier = make_tier(store, clock)
        exchange = Exchange(clock)
        got, _ = await tier.obtain(KEY, exchange, newer_than=None)
        assert got.access_key_id != planted.access_key_id, name
        # Rejected on the first read and on the re-read under the lease.
        assert exchange.calls == 1 and tier.stats.rejected == 2, name
        assert tier.stats.errors == 0, name


class FlakyStore(MemoryStore):
    """A MemoryStore whose every operation raises while ``down`` (and counts the attempts)."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(encryption_keys=[generate_key()], clock=clock)
        self.down = False
        self.attempts = 0

    def _check(self) -> None:
        self.attempts += 1
        if self.down:
            # A backend's message may carry a URL with a password: it must not be logged.
            raise ConnectionError("redis://:hunter2@10.0.0.1:6379 refused")

    async def get(self, key: str) -> bytes | None:
        self._check()
        return await super().get(key)

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        self._check()
        await super().put(key, value, ttl)

    async def acquire(self, key: str, owner: str, ttl: float) -> bool:
        self._check()
        return await super().acquire(key, owner, ttl)

    async def release(self, key: str, owner: str) -> bool:
        self._check()
        return await super().release(key, owner)

    async def notify(self, key: str) -> None:
        self._check()
        await super().notify(key)

    async def wait(self, key: str, timeout: float) -> None:
        self._check()
        await super().wait(key, timeout)


def store_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "stscreds"]


async def test_an_outage_is_logged_once_and_the_recovery_once(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="stscreds")
    store = FlakyStore(clock)
    # A breaker that closes at once, so that every call below really tries the store.
    tier = make_tier(store, clock, breaker_cooldown=1e-9)
    exchange = Exchange(clock)

    async def obtain_all(keys: Sequence[str]) -> None:
        for key in keys:
            await tier.obtain(key, exchange, newer_than=None)

    store.down = True
    await obtain_all([f"{n:064x}" for n in range(20)])
    assert exchange.calls == 20  # failed open: every caller got credentials
    assert store.attempts >= 20 and tier.stats.errors >= 20
    logs = store_logs(caplog)
    assert [m for m in logs if "unavailable" in m] == [logs[0]] and len(logs) == 1
    assert "ConnectionError" in logs[0] and "hunter2" not in caplog.text
    assert tier.stats.outages == 1

    store.down = False
    await obtain_all([f"{n:064x}" for n in range(20, 30)])
    assert store_logs(caplog)[1:] == ["shared store is back"]
    assert tier.stats.outages == 1

    store.down = True  # a second outage is a second warning
    await obtain_all([f"{n:064x}" for n in range(30, 35)])
    assert len(store_logs(caplog)) == 3 and tier.stats.outages == 2


async def test_open_breaker_keeps_the_store_out_of_the_request_path(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = FlakyStore(clock)
    tier = make_tier(store, clock, breaker_cooldown=60.0)
    exchange = Exchange(clock)
    store.down = True
    for n in range(10):
        await tier.obtain(f"{n:064x}", exchange, newer_than=None)
    assert store.attempts == 1 and tier.stats.errors == 1  # then skipped for the cooldown
    assert exchange.calls == 10
    assert len(store_logs(caplog)) == 1


async def test_slow_store_costs_one_timeout_then_is_skipped(clock: FakeClock) -> None:
    class HangingStore(MemoryStore):
        async def get(self, key: str) -> bytes | None:
            await asyncio.Event().wait()
            return None

    tier = make_tier(HangingStore(encryption_keys=[generate_key()]), clock, op_timeout=0.05)
    exchange = Exchange(clock)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for n in range(5):
        await asyncio.wait_for(tier.obtain(f"{n:064x}", exchange, newer_than=None), 5.0)
    # The first call may take the first-contact allowance (1 s), later ones are skipped.
    assert loop.time() - started < 2.0
    assert exchange.calls == 5 and tier.stats.errors == 1


async def test_first_contact_may_take_longer_than_the_op_timeout(clock: FakeClock) -> None:
    # A cold start opens connections while a burst makes the loop lag: the first operations
    # get 1 s, so a store that is merely slow to connect does not trip the breaker.
    class SlowToConnect(MemoryStore):
        connected = False

        async def get(self, key: str) -> bytes | None:
            if not self.connected:
                await asyncio.sleep(0.3)  # stands for a connection set-up, not for moving time
                self.connected = True
            return await super().get(key)

    backend = SlowToConnect(encryption_keys=[generate_key()], clock=clock)
    tier = make_tier(backend, clock, op_timeout=0.05)
    exchange = Exchange(clock)
    await tier.obtain(f"{1:064x}", exchange, newer_than=None)
    assert tier.stats.errors == 0 and exchange.calls == 1

    class Hanging(MemoryStore):
        async def get(self, key: str) -> bytes | None:
            await asyncio.Event().wait()
            return None

    # Once contacted, the op timeout applies: a later hang costs about 0.05 s, not 1 s.
    tier.store = Hanging(encryption_keys=[generate_key()], clock=clock)
    tier.store.cipher = backend.cipher
    loop = asyncio.get_running_loop()
    started = loop.time()
    await tier.obtain(f"{2:064x}", exchange, newer_than=None)
    assert loop.time() - started < 0.9
    assert tier.stats.errors == 1


class Flaky(MemoryStore):
    """A MemoryStore whose chosen operation misbehaves once: it fails, or answers late."""

    def __init__(self, *, fail: str = "", late: str = "", delay: float = 0.0) -> None:
        super().__init__(encryption_keys=[generate_key()])
        self.fail, self.late, self.delay = fail, late, delay
        self.calls: dict[str, int] = {}

    async def _once(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if name == self.fail and self.calls[name] == 1:
            raise ConnectionError("blip")

    async def acquire(self, key: str, owner: str, ttl: float) -> bool:
        await self._once("acquire")
        granted = await super().acquire(key, owner, ttl)
        if self.late == "acquire" and self.calls["acquire"] == 1:
            await asyncio.sleep(self.delay)  # the store granted it; the reply is late
        return granted

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        await self._once("put")
        await super().put(key, value, ttl)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (STSUnavailable("STS did not answer", code=None), STSUnavailable),
        (STSUnavailable("Rate exceeded", code="Throttling"), STSUnavailable),
        (CredentialsRejected("Not authorized", code="AccessDenied"), CredentialsRejected),
    ],
)
async def test_waiters_take_the_holders_failure_instead_of_repeating_it(
    store: MemoryStore, clock: FakeClock, error: Exception, kind: type[Exception]
) -> None:
    # Without this, during an STS outage each worker takes the lease in turn and waits out
    # its own deadline: N workers, N serial exchanges, the last request waiting N deadlines.
    holder_exchange = Exchange(clock)
    holder_exchange.gate, holder_exchange.error = asyncio.Event(), error
    holder = make_tier(store, clock, wait_slice=30.0)
    waiters = [make_tier(store, clock, wait_slice=30.0) for _ in range(3)]
    waiter_exchange = Exchange(clock)
    failing = asyncio.create_task(holder.obtain(KEY, holder_exchange, newer_than=None))
    await eventually(lambda: holder_exchange.calls == 1)
    waiting = [
        asyncio.create_task(w.obtain(KEY, waiter_exchange, newer_than=None)) for w in waiters
    ]
    await eventually(lambda: all(w.stats.waits == 1 for w in waiters))
    holder_exchange.gate.set()
    results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 5.0)
    with pytest.raises(kind):
        await failing
    assert waiter_exchange.calls == 0
    assert all(type(r) is kind and r.code == error.code for r in results)  # type: ignore[attr-defined]
    # The holder's message, and when a retry may succeed: when the marker runs out.
    assert all(str(r) == str(error) for r in results)
    assert all(0 < r.retry_after <= 5.0 for r in results)  # type: ignore[attr-defined]
    # Remembered only briefly: once it has expired, a new caller exchanges again.
    clock.advance(10.0)
    got, _ = await make_tier(store, clock).obtain(KEY, waiter_exchange, newer_than=None)
    assert waiter_exchange.calls == 1 and got.access_key_id == "ASIA00000000000000X1"


async def test_the_failure_marker_reveals_nothing_and_is_bound_to_its_identity(
    store: MemoryStore, clock: FakeClock
) -> None:
    exchange = Exchange(clock)
    exchange.error = CredentialsRejected("Not authorized for tenant-acme", code="AccessDenied")
    with pytest.raises(CredentialsRejected):
        await make_tier(store, clock).obtain(KEY, exchange, newer_than=None)
    [(marker_key, (value, _))] = list(store._values.items())  # no value was put
    assert marker_key == marker_name(store, KEY)
    assert re.fullmatch(r"[0-9a-f]{64}", marker_key)
    assert marker_key not in (KEY, value_name(store, KEY))
    assert b"tenant-acme" not in value and b"AccessDenied" not in value
    plaintext = store.cipher.open(marker_key, value)
    assert plaintext is not None
    holder = json.loads(plaintext)["h"]
    tier = make_tier(store, clock)
    # Positive control: where it was written, for the holder that wrote it, it is believed.
    with pytest.raises(CredentialsRejected, match="tenant-acme"):
        await tier._raise_remembered_failure(KEY, marker_key, holder)
    # Copied under another identity's marker key, it does not open there.
    other = "b" * 64
    store._values[marker_name(store, other)] = store._values[marker_key]
    # No error: the marker is not for `other`.
    await tier._raise_remembered_failure(other, marker_name(store, other), holder)


async def test_a_late_acquire_reply_gives_the_lease_back(clock: FakeClock) -> None:
    # The store granted worker A's lease but answered after A's timeout: A goes to STS on its
    # own; without giving the lease back, worker B would wait out lease_wait (30 s here).
    store = Flaky(late="acquire", delay=0.3)
    options: dict[str, Any] = {"op_timeout": 0.05, "lease_ttl": 30.0, "lease_wait": 30.0}
    a = make_tier(store, clock, wait_slice=0.05, **options)
    b = make_tier(store, clock, wait_slice=0.05, **options)
    for tier in (a, b):
        tier._contacted = True  # past the first-contact allowance
    exchange = Exchange(clock)
    await a.obtain(KEY, exchange, newer_than=None)
    assert a.stats.errors == 1  # the late acquire counted as a failure
    await eventually(lambda: store._leases == {})  # given back in the background
    started = asyncio.get_running_loop().time()
    # The same identity: A's put was skipped (its breaker is open), so B needs the lease.
    await b.obtain(KEY, exchange, newer_than=None)
    assert asyncio.get_running_loop().time() - started < 5.0
    assert b.stats.leases == 1 and b.stats.waits == 0 and exchange.calls == 2


async def test_a_failed_put_still_releases_and_wakes_the_waiters(clock: FakeClock) -> None:
    # The holder's put fails once and opens its breaker; release and notify must still reach
    # the store, or the waiter sleeps out its slice (30 s) and then the lease_ttl.
    store = Flaky(fail="put")
    holder = make_tier(store, clock, wait_slice=30.0, lease_ttl=30.0)
    waiter = make_tier(store, clock, wait_slice=30.0, lease_ttl=30.0)
    exchange = Exchange(clock)
    exchange.gate = asyncio.Event()
    holding = asyncio.create_task(holder.obtain(KEY, exchange, newer_than=None))
    await eventually(lambda: exchange.calls == 1)
    waiting = asyncio.create_task(waiter.obtain(KEY, exchange, newer_than=None))
    await eventually(lambda: waiter.stats.waits == 1)
    exchange.gate.set()
    await asyncio.wait_for(holding, 5.0)
    assert holder.stats.errors == 1 and store._leases == {}
    await asyncio.wait_for(waiting, 5.0)  # woken, took the free lease, exchanged itself
    assert exchange.calls == 2


async def test_a_half_open_breaker_lets_one_call_probe_the_store(clock: FakeClock) -> None:
    class Hanging(MemoryStore):
        gets = 0

        async def get(self, key: str) -> bytes | None:
            Hanging.gets += 1
            await asyncio.Event().wait()
            return None

    tier = make_tier(
        Hanging(encryption_keys=[generate_key()]), clock, op_timeout=0.05, breaker_cooldown=0.05
    )
    tier._contacted = True
    assert await tier._read(KEY, value_name(tier.store, KEY), None, None) is None  # fails, opens
    assert Hanging.gets == 1
    loop = asyncio.get_running_loop()
    reopens = tier._open_until
    await eventually(lambda: loop.time() >= reopens)
    keys = [f"{n:064x}" for n in range(20)]
    await asyncio.gather(*(tier._read(k, value_name(tier.store, k), None, None) for k in keys))
    assert Hanging.gets == 2  # one probe, not twenty timeouts


# -- squatted leases, replayed and foreign failure markers ----------------------------------------

# Real time: a cold miss really waits (on the loop) for lease_wait; kept short.
LEASE_WAIT = 0.5
# What the loop and a real store's round trips may add to it.
SLACK = 1.0


@pytest.fixture(params=["memory", "redis"])
async def real_store(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[Any]:
    """A MemoryStore (on the fake clock) or a RedisStore on the real redis-server."""
    if request.param == "memory":
        yield MemoryStore(encryption_keys=[generate_key()], clock=clock)
        return
    store = RedisStore(request.getfixturevalue("redis_url"), encryption_keys=[generate_key()])
    try:
        yield store
    finally:
        await store.aclose()


async def timed(tier: SharedTier, exchange: Exchange) -> tuple[Credentials, float]:
    """A cold miss for KEY: the credentials it got and how long it took (loop time)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    got, _ = await asyncio.wait_for(tier.obtain(KEY, exchange, newer_than=None), 10.0)
    return got, loop.time() - started


async def test_a_squatted_lease_costs_a_cold_miss_at_most_lease_wait(
    real_store: Any, clock: FakeClock
) -> None:
    # A worker that took the lease and then hung, or anyone who can write to the store, holds
    # it for an hour: a cold miss waits lease_wait for it, then exchanges by itself.
    name = value_name(real_store, KEY)
    assert await real_store.acquire(name, "squatter", 3600.0)
    tier = make_tier(real_store, clock, lease_ttl=30.0, lease_wait=LEASE_WAIT, wait_slice=0.1)
    exchange = Exchange(clock)
    got, elapsed = await timed(tier, exchange)
    assert exchange.calls == 1 and got.access_key_id == "ASIA00000000000000X1"
    assert tier.stats.waits >= 1 and tier.stats.leases == 0  # it waited, never held the lease
    assert LEASE_WAIT - 0.05 <= elapsed <= LEASE_WAIT + SLACK, elapsed
    assert await real_store.holder(name) == "squatter"  # not taken from its holder
    # What it got was shared all the same: the next cold worker takes it, no exchange.
    again, _ = await make_tier(real_store, clock).obtain(KEY, exchange, newer_than=None)
    assert again == got and exchange.calls == 1


async def test_a_replayed_failure_marker_under_a_squatted_lease_is_not_believed(
    real_store: Any, clock: FakeClock
) -> None:
    # A real marker, left by a holder whose exchange was refused.
    refused = Exchange(clock)
    refused.error = CredentialsRejected("Not authorized", code="AccessDenied")
    with pytest.raises(CredentialsRejected):
        await make_tier(real_store, clock).obtain(KEY, refused, newer_than=None)
    marker = marker_name(real_store, KEY)
    captured = await real_store.get(marker)
    assert isinstance(captured, bytes)
    plaintext = real_store.cipher.open(marker, captured)
    assert plaintext is not None
    holder = json.loads(plaintext)["h"]
    # Positive control: fresh, and for its own holder, it is believed.
    with pytest.raises(CredentialsRejected):
        await make_tier(real_store, clock)._raise_remembered_failure(KEY, marker, holder)

    # A minute later on STS's clock the same bytes are put back for an hour, and the lease is
    # squatted under the very holder id they name (both readable to whoever lists the store).
    clock.advance(60.0)
    await real_store.put(marker, captured, 3600.0)
    assert await real_store.acquire(value_name(real_store, KEY), holder, 3600.0)

    tier = make_tier(real_store, clock, lease_ttl=30.0, lease_wait=LEASE_WAIT, wait_slice=0.1)
    exchange = Exchange(clock)
    got, elapsed = await timed(tier, exchange)  # not the old CredentialsRejected
    assert exchange.calls == 1 and got.access_key_id == "ASIA00000000000000X1"
    assert refused.calls == 1  # and nobody repeated the refused exchange
    assert tier.stats.waits >= 1
    assert elapsed <= LEASE_WAIT + SLACK, elapsed


async def test_a_recent_marker_counts_only_from_the_holder_waited_for(
    store: MemoryStore, clock: FakeClock
) -> None:
    # Worker X's exchange is refused: it leaves a marker (recent: no time passes here) and
    # releases the lease. Worker Y takes the lease next; a waiter waits for Y.
    refused = Exchange(clock)
    refused.error = CredentialsRejected("Not authorized", code="AccessDenied")
    with pytest.raises(CredentialsRejected):
        await make_tier(store, clock).obtain(KEY, refused, newer_than=None)
    assert await store.get(marker_name(store, KEY)) is not None  # still live
    name = value_name(store, KEY)
    assert await store.acquire(name, "worker-y", 60.0)
    waiter = make_tier(store, clock, lease_wait=30.0, wait_slice=30.0)
    exchange = Exchange(clock)
    waiting = asyncio.create_task(waiter.obtain(KEY, exchange, newer_than=None))
    await eventually(lambda: waiter.stats.waits == 1)
    # Y ends without a value (say its put failed): it releases and wakes the waiter, which
    # must not answer with X's failure: it takes the free lease and exchanges.
    assert await store.release(name, "worker-y")
    await store.notify(name)
    got, _ = await asyncio.wait_for(waiting, 5.0)
    assert exchange.calls == 1 and waiter.stats.leases == 1
    assert got.access_key_id == "ASIA00000000000000X1"

    # The holder waited for fails: its marker is believed, with its code, message and when
    # to retry (the marker's remaining time).
    holder_exchange = Exchange(clock)
    holder_exchange.gate = asyncio.Event()
    holder_exchange.error = CredentialsRejected("Not authorized for tenant-b", code="AccessDenied")
    holding = asyncio.create_task(
        make_tier(store, clock).obtain(OTHER_KEY, holder_exchange, newer_than=None)
    )
    await eventually(lambda: holder_exchange.calls == 1)
    waiter = make_tier(store, clock, lease_wait=30.0, wait_slice=30.0)
    waiting = asyncio.create_task(waiter.obtain(OTHER_KEY, exchange, newer_than=None))
    await eventually(lambda: waiter.stats.waits == 1)
    holder_exchange.gate.set()
    with pytest.raises(CredentialsRejected):
        await holding
    with pytest.raises(CredentialsRejected) as info:
        await asyncio.wait_for(waiting, 5.0)
    assert type(info.value) is CredentialsRejected and info.value.code == "AccessDenied"
    assert info.value.message == "Not authorized for tenant-b"
    assert info.value.retry_after is not None and 0 < info.value.retry_after <= 5.0
    assert exchange.calls == 1  # the waiter did not repeat the refused exchange


@pytest.mark.parametrize(
    ("past_ttl", "extra", "believed"),
    [
        (False, -2.1, False),
        (False, -1.9, True),
        (False, 0.0, True),
        (True, 1.9, True),
        (True, 2.1, False),
    ],
)
async def test_a_marker_is_believed_only_within_its_ttl_and_2s_of_skew(
    clock: FakeClock, past_ttl: bool, extra: float, believed: bool
) -> None:
    """Read ``extra`` seconds after the marker's write time (``past_ttl``: after its TTL)."""
    # The store keeps the marker (its own clock does not move): only its age on the
    # reader's STS clock decides.
    store = MemoryStore(encryption_keys=[generate_key()], clock=FakeClock())
    refused = Exchange(clock)
    refused.error = STSUnavailable("Rate exceeded", code="Throttling")
    with pytest.raises(STSUnavailable):
        await make_tier(store, clock).obtain(KEY, refused, newer_than=None)
    marker = marker_name(store, KEY)
    sealed = await store.get(marker)
    assert sealed is not None
    data = json.loads(store.cipher.open(marker, sealed) or b"")
    assert data["w"] == T0 and 0.5 <= data["ttl"] <= 2.0
    seconds = (data["ttl"] if past_ttl else 0.0) + extra
    reader = make_tier(store, FakeClock(T0 + seconds))
    if not believed:
        await reader._raise_remembered_failure(KEY, marker, data["h"])
        return
    with pytest.raises(STSUnavailable) as info:
        await reader._raise_remembered_failure(KEY, marker, data["h"])
    assert info.value.code == "Throttling"
    assert info.value.retry_after == pytest.approx(max(0.0, data["ttl"] - seconds))


# -- rejected access keys, STS clock offsets ------------------------------------------------------


async def test_rejected_passes_over_that_access_key_only(
    store: MemoryStore, clock: FakeClock
) -> None:
    refused = credentials(T0 + 3600.0, "REFUSED")
    plant(store, KEY, refused)
    tier = make_tier(store, clock)
    exchange = Exchange(clock)
    # Another id refused (one replaced since): the stored value is taken.
    got, _ = await tier.obtain(KEY, exchange, newer_than=None, rejected="ASIA0000000000000OLD")
    assert got == refused and exchange.calls == 0 and tier.stats.hits == 1
    # Its own id refused: passed over, on the first read and on the re-read under the lease.
    got, _ = await tier.obtain(KEY, exchange, newer_than=None, rejected=refused.access_key_id)
    assert exchange.calls == 1 and got.access_key_id == "ASIA00000000000000X1"
    assert tier.stats.hits == 1 and tier.stats.rejected == 0  # not counted as garbage
    # The exchange replaced it in the store: the fleet's next cold miss gets the new one.
    fresh, _ = await make_tier(store, clock).obtain(KEY, exchange, newer_than=None)
    assert fresh == got and exchange.calls == 1


def known_clock(local: FakeClock, offset: float) -> StsClock:
    """An StsClock that heard STS itself: one answer dated ``offset`` s from ``local``."""
    sts_clock = StsClock(local)
    now = local.time()
    sts_clock.observe(now + offset - 0.5, now, now)  # Date is stamped to the second
    assert sts_clock.known and sts_clock.offset == offset
    return sts_clock


async def test_a_reader_not_knowing_stss_clock_asks_sts_before_judging_a_value(
    store: MemoryStore, clock: FakeClock
) -> None:
    # Review finding: readers used to adopt the writer's offset, measured against another
    # host's clock. Now a reader that has not heard STS asks it (one cheap call) first.
    plant(store, KEY, credentials(T0 + 90.0, "SOON"))
    plant(store, OTHER_KEY, credentials(T0 + 90.0, "SOON"))
    exchange = Exchange(clock)
    probes: list[StsClock] = []
    cold = StsClock(clock)

    async def learn_clock() -> bool:
        probes.append(cold)
        await asyncio.sleep(0)
        cold.observe(T0 + 30.0 - 0.5, T0, T0)  # STS says it is 30 s ahead
        return True

    tier = make_tier(store, clock, sts_clock=cold, learn_clock=learn_clock)
    # 90 s left on the local clock, 60 on STS's: inside the mandatory window, not served.
    got = await asyncio.gather(*(tier.obtain(k, exchange, newer_than=None) for k in (KEY, KEY)))
    assert len(probes) == 1  # one probe, shared by concurrent readers
    assert cold.known and cold.offset == 30.0
    assert {c.access_key_id for c, _ in got} == {"ASIA00000000000000X1"}
    # Known now: no further probe.
    await tier.obtain(OTHER_KEY, exchange, newer_than=None)
    assert len(probes) == 1


async def test_without_a_way_to_learn_the_clock_the_local_one_stands_in(
    store: MemoryStore, clock: FakeClock
) -> None:
    plant(store, KEY, credentials(T0 + 90.0, "SOON"))
    exchange = Exchange(clock)
    cold = StsClock(clock)
    got, _ = await make_tier(store, clock, sts_clock=cold).obtain(KEY, exchange, newer_than=None)
    # The writer's offset is not taken: 90 s left on the local clock, served.
    assert not cold.known and cold.offset == 0.0
    assert exchange.calls == 0 and got.access_key_id == credentials(0, "SOON").access_key_id


class _Behind:
    """Every host's local clock, 300 s behind STS's (and equal to each other)."""

    def time(self) -> float:
        return 1_800_000_000.0


@pytest.mark.parametrize(
    ("holder_knows", "waiter_knows"), [(True, False), (False, True), (True, True), (False, False)]
)
async def test_a_fresh_marker_is_believed_whoever_has_heard_stss_clock(
    holder_knows: bool, waiter_knows: bool
) -> None:
    # Review finding: the marker's time was on the holder's estimate of STS's clock and its
    # age on the waiter's; with local clocks 300 s off and one side not knowing STS's clock
    # yet (a cold start during an outage), fresh markers were never believed.
    local = _Behind()
    store = MemoryStore(encryption_keys=[generate_key()])
    clocks = [StsClock(local), StsClock(local)]
    for clock, knows in zip(clocks, (holder_knows, waiter_knows), strict=True):
        if knows:
            clock.observe(local.time() + 300 - 0.5, local.time(), local.time())
    gate, calls = asyncio.Event(), {"holder": 0, "waiter": 0}

    async def failing() -> tuple[Credentials, float]:
        calls["holder"] += 1
        await gate.wait()
        raise STSUnavailable("Rate exceeded", code="Throttling")

    async def waiter_exchange() -> tuple[Credentials, float]:
        calls["waiter"] += 1
        expires = datetime.fromtimestamp(local.time() + 3600, timezone.utc)
        return Credentials("ASIAWAITER", "s", "t", expires), 3600.0

    holder = SharedTier(store, sts_clock=clocks[0], wait_slice=30.0)
    waiter = SharedTier(store, sts_clock=clocks[1], wait_slice=30.0)
    held = asyncio.create_task(holder.obtain("k" * 64, failing, newer_than=None))
    while calls["holder"] == 0:  # noqa: ASYNC110 - state of the code under test
        await asyncio.sleep(0.001)
    waiting = asyncio.create_task(waiter.obtain("k" * 64, waiter_exchange, newer_than=None))
    while waiter.stats.waits == 0:  # noqa: ASYNC110 - state of the code under test
        await asyncio.sleep(0.001)
    gate.set()
    with pytest.raises(STSUnavailable, match="Rate exceeded"):
        await held
    with pytest.raises(STSUnavailable, match="Rate exceeded") as info:
        await waiting
    assert info.value.code == "Throttling"
    assert calls["waiter"] == 0
