"""stscreds.obstore: obstore's S3Store signing with broker credentials, against real servers.

obstore writes to and reads from moto's S3 on loopback, with credentials the broker got
from a StrictSTS that verifies its tokens. moto accepts any credentials, so a recording
proxy in front of it shows which access key (and session token) obstore signed each
request with. One FakeClock drives the broker and the STS: credentials are made to live
100 s, then the clock moves a whole lifetime, and nothing sleeps to move time.

obstore keeps a provider's answer until ``expires_at`` minus 300 s on the real clock, so it
keeps a one-hour credential (``expires_at`` is an hour out less the margin) and asks again
for every operation while a 100 s one is current (its ``expires_at`` is already past).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import os
import re
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import boto3
import obstore as obs
import pytest
from obstore.exceptions import UnauthenticatedError
from obstore.store import S3Store

from servers.clock import FakeClock, Skewed
from servers.sts import StrictSTS
from stscreds import (
    CredentialBroker,
    Credentials,
    CredentialsRejected,
    Role,
    SigningKey,
    STSUnavailable,
)
from stscreds.obstore import DEFAULT_MARGIN, CredentialProvider, SyncCredentialProvider

ROLE = "arn:aws:iam::123456789012:role/app/objects"
OTHER_ROLE = "arn:aws:iam::123456789012:role/app/other"
ISSUER = "http://127.0.0.1:1/obstore-issuer"
KEY = SigningKey.generate("ES256")
T0 = 1_800_000_000.0
SHORT = 100  # seconds: a credential obstore asks again about on every operation
_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/")


# -- a recording proxy in front of moto's S3 ------------------------------------------------


@dataclass(frozen=True)
class Signed:
    """One S3 request as obstore sent it: what it did and what it was signed with."""

    method: str
    path: str
    access_key_id: str | None
    session_token: str | None


class _Recording(ThreadingHTTPServer):
    daemon_threads = True
    upstream: tuple[str, int]
    signed: list[Signed]


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Recording

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        assert "Transfer-Encoding" not in self.headers  # obstore sends a length here
        body = self.rfile.read(length) if length else None
        found = _CREDENTIAL.search(self.headers.get("Authorization", ""))
        self.server.signed.append(
            Signed(
                self.command,
                self.path,
                found.group(1) if found else None,
                self.headers.get("X-Amz-Security-Token"),
            )
        )
        upstream = http.client.HTTPConnection(*self.server.upstream, timeout=10)
        try:
            upstream.request(self.command, self.path, body=body, headers=dict(self.headers))
            answer = upstream.getresponse()
            data = answer.read()
        finally:
            upstream.close()
        self.send_response_only(answer.status, answer.reason)
        hop = {"connection", "keep-alive", "transfer-encoding"}
        if self.command != "HEAD":
            hop.add("content-length")
            self.send_header("Content-Length", str(len(data)))
        for name, value in answer.getheaders():
            if name.lower() not in hop:
                self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass


@pytest.fixture
def s3(moto_sts: str) -> Iterator[_Recording]:
    """A proxy on 127.0.0.1 that forwards to moto's S3 and records every signed request."""
    parts = urlsplit(moto_sts)
    assert parts.hostname is not None and parts.port is not None
    server = _Recording(("127.0.0.1", 0), _Forward)
    server.upstream = (parts.hostname, parts.port)
    server.signed = []
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


@pytest.fixture
def bucket(moto_sts: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A new bucket in moto's S3 (made with botocore and any credentials)."""
    # obstore reads AWS_* from the environment: only the provider may supply credentials.
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    name = f"obstore-{uuid.uuid4().hex[:12]}"
    client = boto3.client(
        "s3",
        endpoint_url=moto_sts,
        region_name="us-east-1",
        aws_access_key_id="AKIASETUP",
        aws_secret_access_key="setup",
    )
    client.create_bucket(Bucket=name)
    client.close()
    return name


def make_store(s3: _Recording, bucket: str, provider: Any) -> S3Store:
    host, port = s3.server_address[:2]
    return S3Store(
        bucket,
        endpoint=f"http://{host!s}:{port}",
        allow_http=True,
        region="us-east-1",
        virtual_hosted_style_request=False,
        credential_provider=provider,
        retry_config={"max_retries": 0, "retry_timeout": timedelta(seconds=5)},
    )


# -- the broker and the STS on one fake clock -----------------------------------------------


@pytest.fixture
def clock(strict_sts: StrictSTS) -> FakeClock:
    fake = FakeClock(T0)
    strict_sts.clock = fake.time
    return fake


def new_broker(strict_sts: StrictSTS, clock: FakeClock) -> CredentialBroker:
    broker = CredentialBroker(
        issuer=ISSUER,
        signing_keys=[KEY],
        sts_endpoint_url=strict_sts.url,
        clock=clock,
        max_attempts=1,
        exchange_deadline=5.0,
    )
    strict_sts.configure(issuer=broker.issuer, jwks=broker.jwks)
    return broker


@pytest.fixture
async def broker(strict_sts: StrictSTS, clock: FakeClock) -> AsyncIterator[CredentialBroker]:
    made = new_broker(strict_sts, clock)
    yield made
    await made.aclose()


@pytest.fixture
def sync_broker(strict_sts: StrictSTS, clock: FakeClock) -> Iterator[CredentialBroker]:
    """A broker no test loop runs: a SyncCredentialProvider uses its background loop."""
    made = new_broker(strict_sts, clock)
    yield made
    made.close()


def issued(strict_sts: StrictSTS) -> list[str]:
    """The access key ids the STS issued, in order."""
    return [
        call.credentials["AccessKeyId"]
        for call in strict_sts.requests_for(ROLE)
        if call.credentials is not None
    ]


def keys_used(s3: _Recording, since: int = 0) -> set[str | None]:
    return {signed.access_key_id for signed in s3.signed[since:]}


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Let the loop run (real time, small steps) until ``predicate()``; for real I/O only."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


# -- the async form -------------------------------------------------------------------------


async def test_writes_and_reads_signed_with_the_brokers_credentials(
    broker: CredentialBroker, strict_sts: StrictSTS, s3: _Recording, bucket: str
) -> None:
    provider = CredentialProvider(broker, Role(ROLE))
    store = make_store(s3, bucket, provider)
    await obs.put_async(store, "a.txt", b"alpha")
    await obs.put_async(store, "b.txt", b"beta")
    assert bytes(await (await obs.get_async(store, "a.txt")).bytes_async()) == b"alpha"
    assert bytes(await (await obs.get_async(store, "b.txt")).bytes_async()) == b"beta"

    # One exchange; obstore kept the one-hour credentials for all four requests.
    assert strict_sts.calls == 1
    assert broker.stats.misses == 1 and broker.stats.hits == 0
    [call] = strict_sts.requests_for(ROLE)
    assert call.credentials is not None
    assert [(s.method, s.path) for s in s3.signed] == [
        ("PUT", f"/{bucket}/a.txt"),
        ("PUT", f"/{bucket}/b.txt"),
        ("GET", f"/{bucket}/a.txt"),
        ("GET", f"/{bucket}/b.txt"),
    ]
    assert keys_used(s3) == {call.credentials["AccessKeyId"]}
    assert {s.session_token for s in s3.signed} == {call.credentials["SessionToken"]}


async def test_obstore_asks_again_each_lifetime_and_signs_with_the_new_key(
    broker: CredentialBroker,
    strict_sts: StrictSTS,
    clock: FakeClock,
    s3: _Recording,
    bucket: str,
) -> None:
    strict_sts.grant_seconds = SHORT
    store = make_store(s3, bucket, CredentialProvider(broker, Role(ROLE)))
    lifetimes = 3
    for lifetime in range(lifetimes):
        mark = len(s3.signed)
        await obs.put_async(store, f"{lifetime}.txt", b"x" * lifetime)
        await obs.put_async(store, f"{lifetime}-again.txt", b"y")
        got = await obs.get_async(store, f"{lifetime}.txt")
        assert bytes(await got.bytes_async()) == b"x" * lifetime
        # Three requests, one exchange: obstore asked for each, the broker's cache answered.
        assert strict_sts.calls == lifetime + 1
        assert keys_used(s3, mark) == {issued(strict_sts)[lifetime]}
        clock.advance(SHORT)  # to the end of this lifetime: the next ask needs new ones

    assert strict_sts.calls == lifetimes
    keys = issued(strict_sts)
    assert len(set(keys)) == lifetimes
    assert [s.access_key_id for s in s3.signed] == [k for k in keys for _ in range(3)]
    assert broker.stats.misses == lifetimes
    assert broker.stats.hits == 2 * lifetimes  # obstore asked again for every operation


async def test_expires_at_is_the_expiration_less_the_margin_on_the_hosts_clock(
    broker: CredentialBroker, strict_sts: StrictSTS, clock: FakeClock
) -> None:
    # STS's clock is 15 minutes ahead of the broker's (a FakeClock far from the real
    # time), and obstore compares expires_at with the real clock: what is handed over is
    # the time left on STS's clock, less the margin, from the real now.
    strict_sts.clock = Skewed(clock, 900.0)
    strict_sts.leeway = 3600
    role = Role(ROLE)
    before = datetime.now(timezone.utc)
    credential = await CredentialProvider(broker, role)()
    after = datetime.now(timezone.utc)
    credentials = await broker.get(role)
    assert credential["access_key_id"] == credentials.access_key_id
    assert credential["secret_access_key"] == credentials.secret_access_key
    assert credential["token"] == credentials.session_token
    assert DEFAULT_MARGIN == 120.0
    expires_at = credential["expires_at"]
    assert expires_at is not None and expires_at.tzinfo is not None
    life = timedelta(seconds=3600 - DEFAULT_MARGIN)
    assert before + life - timedelta(seconds=2) <= expires_at <= after + life

    custom = await CredentialProvider(broker, role, margin=600)()
    assert custom["expires_at"] is not None
    assert custom["expires_at"] == pytest.approx(
        expires_at - timedelta(seconds=480), abs=timedelta(seconds=2)
    )


async def test_concurrent_operations_share_one_exchange(
    broker: CredentialBroker, strict_sts: StrictSTS, s3: _Recording, bucket: str
) -> None:
    provider = CredentialProvider(broker, Role(ROLE))
    # A store each: obstore serializes the asks of one store, not those of several.
    stores = [make_store(s3, bucket, provider) for _ in range(12)]
    strict_sts.hang = True
    writes = asyncio.gather(
        *(
            obs.put_async(store, f"c/{i}-{j}", b"c")
            for i, store in enumerate(stores)
            for j in (0, 1)
        )
    )
    try:
        # Every store asked; the first started the exchange, the others joined it.
        await wait_until(lambda: broker.stats.joins == len(stores) - 1)
        assert await asyncio.to_thread(strict_sts.wait_for_calls, 1)
    finally:
        strict_sts.release()
    await writes

    assert strict_sts.calls == 1
    assert broker.stats.exchanges == 1
    assert len(s3.signed) == 2 * len(stores)
    assert keys_used(s3) == set(issued(strict_sts))


async def test_a_call_from_another_loop_runs_on_the_brokers_loop(
    broker: CredentialBroker, strict_sts: StrictSTS, s3: _Recording, bucket: str
) -> None:
    home = asyncio.get_running_loop()
    provider = CredentialProvider(broker, Role(ROLE))  # made on this loop: the broker's
    loops: list[asyncio.AbstractEventLoop] = []
    get = broker.get

    async def recording_get(role: Role) -> Credentials:
        loops.append(asyncio.get_running_loop())
        return await get(role)

    broker.get = recording_get  # type: ignore[method-assign]

    def elsewhere(i: int) -> None:
        # Another thread, another loop: obstore runs the provider's coroutine on it.
        async def work() -> None:
            store = make_store(s3, bucket, provider)
            await obs.put_async(store, f"other-{i}", b"o")
            assert bytes(await (await obs.get_async(store, f"other-{i}")).bytes_async()) == b"o"

        asyncio.run(work())

    strict_sts.hang = True
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        done = [asyncio.wrap_future(pool.submit(elsewhere, i)) for i in range(3)]
        try:
            await wait_until(lambda: broker.stats.joins == 2)
        finally:
            strict_sts.release()
        await asyncio.gather(*done)

    assert loops and all(loop is home for loop in loops)
    assert strict_sts.calls == 1
    assert keys_used(s3) == set(issued(strict_sts))


async def test_a_stopped_loop_is_replaced_by_the_next_one_to_ask(
    broker: CredentialBroker, strict_sts: StrictSTS
) -> None:
    role = Role(ROLE)

    def on_a_loop_that_then_closes() -> str:
        async def first() -> str:
            credential = await CredentialProvider(broker, role)()
            return credential["access_key_id"]

        return asyncio.run(first())

    first_key = await asyncio.to_thread(on_a_loop_that_then_closes)
    # That loop is gone: this one serves the broker now (no hop to a dead loop, no wait).
    credential = await CredentialProvider(broker, role)()
    assert credential["access_key_id"] == first_key
    assert strict_sts.calls == 1


# -- the sync form --------------------------------------------------------------------------


def test_sync_provider_with_the_sync_api_across_a_refresh(
    sync_broker: CredentialBroker,
    strict_sts: StrictSTS,
    clock: FakeClock,
    s3: _Recording,
    bucket: str,
) -> None:
    strict_sts.grant_seconds = SHORT
    provider = SyncCredentialProvider(sync_broker, Role(ROLE))
    store = make_store(s3, bucket, provider)
    try:
        obs.put(store, "one.txt", b"1")
        assert bytes(obs.get(store, "one.txt").bytes()) == b"1"
        assert strict_sts.calls == 1
        clock.advance(SHORT)
        obs.put(store, "two.txt", b"2")
        assert bytes(obs.get(store, "two.txt").bytes()) == b"2"
    finally:
        provider.close()

    assert strict_sts.calls == 2
    first, second = issued(strict_sts)
    assert first != second
    assert [s.access_key_id for s in s3.signed] == [first, first, second, second]


def test_sync_provider_from_many_threads_shares_one_exchange(
    sync_broker: CredentialBroker, strict_sts: StrictSTS, s3: _Recording, bucket: str
) -> None:
    provider = SyncCredentialProvider(sync_broker, Role(ROLE))
    threads = 12
    start = threading.Barrier(threads)

    def work(i: int) -> bytes:
        store = make_store(s3, bucket, provider)
        start.wait()
        obs.put(store, f"t/{i}", b"t")
        return bytes(obs.get(store, f"t/{i}").bytes())

    strict_sts.hang = True
    try:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            results = [pool.submit(work, i) for i in range(threads)]
            try:
                deadline = time.monotonic() + 5
                while sync_broker.stats.joins < threads - 1:  # every thread is waiting
                    assert time.monotonic() < deadline, "the threads did not all ask"
                    time.sleep(0.005)
            finally:
                strict_sts.release()
            assert [r.result(10) for r in results] == [b"t"] * threads
    finally:
        provider.close()

    assert strict_sts.calls == 1
    assert keys_used(s3) == set(issued(strict_sts))


async def test_sync_provider_with_the_async_api_waits_on_the_brokers_loop(
    broker: CredentialBroker, strict_sts: StrictSTS, s3: _Recording, bucket: str
) -> None:
    # Made on this loop, so it is the broker's: obstore calls the provider on one of its
    # runtime threads, which waits while this loop (free, awaiting obstore) does the work.
    provider = SyncCredentialProvider(broker, Role(ROLE))
    store = make_store(s3, bucket, provider)
    await obs.put_async(store, "s.txt", b"s")
    assert bytes(await (await obs.get_async(store, "s.txt")).bytes_async()) == b"s"
    assert strict_sts.calls == 1
    assert keys_used(s3) == set(issued(strict_sts))


async def test_sync_api_on_the_brokers_own_loop_fails_instead_of_deadlocking(
    broker: CredentialBroker, strict_sts: StrictSTS, s3: _Recording, bucket: str
) -> None:
    store = make_store(s3, bucket, SyncCredentialProvider(broker, Role(ROLE)))
    with pytest.raises(UnauthenticatedError, match="blocks: use the async API"):
        obs.put(store, "blocked.txt", b"b")  # blocks this loop, which serves the broker
    assert strict_sts.calls == 0
    assert s3.signed == []


def test_sync_provider_waits_at_most_its_timeout(
    sync_broker: CredentialBroker, strict_sts: StrictSTS
) -> None:
    provider = SyncCredentialProvider(sync_broker, Role(ROLE), timeout=0.2)
    strict_sts.hang = True
    try:
        with pytest.raises(STSUnavailable, match=r"no credentials within 0\.2s"):
            provider()
    finally:
        strict_sts.release()
        provider.close()
    # Closed: a call the cache cannot answer fails at once (cached credentials still serve).
    closed = SyncCredentialProvider(sync_broker, Role(OTHER_ROLE))
    closed.close()
    with pytest.raises(STSUnavailable, match="provider is closed"):
        closed()


def test_sync_provider_in_a_forked_child_starts_its_own_loop(
    sync_broker: CredentialBroker, strict_sts: StrictSTS
) -> None:
    """gunicorn --preload: the parent's background loop does not exist in the child."""
    role = Role(ROLE)
    provider = SyncCredentialProvider(sync_broker, role, timeout=10)
    try:
        parents = provider()["access_key_id"]
        sync_broker.invalidate(role)  # the child has to fetch, on a loop of its own
        read_end, write_end = os.pipe()
        with warnings.catch_warnings():
            # Python 3.12+ warns about fork() in a process with threads: that is the point.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child: report what it got, then leave without running pytest's exit
            status = 1
            try:
                os.write(write_end, provider()["access_key_id"].encode())
                status = 0
            finally:
                os._exit(status)
        os.close(write_end)
        _, wait_status = os.waitpid(pid, 0)
        with os.fdopen(read_end) as pipe:
            childs = pipe.read()
        assert os.waitstatus_to_exitcode(wait_status) == 0
        assert issued(strict_sts) == [parents, childs]
        # The parent's loop is untouched by the child's fresh start.
        assert provider()["access_key_id"] not in (parents, childs)
    finally:
        provider.close()


# -- errors ---------------------------------------------------------------------------------


async def test_sts_errors_reach_the_caller_with_their_message(
    broker: CredentialBroker, strict_sts: StrictSTS, s3: _Recording, bucket: str
) -> None:
    strict_sts.reject_roles.add(ROLE)
    provider = CredentialProvider(broker, Role(ROLE))
    with pytest.raises(CredentialsRejected, match="Not authorized") as raised:
        await provider()
    assert raised.value.code == "AccessDenied"
    store = make_store(s3, bucket, provider)
    with pytest.raises(UnauthenticatedError, match="Not authorized"):
        await obs.put_async(store, "denied.txt", b"d")
    assert s3.signed == []  # nothing was sent unsigned


def test_sync_provider_errors_reach_the_caller_with_their_message(
    sync_broker: CredentialBroker, strict_sts: StrictSTS, s3: _Recording, bucket: str
) -> None:
    strict_sts.fail_always()
    provider = SyncCredentialProvider(sync_broker, Role(ROLE))
    try:
        with pytest.raises(STSUnavailable, match="Service unavailable"):
            provider()
        with pytest.raises(UnauthenticatedError, match="Service unavailable"):
            obs.put(make_store(s3, bucket, provider), "down.txt", b"d")
    finally:
        strict_sts.clear_faults()
        provider.close()
    assert s3.signed == []


@pytest.mark.parametrize("form", [CredentialProvider, SyncCredentialProvider])
def test_wrong_arguments_are_named(sync_broker: CredentialBroker, form: type[Any]) -> None:
    role = Role(ROLE)
    with pytest.raises(TypeError, match=r"^broker: "):
        form(object(), role)
    with pytest.raises(TypeError, match=r"^role: "):
        form(sync_broker, ROLE)
    with pytest.raises(TypeError, match=r"^margin: "):
        form(sync_broker, role, margin="60")
    with pytest.raises(ValueError, match=r"^margin: "):
        form(sync_broker, role, margin=-1)
    with pytest.raises(ValueError, match=r"^timeout: "):
        form(sync_broker, role, timeout=0)
    with pytest.raises(TypeError, match=r"^loop: "):
        form(sync_broker, role, loop="loop")
    made = form(sync_broker, role, margin=30)
    assert made.broker is sync_broker and made.role == role and made.margin == 30.0
    assert made.timeout == sync_broker.request_timeout + 1
    assert "secret" not in repr(made) and ROLE in repr(made)
    # obstore reads these two from a provider; this one has neither.
    assert not hasattr(made, "config") and not hasattr(made, "refresh_threshold")


def test_the_module_imports_without_obstore() -> None:
    script = (
        "import sys\n"
        "sys.modules['obstore'] = None\n"  # any import of obstore now fails
        "import stscreds.obstore as m\n"
        "assert m.CredentialProvider and m.SyncCredentialProvider\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
