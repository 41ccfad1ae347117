"""Shared credential stores: one set of credentials per identity for every worker.

``MemoryStore`` (one process), ``SQLiteStore`` (the workers of one host), ``RedisStore``
(a fleet; needs ``pip install stscreds[redis]``) and ``DynamoDBStore`` (a fleet on AWS, one
DynamoDB table). All encrypt at rest by default.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._cipher import StoreCipher, generate_key
from ._protocol import CredentialStore
from .memory import MemoryStore

if TYPE_CHECKING:
    from .dynamodb import DynamoDBStore
    from .redis import RedisStore
    from .sqlite import SQLiteStore

__all__ = [
    "CredentialStore",
    "DynamoDBStore",
    "MemoryStore",
    "RedisStore",
    "SQLiteStore",
    "StoreCipher",
    "generate_key",
]


def __getattr__(name: str) -> Any:
    # Imported on first use so that redis-py stays an optional extra (and botocore's DynamoDB
    # support is not loaded by apps that do not use it).
    if name == "DynamoDBStore":
        from .dynamodb import DynamoDBStore

        return DynamoDBStore
    if name == "RedisStore":
        from .redis import RedisStore

        return RedisStore
    if name == "SQLiteStore":
        from .sqlite import SQLiteStore

        return SQLiteStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
