"""Tests for stscreds.aio: cached aiobotocore clients per event loop, against moto's S3 on
loopback (real HTTP through aiohttp)."""

from __future__ import annotations

import asyncio
import gc
import importlib
import sys
import threading
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import UnknownServiceError

import stscreds.aio as aio
from stscreds import Credentials

REGION = "us-east-1"
EXPIRATION = datetime.now(timezone.utc) + timedelta(hours=2)


def make_credentials(
    access_key_id: str = "ASIAAIO00000000001", expiration: datetime = EXPIRATION
) -> Credentials:
    return Credentials(
        access_key_id=access_key_id,
        secret_access_key="secret-" + access_key_id,
        session_token="token-" + access_key_id,
        expiration=expiration,
    )


def http_sessions(made: Any) -> list[aiohttp.ClientSession]:
    """The aiohttp sessions a client has opened so far (made by its first request)."""
    return list(made._endpoint.http_session._sessions.values())


def is_closed(made: Any) -> bool:
    return made._endpoint.http_session._sessions is None


def state() -> Any:
    """The running loop's cache (private: what the tests look into)."""
    return aio._states.get(asyncio.get_running_loop())


async def settle() -> None:
    """Wait for the closes the running loop's cache has started."""
    current = state()
    while current is not None and current.closing:
        await asyncio.gather(*current.closing)


@pytest.fixture(autouse=True)
async def closed_after() -> AsyncIterator[None]:
    """Every test's clients are closed on its own loop, even when the test fails."""
    yield
    await aio.aclose()


@pytest.fixture
def isolated_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Conflicting environment credentials and empty config: only the Credentials may count."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAENVIRONMENTVALUE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "environment-secret")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def bucket(moto_sts: str) -> Iterator[str]:
    """An empty bucket in moto's S3 (moto accepts any credentials)."""
    name = f"bucket-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client(
        "s3",
        endpoint_url=moto_sts,
        region_name=REGION,
        aws_access_key_id="AKIASETUP",
        aws_secret_access_key="setup",
    )
    s3.create_bucket(Bucket=name)
    yield name
    s3.close()


async def put_get(made: Any, bucket: str, key: str, body: bytes) -> bytes:
    await made.put_object(Bucket=bucket, Key=key, Body=body)
    response = await made.get_object(Bucket=bucket, Key=key)
    async with response["Body"] as stream:
        data: bytes = await stream.read()
    return data


# --- using a client --------------------------------------------------------------------------


@pytest.mark.usefixtures("isolated_aws_env")
async def test_client_puts_and_gets_with_the_given_credentials(moto_sts: str, bucket: str) -> None:
    credentials = make_credentials()
    s3 = await aio.client(credentials, "s3", region=REGION, endpoint_url=moto_sts)
    assert await put_get(s3, bucket, "a.txt", b"hello") == b"hello"
    listed = await s3.list_objects_v2(Bucket=bucket)
    assert [o["Key"] for o in listed["Contents"]] == ["a.txt"]
    signed_with = s3._request_signer._credentials
    assert signed_with.access_key == credentials.access_key_id
    assert signed_with.token == credentials.session_token
    assert s3.meta.region_name == REGION


async def test_client_has_short_timeouts_and_merges_a_given_config() -> None:
    credentials = make_credentials("ASIAAIOCONFIG00001")
    default = await aio.client(credentials, "s3", region=REGION)
    assert default.meta.config.connect_timeout == aio.DEFAULT_CONFIG.connect_timeout == 2
    assert default.meta.config.read_timeout == 10
    custom = await aio.client(credentials, "s3", region=REGION, config=Config(read_timeout=30))
    assert custom.meta.config.read_timeout == 30
    assert custom.meta.config.connect_timeout == 2


# --- the cache ---------------------------------------------------------------------------------


async def test_client_is_reused_for_equal_arguments_only(moto_sts: str) -> None:
    credentials = make_credentials("ASIAAIOREUSE000001")
    config = Config(read_timeout=5)

    async def s3(**changes: Any) -> Any:
        arguments: dict[str, Any] = {"region": REGION, "endpoint_url": moto_sts, **changes}
        return await aio.client(arguments.pop("credentials", credentials), "s3", **arguments)

    first = await s3()
    assert await s3() is first
    assert await s3(credentials=make_credentials("ASIAAIOREUSE000001")) is first  # equal
    assert await s3(credentials=make_credentials("ASIAAIOREUSE000002")) is not first
    assert await s3(region="eu-west-1") is not first
    assert await s3(endpoint_url=None) is not first
    assert await s3(config=config) is await s3(config=config) is not first
    assert await s3(config=Config(read_timeout=5)) is not await s3(config=config)  # by object
    # Extra create_client arguments are part of the key (an uncached client would leak).
    assert await s3(use_ssl=False) is await s3(use_ssl=False) is not first
    assert await aio.client(credentials, "sqs", region=REGION) is not first


async def test_concurrent_first_calls_share_one_client() -> None:
    credentials = make_credentials("ASIAAIOCONCURRENT1")
    made = await asyncio.gather(*(aio.client(credentials, "s3", region=REGION) for _ in range(20)))
    assert len({id(m) for m in made}) == 1
    assert len(state().clients) == 1


async def test_a_cancelled_caller_leaves_the_client_to_the_others() -> None:
    credentials = make_credentials("ASIAAIOCANCEL00001")
    cancelled = asyncio.ensure_future(aio.client(credentials, "s3", region=REGION))
    other = asyncio.ensure_future(aio.client(credentials, "s3", region=REGION))
    await asyncio.sleep(0)  # both are waiting for the one client being made
    cancelled.cancel()
    made = await other
    assert cancelled.cancelled()
    assert await aio.client(credentials, "s3", region=REGION) is made


async def test_eviction_closes_the_least_recently_used(
    monkeypatch: pytest.MonkeyPatch, moto_sts: str, bucket: str
) -> None:
    monkeypatch.setattr(aio, "CLIENT_CACHE_SIZE", 3)
    monkeypatch.setattr(aio, "CLOSE_DELAY", 0)
    made = []
    for i in range(3):
        s3 = await aio.client(make_credentials(f"ASIAAIOEVICT{i:06d}"), "s3", endpoint_url=moto_sts)
        await put_get(s3, bucket, f"k{i}", b"x")  # opens its aiohttp session
        made.append(s3)
    sessions = [http_sessions(s3) for s3 in made]
    assert all(len(s) == 1 for s in sessions)
    # A hit makes the first the most recently used: the second goes first.
    first_again = await aio.client(
        make_credentials("ASIAAIOEVICT000000"), "s3", endpoint_url=moto_sts
    )
    assert first_again is made[0]
    fourth = await aio.client(make_credentials("ASIAAIOEVICT000003"), "s3", endpoint_url=moto_sts)
    await settle()
    assert [is_closed(s3) for s3 in made] == [False, True, False]
    assert sessions[1][0].closed and not sessions[0][0].closed
    assert len(state().clients) == 3
    assert await put_get(fourth, bucket, "k3", b"y") == b"y"
    # Asked again, the evicted one's credentials get a new client.
    again = await aio.client(make_credentials("ASIAAIOEVICT000001"), "s3", endpoint_url=moto_sts)
    assert again is not made[1]
    assert await put_get(again, bucket, "k1", b"z") == b"z"


async def test_an_evicted_client_stays_usable_until_its_close_delay(
    monkeypatch: pytest.MonkeyPatch, moto_sts: str, bucket: str
) -> None:
    monkeypatch.setattr(aio, "CLIENT_CACHE_SIZE", 1)
    monkeypatch.setattr(aio, "CLOSE_DELAY", 3600)
    first = await aio.client(make_credentials("ASIAAIODELAY000001"), "s3", endpoint_url=moto_sts)
    await aio.client(make_credentials("ASIAAIODELAY000002"), "s3", endpoint_url=moto_sts)
    assert first not in state().clients.values()
    # A call that had the client before it was evicted still works...
    assert await put_get(first, bucket, "late.txt", b"late") == b"late"
    (retired, handle), *_ = state().retiring.values()
    assert retired is first
    loop = asyncio.get_running_loop()
    assert 3590 < handle.when() - loop.time() <= 3600  # ...and it is closed an hour later
    session = http_sessions(first)[0]
    await aio.aclose()  # or at shutdown, whichever comes first
    assert is_closed(first) and session.closed
    assert handle.cancelled()


async def test_clients_of_expired_credentials_are_dropped(
    monkeypatch: pytest.MonkeyPatch, moto_sts: str
) -> None:
    monkeypatch.setattr(aio, "CLOSE_DELAY", 0)
    expired = make_credentials(
        "ASIAAIOEXPIRED0001", expiration=datetime.now(timezone.utc) - timedelta(minutes=1)
    )
    old = await aio.client(expired, "s3", endpoint_url=moto_sts)
    # Refreshed credentials for the same identity: another key, so another client.
    refreshed = await aio.client(
        make_credentials("ASIAAIOEXPIRED0002"), "s3", endpoint_url=moto_sts
    )
    assert refreshed is not old
    await settle()
    # Making a client swept the expired one out of the cache and closed it.
    assert is_closed(old)
    assert list(state().clients.values()) == [refreshed]


# --- event loops -------------------------------------------------------------------------------


async def test_each_event_loop_has_its_own_clients(moto_sts: str, bucket: str) -> None:
    credentials = make_credentials("ASIAAIOLOOPS000001")
    other_loop = asyncio.new_event_loop()
    thread = threading.Thread(target=other_loop.run_forever, daemon=True)
    thread.start()

    def on_other_loop(coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, other_loop).result(30)

    async def make_and_use(key: str) -> Any:
        s3 = await aio.client(credentials, "s3", endpoint_url=moto_sts)
        assert await put_get(s3, bucket, key, b"x") == b"x"
        return s3

    try:
        here = await make_and_use("here")
        there = on_other_loop(make_and_use("there"))
        assert here is not there  # same key, another loop: another client
        assert on_other_loop(aio.client(credentials, "s3", endpoint_url=moto_sts)) is there
        assert await aio.client(credentials, "s3", endpoint_url=moto_sts) is here
        there_session = http_sessions(there)[0]
        await aio.aclose()  # this loop's clients only
        assert is_closed(here) and not is_closed(there)
        assert on_other_loop(put_get(there, bucket, "still", b"y")) == b"y"
        on_other_loop(aio.aclose())
        assert is_closed(there) and there_session.closed
    finally:
        other_loop.call_soon_threadsafe(other_loop.stop)
        thread.join(10)
        other_loop.close()


async def test_aclose_closes_everything_and_leaks_no_session(
    monkeypatch: pytest.MonkeyPatch, moto_sts: str, bucket: str
) -> None:
    monkeypatch.setattr(aio, "CLIENT_CACHE_SIZE", 4)
    sessions: list[aiohttp.ClientSession] = []

    async def use(i: int) -> None:
        s3 = await aio.client(make_credentials(f"ASIAAIOLEAK{i:07d}"), "s3", endpoint_url=moto_sts)
        assert await put_get(s3, bucket, f"k{i}", b"%d" % i) == b"%d" % i
        sessions.extend(http_sessions(s3))

    # Evicted clients closed at once (one at a time: with no delay, a client still in use
    # would be closed under its call), evicted clients waiting for their delay (concurrent
    # uses), and the cached ones.
    monkeypatch.setattr(aio, "CLOSE_DELAY", 0)
    for i in range(20):
        await use(i)
    monkeypatch.setattr(aio, "CLOSE_DELAY", 3600)
    await asyncio.gather(*(use(i) for i in range(20, 40)))
    assert len(state().retiring) > 0 and len(state().clients) == 4
    assert len({id(s) for s in sessions}) == 40

    await aio.aclose()

    assert all(session.closed for session in sessions)
    assert state() is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del sessions[:]
        gc.collect()
    assert [str(w.message) for w in caught] == []
    # After aclose the loop starts afresh.
    assert await aio.client(make_credentials("ASIAAIOLEAK0000000"), "s3") is not None


async def test_a_client_never_closed_would_be_caught(moto_sts: str, bucket: str) -> None:
    """The check above is not vacuous: a session dropped unclosed warns when collected."""
    s3 = await aio.client(make_credentials("ASIAAIOLEAKED00001"), "s3", endpoint_url=moto_sts)
    await put_get(s3, bucket, "k", b"x")
    loop = asyncio.get_running_loop()
    handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda loop, context: None)  # aiohttp also logs it
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            del aio._states[loop], s3  # dropped without aclose()
            gc.collect()
    finally:
        loop.set_exception_handler(handler)
    assert any("Unclosed client session" in str(w.message) for w in caught)


async def test_a_close_that_fails_is_logged_and_the_others_still_close(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    failing = await aio.client(make_credentials("ASIAAIOFAILCLOSE01"), "s3", region=REGION)
    other = await aio.client(make_credentials("ASIAAIOFAILCLOSE02"), "s3", region=REGION)
    real_exit = failing.__aexit__

    async def exit_then_fail(*args: Any) -> None:
        await real_exit(*args)
        raise RuntimeError("close failed")

    monkeypatch.setattr(failing, "__aexit__", exit_then_fail)
    await aio.aclose()
    assert is_closed(other)
    assert "closing an aiobotocore client failed (RuntimeError)" in caplog.text
    assert "close failed" not in caplog.text  # the type only, never a backend's message


async def test_aclose_stops_clients_being_made() -> None:
    making = asyncio.ensure_future(aio.client(make_credentials("ASIAAIOMAKING00001"), "s3"))
    await asyncio.sleep(0)  # it waits for its service models, read in a thread
    assert len(state().making) == 1
    await aio.aclose()
    with pytest.raises(asyncio.CancelledError):
        await making
    assert state() is None


async def test_aclose_without_clients_does_nothing() -> None:
    await aio.aclose()
    assert state() is None


async def test_a_fork_child_forgets_its_parents_clients() -> None:
    credentials = make_credentials("ASIAAIOFORK0000001")
    parent = await aio.client(credentials, "s3")
    aio._forget_clients_after_fork()  # as os.register_at_fork runs it in a child
    try:
        assert await aio.client(credentials, "s3") is not parent
        assert not is_closed(parent)  # the parent's connections are left alone
    finally:
        await aio._inherited.pop().aclose()


# --- errors ------------------------------------------------------------------------------------


async def test_client_refuses_wrong_types() -> None:
    credentials = make_credentials()
    with pytest.raises(TypeError, match="Credentials"):
        await aio.client({"aws_access_key_id": "x"}, "s3")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="service"):
        await aio.client(credentials, b"s3")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="config"):
        await aio.client(credentials, "s3", config={"read_timeout": 5})
    with pytest.raises(TypeError, match="hashable"):
        await aio.client(credentials, "s3", verify=["not", "hashable"])
    assert state() is None  # refused before anything was made


async def test_an_unknown_service_fails_every_time_and_is_not_cached() -> None:
    credentials = make_credentials()
    for _ in range(2):
        with pytest.raises(UnknownServiceError):
            await aio.client(credentials, "no-such-service")
    assert state().clients == {} and state().making == {}


def test_import_without_aiobotocore_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in sys.modules if n == "aiobotocore" or n.startswith("aiobotocore.")]:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import aiobotocore...` fail
    monkeypatch.delitem(sys.modules, "stscreds.aio")
    with pytest.raises(ImportError, match=r"pip install 'stscreds\[aio\]'"):
        importlib.import_module("stscreds.aio")
