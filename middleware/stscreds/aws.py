"""Using the credentials: botocore clients (cached, thread-safe), boto3 sessions, and
refreshable botocore credentials for long-lived clients.

A fresh botocore session re-reads the service models: about 250 ms for a first S3 client,
on every request that makes one. ``client()`` instead creates clients on one shared session
(15-25 ms each) and keeps the last ones made, so a request whose credentials came from the
cache gets its client from a dictionary too (a few microseconds).

``refreshable(broker, role)`` is for a client made once and used for hours: its credentials
ask the broker again only when the broker's own plan says a refresh is due.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Coroutine
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import botocore.session
from botocore.config import Config
from botocore.credentials import (
    CredentialProvider,
    CredentialResolver,
    DeferredRefreshableCredentials,
    ReadOnlyCredentials,
)
from cachetools import LRUCache

from ._broker import CredentialBroker
from ._cache import MANDATORY_WINDOW
from ._credentials import Credentials
from ._errors import STSUnavailable
from ._exchange import install_log_filter
from ._roles import Role
from ._wsgi import _loop_for, _LoopThread, wait_for_credentials

if TYPE_CHECKING:
    import boto3

__all__ = [
    "CLIENT_CACHE_SIZE",
    "DEFAULT_CONFIG",
    "BrokerCredentials",
    "boto3_session",
    "client",
    "refreshable",
    "refreshable_session",
]

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
    install_log_filter()  # its clients log signed requests (the session token) at DEBUG
    return boto3.Session(region_name=region, **credentials.boto3_kwargs())


#: The ``method`` botocore reports for credentials from ``refreshable()``.
METHOD = "stscreds"
# After an answer that brought nothing newer (a background refresh still running, or STS
# failing while the cached credentials are still served), botocore asks again this many
# seconds later, not on every call.
_ASK_AGAIN = 1.0
_DEADLOCK = (
    "stscreds: no valid cached credentials for {arn}, and refreshing them here would "
    "deadlock: this thread runs the broker's event loop, which the refresh needs. Call "
    "botocore from a worker thread (asyncio.to_thread, run_in_executor) or await "
    "broker.get(role) before using the client here"
)


class BrokerCredentials(DeferredRefreshableCredentials):  # type: ignore[misc]
    """botocore RefreshableCredentials whose refreshes go through a CredentialBroker."""

    # botocore's 10 min would block every caller for most of a 15 min grant: the broker's
    # mandatory window (its last 60 s) instead. The advisory point is set per answer.
    _mandatory_refresh_timeout = MANDATORY_WINDOW

    def __init__(
        self,
        broker: CredentialBroker,
        role: Role,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        timeout: float | None = None,
    ) -> None:
        if not isinstance(broker, CredentialBroker):
            raise TypeError("broker: must be a CredentialBroker")
        if not isinstance(role, Role):
            raise TypeError("role: must be a stscreds Role")
        if loop is not None and not isinstance(loop, asyncio.AbstractEventLoop):
            raise TypeError("loop: must be None or an asyncio event loop")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0
        ):
            raise ValueError("timeout: must be None or a positive number of seconds")
        super().__init__(refresh_using=self._fetch, method=METHOD, time_fetcher=self._sts_now)
        self._advisory_refresh_timeout: float = MANDATORY_WINDOW
        self.broker = broker
        self.role = role
        #: Seconds a thread waits for the broker's answer (a cache miss waits for STS).
        self.timeout = broker.request_timeout + 1.0 if timeout is None else float(timeout)
        self._loop = loop
        # Without a loop: the broker's own loop thread, shared with the WSGI middleware (one
        # loop per broker, so every thread shares its single-flight), started on first use.
        self._loop_thread: _LoopThread | None = None if loop is not None else _loop_for(broker)
        self._released = False

    def get_frozen_credentials(self) -> Any:
        """Credentials to sign one request with, refreshed through the broker when due."""
        if self._on_broker_loop():
            return self._frozen_on_loop()
        self._refresh_off_loop()
        return self._frozen_credentials

    def close(self, timeout: float = 5.0) -> None:
        """Stop using the broker's loop thread (the last user stops it); refreshes then fail."""
        if self._loop_thread is not None and not self._released:
            self._released = True
            self._loop_thread.release(timeout)

    def _refresh(self) -> None:
        # Every botocore path (get_frozen_credentials, the access_key/secret_key/token
        # properties) comes here; on the broker's loop botocore's blocking refresh, or its
        # refresh lock held by a thread waiting for this very loop, would hang it for good.
        if self._on_broker_loop():
            self._frozen_on_loop()
        else:
            self._refresh_off_loop()

    def _refresh_off_loop(self) -> None:
        # botocore's own: lock-free while no refresh is due; then one thread asks the broker
        # (the others keep the current credentials, or wait in the mandatory window).
        super()._refresh()

    def _on_broker_loop(self) -> bool:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return False
        loop = self._loop if self._loop_thread is None else self._loop_thread._loop
        return running is loop

    def _frozen_on_loop(self) -> Any:
        # Never waits: the broker's cache, which also starts the background refresh when one
        # is due (the thread is the broker's loop, where that is allowed).
        frozen = self._frozen_credentials
        if frozen is not None and not self.refresh_needed():
            return frozen
        credentials = self.broker.get_cached(self.role)
        if credentials is None:
            raise RuntimeError(_DEADLOCK.format(arn=self.role.arn))
        return ReadOnlyCredentials(
            credentials.access_key_id, credentials.secret_access_key, credentials.session_token
        )

    def _sts_now(self) -> datetime:
        # STS's clock as the broker learned it, counted ahead by its uncertainty: what
        # botocore sees left before expiry is what the broker plans with.
        sts_clock = self.broker.sts_clock
        return datetime.fromtimestamp(sts_clock.now() + sts_clock.margin, timezone.utc)

    def _fetch(self) -> dict[str, str]:
        # botocore's refresh_using, called under its refresh lock, off the broker's loop.
        mandatory = self.refresh_needed(self._mandatory_refresh_timeout)
        try:
            credentials = self.broker.peek(self.role)
            if credentials is None:
                credentials = self._get_on_loop()
        except Exception:
            if not mandatory:
                # botocore keeps the current credentials and logs a warning: once a second
                # at most, not on every call.
                expiry = self._expiry_time
                if expiry is not None:
                    left = (expiry - self._sts_now()).total_seconds()
                    self._advisory_refresh_timeout = left - _ASK_AGAIN
            raise
        self._advisory_refresh_timeout = self._ask_before_expiry(credentials)
        return {
            "access_key": credentials.access_key_id,
            "secret_key": credentials.secret_access_key,
            "token": credentials.session_token,
            "expiry_time": credentials.expiration.isoformat(),
        }

    def _ask_before_expiry(self, credentials: Credentials) -> float:
        # Seconds before expiry at which botocore asks the broker again: when the broker's
        # refresh becomes due (its jittered refresh-ahead point, or a retry after a failed
        # one), so every caller in between is served from botocore's frozen credentials.
        broker = self.broker
        sts_clock = broker.sts_clock
        left = sts_clock.left(credentials.expiration.timestamp())
        now = sts_clock.local.time()
        entry = broker._entries.get(broker.identity_key(self.role))
        if entry is not None and entry.credentials == credentials:
            due = (
                entry.refresh_at
                if now < entry.refresh_at
                else min(entry.retry_at, entry.mandatory_at)  # after a failed refresh
            )
            if due > now:
                return left - (due - now)
        return left - _ASK_AGAIN

    def _get_on_loop(self) -> Credentials:
        role = self.role
        try:
            if self._loop_thread is not None:
                if self._released:
                    raise RuntimeError("closed")
                future = self._loop_thread.submit(self.broker.get, role)
            else:
                assert self._loop is not None
                future = _submit(self.broker.get(role), self._loop)
        except RuntimeError:
            raise STSUnavailable(
                "stscreds: the broker's event loop is closed", role_arn=role.arn
            ) from None
        return wait_for_credentials(
            future, self.timeout, role, closed="stscreds: the broker's event loop closed"
        )

    def __repr__(self) -> str:
        return f"BrokerCredentials(role_arn={self.role.arn!r}, broker={self.broker!r})"


class _BrokerProvider(CredentialProvider):  # type: ignore[misc]
    """The one entry of a session's credential chain: the broker's refreshable credentials."""

    METHOD = METHOD
    CANONICAL_NAME = "custom-stscreds"

    def __init__(self, credentials: BrokerCredentials) -> None:
        super().__init__()
        self._credentials = credentials

    def load(self) -> BrokerCredentials:
        """The refreshable credentials (nothing is fetched until a client signs)."""
        return self._credentials


def _submit(
    coroutine: Coroutine[Any, Any, Credentials], loop: asyncio.AbstractEventLoop
) -> concurrent.futures.Future[Credentials]:
    try:
        return asyncio.run_coroutine_threadsafe(coroutine, loop)
    except BaseException:
        coroutine.close()  # never scheduled: no "coroutine was never awaited"
        raise


def refreshable(
    broker: CredentialBroker,
    role: Role,
    *,
    loop: asyncio.AbstractEventLoop | None = None,
    timeout: float | None = None,
) -> BrokerCredentials:
    """botocore credentials for ``role`` that refresh through ``broker``, from any thread."""
    return BrokerCredentials(broker, role, loop=loop, timeout=timeout)


def refreshable_session(
    broker: CredentialBroker,
    role: Role,
    *,
    region: str | None = None,
    loop: asyncio.AbstractEventLoop | None = None,
    timeout: float | None = None,
) -> Any:
    """A new botocore Session whose only credentials are ``refreshable(broker, role, ...)``."""
    credentials = refreshable(broker, role, loop=loop, timeout=timeout)
    session = botocore.session.get_session()
    # The public way to give a session its credentials object: its credential chain is a
    # component; this one has a single provider, so the environment, ~/.aws and instance
    # metadata are never consulted.
    session.register_component(
        "credential_provider", CredentialResolver([_BrokerProvider(credentials)])
    )
    if region is not None:
        session.set_config_variable("region", region)
    return session


def _shared_session() -> Any:
    # Called with _create_lock held.
    global _session
    if _session is None:
        # botocore at DEBUG logs each signed request, the session token among its headers.
        install_log_filter()
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
