"""In-process wake-ups for stores whose other processes can only poll (SQLite, DynamoDB)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = ["consume", "registered", "wake"]


@contextlib.contextmanager
def registered(
    waiters: dict[str, set[asyncio.Future[None]]], key: str
) -> Iterator[asyncio.Future[None]]:
    """A future that ``wake(waiters, key)`` resolves, registered for the block's duration."""
    woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waiters.setdefault(key, set()).add(woken)
    try:
        yield woken
    finally:
        mine = waiters.get(key)
        if mine is not None:
            mine.discard(woken)
            if not mine:
                del waiters[key]


def wake(waiters: dict[str, set[asyncio.Future[None]]], key: str) -> None:
    """Resolve every future waiting on ``key``, each on its own event loop."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    for waiter in waiters.pop(key, ()):
        loop = waiter.get_loop()
        if loop is running:
            _resolve(waiter)
        else:
            # Another thread's event loop; if that loop is closed, nobody waits any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, waiter)


def consume(future: asyncio.Future[Any]) -> None:
    """Retrieve a finished future's exception, so asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
