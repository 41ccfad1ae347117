"""Django: middlewares configured by ``settings.STSCREDS``, and the credentials of a request.

In asgi.py::

    application = stscreds.django.asgi_application(get_asgi_application(), resolve_role=...)

In wsgi.py, the same with ``wsgi_application(get_wsgi_application(), resolve_role=...)``. In a
view, ``stscreds.django.get_credentials(request)`` works under both.

``settings.STSCREDS`` is a dict: ISSUER (required); KEY_FILE (a PEM path, or a list of them,
the first one signing) or KEYS (SigningKey objects or PEM text); optional REGION,
STS_ENDPOINT_URL, AUDIENCE, DEFAULT_SUBJECT, TOKEN_TTL, CACHE_SIZE, CONNECT_TIMEOUT,
READ_TIMEOUT, EXCHANGE_DEADLINE, MAX_ATTEMPTS, MAX_WORKERS, NEGATIVE_TTL, STORE, STORE_TIMEOUT,
STORE_COOLDOWN, LEASE_TTL (the CredentialBroker arguments of the same names, lower-cased) and
WARM_UP (role ARNs or Role objects whose credentials are fetched at start-up).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, PermissionDenied

from ._asgi import ASGIApp, CredentialsMiddleware, RoleResolver
from ._broker import CredentialBroker
from ._credentials import Credentials
from ._roles import Role
from ._signing import SigningKey
from ._wsgi import CredentialsWSGIMiddleware

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

    from ._wsgi import WSGIRoleResolver

__all__ = [
    "asgi_application",
    "broker_from_settings",
    "get_credentials",
    "warm_up_from_settings",
    "wsgi_application",
]

_BROKER_OPTIONS = frozenset(
    {
        "REGION",
        "STS_ENDPOINT_URL",
        "AUDIENCE",
        "DEFAULT_SUBJECT",
        "TOKEN_TTL",
        "CACHE_SIZE",
        "CONNECT_TIMEOUT",
        "READ_TIMEOUT",
        "EXCHANGE_DEADLINE",
        "MAX_ATTEMPTS",
        "MAX_WORKERS",
        "NEGATIVE_TTL",
        "STORE",
        "STORE_TIMEOUT",
        "STORE_COOLDOWN",
        "LEASE_TTL",
    }
)
_KNOWN = _BROKER_OPTIONS | {"ISSUER", "KEY_FILE", "KEYS", "WARM_UP"}
_STATE_KEY = "aws_credentials"
_ENVIRON_KEY = "stscreds.credentials"


def _options(options: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if options is None:
        options = getattr(settings, "STSCREDS", None)
        if options is None:
            raise ImproperlyConfigured("settings.STSCREDS is not set (a dict; ISSUER is required)")
    if not isinstance(options, Mapping):
        raise ImproperlyConfigured("settings.STSCREDS must be a dict")
    unknown = sorted(set(options) - _KNOWN)
    if unknown:
        raise ImproperlyConfigured(f"settings.STSCREDS: unknown keys {unknown}")
    return options


def _signing_keys(options: Mapping[str, Any]) -> list[SigningKey]:
    key_file, keys = options.get("KEY_FILE"), options.get("KEYS")
    if (key_file is None) == (keys is None):
        raise ImproperlyConfigured("settings.STSCREDS: set one of KEY_FILE or KEYS")
    if key_file is not None:
        paths = [key_file] if isinstance(key_file, str | Path) else list(key_file)
        loaded = []
        for path in paths:
            try:
                with open(path, "rb") as handle:
                    loaded.append(SigningKey.from_pem(handle.read()))
            except (OSError, ValueError) as error:
                # from_pem's message never quotes key material; OSError names only the path.
                raise ImproperlyConfigured(f"settings.STSCREDS['KEY_FILE']: {error}") from None
        return loaded
    loaded = []
    for item in keys if isinstance(keys, Sequence) and not isinstance(keys, str | bytes) else ():
        if isinstance(item, SigningKey):
            loaded.append(item)
        else:
            try:
                loaded.append(SigningKey.from_pem(item))
            except (TypeError, ValueError) as error:
                raise ImproperlyConfigured(f"settings.STSCREDS['KEYS']: {error}") from None
    if not loaded:
        raise ImproperlyConfigured(
            "settings.STSCREDS['KEYS']: must be a non-empty list of SigningKey or PEM text"
        )
    return loaded


def broker_from_settings(options: Mapping[str, Any] | None = None) -> CredentialBroker:
    """A new CredentialBroker configured by ``settings.STSCREDS`` (or ``options``).

    Raises ImproperlyConfigured, naming the key, for a missing, unknown or invalid setting.
    """
    options = _options(options)
    issuer = options.get("ISSUER")
    if not issuer:
        raise ImproperlyConfigured("settings.STSCREDS['ISSUER'] is required")
    kwargs = {name.lower(): options[name] for name in _BROKER_OPTIONS if name in options}
    try:
        return CredentialBroker(issuer=issuer, signing_keys=_signing_keys(options), **kwargs)
    except (TypeError, ValueError) as error:
        raise ImproperlyConfigured(f"settings.STSCREDS: {error}") from None


def warm_up_from_settings(options: Mapping[str, Any] | None = None) -> list[Role]:
    """The Roles named by ``settings.STSCREDS['WARM_UP']`` (ARN strings become ``Role(arn)``)."""
    roles = []
    for item in _options(options).get("WARM_UP", ()):
        try:
            roles.append(item if isinstance(item, Role) else Role(item))
        except ValueError as error:
            raise ImproperlyConfigured(f"settings.STSCREDS['WARM_UP']: {error}") from None
    return roles


def asgi_application(
    app: ASGIApp | None = None,
    *,
    resolve_role: RoleResolver,
    broker: CredentialBroker | None = None,
    **options: Any,
) -> CredentialsMiddleware:
    """Django's ASGI application (default: ``get_asgi_application()``) in CredentialsMiddleware.

    The broker and warm-up come from ``settings.STSCREDS`` unless given; ``options`` go to
    CredentialsMiddleware. Lifespan is answered by the middleware, as Django cannot.
    """
    if app is None:
        from django.core.asgi import get_asgi_application

        app = get_asgi_application()
    if broker is None:
        broker = broker_from_settings()
        # Built here, so owned here: closed when the server shuts the app down.
        options.setdefault("close_broker", True)
    _default_warm_up(options)
    return CredentialsMiddleware(app, broker=broker, resolve_role=resolve_role, **options)


def wsgi_application(
    app: WSGIApplication | None = None,
    *,
    resolve_role: WSGIRoleResolver,
    broker: CredentialBroker | None = None,
    **options: Any,
) -> CredentialsWSGIMiddleware:
    """Django's WSGI application (default: ``get_wsgi_application()``) in the WSGI middleware.

    The broker and warm-up come from ``settings.STSCREDS`` unless given; ``options`` go to
    CredentialsWSGIMiddleware. ``resolve_role(environ)`` is a plain function.
    """
    if app is None:
        from django.core.wsgi import get_wsgi_application

        app = get_wsgi_application()
    if broker is None:
        broker = broker_from_settings()
    _default_warm_up(options)
    return CredentialsWSGIMiddleware(app, broker=broker, resolve_role=resolve_role, **options)


def _default_warm_up(options: dict[str, Any]) -> None:
    # An explicit warm_up wins; so does having no settings.STSCREDS (broker given directly).
    if "warm_up" not in options and getattr(settings, "STSCREDS", None) is not None:
        options["warm_up"] = warm_up_from_settings()


def get_credentials(request: Any) -> Credentials:
    """The Credentials stscreds put on ``request`` (an ASGIRequest or a WSGIRequest).

    Raises PermissionDenied (Django answers 403) when ``resolve_role`` gave the request no
    role, and ImproperlyConfigured when the application is not wrapped by stscreds.
    """
    scope = getattr(request, "scope", None)
    if scope is not None:
        holder = scope.get("state") or {}
        key = _STATE_KEY
    else:
        holder = getattr(request, "environ", None) or {}
        key = _ENVIRON_KEY
    if key not in holder:
        raise ImproperlyConfigured(
            "stscreds: no credentials on this request; wrap the application with "
            "stscreds.django.asgi_application() or wsgi_application() (asgi.py / wsgi.py)"
        )
    credentials: Credentials | None = holder[key]
    if credentials is None:
        raise PermissionDenied("no AWS role for this request")
    return credentials
