"""Tests for stscreds.fastapi, and for CredentialsMiddleware's lifespan handling and warm-up
with apps that run their own lifespan (FastAPI, Starlette), against a strict STS."""

# No ``from __future__ import annotations``: FastAPI must see the route annotations that
# name make_app()'s local dependencies as objects, not as strings.
import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from starlette.applications import Starlette

from servers.sts import StrictSTS
from stscreds import CredentialBroker, Credentials, CredentialsMiddleware, Role, SigningKey
from stscreds.fastapi import AwsCredentials, OptionalAwsCredentials, credentials_for

ISSUER = "http://127.0.0.1:9/fastapi"
ROLE_A = Role("arn:aws:iam::123456789012:role/tenant-a", subject="tenant:a")
ROLE_B = Role("arn:aws:iam::123456789012:role/tenant-b", subject="tenant:b")
REPORTS = Role("arn:aws:iam::123456789012:role/reports", subject="reports")
ROLES = {"a": ROLE_A, "b": ROLE_B}


def resolve_role(scope: dict[str, Any]) -> Role | None:
    return ROLES.get(dict(scope["headers"]).get(b"x-tenant", b"").decode())


@pytest.fixture
def broker(strict_sts: StrictSTS) -> Iterator[CredentialBroker]:
    key = SigningKey.generate("ES256")
    strict_sts.configure(issuer=ISSUER, jwks={"keys": [key.public_jwk()]})
    made = CredentialBroker(
        issuer=ISSUER, signing_keys=[key], sts_endpoint_url=strict_sts.url, max_attempts=1
    )
    yield made
    made.close()


def client(app: Any) -> httpx.AsyncClient:
    """The app called in process through httpx (no lifespan: these tests need none)."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def tail(credentials: Credentials | None) -> str | None:
    return None if credentials is None else credentials.access_key_id[-4:]


def sts_tail(strict_sts: StrictSTS, role: Role) -> str:
    (call,) = strict_sts.requests_for(role.arn)
    return call.credentials["AccessKeyId"][-4:]


def make_app(broker: CredentialBroker, *, middleware: bool = True) -> FastAPI:
    app = FastAPI()
    if middleware:
        app.add_middleware(CredentialsMiddleware, broker=broker, resolve_role=resolve_role)

    def role_from_path(tenant: str) -> Role | None:
        return ROLES.get(tenant)

    Reports = Annotated[Credentials, Depends(credentials_for(REPORTS, broker=broker))]
    TenantFromPath = Annotated[Credentials, Depends(credentials_for(role_from_path, broker=broker))]

    @app.get("/whoami")
    async def whoami(credentials: AwsCredentials) -> dict[str, Any]:
        return {"tail": tail(credentials)}

    @app.get("/maybe")
    async def maybe(credentials: OptionalAwsCredentials) -> dict[str, Any]:
        return {"tail": tail(credentials)}

    @app.get("/reports")
    async def reports(credentials: Reports) -> dict[str, Any]:
        return {"tail": tail(credentials)}

    @app.get("/tenants/{tenant}")
    async def tenant(credentials: TenantFromPath) -> dict[str, Any]:
        return {"tail": tail(credentials)}

    return app


# --- AwsCredentials ----------------------------------------------------------------------------


async def test_aws_credentials_gives_the_requests_credentials(
    strict_sts: StrictSTS, broker: CredentialBroker
) -> None:
    async with client(make_app(broker)) as http:
        first = await http.get("/whoami", headers={"X-Tenant": "a"})
        again = await http.get("/whoami", headers={"X-Tenant": "a"})
        refused = await http.get("/whoami")
        optional = await http.get("/maybe")
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json() == {"tail": sts_tail(strict_sts, ROLE_A)}
    assert strict_sts.calls == 1
    assert refused.status_code == 403
    assert refused.json() == {"detail": "no AWS role for this request"}
    assert optional.status_code == 200
    assert optional.json() == {"tail": None}


async def test_aws_credentials_without_the_middleware_names_it(broker: CredentialBroker) -> None:
    async with client(make_app(broker, middleware=False)) as http:
        response = await http.get("/whoami", headers={"X-Tenant": "a"})
        optional = await http.get("/maybe")
    assert response.status_code == optional.status_code == 500
    assert "CredentialsMiddleware" in response.json()["detail"]


# --- credentials_for ----------------------------------------------------------------------------


async def test_credentials_for_a_fixed_role_fetches_it_once(
    strict_sts: StrictSTS, broker: CredentialBroker
) -> None:
    async with client(make_app(broker, middleware=False)) as http:
        responses = [await http.get("/reports") for _ in range(3)]
    assert [r.status_code for r in responses] == [200] * 3
    assert {r.json()["tail"] for r in responses} == {sts_tail(strict_sts, REPORTS)}
    assert strict_sts.calls == 1


async def test_credentials_for_a_role_dependency(
    strict_sts: StrictSTS, broker: CredentialBroker
) -> None:
    async with client(make_app(broker, middleware=False)) as http:
        b = await http.get("/tenants/b")
        unknown = await http.get("/tenants/zz")
    assert b.status_code == 200
    assert b.json() == {"tail": sts_tail(strict_sts, ROLE_B)}
    assert unknown.status_code == 403
    assert strict_sts.calls == 1


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [("reject", 502, "AccessDenied"), ("unavailable", 503, "ServiceUnavailable")],
)
async def test_credentials_for_failures_answer_like_the_middleware(
    strict_sts: StrictSTS, broker: CredentialBroker, fault: str, status: int, code: str
) -> None:
    if fault == "reject":
        strict_sts.reject_roles.add(REPORTS.arn)
    else:
        strict_sts.fail_always()
    async with client(make_app(broker, middleware=False)) as http:
        response = await http.get("/reports")
    assert response.status_code == status
    assert response.json()["detail"]["code"] == code
    assert response.headers["cache-control"] == "no-store"
    assert ("retry-after" in response.headers) == (status == 503)
    assert "eyJ" not in response.text


def test_credentials_for_refuses_a_non_broker_or_non_role(broker: CredentialBroker) -> None:
    with pytest.raises(TypeError, match="broker"):
        credentials_for(REPORTS, broker="nope")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="role"):
        credentials_for(42, broker=broker)  # type: ignore[arg-type]


# --- lifespan and warm-up -----------------------------------------------------------------------


def test_warm_up_runs_after_the_apps_own_startup_under_uvicorn(
    strict_sts: StrictSTS,
    broker: CredentialBroker,
    uvicorn_server: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    seen: dict[str, int] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        seen["sts_calls_at_app_startup"] = strict_sts.calls
        yield

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(
        CredentialsMiddleware, broker=broker, resolve_role=resolve_role, warm_up=[ROLE_A, ROLE_B]
    )

    @app.get("/whoami")
    async def whoami(credentials: AwsCredentials) -> dict[str, Any]:
        return {"tail": tail(credentials)}

    base = uvicorn_server(app)
    assert strict_sts.wait_for_calls(2)
    response = httpx.get(f"{base}/whoami", headers={"X-Tenant": "b"}, trust_env=False)

    assert seen == {"sts_calls_at_app_startup": 0}
    assert response.json() == {"tail": sts_tail(strict_sts, ROLE_B)}
    assert strict_sts.calls == 2
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


class Lifespan:
    """Drives the lifespan protocol against an app, the way a server does."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.sent: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    async def startup(self) -> dict[str, Any]:
        self.task = asyncio.create_task(
            self.app(
                {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                self.incoming.get,
                self.sent.put,
            )
        )
        await self.incoming.put({"type": "lifespan.startup"})
        return await asyncio.wait_for(self.sent.get(), 5)

    async def shutdown(self) -> dict[str, Any]:
        await self.incoming.put({"type": "lifespan.shutdown"})
        message = await asyncio.wait_for(self.sent.get(), 5)
        assert self.task is not None
        await asyncio.wait_for(self.task, 5)
        return message


async def test_warm_up_failure_is_logged_not_fatal(
    strict_sts: StrictSTS, broker: CredentialBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="stscreds")
    strict_sts.reject_roles.add(ROLE_A.arn)
    middleware = CredentialsMiddleware(
        Starlette(), broker=broker, resolve_role=resolve_role, warm_up=[ROLE_A, ROLE_B]
    )
    lifespan = Lifespan(middleware)
    assert await lifespan.startup() == {"type": "lifespan.startup.complete"}
    await middleware.wait_warm_up()

    failures = [r.getMessage() for r in caplog.records if "warm-up got no" in r.getMessage()]
    assert len(failures) == 1
    assert ROLE_A.arn in failures[0]
    assert "AccessDenied" in failures[0]
    assert "fetched credentials for 1 of 2 roles" in caplog.text
    assert all(r.params["WebIdentityToken"] not in caplog.text for r in strict_sts.requests)
    assert broker.peek(ROLE_B) is not None
    assert await lifespan.shutdown() == {"type": "lifespan.shutdown.complete"}


async def test_shutdown_does_not_wait_for_a_hung_warm_up(
    strict_sts: StrictSTS, broker: CredentialBroker
) -> None:
    strict_sts.hang = True
    middleware = CredentialsMiddleware(
        Starlette(), broker=broker, resolve_role=resolve_role, warm_up=[ROLE_A]
    )
    lifespan = Lifespan(middleware)
    assert await lifespan.startup() == {"type": "lifespan.startup.complete"}
    assert await asyncio.to_thread(strict_sts.wait_for_calls, 1)
    # Shutdown completes although the warm-up's exchange is still held by STS.
    assert await lifespan.shutdown() == {"type": "lifespan.shutdown.complete"}
    assert strict_sts.successes == 0
    strict_sts.release()


@pytest.mark.parametrize(
    ("mode", "app_lifespan_runs"), [("auto", True), ("pass", True), ("on", False)]
)
async def test_lifespan_modes_with_an_app_that_has_its_own(
    broker: CredentialBroker, mode: str, app_lifespan_runs: bool
) -> None:
    ran: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        ran.append("startup")
        yield
        ran.append("shutdown")

    middleware = CredentialsMiddleware(
        Starlette(lifespan=lifespan), broker=broker, resolve_role=resolve_role, lifespan=mode
    )
    driver = Lifespan(middleware)
    assert await driver.startup() == {"type": "lifespan.startup.complete"}
    assert await driver.shutdown() == {"type": "lifespan.shutdown.complete"}
    assert ran == (["startup", "shutdown"] if app_lifespan_runs else [])


def test_lifespan_option_is_validated(broker: CredentialBroker) -> None:
    with pytest.raises(ValueError, match="lifespan"):
        CredentialsMiddleware(Starlette(), broker=broker, resolve_role=resolve_role, lifespan="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="warm_up"):
        CredentialsMiddleware(
            Starlette(),
            broker=broker,
            resolve_role=resolve_role,
            warm_up=[ROLE_A.arn],  # type: ignore[list-item]
        )


def test_callable_dependency_signature_is_what_fastapi_sees(broker: CredentialBroker) -> None:
    """The dependency made for a role callable declares it as a sub-dependency."""
    import inspect

    def role_dep() -> Role:
        return ROLE_A

    made: Callable[..., Any] = credentials_for(role_dep, broker=broker)
    (parameter,) = inspect.signature(made).parameters.values()
    assert parameter.annotation.__metadata__[0].dependency is role_dep


async def test_credentials_for_a_dependency_returning_the_wrong_type_is_a_logged_500(
    strict_sts: StrictSTS, broker: CredentialBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="stscreds")

    def role_name() -> Any:
        return REPORTS.arn  # a str, not a Role

    app = FastAPI()

    @app.get("/wrong")
    async def wrong(
        credentials: Annotated[Credentials, Depends(credentials_for(role_name, broker=broker))],
    ) -> dict[str, str]:
        return {"key": credentials.access_key_id}

    async with client(app) as http:
        for _ in range(2):
            response = await http.get("/wrong")
            assert response.status_code == 500
            assert "misconfiguration" in response.json()["detail"]
    assert strict_sts.calls == 0
    (line,) = [r.getMessage() for r in caplog.records if r.name == "stscreds"]
    assert "role_name" in line and "builtins.str" in line
