"""moto's DynamoDB on 127.0.0.1 (free port) for the store tests, with injectable faults, and
fleets of worker processes that share a DynamoDBStore (``fleet_app.py`` with
``FLEET_STORE=dynamodb``).

The server is moto's own WSGI app (what ``moto.server.ThreadedMotoServer`` serves) behind a
small WSGI wrapper that:

- runs one call at a time: moto's threaded server handles requests concurrently and its
  DynamoDB backend checks a condition and then writes without a lock, whereas DynamoDB applies
  the writes to one item one at a time. Serialised, moto's conditional writes are atomic, as
  the lease tests (and worker processes racing for a lease) need;
- counts calls by operation (``X-Amz-Target``);
- answers chosen calls with DynamoDB's own JSON throttling errors, or answers late.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from servers.fleet import Fleet
from servers.moto import TEST_CREDENTIALS, MotoServer

__all__ = ["THROTTLING_CODES", "DynamoDBFleet", "LocalDynamoDB", "worker_env"]

#: DynamoDB's throttling errors, by code: the ``__type`` of its JSON error body.
THROTTLING_CODES = {
    "ProvisionedThroughputExceededException": (
        "com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException",
        "The level of configured provisioned throughput for the table was exceeded. "
        "Consider increasing your provisioning level with the UpdateTable API.",
    ),
    "ThrottlingException": (
        "com.amazon.coral.availability#ThrottlingException",
        "Rate of requests exceeds the allowed throughput.",
    ),
    "RequestLimitExceeded": (
        "com.amazonaws.dynamodb.v20120810#RequestLimitExceeded",
        "Throughput exceeds the current throughput limit for your account. "
        "Please contact AWS Support at https://aws.amazon.com/support request a limit increase",
    ),
}


class LocalDynamoDB(MotoServer):
    """moto's DynamoDB on loopback, one call at a time; ``throttle()``, ``delay``: faults."""

    name = "local-dynamodb"

    def __init__(self) -> None:
        super().__init__()
        self._serial = threading.Lock()
        #: Seconds every call waits before it is answered (outside the one-at-a-time lock).
        self.delay = 0.0
        self._throttle: tuple[str, frozenset[str] | None] | None = None
        self._raw: Any = None

    def start(self) -> LocalDynamoDB:
        super().start()
        return self

    def stop(self) -> None:
        if self._raw is not None:
            self._raw.close()
        super().stop()

    def throttle(
        self, code: str = "ProvisionedThroughputExceededException", operations: Iterable[str] = ()
    ) -> None:
        """Answer every call (or those of ``operations``) with throttling error ``code``."""
        assert code in THROTTLING_CODES, code
        with self._state:
            self._throttle = (code, frozenset(operations) or None)

    def clear_faults(self) -> None:
        with self._state:
            self._throttle = None
            self.delay = 0.0

    def client(self, region: str = "eu-west-1") -> Any:
        """A new raw botocore DynamoDB client on this server (``raw`` is a shared one)."""
        return self.session().create_client("dynamodb", region_name=region, endpoint_url=self.url)

    @property
    def raw(self) -> Any:
        """A raw client (eu-west-1), made once: to look at and tamper with what stores wrote."""
        with self._state:
            if self._raw is None:
                self._raw = self.client()
            return self._raw

    def items(self, table: str) -> list[dict[str, Any]]:
        """Every item of ``table`` (a full scan, eu-west-1), as DynamoDB's JSON."""
        items: list[dict[str, Any]] = []
        for page in self.raw.get_paginator("scan").paginate(TableName=table):
            items.extend(page["Items"])
        return items

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        operation = self._count(environ)
        with self._state:
            throttle, delay = self._throttle, self.delay
        if delay:
            time.sleep(delay)
        if throttle is not None and (throttle[1] is None or operation in throttle[1]):
            error_type, message = THROTTLING_CODES[throttle[0]]
            body = json.dumps({"__type": error_type, "message": message}).encode()
            start_response(
                "400 Bad Request",
                [
                    ("Content-Type", "application/x-amz-json-1.0"),
                    ("Content-Length", str(len(body))),
                    ("x-amzn-RequestId", uuid.uuid4().hex),
                ],
            )
            return [body]
        with self._serial:
            return self._forward(environ, start_response)


# No configuration files and no instance metadata: the environment's credentials only.
_AWS_ENV = {
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}


def worker_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` for a worker process on this server: fake credentials, none of the host's AWS
    configuration (no profile, role, config file or instance metadata)."""
    clean = {name: value for name, value in env.items() if not name.startswith("AWS_")}
    return {**clean, **TEST_CREDENTIALS, **_AWS_ENV}


class DynamoDBFleet(Fleet):
    """A Fleet of ``fleet_app`` workers sharing a DynamoDBStore (``FLEET_STORE=dynamodb``).

    ``table``, ``region``, ``endpoint_url``: the store's; with ``check=True`` each worker calls
    ``store.check()`` at import, as an app's start-up would. The workers sign with fake
    credentials from the environment (botocore's default chain), never the host's.
    """

    def __init__(
        self,
        size: int,
        *,
        table: str,
        endpoint_url: str,
        region: str = "eu-west-1",
        check: bool = False,
        env: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            size,
            store="dynamodb",
            store_url=endpoint_url,
            env={
                **TEST_CREDENTIALS,
                **_AWS_ENV,
                "FLEET_DYNAMODB_TABLE": table,
                "FLEET_DYNAMODB_REGION": region,
                "FLEET_DYNAMODB_CHECK": "1" if check else "",
                **(env or {}),
            },
            **kwargs,
        )
        # Nothing of the host's AWS configuration may reach the workers (a profile, a role).
        for name in [n for n in self.env if n.startswith("AWS_")]:
            if name not in TEST_CREDENTIALS and name not in _AWS_ENV:
                del self.env[name]
