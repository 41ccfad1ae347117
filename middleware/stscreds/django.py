"""Django: middlewares configured by ``settings.STSCREDS``, and the credentials of a request.

In asgi.py::

    application = stscreds.django.asgi_application(get_asgi_application(), resolve_role=...)

In wsgi.py, the same with ``wsgi_application(get_wsgi_application(), resolve_role=...)``. In a
view, ``stscreds.django.get_credentials(request)`` works under both.

Nothing goes in ``INSTALLED_APPS`` or ``MIDDLEWARE``: stscreds has no models, migrations,
templates, static files or management commands, and it wraps the whole application in
asgi.py / wsgi.py (outside Django's own middleware) instead of being a Django middleware.
Adding ``"stscreds"`` to ``INSTALLED_APPS`` is harmless and does nothing.

``settings.STSCREDS`` is a dict. Its keys:

- Every keyword argument of ``CredentialBroker``, upper-cased: ISSUER (required),
  SIGNING_KEYS, SIGNING_KEYS_INTERVAL, REGION, STS_ENDPOINT_URL, AUDIENCE, DEFAULT_SUBJECT,
  TOKEN_TTL, CACHE_SIZE,
  CONNECT_TIMEOUT, READ_TIMEOUT, EXCHANGE_DEADLINE, MAX_ATTEMPTS, MAX_WORKERS,
  REQUEST_TIMEOUT, ADVISORY_WINDOW, REFRESH_BACKOFF, STS_BUDGET, NEGATIVE_TTL,
  TRANSIENT_NEGATIVE_TTL, STORE, STORE_TIMEOUT, STORE_COOLDOWN, LEASE_TTL, CLOCK. The list is
  read from the broker's signature, so a new broker argument is a setting at once. Values are
  passed as they are, except: SIGNING_KEYS items may be PEM text (str or bytes) as well as
  SigningKey objects (or SIGNING_KEYS a callable returning the ring: a key source); the
  (low, high) ranges REFRESH_BACKOFF, NEGATIVE_TTL and TRANSIENT_NEGATIVE_TTL may be lists;
  STS_BUDGET may be a dict of ``StsBudget`` keyword arguments instead of an ``StsBudget``.
  STORE is a store object (``stscreds.stores``).
- The signing keys given another way (exactly one of SIGNING_KEYS, KEYS, KEY_FILE): KEYS is
  another name for SIGNING_KEYS; KEY_FILE is the path of a PEM file, or a list of them, the
  first one signing (``python -m stscreds keygen``).
- WARM_UP: role ARNs or ``Role`` objects whose credentials are fetched at start-up.
- HEALTH_PATH, SERVE_OIDC, OIDC_MAX_AGE: the middleware arguments ``health_path``,
  ``serve_oidc`` and ``oidc_max_age``, for ``asgi_application`` and ``wsgi_application``.

Arguments given to ``asgi_application`` / ``wsgi_application`` win over the settings. A key
not listed here raises ImproperlyConfigured naming it and the valid keys. Importing this
module never reads the settings: only calling its functions does.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:
    from django.core.exceptions import ImproperlyConfigured, PermissionDenied
except ImportError as _error:  # the module is for Django projects; stscreds does not need it
    raise ImportError("stscreds.django needs Django: pip install django") from _error

from ._asgi import ASGIApp, CredentialsMiddleware, RoleResolver
from ._broker import CredentialBroker
from ._budget import StsBudget
from ._credentials import Credentials
from ._roles import Role
from ._signing import KeySource, SigningKey
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

# Every keyword argument of CredentialBroker, read from its signature; settings key -> name.
_BROKER_PARAMETERS = {
    name: parameter
    for name, parameter in inspect.signature(CredentialBroker.__init__).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY
}
_BROKER_SETTINGS = {name.upper(): name for name in _BROKER_PARAMETERS}
# Other names for the signing keys (SIGNING_KEYS is the broker's own).
_KEY_SETTINGS = ("SIGNING_KEYS", "KEYS", "KEY_FILE")
# Options both middlewares take that make sense in settings (on_error's arguments differ
# between ASGI and WSGI; warm_up is WARM_UP, converted from ARNs).
_MIDDLEWARE_SETTINGS = {
    "HEALTH_PATH": "health_path",
    "SERVE_OIDC": "serve_oidc",
    "OIDC_MAX_AGE": "oidc_max_age",
}
_KNOWN = frozenset(_BROKER_SETTINGS) | set(_KEY_SETTINGS) | {"WARM_UP"} | set(_MIDDLEWARE_SETTINGS)
_STATE_KEY = "aws_credentials"
_ENVIRON_KEY = "stscreds.credentials"


def _settings_value() -> Any:
    # Imported here, not at module level: django.conf.settings is a lazy object that reads
    # the settings when inspected (pydoc, help()), which fails where none are configured.
    from django.conf import settings

    return getattr(settings, "STSCREDS", None)


def _options(options: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if options is None:
        options = _settings_value()
        if options is None:
            raise ImproperlyConfigured("settings.STSCREDS is not set (a dict; ISSUER is required)")
    if not isinstance(options, Mapping):
        raise ImproperlyConfigured("settings.STSCREDS must be a dict")
    unknown = sorted((key for key in options if key not in _KNOWN), key=str)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key).upper(), _KNOWN, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ImproperlyConfigured(
            f"settings.STSCREDS: unknown key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(hints)}; the valid keys are {', '.join(sorted(_KNOWN))}"
        )
    return options


def _signing_keys(options: Mapping[str, Any]) -> list[SigningKey] | KeySource:
    given = [name for name in _KEY_SETTINGS if options.get(name) is not None]
    if len(given) != 1:
        raise ImproperlyConfigured("settings.STSCREDS: set one of SIGNING_KEYS, KEYS or KEY_FILE")
    (name,) = given
    if name != "KEY_FILE" and callable(options[name]):
        # A key source: the broker reads it now and every SIGNING_KEYS_INTERVAL seconds.
        source: KeySource = options[name]
        return source
    if name == "KEY_FILE":
        key_file = options[name]
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
    keys = options[name]
    loaded = []
    for item in keys if isinstance(keys, Sequence) and not isinstance(keys, str | bytes) else ():
        if isinstance(item, SigningKey):
            loaded.append(item)
        else:
            try:
                loaded.append(SigningKey.from_pem(item))
            except (TypeError, ValueError) as error:
                raise ImproperlyConfigured(f"settings.STSCREDS[{name!r}]: {error}") from None
    if not loaded:
        raise ImproperlyConfigured(
            f"settings.STSCREDS[{name!r}]: must be a non-empty list of SigningKey or PEM text"
        )
    return loaded


def _broker_argument(key: str, value: Any) -> Any:
    """A setting's value as the broker argument: lists for tuples, a dict for StsBudget."""
    default = _BROKER_PARAMETERS[_BROKER_SETTINGS[key]].default
    if isinstance(default, tuple) and isinstance(value, list):
        return tuple(value)
    if key == "STS_BUDGET" and isinstance(value, Mapping):
        try:
            return StsBudget(**{str(name).lower(): item for name, item in value.items()})
        except (TypeError, ValueError) as error:
            raise ImproperlyConfigured(f"settings.STSCREDS['STS_BUDGET']: {error}") from None
    return value


def _setting_error(error: Exception) -> ImproperlyConfigured:
    """The broker's error, naming the setting: "cache_size: ..." -> "['CACHE_SIZE']: ..."."""
    message = str(error)
    name, colon, rest = message.partition(":")
    if colon and name in _BROKER_PARAMETERS:
        return ImproperlyConfigured(f"settings.STSCREDS[{name.upper()!r}]:{rest}")
    return ImproperlyConfigured(f"settings.STSCREDS: {message}")


def broker_from_settings(options: Mapping[str, Any] | None = None) -> CredentialBroker:
    """A new CredentialBroker configured by ``settings.STSCREDS`` (or ``options``).

    Every keyword argument of CredentialBroker is a key, upper-cased (see the module's
    docstring for the conversions). Raises ImproperlyConfigured, naming the key, for a
    missing, unknown or invalid setting.
    """
    options = _options(options)
    if not options.get("ISSUER"):
        raise ImproperlyConfigured("settings.STSCREDS['ISSUER'] is required")
    kwargs = {
        _BROKER_SETTINGS[key]: _broker_argument(key, value)
        for key, value in options.items()
        if key in _BROKER_SETTINGS and key != "SIGNING_KEYS"
    }
    kwargs["signing_keys"] = _signing_keys(options)
    try:
        return CredentialBroker(**kwargs)
    except (TypeError, ValueError) as error:
        raise _setting_error(error) from None


def warm_up_from_settings(options: Mapping[str, Any] | None = None) -> list[Role]:
    """The Roles named by ``settings.STSCREDS['WARM_UP']`` (ARN strings become ``Role(arn)``)."""
    roles = []
    for item in _options(options).get("WARM_UP", ()):
        try:
            roles.append(item if isinstance(item, Role) else Role(item))
        except (TypeError, ValueError) as error:
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

    The broker, warm-up and HEALTH_PATH / SERVE_OIDC / OIDC_MAX_AGE come from
    ``settings.STSCREDS`` unless given; ``options`` go to CredentialsMiddleware. Lifespan is
    answered by the middleware, as Django cannot.
    """
    if app is None:
        from django.core.asgi import get_asgi_application

        app = get_asgi_application()
    if broker is None:
        broker = broker_from_settings()
        # Built here, so owned here: closed when the server shuts the app down.
        options.setdefault("close_broker", True)
    from_settings = _middleware_defaults(options)
    try:
        return CredentialsMiddleware(app, broker=broker, resolve_role=resolve_role, **options)
    except (TypeError, ValueError) as error:
        raise _middleware_error(error, from_settings) from None


def wsgi_application(
    app: WSGIApplication | None = None,
    *,
    resolve_role: WSGIRoleResolver,
    broker: CredentialBroker | None = None,
    **options: Any,
) -> CredentialsWSGIMiddleware:
    """Django's WSGI application (default: ``get_wsgi_application()``) in the WSGI middleware.

    The broker, warm-up and HEALTH_PATH / SERVE_OIDC / OIDC_MAX_AGE come from
    ``settings.STSCREDS`` unless given; ``options`` go to CredentialsWSGIMiddleware.
    ``resolve_role(environ)`` is a plain function.
    """
    if app is None:
        from django.core.wsgi import get_wsgi_application

        app = get_wsgi_application()
    if broker is None:
        broker = broker_from_settings()
    from_settings = _middleware_defaults(options)
    try:
        return CredentialsWSGIMiddleware(app, broker=broker, resolve_role=resolve_role, **options)
    except (TypeError, ValueError) as error:
        raise _middleware_error(error, from_settings) from None


def _middleware_defaults(options: dict[str, Any]) -> dict[str, str]:
    """Adds the middleware arguments set in settings.STSCREDS (and not given) to ``options``.

    Returns the arguments so added, argument name -> settings key. Explicit arguments win;
    so does having no settings.STSCREDS (a broker given directly).
    """
    value = _settings_value()
    if value is None:
        return {}
    stscreds = _options(value)
    added = {}
    if "warm_up" not in options:
        options["warm_up"] = warm_up_from_settings(stscreds)
    for key, name in _MIDDLEWARE_SETTINGS.items():
        if key in stscreds and name not in options:
            options[name] = stscreds[key]
            added[name] = key
    return added


def _middleware_error(error: Exception, from_settings: Mapping[str, str]) -> Exception:
    """ImproperlyConfigured for an invalid middleware argument taken from the settings."""
    name, colon, rest = str(error).partition(":")
    if colon and name in from_settings:
        named: Exception = ImproperlyConfigured(
            f"settings.STSCREDS[{from_settings[name]!r}]:{rest}"
        )
        return named
    return error


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
