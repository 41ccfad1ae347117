"""MemoryStore: the CredentialStore protocol inside one process (tests, single-process code)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from ._cipher import StoreCipher

__all__ = ["MemoryStore"]


class MemoryStore:
    """An in-process CredentialStore: values, leases and notifications in dictionaries.

    Shares nothing across processes; useful for tests and as a reference backend.
    """

    def __init__(
        self,
        *,
        encryption_keys: Sequence[bytes | str] | None = None,
        allow_plaintext: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cipher = StoreCipher(encryption_keys, allow_plaintext=allow_plaintext)
        self._clock = clock
        self._values: dict[str, tuple[bytes, float]] = {}
        self._leases: dict[str, tuple[str, float]] = {}
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}

    async def get(self, key: str) -> bytes | None:
        """The value under ``key`` unless it expired."""
        item = self._values.get(key)
        if item is None or item[1] <= self._clock():
            return None
        return item[0]

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        """Store ``value`` for ``ttl`` seconds."""
        self._values[key] = (value, self._clock() + ttl)

    async def acquire(self, key: str, owner: str, ttl: float) -> bool:
        """Take the lease if it is free or expired."""
        now = self._clock()
        lease = self._leases.get(key)
        if lease is not None and lease[1] > now and lease[0] != owner:
            return False
        self._leases[key] = (owner, now + ttl)
        return True

    async def release(self, key: str, owner: str) -> bool:
        """Drop the lease if ``owner`` holds it."""
        lease = self._leases.get(key)
        if lease is None or lease[0] != owner:
            return False
        del self._leases[key]
        return True

    async def extend(self, key: str, owner: str, ttl: float) -> bool:
        """Extend the lease if ``owner`` holds it and it has not expired."""
        now = self._clock()
        lease = self._leases.get(key)
        if lease is None or lease[0] != owner or lease[1] <= now:
            return False
        self._leases[key] = (owner, now + ttl)
        return True

    async def holder(self, key: str) -> str | None:
        """The owner of the lease on ``key`` unless it expired."""
        lease = self._leases.get(key)
        if lease is None or lease[1] <= self._clock():
            return None
        return lease[0]

    async def notify(self, key: str) -> None:
        """Wake every waiter on ``key``."""
        for waiter in self._waiters.pop(key, ()):
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self, key: str, timeout: float) -> None:
        """Wait for ``notify(key)`` or ``timeout`` seconds."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, set()).add(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            waiters = self._waiters.get(key)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[key]

    async def aclose(self) -> None:
        """Nothing to release: values and leases stay for the other brokers sharing them."""

    def clear(self) -> None:
        """Forget every value and lease (for tests)."""
        self._values.clear()
        self._leases.clear()

    def __repr__(self) -> str:
        return f"MemoryStore(values={len(self._values)}, {self.cipher!r})"
