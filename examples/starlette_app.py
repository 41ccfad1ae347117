"""Starlette: each request for a tenant (X-Tenant header) gets that tenant's AWS credentials.

Run, from the repository root: ``uvicorn examples.starlette_app:app`` (port 8000, the default
issuer's; elsewhere set STSCREDS_ISSUER to the URL the app is served at).

Routes (GET):

- /whoami: the tenant's credentials, ``{"access_key_id_tail", "expiration"}``; 400 without
  an X-Tenant header (or with a tenant name that is not alphanumeric).
- /objects: the keys of the tenant's bucket, tenant-<X-Tenant>, listed with its credentials.
- /metrics: every metric of the default Prometheus registry, stscreds_* included (one
  process: for gunicorn or uvicorn --workers see docs/operations.md).
- /.well-known/openid-configuration and /.well-known/jwks.json (under the issuer URL's
  path, if it has one): the issuer's OIDC documents, answered by CredentialsMiddleware.

Environment variables:

- STSCREDS_ISSUER, STSCREDS_KEY_FILE, STSCREDS_STS_ENDPOINT, STSCREDS_REGION (STS's and S3's
  region), STSCREDS_ACCOUNT_ID: see examples/settings.py.
- STSCREDS_S3_ENDPOINT: S3 endpoint override (default: AWS S3).
- STSCREDS_WARM_UP: tenant names, comma-separated, whose credentials are fetched in the
  background at start-up.
"""

from __future__ import annotations

import contextlib
import os

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from examples.settings import make_broker, role_for_tenant
from stscreds import CredentialsMiddleware, Role
from stscreds.aws import client
from stscreds.prometheus import StscredsCollector

S3_ENDPOINT = os.environ.get("STSCREDS_S3_ENDPOINT") or None
REGION = os.environ.get("STSCREDS_REGION", "us-east-1")
WARM_UP = [role_for_tenant(t) for t in os.environ.get("STSCREDS_WARM_UP", "").split(",") if t]

broker = make_broker()
# Prometheus reads the broker's figures when it scrapes: the request path pays nothing.
# ValueError: this module was imported twice in one process (a reloader, a test) and the
# registry refuses the same series twice; the first import's collector stays.
with contextlib.suppress(ValueError):
    REGISTRY.register(StscredsCollector(broker))


def resolve_role(scope: dict) -> Role | None:
    """Pick the role from the X-Tenant header (a real app would use its auth)."""
    for name, value in scope["headers"]:
        if name == b"x-tenant":
            return role_for_tenant(value)
    return None


async def whoami(request: Request) -> JSONResponse:
    credentials = request.state.aws_credentials
    if credentials is None:
        return JSONResponse({"error": "send an X-Tenant header"}, status_code=400)
    return JSONResponse(
        {
            "access_key_id_tail": credentials.access_key_id[-4:],
            "expiration": credentials.expiration.isoformat(),
        }
    )


async def objects(request: Request) -> JSONResponse:
    """List the tenant's bucket (tenant-<name>) with the tenant's credentials."""
    credentials = request.state.aws_credentials
    if credentials is None:
        return JSONResponse({"error": "send an X-Tenant header"}, status_code=400)
    bucket = f"tenant-{request.headers['x-tenant']}"
    s3 = client(credentials, "s3", region=REGION, endpoint_url=S3_ENDPOINT)
    # botocore blocks: off the event loop.
    listed = await run_in_threadpool(s3.list_objects_v2, Bucket=bucket)
    keys = [item["Key"] for item in listed.get("Contents", [])]
    return JSONResponse({"bucket": bucket, "keys": keys})


async def metrics(request: Request) -> Response:
    """Every metric of the default registry, stscreds_* included (Prometheus text format)."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


app = Starlette(
    routes=[Route("/whoami", whoami), Route("/objects", objects), Route("/metrics", metrics)],
    middleware=[
        Middleware(
            CredentialsMiddleware,
            broker=broker,
            resolve_role=resolve_role,
            warm_up=[role for role in WARM_UP if role],
        )
    ],
)
