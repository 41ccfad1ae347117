"""The test STS servers answer real botocore clients the way AWS STS does."""

from __future__ import annotations

import email.utils
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import botocore
import botocore.session
import jwt
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from botocore.parsers import ResponseParserError
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from servers.sts import StrictSTS, build_success_xml

ROLE = "arn:aws:iam::123456789012:role/app/reader"
ISSUER = "http://127.0.0.1:1/issuer"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def public_jwk(key: Any, kid: str, alg: str) -> dict[str, Any]:
    algo = jwt.algorithms.RSAAlgorithm if alg.startswith("RS") else jwt.algorithms.ECAlgorithm
    jwk: dict[str, Any] = json.loads(algo.to_jwk(key.public_key()))
    return {**jwk, "kid": kid, "alg": alg, "use": "sig"}


JWKS = {"keys": [public_jwk(RSA_KEY, "rsa-1", "RS256"), public_jwk(EC_KEY, "ec-1", "ES256")]}


def make_token(
    key: Any = RSA_KEY,
    kid: str = "rsa-1",
    alg: str = "RS256",
    now: float | None = None,
    **overrides: Any,
) -> str:
    now = time.time() if now is None else now
    claims = {
        "iss": ISSUER,
        "aud": "sts.amazonaws.com",
        "sub": "user-42",
        "iat": int(now),
        "exp": int(now) + 300,
        **overrides,
    }
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid} if kid else None)


# One session for all clients: it caches the loaded service models (a fresh one costs ~0.5s).
_SESSION = botocore.session.get_session()


@pytest.fixture
def client_factory() -> Iterator[Callable[..., Any]]:
    """Unsigned botocore STS clients (single attempt unless overridden), closed at teardown."""
    clients: list[Any] = []

    def make(url: str, **config: Any) -> Any:
        config.setdefault("retries", {"total_max_attempts": 1})
        client = _SESSION.create_client(
            "sts",
            region_name="us-east-1",
            endpoint_url=url,
            config=Config(signature_version=botocore.UNSIGNED, **config),
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def sts(strict_sts: StrictSTS, client_factory: Callable[..., Any]) -> Any:
    strict_sts.configure(issuer=ISSUER, jwks=lambda: JWKS)
    return client_factory(strict_sts.url)


def assume(client: Any, token: str, role: str = ROLE, **kw: Any) -> dict[str, Any]:
    return client.assume_role_with_web_identity(  # type: ignore[no-any-return]
        RoleArn=role, RoleSessionName="sess-1", WebIdentityToken=token, **kw
    )


def error_of(err: pytest.ExceptionInfo[ClientError] | BaseException) -> tuple[str, int, str]:
    """(Error.Code, HTTP status, Error.Type) as botocore parsed them."""
    exc = err.value if isinstance(err, pytest.ExceptionInfo) else err
    assert isinstance(exc, ClientError)
    resp = exc.response
    return resp["Error"]["Code"], resp["ResponseMetadata"]["HTTPStatusCode"], resp["Error"]["Type"]


@pytest.mark.parametrize(
    ("key", "kid", "alg"), [(RSA_KEY, "rsa-1", "RS256"), (EC_KEY, "ec-1", "ES256")]
)
def test_valid_token_yields_credentials(
    strict_sts: StrictSTS, sts: Any, key: Any, kid: str, alg: str
) -> None:
    resp = assume(sts, make_token(key, kid, alg), DurationSeconds=900, Policy='{"x":1}')

    creds = resp["Credentials"]
    assert re.fullmatch(r"ASIA[A-Z0-9]{16}", creds["AccessKeyId"])
    assert len(creds["SecretAccessKey"]) == 40 and len(creds["SessionToken"]) > 100
    exp = creds["Expiration"]
    assert isinstance(exp, datetime) and exp.tzinfo is not None
    assert abs(exp.timestamp() - (time.time() + 900)) < 5
    assert resp["AssumedRoleUser"] == {
        "Arn": "arn:aws:sts::123456789012:assumed-role/reader/sess-1",
        "AssumedRoleId": resp["AssumedRoleUser"]["AssumedRoleId"],
    }
    assert resp["AssumedRoleUser"]["AssumedRoleId"].endswith(":sess-1")
    assert resp["SubjectFromWebIdentityToken"] == "user-42"
    assert resp["Audience"] == "sts.amazonaws.com"
    assert resp["Provider"] == "arn:aws:iam::123456789012:oidc-provider/127.0.0.1:1/issuer"
    assert resp["ResponseMetadata"]["RequestId"]

    assert (strict_sts.calls, strict_sts.successes, strict_sts.calls_for(ROLE)) == (1, 1, 1)
    [rec] = strict_sts.requests
    assert (rec.role_arn, rec.session_name, rec.duration, rec.policy, rec.status) == (
        ROLE,
        "sess-1",
        900,
        '{"x":1}',
        200,
    )
    assert rec.claims is not None and rec.claims["sub"] == "user-42"
    assert rec.token_header == {"alg": alg, "kid": kid, "typ": "JWT"}
    assert rec.credentials is not None
    assert rec.credentials["AccessKeyId"] == creds["AccessKeyId"]
    assert rec.expiration == exp.timestamp()
    strict_sts.reset()
    assert (strict_sts.calls, strict_sts.successes, strict_sts.requests) == (0, 0, [])


def test_injected_clock_drives_expiry_and_expiration(strict_sts: StrictSTS, sts: Any) -> None:
    fake_now = 2_000_000_000.0
    strict_sts.clock = lambda: fake_now
    resp = assume(sts, make_token(now=fake_now))  # would be "expired" by wall-clock standards
    assert resp["Credentials"]["Expiration"] == datetime.fromtimestamp(
        fake_now + 3600, tz=timezone.utc
    )

    with pytest.raises(ClientError) as exc:
        assume(sts, make_token(now=fake_now - 301))
    assert exc.value.response["Error"]["Message"] == "Token is expired"


def date_header(resp: dict[str, Any]) -> datetime | None:
    date = resp["ResponseMetadata"]["HTTPHeaders"].get("date")
    return None if date is None else email.utils.parsedate_to_datetime(date)


@pytest.mark.parametrize("skew", [600, -600], ids=["sts-ahead", "sts-behind"])
def test_date_header_follows_injected_clock(strict_sts: StrictSTS, sts: Any, skew: float) -> None:
    strict_sts.clock = lambda: time.time() + skew
    resp = assume(sts, make_token(now=time.time() + skew))
    date = date_header(resp)
    assert date is not None
    assert abs(date.timestamp() - (time.time() + skew)) < 5
    assert abs(resp["Credentials"]["Expiration"].timestamp() - date.timestamp() - 3600) < 5

    strict_sts.fail_next()  # error answers carry the skewed Date too
    with pytest.raises(ClientError) as exc:
        assume(sts, make_token(now=time.time() + skew))
    date = date_header(exc.value.response)
    assert date is not None and abs(date.timestamp() - (time.time() + skew)) < 5


def test_send_date_false_omits_date_header(strict_sts: StrictSTS, sts: Any) -> None:
    assert date_header(assume(sts, make_token())) is not None
    strict_sts.send_date = False
    resp = assume(sts, make_token())
    assert "date" not in resp["ResponseMetadata"]["HTTPHeaders"]
    assert resp["ResponseMetadata"]["HTTPHeaders"]["server"]  # only Date is dropped
    strict_sts.fail_next()
    with pytest.raises(ClientError) as exc:
        assume(sts, make_token())
    assert "date" not in exc.value.response["ResponseMetadata"]["HTTPHeaders"]
    strict_sts.send_date = True
    assert date_header(assume(sts, make_token())) is not None


def test_grant_seconds_caps_granted_lifetime(strict_sts: StrictSTS, sts: Any) -> None:
    fake_now = 2_000_000_000.0
    strict_sts.clock = lambda: fake_now
    strict_sts.grant_seconds = 1000
    for requested, granted in ((3600, 1000), (900, 900)):
        resp = assume(sts, make_token(now=fake_now), DurationSeconds=requested)
        assert resp["Credentials"]["Expiration"].timestamp() == fake_now + granted
        rec = strict_sts.requests[-1]
        assert (rec.duration, rec.expiration) == (requested, fake_now + granted)
    strict_sts.grant_seconds = None
    resp = assume(sts, make_token(now=fake_now), DurationSeconds=3600)
    assert resp["Credentials"]["Expiration"].timestamp() == fake_now + 3600


def test_expiration_callable_wins_over_grant_seconds(strict_sts: StrictSTS, sts: Any) -> None:
    fake_now = 2_000_000_000.0
    strict_sts.clock = lambda: fake_now
    strict_sts.grant_seconds = 1000
    seen: list[tuple[float, int]] = []
    # Already expired, inside the last minute, and fractional (answered to the second).
    cases = [(-5, fake_now - 5), (30, fake_now + 30), (59.9, fake_now + 59)]

    def expiration(now: float, duration: int) -> float:
        seen.append((now, duration))
        return now + cases[len(seen) - 1][0]

    strict_sts.expiration = expiration
    for _, answered in cases:
        resp = assume(sts, make_token(now=fake_now), DurationSeconds=7200)
        assert resp["Credentials"]["Expiration"].timestamp() == answered
        assert strict_sts.requests[-1].expiration == answered
    assert seen == [(fake_now, 7200)] * 3

    strict_sts.fail_next()
    with pytest.raises(ClientError):
        assume(sts, make_token(now=fake_now))
    assert strict_sts.requests[-1].expiration is None  # only answered successes have one
    assert len(seen) == 3


@pytest.mark.parametrize("body", [b"<AssumeRoleWithWebIdentityResponse><oops", b""])
def test_respond_raw_unparseable_body_then_recovers(
    strict_sts: StrictSTS, sts: Any, body: bytes
) -> None:
    strict_sts.respond_raw(body)
    with pytest.raises(ResponseParserError):
        assume(sts, make_token())
    assert assume(sts, make_token())["Credentials"]  # n=1: only the next call
    assert (strict_sts.calls, strict_sts.successes) == (2, 1)
    raw, ok = strict_sts.requests
    assert (raw.status, raw.raw, raw.error_code, raw.credentials, raw.role_arn) == (
        200,
        True,
        None,
        None,
        ROLE,
    )
    assert (ok.status, ok.raw) == (200, False)
    assert strict_sts.connections_accepted == 1  # keep-alive survived the raw answer


def test_respond_raw_success_missing_session_token(strict_sts: StrictSTS, sts: Any) -> None:
    body = build_success_xml(2_000_000_000, "ASIAFAKEFAKEFAKEFAKE", omit=["SessionToken"])
    strict_sts.respond_raw(body)
    resp = assume(sts, make_token())
    creds = resp["Credentials"]
    assert "SessionToken" not in creds
    assert creds["AccessKeyId"] == "ASIAFAKEFAKEFAKEFAKE" and creds["SecretAccessKey"]
    assert creds["Expiration"].timestamp() == 2_000_000_000
    assert (strict_sts.calls, strict_sts.successes) == (1, 0)  # raw answers are not successes

    strict_sts.respond_raw(build_success_xml(None))  # no Expiration either
    assert "Expiration" not in assume(sts, make_token())["Credentials"]


def test_respond_raw_oversized_body_keeps_connection(strict_sts: StrictSTS, sts: Any) -> None:
    # Valid XML: a comment may follow the root element.
    body = build_success_xml(2_000_000_000) + b"<!--" + b"x" * (5 * 1024 * 1024) + b"-->"
    strict_sts.respond_raw(body)
    resp = assume(sts, make_token())
    assert resp["ResponseMetadata"]["HTTPHeaders"]["content-length"] == str(len(body))
    assert resp["Credentials"]["Expiration"].timestamp() == 2_000_000_000
    assert assume(sts, make_token())["Credentials"]
    assert (strict_sts.calls, strict_sts.successes, strict_sts.connections_accepted) == (2, 1, 1)


def test_respond_raw_status_content_type_always_and_clear(strict_sts: StrictSTS, sts: Any) -> None:
    body = b"<html><body>502 Bad Gateway</body></html>"
    strict_sts.respond_raw(body, status=502, n=None, content_type="text/html")
    for _ in range(3):
        with pytest.raises(ClientError) as exc:
            assume(sts, make_token())
        assert exc.value.response["Error"]["Code"] == "502"
        headers = exc.value.response["ResponseMetadata"]["HTTPHeaders"]
        assert (headers["content-type"], headers["content-length"]) == (
            "text/html",
            str(len(body)),
        )
    strict_sts.clear_faults()
    assert assume(sts, make_token())["Credentials"]

    strict_sts.respond_raw(b"<broken", n=2)
    for _ in range(2):
        with pytest.raises(ResponseParserError):
            assume(sts, make_token())
    assert assume(sts, make_token())["Credentials"]
    assert [(r.status, r.raw) for r in strict_sts.requests] == [(502, True)] * 3 + [
        (200, False),
        (200, True),
        (200, True),
        (200, False),
    ]
    assert (strict_sts.calls, strict_sts.successes, strict_sts.connections_accepted) == (7, 2, 1)


def test_respond_raw_rejects_bad_arguments(strict_sts: StrictSTS) -> None:
    with pytest.raises(ValueError, match="n must be"):
        strict_sts.respond_raw(b"", n=0)
    with pytest.raises(ValueError, match="cannot carry a body"):
        strict_sts.respond_raw(b"", status=204)


OTHER_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (lambda: make_token(kid="nope"), "No matching key"),
        (lambda: make_token(kid=None), "No matching key"),
        (lambda: make_token(OTHER_RSA), "signature verification failed"),
        (
            lambda: make_token(EC_KEY, "ec-1", "ES256", iss="http://127.0.0.1:1/other"),
            "No OpenIDConnect provider found in your account for http://127.0.0.1:1/other",
        ),
        (lambda: make_token(alg="HS256", key="k" * 32), "Unsupported token signing algorithm"),
        (lambda: make_token(aud="someone-else"), "Incorrect token audience"),
        (lambda: make_token(aud=["a", "b"]), "Incorrect token audience"),
        (lambda: make_token(sub=None), "sub claim"),
        (lambda: make_token(exp=None), "exp claim"),
        (lambda: make_token(now=time.time() - 3600), "Token is expired"),
        (lambda: make_token(iat=int(time.time()) + 600), "not yet valid"),
        (lambda: make_token(nbf=int(time.time()) + 600), "not yet valid"),
        (lambda: "not-a-jwt", "not a valid JWT"),
    ],
    ids=[
        "unknown-kid",
        "no-kid",
        "bad-signature",
        "wrong-issuer",
        "hs256",
        "wrong-aud",
        "aud-list-mismatch",
        "no-sub",
        "no-exp",
        "expired",
        "iat-future",
        "nbf-future",
        "garbage",
    ],
)
def test_invalid_tokens_are_rejected(
    strict_sts: StrictSTS, sts: Any, token: Callable[[], str], message: str
) -> None:
    with pytest.raises(ClientError) as exc:
        assume(sts, token())
    assert error_of(exc) == ("InvalidIdentityToken", 400, "Sender")
    assert message in exc.value.response["Error"]["Message"]
    assert (strict_sts.calls, strict_sts.successes) == (1, 0)
    assert strict_sts.requests[0].error_code == "InvalidIdentityToken"


def test_audience_list_and_configured_audiences(strict_sts: StrictSTS, sts: Any) -> None:
    strict_sts.configure(audiences=["my-app"])
    resp = assume(sts, make_token(aud=["other", "my-app"]))
    assert resp["Audience"] == "my-app"
    with pytest.raises(ClientError):
        assume(sts, make_token())  # sts.amazonaws.com no longer allowed


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"role": "arn:aws:iam::123456789012:user/bob"}, "is invalid"),
        ({"role": "not-an-arn"}, "is invalid"),
        ({"DurationSeconds": 899}, "greater than or equal to 900"),
        ({"DurationSeconds": 43201}, "less than or equal to 43200"),
        ({"RoleSessionName": "x"}, "roleSessionName"),
        ({"RoleSessionName": "has space"}, "roleSessionName"),
        ({"RoleSessionName": "a" * 65}, "roleSessionName"),
    ],
)
def test_parameter_validation(
    strict_sts: StrictSTS, client_factory: Callable[..., Any], kwargs: dict[str, Any], message: str
) -> None:
    strict_sts.configure(issuer=ISSUER, jwks=JWKS)
    # botocore validates min lengths/values client-side; switch that off to reach the server.
    client = client_factory(strict_sts.url, parameter_validation=False)
    params = {
        "RoleArn": kwargs.pop("role", ROLE),
        "RoleSessionName": "sess-1",
        "WebIdentityToken": make_token(),
        **kwargs,
    }
    with pytest.raises(ClientError) as exc:
        client.assume_role_with_web_identity(**params)
    assert error_of(exc) == ("ValidationError", 400, "Sender")
    assert message in exc.value.response["Error"]["Message"]


def test_rejected_role_is_access_denied(strict_sts: StrictSTS, sts: Any) -> None:
    other = "arn:aws:iam::123456789012:role/writer"
    strict_sts.reject_roles.add(other)
    assert assume(sts, make_token())["Credentials"]
    with pytest.raises(ClientError) as exc:
        assume(sts, make_token(), role=other)
    assert error_of(exc) == ("AccessDenied", 403, "Sender")
    assert "sts:AssumeRoleWithWebIdentity" in exc.value.response["Error"]["Message"]
    assert (strict_sts.calls_for(ROLE), strict_sts.calls_for(other)) == (1, 1)
    assert [r.status for r in strict_sts.requests_for(other)] == [403]


def test_fail_next_throttling_then_recovers(strict_sts: StrictSTS, sts: Any) -> None:
    strict_sts.fail_next(2)
    for _ in range(2):
        with pytest.raises(ClientError) as exc:
            assume(sts, make_token())
        assert error_of(exc) == ("Throttling", 400, "Sender")
        assert exc.value.response["Error"]["Message"] == "Rate exceeded"
    assert assume(sts, make_token())["Credentials"]
    assert (strict_sts.calls, strict_sts.successes) == (3, 1)
    assert [r.error_code for r in strict_sts.requests] == ["Throttling", "Throttling", None]


def test_fail_next_503(strict_sts: StrictSTS, sts: Any) -> None:
    strict_sts.fail_next(1, code="ServiceUnavailable", status=503, message="down")
    with pytest.raises(ClientError) as exc:
        assume(sts, make_token())
    assert error_of(exc) == ("ServiceUnavailable", 503, "Receiver")
    assert assume(sts, make_token())["Credentials"]


def test_fail_always_and_clear(strict_sts: StrictSTS, sts: Any) -> None:
    strict_sts.fail_always("InternalFailure", 500, "boom")
    for _ in range(3):
        with pytest.raises(ClientError) as exc:
            assume(sts, make_token())
        assert error_of(exc) == ("InternalFailure", 500, "Receiver")
    strict_sts.clear_faults()
    assert assume(sts, make_token())["Credentials"]


def test_botocore_retries_throttling_itself(
    strict_sts: StrictSTS, client_factory: Callable[..., Any]
) -> None:
    """Worth knowing: a default-configured client hides one Throttling from the caller."""
    strict_sts.configure(issuer=ISSUER, jwks=JWKS)
    client = client_factory(strict_sts.url, retries={"mode": "standard", "total_max_attempts": 2})
    strict_sts.fail_next(1)
    resp = assume(client, make_token())
    assert resp["ResponseMetadata"]["RetryAttempts"] == 1
    assert (strict_sts.calls, strict_sts.successes) == (2, 1)


def test_delay(strict_sts: StrictSTS, sts: Any) -> None:
    strict_sts.delay = 0.3
    start = time.monotonic()
    assume(sts, make_token())
    assert time.monotonic() - start >= 0.3


def test_hang_holds_requests_until_released(strict_sts: StrictSTS, sts: Any) -> None:
    strict_sts.hang = True
    results: list[Any] = []
    worker = threading.Thread(target=lambda: results.append(assume(sts, make_token())))
    worker.start()
    assert strict_sts.wait_for_calls(1)
    time.sleep(0.1)
    assert results == [] and strict_sts.successes == 0
    strict_sts.release()
    worker.join(5)
    assert results and results[0]["Credentials"]


def test_stop_interrupts_hung_and_delayed_requests(client_factory: Callable[..., Any]) -> None:
    with StrictSTS(issuer=ISSUER, jwks=JWKS) as server:
        client = client_factory(server.url)
        server.hang = True
        errors: list[BaseException] = []

        def call() -> None:
            try:
                assume(client, make_token())
            except Exception as exc:
                errors.append(exc)

        worker = threading.Thread(target=call)
        worker.start()
        assert server.wait_for_calls(1)
        start = time.monotonic()
    worker.join(5)
    assert time.monotonic() - start < 2
    assert len(errors) == 1
    assert error_of(errors[0]) == ("ServiceUnavailable", 503, "Receiver")


def test_stop_with_idle_keepalive_connection_is_fast(client_factory: Callable[..., Any]) -> None:
    with StrictSTS(issuer=ISSUER, jwks=JWKS) as server:
        client = client_factory(server.url)
        assert assume(client, make_token())["Credentials"]  # leaves a pooled connection open
        start = time.monotonic()
    assert time.monotonic() - start < 1


def test_unknown_action_is_not_counted(
    strict_sts: StrictSTS, client_factory: Callable[..., Any]
) -> None:
    client = client_factory(strict_sts.url)
    with pytest.raises(ClientError) as exc:
        client.get_caller_identity()
    assert error_of(exc) == ("InvalidAction", 400, "Sender")
    assert strict_sts.calls == 0


class _OIDC:
    """A tiny OIDC issuer on loopback: discovery document plus JWKS."""

    def __init__(self, cache_control: str | None = "max-age=300") -> None:
        outer = self
        self.cache_control = cache_control

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/.well-known/openid-configuration":
                    body, cc = {"issuer": outer.issuer, "jwks_uri": outer.issuer + "/jwks"}, None
                elif self.path == "/jwks":
                    body, cc = JWKS, outer.cache_control
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                if cc:
                    self.send_header("Cache-Control", cc)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.issuer = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,))

    def __enter__(self) -> _OIDC:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.thread.join()
        self.httpd.server_close()


def test_discovery_mode(strict_sts: StrictSTS, client_factory: Callable[..., Any]) -> None:
    client = client_factory(strict_sts.url)
    with _OIDC() as oidc:
        strict_sts.configure(issuer=oidc.issuer, jwks=None)
        resp = assume(client, make_token(iss=oidc.issuer))
        assert resp["Provider"].endswith(":oidc-provider/" + oidc.issuer.split("://")[1])
        assert strict_sts.jwks_fetches == 1
        assert strict_sts.jwks_cache_control == "max-age=300"

        oidc.cache_control = "no-cache, max-age=0"
        with pytest.raises(ClientError) as exc:
            assume(client, make_token(iss=oidc.issuer))
        assert error_of(exc) == ("InvalidIdentityToken", 400, "Sender")
        assert "Couldn't retrieve verification key" in exc.value.response["Error"]["Message"]
        assert strict_sts.jwks_cache_control == "no-cache, max-age=0"

    # Issuer gone: key retrieval fails the same way.
    with pytest.raises(ClientError) as exc:
        assume(client, make_token(iss=oidc.issuer))
    assert "Couldn't retrieve verification key" in exc.value.response["Error"]["Message"]


def test_non_loopback_issuer_refused(strict_sts: StrictSTS) -> None:
    with pytest.raises(ValueError, match="loopback"):
        strict_sts.configure(issuer="https://example.com")


def test_moto_accepts_any_token(moto_sts: str, client_factory: Callable[..., Any]) -> None:
    client = client_factory(moto_sts)
    resp = assume(client, "definitely.not.a-jwt")
    assert resp["Credentials"]["AccessKeyId"]
    assert resp["Credentials"]["Expiration"].tzinfo is not None
