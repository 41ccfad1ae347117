"""Tests for stscreds.stores.sqlite: SQLiteStore shares values and leases through one file."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
import os
import pathlib
import sqlite3
import stat
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from stscreds.stores import CredentialStore, SQLiteStore, StoreCipher, generate_key

KEY = "identity-digest-0123456789abcdef"
SECRET = b'{"s":"wJalrXUtnFEMI/K7MDENG/bPxRfiCYdistinctiveSECRET"}'
OpenStore = Callable[..., SQLiteStore]


class FakeClock:
    """Wall-clock time that only moves when the test says so."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "stscreds.sqlite"


@pytest.fixture
async def open_store(db: pathlib.Path) -> AsyncIterator[OpenStore]:
    """Build SQLiteStores on ``db`` (plaintext allowed unless keys are given); closed after."""
    stores: list[SQLiteStore] = []

    def open_(path: pathlib.Path | str = db, **options: Any) -> SQLiteStore:
        if "encryption_keys" not in options:
            options.setdefault("allow_plaintext", True)
        store = SQLiteStore(path, **options)
        stores.append(store)
        return store

    yield open_
    for store in stores:
        await store.aclose()


@contextlib.contextmanager
def write_lock(path: pathlib.Path) -> Iterator[sqlite3.Connection]:
    """Another connection holding the database's write lock until the block ends (or COMMIT)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.close()


def raw_rows(path: pathlib.Path, table: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"SELECT * FROM {table} ORDER BY key").fetchall()
    finally:
        conn.close()


def mode_of(path: pathlib.Path | str) -> int | None:
    """Permission bits of ``path``, or None if it does not exist."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return None


def overwrite(path: pathlib.Path, data: bytes, at: int = 0) -> None:
    with open(path, "r+b" if os.path.exists(path) else "wb") as file:
        file.seek(at)
        file.write(data)


def store_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("stscreds-sqlite")]


# --- the protocol -------------------------------------------------------------------------


async def test_is_a_credential_store_and_repr_hides_keys(open_store: OpenStore) -> None:
    key = generate_key()
    store = open_store(encryption_keys=[key])
    assert isinstance(store, CredentialStore)
    assert isinstance(store.cipher, StoreCipher) and store.cipher.encrypts
    assert key not in repr(store) and "stscreds.sqlite" in repr(store)


def test_refuses_to_store_plaintext_without_consent(db: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="encryption_keys"):
        SQLiteStore(db)


async def test_get_put_round_trip_exact_bytes(open_store: OpenStore) -> None:
    store = open_store()
    assert await store.get(KEY) is None
    every_byte = bytes(range(256)) * 3
    await store.put(KEY, every_byte, 60)
    assert await store.get(KEY) == every_byte
    await store.put(KEY, b"", 60)
    assert await store.get(KEY) == b""
    await store.put(KEY, b"newer", 60)
    assert await store.get(KEY) == b"newer"
    assert await store.get("other") is None


async def test_values_expire_by_the_clock(open_store: OpenStore) -> None:
    clock = FakeClock()
    store = open_store(clock=clock)
    await store.put(KEY, b"v", 10)
    clock.now += 9.999
    assert await store.get(KEY) == b"v"
    clock.now += 0.001
    assert await store.get(KEY) is None
    await store.put(KEY, b"v2", 0)  # already expired when written
    assert await store.get(KEY) is None


async def test_two_stores_on_one_file_share_values(open_store: OpenStore) -> None:
    first, second = open_store(), open_store()
    await first.put(KEY, b"shared", 60)
    assert await second.get(KEY) == b"shared"


async def test_expired_rows_are_cleaned_up_on_a_later_put(
    open_store: OpenStore, db: pathlib.Path
) -> None:
    clock = FakeClock()
    store = open_store(clock=clock)
    await store.put("short", b"a", 1)
    await store.put("long", b"b", 1000)
    assert await store.acquire("lease", "me", 1)
    await store.notify("noticed")
    clock.now += 61
    await store.put("new", b"c", 1000)
    assert [row[0] for row in raw_rows(db, "stscreds_values")] == ["long", "new"]
    assert raw_rows(db, "stscreds_leases") == []
    assert raw_rows(db, "stscreds_notices") == []


# --- leases -------------------------------------------------------------------------------


async def test_lease_is_exclusive_until_released(open_store: OpenStore) -> None:
    store = open_store()
    assert await store.acquire(KEY, "a", 30)
    assert not await store.acquire(KEY, "b", 30)
    assert await store.acquire(KEY, "a", 30)  # the holder may take it again
    assert await store.acquire("other-key", "b", 30)
    assert not await store.release(KEY, "b")
    assert not await store.acquire(KEY, "b", 30)
    assert await store.release(KEY, "a")
    assert not await store.release(KEY, "a")
    assert await store.acquire(KEY, "b", 30)


async def test_expired_lease_is_free_to_take(open_store: OpenStore) -> None:
    clock = FakeClock()
    store = open_store(clock=clock)
    assert await store.acquire(KEY, "a", 30)
    clock.now += 29.9
    assert not await store.acquire(KEY, "b", 30)
    clock.now += 0.1
    assert await store.acquire(KEY, "b", 30)
    # The old holder lost it: it can neither extend nor release b's lease.
    assert not await store.extend(KEY, "a", 30)
    assert not await store.release(KEY, "a")
    assert await store.release(KEY, "b")


async def test_only_the_live_owner_extends(open_store: OpenStore) -> None:
    clock = FakeClock()
    store = open_store(clock=clock)
    assert not await store.extend(KEY, "a", 30)  # nobody holds it
    assert await store.acquire(KEY, "a", 10)
    assert not await store.extend(KEY, "b", 30)
    clock.now += 9
    assert await store.extend(KEY, "a", 10)
    clock.now += 9  # past the first expiry, within the extended one
    assert not await store.acquire(KEY, "b", 30)
    clock.now += 1
    assert not await store.extend(KEY, "a", 10)  # expired: too late to extend


async def test_holder_names_the_live_lease_owner_only(
    open_store: OpenStore, db: pathlib.Path
) -> None:
    clock = FakeClock()
    holding, asking = open_store(clock=clock), open_store(clock=clock)  # two workers
    assert await asking.holder(KEY) is None  # free
    assert await holding.acquire(KEY, "a", 10)
    assert await asking.holder(KEY) == "a"
    assert await asking.holder("other-key") is None  # per key
    assert await holding.release(KEY, "a")
    assert await asking.holder(KEY) is None  # released
    assert await holding.acquire(KEY, "b", 10)
    clock.now += 9.999
    assert await asking.holder(KEY) == "b"
    clock.now += 0.001
    assert await asking.holder(KEY) is None  # expired, though its row is still there
    assert [row[:2] for row in raw_rows(db, "stscreds_leases")] == [(KEY, "b")]


async def test_lease_is_exclusive_across_two_stores(open_store: OpenStore) -> None:
    stores = [open_store(), open_store()]
    for round_ in range(25):
        key = f"{KEY}-{round_}"
        results = await asyncio.gather(
            *(stores[i % 2].acquire(key, f"owner-{i}", 30) for i in range(8))
        )
        assert results.count(True) == 1, results


def _race_for_lease(
    path: str, owner: str, barrier: Any, results: Any
) -> None:  # runs in a spawned process
    async def race() -> bool:
        store = SQLiteStore(path, allow_plaintext=True)
        try:
            # All processes open the fresh file at once: schema creation races too.
            barrier.wait(timeout=60)
            return await store.acquire(KEY, owner, 60)
        finally:
            await store.aclose()

    try:
        results.put((owner, asyncio.run(race())))
    except BaseException as error:
        results.put((owner, f"{type(error).__name__}: {error}"))


def test_lease_is_exclusive_across_processes(db: pathlib.Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    count = 6
    barrier, results = ctx.Barrier(count), ctx.Queue()
    processes = [
        ctx.Process(target=_race_for_lease, args=(str(db), f"p{i}", barrier, results))
        for i in range(count)
    ]
    for process in processes:
        process.start()
    try:
        outcomes = dict(results.get(timeout=120) for _ in processes)
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    assert all(isinstance(won, bool) for won in outcomes.values()), outcomes
    winners = [owner for owner, won in outcomes.items() if won]
    assert len(winners) == 1, outcomes
    assert raw_rows(db, "stscreds_leases")[0][:2] == (KEY, winners[0])


# --- files --------------------------------------------------------------------------------


@pytest.fixture
def no_umask() -> Iterator[None]:
    """Umask 0, so only the store's own choices can keep files private."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("no_umask")
async def test_files_are_private(open_store: OpenStore, db: pathlib.Path) -> None:
    store = open_store()
    assert mode_of(db) == 0o600  # before SQLite ever opened it
    await store.put(KEY, b"v", 60)
    for suffix in ("-wal", "-shm"):
        assert mode_of(f"{db}{suffix}") == 0o600, suffix


@pytest.mark.usefixtures("no_umask")
async def test_sidecars_of_a_world_readable_file_are_not_world_readable(
    open_store: OpenStore, db: pathlib.Path
) -> None:
    os.close(os.open(db, os.O_CREAT, 0o644))
    store = open_store()
    await store.put(KEY, b"v", 60)
    assert mode_of(db) == 0o644  # the user's own file is left alone
    for suffix in ("-wal", "-shm"):
        assert mode_of(f"{db}{suffix}") == 0o640, suffix


async def test_database_uses_wal(open_store: OpenStore, db: pathlib.Path) -> None:
    await open_store().put(KEY, b"v", 60)
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        conn.close()


async def test_sealed_values_leave_no_plaintext_on_disk(
    open_store: OpenStore, db: pathlib.Path
) -> None:
    def on_disk() -> bytes:
        return b"".join(
            pathlib.Path(f"{db}{suffix}").read_bytes()
            for suffix in ("", "-wal")
            if pathlib.Path(f"{db}{suffix}").exists()
        )

    sealed_store = open_store(encryption_keys=[generate_key()])
    sealed = sealed_store.cipher.seal(KEY, SECRET)
    await sealed_store.put(KEY, sealed, 60)
    assert await sealed_store.get(KEY) == sealed
    assert sealed_store.cipher.open(KEY, sealed) == SECRET
    assert sealed in on_disk()  # the scan does see what was stored...
    assert SECRET not in on_disk()
    # ...and would see the secret had it been stored in the clear.
    plain_store = open_store()
    await plain_store.put("plain", plain_store.cipher.seal("plain", SECRET), 60)
    assert SECRET in on_disk()


async def test_missing_directory_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "no-such-dir" / "db.sqlite"
    with pytest.raises(ValueError, match="does not exist") as info:
        SQLiteStore(missing, encryption_keys=[generate_key()])
    assert str(tmp_path / "no-such-dir") in str(info.value)


@pytest.mark.parametrize("path", ["", ":memory:", "file:x.db?mode=memory"])
def test_non_file_paths_are_refused(path: str) -> None:
    with pytest.raises(ValueError, match="path"):
        SQLiteStore(path, allow_plaintext=True)


def test_directory_path_is_refused(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="is a directory"):
        SQLiteStore(tmp_path, allow_plaintext=True)


@pytest.mark.parametrize(("name", "value"), [("poll_interval", 0), ("busy_timeout", -1)])
def test_bad_timings_are_refused(db: pathlib.Path, name: str, value: float) -> None:
    options: dict[str, Any] = {name: value}
    with pytest.raises(ValueError, match=name):
        SQLiteStore(db, allow_plaintext=True, **options)


async def test_garbage_file_raises_from_every_operation(
    open_store: OpenStore, db: pathlib.Path
) -> None:
    overwrite(db, b"this is not a database, just garbage " * 200)
    store = open_store()
    operations: list[Callable[[], Awaitable[object]]] = [
        lambda: store.get(KEY),
        lambda: store.put(KEY, b"v", 60),
        lambda: store.acquire(KEY, "a", 30),
        lambda: store.release(KEY, "a"),
        lambda: store.extend(KEY, "a", 30),
        lambda: store.notify(KEY),
        lambda: store.wait(KEY, 5),
    ]
    for operation in operations:
        with pytest.raises(sqlite3.DatabaseError):
            await asyncio.wait_for(operation(), 5)


async def test_corrupted_pages_raise(open_store: OpenStore, db: pathlib.Path) -> None:
    writer = open_store()
    for i in range(50):
        await writer.put(f"{KEY}-{i}", os.urandom(200), 60)
    await writer.aclose()  # checkpoints the WAL into the file
    overwrite(db, b"\xa5" * (os.stat(db).st_size - 100), at=100)  # keep the header, ruin every page
    store = open_store()
    with pytest.raises(sqlite3.DatabaseError):
        await asyncio.wait_for(store.get(f"{KEY}-1"), 5)


async def test_closed_store_refuses_work_and_stops_its_thread(
    open_store: OpenStore, db: pathlib.Path
) -> None:
    store = open_store(poll_interval=60)
    await store.put(KEY, b"v", 60)
    assert store_threads()
    waiter = asyncio.create_task(store.wait(KEY, 60))
    await asyncio.sleep(0)
    await store.aclose()
    await asyncio.wait_for(waiter, 1)  # aclose wakes waiters
    await store.aclose()  # idempotent
    assert store_threads() == []
    assert mode_of(f"{db}-wal") is None  # the last connection checkpointed and removed it
    with pytest.raises(RuntimeError, match="closed"):
        await store.get(KEY)


# --- waiting ------------------------------------------------------------------------------


async def test_wait_returns_after_the_timeout(open_store: OpenStore) -> None:
    store = open_store(poll_interval=0.05)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await store.wait(KEY, 0.2)
    assert 0.2 <= loop.time() - start < 0.6
    start = loop.time()
    await store.wait(KEY, 0)
    assert loop.time() - start < 0.2


async def test_local_notify_wakes_at_once(open_store: OpenStore) -> None:
    store = open_store(poll_interval=60)  # polling cannot be what wakes it
    waiters = [asyncio.create_task(store.wait(KEY, 60)) for _ in range(3)]
    other = asyncio.create_task(store.wait("other-key", 60))
    await asyncio.sleep(0)
    await store.notify(KEY)
    await asyncio.wait_for(asyncio.gather(*waiters), 1)
    assert not other.done()
    other.cancel()


async def test_local_notify_wakes_a_waiter_on_another_threads_loop(
    open_store: OpenStore,
) -> None:
    store = open_store(poll_interval=60)
    started = threading.Event()
    took: list[float] = []

    async def wait_in_thread() -> None:
        start = time.monotonic()
        waiter = asyncio.create_task(store.wait(KEY, 30))
        await asyncio.sleep(0)  # the waiter is registered
        started.set()
        await waiter
        took.append(time.monotonic() - start)

    thread = threading.Thread(target=asyncio.run, args=(wait_in_thread(),))
    thread.start()
    assert await asyncio.to_thread(started.wait, 5)
    await store.notify(KEY)
    await asyncio.to_thread(thread.join, 5)
    assert not thread.is_alive()
    assert took and took[0] < 5


async def test_notify_from_another_store_wakes_within_a_few_polls(
    open_store: OpenStore,
) -> None:
    waiting, writer = open_store(poll_interval=0.05), open_store()
    loop = asyncio.get_running_loop()
    waiter = asyncio.create_task(waiting.wait(KEY, 30))
    await asyncio.sleep(0.1)  # let it settle into polling
    assert not waiter.done()
    await writer.put(KEY, b"fresh", 60)
    await writer.notify(KEY)
    start = loop.time()
    await asyncio.wait_for(waiter, 5)
    assert loop.time() - start < 0.5
    assert await waiting.get(KEY) == b"fresh"


async def test_notify_between_get_and_wait_is_not_missed(open_store: OpenStore) -> None:
    waiting, writer = open_store(poll_interval=60), open_store()
    assert await waiting.get(KEY) is None
    await writer.put(KEY, b"fresh", 60)
    await writer.notify(KEY)  # lands before the wait starts
    await asyncio.wait_for(waiting.wait(KEY, 60), 1)


async def test_released_lease_wakes_waiters_in_another_store(open_store: OpenStore) -> None:
    waiting, holder = open_store(poll_interval=0.02), open_store()
    assert await holder.acquire(KEY, "holder", 30)
    waiter = asyncio.create_task(waiting.wait(KEY, 30))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    assert await holder.release(KEY, "holder")
    await asyncio.wait_for(waiter, 1)
    assert await waiting.acquire(KEY, "waiter", 30)


async def test_wait_is_not_a_hot_loop(open_store: OpenStore) -> None:
    store = open_store(poll_interval=0.01)
    returns = 0

    async def keep_waiting() -> None:
        nonlocal returns
        while True:
            await store.wait(KEY, 3600)
            returns += 1

    task = asyncio.create_task(keep_waiting())
    cpu = time.process_time()
    await asyncio.sleep(0.5)
    used = time.process_time() - cpu
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert returns == 0  # nothing happened, so nothing to return for
    assert used < 0.25, f"{used:.3f}s of CPU in 0.5s of waiting"


async def test_wait_keeps_its_timeout_while_the_database_is_locked(
    open_store: OpenStore, db: pathlib.Path
) -> None:
    store = open_store(poll_interval=0.05, busy_timeout=3)
    await store.get(KEY)
    loop = asyncio.get_running_loop()
    with write_lock(db):
        stuck = asyncio.create_task(store.put(KEY, b"v", 60))  # holds the store's thread
        await asyncio.sleep(0.05)
        start = loop.time()
        await store.wait(KEY, 0.2)
        # Stuck behind the put, it would wait out the put's 3 s busy timeout.
        assert loop.time() - start < 1
    await asyncio.wait_for(stuck, 5)


# --- the event loop and locks ----------------------------------------------------------------


async def test_event_loop_keeps_running_while_a_write_waits_for_the_lock(
    open_store: OpenStore, db: pathlib.Path
) -> None:
    store = open_store(busy_timeout=5)
    await store.get(KEY)  # connected: only the put below waits
    loop = asyncio.get_running_loop()
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(loop.time())
            await asyncio.sleep(0.01)

    with write_lock(db) as blocker:
        loop.call_later(0.3, blocker.execute, "COMMIT")
        ticking = asyncio.create_task(ticker())
        start = loop.time()
        await store.put(KEY, b"v", 60)
        took = loop.time() - start
        ticking.cancel()
    assert took >= 0.25  # the put really waited for the other writer
    during = [t for t in ticks if start <= t <= start + took]
    assert len(during) >= 10
    assert max(b - a for a, b in itertools.pairwise(during)) < 0.2  # never the whole 0.3 s
    assert await store.get(KEY) == b"v"


async def test_a_lock_held_too_long_raises_instead_of_hanging(
    open_store: OpenStore, db: pathlib.Path
) -> None:
    store = open_store(busy_timeout=0.2)
    await store.get(KEY)
    loop = asyncio.get_running_loop()
    with write_lock(db):
        start = loop.time()
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            await asyncio.wait_for(store.acquire(KEY, "a", 30), 5)
        assert loop.time() - start < 2
        assert await store.get(KEY) is None  # readers are not blocked by a writer (WAL)
    assert await store.acquire(KEY, "a", 30)


# --- fork ---------------------------------------------------------------------------------


def _use_inherited(store: SQLiteStore, results: Any) -> None:  # runs in a forked process
    async def use() -> bytes | None:
        await store.put("child", b"from child", 60)
        return await store.get(KEY)

    try:
        results.put(asyncio.run(asyncio.wait_for(use(), 10)))
    except BaseException as error:
        results.put(f"{type(error).__name__}: {error}")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # 3.12+: fork with threads
async def test_a_forked_worker_can_use_an_inherited_store(open_store: OpenStore) -> None:
    store = open_store()
    await store.put(KEY, b"from parent", 60)  # the parent's thread and connection are live
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    child = ctx.Process(target=_use_inherited, args=(store, results))
    child.start()
    try:
        outcome = await asyncio.to_thread(results.get, timeout=30)
    finally:
        child.join(timeout=30)
    assert outcome == b"from parent"
    assert child.exitcode == 0
    assert await store.get("child") == b"from child"
