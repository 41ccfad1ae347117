"""CredentialsMiddleware: pure ASGI; puts each request's credentials in ``scope["state"]``."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping, Sequence
from typing import Any, Literal
from urllib.parse import unquote_to_bytes, urlsplit

from ._broker import CredentialBroker
from ._errors import CredentialsUnavailable
from ._metrics import error_label
from ._roles import Role

__all__ = [
    "CredentialsMiddleware",
    "error_body",
    "resolver_type_error",
    "retry_after_header",
    "run_warm_up",
]

logger = logging.getLogger("stscreds")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
RoleResolver = Callable[[Scope], "Role | Awaitable[Role | None] | None"]
ErrorHandler = Callable[
    [Scope, CredentialsUnavailable], "ASGIApp | Awaitable[ASGIApp | None] | None"
]
Lifespan = Literal["auto", "on", "pass"]

#: Seconds a client is told to wait after a 503 when nothing better is known.
RETRY_AFTER = 5
#: The body of the 500 answered when ``resolve_role`` returned something other than a Role.
MISCONFIGURED_BODY = b'{"error":"AWS credentials could not be resolved (server misconfiguration)"}'
# Websocket close codes: 1013 "try again later", 1011 "internal error".
_WS_UNAVAILABLE, _WS_REJECTED = 1013, 1011


def error_body(error: CredentialsUnavailable) -> dict[str, Any]:
    """The JSON body stscreds answers a failed request with (no secrets, no STS message)."""
    if error.status_code == 503:
        text = "AWS credentials are temporarily unavailable"
    else:
        text = "AWS credentials were refused for this request"
    return {"error": text, "code": error.code}


def retry_after_header(error: CredentialsUnavailable) -> str:
    """``Retry-After`` for ``error``: when a retry can succeed (remembered failures, the STS
    budget), in whole seconds, at least 1; ``RETRY_AFTER`` when unknown."""
    if error.retry_after is None:
        return str(RETRY_AFTER)
    return str(max(1, math.ceil(error.retry_after)))


def resolver_type_error(resolver: object, value: object) -> TypeError:
    """The TypeError for a ``resolve_role`` that returned ``value``, naming both."""
    name = getattr(resolver, "__qualname__", None) or getattr(resolver, "__name__", None)
    shown = name if isinstance(name, str) else type(resolver).__name__
    return TypeError(
        f"resolve_role ({shown}) returned {type(value).__module__}.{type(value).__qualname__}; "
        "it must return a stscreds.Role, or None for a request that needs no credentials"
    )


class ResolverCheck:
    """Reports a resolver's wrong return type: a TypeError, logged once per middleware."""

    __slots__ = ("logged", "resolver")

    def __init__(self, resolver: object) -> None:
        self.resolver = resolver
        self.logged = False

    def error(self, value: object) -> TypeError:
        """The TypeError for ``value``; logged at ERROR the first time only."""
        error = resolver_type_error(self.resolver, value)
        if not self.logged:
            self.logged = True
            logger.error("%s (answering 500)", error)
        return error


async def run_warm_up(broker: CredentialBroker, roles: Sequence[Role]) -> int:
    """Fetch credentials for every role at once; log each failure, never raise one.

    Returns how many roles got credentials. Requests for a role still being fetched join
    the same exchange (single-flight), so a warm-up never doubles STS calls.
    """
    broker.stats.warm_ups += len(roles)
    results = await asyncio.gather(*(broker.get(role) for role in roles), return_exceptions=True)
    fetched = 0
    for role, result in zip(roles, results, strict=True):
        if not isinstance(result, BaseException):
            fetched += 1
        elif isinstance(result, CredentialsUnavailable):
            logger.warning(
                "warm-up got no credentials for %s (%s); requests will try again",
                role.arn,
                error_label(result),
                extra={"role_arn": role.arn, "error_code": error_label(result)},
            )
        else:
            # Only the type: an unexpected error's message is not known to be free of secrets.
            logger.warning(
                "warm-up failed for %s: %s",
                role.arn,
                type(result).__name__,
                extra={"role_arn": role.arn},
            )
    logger.info("warm-up fetched credentials for %d of %d roles", fetched, len(roles))
    return fetched


def warm_up_roles(roles: Iterable[Role]) -> tuple[Role, ...]:
    """``roles`` as a tuple, or ValueError naming the first item that is not a Role."""
    checked = tuple(roles)
    for role in checked:
        if not isinstance(role, Role):
            raise ValueError(f"warm_up: every item must be a Role, got {type(role).__name__}")
    return checked


def is_django_asgi(app: object) -> bool:
    """True for Django's ASGIHandler (or a subclass), checked without importing Django."""
    return any(
        cls.__name__ == "ASGIHandler" and cls.__module__ == "django.core.handlers.asgi"
        for cls in type(app).__mro__
    )


class CredentialsMiddleware:
    """Resolves each request's Role and puts its Credentials in ``scope["state"][state_key]``.

    Also answers the issuer's ``/.well-known/openid-configuration`` and ``jwks.json``.

    ``warm_up`` roles are fetched in a background task once the app has started (lifespan),
    so start-up never waits on STS; failures are logged, never fatal. ``lifespan``: "auto"
    answers the lifespan protocol itself for Django's ASGIHandler (which cannot) and forwards
    it to any other app; "on" always answers it; "pass" always forwards it.
    ``close_broker=True`` closes the broker at lifespan shutdown (for a broker this app owns).

    ``health_path`` (off by default; a path such as ``"/healthz"``): a GET or HEAD to exactly
    that path answers ``broker.health()`` as JSON, 200 unless its status is "unavailable"
    (then 503), before any role is resolved, like the OIDC documents. It names the role ARN
    and STS message of the last failed exchange: serve it where only probes can reach it.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        broker: CredentialBroker,
        resolve_role: RoleResolver,
        state_key: str = "aws_credentials",
        on_error: ErrorHandler | None = None,
        serve_oidc: bool = True,
        oidc_max_age: int = 300,
        warm_up: Iterable[Role] = (),
        lifespan: Lifespan = "auto",
        close_broker: bool = False,
        health_path: str | None = None,
    ) -> None:
        if not isinstance(broker, CredentialBroker):
            raise TypeError("broker: must be a CredentialBroker")
        if not callable(resolve_role):
            raise TypeError("resolve_role: must be callable")
        if not isinstance(state_key, str) or not state_key:
            raise ValueError("state_key: must be a non-empty string")
        documents = oidc_documents(broker, oidc_max_age)
        check_health_path(health_path, documents if serve_oidc else {})
        if lifespan not in ("auto", "on", "pass"):
            raise ValueError('lifespan: must be "auto", "on" or "pass"')
        self.app = app
        self.broker = broker
        self._get_cached = broker.get_cached  # bound once: the hit path is every request
        self.resolve_role = resolve_role
        self._check = ResolverCheck(resolve_role)
        self.state_key = state_key
        self.on_error = on_error
        self.close_broker = close_broker
        self.warm_up = warm_up_roles(warm_up)
        self._answer_lifespan = lifespan == "on" or (lifespan == "auto" and is_django_asgi(app))
        self._warm_up_task: asyncio.Task[int] | None = None
        self._resolve_is_async = inspect.iscoroutinefunction(
            resolve_role
        ) or inspect.iscoroutinefunction(getattr(resolve_role, "__call__", None))  # noqa: B004
        # ASGI servers hand the app the path percent-decoded as UTF-8. The health path is in
        # the same dict (value None), so requests pay one lookup for all of them.
        self._documents: dict[str, tuple[bytes, list[tuple[bytes, bytes]]] | None] = (
            {path.decode("utf-8", "replace"): doc for path, doc in documents.items()}
            if serve_oidc
            else {}
        )
        if health_path is not None:
            self._documents[health_path] = None
        self._oidc_max_age = oidc_max_age
        # The key ring the documents were rendered from: a new ring renders them again.
        self._documents_keys = broker.signing_keys if serve_oidc else None

    def _render_documents(self) -> None:
        keys = self.broker.signing_keys  # first: a ring replaced meanwhile renders again
        for path, document in oidc_documents(self.broker, self._oidc_max_age).items():
            self._documents[path.decode("utf-8", "replace")] = document
        self._documents_keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            if scope["path"] in self._documents:
                await self._serve_document(scope, send)
                return
        elif kind != "websocket":
            if kind == "lifespan":
                await self._lifespan(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        role = self.resolve_role(scope)
        if role.__class__ is not Role and role is not None:
            if self._resolve_is_async or inspect.isawaitable(role):
                # An async resolver, or a plain function (a partial) returning a coroutine.
                role = await role  # type: ignore[misc]
            if role is not None and not isinstance(role, Role):
                self._check.error(role)
                await self._misconfigured(scope, send)
                return
        try:
            state = scope["state"]
        except KeyError:
            state = scope["state"] = {}
        if role is None:
            state[self.state_key] = None
        else:
            credentials = self._get_cached(role)
            if credentials is None:
                try:
                    credentials = await self.broker.fetch(role)
                except CredentialsUnavailable as error:
                    await self._fail(scope, receive, send, error)
                    return
            state[self.state_key] = credentials
        await self.app(scope, receive, send)

    async def wait_warm_up(self) -> None:
        """Wait until the start-up warm-up has finished (at once if none has started)."""
        if self._warm_up_task is not None:
            await asyncio.wait([self._warm_up_task])

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._answer_lifespan:
            if not self.warm_up and not self.close_broker:
                await self.app(scope, receive, send)
                return

            async def send_and_warm_up(message: Message) -> None:
                # The app has run its own start-up (its clients, its stores): warm up now.
                if message["type"] == "lifespan.startup.complete":
                    self._start_warm_up()
                elif message["type"].startswith("lifespan.shutdown."):
                    self._stop_warm_up()
                    if message["type"] == "lifespan.shutdown.complete":
                        await self._close_broker()
                await send(message)

            await self.app(scope, receive, send_and_warm_up)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._start_warm_up()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self._stop_warm_up()
                await self._close_broker()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _close_broker(self) -> None:
        if self.close_broker:
            # Its STS threads and store connections end with the app, not at process exit.
            await self.broker.aclose()

    def _start_warm_up(self) -> None:
        if self.warm_up and self._warm_up_task is None:
            # A background task, so start-up never waits on STS (each exchange is bounded by
            # the broker's deadline); requests arriving meanwhile join its exchanges.
            self._warm_up_task = asyncio.get_running_loop().create_task(
                run_warm_up(self.broker, self.warm_up)
            )

    def _stop_warm_up(self) -> None:
        task, self._warm_up_task = self._warm_up_task, None
        if task is not None:
            task.cancel()

    async def _fail(
        self, scope: Scope, receive: Receive, send: Send, error: CredentialsUnavailable
    ) -> None:
        if self.on_error is not None:
            response = self.on_error(scope, error)
            if inspect.isawaitable(response):
                response = await response
            if response is not None:
                await response(scope, receive, send)
                return
        if scope["type"] == "websocket":
            code = _WS_UNAVAILABLE if error.status_code == 503 else _WS_REJECTED
            await send({"type": "websocket.close", "code": code})
            return
        body = json.dumps(error_body(error)).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
        ]
        if error.status_code == 503:
            headers.append((b"retry-after", retry_after_header(error).encode()))
        await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _misconfigured(self, scope: Scope, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": _WS_REJECTED})
            return
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(MISCONFIGURED_BODY)).encode()),
            (b"cache-control", b"no-store"),
        ]
        await send({"type": "http.response.start", "status": 500, "headers": headers})
        await send({"type": "http.response.body", "body": MISCONFIGURED_BODY})

    async def _serve_document(self, scope: Scope, send: Send) -> None:
        document = self._documents[scope["path"]]
        if document is not None and self.broker.signing_keys is not self._documents_keys:
            # broker.set_signing_keys: serve the new ring (its own ETag) from now on.
            self._render_documents()
            document = self._documents[scope["path"]]
        method = scope["method"]
        if method not in ("GET", "HEAD"):
            await send(
                {
                    "type": "http.response.start",
                    "status": 405,
                    "headers": [(b"allow", b"GET, HEAD"), (b"content-length", b"0")],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return
        if document is None:  # the health path
            status, body = health_response(self.broker)
            health_headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ]
            await send({"type": "http.response.start", "status": status, "headers": health_headers})
            await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})
            return
        body, headers = document
        etag = headers[-1][1]
        status = 200
        for name, value in scope.get("headers", ()):
            if name == b"if-none-match" and (etag in value or value.strip() == b"*"):
                status, body = 304, b""
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})


def check_health_path(path: object, documents: Mapping[bytes, object]) -> None:
    """ValueError naming ``health_path`` unless ``path`` is None or a path of its own."""
    if path is None:
        return
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError('health_path: must be None or a path starting with "/"')
    if path.encode("utf-8", "surrogatepass") in documents:
        raise ValueError(f"health_path: {path!r} is where an OIDC document is served")


def health_response(broker: CredentialBroker) -> tuple[int, bytes]:
    """The health endpoint's status and JSON body: ``broker.health()``, 503 if unavailable."""
    health = broker.health()
    status = 503 if health["status"] == "unavailable" else 200
    return status, json.dumps(health, separators=(",", ":")).encode()


def oidc_documents(
    broker: CredentialBroker, max_age: int
) -> dict[bytes, tuple[bytes, list[tuple[bytes, bytes]]]]:
    """The issuer's discovery document and JWKS as ready responses, by percent-decoded path.

    Paths are bytes because servers decode them differently (ASGI: UTF-8, WSGI: latin-1).
    """
    if isinstance(max_age, bool) or not isinstance(max_age, int) or max_age < 1:
        # AWS refuses a JWKS served with no-cache; a zero max-age amounts to the same.
        raise ValueError("oidc_max_age: must be a positive number of seconds")
    # The issuer URL may be percent-encoded (e.g. /t%C3%A9nant).
    base = unquote_to_bytes(urlsplit(broker.issuer).path.rstrip("/"))
    return {
        base + b"/.well-known/openid-configuration": _static_json(
            broker.openid_configuration(), max_age
        ),
        base + b"/.well-known/jwks.json": _static_json(broker.jwks(), max_age),
    }


def _static_json(document: dict[str, Any], max_age: int) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    body = json.dumps(document, separators=(",", ":")).encode()
    etag = b'"' + hashlib.sha256(body).hexdigest()[:32].encode() + b'"'
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        # AWS refuses to use a JWKS served with no-cache headers; let it (and CDNs) cache.
        (b"cache-control", f"public, max-age={max_age}".encode()),
        (b"access-control-allow-origin", b"*"),
        (b"etag", etag),
    ]
    return body, headers
