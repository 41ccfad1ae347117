"""Flask: CredentialsWSGIMiddleware gives each request its tenant's AWS credentials.

Run: flask --app examples.flask_app run
 or: gunicorn --preload --workers 2 --threads 8 examples.flask_app:app
(configuration: see examples/settings.py; STSCREDS_S3_ENDPOINT overrides the S3 endpoint and
STSCREDS_WARM_UP names tenants, comma-separated, whose credentials are fetched at start-up).

Routes: /whoami, /objects (send X-Tenant), and /metrics (Prometheus). Under gunicorn with
several workers each scrape reaches one worker: see docs/operations.md for multiprocess mode.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from flask import Flask, abort, jsonify, request
from flask.typing import ResponseReturnValue
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from examples.settings import make_broker, role_for_tenant
from stscreds import Credentials, CredentialsWSGIMiddleware, Role
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


def resolve_role(environ: dict[str, Any]) -> Role | None:
    """Pick the role from the X-Tenant header (a real app would use its auth)."""
    return role_for_tenant(environ.get("HTTP_X_TENANT"))


app = Flask(__name__)
app.wsgi_app = credentials_middleware = CredentialsWSGIMiddleware(  # type: ignore[method-assign]
    app.wsgi_app, broker=broker, resolve_role=resolve_role, warm_up=[r for r in WARM_UP if r]
)
# Under gunicorn --preload this runs once, in the master: every worker starts warm.
credentials_middleware.wait_warm_up(timeout=10)


def aws_credentials() -> Credentials:
    """The credentials the middleware put on this request (400 without a tenant)."""
    credentials: Credentials | None = request.environ["stscreds.credentials"]
    if credentials is None:
        abort(400, "send an X-Tenant header")
    return credentials


@app.get("/whoami")
def whoami() -> ResponseReturnValue:
    credentials = aws_credentials()
    return jsonify(
        access_key_id_tail=credentials.access_key_id[-4:],
        expiration=credentials.expiration.isoformat(),
        pid=os.getpid(),
    )


@app.get("/objects")
def objects() -> ResponseReturnValue:
    """List the tenant's bucket (tenant-<name>) with its own credentials."""
    s3 = client(aws_credentials(), "s3", region=REGION, endpoint_url=S3_ENDPOINT)
    bucket = f"tenant-{request.headers['X-Tenant']}"
    listed = s3.list_objects_v2(Bucket=bucket)
    return jsonify(bucket=bucket, keys=[item["Key"] for item in listed.get("Contents", [])])


@app.get("/metrics")
def metrics() -> ResponseReturnValue:
    """Every metric of the default registry, stscreds_* included (Prometheus text format)."""
    return generate_latest(REGISTRY), 200, {"Content-Type": CONTENT_TYPE_LATEST}
