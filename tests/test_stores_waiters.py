"""Tests for stscreds.stores._waiters: in-process wake-ups shared by SQLite and DynamoDB."""

from __future__ import annotations

import asyncio
import gc
import threading

from stscreds.stores._waiters import consume, registered, wake


async def test_wake_resolves_every_waiter_of_the_key_and_only_those() -> None:
    loop = asyncio.get_running_loop()
    mine = {loop.create_future(), loop.create_future()}
    other = loop.create_future()
    waiters = {"k": set(mine), "other": {other}}
    wake(waiters, "k")
    assert all(f.done() and f.result() is None for f in mine)
    assert not other.done() and "k" not in waiters and "other" in waiters
    wake(waiters, "missing")  # nobody waits: nothing happens
    done = loop.create_future()
    done.cancel()
    wake({"k": {done}}, "k")  # a waiter already gone is left as it is
    assert done.cancelled()


async def test_wake_reaches_a_waiter_on_another_threads_loop() -> None:
    ready, finished = threading.Event(), threading.Event()
    holder: dict[str, object] = {}

    def other_thread() -> None:
        async def wait() -> None:
            future = asyncio.get_running_loop().create_future()
            holder["future"] = future
            ready.set()
            await asyncio.wait_for(future, 10)
            finished.set()

        asyncio.run(wait())

    thread = threading.Thread(target=other_thread)
    thread.start()
    assert await asyncio.to_thread(ready.wait, 10)
    wake({"k": {holder["future"]}}, "k")  # type: ignore[dict-item]
    assert await asyncio.to_thread(finished.wait, 10)
    thread.join(10)
    # A waiter whose loop has closed meanwhile is skipped, not an error.
    wake({"k": {holder["future"]}}, "k")  # type: ignore[dict-item]


async def test_consume_retrieves_the_exception() -> None:
    loop = asyncio.get_running_loop()
    failed = loop.create_future()
    failed.set_exception(RuntimeError("boom"))
    consume(failed)
    cancelled = loop.create_future()
    cancelled.cancel()
    consume(cancelled)  # no exception to retrieve: no error either
    assert failed._log_traceback is False  # type: ignore[attr-defined]
    del failed
    gc.collect()


async def test_registered_is_woken_in_its_block_and_forgotten_after() -> None:
    waiters: dict[str, set[asyncio.Future[None]]] = {}
    with registered(waiters, "k") as first, registered(waiters, "k") as second:
        assert waiters == {"k": {first, second}}
        wake(waiters, "k")
        assert first.done() and second.done()
    assert waiters == {}
    with registered(waiters, "k") as third:
        pass
    assert waiters == {} and not third.done()  # left, not woken
