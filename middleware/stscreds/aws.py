"""Using the credentials: botocore clients (cached, thread-safe) and boto3 sessions.

A fresh botocore session re-reads the service models: about 250 ms for a first S3 client,
on every request that makes one. ``client()`` instead creates clients on one shared session
(15-25 ms each) and keeps the last ones made, so a request whose credentials came from the
cache gets its client from a dictionary too (a few microseconds).
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

import botocore.session
from botocore.config import Config
from cachetools import LRUCache

from ._credentials import Credentials

if TYPE_CHECKING:
    import boto3

__all__ = ["CLIENT_CACHE_SIZE", "DEFAULT_CONFIG", "boto3_session", "client"]

#: Timeouts for the clients made here: botocore's 60 s defaults are far too long for a
#: request path. A ``config`` passed to ``client()`` is merged over this one.
DEFAULT_CONFIG = Config(connect_timeout=2, read_timeout=10, retries={"mode": "standard"})
#: How many clients ``client()`` keeps (least recently used go first).
CLIENT_CACHE_SIZE = 256

# botocore sessions are not thread-safe (concurrent create_client can fail with KeyError):
# every use of the shared session is serialized by _create_lock; _cache_lock is only ever
# held for a dictionary operation, so a cached client is never stuck behind a creation.
_create_lock = threading.Lock()
_cache_lock = threading.Lock()
_session: Any = None
_clients: LRUCache[tuple[Any, ...], Any] = LRUCache(maxsize=CLIENT_CACHE_SIZE)


def client(
    credentials: Credentials,
    service: str,
    *,
    region: str | None = None,
    endpoint_url: str | None = None,
    config: Config | None = None,
    **kwargs: Any,
) -> Any:
    """A botocore client for ``service`` signed with ``credentials``; safe to share by threads.

    Clients are reused for equal credentials, service, region, endpoint and ``config`` object
    (pass the same Config each time to benefit); extra ``kwargs`` go to ``create_client``
    and bypass the reuse.
    """
    if not isinstance(credentials, Credentials):
        raise TypeError("credentials: must be stscreds Credentials")
    key = (credentials, service, region, endpoint_url, config) if not kwargs else None
    if key is not None:
        with _cache_lock:
            made = _clients.get(key)
        if made is not None:
            return made
    with _create_lock:
        if key is not None:
            with _cache_lock:
                made = _clients.get(key)  # another thread may have just made it
            if made is not None:
                return made
        made = _shared_session().create_client(
            service,
            region_name=region,
            endpoint_url=endpoint_url,
            config=DEFAULT_CONFIG.merge(config) if config is not None else DEFAULT_CONFIG,
            **credentials.boto3_kwargs(),
            **kwargs,
        )
    if key is not None:
        with _cache_lock:
            _clients[key] = made
    return made


def boto3_session(credentials: Credentials, region: str | None = None) -> boto3.Session:
    """A new ``boto3.Session`` using ``credentials`` (needs boto3 installed).

    Each session loads its own service models (about 250 ms for its first client): for a
    request path prefer ``client()``; a session suits resources and background jobs.
    """
    if not isinstance(credentials, Credentials):
        raise TypeError("credentials: must be stscreds Credentials")
    try:
        import boto3
    except ImportError:
        raise ImportError(
            "stscreds.aws.boto3_session needs boto3: pip install boto3 "
            "(or use stscreds.aws.client, which needs only botocore)"
        ) from None
    return boto3.Session(region_name=region, **credentials.boto3_kwargs())


def _shared_session() -> Any:
    # Called with _create_lock held.
    global _session
    if _session is None:
        _session = botocore.session.get_session()
    return _session


def _forget_clients_after_fork() -> None:
    # A parent's clients hold its HTTP connections, which a child must not share; a lock held
    # in the parent at fork time would never be released here.
    global _create_lock, _cache_lock
    _create_lock = threading.Lock()
    _cache_lock = threading.Lock()
    _clients.clear()


if hasattr(os, "register_at_fork"):  # POSIX only; there is no fork elsewhere
    os.register_at_fork(after_in_child=_forget_clients_after_fork)
