"""Starlette: each request for a tenant (X-Tenant header) gets that tenant's AWS credentials.

Run: uvicorn examples.starlette_app:app  (configuration: see examples/settings.py)
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from examples.settings import make_broker, role_for_tenant
from stscreds import CredentialsMiddleware, Role

broker = make_broker()


def resolve_role(scope: dict) -> Role | None:
    """Pick the role from the X-Tenant header (a real app would use its auth)."""
    for name, value in scope["headers"]:
        if name == b"x-tenant":
            return role_for_tenant(value.decode("latin-1"))
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


app = Starlette(
    routes=[Route("/whoami", whoami)],
    middleware=[Middleware(CredentialsMiddleware, broker=broker, resolve_role=resolve_role)],
)
