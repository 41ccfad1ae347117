"""resolve_role for the example: the X-User header names a user, the ORM gives the role.

X-User stands in for real authentication (a verified bearer token, an API key): resolve_role
runs before Django, on the raw request, so it authenticates from what the request carries.
Every user of one tenant gets ``Role(arn)``: one identity, one STS call, one cached entry.
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import sync_to_async

from examples.django_project.tenants.models import TenantRole
from stscreds import Role


def role_for_user(username: str | None) -> Role | None:
    """The role of an active user's tenant, or None (no AWS access)."""
    if not username:
        return None
    tenant = (
        TenantRole.objects.filter(user__username=username, user__is_active=True)
        .only("role_arn")
        .first()
    )
    return Role(tenant.role_arn) if tenant is not None else None


# The ORM must not run on the event loop. thread_sensitive=True runs it on the one thread
# Django keeps for sync code, where its database connections are managed.
_role_for_user = sync_to_async(role_for_user, thread_sensitive=True)


async def resolve_role_asgi(scope: dict[str, Any]) -> Role | None:
    """For asgi.py: an async resolver, so the ORM query never blocks the event loop."""
    for name, value in scope["headers"]:
        if name == b"x-user":
            return await _role_for_user(value.decode("latin-1"))
    return None


def resolve_role_wsgi(environ: dict[str, Any]) -> Role | None:
    """For wsgi.py: each request has its own thread, so the ORM is called directly."""
    return role_for_user(environ.get("HTTP_X_USER"))
