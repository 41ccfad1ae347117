"""Tests for stscreds.django with the example project's models, in process: Django under
uvicorn (ASGI) and under a threaded WSGI server, against a strict STS on loopback."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import subprocess
import sys
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
    SystemClock,
)
from stscreds._budget import StsBudget
from stscreds.stores import MemoryStore

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
        pytest.param(
            {"ISSUER": "https://i.example.com"},
            "one of SIGNING_KEYS, KEYS or KEY_FILE",
            id="no-key",
        ),
        pytest.param(
            {"ISSUER": "https://i.example.com", "KEYS": [], "KEY_FILE": "k.pem"},
            "one of SIGNING_KEYS, KEYS or KEY_FILE",
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
            r"unknown key 'REGOIN' \(did you mean 'REGION'\?\); "
            r"the valid keys are .*REQUEST_TIMEOUT",
            id="typo",
        ),
        pytest.param(
            {"ISSUER": "https://i.example.com", "KEYS": ["x"], "region": "eu-west-1"},
            r"unknown key 'region' \(did you mean 'REGION'\?\)",
            id="lower-case",
        ),
        pytest.param(
            {"ISSUER": "https://i.example.com", "KEYS": ["x"], "SIGNING_KEYS": ["x"]},
            "one of SIGNING_KEYS, KEYS or KEY_FILE",
            id="keys-twice",
        ),
        pytest.param(
            {"ISSUER": "https://i.example.com", "KEYS": ["x"], "CACHE_SIZE": 0},
            r"\['CACHE_SIZE'\]: must be an integer",
            id="bad-value-names-the-key",
        ),
        pytest.param(
            {"ISSUER": "https://i.example.com", "KEYS": ["x"], "REQUEST_TIMEOUT": "20"},
            r"\['REQUEST_TIMEOUT'\]: must be a positive number",
            id="str-for-a-number",
        ),
        pytest.param(
            {"ISSUER": "https://i.example.com", "KEYS": ["x"], "STS_BUDGET": {"burst": -1}},
            r"\['STS_BUDGET'\]: burst: must be a positive number",
            id="bad-budget",
        ),
        pytest.param({"ISSUER": "http://example.com", "KEYS": ["x"]}, "https", id="http-issuer"),
    ],
)
def test_broker_from_settings_says_what_is_wrong(options: dict[str, Any], match: str) -> None:
    from stscreds.django import broker_from_settings

    for name in ("KEYS", "SIGNING_KEYS"):
        if options.get(name) == ["x"]:
            options[name] = [SigningKey.generate("ES256")]
    with pytest.raises(ImproperlyConfigured, match=match):
        broker_from_settings(options)


# Every keyword argument of CredentialBroker, read from its signature: a new argument is
# tested (and must be accepted from settings) the day it is added. A value differing from the
# default where one is given here; otherwise the default itself, which still has to arrive.
BROKER_PARAMETERS = [
    parameter
    for parameter in inspect.signature(CredentialBroker.__init__).parameters.values()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY
]
SAMPLE_KEY = SigningKey.generate("ES256")
# name -> (settings value, what the broker must receive)
BROKER_SAMPLES: dict[str, tuple[Any, Any]] = {
    "issuer": ("https://issuer.example.com/app", "https://issuer.example.com/app"),
    "signing_keys": ([SAMPLE_KEY], [SAMPLE_KEY]),
    "region": ("eu-west-1", "eu-west-1"),
    "sts_endpoint_url": ("https://sts.example.com", "https://sts.example.com"),
    "audience": ("my-audience", "my-audience"),
    "default_subject": ("svc", "svc"),
    "token_ttl": (120, 120),
    "cache_size": (50, 50),
    "connect_timeout": (1.5, 1.5),
    "read_timeout": (3.0, 3.0),
    "exchange_deadline": (7.0, 7.0),
    "max_attempts": (2, 2),
    "max_workers": (3, 3),
    "request_timeout": (12.0, 12.0),
    "advisory_window": (600.0, 600.0),
    "refresh_backoff": ([1.0, 2.0], (1.0, 2.0)),  # settings from JSON or env: lists
    "sts_budget": (StsBudget(initial_rate=2.0), None),  # None: the very object
    "negative_ttl": ([2.0, 3.0], (2.0, 3.0)),
    "transient_negative_ttl": ([0, 0], (0, 0)),
    "store": (MemoryStore(allow_plaintext=True), None),
    "store_timeout": (0.5, 0.5),
    "store_cooldown": (2.0, 2.0),
    "lease_ttl": (30.0, 30.0),
    "clock": (SystemClock(), None),
}


@pytest.fixture
def broker_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """The keyword arguments each broker built by stscreds.django received (brokers are real)."""
    import stscreds.django

    calls: list[dict[str, Any]] = []
    brokers: list[CredentialBroker] = []

    class RecordingBroker(CredentialBroker):
        def __init__(self, **kwargs: Any) -> None:
            calls.append(kwargs)
            super().__init__(**kwargs)
            brokers.append(self)

    monkeypatch.setattr(stscreds.django, "CredentialBroker", RecordingBroker)
    yield calls
    for broker in brokers:
        broker.close()


@pytest.mark.parametrize("parameter", BROKER_PARAMETERS, ids=lambda p: p.name.upper())
def test_every_broker_argument_is_a_setting_and_reaches_the_broker(
    parameter: inspect.Parameter, broker_calls: list[dict[str, Any]]
) -> None:
    from stscreds.django import broker_from_settings

    name = parameter.name
    if name in BROKER_SAMPLES:
        value, expected = BROKER_SAMPLES[name]
        expected = value if expected is None else expected
    else:
        assert parameter.default is not parameter.empty, f"add a sample for {name} to this test"
        value = expected = parameter.default
    options = {"ISSUER": "https://issuer.example.com/app", "SIGNING_KEYS": [SAMPLE_KEY]}
    options[name.upper()] = value
    with override_settings(STSCREDS=options):
        broker_from_settings()
    (received,) = broker_calls
    assert name in received
    if expected is value and not isinstance(value, str | int | float | list):
        assert received[name] is value
    else:
        assert received[name] == expected
        assert type(received[name]) is type(expected)


def test_the_module_docstring_names_every_setting() -> None:
    import stscreds.django

    keys = [parameter.name.upper() for parameter in BROKER_PARAMETERS]
    keys += ["KEYS", "KEY_FILE", "WARM_UP", "HEALTH_PATH", "SERVE_OIDC", "OIDC_MAX_AGE"]
    doc = stscreds.django.__doc__ or ""
    assert [key for key in keys if key not in doc] == []
    assert "INSTALLED_APPS" in doc


def test_signing_keys_as_pem_text_and_sts_budget_as_a_dict(
    broker_calls: list[dict[str, Any]],
) -> None:
    from stscreds.django import broker_from_settings

    rsa = SigningKey.generate("RS256")
    options = {
        "ISSUER": "https://issuer.example.com",
        "SIGNING_KEYS": [SAMPLE_KEY.to_pem().decode(), rsa.to_pem()],  # str and bytes
        "STS_BUDGET": {"initial_rate": 2, "BURST": 4},
    }
    broker = broker_from_settings(options)
    assert [k["kid"] for k in broker.jwks()["keys"]] == [SAMPLE_KEY.kid, rsa.kid]
    budget = broker_calls[0]["sts_budget"]
    assert isinstance(budget, StsBudget)
    assert (budget.initial_rate, budget.burst) == (2.0, 4.0)
    assert broker.sts_budget is budget


def test_signing_keys_as_a_key_source_with_its_interval(
    broker_calls: list[dict[str, Any]],
) -> None:
    from stscreds.django import broker_from_settings

    ring = [SAMPLE_KEY]
    options = {
        "ISSUER": "https://issuer.example.com",
        "SIGNING_KEYS": lambda: list(ring),
        "SIGNING_KEYS_INTERVAL": 3600,
    }
    broker = broker_from_settings(options)
    try:
        assert broker.signing_keys == (SAMPLE_KEY,)
        assert broker.signing_keys_interval == 3600.0
        new = SigningKey.generate("ES256")
        ring.insert(0, new)
        assert broker.reload_signing_keys() is True
        assert broker.signing_keys == (new, SAMPLE_KEY)
    finally:
        broker.close()


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


def call_asgi(app: Any, path: str) -> httpx.Response:
    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get(path)

    return asyncio.run(get())


def call_wsgi(app: Any, path: str) -> httpx.Response:
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://test") as client:
        return client.get(path)


async def plain_asgi(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 299, "headers": []})
    await send({"type": "http.response.body", "body": b"app"})


def plain_wsgi(environ: Any, start_response: Any) -> list[bytes]:
    start_response("299 App", [])
    return [b"app"]


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_middleware_options_from_settings(
    make_broker: Callable[..., CredentialBroker], kind: str
) -> None:
    from stscreds.django import asgi_application, wsgi_application

    config = "/django/.well-known/openid-configuration"  # ISSUER's path
    base = {"ISSUER": ISSUER, "KEYS": [SAMPLE_KEY]}
    factory, call, app = (
        (asgi_application, call_asgi, plain_asgi)
        if kind == "asgi"
        else (wsgi_application, call_wsgi, plain_wsgi)
    )
    made: list[Any] = []

    def build(options: dict[str, Any], **arguments: Any) -> Any:
        with override_settings(STSCREDS={**base, **options}):
            made.append(
                factory(app, resolve_role=lambda r: None, broker=make_broker(), **arguments)
            )
        return made[-1]

    try:
        healthy = build({"HEALTH_PATH": "/healthz", "OIDC_MAX_AGE": 60})
        assert call(healthy, "/healthz").json()["status"] in ("ok", "degraded")
        assert call(healthy, config).headers["cache-control"] == "public, max-age=60"
        silent = build({"SERVE_OIDC": False})
        assert call(silent, config).status_code == 299  # passed on to the app
        assert call(silent, "/healthz").status_code == 299
        # An argument given to the factory wins over the setting.
        explicit = build({"HEALTH_PATH": "/healthz"}, health_path="/ready")
        assert call(explicit, "/ready").status_code == 200
        assert call(explicit, "/healthz").status_code == 299
        with pytest.raises(ImproperlyConfigured, match=r"\['HEALTH_PATH'\]: must be None or"):
            build({"HEALTH_PATH": "healthz"})
        with pytest.raises(ValueError, match="health_path"):  # an argument: not a setting
            build({}, health_path="healthz")
    finally:
        for middleware in made:
            if kind == "wsgi":
                middleware.close()


def test_help_without_django_settings(tmp_path: Any) -> None:
    """help(stscreds.django) where no settings are configured: importing and inspecting the
    module never reads settings (django.conf.settings is lazy and raises when touched)."""
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    script = (
        "import pydoc, stscreds.django\n"
        "help(stscreds.django)\n"
        "assert 'broker_from_settings' in pydoc.render_doc(stscreds.django)\n"
        "from django.conf import settings\n"
        "assert not settings.configured\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "INSTALLED_APPS" in result.stdout


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
