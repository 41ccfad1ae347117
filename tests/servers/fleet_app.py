"""A small app for multi-process tests and benchmarks, configured from FLEET_* variables.

FLEET_ISSUER, FLEET_KEY_FILE, FLEET_STS (endpoint URL), FLEET_STORE (none|redis|sqlite|dynamodb),
FLEET_STORE_URL (redis URL, SQLite path or DynamoDB endpoint URL), FLEET_STORE_KEY (base64
encryption key), FLEET_LEASE_TTL, FLEET_STORE_COOLDOWN, FLEET_STORE_TIMEOUT, FLEET_DEADLINE
(exchange deadline). With FLEET_STORE=dynamodb: the table in FLEET_DYNAMODB_TABLE, its region in
FLEET_DYNAMODB_REGION (botocore's default if unset), and FLEET_DYNAMODB_CHECK=1 calls
``store.check()`` at import (an app's start-up); calls are signed with botocore's default
credentials (the environment's). FLEET_STORE_TIMING=1 wraps the store so that every call's
duration is recorded (``POST /_store_ops``). FLEET_PROMETHEUS=1 adds a StscredsCollector
(prometheus_client multiprocess mode: set PROMETHEUS_MULTIPROC_DIR too) syncing every
FLEET_PROMETHEUS_SYNC seconds (0.2), with the comma-separated role ARNs of FLEET_PROMETHEUS_ROLES
allow-listed, and GET /metrics.

GET /creds?tenant=NAME  -> {"pid", "access_key_id", "expiration"}
GET /stats              -> broker and store counters of this process
POST /_clock?offset=S   -> move this process's clock S seconds ahead of the wall clock
POST /_store_ops        -> (FLEET_STORE_TIMING=1) {"pid", "ops": {operation: [ms, ...]}}: the
                           store calls since the last POST, each as the milliseconds the broker
                           awaited it (event-loop delays included); then forgets them
GET /metrics            -> (FLEET_PROMETHEUS=1) every worker's series, from the multiprocess files
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, MutableMapping
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from stscreds import CredentialBroker, CredentialsMiddleware, Role, SigningKey
from stscreds.stores import CredentialStore

_T = TypeVar("_T")


class OffsetClock:
    """Wall clock plus an offset the test moves (to force a refresh cycle)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset


class TimedStore:
    """A CredentialStore that records how long each call of the store it wraps took.

    Durations are perf_counter seconds from the broker's call to its answer, as the broker's
    event loop sees them (a busy loop shows); a call the broker abandons at its
    ``store_timeout`` is recorded when it is cancelled. Kept per operation, at most
    ``LIMIT`` each between two drains.
    """

    LIMIT = 100_000

    def __init__(self, inner: CredentialStore) -> None:
        self.inner = inner
        self.cipher = inner.cipher
        self.samples: dict[str, list[float]] = {}

    def __getattr__(self, name: str) -> Any:
        # Store-specific helpers (check(), create_table(), ...) go to the wrapped store.
        return getattr(self.inner, name)

    async def _timed(self, operation: str, call: Awaitable[_T]) -> _T:
        started = time.perf_counter()
        try:
            return await call
        finally:
            seconds = time.perf_counter() - started
            samples = self.samples.setdefault(operation, [])
            if len(samples) < self.LIMIT:
                samples.append(seconds)

    def drain(self) -> dict[str, list[float]]:
        """The durations recorded since the last drain, by operation; forgets them."""
        samples, self.samples = self.samples, {}
        return samples

    async def get(self, key: str) -> bytes | None:
        return await self._timed("get", self.inner.get(key))

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        await self._timed("put", self.inner.put(key, value, ttl))

    async def acquire(self, key: str, owner: str, ttl: float) -> bool:
        return await self._timed("acquire", self.inner.acquire(key, owner, ttl))

    async def release(self, key: str, owner: str) -> bool:
        return await self._timed("release", self.inner.release(key, owner))

    async def extend(self, key: str, owner: str, ttl: float) -> bool:
        return await self._timed("extend", self.inner.extend(key, owner, ttl))

    async def holder(self, key: str) -> str | None:
        return await self._timed("holder", self.inner.holder(key))

    async def notify(self, key: str) -> None:
        await self._timed("notify", self.inner.notify(key))

    async def wait(self, key: str, timeout: float) -> None:
        # Recorded, but it lasts until a notify or its timeout: not a round trip.
        await self._timed("wait", self.inner.wait(key, timeout))

    async def aclose(self) -> None:
        await self.inner.aclose()


def timed(store: CredentialStore) -> TimedStore:
    """``store`` wrapped in a TimedStore subclass named like its class.

    The broker labels its metrics with the store's class name ("redis", "dynamodb"...): the
    wrapper keeps that label.
    """
    named = type(type(store).__name__, (TimedStore,), {})
    wrapped: TimedStore = named(store)
    return wrapped


def make_store() -> CredentialStore | None:
    kind = os.environ.get("FLEET_STORE", "none")
    keys = [os.environ["FLEET_STORE_KEY"]]
    store: CredentialStore
    if kind == "redis":
        from stscreds.stores import RedisStore

        store = RedisStore(os.environ["FLEET_STORE_URL"], encryption_keys=keys)
    elif kind == "sqlite":
        from stscreds.stores import SQLiteStore

        store = SQLiteStore(os.environ["FLEET_STORE_URL"], encryption_keys=keys)
    elif kind == "dynamodb":
        from stscreds.stores import DynamoDBStore

        dynamodb = DynamoDBStore(
            os.environ["FLEET_DYNAMODB_TABLE"],
            region=os.environ.get("FLEET_DYNAMODB_REGION") or None,
            endpoint_url=os.environ.get("FLEET_STORE_URL") or None,
            encryption_keys=keys,
        )
        if os.environ.get("FLEET_DYNAMODB_CHECK") == "1":
            dynamodb.check()
        store = dynamodb
    elif kind in ("none", ""):
        return None
    else:
        raise SystemExit(f"FLEET_STORE: unknown store {kind!r}")
    if os.environ.get("FLEET_STORE_TIMING") == "1":
        return timed(store)
    return store


clock = OffsetClock()
store = make_store()
with open(os.environ["FLEET_KEY_FILE"], "rb") as handle:
    key = SigningKey.from_pem(handle.read())
broker = CredentialBroker(
    issuer=os.environ["FLEET_ISSUER"],
    signing_keys=[key],
    sts_endpoint_url=os.environ["FLEET_STS"],
    store=store,
    lease_ttl=float(os.environ.get("FLEET_LEASE_TTL", "15")),
    store_cooldown=float(os.environ.get("FLEET_STORE_COOLDOWN", "5")),
    store_timeout=float(os.environ.get("FLEET_STORE_TIMEOUT", "0.25")),
    exchange_deadline=float(os.environ.get("FLEET_DEADLINE", "10")),
    clock=clock,
)


def resolve_role(scope: MutableMapping[str, Any]) -> Role | None:
    query = scope.get("query_string", b"").decode()
    for part in query.split("&"):
        name, _, value = part.partition("=")
        if name == "tenant" and value:
            return Role(f"arn:aws:iam::123456789012:role/fleet-{value}", subject=f"tenant:{value}")
    return None


async def creds(request: Request) -> JSONResponse:
    credentials = request.state.aws_credentials
    return JSONResponse(
        {
            "pid": os.getpid(),
            "access_key_id": credentials.access_key_id,
            "expiration": credentials.expiration.timestamp(),
        }
    )


async def stats(request: Request) -> JSONResponse:
    counters = broker.store_stats
    return JSONResponse(
        {
            "pid": os.getpid(),
            "exchanges": broker.stats.exchanges,
            "hits": broker.stats.hits,
            "store": None if counters is None else counters.as_dict(),
        }
    )


async def move_clock(request: Request) -> JSONResponse:
    clock.offset = float(request.query_params["offset"])
    return JSONResponse({"pid": os.getpid(), "offset": clock.offset})


async def store_ops(request: Request) -> JSONResponse:
    samples = store.drain() if isinstance(store, TimedStore) else {}
    ops = {op: [round(s * 1000, 3) for s in values] for op, values in samples.items()}
    return JSONResponse({"pid": os.getpid(), "ops": ops})


routes = [
    Route("/creds", creds),
    Route("/stats", stats),
    Route("/_clock", move_clock, methods=["POST"]),
    Route("/_store_ops", store_ops, methods=["POST"]),
]

if os.environ.get("FLEET_PROMETHEUS") == "1":
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    from stscreds.prometheus import StscredsCollector

    collector = StscredsCollector(
        broker,
        sync_interval=float(os.environ.get("FLEET_PROMETHEUS_SYNC") or 0.2),
        role_arns=[a for a in os.environ.get("FLEET_PROMETHEUS_ROLES", "").split(",") if a],
    )

    async def metrics(request: Request) -> Response:
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    routes.append(Route("/metrics", metrics))

app = Starlette(
    routes=routes,
    middleware=[Middleware(CredentialsMiddleware, broker=broker, resolve_role=resolve_role)],
)
