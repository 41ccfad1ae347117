"""The fleet benchmark's baseline: tests/servers/fleet_app.py's routes on botocore's own provider.

Configured by the same FLEET_* variables as fleet_app (FLEET_ISSUER, FLEET_KEY_FILE, FLEET_STS;
the store variables are ignored: botocore has no shared store). Each process keeps one
provider per role, built the way ``botocore.credentials.AssumeRoleWithWebIdentityProvider``
builds it: an ``AssumeRoleWithWebIdentityCredentialFetcher`` (with its own in-memory cache)
behind ``DeferredRefreshableCredentials``. The token loader mints a JWT with the same
SigningKey and claims the stscreds workers use, so the strict STS verifies both alike.

GET /creds?tenant=NAME  -> {"pid", "access_key_id", "expiration"}
GET /stats              -> {"pid", "exchanges"} (STS calls made by this process)
POST /_clock?offset=S   -> move this process's clock S seconds ahead of the wall clock

``get_frozen_credentials()`` blocks (it may call STS), so it runs in Starlette's thread pool,
as an async application using botocore would run it.
"""

from __future__ import annotations

import datetime
import os
import secrets
import threading
import time
from typing import Any

import botocore.config
import botocore.session
from botocore.credentials import (
    AssumeRoleWithWebIdentityCredentialFetcher,
    DeferredRefreshableCredentials,
)
from botocore.utils import create_nested_client
from dateutil.parser import parse as parse_datetime
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from stscreds import SigningKey

REGION = "us-east-1"
AUDIENCE = "sts.amazonaws.com"
TOKEN_TTL = 300


class OffsetClock:
    """Wall clock plus an offset the benchmark moves (to force a refresh cycle)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset

    def now(self) -> datetime.datetime:
        """The time as botocore's ``time_fetcher`` gives it: an aware datetime."""
        return datetime.datetime.fromtimestamp(self.time(), datetime.timezone.utc)


class OffsetClockFetcher(AssumeRoleWithWebIdentityCredentialFetcher):  # type: ignore[misc]
    """botocore's web-identity fetcher whose cache-expiry check reads the injected clock.

    ``CachedCredentialFetcher._is_expired`` compares against ``botocore.credentials._local_now``
    (the wall clock), not the ``time_fetcher`` of the RefreshableCredentials around it. Without
    this override a refresh forced by moving the clock would be answered from the fetcher's
    in-memory cache (still "fresh" by the wall clock) and no STS call would be made. The logic
    is botocore's, with the clock swapped.
    """

    def __init__(self, *args: Any, clock: OffsetClock, **kwargs: Any) -> None:
        self._clock = clock
        super().__init__(*args, **kwargs)

    def _is_expired(self, credentials: dict[str, Any]) -> bool:
        end_time = credentials["Credentials"]["Expiration"]
        if not isinstance(end_time, datetime.datetime):
            end_time = parse_datetime(end_time)
        seconds = (end_time - self._clock.now()).total_seconds()
        return bool(seconds < self._expiry_window_seconds)


clock = OffsetClock()
with open(os.environ["FLEET_KEY_FILE"], "rb") as handle:
    key = SigningKey.from_pem(handle.read())
ISSUER = os.environ["FLEET_ISSUER"].rstrip("/")
STS_URL = os.environ["FLEET_STS"]

session = botocore.session.get_session()
# session.create_client is not documented as thread-safe, and refreshes of different roles
# run on different pool threads: serialise client creation (the STS call itself is not).
_create_lock = threading.Lock()
exchanges = 0
_exchanges_lock = threading.Lock()


def client_creator(service_name: str, **kwargs: Any) -> Any:
    """What botocore's ``_get_client_creator`` returns, pointed at the test STS."""
    with _create_lock:
        return create_nested_client(
            session, service_name, region_name=REGION, endpoint_url=STS_URL, **kwargs
        )


# Load botocore's data files once, before the first burst.
client_creator("sts", config=botocore.config.Config(signature_version=botocore.UNSIGNED))


def token_loader(subject: str) -> Any:
    """A web-identity token loader: mints a fresh JWT (botocore calls it per STS call)."""

    def load() -> str:
        global exchanges
        with _exchanges_lock:
            exchanges += 1
        now = int(clock.time())
        return key.sign(
            {
                "iss": ISSUER,
                "sub": subject,
                "aud": AUDIENCE,
                "iat": now,
                "nbf": now,
                "exp": now + TOKEN_TTL,
                "jti": secrets.token_urlsafe(16),
            }
        )

    return load


providers: dict[str, DeferredRefreshableCredentials] = {}


def provider_for(tenant: str) -> DeferredRefreshableCredentials:
    """This process's provider for ``tenant`` (made on first use, on the event loop)."""
    provider = providers.get(tenant)
    if provider is None:
        fetcher = OffsetClockFetcher(
            client_creator=client_creator,
            web_identity_token_loader=token_loader(f"tenant:{tenant}"),
            role_arn=f"arn:aws:iam::123456789012:role/fleet-{tenant}",
            extra_args={"RoleSessionName": f"tenant-{tenant}"},
            clock=clock,
        )
        provider = DeferredRefreshableCredentials(
            refresh_using=fetcher.fetch_credentials,
            method="assume-role-with-web-identity",
            time_fetcher=clock.now,
        )
        providers[tenant] = provider
    return provider


def frozen_with_expiry(provider: DeferredRefreshableCredentials) -> tuple[Any, float]:
    frozen = provider.get_frozen_credentials()
    # No public accessor for the expiry; read right after, on the same thread.
    return frozen, provider._expiry_time.timestamp()


async def creds(request: Request) -> JSONResponse:
    tenant = request.query_params.get("tenant")
    if not tenant:
        return JSONResponse({"error": "no tenant"}, status_code=400)
    frozen, expiration = await run_in_threadpool(frozen_with_expiry, provider_for(tenant))
    return JSONResponse(
        {"pid": os.getpid(), "access_key_id": frozen.access_key, "expiration": expiration}
    )


async def stats(request: Request) -> JSONResponse:
    return JSONResponse({"pid": os.getpid(), "exchanges": exchanges, "store": None})


async def move_clock(request: Request) -> JSONResponse:
    clock.offset = float(request.query_params["offset"])
    return JSONResponse({"pid": os.getpid(), "offset": clock.offset})


app = Starlette(
    routes=[
        Route("/creds", creds),
        Route("/stats", stats),
        Route("/_clock", move_clock, methods=["POST"]),
    ]
)
