"""fleet_app's twin whose broker shares a DynamoDBStore; run as ``dynamodb_app.py --fd N``.

Configured as fleet_app is (FLEET_ISSUER, FLEET_KEY_FILE, FLEET_STS, FLEET_STORE_KEY,
FLEET_LEASE_TTL, FLEET_STORE_COOLDOWN, FLEET_STORE_TIMEOUT, FLEET_DEADLINE), with the store's
table in FLEET_DYNAMODB_TABLE, its region in FLEET_DYNAMODB_REGION and its endpoint in
FLEET_STORE_URL. FLEET_DYNAMODB_CHECK=1 calls ``store.check()`` at import (an app's start-up).

GET /creds?tenant=NAME  -> {"pid", "access_key_id", "expiration"}
GET /stats              -> broker and store counters of this process
POST /_clock?offset=S   -> move this process's clock S seconds ahead of the wall clock
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent


def build_app() -> Any:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from stscreds import CredentialBroker, CredentialsMiddleware, Role, SigningKey
    from stscreds.stores import DynamoDBStore

    class OffsetClock:
        """Wall clock plus an offset the test moves (to force a refresh cycle)."""

        def __init__(self) -> None:
            self.offset = 0.0

        def time(self) -> float:
            return time.time() + self.offset

    store = DynamoDBStore(
        os.environ["FLEET_DYNAMODB_TABLE"],
        region=os.environ["FLEET_DYNAMODB_REGION"],
        endpoint_url=os.environ["FLEET_STORE_URL"],
        encryption_keys=[os.environ["FLEET_STORE_KEY"]],
    )
    if os.environ.get("FLEET_DYNAMODB_CHECK") == "1":
        store.check()
    clock = OffsetClock()
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
                arn = f"arn:aws:iam::123456789012:role/fleet-{value}"
                return Role(arn, subject=f"tenant:{value}")
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
        shared = broker.store_stats
        return JSONResponse(
            {
                "pid": os.getpid(),
                "exchanges": broker.stats.exchanges,
                "hits": broker.stats.hits,
                "store": None if shared is None else shared.as_dict(),
            }
        )

    async def move_clock(request: Request) -> JSONResponse:
        clock.offset = float(request.query_params["offset"])
        return JSONResponse({"pid": os.getpid(), "offset": clock.offset})

    return Starlette(
        routes=[
            Route("/creds", creds),
            Route("/stats", stats),
            Route("/_clock", move_clock, methods=["POST"]),
        ],
        middleware=[Middleware(CredentialsMiddleware, broker=broker, resolve_role=resolve_role)],
    )


def _exit_with_parent(parent: int) -> None:
    """Exit as soon as the test process that started us is gone (we were re-parented)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(3)

    threading.Thread(target=watch, name="fleet-watchdog", daemon=True).start()


def _serve(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] != "--fd":
        raise SystemExit("usage: dynamodb_app.py --fd N")
    parent = int(os.environ.get("FLEET_PARENT_PID", "0"))
    if parent:
        _exit_with_parent(parent)
    # Python put this directory first on sys.path; its redis.py would shadow redis-py.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
    import uvicorn

    sock = socket.socket(fileno=int(argv[1]))  # family and type detected from the fd
    config = uvicorn.Config(
        build_app(),
        log_level=os.environ.get("FLEET_LOG_LEVEL", "warning"),
        access_log=False,
        timeout_graceful_shutdown=2,
    )
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    _serve(sys.argv[1:])
