"""Flask: CredentialsWSGIMiddleware gives each request its tenant's AWS credentials.

Run, from the repository root: ``flask --app examples.flask_app run --port 8000``
 or: ``gunicorn --preload --workers 2 --threads 8 examples.flask_app:app``
(port 8000 is the default issuer's, and flask's own default is 5000; elsewhere set
STSCREDS_ISSUER to the URL the app is served at).

Routes (GET):

- /whoami: the tenant's credentials, ``{"access_key_id_tail", "expiration", "pid"}`` (pid:
  the worker that answered); 400 without an X-Tenant header (or with a tenant name that is
  not alphanumeric).
- /objects: the keys of the tenant's bucket, tenant-<X-Tenant>, listed with its credentials.
- /metrics: every metric of the default Prometheus registry, stscreds_* included. Under
  gunicorn with several workers each scrape reaches one worker: see docs/operations.md for
  multiprocess mode.
- /.well-known/openid-configuration and /.well-known/jwks.json (under the issuer URL's
  path, if it has one): the issuer's OIDC documents, answered by the middleware.

Environment variables:

- STSCREDS_ISSUER, STSCREDS_KEY_FILE, STSCREDS_STS_ENDPOINT, STSCREDS_REGION (STS's and S3's
  region), STSCREDS_ACCOUNT_ID: see examples/settings.py.
- STSCREDS_S3_ENDPOINT: S3 endpoint override (default: AWS S3).
- STSCREDS_WARM_UP: tenant names, comma-separated, whose credentials are fetched at start-up
  (under gunicorn --preload, once, in the master: every worker starts warm).
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
