"""A Flask app for ``gunicorn --preload``: one warm-up exchange in the master, then workers.

Configured from PRELOAD_* variables: PRELOAD_ISSUER (issuer URL), PRELOAD_KEY_FILE (PEM
signing key), PRELOAD_STS (STS endpoint URL), PRELOAD_WARM_UP (how tenant "warm" is fetched
at import, see below). Set PROMETHEUS_MULTIPROC_DIR as well: the StscredsCollector made here
(sync every 0.2 s) then writes prometheus_client's multiprocess files.

At import, which ``--preload`` runs once in the gunicorn master before it forks the workers,
the credentials of tenant "warm" are fetched synchronously, with PRELOAD_WARM_UP:

- ``middleware`` (the default): the documented way, ``CredentialsWSGIMiddleware(warm_up=...)``
  then ``wait_warm_up()``; the exchange runs on the middleware's loop thread and the broker
  counts it as a warm-up;
- ``broker.get``: ``asyncio.run(broker.get(role))`` on a loop of its own, which the broker
  cannot tell from a request.

Either way the workers drive the same broker from the WSGI middleware's loop thread (a new
one in each worker): the broker binds to no loop between exchanges, and its fork hooks drop
the parent's in-flight tasks, STS client and threads but keep the cache.

GET /creds?tenant=NAME  -> {"pid", "ppid", "access_key_id"} (credentials of role preload-NAME)
GET /metrics            -> every process's series, read from the multiprocess files
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from stscreds import CredentialBroker, CredentialsWSGIMiddleware, Role, SigningKey
from stscreds.prometheus import StscredsCollector

ACCOUNT = "123456789012"
WARM_UP = os.environ.get("PRELOAD_WARM_UP", "middleware")
if WARM_UP not in ("middleware", "broker.get"):
    raise ValueError(f"PRELOAD_WARM_UP: 'middleware' or 'broker.get', not {WARM_UP!r}")


def role_for(tenant: str) -> Role:
    return Role(f"arn:aws:iam::{ACCOUNT}:role/preload-{tenant}", subject=f"tenant:{tenant}")


def resolve_role(environ: dict[str, Any]) -> Role | None:
    """``?tenant=NAME`` names the role; requests without one (``/metrics``) get none."""
    for part in environ.get("QUERY_STRING", "").split("&"):
        name, _, value = part.partition("=")
        if name == "tenant" and value.isalnum():
            return role_for(value)
    return None


with open(os.environ["PRELOAD_KEY_FILE"], "rb") as handle:
    key = SigningKey.from_pem(handle.read())
broker = CredentialBroker(
    issuer=os.environ["PRELOAD_ISSUER"],
    signing_keys=[key],
    sts_endpoint_url=os.environ["PRELOAD_STS"],
    exchange_deadline=10.0,
)
collector = StscredsCollector(broker, sync_interval=0.2)

app = Flask(__name__)


@app.get("/creds")
def creds() -> ResponseReturnValue:
    credentials = request.environ["stscreds.credentials"]
    return jsonify(pid=os.getpid(), ppid=os.getppid(), access_key_id=credentials.access_key_id)


@app.get("/metrics")
def metrics() -> ResponseReturnValue:
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return generate_latest(registry), 200, {"Content-Type": CONTENT_TYPE_LATEST}


# The master's one exchange, before any worker exists: every worker inherits its result.
if WARM_UP == "broker.get":
    asyncio.run(broker.get(role_for("warm")))
middleware = CredentialsWSGIMiddleware(
    app.wsgi_app,
    broker=broker,
    resolve_role=resolve_role,
    warm_up=[role_for("warm")] if WARM_UP == "middleware" else [],
)
if not middleware.wait_warm_up(timeout=30):
    raise RuntimeError("the warm-up did not finish within 30 s")
app.wsgi_app = middleware  # type: ignore[method-assign]
