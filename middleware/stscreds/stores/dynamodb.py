"""DynamoDBStore: the CredentialStore protocol on one DynamoDB table, shared by a whole fleet.

Design, in short:

- One table, partition key ``pk`` (string), no sort key. A store key has up to two items:
  ``v#<key>`` holds its value (``value``, binary) and ``l#<key>`` its lease (``owner``) and
  its notification token (``token``). The value is a separate item because it lives for hours
  and a lease for seconds: each item carries its own TTL, and a put never rewrites a lease. The
  lease and the token share an item so that one read tells a waiter both.
- Every item has ``expires_at`` (epoch seconds, fractional), which decides: every read and
  every condition checks it. ``ttl`` (whole epoch seconds, a minute later) is only for
  DynamoDB's TTL deletion, which is lazy (up to days late) and merely keeps the table small.
- A lease is one conditional PutItem (``attribute_not_exists(owner) OR expires_at <= :now OR
  owner = :owner``). DynamoDB applies the writes to one item one at a time, so of racing
  workers exactly one sees its condition hold. Release (DeleteItem) and extend (UpdateItem)
  are conditioned on the owner.
- Reads are strongly consistent (``ConsistentRead``): a value or lease written a moment ago
  by another host is seen, at 1 read unit per 4 KB instead of half of one.
- Expiry is the wall clock (``clock``, default ``time.time``) of the host making the call:
  there is no server-side time in DynamoDB expressions. Hosts S seconds apart (NTP keeps them
  within milliseconds) may see a dead holder's lease end up to S seconds early or late; the
  broker judges the credentials themselves on STS's clock whatever the store says.
- DynamoDB cannot notify, so ``wait`` polls the lease item (owner and token) with jittered
  backoff (``poll_interval``: 50 ms growing to 500 ms); a ``notify`` in this process wakes
  its waiters at once.
- botocore blocks: every call runs on the store's own thread pool, never the event loop.
  botocore retries nothing (the broker's breaker decides what a failure means) and its
  connect and read timeouts bound each call on its thread; the broker's ``store_timeout``
  bounds it for the caller.
- Throttling raises ``DynamoDBThrottled``; a missing table raises ``DynamoDBTableNotFound``,
  whose message (logged once) names the table, the region and how to create it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import re
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import urlsplit

import botocore.session
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import ClientError

from .._region import default_region
from ._cipher import StoreCipher
from ._waiters import consume, registered, wake

__all__ = ["DynamoDBError", "DynamoDBStore", "DynamoDBTableNotFound", "DynamoDBThrottled"]

logger = logging.getLogger("stscreds")

_T = TypeVar("_T")
_Item = dict[str, Any]
_Watch = tuple[str | None, str | None]  # (notify token, live lease owner) of one key

_VALUE, _LEASE = "v#", "l#"
# Every expression names its attributes through placeholders: "owner", "value", "token" and
# "ttl" are DynamoDB reserved words.
_NAMES = {
    "#owner": "owner",
    "#expires_at": "expires_at",
    "#token": "token",
    "#ttl": "ttl",
}
_ACQUIRE = "attribute_not_exists(#owner) OR #expires_at <= :now OR #owner = :owner"
_EXTEND = "#owner = :owner AND #expires_at > :now"
_THROTTLED = frozenset(
    {"ProvisionedThroughputExceededException", "ThrottlingException", "RequestLimitExceeded"}
)
_CONDITION_FAILED = "ConditionalCheckFailedException"
# DynamoDB deletes an item once its ttl is past on *its* clock; the grace keeps a host whose
# clock runs behind from having items deleted while they are still live by its own.
_TTL_GRACE = 60
# A waiter compares tokens only while it waits (seconds): a token item may go after a minute.
_TOKEN_LIFETIME = 60.0
# Tokens the last failed acquire or holder() saw, until wait() uses them; a bound so unused
# keys cannot pile up.
_SEEN_LIMIT = 4096
_TABLE_NAME = re.compile(r"[A-Za-z0-9_.-]{3,255}|arn:aws[a-z-]*:dynamodb:.+:table/.+")


class DynamoDBError(Exception):
    """A DynamoDB call of the store failed; the message names the error code, never a value."""


class DynamoDBTableNotFound(DynamoDBError):
    """The store's table does not exist (in that region, for the account of the credentials)."""


class DynamoDBThrottled(DynamoDBError):
    """DynamoDB throttled a call of the store; the broker then uses STS directly."""


class DynamoDBStore:
    """A CredentialStore on one DynamoDB table: values and leases as items with a TTL.

    For a fleet on AWS without a Redis to run: the table is serverless, and the app needs
    only ``dynamodb:GetItem``, ``PutItem``, ``UpdateItem`` and ``DeleteItem`` on it. Create
    the table once with ``create_table()`` (or the CloudFormation/Terraform snippets of the
    docs). Calls are signed with botocore's default credentials (or ``session``/``client``),
    never with credentials the store holds. Waiters in other processes see a ``notify`` or
    a released lease within ``poll_interval[1]`` seconds.
    """

    def __init__(
        self,
        table: str,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        encryption_keys: Sequence[bytes | str] | None = None,
        allow_plaintext: bool = False,
        session: botocore.session.Session | None = None,
        client: BaseClient | None = None,
        connect_timeout: float = 1.0,
        read_timeout: float = 1.0,
        max_workers: int = 8,
        poll_interval: tuple[float, float] = (0.05, 0.5),
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Use ``table`` in ``region`` (botocore's default region if None); connects lazily.

        ``session``: a botocore session to make the client from (its credentials, profile
        and region). ``client``: a botocore DynamoDB client to use as it is (its own timeouts
        and retries; left open by ``aclose``; make it in the process that uses it).
        ``connect_timeout``/``read_timeout`` bound each call on the store's threads, of which
        there are ``max_workers``. ``poll_interval``: the first and the longest pause of a
        waiter's polls. ``clock``: wall-clock time for expiry (tests move it).
        """
        self.cipher = StoreCipher(encryption_keys, allow_plaintext=allow_plaintext)
        if not isinstance(table, str) or not _TABLE_NAME.fullmatch(table):
            raise ValueError(
                "table: must be a DynamoDB table name (3-255 of A-Z a-z 0-9 _ . -) or ARN"
            )
        for name, value in (("connect_timeout", connect_timeout), ("read_timeout", read_timeout)):
            if not _positive(value):
                raise ValueError(f"{name}: must be a positive number of seconds")
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError("max_workers: must be an integer >= 1")
        if (
            not isinstance(poll_interval, tuple)
            or len(poll_interval) != 2
            or not all(_positive(v) for v in poll_interval)
            or poll_interval[0] > poll_interval[1]
        ):
            raise ValueError(
                "poll_interval: must be (first, longest) seconds, 0 < first <= longest"
            )
        #: The table's name (or ARN).
        self.table = table
        self._owns_client = client is None
        if client is not None:
            if session is not None or region is not None or endpoint_url is not None:
                raise TypeError("client: give either a client or session/region/endpoint_url")
            region = client.meta.region_name
            endpoint_url = client.meta.endpoint_url
        else:
            if session is None:
                session = botocore.session.get_session()
            # Resolved now (environment and config files), so that a missing region is a
            # clear error here rather than a NoRegionError at every request.
            region = region or default_region(session)
            if not region:
                raise ValueError(
                    "region: none given and botocore has no default "
                    "(AWS_REGION, AWS_DEFAULT_REGION or the profile's region)"
                )
        #: The region the table is in.
        self.region: str = str(region)
        self._endpoint_url = endpoint_url
        self._session = session
        self._config: Config | None = None
        if session is not None:
            from .. import __version__

            self._config = Config(
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                # One attempt: the broker decides what a failure means (its breaker), and a
                # retry after a backoff would outlast store_timeout anyway, holding a thread.
                retries={"total_max_attempts": 1},
                max_pool_connections=max_workers,
                # Built once: botocore otherwise assembles its User-Agent at every call.
                user_agent=f"{session.user_agent()} stscreds/{__version__}",
            )
        self._client: BaseClient | None = client
        self._max_workers = max_workers
        self._poll_first, self._poll_longest = (float(v) for v in poll_interval)
        self._clock = clock
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._executor = self._new_executor()
        # Clients dropped at fork: kept referenced, never closed in the child.
        self._inherited: list[BaseClient] = []
        self._reported_missing = False
        self._closed = False
        self._seen: dict[str, _Watch | _Changed] = {}
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}

    # --- the protocol -----------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        """The value stored under ``key``, or None if there is none or it expired."""
        return await self._run("GetItem", lambda client: self._get(client, key))

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        """Store exactly the bytes ``value`` under ``key`` for ``ttl`` seconds."""
        value = bytes(value)
        await self._run("PutItem", lambda client: self._put(client, key, value, ttl))

    async def acquire(self, key: str, owner: str, ttl: float) -> bool:
        """Take the lease on ``key`` for ``ttl`` seconds if it is free, expired or ours."""
        won, seen = await self._run(
            "PutItem", lambda client: self._acquire(client, key, owner, ttl)
        )
        if won:
            self._seen.pop(key, None)
        elif seen is not None:
            # What the lease looked like when we lost: a waiter that follows compares
            # against it, so a release or notify landing before its first poll is not missed.
            self._remember(key, seen, replace=True)
        return won

    async def release(self, key: str, owner: str) -> bool:
        """Give up the lease if ``owner`` holds it; True if it did."""
        return await self._run("DeleteItem", lambda client: self._release(client, key, owner))

    async def extend(self, key: str, owner: str, ttl: float) -> bool:
        """Push the lease to ``ttl`` seconds from now if ``owner`` holds it and it is live."""
        return await self._run("UpdateItem", lambda client: self._extend(client, key, owner, ttl))

    async def holder(self, key: str) -> str | None:
        """The owner of the live lease on ``key``, or None."""
        watch = await self._run("GetItem", lambda client: self._read_watch(client, key))
        self._remember(key, watch, replace=False)
        return watch[1]

    async def notify(self, key: str) -> None:
        """Wake this store's waiters on ``key`` now, other processes' at their next poll."""
        self._check_open()
        self._wake(key)
        await self._run("UpdateItem", lambda client: self._notify(client, key))

    async def wait(self, key: str, timeout: float) -> None:
        """Return on a notify of ``key`` or a change of its lease, or after ``timeout`` seconds.

        Polls with jittered backoff; never returns later than ``timeout``, even when
        DynamoDB is slow.
        """
        self._check_open()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        with registered(self._waiters, key) as woken:
            seen = self._seen.pop(key, None)
            if isinstance(seen, _Changed):
                return
            baseline = seen
            if baseline is None:
                baseline = await self._watch(key, woken, deadline)
                if baseline is None:
                    return
            step = self._poll_first
            while True:
                remaining = deadline - loop.time()
                # Jitter: waiters in many processes that started together poll apart.
                pause = step * random.uniform(0.5, 1.0)  # noqa: S311 - spreads load, not a secret
                if pause >= remaining:
                    # No poll at the deadline: the caller reads the store again anyway.
                    await asyncio.wait((woken,), timeout=max(0.0, remaining))
                    return
                await asyncio.wait((woken,), timeout=pause)
                if woken.done():
                    return
                if await self._watch(key, woken, deadline) != baseline:
                    return
                step = min(step * 2, self._poll_longest)

    async def aclose(self) -> None:
        """Wake waiters, stop the threads and close the client this store made."""
        if self._closed:
            return
        self._closed = True
        for key in list(self._waiters):
            self._wake(key)
        if os.getpid() != self._pid:
            self._after_fork()
        # Not waiting for a call still on a thread: it ends within its read timeout.
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._owns_client and self._client is not None:
            self._client.close()

    # --- start-up helpers (blocking) --------------------------------------------------------

    def check(self) -> None:
        """Make sure the table exists with the key this store needs and can be read; blocking.

        For start-up (one GetItem): raises ``DynamoDBTableNotFound`` naming the table, the
        region and how to create it, or ``DynamoDBError`` for a table with another key
        schema or credentials not allowed to read it, instead of failing open at requests.
        """
        self._check_open()
        if os.getpid() != self._pid:
            self._after_fork()
        client = self._client_for_this_thread()
        try:
            client.get_item(TableName=self.table, Key={"pk": {"S": "check#"}})
        except ClientError as error:
            code = _code(error)
            if code == "ValidationException":
                raise DynamoDBError(
                    f"DynamoDB table {self.table!r} ({self.region}) does not have the key this "
                    "store needs: a partition key 'pk' of type string and no sort key "
                    f"({code}); give it a table of its own (DynamoDBStore.create_table())"
                ) from None
            if code == "AccessDeniedException":
                raise DynamoDBError(
                    f"not allowed to read DynamoDB table {self.table!r} ({self.region}): the "
                    "app needs dynamodb:GetItem, PutItem, UpdateItem and DeleteItem on it"
                ) from None
            raise self._error("GetItem", error, log=False) from None
        self._found()

    def create_table(
        self,
        *,
        billing: str = "PAY_PER_REQUEST",
        read_capacity: int = 5,
        write_capacity: int = 5,
        timeout: float = 300.0,
    ) -> bool:
        """Create the table (key ``pk``, TTL on ``ttl``) unless it exists, and enable its TTL.

        Blocking and idempotent: for a deploy script or start-up, not a request. ``billing``:
        ``"PAY_PER_REQUEST"`` or ``"PROVISIONED"`` (with the capacities). Waits up to
        ``timeout`` seconds for the table to be active. True if it created the table. Needs
        dynamodb:CreateTable, DescribeTable, DescribeTimeToLive and UpdateTimeToLive.
        """
        self._check_open()
        params: dict[str, Any] = {
            "TableName": self.table,
            "AttributeDefinitions": [{"AttributeName": "pk", "AttributeType": "S"}],
            "KeySchema": [{"AttributeName": "pk", "KeyType": "HASH"}],
            "BillingMode": billing,
        }
        if billing == "PROVISIONED":
            params["ProvisionedThroughput"] = {
                "ReadCapacityUnits": read_capacity,
                "WriteCapacityUnits": write_capacity,
            }
        elif billing != "PAY_PER_REQUEST":
            raise ValueError('billing: must be "PAY_PER_REQUEST" or "PROVISIONED"')
        if os.getpid() != self._pid:
            self._after_fork()
        client = self._client_for_this_thread()
        created = True
        try:
            client.create_table(**params)
        except ClientError as error:
            if _code(error) != "ResourceInUseException":  # in use: it exists already
                raise self._error("CreateTable", error, log=False) from None
            created = False
        description = self._wait_active(client, timeout)
        keys = description.get("KeySchema")
        types = {
            a["AttributeName"]: a["AttributeType"] for a in description["AttributeDefinitions"]
        }
        if keys != [{"AttributeName": "pk", "KeyType": "HASH"}] or types.get("pk") != "S":
            raise DynamoDBError(
                f"DynamoDB table {self.table!r} ({self.region}) exists with another key schema; "
                "this store needs a partition key 'pk' of type string and no sort key"
            )
        self._enable_ttl(client)
        self._found()
        return created

    def __repr__(self) -> str:
        where = f", endpoint={_where(self._endpoint_url)!r}" if self._endpoint_url else ""
        return (
            f"DynamoDBStore(table={self.table!r}, region={self.region!r}{where}, {self.cipher!r})"
        )

    def reset_after_fork(self) -> None:
        """In a forked child: new threads and a new client (the parent's are left alone)."""
        self._after_fork()

    # --- on the event loop ------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("DynamoDBStore is closed")

    def _submit(self, operation: str, job: Callable[[BaseClient], _T]) -> asyncio.Future[_T]:
        self._check_open()
        if os.getpid() != self._pid:
            self._after_fork()
        return asyncio.wrap_future(self._executor.submit(self._call, operation, job))

    async def _run(self, operation: str, job: Callable[[BaseClient], _T]) -> _T:
        # A cancelled caller (the broker's store_timeout) does not stop the call: it ends on
        # its thread within the read timeout, and its answer is dropped. Each call is one
        # atomic DynamoDB operation, so nothing is left half done.
        return await self._submit(operation, job)

    async def _watch(self, key: str, woken: asyncio.Future[None], deadline: float) -> _Watch | None:
        """The key's (token, owner), or None if woken or out of time before the answer."""
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            return None
        answer = self._submit("GetItem", lambda client: self._read_watch(client, key))
        # Mark an abandoned answer's error as seen, so asyncio does not log it.
        answer.add_done_callback(consume)
        await asyncio.wait((answer, woken), timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        if woken.done() or not answer.done():
            return None
        return answer.result()

    def _remember(self, key: str, watch: _Watch, *, replace: bool) -> None:
        before = self._seen.get(key)
        if before is not None and not replace:
            if before != watch:
                # It changed between the failed acquire and now: the wait returns at once.
                self._seen[key] = _CHANGED
            return
        if key not in self._seen and len(self._seen) >= _SEEN_LIMIT:
            self._seen.pop(next(iter(self._seen)), None)
        self._seen[key] = watch

    def _wake(self, key: str) -> None:
        wake(self._waiters, key)

    def _after_fork(self) -> None:
        # A forked worker (gunicorn --preload) inherits this object but not its threads, and
        # must not share the parent's HTTP connections: start afresh.
        with self._lock:
            if os.getpid() == self._pid:
                return
            if self._owns_client and self._client is not None:
                self._inherited.append(self._client)  # kept referenced: never closed here
                self._client = None
            self._waiters.clear()
            self._seen.clear()
            self._executor = self._new_executor()
            self._pid = os.getpid()

    def _new_executor(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(self._max_workers, thread_name_prefix="stscreds-dynamodb")

    # --- on the store's threads -------------------------------------------------------------

    def _client_for_this_thread(self) -> BaseClient:
        # Making a client loads the service model and resolves credentials (milliseconds to
        # seconds): never on the event loop, once per process.
        with self._lock:
            if self._client is None:
                assert self._session is not None  # only a client passed in has no session
                self._client = self._session.create_client(
                    "dynamodb",
                    region_name=self.region,
                    endpoint_url=self._endpoint_url,
                    config=self._config,
                )
            return self._client

    def _call(self, operation: str, job: Callable[[BaseClient], _T]) -> _T:
        client = self._client if self._client is not None else self._client_for_this_thread()
        try:
            result = job(client)
        except ClientError as error:
            # Not chained: a ClientError's response may hold the item a condition saw.
            raise self._error(operation, error) from None
        if self._reported_missing:
            self._found()
        return result

    def _error(self, operation: str, error: ClientError, *, log: bool = True) -> DynamoDBError:
        code = _code(error)
        if code in _THROTTLED:
            return DynamoDBThrottled(
                f"DynamoDB throttled {operation} on table {self.table!r} ({code})"
            )
        if code == "ResourceNotFoundException":
            missing = DynamoDBTableNotFound(
                f"DynamoDB table {self.table!r} not found in region {self.region!r} (for the "
                "account of the credentials in use): create it once with "
                f"DynamoDBStore({self.table!r}, region={self.region!r}).create_table(), or with "
                "the CloudFormation or Terraform snippet of the stscreds docs (Shared stores, "
                "DynamoDB)"
            )
            if log:
                with self._lock:
                    first, self._reported_missing = not self._reported_missing, True
                if first:
                    # The broker logs only the error's type: say once here what to do.
                    logger.error(
                        "DynamoDB table %r not found in region %r: create it once with "
                        "DynamoDBStore(...).create_table() or the docs' CloudFormation or "
                        "Terraform snippet (Shared stores, DynamoDB)",
                        self.table,
                        self.region,
                    )
            return missing
        return DynamoDBError(f"DynamoDB {operation} on table {self.table!r} failed ({code})")

    def _found(self) -> None:
        with self._lock:
            self._reported_missing = False

    def _read(self, client: BaseClient, pk: str) -> _Item | None:
        answer = client.get_item(TableName=self.table, Key={"pk": {"S": pk}}, ConsistentRead=True)
        item: _Item | None = answer.get("Item")
        return item

    def _get(self, client: BaseClient, key: str) -> bytes | None:
        item = self._read(client, _VALUE + key)
        if item is None or not _live(item, self._clock()):
            # Expired items stay until DynamoDB's lazy TTL deletion: the expiry is ours.
            return None
        value = item.get("value", {}).get("B")
        return bytes(value) if isinstance(value, bytes | bytearray) else None

    def _put(self, client: BaseClient, key: str, value: bytes, ttl: float) -> None:
        expires_at = self._clock() + ttl
        client.put_item(
            TableName=self.table,
            Item={
                "pk": {"S": _VALUE + key},
                "value": {"B": value},
                "expires_at": _number(expires_at),
                "ttl": _deletion_time(expires_at),
            },
        )

    def _acquire(
        self, client: BaseClient, key: str, owner: str, ttl: float
    ) -> tuple[bool, _Watch | None]:
        now = self._clock()
        try:
            client.put_item(
                TableName=self.table,
                Item={
                    "pk": {"S": _LEASE + key},
                    "owner": {"S": owner},
                    "expires_at": _number(now + ttl),
                    "ttl": _deletion_time(now + ttl),
                },
                ConditionExpression=_ACQUIRE,
                ExpressionAttributeNames=_names("#owner", "#expires_at"),
                ExpressionAttributeValues={":now": _number(now), ":owner": {"S": owner}},
                # The lease as it was, at no extra cost: the baseline of the wait to come.
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except ClientError as error:
            if _code(error) != _CONDITION_FAILED:
                raise
            item = error.response.get("Item")
            return False, (None if not isinstance(item, dict) else _watch_of(item, now))
        return True, None

    def _release(self, client: BaseClient, key: str, owner: str) -> bool:
        try:
            client.delete_item(
                TableName=self.table,
                Key={"pk": {"S": _LEASE + key}},
                ConditionExpression="#owner = :owner",
                ExpressionAttributeNames=_names("#owner"),
                ExpressionAttributeValues={":owner": {"S": owner}},
            )
        except ClientError as error:
            if _code(error) != _CONDITION_FAILED:
                raise
            return False
        return True

    def _extend(self, client: BaseClient, key: str, owner: str, ttl: float) -> bool:
        now = self._clock()
        try:
            client.update_item(
                TableName=self.table,
                Key={"pk": {"S": _LEASE + key}},
                UpdateExpression="SET #expires_at = :expires_at, #ttl = :ttl",
                ConditionExpression=_EXTEND,
                ExpressionAttributeNames=_names("#owner", "#expires_at", "#ttl"),
                ExpressionAttributeValues={
                    ":now": _number(now),
                    ":owner": {"S": owner},
                    ":expires_at": _number(now + ttl),
                    ":ttl": _deletion_time(now + ttl),
                },
            )
        except ClientError as error:
            if _code(error) != _CONDITION_FAILED:
                raise
            return False
        return True

    def _notify(self, client: BaseClient, key: str) -> None:
        # On the lease item, whose ttl (if any) it keeps: a lease must not lose its item to a
        # token's shorter life. A new random token is a change every poller sees.
        client.update_item(
            TableName=self.table,
            Key={"pk": {"S": _LEASE + key}},
            UpdateExpression="SET #token = :token, #ttl = if_not_exists(#ttl, :ttl)",
            ExpressionAttributeNames=_names("#token", "#ttl"),
            ExpressionAttributeValues={
                ":token": {"S": secrets.token_hex(16)},
                ":ttl": _deletion_time(self._clock() + _TOKEN_LIFETIME),
            },
        )

    def _read_watch(self, client: BaseClient, key: str) -> _Watch:
        item = self._read(client, _LEASE + key)
        return (None, None) if item is None else _watch_of(item, self._clock())

    def _wait_active(self, client: BaseClient, timeout: float) -> dict[str, Any]:
        give_up_at = time.monotonic() + timeout
        while True:
            try:
                table: dict[str, Any] = client.describe_table(TableName=self.table)["Table"]
            except ClientError as error:
                raise self._error("DescribeTable", error, log=False) from None
            if table.get("TableStatus") == "ACTIVE":
                return table
            if time.monotonic() >= give_up_at:
                raise DynamoDBError(
                    f"DynamoDB table {self.table!r} ({self.region}) is not active after "
                    f"{timeout:g}s (status {table.get('TableStatus')})"
                )
            time.sleep(1.0)  # a deploy script's thread, never the event loop

    def _enable_ttl(self, client: BaseClient) -> None:
        try:
            description = client.describe_time_to_live(TableName=self.table)
            ttl = description.get("TimeToLiveDescription", {})
            status, attribute = ttl.get("TimeToLiveStatus"), ttl.get("AttributeName")
            if status in ("ENABLED", "ENABLING"):
                if attribute != "ttl":
                    raise DynamoDBError(
                        f"DynamoDB table {self.table!r} ({self.region}) has TTL on attribute "
                        f"{attribute!r}; this store's items expire by 'ttl'"
                    )
                return
            if status == "DISABLING":
                raise DynamoDBError(
                    f"DynamoDB table {self.table!r} ({self.region}): TTL is being disabled; "
                    "enable it on attribute 'ttl' once that is done (up to an hour)"
                )
            client.update_time_to_live(
                TableName=self.table,
                TimeToLiveSpecification={"Enabled": True, "AttributeName": "ttl"},
            )
        except ClientError as error:
            raise self._error("UpdateTimeToLive", error, log=False) from None


class _Changed:
    """Marks a key whose lease changed after a failed acquire, before its wait began."""


_CHANGED = _Changed()


def _positive(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", "Unknown"))


def _names(*placeholders: str) -> dict[str, str]:
    return {placeholder: _NAMES[placeholder] for placeholder in placeholders}


def _number(value: float) -> dict[str, str]:
    # Fixed-point: DynamoDB numbers are decimal strings; microseconds are plenty.
    return {"N": f"{value:.6f}"}


def _deletion_time(expires_at: float) -> dict[str, str]:
    # DynamoDB's TTL attribute is whole epoch seconds.
    return {"N": str(math.ceil(expires_at) + _TTL_GRACE)}


def _live(item: _Item, now: float) -> bool:
    """True if ``item`` has not expired by ``now`` (a missing or garbled expiry has)."""
    try:
        return float(item["expires_at"]["N"]) > now
    except (KeyError, TypeError, ValueError):
        return False


def _watch_of(item: _Item, now: float) -> _Watch:
    token = item.get("token", {}).get("S")
    owner = item.get("owner", {}).get("S")
    return (
        token if isinstance(token, str) else None,
        owner if isinstance(owner, str) and _live(item, now) else None,
    )


def _where(endpoint_url: str) -> str:
    """``endpoint_url`` without any user information it may carry."""
    parts = urlsplit(endpoint_url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"
