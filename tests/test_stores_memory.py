"""MemoryStore: the reference CredentialStore, driven by an injected clock."""

from __future__ import annotations

import asyncio

import pytest

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
