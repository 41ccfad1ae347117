"""CredentialsMiddleware: Starlette/FastAPI wiring, resolvers, OIDC endpoints, errors, websockets,
lifespan, concurrency and secrets, against StrictSTS (and once under a real uvicorn server)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, Any
from urllib.parse import urlsplit

import httpx
import jwt
import pytest
import uvicorn
from fastapi import Depends, FastAPI, Request
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from servers.sts import StrictSTS

with warnings.catch_warnings():
    # Starlette 1.x prefers httpx2 for its TestClient; the venv has httpx, which still works.
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient
from stscreds import (
    CredentialBroker,
    Credentials,
    CredentialsMiddleware,
    CredentialsRejected,
    CredentialsUnavailable,
    Role,
    SigningKey,
    STSUnavailable,
)

ACCOUNT = "123456789012"
ISSUER = "http://127.0.0.1:1/asgi-issuer"  # loopback; StrictSTS gets the JWKS directly
KEY = SigningKey.generate("ES256", kid="asgi-key-1")
KEY_2 = SigningKey.generate("RS256", kid="asgi-key-2")
DISCOVERY = "/.well-known/openid-configuration"
JWKS = "/.well-known/jwks.json"
# Where the documents of ISSUER are served.
ISSUER_DISCOVERY = "/asgi-issuer" + DISCOVERY
ISSUER_JWKS = "/asgi-issuer" + JWKS
PRIVATE_JWK_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}


def arn(tenant: str) -> str:
    return f"arn:aws:iam::{ACCOUNT}:role/tenant-{tenant}"


def tenant_of(scope: Any) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-tenant":
            return value.decode("latin-1")
    return None


def role_for(tenant: str | None) -> Role | None:
    if not tenant:
        return None
    return Role(arn(tenant), subject=f"tenant:{tenant}")


def resolve_role(scope: Any) -> Role | None:
    """Sync resolver: the role from the X-Tenant header (None without one)."""
    return role_for(tenant_of(scope))


async def async_resolve_role(scope: Any) -> Role | None:
    await asyncio.sleep(0)
    return role_for(tenant_of(scope))


class AsyncResolver:
    """An object with an async ``__call__`` (a configured resolver, e.g. with a DB handle)."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: Any) -> Role | None:
        self.calls += 1
        await asyncio.sleep(0)
        return role_for(tenant_of(scope))


class SyncResolver:
    def __call__(self, scope: Any) -> Role | None:
        return role_for(tenant_of(scope))


class Seen:
    """What the downstream app saw: the state value per request (kept out of responses)."""

    def __init__(self) -> None:
        self.values: list[Any] = []
        self.paths: list[str] = []


MISSING = object()


def whoami_route(seen: Seen, state_key: str = "aws_credentials") -> Route:
    async def whoami(request: StarletteRequest) -> JSONResponse:
        value = getattr(request.state, state_key, MISSING)
        seen.values.append(value)
        seen.paths.append(request.url.path)
        return JSONResponse(
            {
                "type": type(value).__name__,
                "key": value.access_key_id if isinstance(value, Credentials) else None,
            }
        )

    return Route("/whoami", whoami)


def ws_route(seen: Seen) -> WebSocketRoute:
    async def ws(websocket: WebSocket) -> None:
        value = getattr(websocket.state, "aws_credentials", MISSING)
        seen.values.append(value)
        await websocket.accept()
        await websocket.send_json(
            {"key": value.access_key_id if isinstance(value, Credentials) else None}
        )
        await websocket.close()

    return WebSocketRoute("/ws", ws)


def starlette_app(seen: Seen, broker: CredentialBroker, **options: Any) -> Starlette:
    options.setdefault("resolve_role", resolve_role)
    return Starlette(
        routes=[whoami_route(seen, options.get("state_key", "aws_credentials")), ws_route(seen)],
        middleware=[Middleware(CredentialsMiddleware, broker=broker, **options)],
    )


def sts_keys(sts: StrictSTS, role_arn: str) -> list[str]:
    """Access key ids STS issued for ``role_arn``."""
    return [r.credentials["AccessKeyId"] for r in sts.requests_for(role_arn) if r.credentials]


@pytest.fixture
def make_broker(strict_sts: StrictSTS) -> Iterator[Callable[..., CredentialBroker]]:
    """Brokers pointed at ``strict_sts`` (registered with their issuer and JWKS); closed after."""
    brokers: list[CredentialBroker] = []

    def make(**options: Any) -> CredentialBroker:
        options.setdefault("issuer", ISSUER)
        options.setdefault("signing_keys", [KEY])
        broker = CredentialBroker(sts_endpoint_url=strict_sts.url, **options)
        brokers.append(broker)
        if urlsplit(broker.issuer).hostname == "127.0.0.1":  # StrictSTS takes loopback only
            strict_sts.configure(issuer=broker.issuer, jwks=broker.jwks())
        return broker

    yield make
    for broker in brokers:
        broker.close()


@pytest.fixture
def broker(make_broker: Callable[..., CredentialBroker]) -> CredentialBroker:
    return make_broker()


# -- wiring: Starlette, FastAPI, plain wrapper -------------------------------------------------


def test_starlette_middleware_list_puts_credentials_on_request_state(
    strict_sts: StrictSTS, broker: CredentialBroker
) -> None:
    seen = Seen()
    client = TestClient(starlette_app(seen, broker))
    first = client.get("/whoami", headers={"x-tenant": "a"})
    second = client.get("/whoami", headers={"x-tenant": "a"})
    assert first.status_code == second.status_code == 200
    assert first.json()["type"] == "Credentials"
    # The very credentials STS issued, once: the second request was a cache hit.
    assert strict_sts.calls_for(arn("a")) == 1
    issued = strict_sts.requests_for(arn("a"))[0].credentials
    assert issued is not None
    assert first.json()["key"] == second.json()["key"] == issued["AccessKeyId"]
    credentials = seen.values[0]
    assert isinstance(credentials, Credentials)
    assert credentials.secret_access_key == issued["SecretAccessKey"]
    assert credentials.session_token == issued["SessionToken"]
    assert seen.values[1] is credentials
    # STS verified the token: the subject came from the Role.
    assert strict_sts.requests_for(arn("a"))[0].claims["sub"] == "tenant:a"


def test_starlette_add_middleware_form(strict_sts: StrictSTS, broker: CredentialBroker) -> None:
    seen = Seen()
    app = Starlette(routes=[whoami_route(seen)])
    app.add_middleware(CredentialsMiddleware, broker=broker, resolve_role=resolve_role)
    response = TestClient(app).get("/whoami", headers={"x-tenant": "b"})
    assert response.status_code == 200
    assert response.json()["key"] == sts_keys(strict_sts, arn("b"))[0]
    assert isinstance(seen.values[0], Credentials)


async def test_plain_wrapper_form(strict_sts: StrictSTS, broker: CredentialBroker) -> None:
    seen: list[Any] = []

    async def raw_app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["state"]["aws_credentials"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    app = CredentialsMiddleware(raw_app, broker=broker, resolve_role=resolve_role)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.get("/anything", headers={"x-tenant": "c"})
    assert response.status_code == 204
    assert isinstance(seen[0], Credentials)
    assert seen[0].access_key_id == sts_keys(strict_sts, arn("c"))[0]


async def test_existing_scope_state_is_kept(broker: CredentialBroker) -> None:
    """The middleware adds to the server's ``scope["state"]`` (lifespan state) in place."""
    captured: list[Any] = []

    async def raw_app(scope: Any, receive: Any, send: Any) -> None:
        captured.append(scope["state"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    app = CredentialsMiddleware(raw_app, broker=broker, resolve_role=resolve_role)
    state = {"db": "handle"}
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/x",
        "headers": [(b"x-tenant", b"a")],
        "state": state,
    }
    sent: list[Any] = []

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    await app(scope, receive, send)
    assert captured[0] is state
    assert state["db"] == "handle"
    assert isinstance(state["aws_credentials"], Credentials)
    assert sent[0]["status"] == 204


def fastapi_credentials(request: Request) -> Credentials:
    """The README's FastAPI dependency: the credentials the middleware put on the request."""
    value = request.state.aws_credentials
    assert isinstance(value, Credentials)
    return value


AwsCredentials = Annotated[Credentials, Depends(fastapi_credentials)]


@pytest.mark.parametrize("form", ["add_middleware", "middleware_list"])
def test_fastapi_dependency_reads_request_state(
    strict_sts: StrictSTS, broker: CredentialBroker, form: str
) -> None:
    if form == "add_middleware":
        app = FastAPI()
        app.add_middleware(CredentialsMiddleware, broker=broker, resolve_role=resolve_role)
    else:
        app = FastAPI(
            middleware=[
                Middleware(CredentialsMiddleware, broker=broker, resolve_role=async_resolve_role)
            ]
        )

    async def whoami(credentials: AwsCredentials) -> dict[str, str]:
        return {"key": credentials.access_key_id, "type": type(credentials).__name__}

    app.get("/whoami")(whoami)
    client = TestClient(app)
    response = client.get("/whoami", headers={"x-tenant": "fast"})
    assert response.status_code == 200, response.text
    assert response.json() == {"key": sts_keys(strict_sts, arn("fast"))[0], "type": "Credentials"}
    # FastAPI's own routes still work through the middleware (no tenant: no credentials).
    assert client.get("/openapi.json").status_code == 200
    assert strict_sts.calls == 1


def test_custom_state_key(strict_sts: StrictSTS, broker: CredentialBroker) -> None:
    seen = Seen()
    app = starlette_app(seen, broker, state_key="creds")
    response = TestClient(app).get("/whoami", headers={"x-tenant": "a"})
    assert response.status_code == 200
    assert isinstance(seen.values[0], Credentials)
    assert response.json()["key"] == sts_keys(strict_sts, arn("a"))[0]

    # Only the custom key is set.
    states: list[dict[str, Any]] = []

    async def raw_app(scope: Any, receive: Any, send: Any) -> None:
        states.append(dict(scope["state"]))
        await PlainTextResponse("ok")(scope, receive, send)

    raw = CredentialsMiddleware(raw_app, broker=broker, resolve_role=resolve_role, state_key="k")
    assert TestClient(raw).get("/", headers={"x-tenant": "a"}).text == "ok"
    assert list(states[0]) == ["k"]
    assert states[0]["k"] is seen.values[0]  # the cached credentials


# -- resolve_role forms ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "resolver",
    [resolve_role, async_resolve_role, AsyncResolver(), SyncResolver()],
    ids=["sync-function", "async-function", "async-callable-object", "sync-callable-object"],
)
def test_resolve_role_forms(strict_sts: StrictSTS, broker: CredentialBroker, resolver: Any) -> None:
    seen = Seen()
    client = TestClient(starlette_app(seen, broker, resolve_role=resolver))
    response = client.get("/whoami", headers={"x-tenant": "r"})
    assert response.status_code == 200
    assert isinstance(seen.values[0], Credentials)
    assert response.json()["key"] == sts_keys(strict_sts, arn("r"))[0]


def test_sync_resolver_returning_an_awaitable_is_awaited(
    strict_sts: StrictSTS, broker: CredentialBroker
) -> None:
    """``RoleResolver`` is typed ``Callable[[Scope], Role | Awaitable[Role | None] | None]``:
    a plain callable may return an awaitable (a lambda or wrapper around an async lookup).

    BUG: the middleware only awaits when ``inspect.iscoroutinefunction`` says so up front, so
    the coroutine itself is handed to the broker (AttributeError: 'coroutine' object has no
    attribute 'subject') and is never awaited.
    """
    seen = Seen()
    created: list[Any] = []

    def wrapper(scope: Any) -> Any:
        created.append(async_resolve_role(scope))
        return created[-1]

    try:
        client = TestClient(starlette_app(seen, broker, resolve_role=wrapper))
        response = client.get("/whoami", headers={"x-tenant": "w"})
    finally:
        for coroutine in created:  # no "never awaited" warning leaking into other tests
            coroutine.close()
    assert response.status_code == 200
    assert isinstance(seen.values[0], Credentials)
    assert strict_sts.calls_for(arn("w")) == 1


@pytest.mark.parametrize(
    "resolver",
    [lambda scope: None, AsyncResolver()],
    ids=["sync-none", "async-none"],
)
def test_resolver_returning_none_sets_none_and_runs_the_app(
    strict_sts: StrictSTS, broker: CredentialBroker, resolver: Any
) -> None:
    seen = Seen()
    client = TestClient(starlette_app(seen, broker, resolve_role=resolver))
    response = client.get("/whoami")  # no X-Tenant header: AsyncResolver returns None too
    assert response.status_code == 200
    assert response.json() == {"type": "NoneType", "key": None}
    assert seen.values == [None]
    assert strict_sts.calls == 0


class ResolverBoom(Exception):
    pass


def raising_sync(scope: Any) -> Role:
    raise ResolverBoom("resolver failed")


async def raising_async(scope: Any) -> Role:
    await asyncio.sleep(0)
    raise ResolverBoom("resolver failed")


@pytest.mark.parametrize("resolver", [raising_sync, raising_async], ids=["sync", "async"])
async def test_resolver_exception_propagates_from_plain_wrapper(
    strict_sts: StrictSTS, broker: CredentialBroker, resolver: Any
) -> None:
    reached: list[str] = []

    async def raw_app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["path"])

    app = CredentialsMiddleware(raw_app, broker=broker, resolve_role=resolver)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        with pytest.raises(ResolverBoom):
            await client.get("/x")
    assert reached == []
    assert strict_sts.calls == 0


@pytest.mark.parametrize("resolver", [raising_sync, raising_async], ids=["sync", "async"])
def test_resolver_exception_is_a_server_error_not_502_or_503(
    strict_sts: StrictSTS, broker: CredentialBroker, resolver: Any
) -> None:
    app = starlette_app(Seen(), broker, resolve_role=resolver)
    with pytest.raises(ResolverBoom):
        TestClient(app).get("/whoami")
    response = TestClient(app, raise_server_exceptions=False).get("/whoami")
    assert response.status_code == 500
    assert "retry-after" not in response.headers
    assert strict_sts.calls == 0


# -- OIDC endpoints ----------------------------------------------------------------------------


class Downstream:
    """A raw ASGI app recording what reached it (for pass-through checks)."""

    def __init__(self) -> None:
        self.paths: list[tuple[str, str]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.paths.append((scope["method"], scope["path"]))
        body = b"downstream"
        await send(
            {
                "type": "http.response.start",
                "status": 299,
                "headers": [(b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


class CountingResolver:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, scope: Any) -> Role | None:
        self.calls += 1
        return None


def oidc_client(broker: CredentialBroker, **options: Any) -> tuple[TestClient, Downstream, Any]:
    downstream = Downstream()
    resolver = CountingResolver()
    app = CredentialsMiddleware(downstream, broker=broker, resolve_role=resolver, **options)
    return TestClient(app), downstream, resolver


def cache_directives(value: str) -> dict[str, str | None]:
    directives: dict[str, str | None] = {}
    for part in value.split(","):
        name, _, arg = part.strip().partition("=")
        directives[name.lower()] = arg or None
    return directives


def assert_cacheable(response: httpx.Response, max_age: int | None = None) -> None:
    directives = cache_directives(response.headers["cache-control"])
    assert "public" in directives
    assert not {"no-cache", "no-store", "private"} & directives.keys()
    age = int(directives["max-age"] or "0")
    assert age > 0
    if max_age is not None:
        assert age == max_age


@pytest.mark.parametrize(
    ("issuer", "base"),
    [
        ("https://example.com", ""),
        ("https://example.com/tenant-a", "/tenant-a"),
        ("https://example.com/tenant-a/", "/tenant-a"),
        ("https://example.com/org/tenant-b", "/org/tenant-b"),
    ],
)
def test_oidc_documents(make_broker: Any, strict_sts: StrictSTS, issuer: str, base: str) -> None:
    broker = make_broker(issuer=issuer)
    client, downstream, resolver = oidc_client(broker)
    expected_issuer = issuer.rstrip("/")

    discovery = client.get(f"{base}{DISCOVERY}")
    assert discovery.status_code == 200
    assert discovery.headers["content-type"] == "application/json"
    assert int(discovery.headers["content-length"]) == len(discovery.content)
    assert_cacheable(discovery, 300)
    document = discovery.json()
    assert document["issuer"] == expected_issuer
    assert document["jwks_uri"] == f"{expected_issuer}{JWKS}"
    assert "id_token" in document["response_types_supported"]
    assert "public" in document["subject_types_supported"]
    assert document["id_token_signing_alg_values_supported"] == ["ES256"]

    keys = client.get(f"{base}{JWKS}")
    assert keys.status_code == 200
    assert keys.headers["content-type"] == "application/json"
    assert_cacheable(keys, 300)
    jwks = keys.json()
    assert jwks == broker.jwks()
    assert [k["kid"] for k in jwks["keys"]] == [KEY.kid]
    for jwk in jwks["keys"]:
        assert not PRIVATE_JWK_MEMBERS & jwk.keys()  # public halves only
        assert jwk["use"] == "sig"
    # Every published key loads as a verification key.
    assert jwt.PyJWKSet.from_dict(jwks).keys[0].key_id == KEY.kid

    for path in (f"{base}{DISCOVERY}", f"{base}{JWKS}"):
        head = client.head(path)
        get = client.get(path)
        assert head.status_code == 200
        assert head.content == b""
        assert head.headers["content-length"] == get.headers["content-length"]
        assert head.headers["etag"] == get.headers["etag"]
        assert head.headers["content-type"] == "application/json"
        assert_cacheable(head)

    # Nothing reached the app, no role was resolved, STS was not called.
    assert downstream.paths == []
    assert resolver.calls == 0
    assert strict_sts.calls == 0

    # Other paths (including the root documents when the issuer has a path) pass through.
    others = [
        "/",
        "/.well-known/other",
        f"{base}{JWKS}/",
        f"{base}/.well-known/jwks",
        f"{base}/jwks.json",
    ]
    if base:
        others += [DISCOVERY, JWKS, f"/other{DISCOVERY}"]
    for path in others:
        response = client.get(path)
        assert response.status_code == 299, path
        assert response.content == b"downstream"
    assert [p for _, p in downstream.paths] == others
    assert resolver.calls == len(others)


def test_oidc_etag_and_if_none_match(broker: CredentialBroker) -> None:
    client, _, _ = oidc_client(broker)
    for path in (ISSUER_DISCOVERY, ISSUER_JWKS):
        first = client.get(path)
        etag = first.headers["etag"]
        assert etag.startswith('"') and etag.endswith('"') and len(etag) > 2
        assert client.get(path).headers["etag"] == etag  # stable

        for value in (etag, f"W/{etag}", f'"something-else", {etag}'):
            cached = client.get(path, headers={"If-None-Match": value})
            assert cached.status_code == 304, value
            assert cached.content == b""
            assert cached.headers["etag"] == etag
            assert_cacheable(cached)
        head = client.head(path, headers={"If-None-Match": etag})
        assert head.status_code == 304

        stale = client.get(path, headers={"If-None-Match": '"not-the-etag"'})
        assert stale.status_code == 200
        assert stale.content == first.content
    # The two documents have different ETags.
    assert client.get(ISSUER_DISCOVERY).headers["etag"] != client.get(ISSUER_JWKS).headers["etag"]


def test_oidc_if_none_match_star_is_304(broker: CredentialBroker) -> None:
    """RFC 9110 13.1.2: ``If-None-Match: *`` is false when the resource exists, and a GET or
    HEAD whose If-None-Match is false MUST be answered 304.

    BUG (minor): the middleware only looks for its own ETag in the header, so ``*`` gets 200.
    """
    client, _, _ = oidc_client(broker)
    for path in (ISSUER_DISCOVERY, ISSUER_JWKS):
        assert client.get(path, headers={"If-None-Match": "*"}).status_code == 304
        assert client.head(path, headers={"If-None-Match": "*"}).status_code == 304


def test_oidc_documents_served_at_a_percent_encoded_issuer_path(make_broker: Any) -> None:
    """The discovery document publishes ``jwks_uri`` with the issuer's path as written
    (percent-encoded); ASGI servers put the *decoded* path in ``scope["path"]``.

    BUG: the middleware matches ``scope["path"]`` against the raw (still encoded) issuer path,
    so for an issuer like ``https://example.com/t%C3%A9nant`` both documents fall through to
    the app (404) and AWS cannot fetch the keys the discovery document points to.
    """
    broker = make_broker(issuer="https://example.com/t%C3%A9nant")
    client, downstream, _ = oidc_client(broker)
    discovery = client.get("/t%C3%A9nant" + DISCOVERY)
    assert discovery.status_code == 200, "discovery document not served"
    jwks_uri = discovery.json()["jwks_uri"]
    assert jwks_uri == "https://example.com/t%C3%A9nant" + JWKS
    response = client.get(urlsplit(jwks_uri).path)
    assert response.status_code == 200
    assert response.json() == broker.jwks()
    assert downstream.paths == []


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_oidc_other_methods_get_405_with_allow(broker: CredentialBroker, method: str) -> None:
    client, downstream, resolver = oidc_client(broker)
    for path in (ISSUER_DISCOVERY, ISSUER_JWKS):
        response = client.request(method, path)
        assert response.status_code == 405
        allowed = {m.strip() for m in response.headers["allow"].split(",")}
        assert allowed == {"GET", "HEAD"}
        assert response.content == b""
    assert downstream.paths == []
    assert resolver.calls == 0


def test_oidc_max_age_is_configurable(broker: CredentialBroker) -> None:
    client, _, _ = oidc_client(broker, oidc_max_age=60)
    assert_cacheable(client.get(ISSUER_JWKS), 60)
    assert_cacheable(client.get(ISSUER_DISCOVERY), 60)


def test_serve_oidc_false_passes_documents_through(broker: CredentialBroker) -> None:
    client, downstream, _ = oidc_client(broker, serve_oidc=False)
    assert client.get(ISSUER_JWKS).status_code == 299
    assert client.get(ISSUER_DISCOVERY).status_code == 299
    assert downstream.paths == [("GET", ISSUER_JWKS), ("GET", ISSUER_DISCOVERY)]


def test_oidc_key_rotation_publishes_both_keys(make_broker: Any, strict_sts: StrictSTS) -> None:
    broker = make_broker(signing_keys=[KEY, KEY_2])
    client, _, _ = oidc_client(broker)
    jwks = client.get(ISSUER_JWKS).json()
    assert [k["kid"] for k in jwks["keys"]] == [KEY.kid, KEY_2.kid]
    assert {k["alg"] for k in jwks["keys"]} == {"ES256", "RS256"}
    discovery = client.get(ISSUER_DISCOVERY).json()
    assert set(discovery["id_token_signing_alg_values_supported"]) == {"ES256", "RS256"}

    # The first key signs; STS (given this JWKS) verifies it and answers.
    seen = Seen()
    response = TestClient(starlette_app(seen, broker)).get("/whoami", headers={"x-tenant": "k"})
    assert response.status_code == 200
    assert strict_sts.requests_for(arn("k"))[0].token_header["kid"] == KEY.kid


def test_oidc_documents_served_while_sts_is_down(make_broker: Any, strict_sts: StrictSTS) -> None:
    broker = make_broker(max_attempts=1, exchange_deadline=1.0)
    strict_sts.fail_always()
    client, _, _ = oidc_client(broker)
    assert client.get(ISSUER_JWKS).status_code == 200
    assert strict_sts.calls == 0


# -- errors ------------------------------------------------------------------------------------


def assert_no_leak(response: httpx.Response, sts: StrictSTS, *forbidden: str) -> None:
    text = response.text + json.dumps(dict(response.headers))
    tokens = [r.params["WebIdentityToken"] for r in sts.requests if "WebIdentityToken" in r.params]
    for value in (*forbidden, *tokens, "eyJ", ACCOUNT, "arn:aws"):
        assert value not in text


def test_rejected_exchange_is_502(strict_sts: StrictSTS, broker: CredentialBroker) -> None:
    client = TestClient(starlette_app(Seen(), broker))
    good = client.get("/whoami", headers={"x-tenant": "ok"})
    assert good.status_code == 200
    issued = strict_sts.requests_for(arn("ok"))[0].credentials
    assert issued is not None

    strict_sts.reject_roles = {arn("denied")}
    response = client.get("/whoami", headers={"x-tenant": "denied"})
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/json"
    assert "retry-after" not in response.headers
    body = response.json()
    assert set(body) == {"error", "code"}
    assert body["code"] == "AccessDenied"
    assert isinstance(body["error"], str) and body["error"]
    # STS saw (and verified) a token for the denied role; none of it is in the answer.
    assert strict_sts.requests_for(arn("denied"))[0].error_code == "AccessDenied"
    assert_no_leak(response, strict_sts, *issued.values(), arn("denied"), "tenant-denied")


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        ({"code": "ServiceUnavailable", "status": 503, "message": "down"}, "ServiceUnavailable"),
        ({"code": "Throttling", "status": 400, "message": "Rate exceeded"}, "Throttling"),
    ],
)
def test_unavailable_sts_is_503_with_retry_after(
    strict_sts: StrictSTS, make_broker: Any, fault: dict[str, Any], code: str
) -> None:
    broker = make_broker(max_attempts=2, exchange_deadline=2.0)
    strict_sts.fail_always(**fault)
    response = TestClient(starlette_app(Seen(), broker)).get("/whoami", headers={"x-tenant": "u"})
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) > 0
    assert response.headers["content-type"] == "application/json"
    assert response.json()["code"] == code
    assert set(response.json()) == {"error", "code"}
    assert strict_sts.calls == 2  # retried once within the deadline, then gave up
    assert_no_leak(response, strict_sts, arn("u"))


def test_hung_sts_is_503_after_the_deadline(strict_sts: StrictSTS, make_broker: Any) -> None:
    broker = make_broker(exchange_deadline=0.3, max_attempts=1)
    strict_sts.hang = True
    try:
        response = TestClient(starlette_app(Seen(), broker)).get(
            "/whoami", headers={"x-tenant": "h"}
        )
    finally:
        strict_sts.release()
    assert response.status_code == 503
    assert "retry-after" in response.headers
    assert response.json()["code"] is None
    assert_no_leak(response, strict_sts, arn("h"))


def test_on_error_sync_hook_replaces_the_default(
    strict_sts: StrictSTS, broker: CredentialBroker
) -> None:
    calls: list[tuple[str, CredentialsUnavailable]] = []

    def on_error(scope: Any, error: CredentialsUnavailable) -> Response:
        calls.append((scope["path"], error))
        return JSONResponse({"custom": error.code}, status_code=418)

    strict_sts.reject_roles = {arn("denied")}
    app = starlette_app(Seen(), broker, on_error=on_error)
    response = TestClient(app).get("/whoami", headers={"x-tenant": "denied"})
    assert response.status_code == 418
    assert response.json() == {"custom": "AccessDenied"}
    [(path, error)] = calls
    assert path == "/whoami"
    assert isinstance(error, CredentialsRejected)
    assert error.code == "AccessDenied"


def test_on_error_async_hook_replaces_the_default(strict_sts: StrictSTS, make_broker: Any) -> None:
    broker = make_broker(max_attempts=1, exchange_deadline=1.0)
    errors: list[CredentialsUnavailable] = []

    async def on_error(scope: Any, error: CredentialsUnavailable) -> Response:
        await asyncio.sleep(0)
        errors.append(error)
        return PlainTextResponse("later", status_code=503, headers={"Retry-After": "30"})

    strict_sts.fail_always()
    app = starlette_app(Seen(), broker, on_error=on_error)
    response = TestClient(app).get("/whoami", headers={"x-tenant": "u"})
    assert response.status_code == 503
    assert response.text == "later"
    assert response.headers["retry-after"] == "30"
    assert isinstance(errors[0], STSUnavailable)


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_on_error_hook_returning_none_keeps_the_default(
    strict_sts: StrictSTS, broker: CredentialBroker, is_async: bool
) -> None:
    calls: list[CredentialsUnavailable] = []

    def sync_hook(scope: Any, error: CredentialsUnavailable) -> None:
        calls.append(error)

    async def async_hook(scope: Any, error: CredentialsUnavailable) -> None:
        calls.append(error)

    strict_sts.reject_roles = {arn("denied")}
    app = starlette_app(Seen(), broker, on_error=async_hook if is_async else sync_hook)
    response = TestClient(app).get("/whoami", headers={"x-tenant": "denied"})
    assert response.status_code == 502
    assert response.json()["code"] == "AccessDenied"
    assert len(calls) == 1


def test_error_app_is_not_reached(strict_sts: StrictSTS, broker: CredentialBroker) -> None:
    seen = Seen()
    strict_sts.reject_roles = {arn("denied")}
    response = TestClient(starlette_app(seen, broker)).get(
        "/whoami", headers={"x-tenant": "denied"}
    )
    assert response.status_code == 502
    assert seen.values == []


# -- websockets --------------------------------------------------------------------------------


def test_websocket_gets_credentials_in_state(
    strict_sts: StrictSTS, broker: CredentialBroker
) -> None:
    seen = Seen()
    client = TestClient(starlette_app(seen, broker))
    with client.websocket_connect("/ws", headers={"x-tenant": "ws"}) as websocket:
        message = websocket.receive_json()
    assert message["key"] == sts_keys(strict_sts, arn("ws"))[0]
    assert isinstance(seen.values[0], Credentials)


def test_websocket_without_role_gets_none(strict_sts: StrictSTS, broker: CredentialBroker) -> None:
    seen = Seen()
    with TestClient(starlette_app(seen, broker)).websocket_connect("/ws") as websocket:
        assert websocket.receive_json() == {"key": None}
    assert seen.values == [None]
    assert strict_sts.calls == 0


def test_websocket_closed_1011_when_rejected(
    strict_sts: StrictSTS, broker: CredentialBroker
) -> None:
    seen = Seen()
    strict_sts.reject_roles = {arn("denied")}
    client = TestClient(starlette_app(seen, broker))
    with (
        pytest.raises(WebSocketDisconnect) as info,
        client.websocket_connect("/ws", headers={"x-tenant": "denied"}),
    ):
        pass
    assert type(info.value) is WebSocketDisconnect
    assert info.value.code == 1011
    assert seen.values == []


def test_websocket_closed_1013_when_unavailable(strict_sts: StrictSTS, make_broker: Any) -> None:
    broker = make_broker(max_attempts=1, exchange_deadline=1.0)
    strict_sts.fail_always(code="Throttling", status=400, message="Rate exceeded")
    seen = Seen()
    client = TestClient(starlette_app(seen, broker))
    with (
        pytest.raises(WebSocketDisconnect) as info,
        client.websocket_connect("/ws", headers={"x-tenant": "u"}),
    ):
        pass
    assert type(info.value) is WebSocketDisconnect
    assert info.value.code == 1013
    assert seen.values == []


# -- lifespan ----------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["middleware_list", "plain_wrapper"])
def test_lifespan_passes_through_to_starlette(
    strict_sts: StrictSTS, broker: CredentialBroker, form: str
) -> None:
    events: list[str] = []
    resolver = AsyncResolver()

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[dict[str, Any]]:
        events.append("startup")
        yield {"marker": "from-lifespan"}
        events.append("shutdown")

    async def whoami(request: StarletteRequest) -> JSONResponse:
        return JSONResponse(
            {
                "marker": request.state.marker,
                "type": type(request.state.aws_credentials).__name__,
            }
        )

    routes = [Route("/whoami", whoami)]
    app: Any
    if form == "middleware_list":
        app = Starlette(
            routes=routes,
            lifespan=lifespan,
            middleware=[Middleware(CredentialsMiddleware, broker=broker, resolve_role=resolver)],
        )
    else:
        inner = Starlette(routes=routes, lifespan=lifespan)
        app = CredentialsMiddleware(inner, broker=broker, resolve_role=resolver)

    with TestClient(app) as client:
        assert events == ["startup"]
        assert resolver.calls == 0  # lifespan is not a request
        response = client.get("/whoami", headers={"x-tenant": "life"})
        assert response.json() == {"marker": "from-lifespan", "type": "Credentials"}
    assert events == ["startup", "shutdown"]
    assert resolver.calls == 1


@pytest.mark.parametrize("lifespan", ["on", "pass"])
def test_close_broker_closes_it_at_lifespan_shutdown(
    strict_sts: StrictSTS, broker: CredentialBroker, lifespan: str
) -> None:
    # "on": the middleware answers lifespan itself (as for Django); "pass": after the app's own
    # shutdown has completed.
    inner = Starlette(routes=[Route("/", lambda request: PlainTextResponse("ok"))])
    app = CredentialsMiddleware(
        inner,
        broker=broker,
        resolve_role=lambda scope: None,
        lifespan=lifespan,  # type: ignore[arg-type]
        close_broker=True,
    )
    with TestClient(app) as client:
        assert client.get("/").status_code == 200
        assert not broker._closed
    assert broker._closed


def test_the_broker_stays_open_at_shutdown_by_default(
    strict_sts: StrictSTS, broker: CredentialBroker
) -> None:
    # A broker may be shared by several apps: the middleware closes it only when told to.
    app = CredentialsMiddleware(
        Starlette(routes=[]), broker=broker, resolve_role=lambda scope: None, lifespan="on"
    )
    with TestClient(app):
        pass
    assert not broker._closed


# -- concurrency -------------------------------------------------------------------------------


async def wait_until(predicate: Callable[[], bool], rounds: int = 10_000) -> None:
    """Yield to the event loop (no sleeping) until ``predicate()`` holds."""
    for _ in range(rounds):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


async def test_200_concurrent_cold_requests_make_one_sts_call(
    strict_sts: StrictSTS, broker: CredentialBroker
) -> None:
    seen = Seen()
    app = starlette_app(seen, broker)
    strict_sts.hang = True
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            tasks = [
                asyncio.create_task(client.get("/whoami", headers={"x-tenant": "hot"}))
                for _ in range(200)
            ]
            # Every request is waiting on the (held) exchange before STS answers.
            assert await asyncio.to_thread(strict_sts.wait_for_calls, 1)
            await wait_until(lambda: broker.stats.misses == 200)
            strict_sts.release()
            responses = await asyncio.gather(*tasks)
    finally:
        strict_sts.release()
    assert [r.status_code for r in responses] == [200] * 200
    keys = {r.json()["key"] for r in responses}
    assert keys == set(sts_keys(strict_sts, arn("hot")))
    assert len(keys) == 1
    assert strict_sts.calls == 1
    assert broker.stats.exchanges == 1
    assert all(isinstance(v, Credentials) for v in seen.values)


async def test_cancelled_client_does_not_fail_the_others(
    strict_sts: StrictSTS, broker: CredentialBroker
) -> None:
    app = starlette_app(Seen(), broker)
    strict_sts.hang = True
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            first = asyncio.create_task(client.get("/whoami", headers={"x-tenant": "gone"}))
            # The first request starts the exchange...
            assert await asyncio.to_thread(strict_sts.wait_for_calls, 1)
            others = [
                asyncio.create_task(client.get("/whoami", headers={"x-tenant": "gone"}))
                for _ in range(20)
            ]
            await wait_until(lambda: broker.stats.misses == 21)
            # ... and its client goes away (the task running the app is cancelled).
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            strict_sts.release()
            responses = await asyncio.gather(*others)
            after = await client.get("/whoami", headers={"x-tenant": "gone"})
    finally:
        strict_sts.release()
    assert [r.status_code for r in responses] == [200] * 20
    assert after.status_code == 200
    assert {r.json()["key"] for r in [*responses, after]} == set(sts_keys(strict_sts, arn("gone")))
    assert strict_sts.calls == 1
    assert broker.stats.exchange_failures == 0


# -- secrets in logs ---------------------------------------------------------------------------


def test_logs_hold_no_secrets(
    strict_sts: StrictSTS, make_broker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="stscreds")
    broker = make_broker(max_attempts=2, exchange_deadline=2.0)
    client = TestClient(starlette_app(Seen(), broker))
    assert client.get("/whoami", headers={"x-tenant": "ok"}).status_code == 200
    assert client.get("/whoami", headers={"x-tenant": "ok"}).status_code == 200
    strict_sts.reject_roles = {arn("denied")}
    assert client.get("/whoami", headers={"x-tenant": "denied"}).status_code == 502
    strict_sts.fail_next(1, code="Throttling", status=400, message="Rate exceeded")
    assert client.get("/whoami", headers={"x-tenant": "retried"}).status_code == 200
    strict_sts.fail_always(
        code="InvalidIdentityToken",
        status=400,
        message="bad token " + strict_sts.requests_for(arn("ok"))[0].params["WebIdentityToken"],
    )
    assert client.get("/whoami", headers={"x-tenant": "quoted"}).status_code == 502
    strict_sts.fail_always()
    assert client.get("/whoami", headers={"x-tenant": "down"}).status_code == 503

    records = [r for r in caplog.records if r.name.startswith("stscreds")]
    messages = [r.getMessage() for r in records]
    assert any("retry" in m for m in messages)  # INFO from the Throttling retry
    assert any("AccessDenied" in m for m in messages)  # WARNING for the rejection
    text = "\n".join(f"{r.getMessage()} {r.exc_text or ''} {r.args!r}" for r in records)
    secrets = []
    for call in strict_sts.requests:
        secrets.append(call.params["WebIdentityToken"])
        if call.credentials:
            secrets += [call.credentials["SecretAccessKey"], call.credentials["SessionToken"]]
    assert len(secrets) >= 5
    for secret in secrets:
        assert secret not in text
    assert "eyJ" not in text


# -- constructor validation --------------------------------------------------------------------


class NotABroker:
    issuer = ISSUER


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"broker": NotABroker()}, TypeError, "broker"),
        ({"broker": None}, TypeError, "broker"),
        ({"resolve_role": "arn:aws:iam::123456789012:role/x"}, TypeError, "resolve_role"),
        ({"resolve_role": None}, TypeError, "resolve_role"),
        ({"state_key": ""}, ValueError, "state_key"),
        ({"state_key": None}, ValueError, "state_key"),
        ({"oidc_max_age": 0}, ValueError, "oidc_max_age"),
        ({"oidc_max_age": -5}, ValueError, "oidc_max_age"),
        ({"oidc_max_age": True}, ValueError, "oidc_max_age"),
        ({"oidc_max_age": 1.5}, ValueError, "oidc_max_age"),
    ],
)
def test_constructor_validation(
    broker: CredentialBroker, options: dict[str, Any], error: type[Exception], match: str
) -> None:
    kwargs: dict[str, Any] = {"broker": broker, "resolve_role": resolve_role, **options}
    with pytest.raises(error, match=match):
        CredentialsMiddleware(Downstream(), **kwargs)


# -- real server: uvicorn + STS discovering the JWKS from the middleware -----------------------


@contextlib.contextmanager
def serve(app: Any, sock: socket.socket) -> Iterator[uvicorn.Server]:
    """Run ``app`` under uvicorn in a thread on the already-listening ``sock``; stop after."""
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        lifespan="on",
        log_config=None,
        access_log=False,
        http="h11",
        ws="none",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True
    )
    thread.start()
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        assert not thread.is_alive()


@pytest.fixture
def listening_socket() -> Iterator[socket.socket]:
    """A socket listening on a free 127.0.0.1 port, so the issuer URL is known up front and
    connections queue until uvicorn serves them (no start-up race)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    try:
        yield sock
    finally:
        sock.close()


def test_real_server_end_to_end_with_jwks_discovery(
    strict_sts: StrictSTS, listening_socket: socket.socket
) -> None:
    issuer = f"http://127.0.0.1:{listening_socket.getsockname()[1]}"
    broker = CredentialBroker(
        issuer=issuer, signing_keys=[KEY, KEY_2], sts_endpoint_url=strict_sts.url
    )
    # Registered like an IAM OIDC provider: STS knows only the issuer URL and discovers keys.
    strict_sts.configure(issuer=issuer, jwks=None)
    ready = threading.Event()

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        ready.set()
        yield

    seen = Seen()
    app = Starlette(
        routes=[whoami_route(seen)],
        lifespan=lifespan,
        middleware=[Middleware(CredentialsMiddleware, broker=broker, resolve_role=resolve_role)],
    )
    try:
        with serve(app, listening_socket), httpx.Client(base_url=issuer, timeout=10) as http:
            assert ready.wait(10)
            first = http.get("/whoami", headers={"x-tenant": "e2e"})
            assert first.status_code == 200, first.text
            again = http.get("/whoami", headers={"x-tenant": "e2e"})
            other = http.get("/whoami", headers={"x-tenant": "e2e2"})
            assert again.status_code == other.status_code == 200

            # STS verified each token against the JWKS it fetched from the middleware.
            assert strict_sts.calls == 2  # the repeat was a cache hit
            assert strict_sts.jwks_fetches == 2
            assert strict_sts.jwks_cache_control == "public, max-age=300"
            [call] = strict_sts.requests_for(arn("e2e"))
            assert call.claims is not None and call.claims["iss"] == issuer
            assert first.json()["key"] == again.json()["key"] == call.credentials["AccessKeyId"]
            assert other.json()["key"] == sts_keys(strict_sts, arn("e2e2"))[0]

            # Verify a recorded token ourselves against the JWKS the server publishes.
            discovery = http.get(DISCOVERY)
            assert discovery.status_code == 200
            jwks_uri = discovery.json()["jwks_uri"]
            assert jwks_uri == f"{issuer}{JWKS}"
            published = http.get(jwks_uri)
            assert_cacheable(published, 300)
            keyset = jwt.PyJWKSet.from_dict(published.json())
            token = call.params["WebIdentityToken"]
            header = jwt.get_unverified_header(token)
            assert header["kid"] == KEY.kid
            claims = jwt.decode(
                token,
                key=keyset[header["kid"]],
                algorithms=[header["alg"]],
                audience="sts.amazonaws.com",
                issuer=issuer,
            )
            assert claims["sub"] == "tenant:e2e"
            # A token signed with a key that is not published does not verify.
            stranger = SigningKey.generate("ES256", kid=KEY.kid).sign(dict(claims))
            with pytest.raises(jwt.InvalidSignatureError):
                jwt.decode(
                    stranger,
                    key=keyset[KEY.kid],
                    algorithms=["ES256"],
                    audience="sts.amazonaws.com",
                )

            # Conditional GET and HEAD through a real HTTP server.
            etag = published.headers["etag"]
            not_modified = http.get(JWKS, headers={"If-None-Match": etag})
            assert not_modified.status_code == 304
            assert not_modified.content == b""
            head = http.head(JWKS)
            assert head.status_code == 200
            assert int(head.headers["content-length"]) == len(published.content)
            assert http.post(JWKS).status_code == 405

            # An error through the real server.
            strict_sts.reject_roles = {arn("nope")}
            denied = http.get("/whoami", headers={"x-tenant": "nope"})
            assert denied.status_code == 502
            assert denied.json()["code"] == "AccessDenied"
    finally:
        broker.close()
    assert strict_sts.internal_errors == []


def test_real_server_without_oidc_endpoints_sts_cannot_verify(
    strict_sts: StrictSTS, listening_socket: socket.socket
) -> None:
    """Negative control: with serve_oidc=False nothing publishes the keys, so STS (discovering
    from the issuer) refuses the token; the endpoint test above really used our documents."""
    issuer = f"http://127.0.0.1:{listening_socket.getsockname()[1]}"
    broker = CredentialBroker(issuer=issuer, signing_keys=[KEY], sts_endpoint_url=strict_sts.url)
    strict_sts.configure(issuer=issuer, jwks=None)
    app = Starlette(
        routes=[whoami_route(Seen())],
        middleware=[
            Middleware(
                CredentialsMiddleware,
                broker=broker,
                resolve_role=resolve_role,
                serve_oidc=False,
            )
        ],
    )
    try:
        with serve(app, listening_socket), httpx.Client(base_url=issuer, timeout=10) as http:
            assert http.get(DISCOVERY).status_code == 404
            response = http.get("/whoami", headers={"x-tenant": "e2e"})
    finally:
        broker.close()
    assert response.status_code == 502
    assert response.json()["code"] == "InvalidIdentityToken"
    assert strict_sts.jwks_fetches == 0


# -- a resolver returning the wrong type (fix 7), Retry-After that says when (fix 5) ---------


def arn_resolver(scope: Any) -> Any:
    return arn("a")  # a str, not a Role: the mistake users make


async def async_arn_resolver(scope: Any) -> Any:
    return {"arn": arn("a")}


@pytest.mark.parametrize(
    ("resolver", "type_name"),
    [(arn_resolver, "builtins.str"), (async_arn_resolver, "builtins.dict")],
)
def test_resolver_returning_the_wrong_type_is_a_500_logged_once_by_name(
    strict_sts: StrictSTS,
    broker: CredentialBroker,
    caplog: pytest.LogCaptureFixture,
    resolver: Any,
    type_name: str,
) -> None:
    caplog.set_level(logging.ERROR, logger="stscreds")
    seen = Seen()
    client = TestClient(starlette_app(seen, broker, resolve_role=resolver))
    for _ in range(3):
        response = client.get("/whoami")
        assert response.status_code == 500
        assert response.headers["content-type"] == "application/json"
        assert "misconfiguration" in response.json()["error"]
    assert seen.values == []  # the app never ran
    assert strict_sts.calls == 0
    (line,) = [r.getMessage() for r in caplog.records if r.name == "stscreds"]
    assert "resolve_role" in line and resolver.__name__ in line and type_name in line
    assert "AttributeError" not in line


def test_resolver_returning_the_wrong_type_closes_a_websocket(broker: CredentialBroker) -> None:
    client = TestClient(starlette_app(Seen(), broker, resolve_role=arn_resolver))
    with pytest.raises(WebSocketDisconnect) as info, client.websocket_connect("/ws"):
        pass
    assert info.value.code == 1011


def test_retry_after_says_when_a_remembered_failure_ends(
    strict_sts: StrictSTS, make_broker: Any
) -> None:
    # A short grant is remembered ~30 s: the client is told ~30, not the fixed 5.
    broker = make_broker(max_attempts=1)
    strict_sts.expiration = lambda now, _requested: now + 10
    client = TestClient(starlette_app(Seen(), broker))
    for _ in range(2):
        response = client.get("/whoami", headers={"x-tenant": "s"})
        assert response.status_code == 503
        assert 20 <= int(response.headers["retry-after"]) <= 34
    assert strict_sts.calls == 1


# -- health endpoint ---------------------------------------------------------------------------

HEALTH_KEYS = {
    "status",
    "reasons",
    "last_success_at",
    "seconds_since_success",
    "last_failure",
    "clock",
    "store",
    "cached_identities",
    "mandatory_window_identities",
    "inflight_exchanges",
}


def health_client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


def assert_health_headers(response: httpx.Response) -> None:
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    assert "etag" not in response.headers


async def test_health_endpoint_answers_the_brokers_health(
    strict_sts: StrictSTS, broker: CredentialBroker
) -> None:
    app = starlette_app(Seen(), broker, health_path="/healthz")
    async with health_client(app) as client:
        fresh = await client.get("/healthz")
        assert fresh.status_code == 200
        assert_health_headers(fresh)
        assert set(fresh.json()) == HEALTH_KEYS
        assert fresh.json() == broker.health()
        assert fresh.json()["status"] == "ok"

        assert (await client.get("/whoami", headers={"x-tenant": "a"})).status_code == 200
        response = await client.get("/healthz")
        assert response.status_code == 200
        assert_health_headers(response)
        assert int(response.headers["content-length"]) == len(response.content)
        health = response.json()
        assert health["status"] == "ok"
        assert health["reasons"] == []
        assert health["cached_identities"] == 1
        assert health["clock"]["known"] is True
        assert isinstance(health["last_success_at"], float)

        head = await client.head("/healthz")
        assert head.status_code == 200
        assert head.content == b""
        assert_health_headers(head)
        assert int(head.headers["content-length"]) > 0
    assert strict_sts.calls == 1


async def call_raw(app: Any, method: str, path: str) -> list[dict[str, Any]]:
    """The ASGI messages ``app`` sends for one request (what a server would write)."""
    sent: list[dict[str, Any]] = []

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": []}
    await app(scope, receive, send)
    return sent


async def test_health_endpoint_head_sends_no_body(broker: CredentialBroker) -> None:
    app = CredentialsMiddleware(
        Downstream(), broker=broker, resolve_role=CountingResolver(), health_path="/healthz"
    )
    get_start, get_body = await call_raw(app, "GET", "/healthz")
    head_start, head_body = await call_raw(app, "HEAD", "/healthz")
    assert get_start["status"] == head_start["status"] == 200
    assert head_start["headers"] == get_start["headers"]
    assert dict(get_start["headers"])[b"content-length"] == str(len(get_body["body"])).encode()
    assert json.loads(get_body["body"])["status"] == "ok"
    assert head_body == {"type": "http.response.body", "body": b""}


async def test_health_endpoint_needs_no_role_and_calls_no_resolver(
    strict_sts: StrictSTS, broker: CredentialBroker
) -> None:
    downstream, resolver = Downstream(), CountingResolver()
    app = CredentialsMiddleware(
        downstream, broker=broker, resolve_role=resolver, health_path="/healthz"
    )
    async with health_client(app) as client:
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.head("/healthz", headers={"x-tenant": "a"})).status_code == 200
        post = await client.post("/healthz")
        assert post.status_code == 405
        assert {m.strip() for m in post.headers["allow"].split(",")} == {"GET", "HEAD"}
        assert resolver.calls == 0
        assert downstream.paths == []
        # Only that exact path: the others reach the resolver and the app.
        for path in ("/healthz/", "/healthz/x", "/HEALTHZ", "/health"):
            assert (await client.get(path)).status_code == 299, path
    assert resolver.calls == 4
    assert [path for _, path in downstream.paths] == [
        "/healthz/",
        "/healthz/x",
        "/HEALTHZ",
        "/health",
    ]
    assert strict_sts.calls == 0


@pytest.mark.parametrize("how", ["close", "aclose"])
async def test_health_endpoint_is_503_once_the_broker_is_closed(
    broker: CredentialBroker, how: str
) -> None:
    client, _, _ = oidc_client(broker, health_path="/healthz")
    assert client.get("/healthz").status_code == 200
    if how == "close":
        broker.close()
    else:
        await broker.aclose()
    response = client.get("/healthz")
    assert response.status_code == 503
    assert_health_headers(response)
    assert response.json()["status"] == "unavailable"
    assert response.json()["reasons"] == ["credential broker is closed"]
    assert "retry-after" not in response.headers
    head = client.head("/healthz")
    assert head.status_code == 503
    assert head.content == b""


async def test_health_endpoint_is_503_after_three_short_grants(
    strict_sts: StrictSTS, make_broker: Any
) -> None:
    broker = make_broker(max_attempts=1)
    strict_sts.expiration = lambda now, _requested: now + 10  # (nearly) expired on arrival
    app = starlette_app(Seen(), broker, health_path="/healthz")
    async with health_client(app) as client:
        for tenant in ("a", "b", "c"):
            assert (await client.get("/whoami", headers={"x-tenant": tenant})).status_code == 503
        down = await client.get("/healthz")
        assert down.status_code == 503
        assert down.json()["status"] == "unavailable"
        assert down.json()["last_failure"]["code"] == "ShortGrant"
        strict_sts.expiration = None
        assert (await client.get("/whoami", headers={"x-tenant": "d"})).status_code == 200
        up = await client.get("/healthz")
        assert up.status_code == 200
        assert up.json()["status"] == "ok"


async def test_health_endpoint_is_off_by_default(broker: CredentialBroker) -> None:
    client, downstream, resolver = oidc_client(broker)
    response = client.get("/healthz")
    assert response.status_code == 299
    assert response.content == b"downstream"
    assert downstream.paths == [("GET", "/healthz")]
    assert resolver.calls == 1


def test_health_endpoint_without_the_oidc_documents(broker: CredentialBroker) -> None:
    client, downstream, _ = oidc_client(broker, serve_oidc=False, health_path=ISSUER_JWKS)
    assert client.get(ISSUER_JWKS).json()["status"] == "ok"
    assert client.get(ISSUER_DISCOVERY).status_code == 299
    assert downstream.paths == [("GET", ISSUER_DISCOVERY)]


def test_health_endpoint_at_a_non_ascii_path(broker: CredentialBroker) -> None:
    client, downstream, _ = oidc_client(broker, health_path="/sant\u00e9")
    assert client.get("/sant%C3%A9").json()["status"] == "ok"
    assert downstream.paths == []


@pytest.mark.parametrize(
    "path", ["healthz", "", " /healthz", "http://127.0.0.1/healthz", b"/healthz", 5, ["/h"]]
)
def test_bad_health_path_is_refused(broker: CredentialBroker, path: Any) -> None:
    with pytest.raises(ValueError, match="health_path"):
        CredentialsMiddleware(
            Downstream(), broker=broker, resolve_role=resolve_role, health_path=path
        )


def test_health_path_cannot_hide_an_oidc_document(broker: CredentialBroker) -> None:
    for path in (ISSUER_JWKS, ISSUER_DISCOVERY):
        with pytest.raises(ValueError, match=r"health_path.*OIDC document"):
            CredentialsMiddleware(
                Downstream(), broker=broker, resolve_role=resolve_role, health_path=path
            )


# --- hot key rotation ---------------------------------------------------------------------------


async def test_hot_rotation_runbook_through_discovery_without_a_restart(
    strict_sts: StrictSTS, uvicorn_server: Callable[..., str]
) -> None:
    """The README's rotation runbook, live: the strict STS discovers the JWKS from the app (as
    AWS does) and caches it; the ring is replaced three times in the running process."""
    holder: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await holder["app"](scope, receive, send)

    base = uvicorn_server(app, lifespan="off")
    old, new = SigningKey.generate("ES256", kid="old"), SigningKey.generate("RS256", kid="new")
    broker = strict_sts.make_broker(issuer=base, signing_keys=[old], discover=True)
    strict_sts.jwks_cache = True  # like AWS: the JWKS is cached for its max-age
    holder["app"] = CredentialsMiddleware(
        Starlette(), broker=broker, resolve_role=resolve_role, close_broker=True
    )

    async def documents() -> tuple[list[str], str, str]:
        async with httpx.AsyncClient(base_url=base, trust_env=False) as http:
            jwks, discovery = await http.get(JWKS), await http.get(DISCOVERY)
        assert jwks.status_code == discovery.status_code == 200
        kids = [k["kid"] for k in jwks.json()["keys"]]
        return kids, jwks.headers["etag"], discovery.headers["etag"]

    def signed_with(tenant: str) -> str:
        (call,) = strict_sts.requests_for(arn(tenant))
        return str(call.token_header["kid"])

    try:
        kids, jwks_etag, discovery_etag = await documents()
        assert kids == ["old"]
        first = await broker.get(role_for("a"))  # STS fetches and caches the JWKS
        assert signed_with("a") == "old"

        # 1. Publish the new key second: still signed by the old one.
        broker.set_signing_keys([old, new])
        kids, jwks_etag_2, discovery_etag_2 = await documents()
        assert kids == ["old", "new"]
        assert jwks_etag_2 != jwks_etag and discovery_etag_2 != discovery_etag
        async with httpx.AsyncClient(base_url=base, trust_env=False) as http:
            revalidated = await http.get(JWKS, headers={"If-None-Match": jwks_etag})
        assert revalidated.status_code == 200  # a cache holding the old ring gets the new one
        await broker.get(role_for("b"))
        assert signed_with("b") == "old"

        # Switching before AWS refetched the JWKS is the trap the wait avoids.
        broker.set_signing_keys([new, old])
        with pytest.raises(CredentialsRejected, match="No matching key"):
            await broker.get(role_for("c"))

        # 2. AWS's JWKS cache expires: 3. the new key signs and is accepted.
        strict_sts.forget_jwks()
        await broker.get(role_for("d"))
        assert signed_with("d") == "new"

        # 4. Retire the old key.
        broker.set_signing_keys([new])
        kids, _, _ = await documents()
        assert kids == ["new"]
        strict_sts.forget_jwks()
        await broker.get(role_for("e"))
        assert signed_with("e") == "new"

        # Credentials cached before any of it are still served, with no new exchange.
        assert broker.get_cached(role_for("a")) is first
        assert strict_sts.calls_for(arn("a")) == 1
    finally:
        broker.close()
