"""Credential providers for obstore's ``S3Store``, backed by a CredentialBroker and a Role.

``S3Store(bucket, credential_provider=CredentialProvider(broker, role))`` signs every request
with the broker's temporary credentials for ``role``. obstore keeps what a provider returns
until ``expires_at`` minus its own refresh threshold (300 s), then calls it again; each call
goes through the broker (cache, single-flight, shared store, refresh-ahead), so obstore
never calls STS itself.

``expires_at`` is when the credentials have ``margin`` seconds (``DEFAULT_MARGIN``, 120 s)
left on STS's clock, as a time on this host's clock (the one obstore reads): obstore never
signs with credentials the broker would no longer hand out, even if the host clock is off.

Two forms, for obstore's two APIs:

* ``CredentialProvider``: async. obstore runs the coroutine on the event loop that awaited
  the ``*_async`` operation (it does not run it with the sync API: "no running event loop").
  The broker serves one event loop at a time: the loop the provider is made on (or first
  called on) is the broker's; a call from another loop runs ``broker.get`` there.
* ``SyncCredentialProvider``: a plain function, for the sync API and any thread (obstore
  calls it on the calling thread, or on one of its runtime threads for the async API). A
  cached hit is answered in place; otherwise ``broker.get`` runs on the broker's loop, or
  the broker's shared background loop (the one ``CredentialsWSGIMiddleware`` uses) when it
  has none, and the thread waits.

Errors (``CredentialsRejected``, ``STSUnavailable``) are raised by the call with their
message; obstore wraps them in ``obstore.exceptions.UnauthenticatedError``. Nothing here
imports obstore: ``pip install 'stscreds[obstore]'`` for obstore itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import weakref
from datetime import datetime, timedelta, timezone
from typing import TypedDict

from ._broker import CredentialBroker
from ._cache import MANDATORY_WINDOW
from ._credentials import Credentials
from ._errors import STSUnavailable
from ._roles import Role
from ._wsgi import _loop_for, _LoopThread, wait_for_credentials

__all__ = ["DEFAULT_MARGIN", "CredentialProvider", "S3Credential", "SyncCredentialProvider"]

#: Seconds before expiry (on STS's clock) at which obstore is told the credentials expire:
#: twice the broker's mandatory window, so obstore asks again while the broker still serves
#: them from its cache (refreshing ahead in the background), never waiting on STS.
DEFAULT_MARGIN = 2 * MANDATORY_WINDOW


class _S3CredentialKeys(TypedDict):
    access_key_id: str
    secret_access_key: str
    expires_at: datetime | None


class S3Credential(_S3CredentialKeys, total=False):
    """What a provider returns: the shape of ``obstore.store.S3Credential``."""

    token: str | None


# The event loop each broker runs on (a broker serves one loop at a time), shared by every
# provider of that broker. Only loops that are running count; a stopped one is replaced by
# the next loop that asks.
_HOMES: weakref.WeakKeyDictionary[CredentialBroker, asyncio.AbstractEventLoop] = (
    weakref.WeakKeyDictionary()
)
# Guards _HOMES and every provider's _thread; only ever held for a few attribute operations.
_LOCK = threading.Lock()


def _is_live(loop: asyncio.AbstractEventLoop | None) -> bool:
    return loop is not None and loop.is_running() and not loop.is_closed()


def _home(broker: CredentialBroker) -> asyncio.AbstractEventLoop | None:
    """The broker's loop if it is running, else None."""
    with _LOCK:
        loop = _HOMES.get(broker)
    return loop if _is_live(loop) else None


def _adopt(
    broker: CredentialBroker, loop: asyncio.AbstractEventLoop, *, force: bool = False
) -> asyncio.AbstractEventLoop:
    """Make ``loop`` the broker's loop unless a running one is set (or ``force``); returns
    the broker's loop."""
    with _LOCK:
        home = _HOMES.get(broker)
        if force or home is None or not _is_live(home):
            _HOMES[broker] = home = loop
        return home


def _forget_homes_after_fork() -> None:
    # The parent's loops do not run in a child (their threads do not exist here).
    global _LOCK
    _LOCK = threading.Lock()
    _HOMES.clear()


if hasattr(os, "register_at_fork"):  # POSIX only; there is no fork elsewhere
    os.register_at_fork(after_in_child=_forget_homes_after_fork)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def _get_on_home(broker: CredentialBroker, role: Role) -> Credentials:
    # Runs on the loop that serves the broker: the first to ask makes it the broker's loop.
    _adopt(broker, asyncio.get_running_loop())
    return await broker.get(role)


class _Provider:
    """What both forms share: the arguments, their checks, and the answer's shape."""

    __slots__ = ("_timeout", "broker", "margin", "role")

    def __init__(
        self,
        broker: CredentialBroker,
        role: Role,
        *,
        margin: float,
        timeout: float | None,
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        if not isinstance(broker, CredentialBroker):
            raise TypeError("broker: must be a stscreds CredentialBroker")
        if not isinstance(role, Role):
            raise TypeError("role: must be a stscreds Role")
        if isinstance(margin, bool) or not isinstance(margin, int | float):
            raise TypeError("margin: must be a number of seconds")
        if not 0 <= margin < float("inf"):
            raise ValueError("margin: must be zero or more seconds")
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, int | float):
                raise TypeError("timeout: must be None or a number of seconds")
            if not 0 < timeout < float("inf"):
                raise ValueError("timeout: must be a positive number of seconds")
        if loop is not None and not isinstance(loop, asyncio.AbstractEventLoop):
            raise TypeError("loop: must be None or an asyncio event loop")
        #: The broker the credentials come from.
        self.broker = broker
        #: The role they are for.
        self.role = role
        #: Seconds before expiry (on STS's clock) that ``expires_at`` is put at.
        self.margin = float(margin)
        self._timeout = timeout
        if loop is not None:
            _adopt(broker, loop, force=True)
        else:
            running = _running_loop()
            if running is not None:
                _adopt(broker, running)

    @property
    def timeout(self) -> float:
        """Seconds a call from off the broker's loop waits for its answer (default: the
        broker's ``request_timeout``, which ends the wait first, plus one)."""
        return self.broker.request_timeout + 1.0 if self._timeout is None else self._timeout

    def _credential(self, credentials: Credentials) -> S3Credential:
        # Seconds left on STS's clock (counted short by the clock's uncertainty), placed on
        # the host's clock, which is the one obstore compares expires_at with.
        left = self.broker.sts_clock.left(credentials.expiration.timestamp())
        return {
            "access_key_id": credentials.access_key_id,
            "secret_access_key": credentials.secret_access_key,
            "token": credentials.session_token,
            "expires_at": datetime.now(timezone.utc) + timedelta(seconds=left - self.margin),
        }

    def _gave_up(self) -> STSUnavailable:
        return STSUnavailable(f"no credentials within {self.timeout:g}s", role_arn=self.role.arn)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(role={self.role.arn!r}, margin={self.margin:g})"


class CredentialProvider(_Provider):
    """Async ``credential_provider`` for obstore's ``S3Store``: the broker's credentials for
    ``role``, for obstore's async API (``put_async``, ``get_async``...).

    The loop it is made on (``loop``, else the running one, else the first it is called on)
    becomes the broker's; calls from another loop run ``broker.get`` on that one and wait
    at most ``timeout`` seconds. ``margin``: see ``DEFAULT_MARGIN``.
    """

    __slots__ = ()

    def __init__(
        self,
        broker: CredentialBroker,
        role: Role,
        *,
        margin: float = DEFAULT_MARGIN,
        timeout: float | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(broker, role, margin=margin, timeout=timeout, loop=loop)

    async def __call__(self) -> S3Credential:
        """The credentials as obstore wants them; raises CredentialsUnavailable."""
        loop = asyncio.get_running_loop()
        home = _adopt(self.broker, loop)
        if home is loop:
            credentials = await self.broker.get(self.role)
        else:
            credentials = self.broker.peek(self.role) or await self._from(home)
        return self._credential(credentials)

    async def _from(self, home: asyncio.AbstractEventLoop) -> Credentials:
        # Another loop serves the broker: ask it there, so its single-flight and its
        # in-flight exchanges (which belong to that loop) cover this call too.
        coroutine = _get_on_home(self.broker, self.role)
        try:
            future = asyncio.run_coroutine_threadsafe(coroutine, home)
        except RuntimeError:
            # That loop closed in the meantime: this one serves the broker from now on.
            coroutine.close()
            _adopt(self.broker, asyncio.get_running_loop(), force=True)
            return await self.broker.get(self.role)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout)
        except asyncio.TimeoutError:
            # Cancels this wait only: the shared exchange goes on for the others.
            future.cancel()
            raise self._gave_up() from None


class SyncCredentialProvider(_Provider):
    """Sync ``credential_provider`` for obstore's ``S3Store``: the broker's credentials for
    ``role``, for obstore's sync and async APIs, from any thread.

    A cached hit is answered in the calling thread; otherwise ``broker.get`` runs on the
    broker's loop (``loop``, or the one a CredentialProvider of this broker runs on) or, with
    none, the broker's shared background loop, and the thread waits at most ``timeout``
    seconds. ``close()`` lets go of that background loop.
    """

    __slots__ = ("_closed", "_thread")

    def __init__(
        self,
        broker: CredentialBroker,
        role: Role,
        *,
        margin: float = DEFAULT_MARGIN,
        timeout: float | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(broker, role, margin=margin, timeout=timeout, loop=loop)
        self._thread: _LoopThread | None = None
        self._closed = False

    def __call__(self) -> S3Credential:
        """The credentials as obstore wants them; raises CredentialsUnavailable."""
        credentials = self.broker.peek(self.role)
        if credentials is None:
            credentials = self._wait(self._submit())
        return self._credential(credentials)

    def close(self) -> None:
        """Stop using the broker's background loop (the last user stops it); later calls
        that miss the cache raise STSUnavailable. The broker stays open."""
        with _LOCK:
            self._closed = True
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.release()

    def _submit(self) -> concurrent.futures.Future[Credentials]:
        if self._closed:
            raise STSUnavailable(
                "stscreds: the obstore credential provider is closed", role_arn=self.role.arn
            )
        home = _home(self.broker)
        if home is not None:
            if home is _running_loop():
                # obstore's sync API called on the broker's own loop: that loop cannot
                # serve the exchange while this call blocks it.
                raise RuntimeError(
                    "stscreds: obstore's sync API was called on the event loop the broker "
                    "runs on, which it blocks: use the async API (e.g. obstore.put_async) "
                    "with stscreds.obstore.CredentialProvider"
                )
            coroutine = _get_on_home(self.broker, self.role)
            try:
                return asyncio.run_coroutine_threadsafe(coroutine, home)
            except RuntimeError:  # that loop closed in the meantime
                coroutine.close()
        # No loop serves the broker: its shared background loop does.
        for _ in range(2):
            with _LOCK:
                if self._thread is None:
                    self._thread = _loop_for(self.broker)
                thread = self._thread
            try:
                return thread.submit(_get_on_home, self.broker, self.role)
            except RuntimeError:
                # Closed under us (interpreter exit, or every user let go): take a new one.
                with _LOCK:
                    if self._thread is thread:
                        self._thread = None
        raise STSUnavailable(
            "stscreds: no event loop to fetch credentials on", role_arn=self.role.arn
        )

    def _wait(self, future: concurrent.futures.Future[Credentials]) -> Credentials:
        return wait_for_credentials(
            future, self.timeout, self.role, closed="stscreds: the broker's event loop stopped"
        )
