"""Tests for stscreds.aws: clients, sessions and refreshable credentials, against moto's S3 on
loopback (and a StrictSTS on a FakeClock for the refreshes)."""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import Any

import boto3
import botocore.session
import pytest
from botocore.config import Config
from botocore.credentials import CredentialProvider, CredentialResolver, RefreshableCredentials

from servers.clock import FakeClock
from servers.sts import StrictSTS
from stscreds import CredentialBroker, Credentials, Role, SigningKey, STSUnavailable
from stscreds.aws import (
    DEFAULT_CONFIG,
    BrokerCredentials,
    boto3_session,
    client,
    refreshable,
    refreshable_session,
)

EXPIRATION = datetime.now(timezone.utc) + timedelta(hours=2)


def make_credentials(access_key_id: str = "ASIAEXAMPLE0000001") -> Credentials:
    return Credentials(
        access_key_id=access_key_id,
        secret_access_key="secret-" + access_key_id,
        session_token="token-" + access_key_id,
        expiration=EXPIRATION,
    )


@pytest.fixture
def isolated_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Conflicting environment credentials and empty config: only the Credentials may count."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAENVIRONMENTVALUE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "environment-secret")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def bucket(moto_sts: str) -> Iterator[str]:
    """A bucket with two objects in moto's S3 (moto accepts any credentials)."""
    name = f"bucket-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client(
        "s3",
        endpoint_url=moto_sts,
        region_name="us-east-1",
        aws_access_key_id="AKIASETUP",
        aws_secret_access_key="setup",
    )
    s3.create_bucket(Bucket=name)
    s3.put_object(Bucket=name, Key="a.txt", Body=b"a")
    s3.put_object(Bucket=name, Key="b.txt", Body=b"b")
    yield name
    s3.close()


@pytest.mark.usefixtures("isolated_aws_env")
def test_client_lists_objects_with_the_given_credentials(moto_sts: str, bucket: str) -> None:
    credentials = make_credentials()
    s3 = client(credentials, "s3", region="us-east-1", endpoint_url=moto_sts)
    listed = s3.list_objects_v2(Bucket=bucket)
    assert [o["Key"] for o in listed["Contents"]] == ["a.txt", "b.txt"]
    signed_with = s3._request_signer._credentials
    assert signed_with.access_key == credentials.access_key_id
    assert signed_with.token == credentials.session_token


def test_client_is_reused_for_equal_arguments_only(moto_sts: str) -> None:
    credentials = make_credentials("ASIAREUSE000000001")
    first = client(credentials, "s3", region="us-east-1", endpoint_url=moto_sts)
    assert client(credentials, "s3", region="us-east-1", endpoint_url=moto_sts) is first
    assert (
        client(
            make_credentials("ASIAREUSE000000001"), "s3", region="us-east-1", endpoint_url=moto_sts
        )
        is first
    )  # equal credentials, another object
    assert (
        client(
            make_credentials("ASIAREUSE000000002"), "s3", region="us-east-1", endpoint_url=moto_sts
        )
        is not first
    )
    assert client(credentials, "s3", region="eu-west-1", endpoint_url=moto_sts) is not first
    assert client(credentials, "sqs", region="us-east-1") is not first
    # Extra create_client arguments are not part of the key: never reused.
    assert client(credentials, "s3", region="us-east-1", use_ssl=False) is not client(
        credentials, "s3", region="us-east-1", use_ssl=False
    )


def test_client_has_short_timeouts_and_merges_a_given_config() -> None:
    credentials = make_credentials("ASIACONFIG00000001")
    default = client(credentials, "s3", region="us-east-1")
    assert default.meta.config.connect_timeout == DEFAULT_CONFIG.connect_timeout == 2
    assert default.meta.config.read_timeout == 10
    custom = client(
        credentials, "s3", region="us-east-1", config=Config(read_timeout=30, s3={"x": 1})
    )
    assert custom.meta.config.read_timeout == 30
    assert custom.meta.config.connect_timeout == 2


def test_client_from_many_threads_at_once(moto_sts: str, bucket: str) -> None:
    """botocore sessions are not thread-safe; client() must be."""
    errors: list[BaseException] = []
    keys: list[list[str]] = []
    start = threading.Barrier(16)

    def work(i: int) -> None:
        try:
            start.wait()
            s3 = client(
                make_credentials(f"ASIATHREAD{i:08d}"),
                "s3",
                region="us-east-1",
                endpoint_url=moto_sts,
            )
            keys.append([o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]])
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert keys == [["a.txt", "b.txt"]] * 16


def test_client_refuses_anything_but_credentials() -> None:
    with pytest.raises(TypeError, match="Credentials"):
        client({"aws_access_key_id": "x"}, "s3")  # type: ignore[arg-type]


@pytest.mark.usefixtures("isolated_aws_env")
def test_boto3_session_lists_objects(moto_sts: str, bucket: str) -> None:
    credentials = make_credentials("ASIASESSION0000001")
    session = boto3_session(credentials, region="eu-west-1")
    assert session.region_name == "eu-west-1"
    frozen = session.get_credentials().get_frozen_credentials()
    assert frozen.access_key == credentials.access_key_id
    assert frozen.token == credentials.session_token
    s3 = session.client("s3", endpoint_url=moto_sts)
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["a.txt", "b.txt"]


def test_boto3_session_without_boto3_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # makes `import boto3` fail
    with pytest.raises(ImportError, match="pip install boto3"):
        boto3_session(make_credentials())


# -- refreshable(): a client made once, refreshed through the broker ------------------------

ROLE = Role("arn:aws:iam::123456789012:role/app/long-lived")
ISSUER = "http://127.0.0.1:1/aws-issuer"
KEY = SigningKey.generate("ES256")
T0 = 1_800_000_000.0
#: A 15 minute grant: inside botocore's own 15 min advisory window from the start.
GRANT = 900


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def broker(strict_sts: StrictSTS, clock: FakeClock) -> Iterator[CredentialBroker]:
    """A broker and its StrictSTS on one FakeClock; STS grants 15 minutes."""
    strict_sts.clock = clock.time
    strict_sts.grant_seconds = GRANT
    broker = CredentialBroker(
        issuer=ISSUER,
        signing_keys=[KEY],
        sts_endpoint_url=strict_sts.url,
        clock=clock,
        exchange_deadline=5.0,
        max_attempts=1,
    )
    strict_sts.configure(issuer=broker.issuer, jwks=broker.jwks)
    yield broker
    broker.close()


def issued(sts: StrictSTS) -> list[tuple[str, float]]:
    """(access key id, expiration) of every credentials STS issued, in order."""
    return [
        (r.credentials["AccessKeyId"], r.expiration)
        for r in sts.requests
        if r.credentials is not None and r.expiration is not None
    ]


def settle(broker: CredentialBroker) -> None:
    """Wait, on the broker's loop, for its background refreshes; the clock does not move."""
    while tasks := list(broker._inflight.values()):
        loop = tasks[0].get_loop()
        asyncio.run_coroutine_threadsafe(asyncio.wait(tasks), loop).result(10)


def record_signing_keys(s3: Any) -> list[str]:
    """The access key id of every request ``s3`` sends, read from its Authorization header."""
    keys: list[str] = []

    def record(request: Any, **_: Any) -> None:
        authorization = request.headers["Authorization"]
        if isinstance(authorization, bytes):
            authorization = authorization.decode()
        match = re.search(r"Credential=([^/]+)/", authorization)
        assert match is not None, authorization
        keys.append(match.group(1))

    s3.meta.events.register("before-send.s3", record)
    return keys


def count_asks(credentials: BrokerCredentials) -> list[int]:
    """Counts botocore's calls of the refresh function (each one asks the broker)."""
    asked = [0]
    refresh_using = credentials._refresh_using

    def counted() -> Any:
        asked[0] += 1
        return refresh_using()

    credentials._refresh_using = counted
    return asked


@pytest.mark.usefixtures("isolated_aws_env")
def test_a_client_made_once_lasts_three_lifetimes_with_one_sts_call_each(
    broker: CredentialBroker, strict_sts: StrictSTS, clock: FakeClock, moto_sts: str, bucket: str
) -> None:
    session = refreshable_session(broker, ROLE, region="us-east-1")
    credentials = session.get_credentials()
    assert isinstance(credentials, BrokerCredentials)
    assert isinstance(credentials, RefreshableCredentials)
    assert credentials.method == "stscreds"
    asks = count_asks(credentials)
    s3 = session.create_client("s3", endpoint_url=moto_sts)
    signed = record_signing_keys(s3)
    assert strict_sts.calls == 0  # nothing is fetched before the first request
    try:
        # Every 30 s for 29.5 minutes: refresh-ahead at 600-675 s of each 900 s grant.
        for _ in range(60):
            before = issued(strict_sts)
            listed = s3.list_objects_v2(Bucket=bucket)
            assert [o["Key"] for o in listed["Contents"]] == ["a.txt", "b.txt"]
            after = issued(strict_sts)
            # Signed with the broker's current credentials: the newest STS issued before
            # the request (a refresh it started finishes in the background)...
            expected = before[-1] if before else after[0]
            assert signed[-1] == expected[0]
            # ...which never got into their last minute: the refresh came ahead of that.
            assert expected[1] - clock.time() > 60
            settle(broker)
            clock.advance(30)
    finally:
        s3.close()
        credentials.close()
    assert strict_sts.calls == strict_sts.successes == 3
    keys = [key for key, _ in issued(strict_sts)]
    assert list(dict.fromkeys(signed)) == keys
    # No refresh storm inside botocore either, though a 15 min grant is always inside its
    # default 15 min advisory window: botocore asked the broker 5 times for 60 requests
    # (the first request, then twice per refresh: the one that started it in the
    # background, and the first one after, which got the new credentials).
    assert asks[0] == 5


@pytest.mark.usefixtures("isolated_aws_env")
def test_eight_threads_share_one_boto3_client_and_one_sts_call_per_lifetime(
    broker: CredentialBroker, strict_sts: StrictSTS, clock: FakeClock, moto_sts: str, bucket: str
) -> None:
    botocore_session = refreshable_session(broker, ROLE)
    credentials = botocore_session.get_credentials()
    s3 = boto3.Session(botocore_session=botocore_session, region_name="us-east-1").client(
        "s3", endpoint_url=moto_sts
    )
    signed = record_signing_keys(s3)

    def burst(pool: ThreadPoolExecutor) -> set[str]:
        """Eight requests at once, one per thread; the keys they were signed with."""
        start = threading.Barrier(8)
        first = len(signed)

        def one() -> list[str]:
            start.wait(10)
            return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]

        assert [f.result(30) for f in [pool.submit(one) for _ in range(8)]] == [
            ["a.txt", "b.txt"]
        ] * 8
        settle(broker)
        return set(signed[first:])

    try:
        with ThreadPoolExecutor(8) as pool:
            # Cold: eight threads, one exchange.
            assert burst(pool) == {issued(strict_sts)[0][0]}
            assert strict_sts.calls == 1
            first_expiry = issued(strict_sts)[0][1]
            # 30 s left (the mandatory window): all wait for the one new exchange.
            clock.set(first_expiry - 30)
            assert burst(pool) == {issued(strict_sts)[1][0]}
            assert strict_sts.calls == 2
            # Past the refresh-ahead point: all still signed with the current credentials,
            # and one background exchange...
            second_expiry = issued(strict_sts)[1][1]
            clock.set(second_expiry - 200)
            assert burst(pool) == {issued(strict_sts)[1][0]}
            assert strict_sts.calls == 3
            # ...whose credentials the next burst uses, with no further call.
            clock.advance(5)
            assert burst(pool) == {issued(strict_sts)[2][0]}
            clock.advance(300)
            assert burst(pool) == {issued(strict_sts)[2][0]}
    finally:
        s3.close()
        credentials.close()
    assert strict_sts.calls == strict_sts.successes == 3


@pytest.mark.usefixtures("isolated_aws_env")
async def test_on_the_brokers_own_loop_a_due_refresh_raises_instead_of_deadlocking(
    broker: CredentialBroker, strict_sts: StrictSTS, clock: FakeClock, moto_sts: str, bucket: str
) -> None:
    # The broker serves this test's loop (as under an ASGI app): refreshes from threads go here.
    credentials = refreshable(broker, ROLE, loop=asyncio.get_running_loop())
    session = botocore.session.get_session()
    session.register_component(
        "credential_provider", CredentialResolver([_StaticProvider(credentials)])
    )
    s3 = session.create_client("s3", region_name="us-east-1", endpoint_url=moto_sts)
    signed = record_signing_keys(s3)
    try:
        # A blocking call on the loop the refresh needs: nothing cached, a clear error at once.
        with pytest.raises(RuntimeError, match=r"would deadlock.*asyncio\.to_thread"):
            s3.list_objects_v2(Bucket=bucket)
        assert strict_sts.calls == 0
        # From a worker thread the refresh runs on this loop, which is free meanwhile.
        await asyncio.to_thread(s3.list_objects_v2, Bucket=bucket)
        assert strict_sts.calls == 1
        first = issued(strict_sts)[0]
        assert signed == [first[0]]
        # On the loop with valid cached credentials: served, no wait.
        s3.list_objects_v2(Bucket=bucket)
        # Past the refresh-ahead point: served from the cache, the refresh runs behind.
        clock.set(first[1] - 120)
        s3.list_objects_v2(Bucket=bucket)
        assert signed[-1] == first[0]
        await asyncio.wait(list(broker._inflight.values()))
        assert strict_sts.calls == 2
        s3.list_objects_v2(Bucket=bucket)
        second = issued(strict_sts)[1]
        assert signed[-1] == second[0]
        # In the last minute (nothing servable without waiting): the error again, no hang.
        clock.set(second[1] - 30)
        with pytest.raises(RuntimeError, match="would deadlock"):
            s3.list_objects_v2(Bucket=bucket)
        # The same while a thread holds botocore's refresh lock, waiting for this loop (and
        # STS, held until released).
        strict_sts.hang = True
        worker = asyncio.ensure_future(asyncio.to_thread(s3.list_objects_v2, Bucket=bucket))
        assert await asyncio.to_thread(strict_sts.wait_for_calls, 3)
        with pytest.raises(RuntimeError, match="would deadlock"):
            s3.list_objects_v2(Bucket=bucket)
        strict_sts.release()
        await worker
        assert strict_sts.calls == 3
        assert signed[-1] == issued(strict_sts)[2][0]
    finally:
        s3.close()


class _StaticProvider(CredentialProvider):  # type: ignore[misc]
    METHOD = "test-static"

    def __init__(self, credentials: Any) -> None:
        super().__init__()
        self.credentials = credentials

    def load(self) -> Any:
        return self.credentials


def test_refreshable_without_a_loop_runs_on_the_brokers_loop_thread(
    broker: CredentialBroker, strict_sts: StrictSTS, clock: FakeClock
) -> None:
    credentials = refreshable(broker, ROLE)
    try:
        frozen = credentials.get_frozen_credentials()
        assert frozen.access_key == issued(strict_sts)[0][0]
        # Code run on that loop thread itself gets the cached credentials, never a hang...
        loop_thread = credentials._loop_thread
        assert loop_thread is not None

        async def on_the_loop() -> Any:
            return credentials.get_frozen_credentials()

        assert loop_thread.submit(on_the_loop).result(10).access_key == frozen.access_key
        # ...or, when it would have to wait (the last minute), the error.
        clock.set(issued(strict_sts)[0][1] - 30)
        with pytest.raises(RuntimeError, match="would deadlock"):
            loop_thread.submit(on_the_loop).result(10)
    finally:
        credentials.close()
    # Closed: a refresh that needs the loop fails, with a clear error.
    with pytest.raises(STSUnavailable, match="loop is closed"):
        credentials.get_frozen_credentials()
    assert strict_sts.calls == 1


def test_refreshable_checks_its_arguments(broker: CredentialBroker) -> None:
    with pytest.raises(TypeError, match="broker"):
        refreshable(object(), ROLE)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="role"):
        refreshable(broker, "arn:aws:iam::123456789012:role/x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        refreshable(broker, ROLE, timeout=0)
    with pytest.raises(TypeError, match="loop"):
        refreshable(broker, ROLE, loop=object())  # type: ignore[arg-type]


@pytest.mark.usefixtures("isolated_aws_env")
def test_botocore_debug_logging_of_a_call_holds_no_secret(
    moto_sts: str, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    """botocore at DEBUG logs each signed request (headers, canonical request, string to
    sign): the session token is a header there, and must come out redacted."""
    credentials = make_credentials("ASIADEBUGLOGGING001")
    s3 = client(credentials, "s3", region="us-east-1", endpoint_url=moto_sts)
    caplog.set_level(logging.DEBUG, logger="botocore")
    caplog.set_level(logging.DEBUG, logger="urllib3")
    s3.list_objects_v2(Bucket=bucket)
    text = "\n".join(
        [r.getMessage() for r in caplog.records] + [repr(r.args) for r in caplog.records]
    )
    assert "x-amz-security-token" in text.lower()  # the header was logged, its value not
    assert credentials.session_token not in text
    assert credentials.secret_access_key not in text


@pytest.mark.usefixtures("isolated_aws_env")
def test_boto3_session_debug_logging_holds_no_secret(
    moto_sts: str, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    credentials = make_credentials("ASIADEBUGLOGGING002")
    s3 = boto3_session(credentials, region="us-east-1").client("s3", endpoint_url=moto_sts)
    caplog.set_level(logging.DEBUG, logger="botocore")
    s3.list_objects_v2(Bucket=bucket)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "x-amz-security-token" in text.lower()
    assert credentials.session_token not in text
    assert credentials.secret_access_key not in text
