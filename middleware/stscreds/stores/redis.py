"""RedisStore: the CredentialStore protocol on Redis or Valkey, shared by a whole fleet."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

from ._cipher import StoreCipher

try:
    from redis.asyncio import Redis
    from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
except ImportError as error:  # the optional extra is not installed
    _MISSING: ImportError | None = error
else:
    _MISSING = None

if TYPE_CHECKING:
    from redis.asyncio.client import PubSub
    from redis.commands.core import AsyncScript

__all__ = ["RedisStore"]

logger = logging.getLogger("stscreds")

# Only commands Redis and Valkey both have: SET NX PX, GET, EVALSHA/EVAL, PUBLISH, SUBSCRIBE.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# Backoff between attempts to re-subscribe; it resets once a subscription lasted this long.
_RECONNECT_MIN, _RECONNECT_MAX = 0.1, 5.0


def _ms(seconds: float) -> int:
    # PX 0 is an error; a non-positive TTL becomes the shortest one Redis has.
    return max(1, round(seconds * 1000))


class RedisStore:
    """A CredentialStore on Redis or Valkey: values and leases with TTLs, pub/sub wake-ups.

    Keys are ``{prefix}v:{key}`` (values) and ``{prefix}l:{key}`` (leases); notifications
    go through one channel, ``{prefix}n``, read by one background task per store that
    starts on the first ``wait``. While that subscription is down, waits poll every
    ``poll_interval`` seconds. A store serves the event loop it was first used on.

    The subscription holds one connection of the client's pool and follows its retry
    policy: with a client passed in that retries (redis-py's ``Redis()`` default does for
    seconds), an outage is noticed only once those retries give up.
    """

    def __init__(
        self,
        url_or_client: str | Redis,
        *,
        prefix: str = "stscreds:",
        encryption_keys: Sequence[bytes | str] | None = None,
        allow_plaintext: bool = False,
        poll_interval: float = 0.5,
        heartbeat: float = 5.0,
        socket_timeout: float = 1.0,
        socket_connect_timeout: float = 1.0,
        close_client: bool = False,
    ) -> None:
        """Connect lazily to ``url_or_client``: a redis://, rediss:// or unix:// URL, or a client.

        A client built from the URL gets the socket timeouts given here and is closed by
        ``aclose``; a client passed in keeps its own settings and is left open unless
        ``close_client=True``. ``heartbeat``: seconds of silence after which the subscription
        is pinged (and dropped if the ping goes unanswered as long).
        """
        if _MISSING is not None:
            raise ImportError(
                "RedisStore needs redis-py: pip install 'stscreds[redis]'"
            ) from _MISSING
        self.cipher = StoreCipher(encryption_keys, allow_plaintext=allow_plaintext)
        if not isinstance(prefix, str):
            raise TypeError("prefix: must be a str")
        for name, value in (("poll_interval", poll_interval), ("heartbeat", heartbeat)):
            if not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"{name}: must be a positive number of seconds")
        if isinstance(url_or_client, str):
            # Short socket timeouts: a dead server must fail an operation, not stall it
            # (options in the URL's query string still win). One immediate retry on a dropped
            # connection, as servers, proxies and NATs close idle pooled connections; none
            # on a timeout, which would only ask a stalled server twice.
            client = Redis.from_url(
                url_or_client,
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_connect_timeout,
                retry=Retry(NoBackoff(), 1, (RedisConnectionError,)),
            )
            close_client = True
        elif isinstance(url_or_client, Redis):
            client = url_or_client
        else:
            raise TypeError("url_or_client: must be a Redis URL or a redis.asyncio.Redis client")
        if client.connection_pool.connection_kwargs.get("decode_responses"):
            # Sealed values are binary; a decoding client would mangle them.
            raise ValueError("url_or_client: the client must not use decode_responses=True")
        self._client = client
        self._close_client = close_client
        self._prefix = prefix
        self._channel = f"{prefix}n"
        self._poll_interval = float(poll_interval)
        self._heartbeat = float(heartbeat)
        # Registered once; each call is EVALSHA, and EVAL + retry after a server restart.
        self._release: AsyncScript = client.register_script(_RELEASE)
        self._extend: AsyncScript = client.register_script(_EXTEND)
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._listening = False
        self._up_since: float | None = None
        self._reported_down = False
        self._closed = False

    @property
    def listening(self) -> bool:
        """True while the notification subscription is up (waits then need no polling)."""
        return self._listening

    async def get(self, key: str) -> bytes | None:
        """The value under ``key``, or None if there is none or it expired."""
        self._check_open()
        value = await self._client.get(self._prefix + "v:" + key)
        # Always bytes: decode_responses clients are refused in __init__.
        return value.encode() if isinstance(value, str) else value

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds (at least 1 ms)."""
        self._check_open()
        await self._client.set(self._prefix + "v:" + key, value, px=_ms(ttl))

    async def acquire(self, key: str, owner: str, ttl: float) -> bool:
        """Take the lease if it is free or expired (or renew it if ``owner`` holds it)."""
        self._check_open()
        if await self._client.set(self._prefix + "l:" + key, owner, nx=True, px=_ms(ttl)):
            return True
        # As MemoryStore does, the holder asking again keeps the lease, with the new TTL.
        return await self.extend(key, owner, ttl)

    async def release(self, key: str, owner: str) -> bool:
        """Drop the lease if ``owner`` holds it."""
        self._check_open()
        return bool(await self._release(keys=[self._prefix + "l:" + key], args=[owner]))

    async def extend(self, key: str, owner: str, ttl: float) -> bool:
        """Push the lease's expiry to ``ttl`` seconds from now if ``owner`` holds it."""
        self._check_open()
        args: list[str | int] = [owner, _ms(ttl)]
        return bool(await self._extend(keys=[self._prefix + "l:" + key], args=args))

    async def holder(self, key: str) -> str | None:
        """The owner of the live lease on ``key``, or None (Redis expires leases itself)."""
        self._check_open()
        owner = await self._client.get(self._prefix + "l:" + key)
        if owner is None:
            return None
        return owner.decode("utf-8", "replace") if isinstance(owner, bytes) else str(owner)

    async def notify(self, key: str) -> None:
        """Wake the waiters on ``key`` in every process (this one too), through Redis."""
        self._check_open()
        await self._client.publish(self._channel, key)

    async def wait(self, key: str, timeout: float) -> None:
        """Return when ``key`` is notified, after ``timeout`` seconds, or sooner to poll.

        Without a live subscription a notification could be missed, so the wait lasts at
        most ``poll_interval``; it also ends when the subscription goes down or comes back.
        """
        self._check_open()
        self._start_listener()
        if not self._listening:
            timeout = min(timeout, self._poll_interval)
        if timeout <= 0:
            return
        waiter = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(key, set())
        waiters.add(waiter)
        try:
            await asyncio.wait((waiter,), timeout=timeout)
        finally:
            waiter.cancel()
            waiters.discard(waiter)
            if not waiters and self._waiters.get(key) is waiters:
                del self._waiters[key]

    async def aclose(self) -> None:
        """Stop the listener, wake all waiters and close the connections this store owns."""
        if self._closed:
            return
        self._closed = True
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            # asyncio.wait, not await: a cancellation of aclose itself must still propagate.
            await asyncio.wait((listener,))
            if not listener.cancelled() and listener.exception() is not None:
                error = listener.exception()
                logger.warning("redis listener had failed (%s)", type(error).__name__)
        self._wake_all()
        if self._close_client:
            await self._client.aclose()

    def __repr__(self) -> str:
        # Built from the connection settings, never the URL: it may carry a password.
        return (
            f"RedisStore({_where(self._client)}, prefix={self._prefix!r}, "
            f"listening={self._listening}, {self.cipher!r})"
        )

    # -- notifications -------------------------------------------------------------------

    def reset_after_fork(self) -> None:
        """In a forked child: drop the parent's connections and listener (its loop's)."""
        # The child must not read replies meant for the parent on shared sockets.
        self._client.connection_pool.reset()  # type: ignore[no-untyped-call]
        self._listener = None
        self._listening = False
        self._up_since = None
        self._waiters.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("RedisStore is closed")

    def _start_listener(self) -> None:
        listener = self._listener
        if listener is not None and not listener.done():
            return
        if listener is not None and not listener.cancelled() and listener.exception():
            # _listen only ends on a bug; say so and start over (waits poll meanwhile).
            error = listener.exception()
            logger.warning("redis listener failed (%s)", type(error).__name__)
        self._listener = asyncio.get_running_loop().create_task(
            self._listen(), name=f"stscreds-redis-listener[{self._channel}]"
        )

    async def _listen(self) -> None:
        """Keep one subscription to the channel, dispatching to waiters; reconnect on failure."""
        loop = asyncio.get_running_loop()
        delay = _RECONNECT_MIN
        while True:
            self._up_since = None
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                await self._receive(pubsub)
            except Exception as error:
                self._down(error)
            finally:
                self._set_listening(False)
                # A broken connection may fail to close cleanly; it is dropped either way.
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            if self._up_since is not None and loop.time() - self._up_since >= _RECONNECT_MAX:
                delay = _RECONNECT_MIN
            # Jitter spreads a fleet's reconnections after a Redis restart.
            await asyncio.sleep(delay * (0.5 + random.random() / 2))  # noqa: S311
            delay = min(delay * 2, _RECONNECT_MAX)

    async def _receive(self, pubsub: PubSub) -> NoReturn:
        """Dispatch what the subscription delivers until it fails."""
        pinged = False
        while True:
            message = await pubsub.get_message(timeout=self._heartbeat)
            if message is None:
                if pinged:
                    # Connected but silent (a frozen server, a lost network): give up on it.
                    raise ConnectionError("no answer to PING on the subscription")
                await pubsub.ping()
                pinged = True
                continue
            pinged = False
            if message["type"] == "message":
                self._wake(message["data"].decode(errors="replace"))
            elif message["type"] == "subscribe":
                # Also sent when redis-py re-subscribed by itself after a reconnection:
                # messages of the gap are lost, so every waiter re-checks the store.
                self._set_listening(True)
                self._wake_all()

    def _set_listening(self, up: bool) -> None:
        if up:
            if self._up_since is None:
                self._up_since = asyncio.get_running_loop().time()
            if self._reported_down:
                self._reported_down = False
                logger.info("redis notifications are back")
        elif self._listening:
            # Waiters counting on a notification must poll from now on: re-check now.
            self._wake_all()
        self._listening = up

    def _down(self, error: Exception) -> None:
        if not self._reported_down:
            self._reported_down = True
            # The type only: a server's message may quote a command's arguments.
            logger.warning(
                "redis notifications unavailable (%s); waiters poll every %.2gs",
                type(error).__name__,
                self._poll_interval,
            )

    def _wake(self, key: str) -> None:
        for waiter in self._waiters.pop(key, ()):
            if not waiter.done():
                waiter.set_result(None)

    def _wake_all(self) -> None:
        waiters, self._waiters = self._waiters, {}
        for group in waiters.values():
            for waiter in group:
                if not waiter.done():
                    waiter.set_result(None)


def _where(client: Redis) -> str:
    """Where ``client`` connects, without credentials."""
    pool = client.connection_pool
    kwargs = pool.connection_kwargs
    if issubclass(pool.connection_class, UnixDomainSocketConnection):
        return f"unix://{kwargs.get('path', '')}"
    if "host" not in kwargs:
        return type(pool).__name__  # e.g. a Sentinel pool: the master is found at connect
    scheme = "rediss" if issubclass(pool.connection_class, SSLConnection) else "redis"
    return f"{scheme}://{kwargs['host']}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
