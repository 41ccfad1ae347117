"""The app benchmarks/throughput.py serves: one Starlette app, one variant per process.

The variant and the warm-up come from the environment (benchmarks/throughput.py sets them):

``STSCREDS_BENCH_VARIANT``
    ``bare`` (the app alone), ``noop`` (behind a pure-ASGI forwarder), or behind
    ``CredentialsMiddleware`` with the resolver ``prebuilt`` (a prebuilt Role looked up by the
    ``x-tenant`` header), ``template`` (the README's resolver: the tenant's Role from a
    ``RoleTemplate``, looked up by the header's raw bytes) or ``built``
    (``Role(arn, subject=..., policy=...)`` built from the header on every request, as in
    benchmarks/hit_path.py).
``STSCREDS_BENCH_STS_URL``, ``STSCREDS_BENCH_ISSUER``, ``STSCREDS_BENCH_KEY_FILE``
    The STS to warm the broker's cache against, the broker's issuer and its signing key (PEM).

At start-up (lifespan) the app fetches credentials once for every tenant, through the same
resolver its requests use; the benchmark then stops that STS, so a request that missed the
cache would fail (503) instead of being quietly slow. ``GET /data`` answers ``ok`` only when
the request carries exactly the credentials warmed for its tenant (500 otherwise); every
variant runs the same check, so the endpoint costs the same in all of them. ``GET /stats``
reports the requests served and the broker's counters.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from stscreds import CredentialBroker, CredentialsMiddleware, Role, RoleTemplate, SigningKey

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

VARIANTS = ("bare", "noop", "prebuilt", "template", "built")
STSCREDS_VARIANTS = ("prebuilt", "template", "built")
TENANTS = (b"acme", b"globex", b"initech")
TENANT_HEADER = b"x-tenant"

#: The session policy the realistic resolvers scope each tenant's credentials to.
POLICY_TEMPLATE = (
    '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":["s3:GetObject",'
    '"s3:PutObject"],"Resource":"arn:aws:s3:::data-bucket/tenants/%s/*"}]}'
)


#: prebuilt: a small tenant -> Role table, as an application would keep in configuration.
PREBUILT_ROLES: dict[bytes, Role] = {
    tenant: Role(
        f"arn:aws:iam::123456789012:role/tenant-{tenant.decode()}",
        subject=f"tenant:{tenant.decode()}",
    )
    for tenant in TENANTS
}

#: template: one validated Role per tenant, built on the tenant's first lookup, a dict hit after.
TENANT_ROLE = RoleTemplate(
    "arn:aws:iam::123456789012:role/tenant-{tenant}",
    subject="tenant:{tenant}",
    policy=POLICY_TEMPLATE.replace("%s", "{tenant}"),
)


def prebuilt_resolver(scope: Scope) -> Role | None:
    """A prebuilt Role from the ``x-tenant`` header; None (no credentials) when unknown."""
    for name, value in scope["headers"]:
        if name == TENANT_HEADER:
            return PREBUILT_ROLES.get(value)
    return None


def template_resolver(scope: Scope) -> Role | None:
    """The realistic resolver, as the README writes it: the tenant's Role from a RoleTemplate,
    None when the header is missing or no Role can be made from it."""
    role: Role | None = TENANT_ROLE.get(dict(scope["headers"]).get(TENANT_HEADER, b""))
    return role


def built_resolver(scope: Scope) -> Role | None:
    """Build the tenant's Role, with a session policy, from the ``x-tenant`` header on every
    request (as hit_path.py's built_role; Role interning makes the repeat calls cheap)."""
    for name, value in scope["headers"]:
        if name == TENANT_HEADER:
            tenant = value.decode("ascii")
            return Role(
                f"arn:aws:iam::123456789012:role/tenant-{tenant}",
                subject=f"tenant:{tenant}",
                policy=POLICY_TEMPLATE % tenant,
            )
    return None


RESOLVERS: dict[str, Callable[[Scope], Role | None]] = {
    "prebuilt": prebuilt_resolver,
    "template": template_resolver,
    "built": built_resolver,
}


class NoOp:
    """The cheapest pure-ASGI middleware: forwards every call unchanged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


#: What a request's ``scope["state"]["aws_credentials"]`` must be, by tenant header value.
#: Without the middleware: absent (MISSING). With it: the warm-up's Credentials object.
MISSING = object()
EXPECTED: dict[bytes | None, object] = dict.fromkeys(TENANTS, MISSING)
EMPTY: dict[str, Any] = {}
#: [requests served, of which answered 500]
COUNTS = [0, 0]


async def data(request: Request) -> Response:
    scope = request.scope
    tenant = None
    for name, value in scope["headers"]:
        if name == TENANT_HEADER:
            tenant = value
            break
    COUNTS[0] += 1
    if (scope.get("state") or EMPTY).get("aws_credentials", MISSING) is not EXPECTED.get(tenant):
        COUNTS[1] += 1
        return PlainTextResponse("wrong or missing credentials", status_code=500)
    return PlainTextResponse("ok")


def build(variant: str) -> tuple[Starlette, CredentialBroker | None]:
    """The app for ``variant`` and its broker (None without the middleware)."""
    if variant not in VARIANTS:
        raise ValueError(f"STSCREDS_BENCH_VARIANT: one of {', '.join(VARIANTS)}, got {variant!r}")
    broker: CredentialBroker | None = None
    middleware: list[Middleware] = []
    if variant == "noop":
        middleware = [Middleware(NoOp)]
    elif variant in STSCREDS_VARIANTS:
        key = SigningKey.from_pem(Path(os.environ["STSCREDS_BENCH_KEY_FILE"]).read_bytes())
        broker = CredentialBroker(
            issuer=os.environ["STSCREDS_BENCH_ISSUER"],
            signing_keys=[key],
            sts_endpoint_url=os.environ["STSCREDS_BENCH_STS_URL"],
        )
        middleware = [
            Middleware(CredentialsMiddleware, broker=broker, resolve_role=RESOLVERS[variant])
        ]
    state = {"warmed": False}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if broker is not None:
            resolver = RESOLVERS[variant]
            for tenant in TENANTS:
                role = resolver({"type": "http", "headers": [(TENANT_HEADER, tenant)]})
                assert role is not None, tenant
                EXPECTED[tenant] = await broker.get(role)
            # Three roles, three exchanges, three distinct credentials.
            assert len({id(value) for value in EXPECTED.values()}) == len(TENANTS), EXPECTED
            assert broker.stats.exchanges == len(TENANTS), broker.stats
        state["warmed"] = True
        try:
            yield
        finally:
            if broker is not None:
                await broker.aclose()

    async def stats(request: Request) -> Response:
        body: dict[str, Any] = {
            "variant": variant,
            "pid": os.getpid(),
            "warmed": state["warmed"],
            "served": COUNTS[0],
            "failed": COUNTS[1],
        }
        if broker is not None:
            metrics = broker.metrics()
            body["broker"] = {
                "hits": broker.stats.hits,
                "misses": broker.stats.misses,
                "exchanges": broker.stats.exchanges,
                "background_refreshes": broker.stats.background_refreshes,
                "sts_calls_total": metrics["sts_calls_total"],
                "cached_identities": metrics["cached_identities"],
            }
        return Response(json.dumps(body), media_type="application/json")

    app = Starlette(
        routes=[Route("/data", data), Route("/stats", stats)],
        middleware=middleware,
        lifespan=lifespan,
    )
    return app, broker


app, broker = build(os.environ.get("STSCREDS_BENCH_VARIANT", "bare"))
