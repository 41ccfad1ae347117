"""A small app for multi-process tests and benchmarks, configured from FLEET_* variables.

FLEET_ISSUER, FLEET_KEY_FILE, FLEET_STS (endpoint URL), FLEET_STORE (none|redis|sqlite),
FLEET_STORE_URL (redis URL or SQLite path), FLEET_STORE_KEY (base64 encryption key),
FLEET_LEASE_TTL, FLEET_STORE_COOLDOWN, FLEET_STORE_TIMEOUT, FLEET_DEADLINE (exchange deadline).
FLEET_PROMETHEUS=1 adds a StscredsCollector (prometheus_client multiprocess mode: set
PROMETHEUS_MULTIPROC_DIR too) syncing every FLEET_PROMETHEUS_SYNC seconds (0.2), with the
comma-separated role ARNs of FLEET_PROMETHEUS_ROLES allow-listed, and GET /metrics.

GET /creds?tenant=NAME  -> {"pid", "access_key_id", "expiration"}
GET /stats              -> broker and store counters of this process
POST /_clock?offset=S   -> move this process's clock S seconds ahead of the wall clock
GET /metrics            -> (FLEET_PROMETHEUS=1) every worker's series, from the multiprocess files
"""

from __future__ import annotations

import os
import time
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from stscreds import CredentialBroker, CredentialsMiddleware, Role, SigningKey
from stscreds.stores import CredentialStore


class OffsetClock:
    """Wall clock plus an offset the test moves (to force a refresh cycle)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset


def make_store() -> CredentialStore | None:
    kind = os.environ.get("FLEET_STORE", "none")
    keys = [os.environ["FLEET_STORE_KEY"]]
    if kind == "redis":
        from stscreds.stores import RedisStore

        return RedisStore(os.environ["FLEET_STORE_URL"], encryption_keys=keys)
    if kind == "sqlite":
        from stscreds.stores import SQLiteStore

        return SQLiteStore(os.environ["FLEET_STORE_URL"], encryption_keys=keys)
    return None


clock = OffsetClock()
with open(os.environ["FLEET_KEY_FILE"], "rb") as handle:
    key = SigningKey.from_pem(handle.read())
broker = CredentialBroker(
    issuer=os.environ["FLEET_ISSUER"],
    signing_keys=[key],
    sts_endpoint_url=os.environ["FLEET_STS"],
    store=make_store(),
    lease_ttl=float(os.environ.get("FLEET_LEASE_TTL", "15")),
    store_cooldown=float(os.environ.get("FLEET_STORE_COOLDOWN", "5")),
    store_timeout=float(os.environ.get("FLEET_STORE_TIMEOUT", "0.25")),
    exchange_deadline=float(os.environ.get("FLEET_DEADLINE", "10")),
    clock=clock,
)


def resolve_role(scope: dict[str, Any]) -> Role | None:
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
    store = broker.store_stats
    return JSONResponse(
        {
            "pid": os.getpid(),
            "exchanges": broker.stats.exchanges,
            "hits": broker.stats.hits,
            "store": None if store is None else store.as_dict(),
        }
    )


async def move_clock(request: Request) -> JSONResponse:
    clock.offset = float(request.query_params["offset"])
    return JSONResponse({"pid": os.getpid(), "offset": clock.offset})


routes = [
    Route("/creds", creds),
    Route("/stats", stats),
    Route("/_clock", move_clock, methods=["POST"]),
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
