"""stscreds.testing, the public test API: LocalSTS, its trust modes, the pytest plugin, the docs."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import botocore
import botocore.session
import httpx
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import stscreds.testing
from stscreds import CredentialBroker, CredentialsMiddleware, CredentialsRejected, Role, SigningKey
from stscreds.testing import DEFAULT_ISSUER, KEY_FETCH_FAILED, LocalSTS

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "testing.md"
ROLE = Role("arn:aws:iam::123456789012:role/app")
OTHER = Role("arn:aws:iam::123456789012:role/other")
# pytest-asyncio warns (at configure time) when this is unset; the outer filterwarnings=error
# would turn that warning into a crash of an in-process run.
PYTESTER_INI = "[pytest]\nasyncio_default_fixture_loop_scope = function\n"


@pytest.fixture
def sts() -> Iterator[LocalSTS]:
    with LocalSTS() as server:
        yield server
    assert server.internal_errors == []


async def whoami(request: Request) -> JSONResponse:
    return JSONResponse({"key": request.state.aws_credentials.access_key_id})


def make_app(broker: CredentialBroker, **options: Any) -> Starlette:
    def resolve_role(scope: Any) -> Role | None:
        if scope["path"].startswith("/.well-known/"):
            # With serve_oidc=False STS's own discovery requests reach the app: no role (else
            # they would wait on the very exchange that is waiting for them).
            return None
        return OTHER if b"x-other" in dict(scope["headers"]) else ROLE

    return Starlette(
        routes=[Route("/whoami", whoami)],
        middleware=[
            Middleware(CredentialsMiddleware, broker=broker, resolve_role=resolve_role, **options)
        ],
    )


@pytest.fixture
def serve(uvicorn_server: Callable[..., str]) -> Callable[..., tuple[str, Callable[..., None]]]:
    """Serve an app made later (its broker needs the URL as issuer): returns (url, mount)."""

    def start() -> tuple[str, Callable[..., None]]:
        holder: dict[str, Any] = {}

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await holder["app"](scope, receive, send)

        url = uvicorn_server(app, lifespan="off")
        return url, lambda real: holder.__setitem__("app", real)

    return start


def sts_client(url: str) -> Any:
    """An unsigned botocore STS client, one attempt."""
    return botocore.session.get_session().create_client(
        "sts",
        region_name="us-east-1",
        endpoint_url=url,
        config=Config(signature_version=botocore.UNSIGNED, retries={"total_max_attempts": 1}),
    )


def token(key: SigningKey, issuer: str, now: float | None = None) -> str:
    now = time.time() if now is None else now
    claims = {"iss": issuer, "aud": "sts.amazonaws.com", "sub": "user", "iat": int(now)}
    return key.sign({**claims, "exp": int(now) + 300})


def assume(client: Any, web_token: str) -> dict[str, Any]:
    return client.assume_role_with_web_identity(  # type: ignore[no-any-return]
        RoleArn=ROLE.arn, RoleSessionName="s1", WebIdentityToken=web_token
    )


def error_of(exc: pytest.ExceptionInfo[ClientError]) -> tuple[str, str]:
    return exc.value.response["Error"]["Code"], exc.value.response["Error"]["Message"]


class OIDC:
    """A bare OIDC issuer on loopback: serves a discovery document and a JWKS, both editable."""

    def __init__(self) -> None:
        self.jwks: dict[str, Any] = {"keys": []}
        self.headers: dict[str, str] = {"Cache-Control": "public, max-age=300"}
        self.jwks_uri: str | None = None  # None: <issuer>/jwks.json
        self.gets: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.gets.append(self.path)
                if self.path == "/.well-known/openid-configuration":
                    body, headers = (
                        {"jwks_uri": server.jwks_uri or f"{server.issuer}/jwks.json"},
                        {},
                    )
                elif self.path == "/jwks.json":
                    body, headers = server.jwks, server.headers
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.issuer = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,))
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.thread.join()
        self.httpd.server_close()


@pytest.fixture
def oidc() -> Iterator[OIDC]:
    server = OIDC()
    try:
        yield server
    finally:
        server.close()


def dead_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the package -------------------------------------------------------------------------------


def test_import_without_pytest() -> None:
    code = (
        "import sys; sys.modules['pytest'] = None\n"  # any `import pytest` now raises
        "import asyncio, stscreds.testing as t\n"
        "from stscreds import Role\n"
        "with t.LocalSTS() as sts:\n"
        "    broker = sts.make_broker()\n"
        "    asyncio.run(broker.get(Role('arn:aws:iam::123456789012:role/x')))\n"
        "    broker.close()\n"
        "print(sts.successes)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"


def test_public_names() -> None:
    assert set(stscreds.testing.__all__) == {
        "DEFAULT_ISSUER",
        "KEY_FETCH_FAILED",
        "LocalSTS",
        "RecordedCall",
        "STSError",
        "build_success_xml",
    }
    for name in stscreds.testing.__all__:
        value = getattr(stscreds.testing, name)
        if callable(value):
            assert value.__doc__, name


def test_plugin_is_registered_by_entry_point() -> None:
    [plugin] = [ep for ep in entry_points(group="pytest11") if ep.name == "stscreds"]
    assert plugin.value == "stscreds.testing.plugin", (
        "stale install metadata: run `pip install -e .`"
    )


def test_the_project_strict_sts_is_local_sts_without_jwks_cache() -> None:
    from servers.sts import StrictSTS

    assert issubclass(StrictSTS, LocalSTS)
    assert StrictSTS().jwks_cache is False
    assert StrictSTS(jwks_cache=True).jwks_cache is True
    assert LocalSTS().jwks_cache is True


# -- trust by JWKS -----------------------------------------------------------------------------


async def test_trust_by_jwks(sts: LocalSTS) -> None:
    broker = sts.make_broker()
    try:
        assert (sts.issuer, sts.audiences) == (DEFAULT_ISSUER, ["sts.amazonaws.com"])
        assert broker.sts_endpoint_url == sts.url
        credentials = await broker.get(ROLE)
    finally:
        broker.close()
    [call] = sts.requests_for(ROLE.arn)
    assert call.credentials is not None
    assert credentials.access_key_id == call.credentials["AccessKeyId"]
    assert call.claims is not None and call.claims["iss"] == DEFAULT_ISSUER
    assert call.token_header is not None and call.token_header["alg"] == "ES256"
    assert sts.jwks_fetches == 0  # no HTTP to the issuer in this mode


async def test_trust_refuses_a_key_it_was_not_given(sts: LocalSTS) -> None:
    """Same issuer, another key: the signature does not verify against the trusted JWKS."""
    trusted = sts.make_broker()
    stranger = CredentialBroker(
        issuer=trusted.issuer,
        signing_keys=[SigningKey.generate("ES256")],
        sts_endpoint_url=sts.url,
        max_attempts=1,
    )
    try:
        with pytest.raises(CredentialsRejected) as exc:
            await stranger.get(ROLE)
        assert exc.value.code == "InvalidIdentityToken"
        sts.trust(stranger)  # now the other one is the registered provider
        # (another role: the broker remembers ROLE's rejection for a few seconds)
        assert (await stranger.get(OTHER)).access_key_id
    finally:
        trusted.close()
        stranger.close()
    assert [r.error_code for r in sts.requests] == ["InvalidIdentityToken", None]


async def test_trust_follows_the_brokers_audience_and_any_issuer(sts: LocalSTS) -> None:
    # Trust by JWKS never fetches from the issuer: a production issuer is fine.
    broker = sts.make_broker(issuer="https://app.example.com", audience="my-app")
    try:
        assert sts.audiences == ["my-app"]
        await broker.get(ROLE)
    finally:
        broker.close()
    assert sts.successes == 1
    # Discovery would fetch it: refused, the configuration unchanged.
    with pytest.raises(ValueError, match="loopback"):
        sts.configure(jwks=None)
    assert sts.jwks_source is not None and sts.issuer == "https://app.example.com"


def test_make_broker_needs_a_started_server() -> None:
    with pytest.raises(RuntimeError, match="start"):
        LocalSTS().make_broker()


def test_make_broker_closes_the_broker_it_could_not_trust(sts: LocalSTS) -> None:
    with pytest.raises(ValueError, match="loopback"):
        sts.make_broker(issuer="https://app.example.com", discover=True)


# -- trust by discovery ----------------------------------------------------------------------


def test_discovery_against_the_app_serving_its_own_documents(
    sts: LocalSTS, serve: Callable[..., tuple[str, Callable[..., None]]]
) -> None:
    base, mount = serve()
    broker = sts.make_broker(issuer=base, discover=True)
    mount(make_app(broker))
    try:
        with httpx.Client(base_url=base, timeout=10, trust_env=False) as http:
            first = http.get("/whoami")
            other = http.get("/whoami", headers={"x-other": "1"})
            assert first.status_code == other.status_code == 200, first.text
            assert sts.jwks_fetches == 1  # the second exchange used the cached JWKS
            assert sts.jwks_cache_control == "public, max-age=300"
            sts.forget_jwks()
            sts.reset()
            broker.invalidate(ROLE)
            assert http.get("/whoami").status_code == 200
            assert sts.jwks_fetches == 2
    finally:
        broker.close()
    assert sts.discovery_error is None
    [call] = sts.requests
    assert call.claims is not None and call.claims["iss"] == base


def test_discovery_cache_follows_max_age_on_the_sts_clock(oidc: OIDC) -> None:
    """Like AWS: a key the cached JWKS does not list is refused until the cache expires."""
    offset = [0.0]
    old, new = SigningKey.generate("ES256", kid="old"), SigningKey.generate("RS256", kid="new")
    oidc.jwks = {"keys": [old.public_jwk()]}
    with LocalSTS(issuer=oidc.issuer, clock=lambda: time.time() + offset[0], leeway=7200) as sts:
        client = sts_client(sts.url)
        assume(client, token(old, oidc.issuer))
        assert sts.jwks_fetches == 1

        # The issuer now publishes the new key, and it signs at once: too early.
        oidc.jwks = {"keys": [new.public_jwk(), old.public_jwk()]}
        with pytest.raises(ClientError) as exc:
            assume(client, token(new, oidc.issuer))
        code, message = error_of(exc)
        assert code == "InvalidIdentityToken" and "kid new" in message
        assert sts.jwks_fetches == 1

        offset[0] = 299
        with pytest.raises(ClientError):
            assume(client, token(new, oidc.issuer))
        offset[0] = 301  # max-age=300 has passed on STS's clock
        assume(client, token(new, oidc.issuer))
        assert sts.jwks_fetches == 2

        # jwks_cache_max caps max-age, and is the lifetime without one.
        sts.jwks_cache_max = 60
        oidc.headers = {}
        sts.forget_jwks()
        assume(client, token(new, oidc.issuer))
        offset[0] += 59
        assume(client, token(new, oidc.issuer))
        assert sts.jwks_fetches == 3
        offset[0] += 2
        assume(client, token(new, oidc.issuer))
        assert sts.jwks_fetches == 4

        # jwks_cache=False refetches on every call.
        sts.jwks_cache = False
        assume(client, token(new, oidc.issuer))
        assume(client, token(new, oidc.issuer))
        assert sts.jwks_fetches == 6
        client.close()
    assert sts.internal_errors == []


@pytest.mark.parametrize(
    "headers",
    [
        {"Cache-Control": "no-cache"},
        {"Cache-Control": "public, no-store"},
        {"Cache-Control": "max-age=0"},
        {"Cache-Control": "public, max-age=300", "Pragma": "no-cache"},
    ],
)
def test_an_uncacheable_jwks_is_refused(oidc: OIDC, headers: dict[str, str]) -> None:
    key = SigningKey.generate("ES256")
    oidc.jwks, oidc.headers = {"keys": [key.public_jwk()]}, headers
    with LocalSTS(issuer=oidc.issuer) as sts:
        client = sts_client(sts.url)
        with pytest.raises(ClientError) as exc:
            assume(client, token(key, oidc.issuer))
        client.close()
    assert error_of(exc) == ("InvalidIdentityToken", KEY_FETCH_FAILED)
    assert sts.discovery_error is not None and "may not be cached" in sts.discovery_error
    assert sts._jwks_cached is None


def test_a_jwks_uri_off_loopback_is_never_fetched(oidc: OIDC) -> None:
    key = SigningKey.generate("ES256")
    oidc.jwks_uri = "https://keys.example.com/jwks.json"
    with LocalSTS(issuer=oidc.issuer) as sts:
        client = sts_client(sts.url)
        with pytest.raises(ClientError) as exc:
            assume(client, token(key, oidc.issuer))
        client.close()
    assert error_of(exc) == ("InvalidIdentityToken", KEY_FETCH_FAILED)
    assert sts.discovery_error is not None and "not a loopback URL" in sts.discovery_error
    assert oidc.gets == ["/.well-known/openid-configuration"]
    assert sts.jwks_fetches == 0


def test_reconfiguring_empties_the_cache(oidc: OIDC) -> None:
    key = SigningKey.generate("ES256")
    oidc.jwks = {"keys": [key.public_jwk()]}
    with LocalSTS(issuer=oidc.issuer) as sts:
        client = sts_client(sts.url)
        assume(client, token(key, oidc.issuer))
        sts.configure(issuer=oidc.issuer)
        assume(client, token(key, oidc.issuer))
        sts.configure(audiences=["sts.amazonaws.com"])  # not the provider's keys: kept
        assume(client, token(key, oidc.issuer))
        client.close()
    assert sts.jwks_fetches == 2


# -- a misconfigured issuer fails locally as in AWS -----------------------------------------------


def test_misconfigured_issuer_nothing_listens(
    sts: LocalSTS, serve: Callable[..., tuple[str, Callable[..., None]]]
) -> None:
    """The app runs, but its issuer names an address where nothing serves its keys."""
    base, mount = serve()
    wrong = f"http://127.0.0.1:{dead_port()}"
    broker = sts.make_broker(issuer=wrong, discover=True, max_attempts=1)
    mount(make_app(broker))
    try:
        response = httpx.get(f"{base}/whoami", timeout=10, trust_env=False)
    finally:
        broker.close()
    assert response.status_code == 502
    assert response.json()["code"] == "InvalidIdentityToken"
    [call] = sts.requests
    assert call.error_code == "InvalidIdentityToken" and call.status == 400
    assert sts.discovery_error is not None
    assert f"{wrong}/.well-known/openid-configuration" in sts.discovery_error


def test_misconfigured_issuer_documents_not_served(
    sts: LocalSTS, serve: Callable[..., tuple[str, Callable[..., None]]]
) -> None:
    base, mount = serve()
    broker = sts.make_broker(issuer=base, discover=True, max_attempts=1)
    mount(make_app(broker, serve_oidc=False))
    try:
        response = httpx.get(f"{base}/whoami", timeout=10, trust_env=False)
    finally:
        broker.close()
    assert (response.status_code, response.json()["code"]) == (502, "InvalidIdentityToken")
    assert sts.discovery_error is not None and "404" in sts.discovery_error


async def test_misconfigured_issuer_not_the_registered_one(sts: LocalSTS) -> None:
    broker = sts.make_broker(max_attempts=1)
    sts.configure(issuer=DEFAULT_ISSUER + "/other")
    try:
        with pytest.raises(CredentialsRejected) as exc:
            await broker.get(ROLE)
    finally:
        broker.close()
    assert exc.value.code == "InvalidIdentityToken"
    assert sts.requests[0].error_code == "InvalidIdentityToken"


# -- the pytest plugin ---------------------------------------------------------------------------

USER_TESTS = """
import asyncio

import pytest

from stscreds import CredentialBroker, Role
from stscreds.testing import LocalSTS

ROLE = Role("arn:aws:iam::123456789012:role/app")
SEEN = []


def test_local_sts_runs(local_sts):
    assert isinstance(local_sts, LocalSTS)
    assert local_sts.url.startswith("http://127.0.0.1:")
    assert local_sts.issuer is None


def test_broker_is_trusted(broker, local_sts):
    assert isinstance(broker, CredentialBroker)
    assert broker.sts_endpoint_url == local_sts.url
    credentials = asyncio.run(broker.get(ROLE))
    [call] = local_sts.requests_for(ROLE.arn)
    assert credentials.access_key_id == call.credentials["AccessKeyId"]
    SEEN.append((broker, local_sts))


def test_fixtures_were_torn_down():
    [(broker, sts)] = SEEN
    assert broker._closed
    assert sts._httpd is None


def test_each_test_has_its_own(broker, local_sts):
    assert (broker, local_sts) != SEEN[0]
    assert local_sts.calls == 0
"""


def test_fixtures_in_a_user_test_file(pytester: pytest.Pytester) -> None:
    pytester.makeini(PYTESTER_INI)
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)


def test_a_local_broker_fixture_overrides_the_plugins(pytester: pytest.Pytester) -> None:
    pytester.makeini(PYTESTER_INI)
    pytester.makeconftest(
        """
import pytest

@pytest.fixture
def broker(local_sts):
    made = local_sts.make_broker(issuer="http://127.0.0.1:9/mine", region="eu-west-1")
    yield made
    made.close()
"""
    )
    pytester.makepyfile(
        test_override="""
def test_mine(broker, local_sts):
    assert broker.issuer == local_sts.issuer == "http://127.0.0.1:9/mine"
"""
    )
    pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_an_internal_error_fails_the_test_at_teardown(pytester: pytest.Pytester) -> None:
    pytester.makeini(PYTESTER_INI)
    pytester.makepyfile(
        test_broken="""
import asyncio
from stscreds import Role

def broken_clock():
    raise RuntimeError("broken test clock")

def test_it(broker, local_sts):
    local_sts.clock = broken_clock
    try:
        asyncio.run(broker.get(Role("arn:aws:iam::123456789012:role/app")))
    except Exception:
        pass
"""
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*LocalSTS internal errors*broken test clock*"])


def test_the_plugin_can_be_disabled(pytester: pytest.Pytester) -> None:
    pytester.makeini(PYTESTER_INI)
    pytester.makepyfile(test_off="def test_it(local_sts):\n    pass\n")
    result = pytester.runpytest_inprocess("-p", "no:stscreds", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'local_sts' not found*"])


# -- docs/testing.md runs as written --------------------------------------------------------------

MARKER = re.compile(r"^<!-- docs-test\b[^\n]*-->\n```python\n(.*?)^```$", re.M | re.S)


def docs_tests() -> str:
    blocks = MARKER.findall(DOCS.read_text())
    assert len(blocks) >= 2, "no marked blocks in docs/testing.md"
    return "\n\n".join(blocks)


def test_docs_first_block_is_a_complete_short_user_test() -> None:
    first = MARKER.findall(DOCS.read_text())[0]
    test = first[first.index("@pytest.mark.asyncio") :]
    assert test.count("\n") <= 10
    compile(first, "docs/testing.md", "exec")


def test_docs_run_as_written(pytester: pytest.Pytester) -> None:
    code = docs_tests()
    pytester.makeini(PYTESTER_INI)
    pytester.makepyfile(test_docs=code)
    # A fresh process: the plugin comes from the installed entry point, as for a user.
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error", timeout=120)
    result.assert_outcomes(passed=len(re.findall(r"^(?:async )?def test_", code, re.M)))
