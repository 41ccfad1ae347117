"""FastAPI: the request's AWS credentials as a dependency, and any role's on demand.

``AwsCredentials`` reads what CredentialsMiddleware put on the request (default state key).
A request for which ``resolve_role`` gave no role answers 403: the middleware's resolver
decided this caller gets no AWS access, which is a refusal, not a missing login.
"""

# No ``from __future__ import annotations`` here: FastAPI reads these signatures at run time,
# and the dependency built by credentials_for() names a closure variable in its annotation.

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

try:
    from fastapi import Depends, HTTPException
except ImportError as _error:  # the module is for FastAPI apps; stscreds does not need it
    raise ImportError("stscreds.fastapi needs FastAPI: pip install fastapi") from _error
from starlette.requests import HTTPConnection

from ._asgi import ResolverCheck, error_body, retry_after_header
from ._broker import CredentialBroker
from ._credentials import Credentials
from ._errors import CredentialsUnavailable
from ._roles import Role

__all__ = [
    "AwsCredentials",
    "OptionalAwsCredentials",
    "credentials_for",
    "optional_request_credentials",
    "request_credentials",
]

_STATE_KEY = "aws_credentials"
_MISSING = (
    "stscreds: this request carries no AWS credentials because CredentialsMiddleware is not "
    "installed: app.add_middleware(CredentialsMiddleware, broker=..., resolve_role=...)"
)


def optional_request_credentials(connection: HTTPConnection) -> Credentials | None:
    """The request's Credentials, or None when ``resolve_role`` gave it no role.

    Raises HTTPException 500 naming CredentialsMiddleware when the middleware is missing.
    """
    state = connection.scope.get("state")
    if state is None or _STATE_KEY not in state:
        raise HTTPException(status_code=500, detail=_MISSING)
    credentials: Credentials | None = state[_STATE_KEY]
    return credentials


def request_credentials(connection: HTTPConnection) -> Credentials:
    """The request's Credentials; 403 when ``resolve_role`` gave it no role."""
    credentials = optional_request_credentials(connection)
    if credentials is None:
        raise HTTPException(status_code=403, detail="no AWS role for this request")
    return credentials


#: A route parameter typed ``AwsCredentials`` receives the request's Credentials.
AwsCredentials = Annotated[Credentials, Depends(request_credentials)]
#: Like AwsCredentials, but None (not 403) for a request without a role.
OptionalAwsCredentials = Annotated[Credentials | None, Depends(optional_request_credentials)]


def credentials_for(
    role: Role | Callable[..., Any], *, broker: CredentialBroker
) -> Callable[..., Awaitable[Credentials]]:
    """A dependency giving Credentials for ``role``, fetched through ``broker`` when used.

    ``role`` is a Role, or a dependency returning one (it may take the request, path
    parameters or other dependencies; None means 403). Failures answer 502/503 with
    ``{"detail": <the middleware's error body>}`` and the middleware's headers.
    """
    if not isinstance(broker, CredentialBroker):
        raise TypeError("broker: must be a CredentialBroker")
    if isinstance(role, Role):
        fixed = role

        async def fixed_role_credentials() -> Credentials:
            return await _fetch(broker, fixed)

        return fixed_role_credentials
    if not callable(role):
        raise TypeError("role: must be a Role or a dependency returning one")

    check = ResolverCheck(role)

    async def resolved_role_credentials(
        resolved: Annotated[Role | None, Depends(role)],
    ) -> Credentials:
        if resolved is None:
            raise HTTPException(status_code=403, detail="no AWS role for this request")
        if not isinstance(resolved, Role):
            check.error(resolved)
            raise HTTPException(
                status_code=500,
                detail="AWS credentials could not be resolved (server misconfiguration)",
            )
        return await _fetch(broker, resolved)

    return resolved_role_credentials


async def _fetch(broker: CredentialBroker, role: Role) -> Credentials:
    try:
        return await broker.get(role)
    except CredentialsUnavailable as error:
        headers = {"Cache-Control": "no-store"}
        if error.status_code == 503:
            headers["Retry-After"] = retry_after_header(error)
        raise HTTPException(error.status_code, detail=error_body(error), headers=headers) from None
