"""The CredentialStore protocol: what a shared store must do for the broker."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ._cipher import StoreCipher

__all__ = ["CredentialStore"]


@runtime_checkable
class CredentialStore(Protocol):
    """An async key-value store with leases, shared by every worker that uses it.

    Keys are opaque digests and values opaque sealed bytes: the broker encrypts before
    ``put`` and decrypts after ``get`` with ``cipher``, so a backend never sees credentials.
    Every method may raise; the broker treats any error (or a slow answer) as "store down"
    and carries on without the store.
    """

    #: Seals and opens values; built from the store's encryption keys.
    cipher: StoreCipher

    async def get(self, key: str) -> bytes | None:
        """The value stored under ``key``, or None if there is none (or it expired)."""
        ...

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds (replacing any older value)."""
        ...

    async def acquire(self, key: str, owner: str, ttl: float) -> bool:
        """Take the lease on ``key`` for ``owner`` for ``ttl`` seconds, if nobody holds it.

        True when ``owner`` now holds it. An expired lease is free to take.
        """
        ...

    async def release(self, key: str, owner: str) -> bool:
        """Give up the lease if ``owner`` holds it; True if it did."""
        ...

    async def extend(self, key: str, owner: str, ttl: float) -> bool:
        """Push the lease's expiry to ``ttl`` seconds from now if ``owner`` holds it."""
        ...

    async def holder(self, key: str) -> str | None:
        """The owner holding the lease on ``key`` now, or None if nobody does."""
        ...

    async def notify(self, key: str) -> None:
        """Tell waiters on ``key`` (in any process) that a new value was put."""
        ...

    async def wait(self, key: str, timeout: float) -> None:
        """Return when ``key`` is notified or after at most ``timeout`` seconds.

        May return early (a backend without notifications polls); callers check again.
        """
        ...

    async def aclose(self) -> None:
        """Release connections and background tasks."""
        ...
