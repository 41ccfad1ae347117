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

import collections
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import botocore.session

from servers.fleet import Fleet

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

# Fake credentials for moto (it checks none), also given to worker processes.
TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


class LocalDynamoDB:
    """moto's DynamoDB on loopback, one call at a time; ``throttle()``, ``delay``: faults."""

    def __init__(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

        self._moto = DomainDispatcherApplication(create_backend_app)
        self._serial = threading.Lock()
        self._state = threading.Lock()
        #: Calls received (faults included), by operation name (``GetItem``, ``PutItem``...).
        self.calls: collections.Counter[str] = collections.Counter()
        #: Seconds every call waits before it is answered (outside the one-at-a-time lock).
        self.delay = 0.0
        self._throttle: tuple[str, frozenset[str] | None] | None = None
        self._raw: Any = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def start(self) -> LocalDynamoDB:
        from moto.moto_server.werkzeug_app import MotoRequestHandler
        from werkzeug.serving import make_server

        class QuietHandler(MotoRequestHandler):
            def log_request(self, *args: Any, **kwargs: Any) -> None:
                """No access log line per request."""

        self._server = make_server(
            "127.0.0.1", 0, self._app, threaded=True, request_handler=QuietHandler
        )
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="local-dynamodb", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._raw is not None:
            self._raw.close()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)

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

    def session(self) -> botocore.session.Session:
        """A botocore session with moto's fake credentials (none of the host's)."""
        session = botocore.session.Session()
        session.set_credentials(**_lower(TEST_CREDENTIALS))
        return session

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
        operation = str(environ.get("HTTP_X_AMZ_TARGET", "")).rpartition(".")[2]
        with self._state:
            self.calls[operation] += 1
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
            answer = self._moto(environ, start_response)
            try:
                return [b"".join(answer)]
            finally:
                close = getattr(answer, "close", None)
                if close is not None:
                    close()


def _lower(credentials: dict[str, str]) -> dict[str, str]:
    return {
        "access_key": credentials["AWS_ACCESS_KEY_ID"],
        "secret_key": credentials["AWS_SECRET_ACCESS_KEY"],
    }


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
