"""Tests for stscreds._wsgi: CredentialsWSGIMiddleware against a strict STS on loopback."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from werkzeug.test import Client
from werkzeug.wrappers import Response

from servers.sts import StrictSTS
from stscreds import (
    CredentialBroker,
    Credentials,
    CredentialsMiddleware,
    CredentialsWSGIMiddleware,
    Role,
    SigningKey,
)

ISSUER = "http://127.0.0.1:9/issuer"
ROLE_A = Role("arn:aws:iam::123456789012:role/tenant-a", subject="tenant:a")
ROLE_B = Role("arn:aws:iam::123456789012:role/tenant-b", subject="tenant:b")
ROLE_C = Role("arn:aws:iam::123456789012:role/tenant-c", subject="tenant:c")
ROLES = {"a": ROLE_A, "b": ROLE_B, "c": ROLE_C}


def tenant_role(environ: dict[str, Any]) -> Role | None:
    return ROLES.get(environ.get("HTTP_X_TENANT", ""))


def echo_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Answers with the access key id the middleware put in the environ (or "none")."""
    credentials: Credentials | None = environ["stscreds.credentials"]
    body = (credentials.access_key_id if credentials else "none").encode()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body]


@pytest.fixture
def make_broker(strict_sts: StrictSTS) -> Iterator[Callable[..., CredentialBroker]]:
    """Brokers signing with one key that the strict STS trusts; closed after the test."""
    key = SigningKey.generate("ES256")
    strict_sts.configure(issuer=ISSUER, jwks={"keys": [key.public_jwk()]})
    brokers: list[CredentialBroker] = []

    def make(**kwargs: Any) -> CredentialBroker:
        options: dict[str, Any] = {"max_attempts": 1, "exchange_deadline": 5.0}
        options.update(kwargs)
        broker = CredentialBroker(
            issuer=ISSUER, signing_keys=[key], sts_endpoint_url=strict_sts.url, **options
        )
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        broker.close()


@pytest.fixture
def make_middleware(
    make_broker: Callable[..., CredentialBroker],
) -> Iterator[Callable[..., CredentialsWSGIMiddleware]]:
    """Middlewares around ``echo_app``; their loop threads are stopped after the test."""
    made: list[CredentialsWSGIMiddleware] = []

    def make(app: Any = echo_app, **kwargs: Any) -> CredentialsWSGIMiddleware:
        broker = kwargs.pop("broker", None) or make_broker()
        kwargs.setdefault("resolve_role", tenant_role)
        middleware = CredentialsWSGIMiddleware(app, broker=broker, **kwargs)
        made.append(middleware)
        return middleware

    yield make
    for middleware in made:
        middleware.close()


def get(base: str, tenant: str) -> tuple[int, bytes]:
    """One GET on its own connection (no client pool shared between threads)."""
    parts = urlsplit(base)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
    try:
        connection.request("GET", "/", headers={"X-Tenant": tenant})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def loop_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "stscreds-wsgi"}


# --- single-flight across threads -------------------------------------------------------------


def test_50_concurrent_cold_requests_make_one_sts_call(
    strict_sts: StrictSTS, make_middleware: Any, wsgi_server: Any
) -> None:
    arrived = threading.Condition()
    resolved = 0

    def counting_resolver(environ: dict[str, Any]) -> Role | None:
        nonlocal resolved
        with arrived:
            resolved += 1
            arrived.notify_all()
        return tenant_role(environ)

    base = wsgi_server(make_middleware(resolve_role=counting_resolver))
    strict_sts.hang = True  # the one exchange waits until every request has arrived
    results: list[tuple[int, bytes]] = []
    threads = [threading.Thread(target=lambda: results.append(get(base, "a"))) for _ in range(50)]
    for thread in threads:
        thread.start()
    with arrived:
        assert arrived.wait_for(lambda: resolved == 50, timeout=20)
    assert strict_sts.wait_for_calls(1)
    strict_sts.release()
    for thread in threads:
        thread.join(30)

    assert len(results) == 50
    assert {status for status, _ in results} == {200}
    assert len({body for _, body in results}) == 1
    assert strict_sts.calls == 1
    assert results[0][1] == strict_sts.requests[0].credentials["AccessKeyId"].encode()


def test_two_middlewares_sharing_a_broker_share_its_loop_and_one_exchange(
    strict_sts: StrictSTS,
    make_broker: Callable[..., CredentialBroker],
    make_middleware: Any,
) -> None:
    # Two mounted apps (e.g. DispatcherMiddleware) wrapped with one broker: one loop thread
    # drives that broker, so its single-flight covers both.
    broker = make_broker()
    before = loop_threads()
    first = make_middleware(broker=broker)
    second = make_middleware(broker=broker)
    other = make_middleware()  # another broker: its own loop
    assert first._loop is second._loop
    assert other._loop is not first._loop
    strict_sts.hang = True
    results: list[Credentials] = []
    threads = [
        threading.Thread(target=lambda m=m: results.append(m.get(ROLE_A)))
        for m in (first, second, first, second, first, second)
    ]
    for thread in threads:
        thread.start()
    assert strict_sts.wait_for_calls(1)
    for thread in threads:
        thread.join(0.2)  # every thread is waiting on the one exchange by now
    strict_sts.release()
    for thread in threads:
        thread.join(30)
    assert len(results) == 6
    assert len({c.access_key_id for c in results}) == 1
    assert strict_sts.calls == 1
    assert len(loop_threads() - before) == 1  # `other` never needed its loop

    # Closing one middleware leaves the shared loop to the other; the last one stops it.
    first.close()
    assert Client(first).get("/", headers={"X-Tenant": "b"}).status_code == 503
    assert Client(second).get("/", headers={"X-Tenant": "b"}).status_code == 200
    assert len(loop_threads() - before) == 1
    second.close()
    assert loop_threads() - before == set()
    assert Client(second).get("/", headers={"X-Tenant": "c"}).status_code == 503
    # A middleware made afterwards for the same broker gets a loop again.
    third = make_middleware(broker=broker)
    assert Client(third).get("/", headers={"X-Tenant": "c"}).status_code == 200
    assert strict_sts.calls == 3


def test_cache_hit_is_served_in_the_request_thread(make_middleware: Any) -> None:
    middleware = make_middleware()
    client = Client(middleware)
    first = client.get("/", headers={"X-Tenant": "a"})
    assert first.status_code == 200
    hits = middleware.broker.stats.hits
    threads_before = loop_threads()

    broker = middleware.broker
    warm = make_middleware(broker=broker)  # a second middleware: its loop was never started
    second = Client(warm).get("/", headers={"X-Tenant": "a"})

    assert second.status_code == 200
    assert second.data == first.data
    assert broker.stats.hits == hits + 1
    assert loop_threads() == threads_before  # no loop thread started for a hit


def test_request_without_role_gets_none_and_no_call(
    strict_sts: StrictSTS, make_middleware: Any
) -> None:
    response = Client(make_middleware()).get("/", headers={"X-Tenant": "nobody"})
    assert response.status_code == 200
    assert response.data == b"none"
    assert strict_sts.calls == 0


def test_get_fetches_another_role_from_a_view(strict_sts: StrictSTS, make_middleware: Any) -> None:
    middleware = make_middleware()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        extra = middleware.get(ROLE_C)  # e.g. a view that also needs a reports role
        start_response("200 OK", [])
        return [extra.access_key_id.encode()]

    middleware.app = app
    response = Client(middleware).get("/", headers={"X-Tenant": "a"})
    assert response.status_code == 200
    assert strict_sts.calls_for(ROLE_C.arn) == 1
    assert (
        response.data == strict_sts.requests_for(ROLE_C.arn)[0].credentials["AccessKeyId"].encode()
    )


# --- errors: the same answers as the ASGI middleware ------------------------------------------


def asgi_echo(make_broker: Callable[..., CredentialBroker]) -> CredentialsMiddleware:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def resolve(scope: dict[str, Any]) -> Role | None:
        return ROLES.get(dict(scope["headers"]).get(b"x-tenant", b"").decode())

    return CredentialsMiddleware(app, broker=make_broker(), resolve_role=resolve)


async def asgi_get(app: CredentialsMiddleware, tenant: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get("/", headers={"X-Tenant": tenant})


# Not retry-after: each broker remembers the failure for its own random 0.5-2 s.
COMPARED_HEADERS = ("content-type", "content-length", "cache-control")


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        pytest.param("reject", 502, "AccessDenied", id="rejected-502"),
        pytest.param("unavailable", 503, "ServiceUnavailable", id="unavailable-503"),
    ],
)
def test_error_responses_match_the_asgi_middleware(
    strict_sts: StrictSTS,
    make_broker: Callable[..., CredentialBroker],
    make_middleware: Any,
    caplog: pytest.LogCaptureFixture,
    fault: str,
    status: int,
    code: str,
) -> None:
    # stscreds' own records (botocore's DEBUG log shows request bodies, token included).
    caplog.set_level(logging.DEBUG, logger="stscreds")
    if fault == "reject":
        strict_sts.reject_roles.add(ROLE_A.arn)
    else:
        strict_sts.fail_always()

    wsgi = Client(make_middleware()).get("/", headers={"X-Tenant": "a"})
    asgi = asyncio.run(asgi_get(asgi_echo(make_broker), "a"))

    assert wsgi.status_code == asgi.status_code == status
    assert wsgi.json == asgi.json() == {"error": asgi.json()["error"], "code": code}
    for name in COMPARED_HEADERS:
        assert wsgi.headers.get(name) == asgi.headers.get(name), name
    assert (wsgi.headers.get("retry-after") is not None) == (status == 503)
    if status == 503:
        assert 1 <= int(wsgi.headers["retry-after"]) <= 2
        assert 1 <= int(asgi.headers["retry-after"]) <= 2
    assert wsgi.headers["cache-control"] == "no-store"
    # Nothing secret in what was logged: no token, no part of one.
    tokens = [r.params["WebIdentityToken"] for r in strict_sts.requests]
    assert tokens
    assert all(token not in caplog.text for token in tokens)
    assert "eyJ" not in caplog.text
    assert any(r.name == "stscreds" for r in caplog.records)
    assert "eyJ" not in wsgi.get_data(as_text=True)


def test_on_error_answers_with_the_apps_own_response(
    strict_sts: StrictSTS, make_middleware: Any
) -> None:
    strict_sts.reject_roles.add(ROLE_A.arn)
    seen: list[int] = []

    def on_error(environ: dict[str, Any], error: Any) -> Response | None:
        seen.append(error.status_code)
        if environ.get("HTTP_X_TENANT") == "a":
            return Response("tenant a has no access", status=403)
        return None

    client = Client(make_middleware(on_error=on_error))
    response = client.get("/", headers={"X-Tenant": "a"})
    assert response.status_code == 403
    assert response.data == b"tenant a has no access"
    assert seen == [502]


def test_wait_longer_than_timeout_answers_503_and_the_exchange_goes_on(
    strict_sts: StrictSTS, make_middleware: Any, caplog: pytest.LogCaptureFixture
) -> None:
    middleware = make_middleware(timeout=0.2)
    client = Client(middleware)
    strict_sts.hang = True
    response = client.get("/", headers={"X-Tenant": "a"})
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert f"gave up waiting for credentials for {ROLE_A.arn} after 0.2s" in caplog.text

    strict_sts.release()
    middleware.timeout = 10.0
    again = client.get("/", headers={"X-Tenant": "a"})
    assert again.status_code == 200
    assert strict_sts.calls == 1  # the second request joined the first's exchange


def test_after_close_a_miss_answers_503_and_a_hit_still_works(
    strict_sts: StrictSTS, make_middleware: Any
) -> None:
    middleware = make_middleware()
    client = Client(middleware)
    assert client.get("/", headers={"X-Tenant": "a"}).status_code == 200
    running = len(loop_threads())
    middleware.close()
    assert len(loop_threads()) == running - 1  # its loop thread stopped and was joined
    assert client.get("/", headers={"X-Tenant": "a"}).status_code == 200
    assert client.get("/", headers={"X-Tenant": "b"}).status_code == 503
    assert strict_sts.calls == 1


# --- OIDC documents ----------------------------------------------------------------------------


def test_serves_the_issuers_oidc_documents(make_middleware: Any) -> None:
    middleware = make_middleware()
    client = Client(middleware)
    config = client.get("/issuer/.well-known/openid-configuration")
    assert config.status_code == 200
    assert config.json == middleware.broker.openid_configuration()
    jwks = client.get("/issuer/.well-known/jwks.json")
    assert jwks.json == middleware.broker.jwks()
    assert jwks.headers["cache-control"] == "public, max-age=300"
    cached = client.get(
        "/issuer/.well-known/jwks.json", headers={"If-None-Match": jwks.headers["etag"]}
    )
    assert cached.status_code == 304
    assert cached.data == b""
    assert (
        client.get("/issuer/.well-known/jwks.json", headers={"If-None-Match": "*"}).status_code
        == 304
    )
    assert client.post("/issuer/.well-known/jwks.json").status_code == 405
    assert client.head("/issuer/.well-known/jwks.json").data == b""


def test_a_replaced_key_ring_is_served_with_new_etags(
    make_middleware: Any, strict_sts: StrictSTS
) -> None:
    middleware = make_middleware()
    broker = middleware.broker
    client = Client(middleware)
    paths = ("/issuer/.well-known/jwks.json", "/issuer/.well-known/openid-configuration")
    before = {path: client.get(path) for path in paths}
    assert client.get("/", headers={"X-Tenant": "a"}).status_code == 200
    cached = broker.get_cached(ROLE_A)
    new = SigningKey.generate("RS256")
    broker.set_signing_keys([new, *broker.signing_keys])
    for path in paths:
        after = client.get(path, headers={"If-None-Match": before[path].headers["etag"]})
        assert after.status_code == 200  # the old ETag no longer matches
        assert after.headers["etag"] != before[path].headers["etag"]
    jwks = client.get(paths[0]).json
    assert jwks == broker.jwks()
    assert [k["kid"] for k in jwks["keys"]] == [k.kid for k in broker.signing_keys]
    assert client.get(paths[1]).json["id_token_signing_alg_values_supported"] == [
        "RS256",
        "ES256",
    ]
    # The cached credentials are still served, without another exchange.
    assert broker.get_cached(ROLE_A) is cached
    assert client.get("/", headers={"X-Tenant": "a"}).status_code == 200
    assert strict_sts.calls == 1


def test_oidc_documents_at_a_percent_encoded_issuer_path() -> None:
    broker = CredentialBroker(
        issuer="https://example.com/t%C3%A9nant", signing_keys=[SigningKey.generate("ES256")]
    )
    middleware = CredentialsWSGIMiddleware(echo_app, broker=broker, resolve_role=tenant_role)
    try:
        client = Client(middleware)
        discovery = client.get("/t%C3%A9nant/.well-known/openid-configuration")
        assert discovery.status_code == 200
        jwks_uri = discovery.json["jwks_uri"]
        assert jwks_uri == "https://example.com/t%C3%A9nant/.well-known/jwks.json"
        assert client.get(urlsplit(jwks_uri).path).json == broker.jwks()
    finally:
        middleware.close()
        broker.close()


def test_the_strict_sts_discovers_keys_from_the_middleware(
    strict_sts: StrictSTS, wsgi_server: Any
) -> None:
    """The app is its own issuer: STS fetches the JWKS from the WSGI app it is called by."""
    holder: dict[str, CredentialsWSGIMiddleware] = {}

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        return holder["middleware"](environ, start_response)

    base = wsgi_server(app)
    broker = CredentialBroker(
        issuer=base,
        signing_keys=[SigningKey.generate("ES256")],
        sts_endpoint_url=strict_sts.url,
        max_attempts=1,
    )
    strict_sts.configure(issuer=base, jwks=None)
    holder["middleware"] = CredentialsWSGIMiddleware(
        echo_app, broker=broker, resolve_role=tenant_role
    )
    try:
        status, body = get(base, "a")
    finally:
        holder["middleware"].close()
        broker.close()
    assert status == 200
    assert strict_sts.jwks_fetches == 1
    assert strict_sts.jwks_cache_control == "public, max-age=300"
    assert body == strict_sts.requests[0].credentials["AccessKeyId"].encode()


# --- warm-up -----------------------------------------------------------------------------------


def test_warm_up_fetches_when_the_middleware_is_made(
    strict_sts: StrictSTS, make_middleware: Any
) -> None:
    middleware = make_middleware(warm_up=[ROLE_A, ROLE_B])
    assert middleware.wait_warm_up(timeout=10)
    assert strict_sts.calls == 2
    response = Client(middleware).get("/", headers={"X-Tenant": "b"})
    assert response.status_code == 200
    assert strict_sts.calls == 2


def test_warm_up_failure_is_logged_not_fatal(
    strict_sts: StrictSTS, make_middleware: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="stscreds")
    strict_sts.reject_roles.add(ROLE_A.arn)
    middleware = make_middleware(warm_up=[ROLE_A, ROLE_B])
    assert middleware.wait_warm_up(timeout=10)

    warnings_ = [r for r in caplog.records if "warm-up got no credentials" in r.getMessage()]
    assert len(warnings_) == 1
    assert ROLE_A.arn in warnings_[0].getMessage()
    assert "AccessDenied" in warnings_[0].getMessage()
    assert "fetched credentials for 1 of 2 roles" in caplog.text
    assert all(r.params["WebIdentityToken"] not in caplog.text for r in strict_sts.requests)
    assert Client(middleware).get("/", headers={"X-Tenant": "b"}).status_code == 200


def test_wait_warm_up_without_roles_is_true_at_once(make_middleware: Any) -> None:
    assert make_middleware().wait_warm_up(timeout=0) is True


# --- fork (gunicorn --preload) -----------------------------------------------------------------


def test_forked_child_starts_its_own_loop_and_keeps_the_cache(
    strict_sts: StrictSTS, make_middleware: Any
) -> None:
    middleware = make_middleware(warm_up=[ROLE_A], timeout=10)
    assert middleware.wait_warm_up(timeout=10)
    assert strict_sts.calls == 1
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() in a process with threads: that is the point here.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: report what it saw, then leave without running pytest's exit
        status = 1
        try:
            client = Client(middleware)
            hit = client.get("/", headers={"X-Tenant": "a"})
            cold = client.get("/", headers={"X-Tenant": "b"})
            report = {"hit": [hit.status_code, hit.get_data(as_text=True)]}
            report["cold"] = [cold.status_code, cold.get_data(as_text=True)]
            os.write(write_end, json.dumps(report).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    _, wait_status = os.waitpid(pid, 0)
    with os.fdopen(read_end) as pipe:
        report = json.loads(pipe.read() or "{}")

    assert os.waitstatus_to_exitcode(wait_status) == 0
    warm_key = strict_sts.requests_for(ROLE_A.arn)[0].credentials["AccessKeyId"]
    cold_key = strict_sts.requests_for(ROLE_B.arn)[0].credentials["AccessKeyId"]
    assert report == {"hit": [200, warm_key], "cold": [200, cold_key]}
    assert strict_sts.calls == 2  # the child reused the parent's cached credentials for a
    # The parent's own loop is untouched by the child's fresh start.
    assert Client(middleware).get("/", headers={"X-Tenant": "c"}).status_code == 200


# --- construction ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"resolve_role": "nope"}, TypeError, "resolve_role: must be callable"),
        ({"environ_key": ""}, ValueError, "environ_key"),
        ({"timeout": 0}, ValueError, "timeout"),
        ({"oidc_max_age": 0}, ValueError, "oidc_max_age"),
        ({"warm_up": ["arn:aws:iam::123456789012:role/x"]}, ValueError, "warm_up"),
    ],
)
def test_constructor_validation(
    make_broker: Callable[..., CredentialBroker],
    kwargs: dict[str, Any],
    error: type[Exception],
    match: str,
) -> None:
    options: dict[str, Any] = {"resolve_role": tenant_role, **kwargs}
    with pytest.raises(error, match=match):
        CredentialsWSGIMiddleware(echo_app, broker=make_broker(), **options)


def test_async_resolver_is_refused(make_broker: Callable[..., CredentialBroker]) -> None:
    async def resolve(environ: dict[str, Any]) -> Role | None:
        return None

    with pytest.raises(TypeError, match="not async"):
        CredentialsWSGIMiddleware(
            echo_app,
            broker=make_broker(),
            resolve_role=resolve,  # type: ignore[arg-type]
        )


# --- a resolver returning the wrong type (fix 7), Retry-After that says when (fix 5) --------


def arn_resolver(environ: dict[str, Any]) -> Any:
    return ROLE_A.arn  # a str, not a Role


def test_resolver_returning_the_wrong_type_is_a_500_logged_once_by_name(
    strict_sts: StrictSTS,
    make_middleware: Any,
    wsgi_server: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="stscreds")
    base = wsgi_server(make_middleware(resolve_role=arn_resolver))
    for _ in range(3):
        status, body = get(base, "a")
        assert status == 500
        assert b"misconfiguration" in body
    assert strict_sts.calls == 0
    (line,) = [r.getMessage() for r in caplog.records if r.name == "stscreds"]
    assert "resolve_role (arn_resolver)" in line and "builtins.str" in line


def test_retry_after_says_when_a_remembered_failure_ends(
    strict_sts: StrictSTS, make_middleware: Any, wsgi_server: Any
) -> None:
    strict_sts.expiration = lambda now, _requested: now + 10  # a grant with 10 s left
    base = wsgi_server(make_middleware())
    parts = urlsplit(base)
    for _ in range(2):
        connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
        try:
            connection.request("GET", "/", headers={"X-Tenant": "a"})
            response = connection.getresponse()
            assert response.status == 503
            assert 20 <= int(response.getheader("Retry-After") or 0) <= 34
        finally:
            connection.close()
    assert strict_sts.calls == 1


def test_timeout_defaults_to_the_brokers_request_timeout(
    make_broker: Callable[..., CredentialBroker], make_middleware: Any
) -> None:
    broker = make_broker(request_timeout=7.0)
    assert make_middleware(broker=broker).timeout == 8.0
    assert make_middleware(broker=broker, timeout=2.0).timeout == 2.0


# --- health endpoint ---------------------------------------------------------------------------

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


def counting(resolver: Callable[[dict[str, Any]], Role | None]) -> Any:
    def resolve(environ: dict[str, Any]) -> Role | None:
        resolve.calls += 1  # type: ignore[attr-defined]
        return resolver(environ)

    resolve.calls = 0  # type: ignore[attr-defined]
    return resolve


def assert_health_headers(response: Any) -> None:
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    assert "ETag" not in response.headers


def test_health_endpoint_answers_the_brokers_health(
    strict_sts: StrictSTS, make_middleware: Any
) -> None:
    middleware = make_middleware(health_path="/healthz")
    client = Client(middleware)
    fresh = client.get("/healthz")
    assert fresh.status_code == 200
    assert_health_headers(fresh)
    assert set(fresh.json) == HEALTH_KEYS
    assert fresh.json == middleware.broker.health()
    assert fresh.json["status"] == "ok"

    assert client.get("/", headers={"X-Tenant": "a"}).status_code == 200
    response = client.get("/healthz")
    assert response.status_code == 200
    assert_health_headers(response)
    assert int(response.headers["Content-Length"]) == len(response.data)
    health = response.json
    assert health["status"] == "ok"
    assert health["reasons"] == []
    assert health["cached_identities"] == 1
    assert health["clock"]["known"] is True

    head = client.head("/healthz")
    assert head.status_code == 200
    assert head.data == b""
    assert_health_headers(head)
    assert int(head.headers["Content-Length"]) > 0
    assert strict_sts.calls == 1


def test_health_endpoint_over_http(make_middleware: Any, wsgi_server: Any) -> None:
    base = wsgi_server(make_middleware(health_path="/healthz"))
    response = httpx.get(base + "/healthz")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json()["status"] == "ok"


def test_health_endpoint_needs_no_role_and_calls_no_resolver(
    strict_sts: StrictSTS, make_middleware: Any
) -> None:
    resolver = counting(tenant_role)
    client = Client(make_middleware(resolve_role=resolver, health_path="/healthz"))
    assert client.get("/healthz", headers={"X-Tenant": "a"}).status_code == 200
    assert client.head("/healthz").status_code == 200
    post = client.post("/healthz")
    assert post.status_code == 405
    assert {m.strip() for m in post.headers["Allow"].split(",")} == {"GET", "HEAD"}
    assert resolver.calls == 0
    assert strict_sts.calls == 0
    # Only that exact path: the others reach the resolver and the app.
    for path in ("/healthz/", "/healthz/x", "/HEALTHZ", "/health"):
        response = client.get(path)
        assert response.status_code == 200
        assert response.data == b"none"
    assert resolver.calls == 4


@pytest.mark.parametrize("how", ["close", "aclose"])
def test_health_endpoint_is_503_once_the_broker_is_closed(
    make_broker: Callable[..., CredentialBroker], make_middleware: Any, how: str
) -> None:
    broker = make_broker()
    client = Client(make_middleware(broker=broker, health_path="/healthz"))
    assert client.get("/healthz").status_code == 200
    if how == "close":
        broker.close()
    else:
        asyncio.run(broker.aclose())  # nothing in flight: any loop will do
    response = client.get("/healthz")
    assert response.status_code == 503
    assert_health_headers(response)
    assert response.json["status"] == "unavailable"
    assert response.json["reasons"] == ["credential broker is closed"]
    head = client.head("/healthz")
    assert head.status_code == 503
    assert head.data == b""


def any_tenant_role(environ: dict[str, Any]) -> Role | None:
    tenant = environ.get("HTTP_X_TENANT")
    return Role(f"arn:aws:iam::123456789012:role/tenant-{tenant}") if tenant else None


def test_health_endpoint_is_503_after_three_short_grants(
    strict_sts: StrictSTS, make_middleware: Any
) -> None:
    strict_sts.expiration = lambda now, _requested: now + 10  # (nearly) expired on arrival
    client = Client(make_middleware(resolve_role=any_tenant_role, health_path="/healthz"))
    for tenant in ("a", "b", "c"):
        assert client.get("/", headers={"X-Tenant": tenant}).status_code == 503
    down = client.get("/healthz")
    assert down.status_code == 503
    assert down.json["status"] == "unavailable"
    assert down.json["last_failure"]["code"] == "ShortGrant"
    strict_sts.expiration = None
    assert client.get("/", headers={"X-Tenant": "d"}).status_code == 200
    up = client.get("/healthz")
    assert up.status_code == 200
    assert up.json["status"] == "ok"
    assert strict_sts.calls == 4


def test_health_endpoint_is_off_by_default(strict_sts: StrictSTS, make_middleware: Any) -> None:
    resolver = counting(tenant_role)
    response = Client(make_middleware(resolve_role=resolver)).get("/healthz")
    assert response.status_code == 200
    assert response.data == b"none"  # the app answered
    assert resolver.calls == 1


def test_health_endpoint_without_the_oidc_documents(make_middleware: Any) -> None:
    client = Client(make_middleware(serve_oidc=False, health_path="/issuer/.well-known/jwks.json"))
    assert client.get("/issuer/.well-known/jwks.json").json["status"] == "ok"
    assert client.get("/issuer/.well-known/openid-configuration").data == b"none"


def test_health_endpoint_at_a_non_ascii_path(make_middleware: Any) -> None:
    client = Client(make_middleware(health_path="/sant\u00e9"))
    assert client.get("/sant%C3%A9").json["status"] == "ok"


@pytest.mark.parametrize(
    "path", ["healthz", "", " /healthz", "http://127.0.0.1/healthz", b"/healthz", 5, ["/h"]]
)
def test_bad_health_path_is_refused(
    make_broker: Callable[..., CredentialBroker], path: Any
) -> None:
    with pytest.raises(ValueError, match="health_path"):
        CredentialsWSGIMiddleware(
            echo_app, broker=make_broker(), resolve_role=tenant_role, health_path=path
        )


def test_health_path_cannot_hide_an_oidc_document(
    make_broker: Callable[..., CredentialBroker],
) -> None:
    for path in ("/issuer/.well-known/jwks.json", "/issuer/.well-known/openid-configuration"):
        with pytest.raises(ValueError, match=r"health_path.*OIDC document"):
            CredentialsWSGIMiddleware(
                echo_app, broker=make_broker(), resolve_role=tenant_role, health_path=path
            )
