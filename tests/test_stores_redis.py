"""RedisStore against a real redis-server: values, leases, notifications, outages, hygiene."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.exceptions
from redis.asyncio import Redis

from servers.redis import RedisServer
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
