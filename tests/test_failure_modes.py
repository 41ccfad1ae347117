"""Failure modes: what a client gets when STS, the clocks or the shared store misbehave.

One test per row of docs/failure-modes.md. Each drives the real CredentialsMiddleware around a
tiny Starlette app, in-process through httpx.ASGITransport, against a real StrictSTS over HTTP
and, for the store rows, a real redis-server through RedisStore. One FakeClock is the broker's
clock and (plus an offset) STS's: time moves only when a test moves it; nothing sleeps to let
it pass. Real time passes only where the mechanism runs on the event loop's own clock (the
exchange deadline, the store's timeout and breaker, a cold miss waiting out a squatted lease).

Every row runs under ``Harness.run``: a loop-lag probe (the loop never stalls > 50 ms while the
row runs) and an asyncio exception handler (no "Task exception was never retrieved"). What the
probe does not count, so that it measures the package and not the test around it:

- building a CredentialBroker (botocore loads its STS model, ~100 ms): an app's start-up;
- full passes of CPython's cyclic collector (they stop every thread whatever the code does;
  the probe still fails if they hide more than a tenth of its samples);
- the test's own client: bursts are started a few requests per loop step (``spread``), each
  request ends with a loop step (an in-process cache hit never suspends), and httpx's
  per-request ``import sniffio`` (not installed) is made to fail at once;
- the STS's CPU in the two burst rows (1,000 identities; 200 throttled identities): there the
  StrictSTS runs in a process of its own (``RemoteSTS``, same code, same clock), as AWS does,
  instead of as threads competing with the loop for the GIL, and answers after 20 ms, as an
  STS in the app's region does (see ``Harness.remote_sts`` for what happens with none).

``test_no_secret_anywhere_across_the_matrix`` runs every row again with the root logger,
botocore and urllib3 at DEBUG and looks for any secret STS issued, any token sent, anything
shaped like a JWT, the signing key and the store key in everything the rows produced: log
records (message, args, formatted with their traceback), the errors the app was handed (message,
repr, and the locals of their traceback frames, chained exceptions included), reprs and
responses; then, separately, in the locals of the exceptions log records carry.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import gc
import importlib.util
import json
import logging
import math
import mmap
import os
import pathlib
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from redis.asyncio import Redis as AsyncRedis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from servers.clock import FakeClock, Skewed
from servers.loop_lag import LoopLagProbe
from servers.redis import RedisServer
from servers.sts import StrictSTS, build_success_xml
from stscreds import (
    CredentialBroker,
    Credentials,
    CredentialsMiddleware,
    CredentialsUnavailable,
    Role,
    SigningKey,
)
from stscreds._broker import WARNING_LIMIT, WARNING_WINDOW
from stscreds._cache import MANDATORY_WINDOW
from stscreds._metrics import METRICS, ROLE_METRIC
from stscreds.stores import RedisStore, generate_key

ACCOUNT = "123456789012"
ISSUER = "http://127.0.0.1:1/failure-modes"  # loopback; StrictSTS is given the JWKS directly
KEY = SigningKey.generate("ES256", kid="failure-modes-1")
FOREIGN_KEY = SigningKey.generate("ES256", kid="someone-else")
STORE_KEY = generate_key()
PREFIX = "stscreds:fm:"
T0 = 1_800_000_000.0
#: The longest the event loop may stall while a row runs.
MAX_LAG = 0.05
UNAVAILABLE = "AWS credentials are temporarily unavailable"
REFUSED = "AWS credentials were refused for this request"
# The defaults the rows rely on (CredentialBroker and StsBudget); the throttling rows pin the
# STS pool at 8 threads (the default is 64) so that their bounds stay tight.
MAX_ATTEMPTS = 3
MAX_WORKERS = 8
BUDGET_BURST = 10


def arn(tenant: str) -> str:
    return f"arn:aws:iam::{ACCOUNT}:role/tenant-{tenant}"


def role_for(tenant: str) -> Role:
    return Role(arn(tenant), subject=f"tenant:{tenant}")


def resolve_role(scope: Any) -> Role | None:
    """The role named by the X-Tenant header."""
    for name, value in scope.get("headers", ()):
        if name == b"x-tenant":
            return role_for(value.decode("latin-1"))
    return None


async def settle(broker: CredentialBroker) -> None:
    """Wait for the broker's in-flight exchanges (real I/O with the STS) to finish."""
    while broker._inflight:
        await asyncio.wait(list(broker._inflight.values()))


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Let real I/O and tasks run until ``predicate()`` (never used to let fake time pass)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def spread(
    coroutines: Iterable[Coroutine[Any, Any, httpx.Response]], per_step: int = 10
) -> list[asyncio.Task[httpx.Response]]:
    """Start ``coroutines`` as tasks, ``per_step`` per loop step, as connections would arrive."""
    tasks = []
    for index, coroutine in enumerate(coroutines):
        tasks.append(asyncio.ensure_future(coroutine))
        if index % per_step == per_step - 1:
            await asyncio.sleep(0)
    return tasks


async def burst(
    coroutines: Iterable[Coroutine[Any, Any, httpx.Response]], per_step: int = 10
) -> list[httpx.Response]:
    """``spread`` the requests and wait for every response."""
    return list(await asyncio.gather(*await spread(coroutines, per_step)))


class ClosedPort:
    """A port on 127.0.0.1 that refuses connections (bound, not listening) until ``forward_to``
    makes it listen and relay every connection to another address."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def forward_to(self, url: str) -> None:
        parts = urlsplit(url)
        self.sock.listen(16)
        accept = threading.Thread(target=self._accept, args=((parts.hostname, parts.port),))
        accept.start()
        self._threads.append(accept)

    def _accept(self, target: tuple[str, int]) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(target)
            self._sockets += [conn, upstream]
            for source, sink in ((conn, upstream), (upstream, conn)):
                pump = threading.Thread(target=_pump, args=(source, sink))
                pump.start()
                self._threads.append(pump)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # ends a blocked accept()
        self.sock.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(5)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)


class SlowStore:
    """A RedisStore whose every operation takes ``delay`` seconds more while ``slow`` is set."""

    def __init__(self, inner: RedisStore, delay: float) -> None:
        self.inner = inner
        self.cipher = inner.cipher
        self.delay = delay
        self.slow = False
        self.slow_calls = 0

    async def _lag(self) -> None:
        if self.slow:
            self.slow_calls += 1
            await asyncio.sleep(self.delay)

    async def get(self, key: str) -> bytes | None:
        await self._lag()
        return await self.inner.get(key)

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        await self._lag()
        await self.inner.put(key, value, ttl)

    async def acquire(self, key: str, owner: str, ttl: float) -> bool:
        await self._lag()
        return await self.inner.acquire(key, owner, ttl)

    async def release(self, key: str, owner: str) -> bool:
        await self._lag()
        return await self.inner.release(key, owner)

    async def extend(self, key: str, owner: str, ttl: float) -> bool:
        await self._lag()
        return await self.inner.extend(key, owner, ttl)

    async def holder(self, key: str) -> str | None:
        await self._lag()
        return await self.inner.holder(key)

    async def notify(self, key: str) -> None:
        await self._lag()
        await self.inner.notify(key)

    async def wait(self, key: str, timeout: float) -> None:
        await self._lag()
        await self.inner.wait(key, timeout)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def __repr__(self) -> str:
        return f"SlowStore({self.inner!r})"


class SharedClock(FakeClock):
    """A FakeClock whose time another process can read: 8 bytes of a memory-mapped file."""

    def __init__(self, now: float) -> None:
        handle, self.path = tempfile.mkstemp(prefix="stscreds-clock-")
        os.write(handle, struct.pack("d", now))
        self._map = mmap.mmap(handle, 8)
        os.close(handle)
        super().__init__(now)

    @property  # type: ignore[override]
    def now(self) -> float:
        return float(struct.unpack("d", self._map[:8])[0])

    @now.setter
    def now(self, value: float) -> None:
        self._map[:8] = struct.pack("d", value)

    def close(self) -> None:
        self._map.close()
        os.unlink(self.path)


# A StrictSTS in a process of its own, driven over its stdin/stdout (one JSON line each way).
_REMOTE_STS = r"""
import json, mmap, struct, sys
sys.path.insert(0, sys.argv[1])
from servers.sts import StrictSTS
with open(sys.argv[2], "r+b") as file:
    shared = mmap.mmap(file.fileno(), 8)
sts = StrictSTS(clock=lambda: struct.unpack("d", shared[:8])[0], leeway=3600)
sts.start()
print(json.dumps({"result": sts.url}), flush=True)
for line in sys.stdin:
    command = json.loads(line)
    op, args = command["op"], command["args"]
    result = None
    if op == "configure":
        sts.configure(**args)
    elif op == "fail_always":
        sts.fail_always(*args)
    elif op == "clear_faults":
        sts.clear_faults()
    elif op == "delay":
        sts.delay = args[0]
    elif op == "state":
        with sts._lock:
            result = {
                "calls": sts.calls,
                "successes": sts.successes,
                "requests": [
                    {"role_arn": r.role_arn, "credentials": r.credentials, "params": r.params}
                    for r in sts.requests
                ],
                "internal_errors": [repr(e) for e in sts.internal_errors],
            }
    print(json.dumps({"result": result}), flush=True)
    if op == "stop":
        break
sts.stop()
"""


@dataclass
class RemoteCall:
    """One call as the remote STS recorded it."""

    role_arn: str | None
    credentials: dict[str, str] | None
    params: dict[str, str]


class RemoteSTS:
    """A StrictSTS (same code, same protocol) in a process of its own, as AWS is: for bursts,
    where the in-process STS's threads would compete with the event loop for the GIL and the
    probe would measure the test's STS, not the package. Its clock is the harness's."""

    def __init__(self, clock: SharedClock) -> None:
        tests = str(pathlib.Path(__file__).parent)
        self._process = subprocess.Popen(
            [sys.executable, "-c", _REMOTE_STS, tests, clock.path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._lock = threading.Lock()
        self.url = ""
        self.calls = 0
        self.successes = 0
        self.requests: list[RemoteCall] = []

    def _command(self, op: str, args: Any = None) -> Any:
        assert self._process.stdin is not None and self._process.stdout is not None
        with self._lock:
            if op != "url":
                self._process.stdin.write(json.dumps({"op": op, "args": args or []}) + "\n")
                self._process.stdin.flush()
            line = self._process.stdout.readline()
        assert line, f"the remote STS exited ({self._process.poll()})"
        return json.loads(line)["result"]

    async def start(self) -> RemoteSTS:
        self.url = await asyncio.to_thread(self._command, "url")
        return self

    async def configure(self, **options: Any) -> None:
        await asyncio.to_thread(self._command, "configure", options)

    async def fail_always(self, code: str, status: int, message: str) -> None:
        await asyncio.to_thread(self._command, "fail_always", [code, status, message])

    async def clear_faults(self) -> None:
        await asyncio.to_thread(self._command, "clear_faults")

    async def set_delay(self, seconds: float) -> None:
        await asyncio.to_thread(self._command, "delay", [seconds])

    async def refresh(self) -> None:
        """Fetch its counters and recorded calls."""
        state = await asyncio.to_thread(self._command, "state")
        assert state["internal_errors"] == []
        self.calls, self.successes = state["calls"], state["successes"]
        self.requests = [RemoteCall(**r) for r in state["requests"]]

    def issued(self) -> dict[str | None, list[str]]:
        """Access key ids issued, by role ARN."""
        issued: dict[str | None, list[str]] = defaultdict(list)
        for call in self.requests:
            if call.credentials:
                issued[call.role_arn].append(call.credentials["AccessKeyId"])
        return issued

    def close(self) -> None:
        if self._process.poll() is None:
            with contextlib.suppress(Exception):
                self._command("stop")
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        for stream in (self._process.stdin, self._process.stdout):
            if stream is not None:
                stream.close()


# -- the harness -------------------------------------------------------------------------------


class Harness:
    """One row's world: the clocks, STS, brokers, apps and clients, and all they produced."""

    def __init__(
        self, sts: StrictSTS, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        self.sts = sts
        self.redis_server = redis_server
        self.caplog = caplog
        self.clock = SharedClock(T0)
        self.sts_time = Skewed(self.clock)
        sts.clock = self.sts_time
        sts.leeway = 3600  # the tokens' times are checked on a clock we skew on purpose
        #: True in the secrets matrix: heavy rows run a smaller (representative) burst.
        self.matrix = False
        self.brokers: list[CredentialBroker] = []
        self.stores: list[Any] = []
        self.clients: list[httpx.AsyncClient] = []
        self.tenants: set[str] = set()
        #: Every error the middleware handed to the app's error hook.
        self.errors: list[CredentialsUnavailable] = []
        #: Every Credentials the app was given.
        self.seen: list[Credentials] = []
        self.responses: list[httpx.Response] = []
        self.loop_errors: list[dict[str, Any]] = []
        #: Secrets a row made up itself (planted in a raw STS answer or in the store).
        self.extra_secrets: list[str] = []
        self.probe: LoopLagProbe | None = None
        self._records_from = 0
        self._redis: AsyncRedis | None = None
        self._ports: list[ClosedPort] = []
        self.remotes: list[RemoteSTS] = []

    # -- building --------------------------------------------------------------------------

    def broker(self, *, endpoint: str | None = None, **options: Any) -> CredentialBroker:
        options.setdefault("clock", self.clock)
        # Set-up, as at an app's start-up: botocore loads its STS model (about 100 ms, on this
        # thread). A stall there is not one of the row's; the probe leaves it out.
        with self.probe.excluded() if self.probe else contextlib.nullcontext():
            broker = CredentialBroker(
                issuer=ISSUER,
                signing_keys=[KEY],
                sts_endpoint_url=endpoint or self.sts.url,
                **options,
            )
        self.sts.configure(issuer=broker.issuer, jwks=broker.jwks())
        # Retries inside one exchange 10 ms apart instead of 200 ms: rows count attempts.
        broker._exchanger.retry_base_delay = 0.01
        self.brokers.append(broker)
        return broker

    def redis_store(self) -> RedisStore:
        store = RedisStore(self.redis_server.url, prefix=PREFIX, encryption_keys=[STORE_KEY])
        self.stores.append(store)
        return store

    async def remote_sts(self, latency: float = 0.02) -> RemoteSTS:
        """A StrictSTS in its own process, on this harness's clock, with our issuer registered,
        answering after ``latency`` seconds (20 ms: an STS in the app's region).

        With no latency at all the STS threads never wait on the network and run botocore flat
        out while the loop waits for the GIL (with 8 threads before the pool's gate: 60-90 ms
        stalls in a 1,000-identity burst, about every other run on 2 cores). That is reported,
        not asserted here.
        """
        remote = RemoteSTS(self.clock)
        self.remotes.append(remote)
        await remote.start()
        await remote.configure(issuer=ISSUER, jwks={"keys": [KEY.public_jwk()]})
        await remote.set_delay(latency)
        return remote

    def closed_port(self) -> ClosedPort:
        port = ClosedPort()
        self._ports.append(port)
        return port

    @property
    def redis(self) -> AsyncRedis:
        """A plain client of the redis-server, to read and write the store's keys directly."""
        if self._redis is None:
            self._redis = AsyncRedis.from_url(self.redis_server.url)
        return self._redis

    async def reconnect_redis(self) -> None:
        """Drop the plain client's connections (after a restart of the server)."""
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    def client(self, broker: CredentialBroker) -> httpx.AsyncClient:
        """A client of a Starlette app behind CredentialsMiddleware with ``broker``."""

        async def whoami(request: Request) -> JSONResponse:
            credentials = request.state.aws_credentials
            self.seen.append(credentials)
            return JSONResponse({"key": credentials.access_key_id})

        def on_error(scope: Any, error: CredentialsUnavailable) -> None:
            self.errors.append(error)
            return None  # the middleware's own answer

        app = Starlette(
            routes=[Route("/whoami", whoami)],
            middleware=[
                Middleware(
                    CredentialsMiddleware,
                    broker=broker,
                    resolve_role=resolve_role,
                    on_error=on_error,
                )
            ],
        )
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver"
        )
        self.clients.append(client)
        return client

    async def get(self, client: httpx.AsyncClient, tenant: str) -> httpx.Response:
        self.tenants.add(tenant)
        response = await client.get("/whoami", headers={"x-tenant": tenant})
        self.responses.append(response)
        # In-process, a cache hit never suspends: without this, a test's loop of requests
        # would keep the event loop to itself (a server gets each request on a loop step).
        await asyncio.sleep(0)
        return response

    def value_key(self, store: RedisStore, broker: CredentialBroker, tenant: str) -> str:
        """The Redis key of ``tenant``'s sealed credentials."""
        return f"{PREFIX}v:{store.cipher.store_key(broker.identity_key(role_for(tenant)))}"

    def lease_key(self, store: RedisStore, broker: CredentialBroker, tenant: str) -> str:
        return f"{PREFIX}l:{store.cipher.store_key(broker.identity_key(role_for(tenant)))}"

    def marker_key(self, store: RedisStore, broker: CredentialBroker, tenant: str) -> str:
        """The Redis key of ``tenant``'s failure marker (and the name it is sealed under)."""
        return f"{PREFIX}v:{self.marker_name(store, broker, tenant)}"

    def marker_name(self, store: RedisStore, broker: CredentialBroker, tenant: str) -> str:
        return store.cipher.store_key("f|" + broker.identity_key(role_for(tenant)))

    # -- what happened ---------------------------------------------------------------------

    def issued(self, tenant: str) -> list[str]:
        """Access key ids STS issued for ``tenant``'s role, oldest first."""
        return [
            r.credentials["AccessKeyId"]
            for r in self.sts.requests_for(arn(tenant))
            if r.credentials
        ]

    def records(self) -> list[logging.LogRecord]:
        """Every log record since the row started."""
        return self.caplog.records[self._records_from :]

    def logged(self, level: int = logging.WARNING) -> list[logging.LogRecord]:
        """stscreds' records at ``level`` or above since the row started."""
        return [r for r in self.records() if r.name == "stscreds" and r.levelno >= level]

    def assert_served(self, response: httpx.Response, tenant: str) -> str:
        """200 with credentials STS issued for ``tenant``; returns their access key id."""
        assert response.status_code == 200, response.text
        key = response.json()["key"]
        assert key in self.issued(tenant)
        return str(key)

    def assert_unavailable(
        self, response: httpx.Response, code: str | None, retry_after: tuple[int, int]
    ) -> int:
        """503 with the JSON body and a Retry-After within ``retry_after``; returns it."""
        assert response.status_code == 503, response.text
        assert response.json() == {"error": UNAVAILABLE, "code": code}
        assert response.headers["cache-control"] == "no-store"
        seconds = int(response.headers["retry-after"])
        low, high = retry_after
        assert low <= seconds <= high, seconds
        return seconds

    def assert_rejected(self, response: httpx.Response, code: str) -> None:
        assert response.status_code == 502, response.text
        assert response.json() == {"error": REFUSED, "code": code}
        assert "retry-after" not in response.headers

    # -- running -----------------------------------------------------------------------------

    async def run(self, scenario: Callable[..., Awaitable[None]], **params: Any) -> None:
        """Run one row under the loop-lag probe and an asyncio exception handler, watching
        every broker's metrics as it runs (see test_every_documented_series_moves)."""
        self._records_from = len(self.caplog.records)
        loop = asyncio.get_running_loop()
        previous = loop.get_exception_handler()
        loop.set_exception_handler(lambda _loop, context: self.loop_errors.append(context))
        watcher = loop.create_task(self._watch_metrics())
        try:
            async with LoopLagProbe(exclude_full_gc=True) as probe:
                self.probe = probe
                await scenario(self, **params)
            # Tasks nobody awaited report their exception when collected.
            gc.collect()
            await asyncio.sleep(0)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            loop.set_exception_handler(previous)
        self._note_metrics()
        ROWS_RUN.add(scenario.__name__)
        assert probe.samples > 0
        # Full collections are left out, but they must not blind the probe.
        assert probe.excluded_samples <= probe.samples // 10 + 5, probe.excluded_samples
        assert probe.worst <= MAX_LAG, f"the event loop stalled {probe.worst * 1000:.0f} ms"
        assert self.loop_errors == []
        assert not [r for r in self.records() if "never retrieved" in r.getMessage()]
        assert self.sts.internal_errors == []

    async def _watch_metrics(self) -> None:
        while True:
            await asyncio.sleep(METRICS_SAMPLE_INTERVAL)
            self._note_metrics()

    def _note_metrics(self) -> None:
        for broker in self.brokers:
            note_moved_series(broker.metrics())

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()
        for broker in self.brokers:
            await broker.aclose()  # closes its store too
        for store in self.stores:
            await store.aclose()  # a no-op for those closed by their broker
        if self._redis is not None:
            await self._redis.aclose()
        for port in self._ports:
            await asyncio.to_thread(port.close)
        for remote in self.remotes:
            await asyncio.to_thread(remote.close)
        self.clock.close()

    # -- secrets -----------------------------------------------------------------------------

    def secrets(self) -> dict[str, str]:
        """label -> secret: what must never appear in anything the row produced."""
        found: dict[str, str] = {}
        calls: list[Any] = [*self.sts.requests]
        for remote in self.remotes:
            calls += remote.requests
        for index, call in enumerate(calls):
            token = call.params.get("WebIdentityToken")
            if token:
                found[f"WebIdentityToken sent in call {index}"] = token
            if call.credentials:
                for name in ("SecretAccessKey", "SessionToken"):
                    found[f"{name} issued in call {index}"] = call.credentials[name]
        pem = KEY.to_pem().decode()
        found["signing key PEM"] = pem
        for number, line in enumerate(pem.splitlines()):
            if not line.startswith("-----"):
                found[f"signing key PEM line {number}"] = line
        found["store key (base64)"] = STORE_KEY
        found["store key (hex)"] = base64.b64decode(STORE_KEY).hex()
        for index, secret in enumerate(self.extra_secrets):
            found[f"planted secret {index}"] = secret
        return found

    def log_exception_texts(self) -> Iterator[tuple[str, str]]:
        """The exceptions log records carry (exc_info), down to their frames' locals: what a
        handler that renders locals (rich's tracebacks_show_locals, an error tracker) shows."""
        for record in self.records():
            if record.exc_info and record.exc_info[1] is not None:
                where = f"log record {record.name} {record.levelname} {record.msg!r}"
                yield from _exception_texts(record.exc_info[1], where)

    def haystack(self) -> Iterator[tuple[str, str]]:
        """(where, text) for everything the row produced that someone could read."""
        formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
        for record in self.records():
            where = f"log record {record.name} {record.levelname}"
            with contextlib.suppress(Exception):
                yield where + " message", record.getMessage()
            yield where + " msg", _safe_repr(record.msg)
            yield where + " args", _safe_repr(record.args)
            with contextlib.suppress(Exception):
                # With the exc_info text (the traceback), when there is one.
                yield where + " formatted", formatter.format(record)
        for error in self.errors:
            yield from _exception_texts(error, "error handed to the app")
        for context in self.loop_errors:
            yield "asyncio exception handler", _safe_repr(context)
        for broker in self.brokers:
            yield "broker", repr(broker)
            yield "broker stats", repr(broker.stats)
            yield "broker budget", repr(broker.sts_budget)
            yield "broker STS clock", repr(broker.sts_clock)
            yield "broker store stats", repr(broker.store_stats)
            for entry in list(broker._cache.values()):
                yield "cache entry", repr(entry)
            for failure in list(broker._failures.values()):
                yield from _exception_texts(failure.error, "remembered failure")
        for store in self.stores:
            yield "store", repr(store)
        for tenant in self.tenants:
            yield "role", repr(role_for(tenant))
        for credentials in self.seen:
            yield "credentials repr", repr(credentials)
            yield "credentials str", str(credentials)
        for response in self.responses:
            yield "response", f"{response.status_code} {dict(response.headers)} {response.text}"


def _safe_repr(value: Any) -> str:
    try:
        return repr(value)
    except Exception as error:
        return f"<repr failed: {type(error).__name__}>"


def _value_texts(value: Any) -> Iterator[str]:
    """repr of ``value``, and of each item one level into dicts, lists and tuples."""
    yield from _texts(value)
    if isinstance(value, dict):
        for key, item in list(value.items()):
            yield from _texts(key)
            yield from _texts(item)
    elif isinstance(value, list | tuple):
        for item in list(value):
            yield from _texts(item)


def _texts(value: Any) -> Iterator[str]:
    """repr of ``value``; for a str subclass also its text, which its repr may hide (as a
    minted token's repr does)."""
    yield _safe_repr(value)
    if isinstance(value, str) and type(value) is not str:
        yield str.__str__(value)


def _exception_texts(error: BaseException, where: str) -> Iterator[tuple[str, str]]:
    """The message, repr and args of ``error`` and of every exception chained to it (cause or
    context, shown or not), and the locals of every frame of their tracebacks."""
    pending, seen = [error], set()
    while pending:
        exc = pending.pop()
        if id(exc) in seen:
            continue
        seen.add(id(exc))
        name = f"{where}: {type(exc).__name__}"
        yield name + " str", str(exc)
        yield name + " repr", _safe_repr(exc)
        yield name + " args", _safe_repr(exc.args)
        tb = exc.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            code = frame.f_code
            for variable, value in list(frame.f_locals.items()):
                for text in _value_texts(value):
                    yield f"{name} frame {code.co_filename}:{code.co_name} local {variable}", text
            tb = tb.tb_next
        pending += [e for e in (exc.__cause__, exc.__context__) if e is not None]


_JWT_SHAPED = re.compile(r"eyJ[A-Za-z0-9_-]{8,}")


def fragments(secret: str) -> list[str]:
    """The secret and, for long ones, 24-character pieces of its middle and end, and of its
    start unless it is a JWT (a message cut to length still leaks a piece)."""
    if len(secret) <= 24:
        return [secret]
    middle = len(secret) // 2 - 12
    pieces = [secret, secret[middle : middle + 24], secret[-24:]]
    # A JWT's first characters are its header (alg, kid), the same in every token we mint.
    return pieces if secret.startswith("eyJ") else [*pieces, secret[:24]]


def find_secrets(
    secrets: dict[str, str], haystack: Iterable[tuple[str, str]]
) -> list[tuple[str, str]]:
    """(secret label, where) for every secret (or piece of one) found, and every JWT-shaped text."""
    needles = [(label, piece) for label, secret in secrets.items() for piece in fragments(secret)]
    hits: list[tuple[str, str]] = []
    for where, text in haystack:
        if _JWT_SHAPED.search(text):
            hits.append(("something shaped like a JWT", where))
        hits += [(label, where) for label, piece in needles if piece in text]
    return sorted(set(hits))


# -- fixtures and the row decorator ------------------------------------------------------------


@pytest.fixture
async def h(
    strict_sts: StrictSTS,
    redis_server: RedisServer,
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Harness]:
    caplog.set_level(logging.INFO, logger="stscreds")
    if importlib.util.find_spec("sniffio") is None:
        # httpx's ASGITransport tries `import sniffio` on every request; not installed, each
        # try searches sys.path again, and with STS threads holding the GIL that stalls the
        # loop for tens of ms: the test client's cost, not the package's. A None entry makes
        # the import fail at once, as it would anyway.
        monkeypatch.setitem(sys.modules, "sniffio", None)
    harness = Harness(strict_sts, redis_server, caplog)
    try:
        yield harness
    finally:
        await harness.aclose()


ROWS: list[Callable[..., Awaitable[None]]] = []
#: Rows run to the end in this session, and the metrics seen to move while they ran.
ROWS_RUN: set[str] = set()
SERIES_MOVED: set[str] = set()
METRICS_SAMPLE_INTERVAL = 0.005


def note_moved_series(snapshot: dict[str, Any]) -> None:
    """Add to SERIES_MOVED every metric of ``snapshot`` off its resting value: a counter or
    histogram above 0, a gauge away from its idle value (0; +Inf for the soonest expiry)."""
    for spec in (*METRICS, ROLE_METRIC):
        value = snapshot[spec.name]
        if spec.kind == "histogram":
            moved = value["count"] > 0
        elif spec.labels:
            moved = any(row["value"] for row in value)
        else:
            idle = math.inf if spec.name == "soonest_expiry_seconds" else 0
            moved = value != idle
        if moved:
            SERIES_MOVED.add(spec.name)


def row(scenario: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Make ``scenario(h, **params)`` a test that runs it under ``Harness.run``; the secrets
    matrix runs every row again."""

    @functools.wraps(scenario)
    async def test(h: Harness, **params: Any) -> None:
        await h.run(scenario, **params)

    ROWS.append(test)
    return test


def one(records: list[logging.LogRecord]) -> str:
    """The message of the only record."""
    assert len(records) == 1, [r.getMessage() for r in records]
    return records[0].getMessage()


# -- STS: slow, unreachable, failing -----------------------------------------------------------


@row
async def test_sts_slower_than_the_exchange_deadline(h: Harness) -> None:
    broker = h.broker(exchange_deadline=0.5)
    client = h.client(broker)
    h.sts.delay = 2.0  # real seconds before each answer (cut short when the STS stops)
    loop = asyncio.get_running_loop()
    started = loop.time()
    first = await h.get(client, "slow")
    elapsed = loop.time() - started
    h.assert_unavailable(first, None, (1, 2))
    assert 0.45 <= elapsed < 1.5, elapsed  # the deadline, not the STS, ended the wait
    assert h.sts.calls == 1  # a timed-out exchange is not retried
    # Remembered (0.5-2 s): requests meanwhile get the 503 at once, without a call.
    for _ in range(10):
        h.assert_unavailable(await h.get(client, "slow"), None, (1, 2))
    assert h.sts.calls == 1
    message = one(h.logged())
    assert h.logged()[0].levelno == logging.WARNING
    assert arn("slow") in message and "did not answer within 0.5s" in message
    # Recovery: STS answers in time again and the remembered period is over.
    h.sts.delay = 0.0
    h.clock.advance(2.1)
    h.assert_served(await h.get(client, "slow"), "slow")
    assert h.sts.calls == 2
    assert len(h.logged()) == 1


@row
async def test_sts_refusing_connections(h: Harness) -> None:
    port = h.closed_port()
    broker = h.broker(endpoint=port.url)
    client = h.client(broker)
    first = await h.get(client, "refused")
    h.assert_unavailable(first, None, (1, 2))
    for _ in range(10):
        h.assert_unavailable(await h.get(client, "refused"), None, (1, 2))
    assert h.sts.calls == 0
    assert broker.stats.exchanges == 1  # one exchange (3 connection attempts), then remembered
    message = one(h.logged())
    assert h.logged()[0].levelno == logging.WARNING
    assert arn("refused") in message and "STS unreachable: EndpointConnectionError" in message
    # One INFO event for the whole exchange, every attempt counted (retries log at DEBUG).
    (event,) = [r for r in h.logged(logging.INFO) if r.levelno == logging.INFO]
    assert "EndpointConnectionError" in event.getMessage() and arn("refused") in event.getMessage()
    assert event.attempts == MAX_ATTEMPTS  # type: ignore[attr-defined]
    assert event.error_code == "Unreachable"  # type: ignore[attr-defined]
    # Recovery: the endpoint accepts connections again (relayed to the STS).
    port.forward_to(h.sts.url)
    h.clock.advance(2.1)
    h.assert_served(await h.get(client, "refused"), "refused")
    assert h.sts.calls == 1


TRANSIENT_FAULTS = {
    "sts-500": ("InternalFailure", 500, "We encountered an internal error. Please try again."),
    "idp-communication-error": (
        "IDPCommunicationError",
        400,
        "The identity provider could not be reached",
    ),
}


@pytest.mark.parametrize("fault", list(TRANSIENT_FAULTS))
@row
async def test_sts_answering_a_transient_error(h: Harness, fault: str) -> None:
    code, status, text = TRANSIENT_FAULTS[fault]
    broker = h.broker()
    client = h.client(broker)
    h.sts.fail_always(code, status, text)
    h.assert_unavailable(await h.get(client, "flaky"), code, (1, 2))
    assert h.sts.calls == MAX_ATTEMPTS  # retried inside the exchange deadline
    for _ in range(10):
        h.assert_unavailable(await h.get(client, "flaky"), code, (1, 2))
    assert h.sts.calls == MAX_ATTEMPTS
    message = one(h.logged())
    assert h.logged()[0].levelno == logging.WARNING
    assert arn("flaky") in message and f"STS {code}: {text}" in message
    budget = broker.sts_budget
    assert budget is not None and not budget.limited  # not throttling: the budget stays open
    h.sts.clear_faults()
    h.clock.advance(2.1)
    h.assert_served(await h.get(client, "flaky"), "flaky")
    assert h.sts.calls == MAX_ATTEMPTS + 1


@row
async def test_sts_down_while_the_cached_credentials_are_about_to_expire(h: Harness) -> None:
    broker = h.broker()
    client = h.client(broker)
    first = h.assert_served(await h.get(client, "edge"), "edge")
    h.sts.fail_always("ServiceUnavailable", 503, "Service unavailable")
    # 30 s left on STS's clock: inside the mandatory window, where a request waits for the
    # refresh. It fails: the cached credentials are served while they have more than 5 s.
    h.clock.advance(h.seen[-1].expiration.timestamp() - h.sts_time() - 30.0)
    metrics = broker.metrics()
    assert metrics["mandatory_window_identities"] == 1
    assert 25 <= metrics["soonest_expiry_seconds"] <= 30
    assert h.assert_served(await h.get(client, "edge"), "edge") == first
    assert h.sts.calls == 1 + MAX_ATTEMPTS
    for _ in range(20):  # no new call during the refresh backoff; still the cached ones
        h.clock.advance(1.0)
        assert h.assert_served(await h.get(client, "edge"), "edge") == first
    assert h.sts.calls == 1 + MAX_ATTEMPTS
    message = one(h.logged())
    assert "refresh failed for" in message and arn("edge") in message
    # 5 s or less left: never handed out; the request waits for an exchange, which fails.
    h.clock.advance(6.0)
    h.assert_unavailable(await h.get(client, "edge"), "ServiceUnavailable", (1, 2))
    assert h.sts.calls == 1 + 2 * MAX_ATTEMPTS
    assert broker.metrics()["cached_identities"] == 0
    # Recovery: STS answers again, after the remembered period.
    h.sts.clear_faults()
    h.clock.advance(2.1)
    assert h.assert_served(await h.get(client, "edge"), "edge") != first


@row
async def test_sts_throttling_one_identity(h: Harness) -> None:
    broker = h.broker()
    client = h.client(broker)
    h.sts.fail_always("Throttling", 400, "Rate exceeded")
    h.assert_unavailable(await h.get(client, "busy"), "Throttling", (1, 2))
    assert h.sts.calls == MAX_ATTEMPTS
    budget = broker.sts_budget
    assert budget is not None and budget.limited and budget.throttled_count == MAX_ATTEMPTS
    for _ in range(10):
        h.assert_unavailable(await h.get(client, "busy"), "Throttling", (1, 2))
    assert h.sts.calls == MAX_ATTEMPTS
    message = one(h.logged())
    assert arn("busy") in message and "STS Throttling: Rate exceeded" in message
    # Recovery: STS stops throttling; the first success widens the budget.
    h.sts.clear_faults()
    h.clock.advance(2.1)
    h.assert_served(await h.get(client, "busy"), "busy")
    assert h.sts.calls == MAX_ATTEMPTS + 1
    assert budget.rate > budget.initial_rate


async def throttled_wave(
    h: Harness, sts: RemoteSTS, identities: int, label: str
) -> tuple[CredentialBroker, int]:
    """One request per identity, all at once, against an STS that throttles every call: every
    answer is a 503 "Throttling"; returns the (fresh) broker and the STS calls it made."""
    broker = h.broker(endpoint=sts.url, max_workers=MAX_WORKERS)
    client = h.client(broker)
    await sts.refresh()
    before = sts.calls
    tenants = [f"{label}-{i}" for i in range(identities)]
    for response in await burst(h.get(client, t) for t in tenants):
        h.assert_unavailable(response, "Throttling", (1, 2))
    await sts.refresh()
    return broker, sts.calls - before


@row
async def test_sts_throttling_many_identities(h: Harness) -> None:
    few, many = (10, 40) if h.matrix else (50, 200)
    sts = await h.remote_sts()
    await sts.fail_always("Throttling", 400, "Rate exceeded")
    _, calls_few = await throttled_wave(h, sts, few, "few")
    lines_few = len(h.logged())
    broker, calls_many = await throttled_wave(h, sts, many, "many")
    # Bounded by the budget, not by the identities: what goes out before the first throttling
    # answer is taken into account, then the bucket's burst. (That first part depends on how
    # soon the STS threads see the answer: see the busy-loop test below.)
    assert calls_many <= max(many // 4, 2 * (MAX_WORKERS + BUDGET_BURST)), calls_many
    # Four times the identities: about as many calls (slack: one more round of STS threads).
    assert calls_many <= calls_few + 2 * MAX_WORKERS, (calls_few, calls_many)
    # A few lines per error code (Throttling, BudgetRefused), not one per identity: the rest
    # are counted and summed up once the window ends...
    # (Each wave is a new broker: its own few lines.)
    assert 1 <= lines_few <= 2 * WARNING_LIMIT
    lines = h.logged()[lines_few:]
    assert 1 <= len(lines) <= 2 * WARNING_LIMIT
    assert all("throttling" in r.getMessage().lower() for r in h.logged())
    # ...and a second wave inside the remembered period adds no call and no line.
    client = h.client(broker)
    calls = sts.calls
    for response in await burst(h.get(client, f"many-{i}") for i in range(many)):
        h.assert_unavailable(response, "Throttling", (1, 2))
    await sts.refresh()
    assert sts.calls == calls
    assert len(h.logged()) == lines_few + len(lines)
    h.clock.advance(WARNING_WINDOW)
    # Recovery: STS stops throttling; the budget lets at most a bucketful out per round (no
    # fake time passes within one) and opens once enough calls succeed. Each identity is
    # exchanged once.
    await sts.clear_faults()
    budget = broker.sts_budget
    assert budget is not None and budget.limited
    pending = [f"many-{i}" for i in range(many)]
    rounds = 0
    while pending:
        rounds += 1
        assert rounds <= 30
        h.clock.advance(2.5)  # past every remembered failure; the bucket refills
        was_limited = budget.limited
        before = sts.calls
        responses = await burst(h.get(client, t) for t in pending)
        await sts.refresh()
        if was_limited and budget.limited:  # limited all round long (it may open mid-round)
            assert sts.calls - before <= BUDGET_BURST
        issued = sts.issued()
        still = []
        for tenant, response in zip(pending, responses, strict=True):
            if response.status_code == 200:
                assert issued[arn(tenant)] == [response.json()["key"]]
            else:
                h.assert_unavailable(response, "Throttling", (1, 2))
                still.append(tenant)
        pending = still
    # Each success widens the budget (recovery); it opens once the rate reaches its maximum.
    assert budget.rate > budget.initial_rate
    if budget.initial_rate + budget.recovery * many >= budget.max_rate:
        assert not budget.limited
    issued = sts.issued()
    assert all(len(issued[arn(f"many-{i}")]) == 1 for i in range(many))
    # The lines held back were summed up (here: those of the budget's refusals, whose window
    # the recovery's first refusals closed; the Throttling window closes in real time).
    summaries = [r for r in h.logged() if "more identities" in r.getMessage()]
    assert summaries and all(r.suppressed > 0 for r in summaries)  # type: ignore[attr-defined]


async def test_sts_throttling_many_identities_while_the_loop_is_busy(h: Harness) -> None:
    """The budget must close when STS says Throttling, not when the loop gets round to it.

    Not under the loop-lag probe: it blocks the loop on purpose (as a burst, a slow handler or
    CPU contention does; under a CPU hog the row above saw 34 calls instead of about 20).
    """
    broker = h.broker(max_workers=MAX_WORKERS)
    identities = 100
    h.sts.hang = True
    tasks = [asyncio.ensure_future(broker.get(role_for(f"busy-{i}"))) for i in range(identities)]
    assert await asyncio.to_thread(h.sts.wait_for_calls, MAX_WORKERS, 5.0)
    # Every other exchange has its call queued for an STS thread.
    work = broker._exchanger._pool._work_queue  # type: ignore[attr-defined]
    await eventually(lambda: work.qsize() >= identities - MAX_WORKERS)
    h.sts.fail_always("Throttling", 400, "Rate exceeded")
    h.sts.release()
    time.sleep(1.0)  # noqa: ASYNC251 - the loop is busy; the STS threads are not
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, CredentialsUnavailable) and r.code == "Throttling" for r in results)
    # The calls the STS threads had in hand when the first answer came, then the burst.
    assert h.sts.calls <= MAX_WORKERS + BUDGET_BURST, h.sts.calls


REJECTIONS = {
    "access-denied": ("AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity"),
    "invalid-identity-token": (
        "InvalidIdentityToken",
        f"No matching key found in your identity provider's JWKS for kid {KEY.kid}",
    ),
}


@pytest.mark.parametrize("refusal", list(REJECTIONS))
@row
async def test_sts_rejecting_the_exchange(h: Harness, refusal: str) -> None:
    code, text = REJECTIONS[refusal]
    broker = h.broker()
    client = h.client(broker)
    if refusal == "access-denied":
        h.sts.reject_roles.add(arn("nope"))  # the role's trust policy says no
    else:
        h.sts.configure(jwks={"keys": [FOREIGN_KEY.public_jwk()]})  # our key is not registered
    h.assert_rejected(await h.get(client, "nope"), code)
    assert h.sts.calls == 1  # never retried
    assert h.sts.requests[0].error_code == code
    # Remembered 1-5 s.
    for _ in range(9):
        h.clock.advance(0.1)
        h.assert_rejected(await h.get(client, "nope"), code)
    assert h.sts.calls == 1
    message = one(h.logged())
    assert h.logged()[0].levelno == logging.WARNING
    assert arn("nope") in message and f"STS {code}: {text}" in message
    # Recovery: fixed at AWS, and the remembered period is over.
    h.sts.reject_roles.clear()
    h.sts.configure(jwks=broker.jwks())
    h.clock.advance(4.2)
    h.assert_served(await h.get(client, "nope"), "nope")
    assert h.sts.calls == 2


NAMESPACE = 'xmlns="https://sts.amazonaws.com/doc/2011-06-15/"'


def malformed_answer(kind: str, h: Harness) -> bytes:
    if kind == "malformed-xml":
        return b"<AssumeRoleWithWebIdentityResponse><AssumeRoleWithWebIdentityResult><Cred"
    if kind == "empty-200-body":
        return b""
    if kind == "oversized-4mb":
        # 4 MiB of XML that never closes: parsed to the end before it fails.
        head = f"<AssumeRoleWithWebIdentityResponse {NAMESPACE}><AssumeRoleWithWebIdentityResult>"
        return head.encode() + b"<Padding>" + b"A" * (4 << 20) + b"</Padding>"
    assert kind == "credentials-without-expiration"
    body = build_success_xml(None)
    for name in ("SecretAccessKey", "SessionToken"):
        match = re.search(rf"<{name}>([^<]+)</{name}>".encode(), body)
        assert match is not None
        h.extra_secrets.append(match.group(1).decode())
    return body


# Unparseable answers are retried like any transient error; one that parses but holds no usable
# credentials is not.
MALFORMED = {
    "malformed-xml": ("could not be parsed", MAX_ATTEMPTS),
    "empty-200-body": ("could not be parsed", MAX_ATTEMPTS),
    "oversized-4mb": ("could not be parsed", MAX_ATTEMPTS),
    "credentials-without-expiration": ("without usable credentials", 1),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
@row
async def test_sts_answering_garbage(h: Harness, kind: str) -> None:
    words, calls = MALFORMED[kind]
    broker = h.broker()
    client = h.client(broker)
    h.sts.respond_raw(malformed_answer(kind, h), 200, n=None)
    h.assert_unavailable(await h.get(client, "garbled"), None, (1, 2))
    assert h.sts.calls == calls
    for _ in range(10):
        h.assert_unavailable(await h.get(client, "garbled"), None, (1, 2))
    assert h.sts.calls == calls
    message = one(h.logged())
    assert h.logged()[0].levelno == logging.WARNING
    assert arn("garbled") in message and words in message
    assert len(message) < 500  # no body quoted
    h.sts.clear_faults()
    h.clock.advance(2.1)
    h.assert_served(await h.get(client, "garbled"), "garbled")
    assert h.sts.calls == calls + 1


# -- STS's Expiration and the clocks -------------------------------------------------------------


@pytest.mark.parametrize(
    "left",
    [
        pytest.param(-60.0, id="expiration-in-the-past"),
        pytest.param(45.0, id="expiration-inside-the-mandatory-window"),
    ],
)
@row
async def test_sts_granting_credentials_already_expiring(h: Harness, left: float) -> None:
    broker = h.broker()
    client = h.client(broker)
    h.sts.expiration = lambda now, _requested: now + left
    first = h.assert_unavailable(await h.get(client, "stale"), None, (27, 34))
    assert h.sts.calls == 1
    # Remembered about 30 s: 25 s of requests make no call, and say when to come back.
    for _ in range(25):
        h.clock.advance(1.0)
        again = h.assert_unavailable(await h.get(client, "stale"), None, (1, 34))
        assert again <= first
    assert h.sts.calls == 1
    message = one(h.logged())
    assert h.logged()[0].levelno == logging.ERROR
    assert arn("stale") in message
    said = re.search(r"had (-?\d+)s left", message)
    assert said is not None and abs(int(said.group(1)) - left) <= 1, message
    # Recovery: STS grants real lifetimes again, after the remembered period.
    h.sts.expiration = None
    h.clock.advance(10.0)
    h.assert_served(await h.get(client, "stale"), "stale")
    assert h.sts.calls == 2
    assert h.seen[-1].expiration.timestamp() - h.sts_time() > MANDATORY_WINDOW


@row
async def test_sts_granting_less_than_the_advisory_window(h: Harness) -> None:
    # 300 s granted for 3600 s asked (an STS capping sessions): inside the 5 min advisory
    # window from the start. A refresh comes at half the usable life (120 s), not per request.
    broker = h.broker()
    client = h.client(broker)
    h.sts.grant_seconds = 300
    seconds = 300 if h.matrix else 600
    for _ in range(seconds):  # one request per second
        h.assert_served(await h.get(client, "capped"), "capped")
        credentials = h.seen[-1]
        assert credentials.expiration.timestamp() - h.sts_time() > MANDATORY_WINDOW
        await settle(broker)  # a background refresh, if one started
        h.clock.advance(1.0)
    assert seconds // 121 <= h.sts.calls <= seconds // 120 + 1, h.sts.calls
    assert h.sts.calls == h.sts.successes
    assert h.logged() == []


@pytest.mark.parametrize(
    ("offset", "words"),
    [
        pytest.param(-600.0, "ahead of", id="local-clock-10-min-ahead"),
        pytest.param(600.0, "behind", id="local-clock-10-min-behind"),
    ],
)
@row
async def test_local_clock_ten_minutes_off(h: Harness, offset: float, words: str) -> None:
    h.sts_time.offset = offset  # STS's clock = local + offset
    broker = h.broker()
    client = h.client(broker)
    tenants = ["skew-a", "skew-b"]
    # Two hours, a request per identity every 30 s: 1 h credentials, planned on STS's clock.
    for _ in range(120 if h.matrix else 240):
        for tenant in tenants:
            h.assert_served(await h.get(client, tenant), tenant)
            left = h.seen[-1].expiration.timestamp() - h.sts_time()
            assert left > MANDATORY_WINDOW  # never expired (nor about to) on STS's clock
        await settle(broker)
        h.clock.advance(30.0)
    assert broker.sts_clock.offset == pytest.approx(offset, abs=1)
    # A refresh every 45-49 min (never before half the usable life), per identity.
    span = h.clock.time() - T0
    for tenant in tenants:
        assert 2 <= len(h.issued(tenant)) <= span // 1770 + 1, h.issued(tenant)
    message = one(h.logged())
    assert h.logged()[0].levelno == logging.WARNING
    assert re.search(rf"local clock is (599|600|601)s {words} STS's", message), message


# -- the shared store ----------------------------------------------------------------------------


def store_lines(h: Harness) -> list[str]:
    return [r.getMessage() for r in h.logged() if "shared store" in r.getMessage()]


@row
async def test_store_down(h: Harness) -> None:
    store = h.redis_store()
    broker = h.broker(store=store, store_cooldown=0.5)
    client = h.client(broker)
    h.assert_served(await h.get(client, "before"), "before")
    assert await h.redis.exists(h.value_key(store, broker, "before"))
    await asyncio.to_thread(h.redis_server.stop)
    loop = asyncio.get_running_loop()
    started = loop.time()
    tenants = [f"down-{i}" for i in range(10)]
    for tenant in tenants * 2:
        h.assert_served(await h.get(client, tenant), tenant)
    elapsed = loop.time() - started
    assert h.sts.calls == 1 + len(tenants)  # STS directly, once per identity
    stats = broker.store_stats
    assert stats is not None and stats.outages == 1
    # The breaker: one failed operation per cooldown, not one (or three) per request.
    assert 1 <= stats.errors <= 1 + elapsed / 0.5, (stats.errors, elapsed)
    message = one(h.logged())
    assert h.logged()[0].levelno == logging.WARNING
    assert "shared store unavailable (ConnectionError)" in message
    # Recovery: Redis is back; after the cooldown (the loop's clock) the store is used again.
    await asyncio.to_thread(h.redis_server.start)
    await h.reconnect_redis()
    shared = broker._shared
    assert shared is not None
    await eventually(lambda: loop.time() >= shared._open_until)
    h.assert_served(await h.get(client, "after"), "after")
    assert store_lines(h)[1:] == ["shared store is back"]
    assert await h.redis.exists(h.value_key(store, broker, "after"))
    assert h.sts.calls == 2 + len(tenants)


@row
async def test_store_slow(h: Harness) -> None:
    slow = SlowStore(h.redis_store(), delay=2.0)
    h.stores.append(slow)
    broker = h.broker(store=slow, store_timeout=0.1, store_cooldown=0.5)
    client = h.client(broker)
    h.assert_served(await h.get(client, "warm"), "warm")  # the store answered once
    slow.slow = True
    loop = asyncio.get_running_loop()
    started = loop.time()
    h.assert_served(await h.get(client, "slow-0"), "slow-0")
    assert loop.time() - started < 0.1 + 0.5  # the store timeout, then STS directly
    tenants = [f"slow-{i}" for i in range(1, 10)]
    for tenant in tenants:
        h.assert_served(await h.get(client, tenant), tenant)
    elapsed = loop.time() - started
    assert elapsed < 1.5  # not a store timeout per request
    # The breaker: one slow operation per cooldown, not one (or three) per request.
    assert 1 <= slow.slow_calls <= 1 + elapsed / 0.5, (slow.slow_calls, elapsed)
    assert h.sts.calls == 1 + 1 + len(tenants)
    message = one(h.logged())
    assert "shared store unavailable (TimeoutError)" in message
    slow.slow = False
    shared = broker._shared
    assert shared is not None
    await eventually(lambda: loop.time() >= shared._open_until)
    h.assert_served(await h.get(client, "fast"), "fast")
    assert store_lines(h)[1:] == ["shared store is back"]
    assert await h.redis.exists(h.value_key(slow.inner, broker, "fast"))


@row
async def test_store_flushed(h: Harness) -> None:
    tenants = [f"flushed-{i}" for i in range(5)]
    warm = h.broker(store=h.redis_store())
    warm_client = h.client(warm)
    for tenant in tenants:
        h.assert_served(await h.get(warm_client, tenant), tenant)
    assert h.sts.calls == len(tenants)
    await asyncio.to_thread(h.redis_server.flushall)
    # The warm worker keeps serving from its own cache.
    for tenant in tenants:
        h.assert_served(await h.get(warm_client, tenant), tenant)
    assert h.sts.calls == len(tenants)
    # Two cold workers, three requests each per identity, at once: one new exchange per identity.
    cold = [h.client(h.broker(store=h.redis_store())) for _ in range(2)]
    responses = await burst(h.get(c, t) for t in tenants for c in cold for _ in range(3))
    for index, response in enumerate(responses):
        h.assert_served(response, tenants[index // 6])
    for tenant in tenants:
        assert len(h.issued(tenant)) == 2, tenant
    assert h.logged() == []


CORRUPTIONS = ["flipped-byte", "truncated", "other-identitys-value", "planted-plaintext"]


@pytest.mark.parametrize("corruption", CORRUPTIONS)
@row
async def test_store_value_corrupted(h: Harness, corruption: str) -> None:
    store = h.redis_store()
    writer = h.broker(store=store)
    writer_client = h.client(writer)
    first = h.assert_served(await h.get(writer_client, "victim"), "victim")
    h.assert_served(await h.get(writer_client, "other"), "other")
    name = h.value_key(store, writer, "victim")
    sealed = await h.redis.get(name)
    assert isinstance(sealed, bytes)
    if corruption == "flipped-byte":
        bad = sealed[:-20] + bytes([sealed[-20] ^ 0x01]) + sealed[-19:]
    elif corruption == "truncated":
        bad = sealed[:30]
    elif corruption == "other-identitys-value":
        other = await h.redis.get(h.value_key(store, writer, "other"))
        assert isinstance(other, bytes)
        bad = other
    else:
        # What someone who can write to Redis but holds no key could plant: plaintext.
        planted_secret, planted_token = "PLANTED" + "s" * 33, "PLANTED" + "t" * 100
        h.extra_secrets += [planted_secret, planted_token]
        bad = (
            b"\x00"
            + json.dumps(
                {
                    "k": writer.identity_key(role_for("victim")),
                    "a": "ASIAPLANTED000000000",
                    "s": planted_secret,
                    "t": planted_token,
                    "e": T0 + 3600,
                    "l": 3600,
                    "o": None,
                }
            ).encode()
        )
    assert await h.redis.set(name, bad, keepttl=True)
    reader = h.broker(store=h.redis_store())
    fresh = h.assert_served(await h.get(h.client(reader), "victim"), "victim")
    assert fresh not in (first, "ASIAPLANTED000000000")
    assert fresh == h.issued("victim")[-1]
    assert len(h.issued("victim")) == 2  # a new exchange
    stats = reader.store_stats
    # Rejected (read before and again after taking the lease), never an error or a hit.
    assert stats is not None and stats.rejected >= 1 and stats.hits == stats.errors == 0
    # The fresh credentials replaced the bad value: the next cold worker takes them.
    third = h.broker(store=h.redis_store())
    assert h.assert_served(await h.get(h.client(third), "victim"), "victim") == fresh
    assert len(h.issued("victim")) == 2
    assert h.logged() == []


@row
async def test_store_lease_squatted(h: Harness) -> None:
    store = h.redis_store()
    broker = h.broker(store=store, request_timeout=1.5, exchange_deadline=1.0)
    client = h.client(broker)
    lease = h.lease_key(store, broker, "squatted")
    assert await h.redis.set(lease, "squatter", px=3_600_000)
    loop = asyncio.get_running_loop()
    started = loop.time()
    key = h.assert_served(await h.get(client, "squatted"), "squatted")
    elapsed = loop.time() - started
    assert h.sts.calls == 1
    shared = broker._shared
    assert shared is not None
    # It waited for the lease (lease_wait), then exchanged itself, within request_timeout.
    assert shared.lease_wait - 0.05 <= elapsed <= broker.request_timeout, elapsed
    assert await h.redis.get(lease) == b"squatter"  # not taken from its holder
    message = one(h.logged())
    assert message.startswith("gave up waiting")
    assert message.endswith("for another worker's exchange; calling STS")
    # The credentials were shared all the same: a cold worker takes them at once.
    other = h.broker(store=h.redis_store(), request_timeout=1.5, exchange_deadline=1.0)
    started = loop.time()
    assert h.assert_served(await h.get(h.client(other), "squatted"), "squatted") == key
    assert loop.time() - started < 0.5
    assert h.sts.calls == 1


@row
async def test_store_failure_marker_replayed(h: Harness) -> None:
    # Worker A's exchange is refused: it leaves a (sealed) failure marker for its waiters.
    store = h.redis_store()
    first = h.broker(store=store)
    h.sts.reject_roles.add(arn("marked"))
    h.assert_rejected(await h.get(h.client(first), "marked"), "AccessDenied")
    marker_key = h.marker_key(store, first, "marked")
    captured = await h.redis.get(marker_key)
    assert isinstance(captured, bytes)
    opened = store.cipher.open(h.marker_name(store, first, "marked"), captured)
    assert opened is not None
    marker = json.loads(opened)
    assert marker["c"] == "AccessDenied" and marker["k"] == first.identity_key(role_for("marked"))
    # A minute later, the role fixed, someone puts the same bytes back for an hour and squats
    # the lease under the very holder they name.
    h.sts.reject_roles.clear()
    h.clock.advance(60.0)
    assert await h.redis.set(marker_key, captured, px=3_600_000)
    assert await h.redis.set(h.lease_key(store, first, "marked"), marker["h"], px=3_600_000)
    cold = h.broker(store=h.redis_store(), request_timeout=1.5, exchange_deadline=1.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    h.assert_served(await h.get(h.client(cold), "marked"), "marked")  # not the old 502
    assert loop.time() - started <= cold.request_timeout
    assert h.sts.calls == 2
    messages = [r.getMessage() for r in h.logged()]
    assert len(messages) == 2
    assert arn("marked") in messages[0] and "STS AccessDenied" in messages[0]
    assert messages[1].startswith("gave up waiting")
    assert messages[1].endswith("for another worker's exchange; calling STS")


# -- callers -------------------------------------------------------------------------------------


@row
async def test_clients_disconnecting_while_they_wait(h: Harness) -> None:
    broker = h.broker()
    client = h.client(broker)
    h.sts.hang = True
    crowd = 40 if h.matrix else 100
    tasks = await spread(h.get(client, "crowd") for _ in range(crowd))
    assert await asyncio.to_thread(h.sts.wait_for_calls, 1, 5.0)
    await eventually(lambda: broker.stats.misses == crowd)  # every request waits
    gone, staying = tasks[::2], tasks[1::2]
    for task in gone:
        task.cancel()
    results = await asyncio.gather(*gone, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    h.sts.release()
    responses = await asyncio.gather(*staying)
    key = h.issued("crowd")[0]
    assert all(r.status_code == 200 and r.json() == {"key": key} for r in responses)
    assert h.sts.calls == 1
    assert h.logged() == []


@row
async def test_a_thousand_identities_through_a_cache_of_a_hundred(h: Harness) -> None:
    identities, size = (200, 20) if h.matrix else (1000, 100)
    sts = await h.remote_sts()
    broker = h.broker(cache_size=size, endpoint=sts.url)
    client = h.client(broker)
    tenants = [f"many-{i}" for i in range(identities)]
    responses = await burst(h.get(client, t) for t in tenants)
    await sts.refresh()
    issued = sts.issued()
    for tenant, response in zip(tenants, responses, strict=True):
        assert response.status_code == 200, response.text
        assert [response.json()["key"]] == issued[arn(tenant)]  # its own, exchanged once
    assert sts.calls == sts.successes == identities
    assert len(broker._cache) <= size
    assert [r for r in h.records() if r.levelno >= logging.WARNING] == []


# -- secrets, across the matrix ------------------------------------------------------------------

_PARAM_SET = type(pytest.param(None))


def _raise_holding(secret: str) -> None:
    """Raise with ``secret`` in a local (and one level into a dict): the scan's control."""
    held = {"value": secret}
    raise RuntimeError(f"holding {len(held)} value")


class LeakInLoggedException(AssertionError):
    """A secret in the locals of a frame of an exception a log record carries."""


# Package defects the matrix finds, by run id (each an xfail that must keep failing, and only
# with this error: any other failure of the run still fails the test).
KNOWN_DEFECTS: dict[str, str] = {}


def matrix_runs() -> list[Any]:
    """A pytest.param(test, params) for every row and every parametrization of it."""
    runs = []
    for test in ROWS:
        combos: list[tuple[dict[str, Any], list[str]]] = [({}, [])]
        for mark in getattr(test, "pytestmark", []):
            if mark.name != "parametrize":
                continue
            names, values = mark.args[0], mark.args[1]
            names = [n.strip() for n in names.split(",")] if isinstance(names, str) else names
            expanded = []
            for params, ids in combos:
                for value in values:
                    if isinstance(value, _PARAM_SET):
                        given, label = value.values, value.id
                    else:
                        given, label = ((value,) if len(names) == 1 else value), str(value)
                    given_params = dict(zip(names, given, strict=True))
                    expanded.append(({**params, **given_params}, [*ids, label]))
            combos = expanded
        for params, ids in combos:
            name = "-".join([test.__name__.removeprefix("test_"), *ids])
            marks = []
            if name in KNOWN_DEFECTS:
                marks.append(
                    pytest.mark.xfail(
                        strict=True, raises=LeakInLoggedException, reason=KNOWN_DEFECTS[name]
                    )
                )
            runs.append(pytest.param(test, params, id=name, marks=marks))
    return runs


@pytest.mark.parametrize(("test", "params"), matrix_runs())
async def test_no_secret_anywhere_across_the_matrix(
    h: Harness, caplog: pytest.LogCaptureFixture, test: Any, params: dict[str, Any]
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("botocore", "urllib3", "stscreds"):
        caplog.set_level(logging.DEBUG, logger=name)
    h.matrix = True
    await h.run(test.__wrapped__, **params)
    secrets = h.secrets()
    haystack = list(h.haystack())
    # The scan has teeth: it finds each kind of secret when one is there.
    for label, secret in secrets.items():
        assert find_secrets({label: secret}, [("control", f"<{secret[:30]}>")]), label
    assert find_secrets({}, [("control", "Bearer eyJhbGciOiJFUzI1NiJ9.e30.c2ln")])
    label, secret = next(iter(secrets.items()))
    try:
        _raise_holding(secret)
    except RuntimeError as error:
        assert find_secrets({label: secret}, _exception_texts(error, "control")), label
    assert any(record.name.startswith("botocore") for record in h.records()) or h.sts.calls == 0
    leaks = find_secrets(secrets, haystack)
    assert leaks == [], "\n".join(f"{label} in {where}" for label, where in leaks)
    # Beyond what a log line shows: the exceptions log records carry, frames and all.
    deep = find_secrets(secrets, h.log_exception_texts())
    if deep:
        raise LeakInLoggedException("\n".join(f"{label} in {where}" for label, where in deep))


def test_every_documented_series_moves_across_the_matrix() -> None:
    """Run last: while the rows ran, every metric of the catalogue moved in some broker (the
    watcher samples each row's brokers every 5 ms and at the row's end)."""
    missing_rows = {test.__name__ for test in ROWS} - ROWS_RUN
    if missing_rows:
        pytest.skip(f"needs the whole matrix in this session ({len(missing_rows)} rows not run)")
    assert {spec.name for spec in (*METRICS, ROLE_METRIC)} - SERIES_MOVED == set()
