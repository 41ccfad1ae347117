"""Using the credentials from async code: aiobotocore clients, cached per event loop.

``s3 = await client(credentials, "s3")`` returns a ready aiobotocore client (already
entered, as ``async with session.create_client(...)`` would), so a route needs no
``async with``. Like ``stscreds.aws.client``, clients are made on one shared session and the
last ``CLIENT_CACHE_SIZE`` are kept, keyed by credentials, service, region, endpoint, config
object and extra arguments: new credentials (a refresh) get a new client, and the old one
ages out. An aiohttp session belongs to the event loop it was made on, so each running loop
has its own session and cache.

A client dropped from the cache (least recently used, or its credentials expired) is closed
``CLOSE_DELAY`` seconds later, so a call still using it can finish; use a client for the
work at hand and ask ``client()`` again next time (a hit is a dictionary lookup).
``await aclose()`` closes every client of the running loop: call it at the app's lifespan
shutdown, or aiohttp warns of unclosed client sessions when the loop ends.

Needs the ``aio`` extra: ``pip install 'stscreds[aio]'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Any

try:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session
except ImportError as error:
    raise ImportError(
        "stscreds.aio needs aiobotocore: pip install 'stscreds[aio]'", name="aiobotocore"
    ) from error

from botocore.config import Config

from ._credentials import Credentials

__all__ = ["CLIENT_CACHE_SIZE", "CLOSE_DELAY", "DEFAULT_CONFIG", "aclose", "client"]

#: Timeouts for the clients made here: botocore's 60 s defaults are far too long for a
#: request path. A ``config`` passed to ``client()`` is merged over this one.
DEFAULT_CONFIG = AioConfig(connect_timeout=2, read_timeout=10, retries={"mode": "standard"})
#: How many clients ``client()`` keeps per event loop (least recently used go first); read
#: when a loop makes its first client.
CLIENT_CACHE_SIZE = 256
#: Seconds between a client leaving the cache and its close, for calls still using it.
CLOSE_DELAY = 60.0

logger = logging.getLogger("stscreds")

_Key = tuple[Any, ...]

# One _LoopClients per running event loop. _states_lock is only ever held for a dictionary
# operation; everything else happens on the loop that owns the state, one task at a time.
_states: dict[asyncio.AbstractEventLoop, _LoopClients] = {}
_states_lock = threading.Lock()
# A forked child's copy of its parent's clients: kept (never used, never closed: closing
# would shut connections the parent still uses) so they are not collected with warnings.
_inherited: list[_LoopClients] = []


async def client(
    credentials: Credentials,
    service: str,
    *,
    region: str | None = None,
    endpoint_url: str | None = None,
    config: Config | None = None,
    **kwargs: Any,
) -> Any:
    """A ready aiobotocore client for ``service`` signed with ``credentials``, cached per loop.

    Clients are reused for equal credentials, service, region, endpoint, ``config`` object
    (pass the same Config each time to benefit) and extra ``kwargs`` (passed on to
    ``create_client``; they must be hashable). Do not close the client or use it in
    ``async with``: the cache closes it, at the latest at ``aclose()``.
    """
    if not isinstance(credentials, Credentials):
        raise TypeError("credentials: must be stscreds Credentials")
    if not isinstance(service, str) or not service:
        raise TypeError("service: must be a service name such as 's3'")
    if config is not None and not isinstance(config, Config):
        raise TypeError("config: must be a botocore Config (or an aiobotocore AioConfig)")
    key: _Key = (credentials, service, region, endpoint_url, config, *sorted(kwargs.items()))
    try:
        hash(key)
    except TypeError:
        raise TypeError("client: every extra create_client argument must be hashable") from None
    loop = asyncio.get_running_loop()
    state = _state_for(loop)
    made = state.clients.get(key)
    if made is not None:
        state.clients.move_to_end(key)
        return made
    making = state.making.get(key)
    if making is None:
        # A task of its own: concurrent callers share it, and one of them being cancelled
        # neither cancels it nor leaves a half-made client behind.
        making = loop.create_task(
            state.make(key, credentials, service, region, endpoint_url, config, kwargs)
        )
        state.making[key] = making
        making.add_done_callback(lambda task: state.made(key, task))
    return await asyncio.shield(making)


async def aclose() -> None:
    """Close every client ``client()`` made on the running event loop (at lifespan shutdown)."""
    loop = asyncio.get_running_loop()
    with _states_lock:
        state = _states.pop(loop, None)
    if state is not None:
        await state.aclose()


class _LoopClients:
    """One event loop's session, cached clients and clients waiting to be closed."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.session: Any = get_session()
        self.maxsize = max(1, CLIENT_CACHE_SIZE)
        self.clients: OrderedDict[_Key, Any] = OrderedDict()
        self.making: dict[_Key, asyncio.Task[Any]] = {}
        self.loaded: set[str] = set()
        self.retiring: dict[int, tuple[Any, asyncio.TimerHandle]] = {}
        self.closing: set[asyncio.Task[None]] = set()

    async def make(
        self,
        key: _Key,
        credentials: Credentials,
        service: str,
        region: str | None,
        endpoint_url: str | None,
        config: Config | None,
        kwargs: dict[str, Any],
    ) -> Any:
        if service not in self.loaded:
            # A service's first client reads its models from disk (tens of ms): not on the
            # loop. Only a head start: whatever fails here, create_client says it properly.
            with contextlib.suppress(Exception):
                await asyncio.to_thread(_load_models, self.session, service)
            self.loaded.add(service)
        made = await self.session.create_client(
            service,
            region_name=region,
            endpoint_url=endpoint_url,
            config=DEFAULT_CONFIG.merge(config) if config is not None else DEFAULT_CONFIG,
            **credentials.boto3_kwargs(),
            **kwargs,
        ).__aenter__()
        # No await from here on: the client is in the cache before this task can be cancelled.
        now = time.time()
        for old_key in [k for k in self.clients if k[0].seconds_left(now) <= 0]:
            self.retire(self.clients.pop(old_key))
        while len(self.clients) >= self.maxsize:
            self.retire(self.clients.popitem(last=False)[1])
        self.clients[key] = made
        return made

    def made(self, key: _Key, task: asyncio.Task[Any]) -> None:
        if self.making.get(key) is task:
            del self.making[key]
        if not task.cancelled():
            task.exception()  # retrieved: its callers have it, or had all gone

    def retire(self, made: Any) -> None:
        if CLOSE_DELAY <= 0:
            self.close_soon(made)
        else:
            handle = self.loop.call_later(CLOSE_DELAY, self.close_retired, id(made))
            self.retiring[id(made)] = (made, handle)

    def close_retired(self, ident: int) -> None:
        made, _ = self.retiring.pop(ident)
        self.close_soon(made)

    def close_soon(self, made: Any) -> None:
        task = self.loop.create_task(_close(made))
        self.closing.add(task)
        task.add_done_callback(self.closing.discard)

    async def aclose(self) -> None:
        making = list(self.making.values())
        for task in making:
            task.cancel()
        await asyncio.gather(*making, return_exceptions=True)
        for made, handle in self.retiring.values():
            handle.cancel()
            self.close_soon(made)
        self.retiring.clear()
        for made in self.clients.values():
            self.close_soon(made)
        self.clients.clear()
        while self.closing:
            await asyncio.gather(*self.closing)


async def _close(made: Any) -> None:
    try:
        await made.__aexit__(None, None, None)
    except Exception as error:  # a close that fails must not stop the others
        # The type only: a backend's message may quote a request.
        logger.warning("closing an aiobotocore client failed (%s)", type(error).__name__)


def _load_models(session: Any, service: str) -> None:
    # Runs in a worker thread; the loader caches what it reads (aiobotocore's own
    # warm_up_loader_caches does the same).
    loader = session.get_component("data_loader")
    for name in ("endpoints", "partitions", "_retry", "sdk-default-configuration"):
        loader.load_data(name)
    loader.load_service_model(service, "service-2")
    loader.load_service_model(service, "endpoint-rule-set-1")


def _state_for(loop: asyncio.AbstractEventLoop) -> _LoopClients:
    with _states_lock:
        state = _states.get(loop)
        if state is None:
            # A loop that ended without aclose(): its clients can no longer be closed.
            for ended in [other for other in _states if other.is_closed()]:
                del _states[ended]
            state = _states[loop] = _LoopClients(loop)
    return state


def _forget_clients_after_fork() -> None:
    # A parent's clients hold its connections, which a child must not share; a lock held in
    # the parent at fork time would never be released here.
    global _states_lock
    _states_lock = threading.Lock()
    _inherited.extend(_states.values())
    _states.clear()


if hasattr(os, "register_at_fork"):  # POSIX only; there is no fork elsewhere
    os.register_at_fork(after_in_child=_forget_clients_after_fork)
