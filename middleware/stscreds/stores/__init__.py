"""Shared credential stores: one set of credentials per identity for every worker.

``MemoryStore`` (one process), ``SQLiteStore`` (the workers of one host) and ``RedisStore``
(a fleet; needs ``pip install stscreds[redis]``). All encrypt at rest by default.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._cipher import StoreCipher, generate_key
from ._protocol import CredentialStore
from .memory import MemoryStore

if TYPE_CHECKING:
    from .redis import RedisStore
    from .sqlite import SQLiteStore

__all__ = [
    "CredentialStore",
    "MemoryStore",
    "RedisStore",
    "SQLiteStore",
    "StoreCipher",
    "generate_key",
]


def __getattr__(name: str) -> Any:
    # Imported on first use so that redis-py stays an optional extra.
    if name == "RedisStore":
        from .redis import RedisStore

        return RedisStore
    if name == "SQLiteStore":
        from .sqlite import SQLiteStore

        return SQLiteStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
