"""FastAPI: an ``Annotated`` dependency hands each route the request's AWS credentials.

Run: uvicorn examples.fastapi_app:app  (configuration: see examples/settings.py;
STSCREDS_S3_ENDPOINT overrides the S3 endpoint, for both botocore and aiobotocore)

Routes: /whoami, /objects (send X-Tenant), /objects-async (the same with aiobotocore, on the
event loop; needs ``pip install 'stscreds[aio]'``), /reports (any caller), and /metrics
(Prometheus; one process: for gunicorn or uvicorn --workers see docs/operations.md).
The app's lifespan closes the aiobotocore clients at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from examples.settings import ACCOUNT_ID, make_broker, role_for_tenant
from stscreds import Credentials, CredentialsMiddleware, Role, aio
from stscreds.aws import client
from stscreds.fastapi import AwsCredentials, credentials_for
from stscreds.prometheus import StscredsCollector

S3_ENDPOINT = os.environ.get("STSCREDS_S3_ENDPOINT") or None
REGION = os.environ.get("STSCREDS_REGION", "us-east-1")

broker = make_broker()
# Prometheus reads the broker's figures when it scrapes: the request path pays nothing.
# ValueError: this module was imported twice in one process (a reloader, a test) and the
# registry refuses the same series twice; the first import's collector stays.
with contextlib.suppress(ValueError):
    REGISTRY.register(StscredsCollector(broker))


def resolve_role(scope: dict[str, Any]) -> Role | None:
    """Pick the role from the X-Tenant header (a real app would use its auth)."""
    for name, value in scope["headers"]:
        if name == b"x-tenant":
            return role_for_tenant(value)
    return None


# A role some routes need whatever the caller's tenant: fetched (and cached) on demand.
REPORTS_ROLE = Role(f"arn:aws:iam::{ACCOUNT_ID}:role/reports", subject="reports")
ReportsCredentials = Annotated[Credentials, Depends(credentials_for(REPORTS_ROLE, broker=broker))]


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """At shutdown, close the aiobotocore clients (and their aiohttp sessions)."""
    yield
    await aio.aclose()


app = FastAPI(title="stscreds example", lifespan=lifespan)
app.add_middleware(CredentialsMiddleware, broker=broker, resolve_role=resolve_role)


@app.get("/whoami")
async def whoami(credentials: AwsCredentials) -> dict[str, str]:
    return {
        "access_key_id_tail": credentials.access_key_id[-4:],
        "expiration": credentials.expiration.isoformat(),
    }


# Plain ``def``: botocore blocks, so FastAPI runs these routes in its thread pool.
@app.get("/objects")
def objects(credentials: AwsCredentials, x_tenant: Annotated[str, Header()]) -> dict[str, Any]:
    """List the tenant's bucket (tenant-<name>) with the tenant's credentials."""
    return list_bucket(credentials, f"tenant-{x_tenant}")


# ``async def``: aiobotocore does not block, so this route runs on the event loop.
@app.get("/objects-async")
async def objects_async(
    credentials: AwsCredentials, x_tenant: Annotated[str, Header()]
) -> dict[str, Any]:
    """List the tenant's bucket and read every object in it, with aiobotocore."""
    bucket = f"tenant-{x_tenant}"
    # A ready client, cached per credentials: do not close it, the lifespan does.
    s3 = await aio.client(credentials, "s3", region=REGION, endpoint_url=S3_ENDPOINT)
    listed = await s3.list_objects_v2(Bucket=bucket)
    keys = [item["Key"] for item in listed.get("Contents", [])]
    bodies = await asyncio.gather(*(read_object(s3, bucket, key) for key in keys))
    return {"bucket": bucket, "keys": keys, "sizes": [len(body) for body in bodies]}


@app.get("/reports")
def reports(credentials: ReportsCredentials) -> dict[str, Any]:
    """List the reports bucket with the reports role, whoever the caller is."""
    return list_bucket(credentials, "reports")


@app.get("/metrics", include_in_schema=False)
def metrics() -> Response:
    """Every metric of the default registry, stscreds_* included (Prometheus text format)."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


def list_bucket(credentials: Credentials, bucket: str) -> dict[str, Any]:
    s3 = client(credentials, "s3", region=REGION, endpoint_url=S3_ENDPOINT)
    listed = s3.list_objects_v2(Bucket=bucket)
    return {"bucket": bucket, "keys": [item["Key"] for item in listed.get("Contents", [])]}


async def read_object(s3: Any, bucket: str, key: str) -> bytes:
    response = await s3.get_object(Bucket=bucket, Key=key)
    async with response["Body"] as body:  # releases the connection, even on an error
        data: bytes = await body.read()
    return data
