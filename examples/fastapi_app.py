"""FastAPI: an ``Annotated`` dependency hands each route the request's AWS credentials.

Run: uvicorn examples.fastapi_app:app  (configuration: see examples/settings.py)
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request

from examples.settings import make_broker, role_for_tenant
from stscreds import Credentials, CredentialsMiddleware, Role

broker = make_broker()


def resolve_role(scope: dict) -> Role | None:
    """Pick the role from the X-Tenant header (a real app would use its auth)."""
    for name, value in scope["headers"]:
        if name == b"x-tenant":
            return role_for_tenant(value.decode("latin-1"))
    return None


def aws_credentials(request: Request) -> Credentials:
    """The credentials CredentialsMiddleware put on this request."""
    credentials: Credentials | None = getattr(request.state, "aws_credentials", None)
    if credentials is None:
        raise HTTPException(status_code=400, detail="send an X-Tenant header")
    return credentials


AwsCredentials = Annotated[Credentials, Depends(aws_credentials)]

app = FastAPI(title="stscreds example")
app.add_middleware(CredentialsMiddleware, broker=broker, resolve_role=resolve_role)


@app.get("/whoami")
async def whoami(credentials: AwsCredentials) -> dict[str, str]:
    return {
        "access_key_id_tail": credentials.access_key_id[-4:],
        "expiration": credentials.expiration.isoformat(),
    }
