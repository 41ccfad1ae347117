"""MemoryStore: the reference CredentialStore, driven by an injected clock."""

from __future__ import annotations

import asyncio

import pytest

from servers.sts import StrictSTS
from stscreds import CredentialBroker, Role, SigningKey
from stscreds.stores import CredentialStore, MemoryStore, generate_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> MemoryStore:
    return MemoryStore(encryption_keys=[generate_key()], clock=clock)


def test_it_is_a_credential_store_and_refuses_to_exist_without_keys() -> None:
    assert isinstance(MemoryStore(encryption_keys=[generate_key()]), CredentialStore)
    with pytest.raises(ValueError, match="encryption_keys"):
        MemoryStore()


async def test_values_expire_after_their_ttl(store: MemoryStore, clock: Clock) -> None:
    await store.put("k", b"v", 10.0)
    assert await store.get("k") == b"v"
    clock.now += 9.9
    assert await store.get("k") == b"v"
    clock.now += 0.1
    assert await store.get("k") is None


async def test_a_lease_has_one_owner_until_released_or_expired(
    store: MemoryStore, clock: Clock
) -> None:
    assert await store.acquire("k", "a", 5.0)
    assert not await store.acquire("k", "b", 5.0)
    assert not await store.release("k", "b")  # only the owner releases
    assert not await store.extend("k", "b", 5.0)  # only the owner extends
    assert await store.extend("k", "a", 5.0)
    clock.now += 4.0
    assert not await store.acquire("k", "b", 5.0)  # extended: still a's
    clock.now += 1.0
    assert await store.acquire("k", "b", 5.0)  # expired: free to take
    assert not await store.extend("k", "a", 5.0)
    assert await store.release("k", "b")
    assert await store.acquire("k", "a", 5.0)


async def test_notify_wakes_waiters_on_that_key_only(store: MemoryStore) -> None:
    woken = asyncio.create_task(store.wait("k", 30.0))
    other = asyncio.create_task(store.wait("other", 30.0))
    await asyncio.sleep(0)  # let both start waiting (no time passes)
    await store.notify("k")
    await asyncio.wait_for(woken, 1.0)
    assert not other.done()
    other.cancel()
    with pytest.raises(asyncio.CancelledError):
        await other
    assert store._waiters == {}


async def test_wait_returns_after_its_timeout(store: MemoryStore) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    await store.wait("k", 0.01)
    assert loop.time() - started < 1.0


def test_repr_shows_counts_not_values() -> None:
    store = MemoryStore(encryption_keys=[generate_key()])
    store._values["k"] = (b"sealed-secret", 1.0)
    assert "sealed-secret" not in repr(store) and "values=1" in repr(store)


async def test_holder_names_the_live_lease_owner_only(store: MemoryStore, clock: Clock) -> None:
    assert await store.holder("k") is None  # free
    assert await store.acquire("k", "a", 5.0)
    assert await store.holder("k") == "a"
    assert await store.holder("other") is None  # per key
    assert await store.release("k", "a")
    assert await store.holder("k") is None  # released
    assert await store.acquire("k", "b", 5.0)
    clock.now += 4.9
    assert await store.holder("k") == "b"
    clock.now += 0.1
    assert await store.holder("k") is None  # expired, though nobody released it


async def test_aclose_leaves_values_and_leases_to_other_users_and_clear_drops_them(
    store: MemoryStore,
) -> None:
    # One MemoryStore may back several brokers: one of them closing must not wipe the
    # values and leases the others rely on.
    await store.put("k", b"sealed", 10.0)
    assert await store.acquire("k", "a", 5.0)
    await store.aclose()
    assert await store.get("k") == b"sealed"
    assert await store.holder("k") == "a"
    store.clear()
    assert await store.get("k") is None
    assert await store.holder("k") is None
    assert await store.acquire("k", "b", 5.0)  # the lease is free again


async def test_a_broker_closing_leaves_the_shared_credentials_to_the_other(
    strict_sts: StrictSTS,
) -> None:
    shared = MemoryStore(encryption_keys=[generate_key()])
    signing_key = SigningKey.generate("ES256")
    first, second = (
        CredentialBroker(
            issuer="http://127.0.0.1:1/memory-issuer",
            signing_keys=[signing_key],
            sts_endpoint_url=strict_sts.url,
            store=shared,
        )
        for _ in "ab"
    )
    strict_sts.configure(issuer=first.issuer, jwks=first.jwks)
    role = Role("arn:aws:iam::123456789012:role/app/reader", subject="alice")
    try:
        got = await first.get(role)
        await first.aclose()
        # The second broker's cold miss is served from the store, not by a second exchange.
        assert (await second.get(role)).access_key_id == got.access_key_id
        assert strict_sts.calls == 1
        assert second.store_stats is not None and second.store_stats.hits == 1
    finally:
        await first.aclose()
        await second.aclose()
