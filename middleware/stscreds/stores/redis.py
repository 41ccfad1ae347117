"""RedisStore: the CredentialStore protocol on Redis or Valkey, shared by a whole fleet.

One server, a Redis Cluster (``redis.asyncio.RedisCluster``, ``redis+cluster://``) or a
Sentinel-managed primary (``redis.asyncio.sentinel``, ``redis+sentinel://``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, NoReturn

from ._cipher import StoreCipher

try:
    from redis.asyncio import Redis, RedisCluster
    from redis.asyncio.client import PubSub
    from redis.asyncio.cluster import ClusterNode
    from redis.asyncio.connection import (
        ConnectionPool,
        SSLConnection,
        UnixDomainSocketConnection,
    )
    from redis.asyncio.retry import Retry
    from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import MovedError, NoScriptError, RedisError
except ImportError as error:  # the optional extra is not installed
    _MISSING: ImportError | None = error
else:
    _MISSING = None

__all__ = ["RedisStore"]

logger = logging.getLogger("stscreds")

# Only commands Redis and Valkey both have: SET NX PX, GET, EVALSHA/EVAL, PUBLISH, SUBSCRIBE
# (and, on a cluster that has them, SPUBLISH and SSUBSCRIBE). Each script touches one key.
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
_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
_SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}


class _Script(NamedTuple):
    text: str
    sha: str


def _script(text: str) -> _Script:
    return _Script(text, hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest())


_RELEASE_SCRIPT, _EXTEND_SCRIPT = _script(_RELEASE), _script(_EXTEND)


def _ms(seconds: float) -> int:
    # PX 0 is an error; a non-positive TTL becomes the shortest one Redis has.
    return max(1, round(seconds * 1000))


def _retry() -> Retry:
    # One immediate retry on a dropped connection, as servers, proxies and NATs close idle
    # pooled connections; none on a timeout, which would only ask a stalled server twice. A
    # cluster client takes only the count: it retries once, after re-reading the topology,
    # on a timeout or CLUSTERDOWN too (the broker's store_timeout still bounds the call).
    return Retry(NoBackoff(), 1, (RedisConnectionError,))


class _ChannelMoved(Exception):
    """The server dropped our subscription: the channel's slot now lives on another node."""


class RedisStore:
    """A CredentialStore on Redis or Valkey: values and leases with TTLs, pub/sub wake-ups.

    On one server (or a Sentinel-managed primary) keys are ``{prefix}v:{key}`` (values) and
    ``{prefix}l:{key}`` (leases). On a Redis Cluster the digest is a hash tag,
    ``{prefix}v:{{key}}`` and ``{prefix}l:{{key}}``, so an identity's value and lease live in
    one slot. Notifications go through one channel, ``{prefix}n`` (on a cluster: sharded
    pub/sub where the servers have it, else classic pub/sub), read by one background task per
    store that starts on the first ``wait``. While that subscription is down, waits poll every
    ``poll_interval`` seconds. A store serves the event loop it was first used on.

    On one server the subscription follows the client's retry policy: with a client passed in
    that retries (redis-py's ``Redis()`` default does for seconds), an outage is noticed only
    once those retries give up. On a cluster it has a connection of its own, to the node that
    owns the channel's slot, and follows the slot when it moves.
    """

    def __init__(
        self,
        url_or_client: str | Redis | RedisCluster,
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
        """Connect lazily to ``url_or_client``: a URL, or a ``Redis`` or ``RedisCluster`` client.

        URLs: ``redis://``, ``rediss://`` or ``unix://`` (one server);
        ``redis+cluster://host:port[,host:port...]`` (``rediss+cluster://``) for a Redis
        Cluster; ``redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]``
        (``rediss+sentinel://``) for the primary that Sentinel names. A client built from a
        URL gets the socket timeouts given here and is closed by ``aclose``; a client passed in
        keeps its own settings and is left open unless ``close_client=True``. ``heartbeat``:
        seconds of silence after which the subscription is pinged (and dropped if the ping
        goes unanswered as long).
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
        sentinel: Sentinel | None = None
        if isinstance(url_or_client, str):
            client, sentinel = _client_from_url(
                url_or_client, socket_timeout, socket_connect_timeout
            )
            close_client = True
        elif isinstance(url_or_client, Redis | RedisCluster):
            client = url_or_client
        else:
            raise TypeError(
                "url_or_client: must be a Redis URL or a redis.asyncio.Redis or RedisCluster"
            )
        if client.get_encoder().decode_responses:
            # Sealed values are binary; a decoding client would mangle them.
            raise ValueError("url_or_client: the client must not use decode_responses=True")
        self._cluster = isinstance(client, RedisCluster)
        if isinstance(client, RedisCluster):
            if client.read_from_replicas or client.load_balancing_strategy is not None:
                # A replica answers late: a lease or a value just written would look absent,
                # and a second worker would exchange for the same identity.
                raise ValueError(
                    "url_or_client: the cluster client must read from primaries "
                    "(no read_from_replicas, no load_balancing_strategy)"
                )
            _check_cluster_prefix(client, prefix)
        self._client: Redis | RedisCluster = client
        self._sentinel = sentinel
        self._close_client = close_client
        self._prefix = prefix
        # Hash tags on a cluster only: a single server ignores them, but its key names stay
        # those of earlier releases, so values already stored remain readable.
        self._tag = ("{", "}") if self._cluster else ("", "")
        self._channel = f"{prefix}n"
        # Sharded pub/sub is tried first on a cluster; False once a node says it lacks it.
        self._sharded = self._cluster
        self._poll_interval = float(poll_interval)
        self._heartbeat = float(heartbeat)
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._listening = False
        self._up_since: float | None = None
        self._reported_down = False
        self._closed = False

    @classmethod
    def from_cluster(
        cls,
        url_or_nodes: str | Sequence[tuple[str, int]],
        *,
        prefix: str = "stscreds:",
        encryption_keys: Sequence[bytes | str] | None = None,
        allow_plaintext: bool = False,
        poll_interval: float = 0.5,
        heartbeat: float = 5.0,
        socket_timeout: float = 1.0,
        socket_connect_timeout: float = 1.0,
        **options: Any,
    ) -> RedisStore:
        """A store on a Redis Cluster found from one or more of its nodes; fails fast.

        ``url_or_nodes``: ``redis://host:port`` / ``rediss://`` (one node),
        ``redis+cluster://host:port,host:port`` (several), or ``[(host, port), ...]``.
        ``options`` go to ``redis.asyncio.RedisCluster`` (``username``, ``password``,
        ``ssl_ca_certs``...). The client is the store's: ``aclose`` closes it.
        """
        _require_redis()
        if isinstance(url_or_nodes, str):
            scheme = urllib.parse.urlsplit(url_or_nodes).scheme.lower()
            if scheme in _CLUSTER_SCHEMES:
                url = url_or_nodes
            elif scheme in ("redis", "rediss"):
                url = scheme + "+cluster" + url_or_nodes[len(scheme) :]
            else:
                raise ValueError("url_or_nodes: a redis://, rediss:// or redis+cluster:// URL")
            client, _ = _client_from_url(url, socket_timeout, socket_connect_timeout, **options)
        else:
            nodes = [ClusterNode(host, int(port)) for host, port in url_or_nodes]
            if not nodes:
                raise ValueError("url_or_nodes: name at least one node of the cluster")
            client = _cluster_client(
                startup_nodes=nodes,
                **_fail_fast(socket_timeout, socket_connect_timeout, options),
            )
        return cls(
            client,
            prefix=prefix,
            encryption_keys=encryption_keys,
            allow_plaintext=allow_plaintext,
            poll_interval=poll_interval,
            heartbeat=heartbeat,
            close_client=True,
        )

    @classmethod
    def from_sentinel(
        cls,
        sentinels: Sequence[tuple[str, int]],
        service_name: str,
        *,
        prefix: str = "stscreds:",
        encryption_keys: Sequence[bytes | str] | None = None,
        allow_plaintext: bool = False,
        poll_interval: float = 0.5,
        heartbeat: float = 5.0,
        socket_timeout: float = 1.0,
        socket_connect_timeout: float = 1.0,
        sentinel_options: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> RedisStore:
        """A store on the primary that the Sentinels name ``service_name``; it follows failovers.

        ``options`` go to the primary's connections (``password``, ``ssl``, ``db``...),
        ``sentinel_options`` to the Sentinels' (their own ``password``, ``ssl``...). Both fail
        fast. The clients are the store's: ``aclose`` closes them.
        """
        _require_redis()
        client, sentinel = _sentinel_client(
            sentinels,
            service_name,
            socket_timeout,
            socket_connect_timeout,
            sentinel_options or {},
            options,
        )
        store = cls(
            client,
            prefix=prefix,
            encryption_keys=encryption_keys,
            allow_plaintext=allow_plaintext,
            poll_interval=poll_interval,
            heartbeat=heartbeat,
            close_client=True,
        )
        store._sentinel = sentinel
        return store

    @property
    def listening(self) -> bool:
        """True while the notification subscription is up (waits then need no polling)."""
        return self._listening

    @property
    def notifications(self) -> str:
        """How waiters are woken now: "sharded" or "classic" pub/sub, or "polling" (while the
        subscription is down or not started yet)."""
        if not self._listening:
            return "polling"
        return "sharded" if self._sharded else "classic"

    def _name(self, kind: str, key: str) -> str:
        start, end = self._tag
        return f"{self._prefix}{kind}:{start}{key}{end}"

    async def get(self, key: str) -> bytes | None:
        """The value under ``key``, or None if there is none or it expired."""
        await self._ready()
        value = await self._client.get(self._name("v", key))
        # Always bytes: decode_responses clients are refused in __init__.
        return value.encode() if isinstance(value, str) else value

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds (at least 1 ms)."""
        await self._ready()
        await self._client.set(self._name("v", key), value, px=_ms(ttl))

    async def acquire(self, key: str, owner: str, ttl: float) -> bool:
        """Take the lease if it is free or expired (or renew it if ``owner`` holds it)."""
        await self._ready()
        if await self._client.set(self._name("l", key), owner, nx=True, px=_ms(ttl)):
            return True
        # As MemoryStore does, the holder asking again keeps the lease, with the new TTL.
        return await self.extend(key, owner, ttl)

    async def release(self, key: str, owner: str) -> bool:
        """Drop the lease if ``owner`` holds it."""
        await self._ready()
        return bool(await self._run(_RELEASE_SCRIPT, self._name("l", key), owner))

    async def extend(self, key: str, owner: str, ttl: float) -> bool:
        """Push the lease's expiry to ``ttl`` seconds from now if ``owner`` holds it."""
        await self._ready()
        return bool(await self._run(_EXTEND_SCRIPT, self._name("l", key), owner, _ms(ttl)))

    async def holder(self, key: str) -> str | None:
        """The owner of the live lease on ``key``, or None (Redis expires leases itself)."""
        await self._ready()
        owner = await self._client.get(self._name("l", key))
        if owner is None:
            return None
        return owner.decode("utf-8", "replace") if isinstance(owner, bytes) else str(owner)

    async def notify(self, key: str) -> None:
        """Wake the waiters on ``key`` in every process (this one too), through Redis."""
        await self._ready()
        if self._sharded and isinstance(self._client, RedisCluster):
            try:
                await self._client.spublish(self._channel, key)
                return
            except RedisError as error:
                if not _unknown_command(error):
                    raise
                self._no_sharded_pubsub()
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
            try:
                await self._client.aclose()
            finally:
                if self._sentinel is not None:
                    await self._sentinel.aclose()

    def __repr__(self) -> str:
        # Built from the connection settings, never the URL: it may carry a password.
        return (
            f"RedisStore({_where(self._client)}, prefix={self._prefix!r}, "
            f"listening={self._listening}, {self.cipher!r})"
        )

    async def _run(self, script: _Script, name: str, *args: str | int) -> Any:
        """Run a one-key script by its SHA; on a node that lacks it, send it once (EVAL)."""
        try:
            return await self._client.evalsha(script.sha, 1, name, *args)
        except NoScriptError:
            # A restarted server, a promoted replica or a node that took the slot over: EVAL
            # runs the script on the key's node and caches it there, in one round trip
            # (SCRIPT LOAD would go to every primary of a cluster, dead ones included).
            return await self._client.eval(script.text, 1, name, *args)

    # -- notifications -------------------------------------------------------------------

    def reset_after_fork(self) -> None:
        """In a forked child: drop the parent's connections and listener (its loop's)."""
        # The child must not read replies meant for the parent on shared sockets.
        client = self._client
        if isinstance(client, RedisCluster):
            _forget_cluster_connections(client)
        else:
            pool = client.connection_pool
            pool.reset()  # type: ignore[no-untyped-call]
            if isinstance(pool, SentinelConnectionPool):
                for sentinel in pool.sentinel_manager.sentinels:
                    sentinel.connection_pool.reset()
        self._listener = None
        self._listening = False
        self._up_since = None
        self._waiters.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("RedisStore is closed")

    async def _ready(self) -> None:
        self._check_open()
        client = self._client
        if isinstance(client, RedisCluster):
            # A cluster client routes a command issued while it (re)reads the topology as if
            # the command had no key: to a random node, which answers MOVED. A burst of cold
            # requests then makes it close every connection, in-flight ones included. So
            # every command waits for the topology (a no-op once it is known).
            await client.initialize()

    def _no_sharded_pubsub(self) -> None:
        # Servers before Redis 7 (or with the commands renamed away): classic PUBLISH reaches
        # every node of a cluster, so one subscription on any node hears it. Not logged: it
        # works as well, and ``notifications`` says which mode is on.
        self._sharded = False

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
        attempts = 0
        while True:
            self._up_since = None
            subscription: _Subscription | None = None
            try:
                subscription = await self._subscribe(refresh=attempts > 0)
                await self._receive(subscription)
            except (_ChannelMoved, MovedError):
                # A slot migration or a failover, not an outage: subscribe again at the
                # channel's new node (the topology is re-read first).
                pass
            except Exception as error:
                if self._sharded and _unknown_command(error):
                    self._no_sharded_pubsub()
                else:
                    self._down(error)
            finally:
                self._set_listening(False)
                if subscription is not None:
                    await subscription.close()
            attempts += 1
            if self._up_since is not None and loop.time() - self._up_since >= _RECONNECT_MAX:
                delay = _RECONNECT_MIN
            # Jitter spreads a fleet's reconnections after a Redis restart.
            await asyncio.sleep(delay * (0.5 + random.random() / 2))  # noqa: S311
            delay = min(delay * 2, _RECONNECT_MAX)

    async def _subscribe(self, *, refresh: bool) -> _Subscription:
        """Subscribe to the channel: on the server, or on the node that owns its slot."""
        client = self._client
        if not isinstance(client, RedisCluster):
            pubsub = client.pubsub()
            subscription = _Subscription(pubsub)
            await pubsub.subscribe(self._channel)
            return subscription
        await client.initialize()
        if refresh:
            # The node we listened on failed or gave the slot away: ask the cluster again.
            await client.nodes_manager.initialize()
        node = client.get_node_from_key(self._channel)
        if node is None:
            raise RedisConnectionError("no node serves the notification channel")
        # A connection of its own, outside the cluster client's pools: the client closes or
        # recycles those on topology changes, and a subscribed connection serves nothing else.
        pool = ConnectionPool(connection_class=node.connection_class, **node.connection_kwargs)
        pubsub = PubSub(pool)
        subscription = _Subscription(pubsub, pool)
        if self._sharded:
            await pubsub.ssubscribe(self._channel)
        else:
            await pubsub.subscribe(self._channel)
        return subscription

    async def _receive(self, subscription: _Subscription) -> NoReturn:
        """Dispatch what the subscription delivers until it fails."""
        pubsub = subscription.pubsub
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
            kind = message["type"]
            if kind in ("message", "smessage"):
                self._wake(message["data"].decode(errors="replace"))
            elif kind in ("subscribe", "ssubscribe"):
                # Also sent when redis-py re-subscribed by itself after a reconnection:
                # messages of the gap are lost, so every waiter re-checks the store.
                self._set_listening(True)
                self._wake_all()
            elif kind in ("unsubscribe", "sunsubscribe"):
                # We never unsubscribe: the server did, as the channel's slot moved away
                # (a migration, or this node was demoted to a replica).
                raise _ChannelMoved

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


class _Subscription:
    """A PubSub and, on a cluster, the one-connection pool it listens on."""

    __slots__ = ("pool", "pubsub")

    def __init__(self, pubsub: PubSub, pool: ConnectionPool | None = None) -> None:
        self.pubsub = pubsub
        self.pool = pool

    async def close(self) -> None:
        # A broken connection may fail to close cleanly; it is dropped either way.
        with contextlib.suppress(Exception):
            await self.pubsub.aclose()  # type: ignore[no-untyped-call]
        if self.pool is not None:
            with contextlib.suppress(Exception):
                await self.pool.aclose()


def _require_redis() -> None:
    if _MISSING is not None:
        raise ImportError("RedisStore needs redis-py: pip install 'stscreds[redis]'") from _MISSING


def _unknown_command(error: BaseException) -> bool:
    """True for "the server has no such command", as a server or redis-py's cluster says it."""
    text = str(error).lower()
    return "unknown command" in text or "doesn't exist in redis commands" in text


def _fail_fast(
    socket_timeout: float, socket_connect_timeout: float, options: Mapping[str, Any]
) -> dict[str, Any]:
    # Short socket timeouts: a dead server must fail an operation, not stall it (options given
    # by the caller, or in a URL's query string, still win).
    return {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_connect_timeout,
        "retry": _retry(),
        **options,
    }


def _cluster_client(**kwargs: Any) -> RedisCluster:
    # On MOVED, patch the one slot's owner; never close the whole client (redis-py's default
    # does every 5th MOVED, failing the commands in flight: a slot migration would look like
    # an outage). A connection error still re-reads the whole topology.
    kwargs.setdefault("reinitialize_steps", 0)
    if "url" in kwargs:
        return RedisCluster.from_url(kwargs.pop("url"), **kwargs)
    return RedisCluster(**kwargs)


def _client_from_url(
    url: str, socket_timeout: float, socket_connect_timeout: float, **options: Any
) -> tuple[Redis | RedisCluster, Sentinel | None]:
    """The client (and the Sentinel behind it, if any) that ``url`` names."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    settings = _fail_fast(socket_timeout, socket_connect_timeout, options)
    if scheme in _CLUSTER_SCHEMES:
        userinfo, hosts, rest = _split_hosts(url, default_port=6379)
        # RedisCluster.from_url reads one host (and the credentials, options) from the URL;
        # all of them, in order, are its startup nodes.
        single = f"{_CLUSTER_SCHEMES[scheme]}://{userinfo}{_netloc(*hosts[0])}{rest}"
        nodes = [ClusterNode(host, port) for host, port in hosts]
        return _cluster_client(url=single, startup_nodes=nodes, **settings), None
    if scheme in _SENTINEL_SCHEMES:
        return _sentinel_from_url(url, socket_timeout, socket_connect_timeout, options)
    if options:
        raise TypeError("RedisStore(url): pass client options in the URL, or pass a client")
    return Redis.from_url(url, **settings), None


def _sentinel_from_url(
    url: str, socket_timeout: float, socket_connect_timeout: float, options: Mapping[str, Any]
) -> tuple[Redis, Sentinel]:
    parts = urllib.parse.urlsplit(url)
    if parts.query or parts.fragment:
        raise ValueError(
            "url: a redis+sentinel:// URL takes no options; use RedisStore.from_sentinel"
        )
    userinfo, hosts, _ = _split_hosts(url, default_port=26379)
    segments = [s for s in parts.path.split("/") if s]
    if not 1 <= len(segments) <= 2 or (len(segments) == 2 and not segments[1].isdigit()):
        raise ValueError("url: redis+sentinel://host:port[,host:port...]/service_name[/db]")
    master: dict[str, Any] = dict(options)
    username, _, password = userinfo.removesuffix("@").partition(":")
    if username:
        master["username"] = urllib.parse.unquote(username)
    if password:
        master["password"] = urllib.parse.unquote(password)
    if len(segments) == 2:
        master["db"] = int(segments[1])
    tls = {"ssl": True} if _SENTINEL_SCHEMES[parts.scheme.lower()] else {}
    return _sentinel_client(
        hosts,
        urllib.parse.unquote(segments[0]),
        socket_timeout,
        socket_connect_timeout,
        tls,
        {**tls, **master},
    )


def _sentinel_client(
    sentinels: Sequence[tuple[str, int]],
    service_name: str,
    socket_timeout: float,
    socket_connect_timeout: float,
    sentinel_options: Mapping[str, Any],
    options: Mapping[str, Any],
) -> tuple[Redis, Sentinel]:
    if not isinstance(service_name, str) or not service_name:
        raise ValueError("service_name: the name the Sentinels monitor the primary under")
    addresses = [(host, int(port)) for host, port in sentinels]
    if not addresses:
        raise ValueError("sentinels: name at least one Sentinel as (host, port)")
    # The Sentinels' own clients fail fast too: redis-py's default would retry a dead
    # Sentinel for seconds before asking the next one.
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        addresses,
        sentinel_kwargs=_fail_fast(socket_timeout, socket_connect_timeout, sentinel_options),
    )
    client = sentinel.master_for(
        service_name, **_fail_fast(socket_timeout, socket_connect_timeout, options)
    )
    return client, sentinel


def _split_hosts(url: str, *, default_port: int) -> tuple[str, list[tuple[str, int]], str]:
    """(``user:password@`` as written, [(host, port)...], path + query) of a multi-host URL."""
    # Not urlsplit's netloc parsing: it takes one host, and its errors quote the URL.
    after = url.split("://", 1)[1]
    end = min((after.find(c) for c in "/?#" if c in after), default=len(after))
    netloc, rest = after[:end], after[end:]
    userinfo, at, hostlist = netloc.rpartition("@")
    hosts: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        if item.startswith("["):  # [IPv6]:port
            host, _, port = item[1:].partition("]")
            port = port.removeprefix(":")
        else:
            host, _, port = item.partition(":")
        if not host or (port and not port.isdigit()):
            raise ValueError("url: hosts must be host[:port], separated by commas")
        hosts.append((host, int(port) if port else default_port))
    return userinfo + at, hosts, rest


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_cluster_prefix(client: RedisCluster, prefix: str) -> None:
    # The digest is the hash tag, unless the prefix holds a tag of its own ("{app}:": every
    # identity in one slot, still together) or an empty "{}" (the whole name hashed: an
    # identity's value and lease could land on two nodes). Refuse the last.
    names = [f"{prefix}{kind}:{{{'0' * 64}}}" for kind in ("v", "l")]
    if len({client.keyslot(name) for name in names}) != 1:
        raise ValueError("prefix: on a cluster it must not contain '{}'")


def _forget_cluster_connections(client: RedisCluster) -> None:
    # redis-py has no fork hook for a cluster client: forget (never close: they are the
    # parent's) each node's connections, and the locks a parent's task may have held.
    manager = client.nodes_manager
    with contextlib.suppress(AttributeError):
        for node in {*manager.nodes_cache.values(), *manager.startup_nodes.values()}:
            node._connections.clear()
            node._free.clear()
        manager._initialize_lock = asyncio.Lock()
        client._lock = None


def _where(client: Redis | RedisCluster) -> str:
    """Where ``client`` connects, without credentials."""
    if isinstance(client, RedisCluster):
        kwargs = client.get_connection_kwargs()
        ssl = issubclass(kwargs.get("connection_class") or object, SSLConnection)
        nodes = ",".join(dict.fromkeys(node.name for node in client.startup_nodes))
        return f"{'rediss' if ssl else 'redis'}+cluster://{nodes}"
    pool = client.connection_pool
    kwargs = pool.connection_kwargs
    scheme = "rediss" if issubclass(pool.connection_class, SSLConnection) else "redis"
    if isinstance(pool, SentinelConnectionPool):
        sentinels = ",".join(
            _netloc(
                s.connection_pool.connection_kwargs.get("host", "?"),
                s.connection_pool.connection_kwargs.get("port", 26379),
            )
            for s in pool.sentinel_manager.sentinels
        )
        return f"{scheme}+sentinel://{sentinels}/{pool.service_name}/{kwargs.get('db', 0)}"
    if issubclass(pool.connection_class, UnixDomainSocketConnection):
        return f"unix://{kwargs.get('path', '')}"
    if "host" not in kwargs:
        return type(pool).__name__
    return f"{scheme}://{kwargs['host']}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
