"""RedisStore against a real redis-server: values, leases, notifications, outages, hygiene.

Then against a real Redis Cluster (3 primaries, each with a replica: ``servers/redis_ha.py``)
and a real Sentinel group (a primary, a replica, 3 Sentinels): key layout, sharded and classic
pub/sub, a slot migration under a held lease, and fleets of worker processes
(``servers/fleet.py``, ``fleet_app.py`` given a ``redis+cluster://`` or ``redis+sentinel://``
URL) through a primary killed mid-lease and a Sentinel failover, against StrictSTS.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis.exceptions
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode

from servers.fleet import Fleet, Response, Worker
from servers.redis import RedisServer, find_redis_server
from servers.redis_ha import LocalCluster, LocalSentinel, RedisProcess
from servers.sts import StrictSTS
from stscreds import CredentialBroker, Role, SigningKey
from stscreds.stores import CredentialStore, RedisStore, generate_key

ROLE_ARN = "arn:aws:iam::123456789012:role/tenant-reader"
# The broker's keys are digests of the identity; build them the same way.
KEY = hashlib.sha256(f"{ROLE_ARN}|alice@example.com".encode()).hexdigest()
OTHER_KEY = hashlib.sha256(f"{ROLE_ARN}|bob@example.com".encode()).hexdigest()

MakeStore = Callable[..., RedisStore]


async def eventually(check: Callable[[], Any], timeout: float = 5.0) -> None:
    """Poll ``check`` (sync or async) until it is true; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)


async def count_returns(store: RedisStore, key: str, during: float) -> int:
    """How many times ``wait(key, 5 s)`` returns, back to back, within ``during`` seconds."""
    loop = asyncio.get_running_loop()
    end, returns = loop.time() + during, 0
    while loop.time() < end:
        await store.wait(key, 5.0)
        returns += 1
    return returns


async def started(store: RedisStore) -> RedisStore:
    """``store`` once its notification subscription is up (the first wait starts it)."""
    await store.wait(KEY, 0.001)
    await eventually(lambda: store.listening)
    return store


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[Redis]:
    """A plain client on the same server, to look at what the store wrote."""
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def make_store(redis_url: str) -> AsyncIterator[MakeStore]:
    """Builds RedisStores (encrypted, on the test server by default) and closes them after."""
    stores: list[RedisStore] = []

    def make(url_or_client: str | Redis | None = None, **options: Any) -> RedisStore:
        options.setdefault("encryption_keys", [generate_key()])
        store = RedisStore(url_or_client or redis_url, **options)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.aclose()


# -- construction --------------------------------------------------------------------------


async def test_is_a_credential_store(make_store: MakeStore) -> None:
    store = make_store()
    assert isinstance(store, CredentialStore)
    assert store.cipher.encrypts


async def test_refuses_to_store_plaintext_unless_told(redis_url: str) -> None:
    with pytest.raises(ValueError, match="encryption_keys"):
        RedisStore(redis_url)
    store = RedisStore(redis_url, allow_plaintext=True)
    assert not store.cipher.encrypts
    await store.aclose()


@pytest.mark.parametrize(
    "url",
    [
        "redis://app:s3cr3t-pw@cache.internal:6380/2",
        "rediss://:s3cr3t-pw@cache.internal",
        "unix:///run/redis/redis.sock?password=s3cr3t-pw",
    ],
)
async def test_repr_never_shows_the_password(url: str) -> None:
    store = RedisStore(url, allow_plaintext=True)  # connects lazily: no server needed
    try:
        text = repr(store)
        assert "s3cr3t-pw" not in text
        assert ("cache.internal" in text) or ("/run/redis/redis.sock" in text)
        assert "rediss://" in text if url.startswith("rediss") else "rediss://" not in text
    finally:
        await store.aclose()


async def test_refuses_a_client_that_decodes_responses(redis_url: str) -> None:
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        with pytest.raises(ValueError, match="decode_responses"):
            RedisStore(client, allow_plaintext=True)
    finally:
        await client.aclose()


def test_redis_is_an_optional_extra() -> None:
    # A fresh interpreter where redis-py cannot be imported, as without the extra.
    code = (
        "import sys\n"
        "sys.modules['redis'] = None\n"
        "import stscreds, stscreds.stores\n"
        "from stscreds.stores import RedisStore\n"
        "try:\n"
        "    RedisStore('redis://localhost', allow_plaintext=True)\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "pip install 'stscreds[redis]'" in done.stdout


# -- values --------------------------------------------------------------------------------


async def test_put_get_and_ttls(make_store: MakeStore, raw: Redis) -> None:
    store = make_store()
    name = f"stscreds:v:{KEY}"
    assert await store.get(KEY) is None

    await store.put(KEY, b"\x00sealed\xff", 30)
    assert await store.get(KEY) == b"\x00sealed\xff"
    assert 29_000 < await raw.pttl(name) <= 30_000

    await store.put(KEY, b"newer", 1.2345)  # replaces, with the new TTL in milliseconds
    assert await store.get(KEY) == b"newer"
    assert 1_000 < await raw.pttl(name) <= 1_235

    await store.put(KEY, b"gone", 0)  # clamped to 1 ms, never "no expiry"
    assert await raw.pttl(name) in (-2, 0, 1)

    await store.put(KEY, b"brief", 0.05)
    pttl = await raw.pttl(name)
    assert pttl == -2 or 0 <= pttl <= 50  # -2: already gone; never -1 (no expiry)

    async def expired() -> bool:
        return await raw.exists(name) == 0

    await eventually(expired, timeout=1.0)
    assert await store.get(KEY) is None
    assert await store.get(OTHER_KEY) is None


async def test_values_are_shared_between_stores(make_store: MakeStore) -> None:
    first, second = make_store(), make_store()
    await first.put(KEY, b"sealed", 30)
    assert await second.get(KEY) == b"sealed"


# -- leases --------------------------------------------------------------------------------


async def test_lease_is_exclusive_and_only_its_owner_extends_or_releases(
    make_store: MakeStore, raw: Redis
) -> None:
    a, b = make_store(), make_store()  # two workers
    name = f"stscreds:l:{KEY}"

    assert await a.acquire(KEY, "owner-a", 10)
    assert not await b.acquire(KEY, "owner-b", 10)
    assert await raw.get(name) == b"owner-a"
    assert 9_000 < await raw.pttl(name) <= 10_000

    assert not await b.extend(KEY, "owner-b", 60)
    assert not await b.release(KEY, "owner-b")
    assert await raw.get(name) == b"owner-a"
    assert await raw.pttl(name) <= 10_000

    assert await a.extend(KEY, "owner-a", 60)
    assert 59_000 < await raw.pttl(name) <= 60_000
    assert await a.acquire(KEY, "owner-a", 30)  # the holder asking again keeps it
    assert 29_000 < await raw.pttl(name) <= 30_000

    assert await a.release(KEY, "owner-a")
    assert await raw.exists(name) == 0
    assert not await a.release(KEY, "owner-a")
    assert not await a.extend(KEY, "owner-a", 10)
    assert await b.acquire(KEY, "owner-b", 10)


async def test_an_expired_lease_can_be_taken(make_store: MakeStore, raw: Redis) -> None:
    a, b = make_store(), make_store()
    assert await a.acquire(KEY, "owner-a", 0.05)
    pttl = await raw.pttl(f"stscreds:l:{KEY}")
    assert pttl == -2 or 0 <= pttl <= 50  # -2: already expired; never -1 (no expiry)
    await eventually(lambda: b.acquire(KEY, "owner-b", 10), timeout=1.0)
    assert not await a.extend(KEY, "owner-a", 10)  # too late: it is b's now
    assert not await a.release(KEY, "owner-a")
    assert await b.release(KEY, "owner-b")


async def test_holder_names_the_live_lease_owner_only(make_store: MakeStore, raw: Redis) -> None:
    a, b = make_store(), make_store()  # the holder, and a worker asking who holds it
    assert await b.holder(KEY) is None  # free
    assert await a.acquire(KEY, "owner-a", 10)
    assert await b.holder(KEY) == "owner-a"
    assert await b.holder(OTHER_KEY) is None  # per key
    assert await a.release(KEY, "owner-a")
    assert await b.holder(KEY) is None  # released
    assert await a.acquire(KEY, "owner-a", 0.05)  # Redis expires it by itself

    async def expired() -> bool:
        return await raw.exists(f"stscreds:l:{KEY}") == 0

    await eventually(expired, timeout=1.0)
    assert await b.holder(KEY) is None  # expired, though nobody released it
    # Another prefix is another namespace: its leases are not this one's.
    assert await a.acquire(KEY, "owner-a", 10)
    assert await make_store(prefix="other:").holder(KEY) is None


async def test_one_of_many_concurrent_acquirers_wins(make_store: MakeStore) -> None:
    stores = [make_store() for _ in range(8)]
    won = await asyncio.gather(*(s.acquire(KEY, f"owner-{i}", 10) for i, s in enumerate(stores)))
    assert sorted(won) == [False] * 7 + [True]


async def test_lease_scripts_survive_a_script_cache_flush(
    make_store: MakeStore, raw: Redis
) -> None:
    store = make_store()
    assert await store.acquire(KEY, "me", 10)
    assert await store.extend(KEY, "me", 20)
    await raw.script_flush()  # what a Redis restart does to loaded scripts
    assert await store.extend(KEY, "me", 30)
    assert await store.release(KEY, "me")


# -- notifications -------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 3])
async def test_notify_wakes_a_waiter_of_another_store_promptly(
    make_store: MakeStore, redis_url: str, protocol: int
) -> None:
    url = f"{redis_url}?protocol={protocol}"
    # A poll interval far beyond the test's patience: only a notification can wake it.
    waiter = await started(make_store(url, poll_interval=30))
    notifier = make_store(url)
    loop = asyncio.get_running_loop()

    woken = [asyncio.create_task(waiter.wait(KEY, 10)) for _ in range(3)]
    other = asyncio.create_task(waiter.wait(OTHER_KEY, 10))
    await asyncio.sleep(0.05)
    began = loop.time()
    await notifier.notify(KEY)
    await asyncio.wait_for(asyncio.gather(*woken), timeout=2)
    assert loop.time() - began < 1.0
    assert not other.done()  # a notification is for its key only
    other.cancel()
    with pytest.raises(asyncio.CancelledError):
        await other


async def test_wait_returns_after_its_timeout_without_notification(make_store: MakeStore) -> None:
    # While subscribed the timeout, not the poll interval, decides.
    store = await started(make_store(poll_interval=0.05))
    loop = asyncio.get_running_loop()
    began = loop.time()
    await store.wait(KEY, 0.3)
    assert 0.28 <= loop.time() - began < 2.0


async def test_one_subscription_per_store_whatever_the_waiters(
    make_store: MakeStore, raw: Redis
) -> None:
    store = await started(make_store(prefix="one:"))
    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(20)]
    waits = [asyncio.create_task(store.wait(k, 10)) for k in keys]
    await asyncio.sleep(0.05)
    assert await raw.pubsub_numsub("one:n") == [(b"one:n", 1)]
    for task in waits:
        task.cancel()
    await asyncio.gather(*waits, return_exceptions=True)


async def test_a_cancelled_wait_leaves_nothing_behind(make_store: MakeStore) -> None:
    store = await started(make_store())
    task = asyncio.create_task(store.wait(KEY, 10))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store._waiters == {}  # no future kept for a waiter that is gone
    # Timeouts applied from outside (as the broker does) are cancellations too.
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(store.wait(KEY, 10), 0.05)
    assert store._waiters == {}


async def test_waits_poll_while_redis_is_down_and_notifications_resume(
    redis_server: RedisServer, make_store: MakeStore
) -> None:
    waiter = await started(make_store(poll_interval=0.1))
    notifier = make_store()
    redis_server.stop()
    try:
        await eventually(lambda: not waiter.listening)
        # Each wait lasts a poll interval: about 10 a second, never a hot loop.
        assert 4 <= await count_returns(waiter, KEY, during=1.0) <= 15
        # A store that never managed to subscribe polls the same way.
        fresh = make_store(poll_interval=0.1)
        assert 4 <= await count_returns(fresh, KEY, during=1.0) <= 15
        assert not fresh.listening
        with pytest.raises(redis.exceptions.ConnectionError):
            await notifier.notify(KEY)
    finally:
        redis_server.start()

    await eventually(lambda: waiter.listening, timeout=15)
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(waiter.wait(KEY, 10))
    await asyncio.sleep(0.05)
    began = loop.time()
    await notifier.notify(KEY)
    await asyncio.wait_for(task, timeout=2)
    assert loop.time() - began < 1.0
    await notifier.put(KEY, b"sealed", 30)  # the command pool reconnected too
    assert await waiter.get(KEY) == b"sealed"


async def test_a_frozen_server_is_detected_and_timeouts_leave_the_pool_sound(
    redis_server: RedisServer, make_store: MakeStore
) -> None:
    store = await started(make_store(heartbeat=0.2, poll_interval=0.1))
    await store.put(KEY, b"value-of-key", 30)
    await store.put(OTHER_KEY, b"value-of-other", 30)
    redis_server.pause()  # connections stay open; nothing answers
    try:
        for key in (KEY, OTHER_KEY):
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(store.get(key), 0.2)
        # The silent subscription is noticed by its unanswered PING; waits then poll.
        await eventually(lambda: not store.listening, timeout=3)
        assert await count_returns(store, KEY, during=0.5) <= 10
    finally:
        redis_server.resume()
    # Replies to the abandoned GETs must not be read as answers to later commands.
    assert await store.get(OTHER_KEY) == b"value-of-other"
    assert await store.get(KEY) == b"value-of-key"
    await eventually(lambda: store.listening, timeout=15)


async def test_connections_dropped_while_idle_are_replaced_quietly(
    make_store: MakeStore, raw: Redis
) -> None:
    # Redis's ``timeout``, proxies and NATs close idle connections: not an outage.
    store = await started(make_store(poll_interval=30))
    await store.put(KEY, b"sealed", 30)
    assert await raw.client_kill_filter(_type="normal", skipme=True) >= 1
    assert await store.get(KEY) == b"sealed"
    assert await store.acquire(KEY, "me", 10)

    # The subscription's connection too: it comes back, and with it notifications.
    waiting = asyncio.create_task(store.wait(KEY, 10))
    await asyncio.sleep(0.05)
    assert await raw.client_kill_filter(_type="pubsub") == 1
    await asyncio.wait_for(waiting, timeout=2)  # woken: a notification may have been lost
    await eventually(lambda: store.listening)
    waiting = asyncio.create_task(store.wait(KEY, 10))
    await asyncio.sleep(0.05)
    await store.notify(KEY)
    await asyncio.wait_for(waiting, timeout=2)


# -- integration with a caller's client ----------------------------------------------------


async def test_a_client_passed_in_is_used_and_left_open(redis_url: str, raw: Redis) -> None:
    client = Redis.from_url(redis_url, client_name="caller-client")
    try:
        store = await started(RedisStore(client, allow_plaintext=True))
        await store.put(KEY, b"sealed", 30)
        assert await raw.get(f"stscreds:v:{KEY}") == b"sealed"
        await store.aclose()
        assert await client.ping()
        assert await client.get(f"stscreds:v:{KEY}") == b"sealed"
    finally:
        await client.aclose()


async def test_close_client_closes_a_client_passed_in(redis_url: str, raw: Redis) -> None:
    client = Redis.from_url(redis_url, client_name="owned-client")
    store = RedisStore(client, allow_plaintext=True, close_client=True)
    await store.put(KEY, b"sealed", 30)

    async def names() -> list[str]:
        return [c["name"] for c in await raw.client_list()]

    assert "owned-client" in await names()
    await store.aclose()

    async def disconnected() -> bool:
        return "owned-client" not in await names()

    await eventually(disconnected, timeout=2)


# -- hygiene -------------------------------------------------------------------------------


async def test_keys_and_channel_use_the_prefix(make_store: MakeStore, raw: Redis) -> None:
    store = await started(make_store(prefix="tenant-a:"))
    await store.put(KEY, b"sealed", 30)
    assert await store.acquire(KEY, "me", 30)
    assert sorted(await raw.keys("*")) == [
        f"tenant-a:l:{KEY}".encode(),
        f"tenant-a:v:{KEY}".encode(),
    ]
    assert b"tenant-a:n" in await raw.pubsub_channels()
    other = make_store()  # the default prefix is another namespace
    assert await other.get(KEY) is None
    assert await other.acquire(KEY, "someone-else", 30)


async def test_nothing_identifying_or_secret_is_stored_in_clear(
    make_store: MakeStore, raw: Redis
) -> None:
    store = make_store()
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    plaintext = json.dumps({"role": ROLE_ARN, "sub": "alice@example.com", "s": secret}).encode()
    await store.put(KEY, store.cipher.seal(KEY, plaintext), 30)
    assert await store.acquire(KEY, "owner-token", 30)

    dump = b""
    for name in await raw.keys("*"):
        value = await raw.get(name)
        assert isinstance(name, bytes) and isinstance(value, bytes)
        dump += name + b"=" + value + b"\n"
    for needle in (ROLE_ARN, "123456789012", "tenant-reader", "alice@example.com", secret):
        assert needle.encode() not in dump
    sealed = await store.get(KEY)
    assert sealed is not None
    assert store.cipher.open(KEY, sealed) == plaintext


async def test_aclose_stops_the_listener_and_wakes_waiters(make_store: MakeStore) -> None:
    store = await started(make_store())
    waiting = asyncio.create_task(store.wait(KEY, 30))
    await asyncio.sleep(0.01)
    await store.aclose()
    await asyncio.wait_for(waiting, timeout=1)
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
    assert not store.listening
    with pytest.raises(RuntimeError, match="closed"):
        await store.get(KEY)
    with pytest.raises(RuntimeError, match="closed"):
        await store.wait(KEY, 1)
    await store.aclose()  # twice is fine


# == Redis Cluster and Sentinel ============================================================

ACCOUNT = "123456789012"
ISSUER = "http://127.0.0.1:9/fleet"
# Inside the advisory window of 1 h credentials (15 min), outside the mandatory one (1 min).
ADVISORY_OFFSET = 50 * 60.0
# As in test_shared: a 1 s store timeout (these prove sharing, not latency) and a 1 s breaker
# cooldown, so a worker tries the store again soon after a failover.
FLEET_ENV = {"FLEET_STORE_TIMEOUT": "1", "FLEET_DEADLINE": "5", "FLEET_STORE_COOLDOWN": "1"}
CHANNEL = "stscreds:n"


def server_binary() -> str:
    binary = find_redis_server()
    if binary is None:
        pytest.fail("redis-server is not installed: run `make test`, which installs it")
    return binary


def value_name(key: str) -> str:
    return f"stscreds:v:{{{key}}}"


def lease_name(key: str) -> str:
    return f"stscreds:l:{{{key}}}"


def arn(tenant: str) -> str:
    """The role fleet_app resolves ``?tenant=`` to."""
    return f"arn:aws:iam::{ACCOUNT}:role/fleet-{tenant}"


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """3 primaries, each with a replica (a killed primary is replaced in about 2 s)."""
    cluster = LocalCluster(server_binary(), primaries=3, replicas=1)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def cluster_ok(cluster: LocalCluster) -> LocalCluster:
    """The module's cluster with every node up (a killed one back, as a replica), emptied."""
    for node in cluster.nodes:
        node.start()  # a no-op unless an earlier test killed it
    cluster.wait_ok()
    for node in cluster.primaries():
        node.command("FLUSHALL")
    return cluster


@pytest.fixture
async def cluster_stores(cluster_ok: LocalCluster) -> AsyncIterator[MakeStore]:
    """Builds RedisStores on the cluster (one encryption key for all) and closes them after."""
    stores: list[RedisStore] = []
    key = generate_key()

    def make(**options: Any) -> RedisStore:
        options.setdefault("encryption_keys", [key])
        store = RedisStore.from_cluster(cluster_ok.url, **options)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.aclose()


@pytest.fixture
def sentinel_group() -> Iterator[LocalSentinel]:
    """A primary, its replica and 3 Sentinels (quorum 2, down after 1 s) watching "mymaster"."""
    group = LocalSentinel(server_binary())
    try:
        group.start()
        yield group
    finally:
        group.close()


def other_primary(cluster: LocalCluster, slot: int) -> RedisProcess:
    owner = cluster.owner(slot)
    return next(node for node in cluster.primaries() if node is not owner)


# -- cluster: construction ------------------------------------------------------------------


async def test_a_cluster_store_is_built_every_documented_way(cluster_ok: LocalCluster) -> None:
    first = cluster_ok.nodes[0].port
    key = generate_key()
    client = RedisCluster(host="127.0.0.1", port=first)
    stores = [
        RedisStore(cluster_ok.url, encryption_keys=[key]),
        RedisStore.from_cluster(f"redis://127.0.0.1:{first}", encryption_keys=[key]),
        RedisStore.from_cluster(cluster_ok.url, encryption_keys=[key]),
        RedisStore.from_cluster(cluster_ok.startup_nodes, encryption_keys=[key]),
        RedisStore(client, encryption_keys=[key]),
    ]
    try:
        await stores[0].put(KEY, b"sealed", 30)
        for store in stores:
            assert await store.get(KEY) == b"sealed"
            assert repr(store).startswith("RedisStore(redis+cluster://127.0.0.1:")
    finally:
        for store in stores:
            await store.aclose()
    try:  # a client passed in is left open
        assert await client.get(value_name(KEY)) == b"sealed"
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "redis+cluster://app:s3cr3t-pw@cache-1.internal:7000,cache-2.internal:7001",
            "redis+cluster://cache-1.internal:7000,cache-2.internal:7001",
        ),
        ("rediss+cluster://:s3cr3t-pw@cache-1.internal", "rediss+cluster://cache-1.internal:6379"),
        (
            "redis+sentinel://:s3cr3t-pw@sentinel-1.internal:26380,sentinel-2.internal/mymaster/2",
            "redis+sentinel://sentinel-1.internal:26380,sentinel-2.internal:26379/mymaster/2",
        ),
        (
            "rediss+sentinel://app:s3cr3t-pw@[::1]:26380/main",
            "rediss+sentinel://[::1]:26380/main/0",
        ),
    ],
)
async def test_cluster_and_sentinel_urls_are_read_and_never_shown_with_the_password(
    url: str, shown: str
) -> None:
    store = RedisStore(url, allow_plaintext=True)  # connects lazily: no server needed
    try:
        assert repr(store).startswith(f"RedisStore({shown}, ")
        assert "s3cr3t-pw" not in repr(store)
    finally:
        await store.aclose()


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: RedisStore("redis+cluster://:s3cr3t-pw@", allow_plaintext=True), "hosts"),
        (lambda: RedisStore("redis+cluster://:s3cr3t-pw@h:port", allow_plaintext=True), "hosts"),
        (lambda: RedisStore("redis+sentinel://:s3cr3t-pw@h:1", allow_plaintext=True), "service"),
        (
            lambda: RedisStore("redis+sentinel://:s3cr3t-pw@h:1/main?ssl=1", allow_plaintext=True),
            "no options",
        ),
        (lambda: RedisStore.from_cluster("unix:///s3cr3t-pw", allow_plaintext=True), "URL"),
        (lambda: RedisStore.from_cluster([], allow_plaintext=True), "at least one"),
        (lambda: RedisStore.from_sentinel([], "main", allow_plaintext=True), "at least one"),
        (lambda: RedisStore.from_sentinel([("h", 1)], "", allow_plaintext=True), "service_name"),
        (
            lambda: RedisStore.from_cluster("redis://h:1", prefix="x{}:", allow_plaintext=True),
            "prefix",
        ),
        (
            lambda: RedisStore(
                RedisCluster(host="h", port=1, decode_responses=True), allow_plaintext=True
            ),
            "decode_responses",
        ),
    ],
)
def test_bad_cluster_and_sentinel_configurations_are_refused(
    build: Callable[[], RedisStore], match: str
) -> None:
    with pytest.raises(ValueError, match=match) as raised:
        build()
    assert "s3cr3t-pw" not in str(raised.value)


def test_a_cluster_client_reading_from_replicas_is_refused() -> None:
    # A replica answers late: a lease just taken would look free to the next worker.
    from redis.asyncio.cluster import LoadBalancingStrategy

    client = RedisCluster(
        host="h", port=1, load_balancing_strategy=LoadBalancingStrategy.ROUND_ROBIN
    )
    with pytest.raises(ValueError, match="primaries"):
        RedisStore(client, allow_plaintext=True)


# -- cluster: keys, scripts, notifications --------------------------------------------------


async def test_an_identitys_value_and_lease_share_a_slot_and_identities_spread(
    cluster_stores: MakeStore, cluster_ok: LocalCluster
) -> None:
    store = cluster_stores()
    raw = RedisCluster(startup_nodes=[ClusterNode(*a) for a in cluster_ok.startup_nodes])
    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(24)]
    try:
        for i, key in enumerate(keys):
            await store.put(key, b"sealed-%d" % i, 30)
            assert await store.acquire(key, f"owner-{i}", 30)
        homes = set()
        for i, key in enumerate(keys):
            assert await raw.get(value_name(key)) == b"sealed-%d" % i
            assert await raw.get(lease_name(key)) == f"owner-{i}".encode()
            # The digest is the hash tag: one slot per identity (single-slot scripts)...
            assert raw.keyslot(value_name(key)) == raw.keyslot(lease_name(key)) == raw.keyslot(key)
            homes.add(cluster_ok.owner(raw.keyslot(key)).port)
        # ...and identities spread over every primary, not all behind the prefix's slot.
        assert len(homes) == 3

        # The lease scripts run on their key's node, also after it forgot them.
        for node in cluster_ok.primaries():
            node.command("SCRIPT", "FLUSH")
        assert await store.extend(keys[0], "owner-0", 60)
        assert 59_000 < await raw.pttl(lease_name(keys[0])) <= 60_000
        assert not await store.extend(keys[0], "owner-1", 60)
        assert await store.holder(keys[1]) == "owner-1"
        assert not await store.release(keys[1], "owner-0")
        assert await store.release(keys[1], "owner-1")
        assert await store.holder(keys[1]) is None
        assert await store.acquire(keys[1], "owner-x", 30)
        assert not await store.acquire(keys[2], "owner-x", 30)
    finally:
        await raw.aclose()


async def test_cluster_notifications_use_sharded_pubsub(
    cluster_stores: MakeStore, cluster_ok: LocalCluster
) -> None:
    waiter = await started(cluster_stores(poll_interval=30))  # only a notification wakes it
    notifier = cluster_stores()
    assert waiter.notifications == "sharded"
    home = cluster_ok.owner(cluster_ok.slot(CHANNEL))
    assert home.command("PUBSUB", "SHARDNUMSUB", CHANNEL) == [CHANNEL.encode(), 1]
    for node in cluster_ok.nodes:  # no classic subscription anywhere
        assert node.command("PUBSUB", "NUMSUB", CHANNEL) == [CHANNEL.encode(), 0]

    loop = asyncio.get_running_loop()
    woken = [asyncio.create_task(waiter.wait(KEY, 10)) for _ in range(3)]
    other = asyncio.create_task(waiter.wait(OTHER_KEY, 10))
    await asyncio.sleep(0.05)
    began = loop.time()
    await notifier.notify(KEY)
    await asyncio.wait_for(asyncio.gather(*woken), timeout=2)
    assert loop.time() - began < 1.0
    assert not other.done()
    other.cancel()
    with pytest.raises(asyncio.CancelledError):
        await other


@pytest.fixture
def cluster_without_sharded_pubsub() -> Iterator[LocalCluster]:
    """A one-node cluster whose server lacks SPUBLISH/SSUBSCRIBE, as before Redis 7."""
    renamed = ["SPUBLISH", "SSUBSCRIBE", "SUNSUBSCRIBE"]
    args = [arg for name in renamed for arg in ("--rename-command", name, "")]
    cluster = LocalCluster(server_binary(), primaries=1, extra_args=args)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


async def test_a_cluster_without_sharded_pubsub_falls_back_to_classic_pubsub(
    cluster_without_sharded_pubsub: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="stscreds")
    url, key = cluster_without_sharded_pubsub.url, generate_key()
    notifier = RedisStore.from_cluster(url, encryption_keys=[key])
    waiter = RedisStore.from_cluster(url, encryption_keys=[key], poll_interval=30)
    try:
        await notifier.notify(KEY)  # SPUBLISH is refused: it publishes classically, no error
        await started(waiter)
        assert waiter.notifications == "classic"
        assert (await started(notifier)).notifications == "classic"
        (node,) = cluster_without_sharded_pubsub.nodes
        assert node.command("PUBSUB", "NUMSUB", CHANNEL) == [CHANNEL.encode(), 2]
        task = asyncio.create_task(waiter.wait(KEY, 10))
        await asyncio.sleep(0.05)
        await notifier.notify(KEY)
        await asyncio.wait_for(task, timeout=2)
    finally:
        await notifier.aclose()
        await waiter.aclose()
    assert "unavailable" not in caplog.text  # not an outage


# -- cluster: a slot migration --------------------------------------------------------------


async def test_a_slot_migration_keeps_leases_values_and_notifications(
    cluster_stores: MakeStore, cluster_ok: LocalCluster
) -> None:
    a, b = cluster_stores(), await started(cluster_stores(poll_interval=30))
    await a.put(KEY, b"sealed", 30)
    assert await a.acquire(KEY, "owner-a", 30)
    slot = cluster_ok.slot(lease_name(KEY))
    target = other_primary(cluster_ok, slot)

    await asyncio.to_thread(cluster_ok.start_migration, slot, target)
    # Half-way: the source still owns the slot, the keys are on the target (ASK redirects).
    assert await b.holder(KEY) == "owner-a"
    assert not await b.acquire(KEY, "owner-b", 30)
    assert await a.extend(KEY, "owner-a", 40)
    assert await b.get(KEY) == b"sealed"
    await asyncio.to_thread(cluster_ok.end_migration, slot, target)
    assert 38_000 < target.command("PTTL", lease_name(KEY)) <= 40_000  # the TTL came along
    assert await b.holder(KEY) == "owner-a"
    assert not await b.acquire(KEY, "owner-b", 30)
    assert await a.release(KEY, "owner-a")
    assert await b.acquire(KEY, "owner-b", 30)

    # The channel's slot moves: its node drops the subscription and b follows the slot.
    home = other_primary(cluster_ok, cluster_ok.slot(CHANNEL))
    await asyncio.to_thread(cluster_ok.migrate_slot, cluster_ok.slot(CHANNEL), home)

    def resubscribed() -> bool:
        count = home.command("PUBSUB", "SHARDNUMSUB", CHANNEL)[1]
        return b.listening and count == 1

    await eventually(resubscribed, timeout=10)
    task = asyncio.create_task(b.wait(KEY, 10))
    await asyncio.sleep(0.05)
    await a.notify(KEY)
    await asyncio.wait_for(task, timeout=2)


def store_name(broker: CredentialBroker, role: Role) -> str:
    """The keyed name under which ``broker``'s store keeps ``role``'s credentials."""
    assert broker._shared is not None
    return str(broker._shared.store.cipher.store_key(broker.identity_key(role)))


async def test_brokers_make_one_exchange_across_a_slot_migration_mid_lease(
    cluster_ok: LocalCluster, strict_sts: StrictSTS
) -> None:
    signing_key, store_key = SigningKey.generate("ES256"), generate_key()
    brokers: list[CredentialBroker] = []

    def make() -> CredentialBroker:
        broker = CredentialBroker(
            issuer=ISSUER,
            signing_keys=[signing_key],
            sts_endpoint_url=strict_sts.url,
            store=RedisStore.from_cluster(cluster_ok.url, encryption_keys=[store_key]),
            store_timeout=2.0,
            exchange_deadline=5.0,
        )
        brokers.append(broker)
        return broker

    strict_sts.configure(issuer=ISSUER, jwks=lambda: brokers[0].jwks())
    alice = Role(arn("alice"), subject="alice")
    holder, waiter = make(), make()
    try:
        strict_sts.hang = True
        first = asyncio.create_task(holder.get(alice))
        assert await asyncio.to_thread(strict_sts.wait_for_calls, 1, 10.0)
        second = asyncio.create_task(waiter.get(alice))
        stats = waiter.store_stats
        assert stats is not None
        await eventually(lambda: stats.waits >= 1)  # it waits on the holder's lease

        name = store_name(holder, alice)
        slot = cluster_ok.slot(lease_name(name))
        target = other_primary(cluster_ok, slot)
        await asyncio.to_thread(cluster_ok.migrate_slot, slot, target)
        strict_sts.release()
        got = await asyncio.wait_for(asyncio.gather(first, second), timeout=15)

        assert strict_sts.calls_for(alice.arn) == 1
        (issued,) = [r.credentials["AccessKeyId"] for r in strict_sts.requests if r.credentials]
        assert [c.access_key_id for c in got] == [issued, issued]
        assert stats.hits == 1
        # The value was put on the slot's new node, and the lease released.
        assert target.command("EXISTS", value_name(name)) == 1
        assert target.command("EXISTS", lease_name(name)) == 0
    finally:
        strict_sts.release()
        for broker in brokers:
            await broker.aclose()


# -- fleets: helpers --------------------------------------------------------------------------


async def burst(
    workers: Sequence[Worker], tenants: Sequence[str], total: int
) -> list[tuple[str, str]]:
    """``total`` concurrent requests over workers x tenants; (tenant, key id) of each, all 200."""
    n = len(workers)
    asked = [tenants[(i // n) % len(tenants)] for i in range(total)]
    responses = await asyncio.gather(
        *(workers[i % n].get(f"/creds?tenant={t}", timeout=60) for i, t in enumerate(asked)),
        return_exceptions=True,
    )
    failed = [r for r in responses if isinstance(r, BaseException) or r.status != 200]
    assert not failed, f"{len(failed)} of {total} requests failed: {failed[:3]!r}"
    return [
        (tenant, str(r.json()["access_key_id"]))
        for tenant, r in zip(asked, responses, strict=True)
        if isinstance(r, Response)
    ]


async def settled(sts: StrictSTS, timeout: float = 15.0) -> None:
    """Wait until every call that reached STS has been answered (and so is counted)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(sts.requests) < sts.calls:
        assert loop.time() < deadline, f"STS calls still in flight: {sts.calls}"
        await asyncio.sleep(0.02)


def issued_keys(sts: StrictSTS, tenant: str) -> list[str]:
    return [r.credentials["AccessKeyId"] for r in sts.requests_for(arn(tenant)) if r.credentials]


async def converge(fleet_workers: Sequence[Worker], sts: StrictSTS, label: str) -> list[int]:
    """Fresh identities until one costs the fleet a single STS call (bounded): calls per try."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20.0
    attempts: list[int] = []
    while not attempts or attempts[-1] != 1:
        assert loop.time() < deadline, f"sharing did not resume: calls per attempt {attempts}"
        tenant = f"{label}-{len(attempts)}"
        await burst(fleet_workers, [tenant], 8 * len(fleet_workers))
        await settled(sts)
        attempts.append(sts.calls_for(arn(tenant)))
    return attempts


async def refresh_cycle(
    fleet: Fleet, workers: Sequence[Worker], sts: StrictSTS, tenants: Sequence[str]
) -> list[tuple[str, str]]:
    """Move every clock into the advisory window; return what each worker serves once renewed."""
    sts.clock = lambda: time.time() + ADVISORY_OFFSET  # STS first: no token from its future
    await fleet.set_clock(ADVISORY_OFFSET)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20.0
    served = []
    for tenant in tenants:
        old = issued_keys(sts, tenant)[-1]
        for worker in workers:
            while True:
                response = await worker.get(f"/creds?tenant={tenant}")
                assert response.status == 200, (response, worker.log()[-2000:])
                key = str(response.json()["access_key_id"])
                if key != old:
                    break
                assert loop.time() < deadline, f"{worker!r} still serves the old key of {tenant}"
                await asyncio.sleep(0.05)
            served.append((tenant, key))
    return served


def wrong_identities(sts: StrictSTS, served: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """(tenant, key id) pairs where the key was not issued for that tenant's role."""
    return [(tenant, key) for tenant, key in served if key not in issued_keys(sts, tenant)]


@pytest.fixture
def make_fleet(tmp_path: Path) -> Iterator[Callable[..., Fleet]]:
    """Start 4-worker fleets of fleet_app on a RedisStore URL, against a StrictSTS."""
    fleets: list[Fleet] = []

    def make(sts: StrictSTS, store_url: str, **env: str) -> Fleet:
        fleet = Fleet(
            4,
            workdir=tmp_path / f"fleet-{len(fleets)}",
            sts_url=sts.url,
            store="redis",
            store_url=store_url,
            store_key=generate_key(),
            env={**FLEET_ENV, **env},
        )
        fleets.append(fleet)
        sts.configure(issuer=fleet.issuer, jwks=None)
        return fleet.start()

    try:
        yield make
    finally:
        for fleet in fleets:
            fleet.stop()


# -- fleets: a cluster primary killed mid-lease ---------------------------------------------


async def test_a_fleet_rides_out_a_cluster_primary_killed_mid_lease(
    cluster_ok: LocalCluster, strict_sts: StrictSTS, make_fleet: Callable[..., Fleet]
) -> None:
    # Long enough to outlive the failover: the survivors then meet the dead holder's lease.
    lease_ttl = 8.0
    fleet = make_fleet(strict_sts, cluster_ok.url, FLEET_LEASE_TTL=str(lease_ttl))
    await fleet.ready()
    holder, survivors = fleet[1], [fleet[0], fleet[2], fleet[3]]  # worker 0 is the issuer
    tenants = [f"t{i}" for i in range(6)]
    served: list[tuple[str, str]] = []
    try:
        strict_sts.delay = 0.1  # the burst's requests overlap the exchanges
        served += await burst(fleet.workers, tenants, 48)
        await settled(strict_sts)
        assert {t: strict_sts.calls_for(arn(t)) for t in tenants} == dict.fromkeys(tenants, 1)

        # Worker 1 takes phoenix's lease and calls STS, which hangs. Then the primary that
        # holds the lease dies, and worker 1 with it.
        strict_sts.delay, strict_sts.hang = 0.0, True
        doomed = asyncio.create_task(holder.get("/creds?tenant=phoenix", timeout=30))
        assert await asyncio.to_thread(strict_sts.wait_for_calls, len(tenants) + 1, 15.0)
        (lease_home,) = [n for n in cluster_ok.primaries() if n.command("KEYS", "stscreds:l:*")]
        lease_home.kill()
        holder.kill(signal.SIGKILL)
        strict_sts.release()
        with pytest.raises((ConnectionError, OSError)):
            await doomed

        # While the cluster fails over, every request is answered (the store fails open).
        failover = asyncio.create_task(asyncio.to_thread(cluster_ok.wait_ok))
        rounds = 0
        while not failover.done() or rounds < 2:
            served += await burst(survivors, [f"down-{rounds}"], 12)
            rounds += 1
            assert rounds < 200
        await failover
        # The lease reached the promoted replica, with its TTL: it runs out by itself.
        (lease,) = [
            (node, name)
            for node in cluster_ok.primaries()
            for name in node.command("KEYS", "stscreds:l:*")
        ]
        pttl = lease[0].command("PTTL", lease[1])
        assert 0 < pttl <= lease_ttl * 1000
        lease_ends = time.monotonic() + pttl / 1000

        # Stable again: one call per new identity. Phoenix waits out the dead holder's lease
        # (no longer), then one worker takes it over for the fleet.
        await converge(survivors, strict_sts, "after")
        served += await burst(survivors, ["phoenix"], 24)
        assert time.monotonic() < lease_ends + 2.0
        await settled(strict_sts)
        assert strict_sts.calls_for(arn("phoenix")) == 2  # the dead holder's, one takeover

        # A refresh cycle on the stable cluster: one STS call per identity for the fleet.
        stable = [*tenants, "phoenix"]
        before = {t: strict_sts.calls_for(arn(t)) for t in stable}
        served += await refresh_cycle(fleet, survivors, strict_sts, stable)
        await settled(strict_sts)
        assert {t: strict_sts.calls_for(arn(t)) - before[t] for t in stable} == dict.fromkeys(
            stable, 1
        )
    except BaseException:
        print(fleet.logs()[-8000:], cluster_ok.logs()[-4000:])
        raise
    finally:
        strict_sts.release()
    assert wrong_identities(strict_sts, served) == []
    assert len(served) > 100


# -- Sentinel ---------------------------------------------------------------------------------


async def test_a_sentinel_store_finds_the_primary_every_documented_way(
    sentinel_group: LocalSentinel,
) -> None:
    key = generate_key()
    named = {"client_name": "stscreds-sentinel-test"}
    a = RedisStore.from_sentinel(
        sentinel_group.addresses, "mymaster", encryption_keys=[key], sentinel_options=named
    )
    b = RedisStore(sentinel_group.url, encryption_keys=[key], poll_interval=30)
    try:
        await a.put(KEY, b"sealed", 30)
        assert await b.get(KEY) == b"sealed"
        # On one primary, the key names of a single server (no hash tags).
        assert sentinel_group.primary.command("GET", f"stscreds:v:{KEY}") == b"sealed"
        assert await a.acquire(KEY, "owner-a", 10)
        assert await b.holder(KEY) == "owner-a"
        assert not await b.acquire(KEY, "owner-b", 10)
        await started(b)
        assert b.notifications == "classic"
        task = asyncio.create_task(b.wait(KEY, 10))
        await asyncio.sleep(0.05)
        await a.notify(KEY)
        await asyncio.wait_for(task, timeout=2)
        hosts = ",".join(f"127.0.0.1:{port}" for _, port in sentinel_group.addresses)
        assert repr(a).startswith(f"RedisStore(redis+sentinel://{hosts}/mymaster/0, ")
    finally:
        await a.aclose()
        await b.aclose()

    def named_clients() -> int:  # the store's connections to the Sentinels are closed too
        lists = [s.command("CLIENT", "LIST").decode() for s in sentinel_group.sentinels]
        return sum(text.count("name=stscreds-sentinel-test") for text in lists)

    await eventually(lambda: named_clients() == 0, timeout=5)


async def test_a_fleet_fails_open_through_a_sentinel_failover_and_converges(
    sentinel_group: LocalSentinel, strict_sts: StrictSTS, make_fleet: Callable[..., Fleet]
) -> None:
    fleet = make_fleet(strict_sts, sentinel_group.url)
    await fleet.ready()
    served: list[tuple[str, str]] = []
    strict_sts.delay = 0.1
    try:
        served += await burst(fleet.workers, ["before"], 40)
        await settled(strict_sts)
        assert strict_sts.calls_for(arn("before")) == 1

        old = sentinel_group.primary.port
        sentinel_group.primary.kill()
        promotion = asyncio.create_task(asyncio.to_thread(sentinel_group.wait_promoted, old))
        rounds = 0
        # Requests keep succeeding until (and after) the Sentinels promote the replica.
        while not promotion.done() or rounds < 3:
            served += await burst(fleet.workers, [f"down-{rounds}", "before"], 32)
            rounds += 1
            assert rounds < 100
        await promotion
        await settled(strict_sts)
        assert strict_sts.calls_for(arn("before")) == 1  # from each worker's L1
        for n in range(rounds):
            # Each worker went to STS by itself at worst (single-flight within the process).
            assert 1 <= strict_sts.calls_for(arn(f"down-{n}")) <= 4

        # After the promotion the fleet shares again: one STS call per identity.
        await converge(fleet.workers, strict_sts, "back")
        served += await burst(fleet.workers, ["steady-a", "steady-b"], 40)
        await settled(strict_sts)
        assert [strict_sts.calls_for(arn(t)) for t in ("steady-a", "steady-b")] == [1, 1]
    except BaseException:
        print(fleet.logs()[-8000:], sentinel_group.logs()[-4000:])
        raise
    assert wrong_identities(strict_sts, served) == []
    for worker in fleet:
        log, stats = worker.log(), (await worker.get("/stats")).json()["store"]
        # The outage is logged once per worker, and its end once.
        assert stats["outages"] == 1, (stats, log)
        assert log.count("shared store unavailable") == 1, log
        assert log.count("shared store is back") == 1, log


def _use_inherited(store: RedisStore, results: Any) -> None:  # runs in a forked child
    store.reset_after_fork()

    async def use() -> bytes | None:
        await store.put(OTHER_KEY, b"from-child", 30)
        return await store.get(KEY)

    results.put(asyncio.run(use()))


def test_a_forked_child_opens_cluster_connections_of_its_own(cluster_ok: LocalCluster) -> None:
    # As under gunicorn --preload: the parent used the store, then forked a worker.
    import multiprocessing

    store = RedisStore.from_cluster(cluster_ok.url, allow_plaintext=True)
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(store.put(KEY, b"from-parent", 30))
        context = multiprocessing.get_context("fork")
        results = context.Queue()
        child = context.Process(target=_use_inherited, args=(store, results))
        child.start()
        assert results.get(timeout=20) == b"from-parent"
        child.join(20)
        assert child.exitcode == 0
        # The parent's connections were left alone: its next commands are answered right.
        assert loop.run_until_complete(store.get(OTHER_KEY)) == b"from-child"
        assert loop.run_until_complete(store.get(KEY)) == b"from-parent"
    finally:
        loop.run_until_complete(store.aclose())
        loop.close()
