"""DynamoDBStore against moto's DynamoDB server on loopback: the protocol, the table, faults,
secrets, and fleets of real worker processes sharing one table.

The server (``servers/dynamodb.py``) is moto's app, one call at a time (as DynamoDB applies
writes to one item), with throttling errors and late answers on demand. Time that the store
judges (expiry of values and leases) is a FakeClock; the waits that poll really wait.

Fleet tests run 4 uvicorn processes of ``servers/fleet_app.py`` (see ``servers/fleet.py``
for why separate processes on separate ports) against StrictSTS, which counts every call.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import botocore.session
import pytest
from botocore.exceptions import ReadTimeoutError

from servers.dynamodb import THROTTLING_CODES, DynamoDBFleet, LocalDynamoDB
from servers.fleet import Response, Worker
from servers.sts import RecordedCall, StrictSTS
from stscreds import CredentialBroker, CredentialsRejected, Role, SigningKey
from stscreds.stores import CredentialStore, DynamoDBStore, StoreCipher, generate_key
from stscreds.stores.dynamodb import DynamoDBError, DynamoDBTableNotFound, DynamoDBThrottled

REGION = "eu-west-1"
ACCOUNT = "123456789012"
# The broker's keys are digests of the identity; build them the same way.
KEY = hashlib.sha256(b"arn:aws:iam::123456789012:role/tenant-reader|alice").hexdigest()
OTHER_KEY = hashlib.sha256(b"arn:aws:iam::123456789012:role/tenant-reader|bob").hexdigest()
SECRET = b'{"s":"wJalrXUtnFEMI/K7MDENG/bPxRfiCYdistinctiveSECRET"}'
# Inside the advisory window of 1 h credentials (15 min), outside the mandatory one (1 min).
ADVISORY_OFFSET = 50 * 60.0
FLEET_ENV = {"FLEET_STORE_TIMEOUT": "1", "FLEET_DEADLINE": "5"}

MakeStore = Callable[..., DynamoDBStore]


class FakeClock:
    """Wall-clock time that only moves when the test says so."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def dynamodb() -> Iterator[LocalDynamoDB]:
    server = LocalDynamoDB().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _no_faults_left(dynamodb: LocalDynamoDB) -> Iterator[None]:
    dynamodb.clear_faults()
    yield
    dynamodb.clear_faults()


def create_raw_table(dynamodb: LocalDynamoDB, name: str, key: str = "pk") -> str:
    dynamodb.raw.create_table(
        TableName=name,
        AttributeDefinitions=[{"AttributeName": key, "AttributeType": "S"}],
        KeySchema=[{"AttributeName": key, "KeyType": "HASH"}],
        BillingMode="PAY_PER_REQUEST",
    )
    return name


def table_name() -> str:
    return f"stscreds-{uuid.uuid4().hex[:12]}"


def plain_store(dynamodb: LocalDynamoDB, name: str) -> DynamoDBStore:
    """A store on table ``name`` of the test server, for its blocking helpers."""
    return DynamoDBStore(
        name,
        region=REGION,
        endpoint_url=dynamodb.url,
        session=dynamodb.session(),
        allow_plaintext=True,
    )


@pytest.fixture
def table(dynamodb: LocalDynamoDB) -> str:
    """A fresh table with the store's key schema (made raw: create_table() is tested apart)."""
    return create_raw_table(dynamodb, table_name())


@pytest.fixture
async def make_store(dynamodb: LocalDynamoDB, table: str) -> AsyncIterator[MakeStore]:
    """Build DynamoDBStores on ``table`` (plaintext allowed unless keys are given); closed after."""
    stores: list[DynamoDBStore] = []

    def make(name: str | None = None, **options: Any) -> DynamoDBStore:
        if "encryption_keys" not in options:
            options.setdefault("allow_plaintext", True)
        if "client" not in options:
            options.setdefault("region", REGION)
            options.setdefault("endpoint_url", dynamodb.url)
            options.setdefault("session", dynamodb.session())
        store = DynamoDBStore(name or table, **options)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.aclose()


def raw_item(dynamodb: LocalDynamoDB, table: str, pk: str) -> dict[str, Any] | None:
    item: dict[str, Any] | None = dynamodb.raw.get_item(
        TableName=table, Key={"pk": {"S": pk}}, ConsistentRead=True
    ).get("Item")
    return item


def store_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("stscreds-dynamodb")]


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# --- construction -------------------------------------------------------------------------


async def test_is_a_credential_store_and_repr_hides_keys(make_store: MakeStore) -> None:
    key = generate_key()
    store = make_store(encryption_keys=[key])
    assert isinstance(store, CredentialStore)
    assert isinstance(store.cipher, StoreCipher) and store.cipher.encrypts
    text = repr(store)
    assert key not in text and store.table in text and REGION in text
    assert "testing" not in text  # the signing credentials of the session


def test_refuses_to_store_plaintext_without_consent(dynamodb: LocalDynamoDB) -> None:
    with pytest.raises(ValueError, match="encryption_keys"):
        DynamoDBStore("stscreds", region=REGION, session=dynamodb.session())


def test_repr_never_shows_userinfo_of_the_endpoint(dynamodb: LocalDynamoDB) -> None:
    store = DynamoDBStore(
        "stscreds",
        region=REGION,
        endpoint_url="https://app:s3cr3t-pw@dynamodb.internal:8443",
        session=dynamodb.session(),
        allow_plaintext=True,
    )
    assert "s3cr3t-pw" not in repr(store) and "dynamodb.internal:8443" in repr(store)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"table": "ab"}, "table"),
        ({"table": "no spaces"}, "table"),
        ({"connect_timeout": 0}, "connect_timeout"),
        ({"read_timeout": float("inf")}, "read_timeout"),
        ({"max_workers": 0}, "max_workers"),
        ({"poll_interval": (0.5, 0.05)}, "poll_interval"),
        ({"poll_interval": (0, 1)}, "poll_interval"),
    ],
)
def test_bad_arguments_are_refused(
    dynamodb: LocalDynamoDB, options: dict[str, Any], match: str
) -> None:
    table = options.pop("table", "stscreds")
    with pytest.raises(ValueError, match=match):
        DynamoDBStore(
            table, region=REGION, session=dynamodb.session(), allow_plaintext=True, **options
        )


def test_a_client_excludes_session_region_and_endpoint(dynamodb: LocalDynamoDB) -> None:
    client = dynamodb.client()
    try:
        with pytest.raises(TypeError, match="client"):
            DynamoDBStore("stscreds", client=client, region=REGION, allow_plaintext=True)
    finally:
        client.close()


def test_no_region_anywhere_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    with pytest.raises(ValueError, match="region: none given"):
        DynamoDBStore("stscreds", session=botocore.session.Session(), allow_plaintext=True)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-2")  # botocore's default chain
    store = DynamoDBStore("stscreds", session=botocore.session.Session(), allow_plaintext=True)
    assert store.region == "ap-south-2"


# --- the table: create_table(), check(), a missing table ----------------------------------


def test_create_table_is_idempotent_and_enables_ttl(dynamodb: LocalDynamoDB) -> None:
    name = table_name()
    store = plain_store(dynamodb, name)
    assert store.create_table() is True
    assert store.create_table() is False  # exists: nothing to do
    table = dynamodb.raw.describe_table(TableName=name)["Table"]
    ttl = dynamodb.raw.describe_time_to_live(TableName=name)["TimeToLiveDescription"]
    assert table["KeySchema"] == [{"AttributeName": "pk", "KeyType": "HASH"}]
    assert table["AttributeDefinitions"] == [{"AttributeName": "pk", "AttributeType": "S"}]
    assert table["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    assert ttl == {"TimeToLiveStatus": "ENABLED", "AttributeName": "ttl"}
    store.check()


def test_create_table_provisioned_and_refusals(dynamodb: LocalDynamoDB) -> None:
    name = table_name()
    store = plain_store(dynamodb, name)
    assert store.create_table(billing="PROVISIONED", read_capacity=3, write_capacity=2)
    throughput = dynamodb.raw.describe_table(TableName=name)["Table"]["ProvisionedThroughput"]
    assert (throughput["ReadCapacityUnits"], throughput["WriteCapacityUnits"]) == (3, 2)
    with pytest.raises(ValueError, match="billing"):
        plain_store(dynamodb, table_name()).create_table(billing="ON_DEMAND")
    # A table of the same name made for something else is not taken over.
    other = create_raw_table(dynamodb, table_name(), key="id")
    with pytest.raises(DynamoDBError, match="another key schema"):
        plain_store(dynamodb, other).create_table()


def test_check_names_the_table_the_region_and_the_fix(dynamodb: LocalDynamoDB) -> None:
    name = table_name()
    store = plain_store(dynamodb, name)
    with pytest.raises(DynamoDBTableNotFound) as info:
        store.check()
    message = str(info.value)
    assert f"'{name}'" in message and f"'{REGION}'" in message
    assert ".create_table()" in message and "CloudFormation or Terraform" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no botocore chain
    store.create_table()
    store.check()

    wrong = plain_store(dynamodb, create_raw_table(dynamodb, table_name(), key="id"))
    with pytest.raises(DynamoDBError, match="partition key 'pk' of type string"):
        wrong.check()


async def test_a_missing_table_raises_at_every_use_and_is_logged_once(
    dynamodb: LocalDynamoDB, make_store: MakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="stscreds")
    name = table_name()
    store = make_store(name)
    for _ in range(3):
        with pytest.raises(DynamoDBTableNotFound, match=f"'{name}' not found in region"):
            await store.get(KEY)
    with pytest.raises(DynamoDBTableNotFound):
        await store.acquire(KEY, "me", 10)
    with pytest.raises(DynamoDBTableNotFound):
        await store.wait(KEY, 5)
    records = [r for r in caplog.records if name in r.getMessage()]
    assert len(records) == 1 and records[0].levelno == logging.ERROR
    assert "create_table()" in records[0].getMessage()

    await asyncio.to_thread(store.create_table)
    await store.put(KEY, b"v", 60)
    assert await store.get(KEY) == b"v"
    dynamodb.raw.delete_table(TableName=name)
    with pytest.raises(DynamoDBTableNotFound):
        await store.get(KEY)
    # Missing again after it was found: said again.
    assert len([r for r in caplog.records if name in r.getMessage()]) == 2


# --- values -------------------------------------------------------------------------------


async def test_get_put_round_trip_exact_bytes(make_store: MakeStore) -> None:
    store = make_store()
    assert await store.get(KEY) is None
    every_byte = bytes(range(256)) * 3
    await store.put(KEY, every_byte, 60)
    assert await store.get(KEY) == every_byte
    await store.put(KEY, b"newer", 60)
    assert await store.get(KEY) == b"newer"
    assert await store.get(OTHER_KEY) is None


async def test_items_layout(make_store: MakeStore, dynamodb: LocalDynamoDB, table: str) -> None:
    clock = FakeClock(1_700_000_000.25)
    store = make_store(clock=clock)
    await store.put(KEY, b"sealed", 100.5)
    value = raw_item(dynamodb, table, f"v#{KEY}")
    assert value is not None and set(value) == {"pk", "value", "expires_at", "ttl"}
    assert value["value"] == {"B": b"sealed"}
    assert float(value["expires_at"]["N"]) == 1_700_000_100.75
    # Whole seconds for DynamoDB's TTL, a minute of grace after the real expiry.
    assert value["ttl"] == {"N": str(math.ceil(1_700_000_100.75) + 60)}
    assert await store.acquire(KEY, "owner-a", 10)
    lease = raw_item(dynamodb, table, f"l#{KEY}")
    assert lease is not None and lease["owner"] == {"S": "owner-a"}
    assert float(lease["expires_at"]["N"]) == 1_700_000_010.25
    await store.notify(KEY)
    noticed = raw_item(dynamodb, table, f"l#{KEY}")
    assert noticed is not None and len(noticed["token"]["S"]) == 32
    # The token rides on the lease item and keeps its ttl (a lease outliving a token's minute).
    assert noticed["owner"] == lease["owner"] and noticed["ttl"] == lease["ttl"]
    await store.notify(OTHER_KEY)  # no lease: the token's own minute
    token_only = raw_item(dynamodb, table, f"l#{OTHER_KEY}")
    assert token_only is not None and set(token_only) == {"pk", "token", "ttl"}
    assert token_only["ttl"] == {"N": str(1_700_000_001 + 60 + 60)}


async def test_values_expire_by_the_clock_although_the_item_stays(
    make_store: MakeStore, dynamodb: LocalDynamoDB, table: str
) -> None:
    clock = FakeClock()
    store = make_store(clock=clock)
    await store.put(KEY, b"v", 10)
    clock.now += 9.999
    assert await store.get(KEY) == b"v"
    clock.now += 0.001
    assert await store.get(KEY) is None
    # DynamoDB's TTL deletion is lazy (up to days): the item is still there, unserved.
    assert raw_item(dynamodb, table, f"v#{KEY}") is not None
    await store.put(KEY, b"v2", 0)  # already expired when written
    assert await store.get(KEY) is None


async def test_two_stores_share_values(make_store: MakeStore) -> None:
    first, second = make_store(), make_store()
    await first.put(KEY, b"shared", 60)
    assert await second.get(KEY) == b"shared"


# --- leases -------------------------------------------------------------------------------


async def test_lease_is_exclusive_until_released(make_store: MakeStore) -> None:
    a, b = make_store(), make_store()
    assert await a.acquire(KEY, "a", 30)
    assert not await b.acquire(KEY, "b", 30)
    assert await a.acquire(KEY, "a", 30)  # the holder may take it again
    assert await b.acquire(OTHER_KEY, "b", 30)
    assert not await b.release(KEY, "b")
    assert not await b.acquire(KEY, "b", 30)
    assert await a.release(KEY, "a")
    assert not await a.release(KEY, "a")
    assert await b.acquire(KEY, "b", 30)


async def test_a_lease_with_only_a_token_is_free(make_store: MakeStore) -> None:
    store = make_store()
    await store.notify(KEY)  # the lease item exists, holding no owner
    assert await store.holder(KEY) is None
    assert await store.acquire(KEY, "a", 30)


async def test_expired_lease_is_free_to_take(make_store: MakeStore) -> None:
    clock = FakeClock()
    store = make_store(clock=clock)
    assert await store.acquire(KEY, "a", 30)
    clock.now += 29.9
    assert not await store.acquire(KEY, "b", 30)
    clock.now += 0.1
    assert await store.acquire(KEY, "b", 30)
    # The old holder lost it: it can neither extend nor release b's lease.
    assert not await store.extend(KEY, "a", 30)
    assert not await store.release(KEY, "a")
    assert await store.release(KEY, "b")


async def test_only_the_live_owner_extends(make_store: MakeStore) -> None:
    clock = FakeClock()
    store = make_store(clock=clock)
    assert not await store.extend(KEY, "a", 30)  # nobody holds it
    assert await store.acquire(KEY, "a", 10)
    assert not await store.extend(KEY, "b", 30)
    clock.now += 9
    assert await store.extend(KEY, "a", 10)
    clock.now += 9  # past the first expiry, within the extended one
    assert not await store.acquire(KEY, "b", 30)
    clock.now += 1
    assert not await store.extend(KEY, "a", 10)  # expired: too late to extend


async def test_holder_names_the_live_lease_owner_only(
    make_store: MakeStore, dynamodb: LocalDynamoDB, table: str
) -> None:
    clock = FakeClock()
    holding, asking = make_store(clock=clock), make_store(clock=clock)  # two workers
    assert await asking.holder(KEY) is None  # free
    assert await holding.acquire(KEY, "a", 10)
    assert await asking.holder(KEY) == "a"
    assert await asking.holder(OTHER_KEY) is None  # per key
    assert await holding.release(KEY, "a")
    assert await asking.holder(KEY) is None  # released
    assert await holding.acquire(KEY, "b", 10)
    clock.now += 9.999
    assert await asking.holder(KEY) == "b"
    clock.now += 0.001
    assert await asking.holder(KEY) is None  # expired, though its item is still there
    item = raw_item(dynamodb, table, f"l#{KEY}")
    assert item is not None and item["owner"] == {"S": "b"}


async def test_one_of_many_concurrent_acquirers_wins(make_store: MakeStore) -> None:
    stores = [make_store() for _ in range(4)]
    for round_ in range(5):
        key = f"{KEY}-{round_}"
        won = await asyncio.gather(
            *(stores[i % 4].acquire(key, f"owner-{i}", 30) for i in range(8))
        )
        assert won.count(True) == 1, won


# --- waiting ------------------------------------------------------------------------------


async def test_wait_returns_after_the_timeout(make_store: MakeStore) -> None:
    store = make_store()
    loop = asyncio.get_running_loop()
    start = loop.time()
    await store.wait(KEY, 0.3)
    assert 0.3 <= loop.time() - start < 0.8
    start = loop.time()
    await store.wait(KEY, 0)
    assert loop.time() - start < 0.2


async def test_wait_polls_with_growing_jittered_pauses(
    make_store: MakeStore, dynamodb: LocalDynamoDB
) -> None:
    store = make_store(poll_interval=(0.05, 0.5))
    await store.get(KEY)  # connected
    before = dynamodb.calls["GetItem"]
    cpu = time.process_time()
    loop = asyncio.get_running_loop()
    start = loop.time()
    await store.wait(KEY, 2.0)
    assert 2.0 <= loop.time() - start < 2.5
    # 50 ms doubling to 500 ms, each pause 50-100% of its step: 6 to 10 polls, plus the first
    # read; polling every 50 ms would have been 40.
    assert 6 <= dynamodb.calls["GetItem"] - before <= 11
    assert time.process_time() - cpu < 0.5


async def test_local_notify_wakes_at_once(make_store: MakeStore) -> None:
    store = make_store(poll_interval=(60, 60))  # polling cannot be what wakes it
    waiters = [asyncio.create_task(store.wait(KEY, 60)) for _ in range(3)]
    other = asyncio.create_task(store.wait(OTHER_KEY, 60))
    await asyncio.sleep(0.05)
    await store.notify(KEY)
    await asyncio.wait_for(asyncio.gather(*waiters), 1)
    assert not other.done()
    other.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await other


async def test_notify_from_another_store_wakes_within_a_poll(make_store: MakeStore) -> None:
    waiting, writer = make_store(poll_interval=(0.05, 0.1)), make_store()
    loop = asyncio.get_running_loop()
    waiter = asyncio.create_task(waiting.wait(KEY, 30))
    await asyncio.sleep(0.3)  # settled into its longest pauses
    assert not waiter.done()
    await writer.put(KEY, b"fresh", 60)
    await writer.notify(KEY)
    start = loop.time()
    await asyncio.wait_for(waiter, 5)
    assert loop.time() - start < 0.5
    assert await waiting.get(KEY) == b"fresh"


async def test_released_lease_wakes_waiters_in_another_store(make_store: MakeStore) -> None:
    waiting, holder = make_store(poll_interval=(0.02, 0.05)), make_store()
    assert await holder.acquire(KEY, "holder", 30)
    # The broker's order: a lost acquire, holder(), then wait(). The waiter knows the lease
    # from here on, so a release is seen whenever its polls start (on a loaded machine the
    # first one can come after the release: a wait that only began then had no baseline).
    assert not await waiting.acquire(KEY, "waiter", 30)
    assert await waiting.holder(KEY) == "holder"
    waiter = asyncio.create_task(waiting.wait(KEY, 30))
    # While the lease is held, several polls go by and the wait goes on.
    await asyncio.wait({waiter}, timeout=0.2)
    assert not waiter.done()
    assert await holder.release(KEY, "holder")
    await asyncio.wait_for(waiter, 2)
    assert await waiting.acquire(KEY, "waiter", 30)


async def test_a_release_before_the_wait_begins_is_not_missed(make_store: MakeStore) -> None:
    # The broker's order: acquire (lost), holder(), wait(). A holder that releases and
    # notifies in between must not leave the waiter sleeping out its slice.
    holding = make_store()
    waiting = make_store(poll_interval=(0.2, 0.2))
    loop = asyncio.get_running_loop()

    assert await holding.acquire(KEY, "holder", 30)
    assert not await waiting.acquire(KEY, "waiter", 30)
    assert await holding.release(KEY, "holder")
    await holding.notify(KEY)
    assert await waiting.holder(KEY) is None
    start = loop.time()
    await waiting.wait(KEY, 30)
    assert loop.time() - start < 0.05  # at once: no poll needed

    # Released between acquire and holder's read... or between holder and wait: the first
    # poll (one pause) sees it.
    assert await holding.acquire(KEY, "holder", 30)
    assert not await waiting.acquire(KEY, "waiter", 30)
    assert await waiting.holder(KEY) == "holder"
    await holding.notify(KEY)
    start = loop.time()
    await waiting.wait(KEY, 30)
    assert loop.time() - start < 0.5

    # Nothing changed: the wait lasts its timeout.
    assert not await waiting.acquire(KEY, "waiter", 30)
    assert await waiting.holder(KEY) == "holder"
    start = loop.time()
    await waiting.wait(KEY, 0.5)
    assert loop.time() - start >= 0.5


async def test_wait_keeps_its_timeout_while_dynamodb_is_slow(
    make_store: MakeStore, dynamodb: LocalDynamoDB
) -> None:
    store = make_store(poll_interval=(0.05, 0.05), read_timeout=5)
    await store.get(KEY)
    dynamodb.delay = 1.0
    loop = asyncio.get_running_loop()
    start = loop.time()
    await store.wait(KEY, 0.2)
    assert loop.time() - start < 0.6


# --- the event loop, timeouts, throttling -------------------------------------------------


async def test_calls_never_block_the_event_loop(
    make_store: MakeStore, dynamodb: LocalDynamoDB
) -> None:
    store = make_store()
    await store.get(KEY)  # the client is made (on the store's thread)
    dynamodb.delay = 0.3
    loop = asyncio.get_running_loop()
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(loop.time())
            await asyncio.sleep(0.01)

    ticking = asyncio.create_task(ticker())
    start = loop.time()
    await asyncio.gather(store.put(KEY, b"v", 60), store.acquire(KEY, "a", 30))
    took = loop.time() - start
    ticking.cancel()
    assert took >= 0.25
    during = [t for t in ticks if start <= t <= start + took]
    assert len(during) >= 10
    assert max(b - a for a, b in itertools.pairwise(during)) < 0.1


async def test_a_hung_call_times_out_on_its_thread_and_is_not_retried(
    make_store: MakeStore, dynamodb: LocalDynamoDB
) -> None:
    store = make_store(read_timeout=0.3)
    await store.get(KEY)
    before = dynamodb.calls["GetItem"]
    dynamodb.delay = 2.0
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(ReadTimeoutError):
        await store.get(KEY)
    assert loop.time() - start < 1.5
    assert dynamodb.calls["GetItem"] - before == 1


@pytest.mark.parametrize("code", sorted(THROTTLING_CODES))
async def test_throttling_raises_at_once_without_retries(
    make_store: MakeStore, dynamodb: LocalDynamoDB, code: str
) -> None:
    store = make_store()
    await store.get(KEY)
    dynamodb.throttle(code)
    before = sum(dynamodb.calls.values())
    operations: list[Callable[[], Any]] = [
        lambda: store.get(KEY),
        lambda: store.put(KEY, b"v", 60),
        lambda: store.acquire(KEY, "a", 30),
        lambda: store.release(KEY, "a"),
        lambda: store.extend(KEY, "a", 30),
        lambda: store.holder(KEY),
        lambda: store.notify(KEY),
        lambda: store.wait(KEY, 5),
    ]
    for operation in operations:
        with pytest.raises(DynamoDBThrottled, match=code) as info:
            await asyncio.wait_for(operation(), 5)
        assert info.value.__cause__ is None
    assert sum(dynamodb.calls.values()) - before == len(operations)  # botocore retried none
    dynamodb.clear_faults()
    assert await store.acquire(KEY, "a", 30)


# --- clients, closing, fork ----------------------------------------------------------------


async def test_a_client_passed_in_is_used_and_left_open(
    make_store: MakeStore, dynamodb: LocalDynamoDB, table: str
) -> None:
    client = dynamodb.client()
    try:
        store = make_store(client=client)
        assert store.region == REGION
        await store.put(KEY, b"v", 60)
        await store.aclose()
        item = client.get_item(TableName=table, Key={"pk": {"S": f"v#{KEY}"}})["Item"]
        assert item["value"] == {"B": b"v"}
    finally:
        client.close()


async def test_closed_store_refuses_work_and_stops_its_threads(make_store: MakeStore) -> None:
    store = make_store(poll_interval=(60, 60))
    await store.put(KEY, b"v", 60)
    assert store_threads()
    waiter = asyncio.create_task(store.wait(KEY, 60))
    await asyncio.sleep(0.05)
    await store.aclose()
    await asyncio.wait_for(waiter, 1)  # aclose wakes waiters
    await store.aclose()  # idempotent
    await eventually(lambda: store_threads() == [])
    for operation in (store.get(KEY), store.wait(KEY, 1), store.notify(KEY)):
        with pytest.raises(RuntimeError, match="closed"):
            await operation
    with pytest.raises(RuntimeError, match="closed"):
        store.check()


def _use_inherited(store: DynamoDBStore, results: Any) -> None:  # runs in a forked process
    async def use() -> bytes | None:
        await store.put(OTHER_KEY, b"from child", 60)
        return await store.get(KEY)

    try:
        results.put(asyncio.run(asyncio.wait_for(use(), 20)))
    except BaseException as error:
        results.put(f"{type(error).__name__}: {error}")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # 3.12+: fork with threads
async def test_a_forked_worker_can_use_an_inherited_store(make_store: MakeStore) -> None:
    store = make_store()
    await store.put(KEY, b"from parent", 60)  # the parent's threads and client are live
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    child = ctx.Process(target=_use_inherited, args=(store, results))
    child.start()
    try:
        outcome = await asyncio.to_thread(results.get, timeout=30)
    finally:
        child.join(timeout=30)
    assert outcome == b"from parent"
    assert child.exitcode == 0
    assert await store.get(OTHER_KEY) == b"from child"


# --- through brokers: secrets, tampering ---------------------------------------------------

ISSUER = "http://127.0.0.1:9/fleet"


def arn(tenant: str) -> str:
    return f"arn:aws:iam::{ACCOUNT}:role/fleet-{tenant}"


@pytest.fixture
async def dynamodb_brokers(
    strict_sts: StrictSTS, dynamodb: LocalDynamoDB, table: str
) -> AsyncIterator[Callable[[], CredentialBroker]]:
    """Fresh brokers (as fresh worker processes would be) sharing one table and store key."""
    signing_key, store_key = SigningKey.generate("ES256"), generate_key()
    brokers: list[CredentialBroker] = []

    def make() -> CredentialBroker:
        store = DynamoDBStore(
            table,
            region=REGION,
            endpoint_url=dynamodb.url,
            session=dynamodb.session(),
            encryption_keys=[store_key],
        )
        broker = CredentialBroker(
            issuer=ISSUER,
            signing_keys=[signing_key],
            sts_endpoint_url=strict_sts.url,
            store=store,
            store_timeout=2.0,
            exchange_deadline=5.0,
        )
        brokers.append(broker)
        return broker

    strict_sts.configure(issuer=ISSUER, jwks=lambda: brokers[0].jwks())
    yield make
    for broker in brokers:
        await broker.aclose()


def value_name(broker: CredentialBroker, role: Role) -> str:
    """The item under which ``broker``'s store keeps ``role``'s credentials."""
    assert broker._shared is not None
    return "v#" + broker._shared.store.cipher.store_key(broker.identity_key(role))


def issued_keys(sts: StrictSTS, role_arn: str) -> list[str]:
    return [r.credentials["AccessKeyId"] for r in sts.requests_for(role_arn) if r.credentials]


async def test_tampered_or_swapped_values_are_refetched_never_served(
    dynamodb_brokers: Callable[[], CredentialBroker],
    strict_sts: StrictSTS,
    dynamodb: LocalDynamoDB,
    table: str,
) -> None:
    alice, bob = Role(arn("tenant-a"), subject="alice"), Role(arn("tenant-b"), subject="bob")
    writer = dynamodb_brokers()
    first = {alice: await writer.get(alice), bob: await writer.get(bob)}
    assert strict_sts.calls == 2
    reader = dynamodb_brokers()  # a cold worker shares them: no exchange
    assert (await reader.get(alice)).access_key_id == first[alice].access_key_id
    assert strict_sts.calls == 2
    names = {role: value_name(writer, role) for role in (alice, bob)}

    def value_of(role: Role) -> bytes:
        item = raw_item(dynamodb, table, names[role])
        assert item is not None
        value: bytes = item["value"]["B"]
        return value

    def overwrite(role: Role, value: bytes) -> None:
        item = raw_item(dynamodb, table, names[role])
        assert item is not None
        dynamodb.raw.put_item(TableName=table, Item={**item, "value": {"B": value}})

    # One flipped bit (key id, nonce, ciphertext, tag) is refused: refetched, not served.
    for where in (1, 6, -1):
        tampered = bytearray(value_of(alice))
        tampered[where] ^= 0x01
        overwrite(alice, bytes(tampered))
        fresh = dynamodb_brokers()
        calls = strict_sts.calls_for(alice.arn)
        got = await fresh.get(alice)
        assert strict_sts.calls_for(alice.arn) == calls + 1, where
        assert got.access_key_id == issued_keys(strict_sts, alice.arn)[-1]
        assert fresh.store_stats is not None and fresh.store_stats.rejected >= 1

    # Swapped between two identities (a copy under another key): neither is served.
    a_value, b_value = value_of(alice), value_of(bob)
    overwrite(alice, b_value)
    overwrite(bob, a_value)
    before = {role: strict_sts.calls_for(role.arn) for role in (alice, bob)}
    fresh = dynamodb_brokers()
    served = {alice: await fresh.get(alice), bob: await fresh.get(bob)}
    for role, other in ((alice, bob), (bob, alice)):
        assert strict_sts.calls_for(role.arn) == before[role] + 1
        assert served[role].access_key_id not in issued_keys(strict_sts, other.arn)
    assert fresh.store_stats is not None and fresh.store_stats.rejected >= 2


def secrets_of(requests: Sequence[RecordedCall]) -> dict[str, str]:
    """Everything that must never be readable in the table or the logs: label -> value."""
    found: dict[str, str] = {}
    for n, rec in enumerate(requests):
        if rec.credentials:
            for name in ("AccessKeyId", "SecretAccessKey", "SessionToken"):
                found[f"call {n} {name}"] = rec.credentials[name]
        token = rec.params.get("WebIdentityToken")
        if token:
            found[f"call {n} JWT"] = token
            for part, segment in zip(("header", "payload", "sig"), token.split("."), strict=True):
                found[f"call {n} JWT {part}"] = segment
    return found


def in_clear(blobs: Mapping[str, bytes], secrets: Mapping[str, str]) -> list[str]:
    """Which secrets appear (as UTF-8, or JSON-escaped) in which blob."""
    hits = []
    for label, value in secrets.items():
        forms = {value.encode(), json.dumps(value)[1:-1].encode()}
        for where, blob in blobs.items():
            if any(form in blob for form in forms):
                hits.append(f"{label} in {where}")
    return hits


def table_dump(dynamodb: LocalDynamoDB, table: str) -> dict[str, bytes]:
    """Every item of the table, attribute names and values, as raw as DynamoDB returns them."""
    dump: dict[str, bytes] = {}
    for item in dynamodb.items(table):
        parts = []
        for name, value in sorted(item.items()):
            ((kind, data),) = value.items()
            parts.append(name.encode() + b"=" + (data if kind == "B" else str(data).encode()))
        dump[f"item {item['pk']['S']}"] = b"\n".join(parts)
    return dump


async def test_no_secret_in_items_names_logs_or_reprs(
    dynamodb_brokers: Callable[[], CredentialBroker],
    strict_sts: StrictSTS,
    dynamodb: LocalDynamoDB,
    table: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # botocore's too: it logs request and response bodies
    alice, bob = Role(arn("tenant-a"), subject="alice"), Role(arn("tenant-b"), subject="bob")
    strict_sts.reject_roles.add(bob.arn)
    writer, reader = dynamodb_brokers(), dynamodb_brokers()
    got = await writer.get(alice)
    assert (await reader.get(alice)).access_key_id == got.access_key_id  # shared
    with pytest.raises(CredentialsRejected):
        await writer.get(bob)  # leaves a (sealed) failure marker for the fleet
    secrets = secrets_of(strict_sts.requests)
    assert sum(label.endswith("SessionToken") for label in secrets) == 1
    identities = {"alice": writer.identity_key(alice), "bob": writer.identity_key(bob)}
    names = {
        f"{who} {form}": value
        for who, key in identities.items()
        for form, value in (
            ("role ARN", arn(f"tenant-{who[0]}")),
            ("subject", who),
            ("identity key", key),
            ("sha256(identity key)", hashlib.sha256(key.encode()).hexdigest()),
        )
    }
    dump = table_dump(dynamodb, table)
    assert writer._shared is not None
    cipher = writer._shared.store.cipher
    # Alice's value and Bob's failure marker under keyed names; the leases were released
    # (their items hold only the notification token).
    values = sorted(name for name in dump if name.startswith("item v#"))
    assert values == sorted(
        [
            f"item v#{cipher.store_key(identities['alice'])}",
            f"item v#{cipher.store_key('f|' + identities['bob'])}",
        ]
    )
    for name, blob in dump.items():
        if name.startswith("item l#"):
            assert b"owner=" not in blob, name
    assert in_clear(dump, secrets) == []
    assert in_clear(dump, {k: v for k, v in names.items() if "subject" not in k}) == []
    for blob in dump.values():  # subjects are short words: compare whole attribute values
        assert not ({b"alice", b"bob"} & set(blob.replace(b"=", b"\n").split(b"\n")))
    logs = "\n".join(r.getMessage() for r in caplog.records)
    assert "dynamodb" in logs.lower() and "PutItem" in logs  # botocore's DEBUG lines were seen
    # Access key ids are identifiers, not secrets: stscreds logs them (invalidate() names the
    # rejected one) and so does botocore's DEBUG log of the STS answer.
    not_logged = {k: v for k, v in secrets.items() if not k.endswith("AccessKeyId")}
    assert in_clear({"logs": logs.encode()}, not_logged) == []
    assert in_clear({"reprs": repr(writer._shared.store).encode()}, secrets) == []


# --- fleets of worker processes -------------------------------------------------------------


async def burst(
    workers: Sequence[Worker], tenants: Sequence[str], total: int, timeout: float = 60.0
) -> list[Response | BaseException]:
    """``total`` concurrent requests, one connection each, spread evenly over workers x tenants."""
    n = len(workers)
    return await asyncio.gather(
        *(
            workers[i % n].get(f"/creds?tenant={tenants[(i // n) % len(tenants)]}", timeout=timeout)
            for i in range(total)
        ),
        return_exceptions=True,
    )


def answers(responses: Sequence[Response | BaseException]) -> list[dict[str, Any]]:
    """The JSON bodies; fails with the first few failures if any request did not get a 200."""
    failed = [r for r in responses if isinstance(r, BaseException) or r.status != 200]
    assert not failed, f"{len(failed)} of {len(responses)} requests failed: {failed[:5]!r}"
    return [r.json() for r in responses if isinstance(r, Response)]


async def settled(sts: StrictSTS, timeout: float = 15.0) -> None:
    """Wait until every call that reached STS has been answered (and so is counted)."""
    deadline = time.monotonic() + timeout
    while len(sts.requests) < sts.calls:
        assert time.monotonic() < deadline, f"STS calls still in flight: {sts.calls}"
        await asyncio.sleep(0.02)


async def until_all_serve_new(
    workers: Sequence[Worker], tenant: str, old: str, timeout: float = 20.0
) -> dict[int, str]:
    """Poll ``/creds`` on each worker until it serves a key other than ``old``."""
    deadline = time.monotonic() + timeout
    keys: dict[int, str] = {}
    for worker in workers:
        while True:
            response = await worker.get(f"/creds?tenant={tenant}")
            assert response.status == 200, (response, worker.log()[-2000:])
            if (key := str(response.json()["access_key_id"])) != old:
                break
            assert time.monotonic() < deadline, f"{worker!r} still serves the old key"
            await asyncio.sleep(0.05)
        keys[worker.index] = key
    return keys


def live_leases(dynamodb: LocalDynamoDB, table: str) -> int:
    now = time.time()
    return sum(
        1
        for item in dynamodb.items(table)
        if "owner" in item and float(item["expires_at"]["N"]) > now
    )


@pytest.fixture
def make_fleet(
    tmp_path: Path, strict_sts: StrictSTS, dynamodb: LocalDynamoDB
) -> Iterator[Callable[..., DynamoDBFleet]]:
    """Start fleets of fleet_app workers on DynamoDB against StrictSTS (it discovers their JWKS)."""
    fleets: list[DynamoDBFleet] = []

    def make(
        table: str, *, size: int = 4, env: Mapping[str, str] | None = None, **kwargs: Any
    ) -> DynamoDBFleet:
        fleet = DynamoDBFleet(
            size,
            table=table,
            endpoint_url=dynamodb.url,
            workdir=tmp_path / f"fleet-{len(fleets)}",
            sts_url=strict_sts.url,
            store_key=generate_key(),
            env={**FLEET_ENV, **(env or {})},
            **kwargs,
        )
        fleets.append(fleet)
        strict_sts.configure(issuer=fleet.issuer, jwks=None)
        return fleet.start()

    try:
        yield make
    finally:
        for fleet in fleets:
            fleet.stop()


async def test_a_fleet_makes_one_sts_call_per_identity_per_cycle(
    make_fleet: Callable[..., DynamoDBFleet],
    strict_sts: StrictSTS,
    dynamodb: LocalDynamoDB,
    table: str,
) -> None:
    fleet = make_fleet(table)
    strict_sts.delay = 0.2  # the burst's requests overlap the exchange
    await fleet.ready()
    tenants = ("alpha", "beta")
    bodies = answers(await burst(fleet.workers, tenants, 120))
    await settled(strict_sts)
    assert {t: strict_sts.calls_for(arn(t)) for t in tenants} == {"alpha": 1, "beta": 1}
    pids = {worker.pid for worker in fleet}
    assert {b["pid"] for b in bodies} == pids
    first = {t: issued_keys(strict_sts, arn(t))[0] for t in tenants}
    assert {b["access_key_id"] for b in bodies} == set(first.values())

    # A refresh cycle: one more call per identity for the whole fleet, served by every worker.
    strict_sts.clock = lambda: time.time() + ADVISORY_OFFSET  # STS first: no future tokens
    await fleet.set_clock(ADVISORY_OFFSET)
    for tenant in tenants:
        refreshed = await until_all_serve_new(fleet.workers, tenant, first[tenant])
        assert set(refreshed.values()) == {issued_keys(strict_sts, arn(tenant))[-1]}
    await settled(strict_sts)
    assert {t: strict_sts.calls_for(arn(t)) for t in tenants} == {"alpha": 2, "beta": 2}
    assert live_leases(dynamodb, table) == 0  # every lease released

    # What the table holds: sealed values under keyed names, nothing in clear; nor in logs.
    probe = CredentialBroker(
        issuer=fleet.issuer,
        signing_keys=[SigningKey.generate("ES256")],
        sts_endpoint_url=strict_sts.url,
    )
    identities = [probe.identity_key(Role(arn(t), subject=f"tenant:{t}")) for t in tenants]
    await probe.aclose()
    cipher = StoreCipher([fleet.env["FLEET_STORE_KEY"]])
    dump = table_dump(dynamodb, table)
    assert sorted(n for n in dump if n.startswith("item v#")) == sorted(
        f"item v#{cipher.store_key(key)}" for key in identities
    )
    secrets = secrets_of(strict_sts.requests)
    assert sum(label.endswith("SessionToken") for label in secrets) == 4
    assert in_clear(dump, secrets) == []
    assert in_clear(dump, {f"identity {n}": key for n, key in enumerate(identities)}) == []
    assert in_clear({"worker logs": fleet.logs().encode()}, secrets) == []


async def test_killed_lease_holder_does_not_block_the_fleet(
    make_fleet: Callable[..., DynamoDBFleet],
    strict_sts: StrictSTS,
    dynamodb: LocalDynamoDB,
    table: str,
) -> None:
    lease_ttl = 2.0
    fleet = make_fleet(table, env={"FLEET_LEASE_TTL": str(lease_ttl)})
    await fleet.ready()
    holder, survivors = fleet[1], [fleet[0], fleet[2], fleet[3]]  # worker 0 is the issuer
    role_arn = arn("phoenix")
    try:
        strict_sts.hang = True
        doomed = asyncio.create_task(holder.get("/creds?tenant=phoenix", timeout=30))
        assert await asyncio.to_thread(strict_sts.wait_for_calls, 1, 15.0)
        assert live_leases(dynamodb, table) == 1  # the holder's, taken before STS
        holder.kill(signal.SIGKILL)
        strict_sts.release()
        with pytest.raises((ConnectionError, OSError)):
            await doomed  # the client of the dead worker got no answer

        started = time.monotonic()
        bodies = answers(await burst(survivors, ["phoenix"], 30))
        elapsed = time.monotonic() - started
        assert elapsed < lease_ttl + 5.0, elapsed  # a hang bound, not a benchmark
        await settled(strict_sts)
        # The dead holder's call (answered into a closed socket) and exactly one takeover.
        assert strict_sts.calls_for(role_arn) == 2
        served = {b["access_key_id"] for b in bodies}
        assert served == {issued_keys(strict_sts, role_arn)[-1]}
        assert {b["pid"] for b in bodies} == {w.pid for w in survivors}
        assert live_leases(dynamodb, table) == 0
    finally:
        strict_sts.release()


async def test_a_missing_table_is_a_clear_error_at_start_up_and_fails_open(
    make_fleet: Callable[..., DynamoDBFleet],
    strict_sts: StrictSTS,
    dynamodb: LocalDynamoDB,
) -> None:
    name = table_name()
    # An app that checks its store at start-up does not start, and says why.
    checked = make_fleet(name, size=1, check=True)
    with pytest.raises(RuntimeError, match="exited at start") as info:
        await checked.ready()
    log = str(info.value)
    assert f"DynamoDBTableNotFound: DynamoDB table '{name}' not found in region '{REGION}'" in log
    assert ".create_table()" in log
    assert "ClientError" not in log and "botocore" not in log  # not a botocore traceback

    # One that does not check serves from STS; each worker says once what is wrong.
    fleet = make_fleet(name, size=2, env={"FLEET_STORE_COOLDOWN": "0.5"})
    await fleet.ready()
    for round_ in range(3):
        answers(await burst(fleet.workers, [f"t{round_}"], 8))
        await asyncio.sleep(0.5)  # past the breaker's cooldown: the store is asked again
    await settled(strict_sts)
    for round_ in range(3):
        assert 1 <= strict_sts.calls_for(arn(f"t{round_}")) <= 2
    for worker in fleet:
        log = worker.log()
        assert log.count(f"DynamoDB table '{name}' not found in region '{REGION}'") == 1, log
        assert log.count("shared store unavailable (DynamoDBTableNotFound)") == 1, log

    # Once the table exists, sharing starts: one call for the fleet.
    await asyncio.to_thread(plain_store(dynamodb, name).create_table)
    await asyncio.sleep(0.6)
    answers(await burst(fleet.workers, ["after"], 8))
    await settled(strict_sts)
    assert strict_sts.calls_for(arn("after")) == 1


async def test_throttling_fails_open_and_sharing_resumes(
    make_fleet: Callable[..., DynamoDBFleet],
    strict_sts: StrictSTS,
    dynamodb: LocalDynamoDB,
    table: str,
) -> None:
    cooldown = 1.0
    fleet = make_fleet(table, env={"FLEET_STORE_COOLDOWN": str(cooldown)})
    strict_sts.delay = 0.1
    await fleet.ready()
    answers(await burst(fleet.workers, ["before"], 40))
    await settled(strict_sts)
    assert strict_sts.calls_for(arn("before")) == 1

    dynamodb.throttle("ProvisionedThroughputExceededException")
    throttled_since, rounds = time.monotonic(), 0
    # Keep firing, old and new identities, past a few breaker cooldowns.
    while rounds < 3 or time.monotonic() - throttled_since < 3 * cooldown:
        assert rounds < 30
        answers(await burst(fleet.workers, [f"throttled-{rounds}", "before"], 32))
        rounds += 1
    await settled(strict_sts)
    assert strict_sts.calls_for(arn("before")) == 1  # served from each worker's L1
    for n in range(rounds):
        # Each worker went to STS by itself (single-flight within the process).
        assert 1 <= strict_sts.calls_for(arn(f"throttled-{n}")) <= 4
    assert dynamodb.calls["GetItem"] > 0

    dynamodb.clear_faults()
    deadline = time.monotonic() + 20.0
    attempts: list[int] = []
    while not attempts or attempts[-1] != 1:
        assert time.monotonic() < deadline, f"sharing did not resume: calls per try {attempts}"
        tenant = f"back-{len(attempts)}"
        answers(await burst(fleet.workers, [tenant], 40))
        await settled(strict_sts)
        attempts.append(strict_sts.calls_for(arn(tenant)))
    for worker in fleet:
        log = worker.log()
        # One warning for the outage (naming the throttling), one when the store is back.
        assert log.count("shared store unavailable (DynamoDBThrottled)") == 1, log
        assert log.count("shared store is back") == 1, log
