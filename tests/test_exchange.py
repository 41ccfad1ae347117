"""The STS exchange: error classification, retries, deadline and endpoints, against StrictSTS."""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)
from botocore.utils import parse_timestamp

import stscreds
from servers.sts import StrictSTS
from stscreds import (
    CredentialBroker,
    Credentials,
    CredentialsRejected,
    SigningKey,
    StsBudget,
    STSUnavailable,
    SystemClock,
)
from stscreds._exchange import (
    NON_RECOVERABLE_CODES,
    TRANSIENT_CODES,
    ExchangeRequest,
    SecretsFilter,
    StsExchanger,
    StsPool,
    classify_error,
    parse_sts_timestamp,
    redact_secrets,
)
from stscreds._metrics import ExchangeOutcome
from stscreds._signing import TokenMinter

ROLE = "arn:aws:iam::123456789012:role/exchange-test"
ISSUER = "http://127.0.0.1:1/exchange-issuer"
KEY = SigningKey.generate("ES256", kid="exchange-key")
# A JWT-shaped string as STS might quote in a message (header.payload.signature).
JWT_LIKE = (
    "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0.eyJzdWIiOiJ1c2VyLTQyIiwiaXNzIjoiaHR0cHMifQ.c2lnbmF0dXJl"
)


def client_error(code: str | None, status: int, message: str = "boom") -> ClientError:
    error: dict[str, Any] = {"Message": message}
    if code is not None:
        error["Code"] = code
    return ClientError(
        {"Error": error, "ResponseMetadata": {"HTTPStatusCode": status}},
        "AssumeRoleWithWebIdentity",
    )


# -- classify_error ------------------------------------------------------------------------


@pytest.mark.parametrize("code", sorted(NON_RECOVERABLE_CODES))
def test_non_recoverable_codes_are_rejected(code: str) -> None:
    status = 403 if code == "AccessDenied" else 400
    error = classify_error(client_error(code, status), ROLE)
    assert type(error) is CredentialsRejected
    assert error.code == code
    assert error.role_arn == ROLE
    assert code in str(error)
    assert error.status_code == 502


def test_every_documented_non_recoverable_code_is_listed() -> None:
    assert {
        "AccessDenied",
        "IDPRejectedClaim",
        "InvalidIdentityToken",
        "MalformedPolicyDocument",
        "PackedPolicyTooLarge",
        "RegionDisabledException",
        "ExpiredTokenException",
    } <= NON_RECOVERABLE_CODES
    assert not NON_RECOVERABLE_CODES & TRANSIENT_CODES


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("Throttling", 400),  # STS throttles with HTTP 400 "Rate exceeded"
        ("IDPCommunicationError", 400),
        ("ServiceUnavailable", 503),
        ("InternalFailure", 500),
        ("SomethingNew", 500),  # any 5xx
        ("SomethingNew", 502),
        (None, 503),  # no code at all
        ("SlowDown", 429),
    ],
)
def test_transient_errors_are_unavailable(code: str | None, status: int) -> None:
    error = classify_error(client_error(code, status, "Rate exceeded"), ROLE)
    assert type(error) is STSUnavailable
    assert error.code == code
    assert error.status_code == 503


@pytest.mark.parametrize("code", ["ValidationError", "InvalidParameterValue", "Whatever"])
def test_unknown_4xx_is_rejected(code: str) -> None:
    error = classify_error(client_error(code, 400), ROLE)
    assert type(error) is CredentialsRejected
    assert error.code == code


@pytest.mark.parametrize(
    "exc",
    [
        EndpointConnectionError(endpoint_url="https://sts.us-east-1.amazonaws.com/"),
        ReadTimeoutError(endpoint_url="https://sts.us-east-1.amazonaws.com/"),
        ConnectTimeoutError(endpoint_url="https://sts.us-east-1.amazonaws.com/"),
        NoCredentialsError(),
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError(),
    ],
)
def test_transport_errors_are_unavailable(exc: BaseException) -> None:
    error = classify_error(exc, ROLE)
    assert isinstance(error, STSUnavailable) and error.reason == "Unreachable"
    assert repr(error).startswith("STSUnavailable(")
    assert error.code is None
    assert type(exc).__name__ in str(error)


def test_unexpected_errors_are_unavailable_and_say_only_the_type() -> None:
    error = classify_error(RuntimeError("secret detail AKIA... do not show"), ROLE)
    assert type(error) is STSUnavailable
    assert "RuntimeError" in str(error)
    assert "secret detail" not in str(error)


def test_already_classified_errors_pass_through() -> None:
    original = CredentialsRejected("nope", code="AccessDenied")
    assert classify_error(original) is original


@pytest.mark.parametrize("code", ["InvalidIdentityToken", "Throttling"])
def test_jwt_in_sts_message_is_redacted(code: str) -> None:
    message = f"Token {JWT_LIKE} is not valid for audience"
    error = classify_error(client_error(code, 400, message), ROLE)
    text = str(error) + repr(error) + error.message
    assert JWT_LIKE not in text
    assert JWT_LIKE.split(".")[1] not in text
    assert "<redacted>" in error.message
    assert "is not valid for audience" in error.message


def test_long_sts_message_is_capped() -> None:
    error = classify_error(client_error("ValidationError", 400, "x" * 5000), ROLE)
    assert len(error.message) <= 300


# -- StsExchanger construction -------------------------------------------------------------


@pytest.fixture
def no_endpoint_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # botocore honours AWS_ENDPOINT_URL[_STS] and AWS_STS_REGIONAL_ENDPOINTS from the env.
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_STS", "AWS_STS_REGIONAL_ENDPOINTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/stscreds-test-config")


@pytest.mark.usefixtures("no_endpoint_env")
@pytest.mark.parametrize(
    ("region", "url"),
    [
        ("eu-west-1", "https://sts.eu-west-1.amazonaws.com"),
        # Regional even in us-east-1 (not the global sts.amazonaws.com).
        ("us-east-1", "https://sts.us-east-1.amazonaws.com"),
        ("ap-southeast-2", "https://sts.ap-southeast-2.amazonaws.com"),
    ],
)
def test_regional_endpoint_by_default(region: str, url: str) -> None:
    exchanger = StsExchanger(region=region)
    try:
        assert exchanger.endpoint_url == url
        assert exchanger.region == region
    finally:
        exchanger.close()


@pytest.mark.usefixtures("no_endpoint_env")
def test_regional_endpoint_wins_over_legacy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_STS_REGIONAL_ENDPOINTS", "legacy")
    exchanger = StsExchanger(region="us-east-1")
    try:
        assert exchanger.endpoint_url == "https://sts.us-east-1.amazonaws.com"
    finally:
        exchanger.close()


def test_explicit_endpoint_url() -> None:
    exchanger = StsExchanger(region="eu-west-1", endpoint_url="http://127.0.0.1:9")
    try:
        assert exchanger.endpoint_url == "http://127.0.0.1:9"
    finally:
        exchanger.close()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"region": ""}, "region"),
        ({"region": None}, "region"),
        ({"connect_timeout": 0}, "connect_timeout"),
        ({"connect_timeout": -1.0}, "connect_timeout"),
        ({"connect_timeout": "2"}, "connect_timeout"),
        ({"read_timeout": 0}, "read_timeout"),
        ({"read_timeout": None}, "read_timeout"),
        ({"deadline": 0}, "deadline"),
        ({"deadline": -5}, "deadline"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 1.5}, "max_attempts"),
        ({"max_workers": 0}, "max_workers"),
        ({"max_workers": "8"}, "max_workers"),
    ],
)
def test_constructor_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StsExchanger(**kwargs)


def test_botocore_retries_and_default_timeouts_are_replaced() -> None:
    exchanger = StsExchanger(endpoint_url="http://127.0.0.1:9", connect_timeout=1.5, read_timeout=3)
    try:
        config = exchanger._client.meta.config
        assert config.connect_timeout == 1.5
        assert config.read_timeout == 3
        assert config.retries["total_max_attempts"] == 1
        assert exchanger.deadline == 10.0
        assert exchanger.max_attempts == 3
    finally:
        exchanger.close()


def test_the_pool_holds_64_calls_by_default() -> None:
    # 50 identities at once against a 30 ms STS: a pool of 8 sent them in seven waves.
    assert inspect.signature(StsExchanger).parameters["max_workers"].default == 64
    assert inspect.signature(CredentialBroker).parameters["max_workers"].default == 64
    exchanger = StsExchanger(endpoint_url="http://127.0.0.1:9")
    try:
        assert exchanger._client.meta.config.max_pool_connections == 64
    finally:
        exchanger.close()


def test_user_agent_is_built_once() -> None:
    exchanger = StsExchanger(endpoint_url="http://127.0.0.1:9")
    try:
        user_agent = exchanger._client.meta.config.user_agent
        assert user_agent == f"{exchanger._session.user_agent()} stscreds/{stscreds.__version__}"
    finally:
        exchanger.close()


# -- StsExchanger against StrictSTS --------------------------------------------------------


@pytest.fixture
def sts(strict_sts: StrictSTS) -> StrictSTS:
    strict_sts.configure(issuer=ISSUER, jwks={"keys": [KEY.public_jwk()]})
    return strict_sts


@pytest.fixture
def minter() -> TokenMinter:
    return TokenMinter(
        issuer=ISSUER, audience="sts.amazonaws.com", keys=[KEY], token_ttl=300, clock=SystemClock()
    )


@pytest.fixture
def make_exchanger() -> Iterator[Any]:
    made: list[StsExchanger] = []

    def make(endpoint_url: str, **kwargs: Any) -> StsExchanger:
        kwargs.setdefault("connect_timeout", 1.0)
        kwargs.setdefault("read_timeout", 2.0)
        kwargs.setdefault("retry_base_delay", 0.01)
        exchanger = StsExchanger(endpoint_url=endpoint_url, **kwargs)
        made.append(exchanger)
        return exchanger

    yield make
    for exchanger in made:
        exchanger.close()


def request(policy: str | None = None) -> ExchangeRequest:
    return ExchangeRequest(
        role_arn=ROLE, session_name="session-1", duration_seconds=900, policy=policy
    )


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_exchange_succeeds(sts: StrictSTS, minter: TokenMinter, make_exchanger: Any) -> None:
    exchanger = make_exchanger(sts.url)
    policy = '{"Version":"2012-10-17","Statement":[]}'
    credentials = await exchanger.exchange(request(policy), lambda: minter.mint("user-1"))
    assert isinstance(credentials, Credentials)
    assert sts.calls == 1
    (rec,) = sts.requests
    assert rec.status == 200
    assert rec.credentials is not None
    assert credentials.access_key_id == rec.credentials["AccessKeyId"]
    assert credentials.secret_access_key == rec.credentials["SecretAccessKey"]
    assert credentials.session_token == rec.credentials["SessionToken"]
    assert 850 < credentials.seconds_left(time.time()) <= 900
    assert rec.session_name == "session-1"
    assert rec.duration == 900
    assert rec.policy == policy
    assert rec.claims is not None and rec.claims["sub"] == "user-1"


async def test_exchange_without_policy_sends_none(
    sts: StrictSTS, minter: TokenMinter, make_exchanger: Any
) -> None:
    exchanger = make_exchanger(sts.url)
    await exchanger.exchange(request(), lambda: minter.mint("user-1"))
    (rec,) = sts.requests
    assert "Policy" not in rec.params


async def test_exchange_request_repr_has_no_token() -> None:
    token = "eyJsecret.token.value"
    req = request()
    assert token not in repr(req)
    assert req.params(token)["WebIdentityToken"] == token


async def test_mint_and_call_run_on_the_sts_pool(
    sts: StrictSTS, minter: TokenMinter, make_exchanger: Any
) -> None:
    threads: list[str] = []

    def mint() -> str:
        threads.append(threading.current_thread().name)
        return minter.mint("user-1")

    await make_exchanger(sts.url).exchange(request(), mint)
    assert threads and threads[0].startswith("stscreds-sts")


async def test_connection_refused_is_unavailable_quickly(
    minter: TokenMinter, make_exchanger: Any
) -> None:
    exchanger = make_exchanger(f"http://127.0.0.1:{closed_port()}", max_attempts=3)
    started = time.monotonic()
    with pytest.raises(STSUnavailable, match="unreachable") as info:
        await exchanger.exchange(request(), lambda: minter.mint("user-1"))
    assert info.value.code is None
    # Three refused connects plus two short backoffs: well under a second.
    assert time.monotonic() - started < 2.0


async def test_retries_are_bounded_by_max_attempts(
    sts: StrictSTS, minter: TokenMinter, make_exchanger: Any
) -> None:
    sts.fail_next(5, "Throttling", 400, "Rate exceeded")
    exchanger = make_exchanger(sts.url, max_attempts=3)
    with pytest.raises(STSUnavailable) as info:
        await exchanger.exchange(request(), lambda: minter.mint("user-1"))
    assert info.value.code == "Throttling"
    assert sts.calls == 3
    assert [r.error_code for r in sts.requests] == ["Throttling"] * 3


async def test_transient_error_then_success(
    sts: StrictSTS, minter: TokenMinter, make_exchanger: Any
) -> None:
    sts.fail_next(2, "IDPCommunicationError", 400, "could not reach IdP")
    exchanger = make_exchanger(sts.url, max_attempts=3)
    credentials = await exchanger.exchange(request(), lambda: minter.mint("user-1"))
    assert sts.calls == 3
    assert sts.successes == 1
    assert credentials.access_key_id == sts.requests[-1].credentials["AccessKeyId"]  # type: ignore[index]


async def test_non_recoverable_error_is_not_retried(
    sts: StrictSTS, minter: TokenMinter, make_exchanger: Any
) -> None:
    sts.reject_roles.add(ROLE)
    exchanger = make_exchanger(sts.url, max_attempts=5)
    with pytest.raises(CredentialsRejected) as info:
        await exchanger.exchange(request(), lambda: minter.mint("user-1"))
    assert info.value.code == "AccessDenied"
    assert sts.calls == 1


async def test_invalid_token_is_rejected_and_token_not_in_message(
    sts: StrictSTS, make_exchanger: Any
) -> None:
    other = SigningKey.generate("ES256", kid="exchange-key")  # same kid, wrong key
    bad_minter = TokenMinter(
        issuer=ISSUER,
        audience="sts.amazonaws.com",
        keys=[other],
        token_ttl=300,
        clock=SystemClock(),
    )
    tokens: list[str] = []

    def mint() -> str:
        tokens.append(bad_minter.mint("user-1"))
        return tokens[-1]

    exchanger = make_exchanger(sts.url)
    with pytest.raises(CredentialsRejected) as info:
        await exchanger.exchange(request(), mint)
    assert info.value.code == "InvalidIdentityToken"
    assert sts.calls == 1
    for part in tokens[0].split("."):
        assert part not in str(info.value)


async def test_sts_error_message_quoting_the_token_is_redacted(
    sts: StrictSTS, minter: TokenMinter, make_exchanger: Any
) -> None:
    token = minter.mint("user-1")
    sts.fail_next(1, "IDPRejectedClaim", 400, f"Claim rejected in token {token}")
    exchanger = make_exchanger(sts.url)
    with pytest.raises(CredentialsRejected) as info:
        await exchanger.exchange(request(), lambda: token)
    text = str(info.value) + repr(info.value)
    assert "Claim rejected in token" in text
    for part in token.split("."):
        assert part not in text


async def test_deadline_bounds_retries(
    sts: StrictSTS, minter: TokenMinter, make_exchanger: Any
) -> None:
    # A backoff that would cross the deadline is not slept: the error is raised at once.
    sts.fail_always("ServiceUnavailable", 503)
    exchanger = make_exchanger(sts.url, deadline=0.3, max_attempts=10, retry_base_delay=1.0)
    started = time.monotonic()
    with pytest.raises(STSUnavailable) as info:
        await exchanger.exchange(request(), lambda: minter.mint("user-1"))
    assert time.monotonic() - started < 1.0
    assert info.value.code == "ServiceUnavailable"
    assert sts.calls == 1


async def test_slow_sts_hits_the_deadline_without_blocking_the_loop(
    sts: StrictSTS, minter: TokenMinter, make_exchanger: Any
) -> None:
    sts.delay = 3.0
    exchanger = make_exchanger(sts.url, deadline=0.5, read_timeout=2.0, max_attempts=3)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    started = time.monotonic()
    try:
        with pytest.raises(STSUnavailable, match=r"did not answer within 0\.5s"):
            await exchanger.exchange(request(), lambda: minter.mint("user-1"))
    finally:
        task.cancel()
    elapsed = time.monotonic() - started
    assert elapsed < 0.5 + 1.0
    assert ticks >= 10  # the loop kept running while botocore blocked a pool thread


async def test_answer_without_credentials_is_unavailable() -> None:
    from stscreds._exchange import _credentials_from

    with pytest.raises(STSUnavailable, match="without usable credentials"):
        _credentials_from({"AssumedRoleUser": {}})
    with pytest.raises(STSUnavailable):
        _credentials_from({"Credentials": {"AccessKeyId": "A", "SecretAccessKey": "S"}})


async def test_deadline_covers_waiting_for_a_pool_thread(
    sts: StrictSTS, minter: TokenMinter, make_exchanger: Any
) -> None:
    # A stalled STS fills the pool with calls blocked until read_timeout. An exchange that
    # arrives then must still fail within its deadline, not queue its token minting behind
    # the blocked calls with no bound (the original production problem: requests hanging
    # on a stalled STS). One worker makes the backlog easy to build.
    sts.hang = True
    exchanger = make_exchanger(sts.url, max_workers=1, deadline=0.5, read_timeout=3.0)
    try:
        started = time.monotonic()
        with pytest.raises(STSUnavailable):
            await exchanger.exchange(request(), lambda: minter.mint("user-1"))
        assert time.monotonic() - started < 0.5 + 1.0
        # The pool's only thread is still blocked in the first call's read.
        started = time.monotonic()
        with pytest.raises(STSUnavailable):
            await exchanger.exchange(request(), lambda: minter.mint("user-2"))
        assert time.monotonic() - started < 0.5 + 1.0
    finally:
        sts.release()


async def test_user_agent_header_is_sent(
    sts: StrictSTS, minter: TokenMinter, make_exchanger: Any
) -> None:
    exchanger = make_exchanger(sts.url)
    sent: list[str] = []

    def record(request: Any, **kwargs: Any) -> None:
        value = request.headers["User-Agent"]  # bytes once the request is prepared
        sent.append(value.decode() if isinstance(value, bytes) else value)

    exchanger._client.meta.events.register("before-send.sts.AssumeRoleWithWebIdentity", record)
    await exchanger.exchange(request(), lambda: minter.mint("user-1"))
    assert sent == [exchanger._client.meta.config.user_agent]
    assert f"stscreds/{stscreds.__version__}" in sent[0]


# -- the pool: one job per attempt, threads started at first use, the gate -----------------


async def test_mint_and_call_run_in_one_pool_job(
    sts: StrictSTS, minter: TokenMinter, make_exchanger: Any
) -> None:
    exchanger = make_exchanger(sts.url)
    minted: list[str] = []
    sent: list[str] = []

    def mint() -> str:
        minted.append(threading.current_thread().name)
        return minter.mint("user-1")

    def record(**kwargs: Any) -> None:
        sent.append(threading.current_thread().name)

    exchanger._client.meta.events.register("before-send.sts.AssumeRoleWithWebIdentity", record)
    await exchanger.exchange(request(), mint)
    assert len(minted) == 1 and minted == sent


async def test_retries_send_the_token_minted_once(
    sts: StrictSTS, minter: TokenMinter, make_exchanger: Any
) -> None:
    sts.fail_next(2, "IDPCommunicationError", 400, "could not reach IdP")
    exchanger = make_exchanger(sts.url, max_attempts=3)
    tokens: list[str] = []

    def mint() -> str:
        tokens.append(minter.mint("user-1"))
        return tokens[-1]

    await exchanger.exchange(request(), mint)
    assert len(tokens) == 1
    assert [r.params["WebIdentityToken"] for r in sts.requests] == tokens * 3


async def test_a_failing_mint_raises_as_it_came_and_is_not_retried(
    sts: StrictSTS, make_exchanger: Any
) -> None:
    exchanger = make_exchanger(sts.url, max_attempts=3)
    calls = 0

    def mint() -> str:
        nonlocal calls
        calls += 1
        raise ValueError("no key")

    outcome = ExchangeOutcome()
    with pytest.raises(ValueError, match="no key"):
        await exchanger.exchange(request(), mint, outcome=outcome)
    assert calls == 1 and outcome.attempts == 0
    assert sts.calls == 0
    assert not exchanger._gate._lock.locked()


async def all_threads_started(pool: StsPool) -> set[threading.Thread]:
    """The pool's threads once its first thread has started all of them."""
    deadline = time.monotonic() + 5.0
    while not (len(pool._threads) == pool.max_workers and all(t.ident for t in pool._threads)):
        assert time.monotonic() < deadline, "the pool's threads were not all started"
        await asyncio.sleep(0.005)
    return set(pool._threads)


async def test_pool_threads_start_at_first_use_from_the_pool_itself(
    sts: StrictSTS, minter: TokenMinter, make_exchanger: Any
) -> None:
    exchanger = make_exchanger(sts.url, max_workers=5)
    pool = exchanger._pool
    assert pool._threads == []  # none at construction (a --preload master forks later)
    starts: list[str] = []
    start = threading.Thread.start

    def recording_start(thread: threading.Thread) -> None:
        if thread.name.startswith("stscreds-sts"):  # not the STS server's own threads
            starts.append(threading.current_thread().name)
        start(thread)

    threading.Thread.start = recording_start  # type: ignore[method-assign]
    try:
        await exchanger.exchange(request(), lambda: minter.mint("user-1"))
        threads = await all_threads_started(pool)
    finally:
        threading.Thread.start = start  # type: ignore[method-assign]
    assert sorted(t.name for t in threads) == [f"stscreds-sts_{i}" for i in range(5)]
    assert all(t.daemon for t in threads)
    # The event loop started the first thread; that one started the other four.
    assert starts == [threading.current_thread().name] + ["stscreds-sts_0"] * 4
    # A burst larger than the pool starts no more.
    await asyncio.gather(
        *(exchanger.exchange(request(), lambda: minter.mint("u")) for _ in range(12))
    )
    assert set(pool._threads) == threads
    assert sts.successes == 13


async def test_pool_runs_jobs_skips_cancelled_ones_and_shuts_down() -> None:
    pool = StsPool(2)
    release = threading.Event()
    busy = [pool.submit(release.wait) for _ in range(2)]
    queued = pool.submit(lambda: "ran")
    cancelled = pool.submit(lambda: "must not run")
    assert cancelled.cancel()
    failing = pool.submit(int, "not a number")
    release.set()
    assert [f.result(5) for f in busy] == [True, True]
    assert queued.result(5) == "ran"
    with pytest.raises(ValueError):
        failing.result(5)
    assert cancelled.cancelled()
    threads = list(pool._threads)
    pool.shutdown(wait=True)
    assert not any(t.is_alive() for t in threads)
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(print)


async def test_pool_shutdown_cancels_queued_jobs_without_waiting() -> None:
    pool = StsPool(1)
    release = threading.Event()
    running = pool.submit(release.wait)
    queued = [pool.submit(lambda: None) for _ in range(3)]
    started = time.monotonic()
    pool.shutdown(wait=False, cancel_futures=True)
    assert time.monotonic() - started < 0.5  # the running job is not waited for
    assert all(f.cancelled() for f in queued)
    release.set()
    assert running.result(5) is True
    pool._threads[0].join(5)
    assert not pool._threads[0].is_alive()


async def test_calls_overlap_on_the_wire_while_one_thread_at_a_time_runs_python(
    sts: StrictSTS, minter: TokenMinter, make_exchanger: Any
) -> None:
    exchanger = make_exchanger(sts.url, max_workers=8)
    lock = threading.Lock()
    inside = {"mint": 0, "parse": 0}
    most = {"mint": 0, "parse": 0}

    def enter(phase: str) -> None:
        with lock:
            inside[phase] += 1
            most[phase] = max(most[phase], inside[phase])
        time.sleep(0.002)  # lets the GIL go: a thread not behind the gate would come in now
        with lock:
            inside[phase] -= 1

    def mint() -> str:
        enter("mint")
        return minter.mint("user-1")

    # Registered after the gate's own handler: runs where the answer is parsed, in the gate.
    exchanger._client.meta.events.register(
        "before-parse.sts.AssumeRoleWithWebIdentity", lambda **kwargs: enter("parse")
    )
    sts.hang = True
    tasks = [asyncio.ensure_future(exchanger.exchange(request(), mint)) for _ in range(8)]
    try:
        # All eight calls wait on STS at once: the gate is left while a call is on the wire.
        assert await asyncio.to_thread(sts.wait_for_calls, 8, 5.0)
    finally:
        sts.release()
    results = await asyncio.gather(*tasks)
    assert len(results) == 8 and sts.successes == 8
    # Eight answers arrived together; minting and parsing still went one thread at a time.
    assert most == {"mint": 1, "parse": 1}
    assert not exchanger._gate._lock.locked()


async def test_the_gate_is_left_whatever_the_outcome(
    sts: StrictSTS, minter: TokenMinter, make_exchanger: Any
) -> None:
    exchanger = make_exchanger(sts.url, max_workers=2, max_attempts=1)
    mint = lambda: minter.mint("user-1")  # noqa: E731
    sts.fail_next(1, "AccessDenied", 403, "no")  # an STS error answer
    with pytest.raises(CredentialsRejected):
        await exchanger.exchange(request(), mint)
    assert not exchanger._gate._lock.locked()
    sts.respond_raw(b"<not-sts/>")  # an answer botocore cannot parse
    with pytest.raises(STSUnavailable):
        await exchanger.exchange(request(), mint)
    assert not exchanger._gate._lock.locked()
    # The budget holding the call back (on the thread, inside the gate).
    budget = StsBudget(burst=1, initial_rate=0.5, min_rate=0.5, clock=lambda: 0.0)
    budget.throttled()
    budget.acquire()
    exchanger.budget = budget
    with pytest.raises(STSUnavailable, match="holding calls back"):
        await exchanger.exchange(request(), mint)
    assert not exchanger._gate._lock.locked()
    exchanger.budget = None
    assert isinstance(await exchanger.exchange(request(), mint), Credentials)
    # Refused connections: the call failed on the wire, after the gate was left.
    refused = make_exchanger(f"http://127.0.0.1:{closed_port()}", max_attempts=1)
    with pytest.raises(STSUnavailable, match="unreachable"):
        await refused.exchange(request(), mint)
    assert not refused._gate._lock.locked()


async def test_a_call_hung_on_the_wire_leaves_the_gate(
    sts: StrictSTS, minter: TokenMinter, make_exchanger: Any
) -> None:
    sts.hang = True
    exchanger = make_exchanger(sts.url, max_workers=2, deadline=0.3, read_timeout=3.0)
    minted: list[str] = []

    def mint() -> str:
        minted.append("x")
        return minter.mint("user-1")

    try:
        with pytest.raises(STSUnavailable, match="did not answer"):
            await exchanger.exchange(request(), mint)
        # The first thread is still blocked in its read; the second one signs and sends.
        with pytest.raises(STSUnavailable, match="did not answer"):
            await exchanger.exchange(request(), mint)
        assert len(minted) == 2
        assert await asyncio.to_thread(sts.wait_for_calls, 2, 5.0)
    finally:
        sts.release()


# -- timestamps of STS answers -------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "2030-01-01T00:00:00Z",
        "2030-06-30T23:59:59Z",
        "2030-01-01T00:00:00.123Z",
        "2030-01-01T00:00:00.123456Z",
        "2030-01-01T00:00:00.1234567Z",  # not fromisoformat's: botocore's parser
        "2030-01-01T00:00:00+02:00",
        "2030-01-01T00:00:00",
        "1893456000",
    ],
)
def test_sts_timestamps_read_as_botocore_reads_them(text: str) -> None:
    expected = parse_timestamp(text)
    parsed = parse_sts_timestamp(text)
    assert parsed == expected
    assert (parsed.utcoffset() is None) == (expected.utcoffset() is None)


def test_sts_timestamp_fast_path_is_utc() -> None:
    parsed = parse_sts_timestamp("2030-01-01T12:30:00Z")
    assert parsed == datetime(2030, 1, 1, 12, 30, tzinfo=timezone.utc)
    assert parsed.tzinfo is timezone.utc


def test_unreadable_sts_timestamp_raises() -> None:
    with pytest.raises(ValueError):
        parse_sts_timestamp("garbage")
    with pytest.raises(ValueError):
        parse_sts_timestamp("2030-13-01T00:00:00Z")


# -- secrets in botocore's DEBUG logs -------------------------------------------------------


RESPONSE_BODY = (
    b"<AssumeRoleWithWebIdentityResponse><AssumeRoleWithWebIdentityResult><Credentials>"
    b"<AccessKeyId>ASIAEXAMPLE</AccessKeyId><SecretAccessKey>wJalr/K7MDENG+bPx</SecretAccessKey>"
    b"<SessionToken>FwoGZXIvYXdz+long/token==</SessionToken></Credentials>"
    b"<SubjectFromWebIdentityToken>user-1</SubjectFromWebIdentityToken>"
    b"</AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>"
)


@pytest.mark.parametrize(
    ("message", "args", "secrets", "kept"),
    [
        # botocore.parsers: "Response body:\n%r" of the raw bytes.
        (
            "Response body:\n%r",
            (RESPONSE_BODY,),
            ["wJalr/K7MDENG+bPx", "FwoGZXIvYXdz+long/token=="],
            ["ASIAEXAMPLE", "<SubjectFromWebIdentityToken>user-1<"],
        ),
        # botocore.endpoint: the request dict, with a form-encoded body or a dict body.
        (
            "Making request with params: %r",
            ({"body": f"Action=AssumeRoleWithWebIdentity&WebIdentityToken={JWT_LIKE}&X=1"},),
            [JWT_LIKE, JWT_LIKE.split(".")[1]],
            ["Action=AssumeRoleWithWebIdentity", "X=1"],
        ),
        (
            "Making request with params: %r",
            ({"body": {"WebIdentityToken": "not-a-jwt-but-secret", "RoleArn": ROLE}},),
            ["not-a-jwt-but-secret"],
            [ROLE],
        ),
        # An error body quoting the token.
        (
            "Response body:\n%r",
            (f"<Message>Bad token {JWT_LIKE}</Message>".encode(),),
            [JWT_LIKE.split(".")[1]],
            ["Bad token"],
        ),
    ],
)
def test_secrets_filter_redacts_bodies(
    message: str, args: tuple[Any, ...], secrets: list[str], kept: list[str]
) -> None:
    record = logging.LogRecord("botocore.parsers", logging.DEBUG, __file__, 1, message, args, None)
    assert SecretsFilter().filter(record) is True
    text = record.getMessage()
    assert [s for s in secrets if s in text] == []
    assert all(k in text for k in kept)
    assert "<redacted>" in text


def test_secrets_filter_leaves_other_records_alone() -> None:
    args = ({"url": "http://127.0.0.1"}, 2)
    record = logging.LogRecord("botocore.endpoint", logging.DEBUG, __file__, 1, "%r %d", args, None)
    assert SecretsFilter().filter(record) is True
    assert record.args is args and record.msg == "%r %d"


def test_secrets_filter_is_installed_once_on_the_body_loggers() -> None:
    StsExchanger(endpoint_url="http://127.0.0.1:9").close()
    StsExchanger(endpoint_url="http://127.0.0.1:9").close()
    for name in ("botocore.endpoint", "botocore.parsers"):
        filters = [f for f in logging.getLogger(name).filters if isinstance(f, SecretsFilter)]
        assert len(filters) == 1


def test_redact_secrets_keeps_plain_text() -> None:
    assert redact_secrets("nothing secret here") == "nothing secret here"


# -- fork ----------------------------------------------------------------------------------


async def test_reset_after_fork_leaves_the_old_client_alone_and_makes_a_new_one(
    sts: StrictSTS, minter: TokenMinter, make_exchanger: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    exchanger = make_exchanger(sts.url)
    await exchanger.exchange(request(), lambda: minter.mint("user-1"))
    old_client, old_pool, old_gate = exchanger._client, exchanger._pool, exchanger._gate

    def close_forbidden() -> None:
        raise AssertionError("closing the client in the at-fork hook takes urllib3 locks")

    # The at-fork hook must not touch the client: in a child, urllib3's pool lock may be held
    # by a parent thread that does not exist there.
    monkeypatch.setattr(old_client, "close", close_forbidden)
    exchanger.reset_after_fork()
    assert exchanger._client is None
    assert exchanger._pool is not old_pool

    assert exchanger._pool._threads == []  # started at the child's first use
    assert exchanger._gate is not old_gate  # a parent's thread may have held the old one

    credentials = await exchanger.exchange(request(), lambda: minter.mint("user-2"))
    assert isinstance(credentials, Credentials)
    assert len(await all_threads_started(exchanger._pool)) == old_pool.max_workers
    assert exchanger._client is not None and exchanger._client is not old_client
    assert exchanger._client.meta.endpoint_url == exchanger.endpoint_url == sts.url
    assert exchanger._client.meta.config.retries["total_max_attempts"] == 1
    assert sts.calls == 2
    monkeypatch.undo()


async def test_one_new_client_for_concurrent_calls_after_fork(
    sts: StrictSTS, minter: TokenMinter, make_exchanger: Any
) -> None:
    exchanger = make_exchanger(sts.url, max_workers=8)
    exchanger.reset_after_fork()
    made: list[Any] = []
    new_client = exchanger._new_client

    def counting() -> Any:
        made.append(new_client())
        return made[-1]

    exchanger._new_client = counting
    sts.delay = 0.05
    results = await asyncio.gather(
        *(exchanger.exchange(request(), lambda: minter.mint("u")) for _ in range(8))
    )
    assert len(results) == 8 and sts.calls == 8
    assert len(made) == 1


@pytest.mark.parametrize(
    "text",
    [
        "headers={'X-Amz-Security-Token': b'IQoJb3JpZ2luX2Vj/+=SECRET', 'Host': 'x'}",
        "x-amz-date:20261129T000000Z\nx-amz-security-token:IQoJb3JpZ2luX2Vj/+=SECRET\n",
        "https://b.s3.amazonaws.com/k?X-Amz-Security-Token=IQoJb3JpZ2luX2Vj%2FSECRET&X-Amz-Date=1",
        '{"x-amz-security-token": "IQoJb3JpZ2luX2Vj/+=SECRET"}',
    ],
    ids=["header-repr", "canonical-request", "presigned-query", "json"],
)
def test_redact_secrets_cuts_the_session_token_header(text: str) -> None:
    redacted = redact_secrets(text)
    assert "SECRET" not in redacted
    assert "IQoJ" not in redacted
    assert "<redacted>" in redacted


@pytest.mark.parametrize(
    ("endpoint", "warned"),
    [
        ("http://sts.internal.example:8080", True),
        ("http://10.0.0.5", True),
        ("https://sts.internal.example", False),
        ("http://127.0.0.1:5000", False),
        ("http://localhost:5000", False),
        ("http://[::1]:5000", False),
        (None, False),  # the regional AWS endpoint, https
    ],
)
def test_an_sts_endpoint_in_clear_off_loopback_is_warned_about(
    caplog: pytest.LogCaptureFixture, endpoint: str | None, warned: bool
) -> None:
    caplog.set_level(logging.WARNING, logger="stscreds")
    exchanger = StsExchanger(endpoint_url=endpoint)
    try:
        messages = [r.getMessage() for r in caplog.records if "is not https" in r.getMessage()]
        assert len(messages) == int(warned)
        if warned:
            assert messages[0].startswith(f"sts_endpoint_url {exchanger.endpoint_url} is not https")
    finally:
        exchanger.close()
