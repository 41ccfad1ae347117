"""Tests for stscreds.django with the example project's models, in process: Django under
uvicorn (ASGI) and under a threaded WSGI server, against a strict STS on loopback."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import django
import httpx
import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, PermissionDenied
from django.test import override_settings

from servers.sts import StrictSTS
from stscreds import (
    CredentialBroker,
    Credentials,
    CredentialsMiddleware,
    CredentialsWSGIMiddleware,
    Role,
    SigningKey,
)

ISSUER = "http://127.0.0.1:9/django"
ACME = Role("arn:aws:iam::123456789012:role/tenant-acme")
BETA = Role("arn:aws:iam::123456789012:role/tenant-beta")


@pytest.fixture(scope="module", autouse=True)
def django_project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The example project, set up once, on an SQLite file in a temp dir, with three users."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DJANGO_SETTINGS_MODULE", "examples.django_project.settings")
        env.setenv("STSCREDS_DJANGO_DB", str(tmp_path_factory.mktemp("django") / "db.sqlite3"))
        env.setenv("STSCREDS_ISSUER", ISSUER)
        django.setup()
        from django.core.management import call_command
        from django.db import connections
        from examples.django_project.tenants.models import TenantRole  # after setup

        call_command("migrate", verbosity=0)
        call_command("add_tenant", "alice", ACME.arn, "tenant-acme", stdout=_Discard())
        call_command("add_tenant", "bob", BETA.arn, "tenant-beta", stdout=_Discard())
        from django.contrib.auth import get_user_model

        get_user_model().objects.create(username="carol")  # a user without a tenant
        assert TenantRole.objects.count() == 2
        connections.close_all()
        yield
        connections.close_all()


class _Discard:
    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


@pytest.fixture
def make_broker(strict_sts: StrictSTS) -> Iterator[Callable[..., CredentialBroker]]:
    key = SigningKey.generate("ES256")
    strict_sts.configure(issuer=ISSUER, jwks={"keys": [key.public_jwk()]})
    brokers: list[CredentialBroker] = []

    def make() -> CredentialBroker:
        broker = CredentialBroker(
            issuer=ISSUER, signing_keys=[key], sts_endpoint_url=strict_sts.url, max_attempts=1
        )
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        broker.close()


def get_all(base: str, users: list[str], path: str = "/whoami") -> list[httpx.Response]:
    """One request per user, all at once, each on its own connection."""

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=len(users))
        async with httpx.AsyncClient(base_url=base, limits=limits, trust_env=False) as client:
            return await asyncio.gather(
                *(client.get(path, headers={"X-User": user}) for user in users)
            )

    return asyncio.run(run())


def key_tail(strict_sts: StrictSTS, role: Role) -> str:
    (call,) = strict_sts.requests_for(role.arn)
    return call.credentials["AccessKeyId"][-4:]


# --- ASGI ---------------------------------------------------------------------------------------


def test_asgi_under_uvicorn_with_orm_resolver_and_warm_up(
    strict_sts: StrictSTS,
    make_broker: Callable[..., CredentialBroker],
    uvicorn_server: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from examples.django_project.roles import resolve_role_asgi

    from stscreds.django import asgi_application

    caplog.set_level(logging.INFO)
    application = asgi_application(
        resolve_role=resolve_role_asgi, broker=make_broker(), warm_up=[ACME]
    )
    base = uvicorn_server(application)  # uvicorn's defaults: lifespan "auto"
    assert strict_sts.wait_for_calls(1)  # the warm-up, before any request

    responses = get_all(base, ["alice"] * 20 + ["bob"] * 20 + ["carol", "nobody"])

    assert [r.status_code for r in responses] == [200] * 40 + [403, 403]
    assert {r.json()["access_key_id_tail"] for r in responses[:20]} == {key_tail(strict_sts, ACME)}
    assert {r.json()["access_key_id_tail"] for r in responses[20:40]} == {
        key_tail(strict_sts, BETA)
    }
    assert strict_sts.calls == 2  # one per tenant role, the warm-up's included
    uvicorn_log = [r for r in caplog.records if r.name.startswith("uvicorn")]
    assert any("Application startup complete" in r.getMessage() for r in uvicorn_log)
    assert not any("lifespan" in r.getMessage() for r in uvicorn_log)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_django_never_receives_a_lifespan_scope(
    make_broker: Callable[..., CredentialBroker],
) -> None:
    from django.core.asgi import get_asgi_application

    middleware = CredentialsMiddleware(
        get_asgi_application(), broker=make_broker(), resolve_role=lambda scope: None
    )
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    # Django's handler would raise ValueError for this scope; the middleware answers it.
    await middleware({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]


# --- WSGI ---------------------------------------------------------------------------------------


def test_wsgi_under_a_threaded_server(
    strict_sts: StrictSTS, make_broker: Callable[..., CredentialBroker], wsgi_server: Any
) -> None:
    from examples.django_project.roles import resolve_role_wsgi

    from stscreds.django import wsgi_application

    application = wsgi_application(resolve_role=resolve_role_wsgi, broker=make_broker())
    try:
        base = wsgi_server(application)
        results: list[httpx.Response] = []
        users = ["alice"] * 10 + ["carol"]
        threads = [
            threading.Thread(
                target=lambda u=user: results.append(
                    httpx.get(f"{base}/whoami", headers={"X-User": u}, trust_env=False)
                )
            )
            for user in users
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        application.close()
    assert sorted(r.status_code for r in results) == [200] * 10 + [403]
    tails = {r.json()["access_key_id_tail"] for r in results if r.status_code == 200}
    assert tails == {key_tail(strict_sts, ACME)}
    assert strict_sts.calls == 1


# --- get_credentials ----------------------------------------------------------------------------


def credentials() -> Credentials:
    from datetime import datetime, timedelta, timezone

    return Credentials("ASIAEXAMPLE", "secret", "token", datetime.now(timezone.utc) + timedelta(1))


def test_get_credentials_reads_asgi_and_wsgi_requests() -> None:
    from django.test import AsyncRequestFactory, RequestFactory

    from stscreds.django import get_credentials

    given = credentials()
    asgi_request = AsyncRequestFactory().get("/")
    asgi_request.scope["state"] = {"aws_credentials": given}
    assert type(asgi_request).__name__ == "ASGIRequest"
    assert get_credentials(asgi_request) is given

    wsgi_request = RequestFactory().get("/", **{"stscreds.credentials": given})
    assert type(wsgi_request).__name__ == "WSGIRequest"
    assert get_credentials(wsgi_request) is given


def test_get_credentials_without_role_is_permission_denied() -> None:
    from django.test import AsyncRequestFactory, RequestFactory

    from stscreds.django import get_credentials

    asgi_request = AsyncRequestFactory().get("/")
    asgi_request.scope["state"] = {"aws_credentials": None}
    with pytest.raises(PermissionDenied):
        get_credentials(asgi_request)
    with pytest.raises(PermissionDenied):
        get_credentials(RequestFactory().get("/", **{"stscreds.credentials": None}))


def test_get_credentials_without_middleware_names_the_fix() -> None:
    from django.test import AsyncRequestFactory, RequestFactory

    from stscreds.django import get_credentials

    for request in (AsyncRequestFactory().get("/"), RequestFactory().get("/")):
        with pytest.raises(ImproperlyConfigured, match="asgi_application"):
            get_credentials(request)


def test_view_under_django_without_the_middleware_answers_500(uvicorn_server: Any) -> None:
    from django.core.asgi import get_asgi_application

    base = uvicorn_server(get_asgi_application(), lifespan="off")
    response = httpx.get(f"{base}/whoami", headers={"X-User": "alice"}, trust_env=False)
    assert response.status_code == 500


# --- settings.STSCREDS --------------------------------------------------------------------------


def test_broker_from_settings_with_keys() -> None:
    from stscreds.django import broker_from_settings

    key = SigningKey.generate("ES256")
    options = {
        "ISSUER": "https://issuer.example.com/app",
        "KEYS": [key],
        "REGION": "eu-west-1",
        "AUDIENCE": "my-audience",
        "TOKEN_TTL": 120,
    }
    with override_settings(STSCREDS=options):
        broker = broker_from_settings()
    try:
        assert broker.issuer == "https://issuer.example.com/app"
        assert broker.audience == "my-audience"
        assert broker.sts_endpoint_url == "https://sts.eu-west-1.amazonaws.com"
        assert broker.jwks() == {"keys": [key.public_jwk()]}
    finally:
        broker.close()


def test_broker_from_settings_with_key_files_first_one_signs(tmp_path: Any) -> None:
    from stscreds.django import broker_from_settings

    new, old = SigningKey.generate("ES256"), SigningKey.generate("RS256")
    paths = []
    for name, key in (("new.pem", new), ("old.pem", old)):
        (tmp_path / name).write_bytes(key.to_pem())
        paths.append(str(tmp_path / name))
    broker = broker_from_settings({"ISSUER": "https://issuer.example.com", "KEY_FILE": paths})
    try:
        assert [k["kid"] for k in broker.jwks()["keys"]] == [new.kid, old.kid]
    finally:
        broker.close()
    single = broker_from_settings({"ISSUER": "https://issuer.example.com", "KEY_FILE": paths[1]})
    try:
        assert [k["kid"] for k in single.jwks()["keys"]] == [old.kid]
    finally:
        single.close()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        pytest.param({"KEYS": ["x"]}, r"ISSUER'\] is required", id="no-issuer"),
        pytest.param({"ISSUER": "https://i.example.com"}, "KEY_FILE or KEYS", id="no-key"),
        pytest.param(
            {"ISSUER": "https://i.example.com", "KEYS": [], "KEY_FILE": "k.pem"},
            "KEY_FILE or KEYS",
            id="both-keys",
        ),
        pytest.param({"ISSUER": "https://i.example.com", "KEYS": []}, "non-empty", id="no-keys"),
        pytest.param(
            {"ISSUER": "https://i.example.com", "KEYS": ["not a pem"]},
            "KEYS.*not a readable PEM",
            id="bad-pem",
        ),
        pytest.param(
            {"ISSUER": "https://i.example.com", "KEY_FILE": "/nonexistent/key.pem"},
            "KEY_FILE",
            id="missing-file",
        ),
        pytest.param(
            {"ISSUER": "https://i.example.com", "KEYS": ["x"], "REGOIN": "eu-west-1"},
            "unknown keys.*REGOIN",
            id="typo",
        ),
        pytest.param({"ISSUER": "http://example.com", "KEYS": ["x"]}, "https", id="http-issuer"),
    ],
)
def test_broker_from_settings_says_what_is_wrong(options: dict[str, Any], match: str) -> None:
    from stscreds.django import broker_from_settings

    if options.get("KEYS") == ["x"]:
        options["KEYS"] = [SigningKey.generate("ES256")]
    with pytest.raises(ImproperlyConfigured, match=match):
        broker_from_settings(options)


def test_missing_stscreds_setting_is_improperly_configured() -> None:
    from stscreds.django import broker_from_settings

    with override_settings():
        del settings.STSCREDS
        with pytest.raises(ImproperlyConfigured, match=r"settings\.STSCREDS is not set"):
            broker_from_settings()


def test_warm_up_from_settings_and_the_factories_use_it(
    make_broker: Callable[..., CredentialBroker],
) -> None:
    from stscreds.django import asgi_application, warm_up_from_settings, wsgi_application

    options = {**settings.STSCREDS, "WARM_UP": [ACME.arn, BETA]}
    with override_settings(STSCREDS=options):
        assert warm_up_from_settings() == [ACME, BETA]
        asgi = asgi_application(resolve_role=lambda scope: None, broker=make_broker())
        wsgi = wsgi_application(resolve_role=lambda environ: None, broker=make_broker())
    wsgi.close()
    assert isinstance(asgi, CredentialsMiddleware)
    assert isinstance(wsgi, CredentialsWSGIMiddleware)
    assert asgi.warm_up == wsgi.warm_up == (ACME, BETA)
    with pytest.raises(ImproperlyConfigured, match="WARM_UP"):
        warm_up_from_settings({"WARM_UP": ["not-an-arn"]})


def test_factory_builds_the_broker_from_settings() -> None:
    from stscreds.django import asgi_application

    options = {"ISSUER": "https://issuer.example.com", "KEYS": [SigningKey.generate("ES256")]}
    with override_settings(STSCREDS=options):
        middleware = asgi_application(resolve_role=lambda scope: None)
    try:
        assert middleware.broker.issuer == "https://issuer.example.com"
        assert middleware.warm_up == ()
    finally:
        middleware.broker.close()


# --- a resolver returning the wrong type (fix 7) -------------------------------------------------


def arn_of_user(request_scope: Any) -> Any:
    return "arn:aws:iam::123456789012:role/tenant-acme"  # a str, not a Role


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_django_resolver_returning_the_wrong_type_is_a_logged_500(
    strict_sts: StrictSTS,
    make_broker: Callable[..., CredentialBroker],
    uvicorn_server: Any,
    wsgi_server: Any,
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    from stscreds.django import asgi_application, wsgi_application

    caplog.set_level(logging.ERROR, logger="stscreds")
    if kind == "asgi":
        base = uvicorn_server(asgi_application(resolve_role=arn_of_user, broker=make_broker()))
    else:
        application = wsgi_application(resolve_role=arn_of_user, broker=make_broker())
        base = wsgi_server(application)
    try:
        responses = [
            httpx.get(f"{base}/whoami", headers={"X-User": "alice"}, trust_env=False)
            for _ in range(3)
        ]
    finally:
        if kind == "wsgi":
            application.close()
    assert [r.status_code for r in responses] == [500] * 3
    assert all("misconfiguration" in r.json()["error"] for r in responses)
    assert strict_sts.calls == 0
    (line,) = [r.getMessage() for r in caplog.records if r.name == "stscreds"]
    assert "resolve_role (arn_of_user)" in line and "builtins.str" in line
