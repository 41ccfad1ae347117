"""Every way to get web-identity credentials, against one counting strict STS (issue #10).

Contenders (each obtains credentials for an identity; a *request* is one such call):

- ``naive``            no cache: mint a JWT, call AssumeRoleWithWebIdentity (one shared botocore
                       STS client), on a thread of a 40-thread pool (Starlette's default limit).
- ``botocore``         botocore's own web-identity provider, one per identity:
                       ``AssumeRoleWithWebIdentityCredentialFetcher`` behind
                       ``DeferredRefreshableCredentials`` (as ``AssumeRoleWithWebIdentityProvider``
                       builds it); ``get_frozen_credentials()`` on the same 40-thread pool.
- ``cashews``          the ``naive`` exchange wrapped in cashews (Redis backend) the way its README
                       recommends against cache stampedes with a hot cache: ``@cache.early(ttl,
                       early_ttl)``, with its default ``protected=True`` (concurrent calls for one
                       key in one process share one call). ``ttl`` = lifetime - 60 s (nothing with
                       less than a minute left is served), ``early_ttl`` = lifetime - the advisory
                       window stscreds uses for that lifetime (5 min up to 20 min, 15 min up to
                       90 min, else 60 min): one background recomputation per key, fleet-wide (a
                       Redis lock). ``early`` has no cross-process lock for a cold key (the README:
                       "not good at cold cache"); cashews' ``lock=True`` is only offered on the
                       simple ``@cache`` (no early refresh) and takes a Redis lock on every call.
- ``stscreds``         ``await broker.get(role)``, a CredentialBroker without a store;
- ``stscreds+sqlite``  the same with a SQLiteStore (a temp file, new per cell);
- ``stscreds+redis``   the same with a RedisStore.

Every contender signs its JWTs with one RS256 key (stscreds' default) and calls one strict STS
(``stscreds.testing.LocalSTS``: it verifies every token) that runs in its own process on
127.0.0.1 and sleeps ``--sts-latency`` ms (default 30) per call. cashews and the Redis stores
share one ``redis-server`` on a free loopback port (flushed between cells). Every cell (one
contender x one scenario) gets fresh contender objects, a flushed Redis and a new SQLite file.

Scenarios:

- ``cold-1``    N concurrent requests (1,000; ``--quick`` 200), all at once, for 1 identity, on
                empty caches, in this process; credentials of ``--lifetime`` (default 3600 s,
                STS's default duration: a cold burst measures single-flight, not refresh policy).
- ``cold-50``   the same over 50 identities (request i is for identity i mod 50).
- ``steady``    one refresh cycle at a fixed rate: 50 identities are warmed (one request each,
                not counted), then requests go out at a fixed rate, open loop (1,000 at 100/s;
                ``--quick`` 400 at 160/s), identity i mod 50, while time moves through one whole
                lifetime of the credentials (``--steady-lifetime``, default 900 s: the shortest
                STS grants, the short-lifetime case). Time is compressed, not faked per call: one
                clock, wall time scaled (lifetime / run time: 90x by default), drives the STS
                (its ``Date`` header and ``Expiration``), the JWTs, stscreds' broker (its
                ``clock``) and botocore (``time_fetcher`` and the fetcher's cache check, as
                benchmarks/botocore_app.py does); cashews keeps real time, so its ttl and
                early_ttl are divided by the same factor. The STS latency stays real (30 ms is
                ~3 s of compressed time, small next to every window involved). Every caching
                contender should refresh each identity once. botocore refreshes whenever less
                than 15 min is left, which for 900 s credentials is always: its advisory window
                covers the whole lifetime, so every request that finds the refresh lock free
                calls STS inline (``--steady-lifetime 3600`` shows it with 1 h credentials).
- ``workers-4`` 4 worker processes (this script with ``--worker``), each with its own contender,
                all released at once: each sends N/4 concurrent requests over the 50 identities
                (a load balancer spreading every identity over every worker); ``--lifetime``
                credentials, cold caches. STS calls per identity show what a shared store (or
                Redis cache) saves. (fleet.py measures a refresh cycle across processes.)

Figures per cell: STS calls (AssumeRoleWithWebIdentity calls the STS answered; stscreds'
store-only workers also send a refused GetCallerIdentity to learn STS's clock, counted apart as
``sts_probes``), the calls per identity (min-max), p50/p99 latency of a request (from the call to
the credentials in hand, in the process that made it; cold bursts include queueing behind the
thread pool or the event loop), and ``waited``: requests whose credentials the STS issued after
the request had started, i.e. requests that had to wait for an STS call (their own, one they
joined, or another worker's), judged from the STS's own answer times (wall clock, one host).
A request served credentials that existed when it started did not wait on STS, whatever else
it waited for.

Correctness is asserted: every request must get credentials, and the credentials must be ones
the STS issued for that request's own identity (role ARN and JWT subject, looked up by access
key id in the STS's records); no STS call may fail. Otherwise the run exits 1 (after printing
what it measured). stscreds cells that make other than the expected number of STS calls (one
per identity per cycle; one per identity per worker without a store in ``workers-4``) are
marked with a cross but do not fail the run (fleet.py is the strict check of that).

Usage::

    .venv/bin/python benchmarks/compare.py            # everything, about 2 minutes here
    .venv/bin/python benchmarks/compare.py --quick    # small counts, under a minute
    .venv/bin/python benchmarks/compare.py --json     # one JSON object on stdout
    .venv/bin/python benchmarks/compare.py --contenders botocore,stscreds --scenarios steady \\
        --steady-lifetime 3600 --sts-latency 100

JSON (``--json``): ``{"sts_latency_ms", "lifetime_s", "steady_lifetime_s", "steady_speed",
"quick", "plan", "machine", "seconds", "ok", "cells": [{"contender", "scenario", "lifetime_s",
"identities", "requests", "sts_calls", "calls_per_identity": [min, max], "p50_ms", "p99_ms",
"waited", "failed", "wrong", "sts_probes", "seconds", "expected_calls", "problems"}]}``;
``expected_calls`` is null for contenders other than stscreds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import botocore  # noqa: E402
import botocore.config  # noqa: E402
import botocore.session  # noqa: E402
from botocore.credentials import (  # noqa: E402
    AssumeRoleWithWebIdentityCredentialFetcher,
    DeferredRefreshableCredentials,
)
from botocore.utils import create_nested_client  # noqa: E402
from dateutil.parser import parse as parse_datetime  # noqa: E402

from servers import terminate  # noqa: E402
from stscreds import CredentialBroker, Role, SigningKey  # noqa: E402
from stscreds.stores import generate_key  # noqa: E402
from stscreds.testing import LocalSTS  # noqa: E402

ISSUER = "http://127.0.0.1/stscreds-compare"
AUDIENCE = "sts.amazonaws.com"
ACCOUNT = "123456789012"
REGION = "us-east-1"
ACTION = "AssumeRoleWithWebIdentity"
TOKEN_TTL = 300
POOL_THREADS = 40  # anyio's default thread limiter, what Starlette's run_in_threadpool uses
REQUEST_TIMEOUT = 60.0  # seconds, per request
MARK = "✗"
CONTENDERS = ("naive", "botocore", "cashews", "stscreds", "stscreds+sqlite", "stscreds+redis")
SCENARIOS = ("cold-1", "cold-50", "steady", "workers-4")
WORKERS = 4
IDENTITIES = 50


class BenchError(Exception):
    """Something went wrong that makes the run's numbers meaningless."""


# -- the shared clock --------------------------------------------------------------------------


class VirtualClock:
    """Wall time, optionally compressed: ``base + (time.time() - anchor) * speed``.

    The STS process and the contenders compute it from the same three numbers and the same
    wall clock, so they agree without talking to each other.
    """

    def __init__(self) -> None:
        now = time.time()
        self.params = (now, now, 1.0)

    def set(self, base: float, anchor: float, speed: float) -> None:
        self.params = (base, anchor, speed)

    def real(self) -> None:
        now = time.time()
        self.params = (now, now, 1.0)

    def time(self) -> float:
        base, anchor, speed = self.params
        return base + (time.time() - anchor) * speed

    def now(self) -> datetime.datetime:
        """The time as botocore's ``time_fetcher`` gives it: an aware datetime."""
        return datetime.datetime.fromtimestamp(self.time(), datetime.timezone.utc)


# -- identities and requests -------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    index: int
    arn: str
    subject: str
    session_name: str


def make_identities(n: int) -> list[Identity]:
    return [
        Identity(i, f"arn:aws:iam::{ACCOUNT}:role/compare-t{i}", f"tenant:t{i}", f"tenant-t{i}")
        for i in range(n)
    ]


@dataclass
class Sample:
    identity: int
    started: float  # wall clock (time.time()) when the request started
    seconds: float
    key: str | None  # access key id received
    error: str | None = None

    def encode(self) -> list[Any]:
        return [self.identity, self.started, self.seconds, self.key, self.error]

    @classmethod
    def decode(cls, row: list[Any]) -> Sample:
        return cls(int(row[0]), float(row[1]), float(row[2]), row[3], row[4])


# -- contenders --------------------------------------------------------------------------------


@dataclass
class Setup:
    """What a contender needs, in this process or in a worker."""

    sts_url: str
    key_pem: bytes
    lifetime: int
    speed: float  # the clock's compression factor for the cell (1.0 unless steady)
    redis_url: str | None = None
    sqlite_path: str | None = None
    store_key: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["key_pem"] = self.key_pem.decode()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Setup:
        return cls(**{**data, "key_pem": data["key_pem"].encode()})


def advisory_window(lifetime: float) -> float:
    """stscreds' advisory window for a lifetime (given to cashews as its early refresh)."""
    if lifetime <= 20 * 60:
        return 5 * 60.0
    if lifetime < 90 * 60:
        return 15 * 60.0
    return 60 * 60.0


_SESSION: Any = None
_SESSION_LOCK = threading.Lock()


def botocore_session() -> Any:
    """One botocore session per process (loading its data files is the slow part)."""
    global _SESSION
    with _SESSION_LOCK:
        if _SESSION is None:
            _SESSION = botocore.session.get_session()
        return _SESSION


class Contender:
    name = ""

    def __init__(self, setup: Setup, clock: VirtualClock) -> None:
        self.setup = setup
        self.clock = clock
        self.key = SigningKey.from_pem(setup.key_pem)

    async def start(self) -> None:
        """Make clients and connections (not credentials): a process starting up."""

    async def get(self, identity: Identity) -> str:
        """Credentials for ``identity``; returns their access key id."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release everything."""

    def mint(self, subject: str) -> str:
        """A web identity token with the claims stscreds puts in its own."""
        now = int(self.clock.time())
        return self.key.sign(
            {
                "iss": ISSUER,
                "sub": subject,
                "aud": AUDIENCE,
                "iat": now,
                "nbf": now,
                "exp": now + TOKEN_TTL,
                "jti": secrets.token_urlsafe(16),
            }
        )


class Threaded(Contender):
    """A contender whose calls block: they run on a pool of POOL_THREADS threads."""

    def __init__(self, setup: Setup, clock: VirtualClock) -> None:
        super().__init__(setup, clock)
        self.pool = ThreadPoolExecutor(POOL_THREADS, thread_name_prefix=self.name)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.pool.shutdown, True)


class Naive(Threaded):
    name = "naive"

    async def start(self) -> None:
        config = botocore.config.Config(
            signature_version=botocore.UNSIGNED, max_pool_connections=POOL_THREADS
        )
        self.client = botocore_session().create_client(
            "sts", region_name=REGION, endpoint_url=self.setup.sts_url, config=config
        )

    def exchange(self, identity: Identity) -> dict[str, Any]:
        answer = self.client.assume_role_with_web_identity(
            RoleArn=identity.arn,
            RoleSessionName=identity.session_name,
            WebIdentityToken=self.mint(identity.subject),
            DurationSeconds=self.setup.lifetime,
        )
        credentials: dict[str, Any] = answer["Credentials"]
        return credentials

    async def get(self, identity: Identity) -> str:
        credentials = await self.run(self.exchange, identity)
        return str(credentials["AccessKeyId"])

    async def close(self) -> None:
        await super().close()
        self.client.close()


class _ClockedFetcher(AssumeRoleWithWebIdentityCredentialFetcher):  # type: ignore[misc]
    """botocore's fetcher whose cache-expiry check reads the benchmark's clock.

    ``CachedCredentialFetcher._is_expired`` reads the wall clock, not the ``time_fetcher`` of
    the RefreshableCredentials around it; with compressed time it would answer a refresh from
    its in-memory cache. The logic is botocore's, with the clock swapped (botocore_app.py).
    """

    def __init__(self, *args: Any, clock: VirtualClock, **kwargs: Any) -> None:
        self._clock = clock
        super().__init__(*args, **kwargs)

    def _is_expired(self, credentials: dict[str, Any]) -> bool:
        end_time = credentials["Credentials"]["Expiration"]
        if not isinstance(end_time, datetime.datetime):
            end_time = parse_datetime(end_time)
        seconds = (end_time - self._clock.now()).total_seconds()
        return bool(seconds < self._expiry_window_seconds)


class Botocore(Threaded):
    name = "botocore"

    async def start(self) -> None:
        self.session = botocore_session()
        # session.create_client is not documented as thread-safe; refreshes of different
        # identities run on different threads (as in botocore_app.py).
        self.create_lock = threading.Lock()
        self.providers: dict[int, DeferredRefreshableCredentials] = {}

    def client_creator(self, service_name: str, **kwargs: Any) -> Any:
        with self.create_lock:
            return create_nested_client(
                self.session,
                service_name,
                region_name=REGION,
                endpoint_url=self.setup.sts_url,
                **kwargs,
            )

    def provider(self, identity: Identity) -> DeferredRefreshableCredentials:
        provider = self.providers.get(identity.index)
        if provider is None:
            fetcher = _ClockedFetcher(
                client_creator=self.client_creator,
                web_identity_token_loader=lambda: self.mint(identity.subject),
                role_arn=identity.arn,
                extra_args={
                    "RoleSessionName": identity.session_name,
                    "DurationSeconds": self.setup.lifetime,
                },
                clock=self.clock,
            )
            provider = DeferredRefreshableCredentials(
                refresh_using=fetcher.fetch_credentials,
                method="assume-role-with-web-identity",
                time_fetcher=self.clock.now,
            )
            self.providers[identity.index] = provider
        return provider

    async def get(self, identity: Identity) -> str:
        frozen = await self.run(self.provider(identity).get_frozen_credentials)
        return str(frozen.access_key)


class Cashews(Naive):
    name = "cashews"

    async def start(self) -> None:
        from cashews import Cache

        await super().start()
        assert self.setup.redis_url is not None
        self.cache = Cache()
        self.cache.setup(self.setup.redis_url)
        lifetime, speed = self.setup.lifetime, self.setup.speed
        # cashews counts real time (Redis TTLs, datetime.now()): compressed like the clock.
        ttl = (lifetime - 60) / speed
        early_ttl = (lifetime - advisory_window(lifetime)) / speed

        @self.cache.early(ttl=ttl, early_ttl=early_ttl, prefix="compare-early")
        async def credentials_for(arn: str, subject: str, session_name: str) -> dict[str, Any]:
            identity = Identity(-1, arn, subject, session_name)
            return dict(await self.run(self.exchange, identity))

        self.credentials_for = credentials_for

    async def get(self, identity: Identity) -> str:
        credentials = await self.credentials_for(
            identity.arn, identity.subject, identity.session_name
        )
        return str(credentials["AccessKeyId"])

    async def close(self) -> None:
        await super().close()
        await self.cache.close()


class Stscreds(Contender):
    name, store = "stscreds", "none"

    def __init__(self, setup: Setup, clock: VirtualClock) -> None:
        super().__init__(setup, clock)
        self.roles: dict[int, Role] = {}

    async def start(self) -> None:
        store: Any = None
        keys = [self.setup.store_key or ""]
        if self.store == "redis":
            from stscreds.stores import RedisStore

            assert self.setup.redis_url is not None
            store = RedisStore(self.setup.redis_url, encryption_keys=keys)
        elif self.store == "sqlite":
            from stscreds.stores import SQLiteStore

            assert self.setup.sqlite_path is not None
            store = SQLiteStore(
                self.setup.sqlite_path,
                encryption_keys=keys,
                clock=self.clock.time,
            )
        self.broker = CredentialBroker(
            issuer=ISSUER,
            signing_keys=[self.key],
            sts_endpoint_url=self.setup.sts_url,
            store=store,
            clock=self.clock,
        )

    def role(self, identity: Identity) -> Role:
        role = self.roles.get(identity.index)
        if role is None:
            role = self.roles[identity.index] = Role(
                identity.arn,
                subject=identity.subject,
                session_name=identity.session_name,
                duration_seconds=self.setup.lifetime,
            )
        return role

    async def get(self, identity: Identity) -> str:
        credentials = await self.broker.get(self.role(identity))
        return credentials.access_key_id

    async def close(self) -> None:
        await self.broker.aclose()


class StscredsSQLite(Stscreds):
    name, store = "stscreds+sqlite", "sqlite"


class StscredsRedis(Stscreds):
    name, store = "stscreds+redis", "redis"


CONTENDER_TYPES: dict[str, type[Contender]] = {
    c.name: c for c in (Naive, Botocore, Cashews, Stscreds, StscredsSQLite, StscredsRedis)
}
assert tuple(CONTENDER_TYPES) == CONTENDERS


# -- request loops -----------------------------------------------------------------------------


async def timed(contender: Contender, identity: Identity) -> Sample:
    started = time.time()
    t0 = time.perf_counter()
    try:
        key = await asyncio.wait_for(contender.get(identity), REQUEST_TIMEOUT)
    except Exception as error:  # a failed request is a result, counted and shown
        return Sample(
            identity.index,
            started,
            time.perf_counter() - t0,
            None,
            f"{type(error).__name__}: {str(error)[:160]}",
        )
    return Sample(identity.index, started, time.perf_counter() - t0, key)


async def burst(contender: Contender, identities: Sequence[Identity], n: int) -> list[Sample]:
    """n requests at once, request i for identity i mod len(identities)."""
    count = len(identities)
    return list(await asyncio.gather(*(timed(contender, identities[i % count]) for i in range(n))))


async def paced(
    contender: Contender, identities: Sequence[Identity], n: int, rate: float
) -> list[Sample]:
    """n requests at ``rate`` per second (open loop: a slow answer delays no later request)."""
    loop = asyncio.get_running_loop()
    count = len(identities)
    t0 = loop.time()
    tasks = []
    for i in range(n):
        delay = t0 + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(timed(contender, identities[i % count])))
    return list(await asyncio.gather(*tasks))


# -- the STS process ---------------------------------------------------------------------------


class TimedSTS(LocalSTS):
    """LocalSTS that also notes when each call was answered (wall clock) and counts the
    requests for other actions (stscreds' clock probe: a refused GetCallerIdentity)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.answered: dict[str, float] = {}
        self.probes = 0

    def _handle(self, params: dict[str, str], request_id: str) -> tuple[int, bytes, str]:
        result = super()._handle(params, request_id)
        if params.get("Action") == ACTION:
            self.answered[request_id] = time.time()
        else:
            with self._lock:
                self.probes += 1
        return result


def serve_sts(jwks_file: str, latency: float) -> int:
    """The STS process: JSON commands on stdin, one JSON answer per line on stdout."""
    clock = VirtualClock()
    jwks = json.loads(Path(jwks_file).read_text())
    sts = TimedSTS(issuer=ISSUER, jwks=jwks, audiences=[AUDIENCE], clock=clock.time)
    sts.delay = latency
    sts.start()
    out = sys.stdout
    try:
        out.write(json.dumps({"url": sts.url}) + "\n")
        out.flush()
        for line in sys.stdin:
            command = json.loads(line)
            op = command["op"]
            answer: dict[str, Any] = {"ok": True}
            if op == "reset":
                sts.reset()
                sts.answered.clear()
                sts.probes = 0
            elif op == "clock":
                clock.set(command["base"], command["anchor"], command["speed"])
            elif op == "counts":
                answer = {"calls": sts.calls, "answered": len(sts.requests)}
            elif op == "records":
                answer = {
                    "records": [
                        [
                            r.role_arn,
                            (r.claims or {}).get("sub"),
                            (r.credentials or {}).get("AccessKeyId"),
                            sts.answered.get(r.request_id),
                            r.status,
                            r.error_code,
                        ]
                        for r in list(sts.requests)
                    ],
                    "probes": sts.probes,
                    "internal_errors": [repr(e) for e in sts.internal_errors[:3]],
                }
            elif op == "quit":
                break
            out.write(json.dumps(answer) + "\n")
            out.flush()
    finally:
        sts.stop()
    return 0


@dataclass
class Record:
    arn: str | None
    subject: str | None
    key: str | None
    answered: float | None
    status: int
    error: str | None


class StsProcess:
    """The STS in its own process (so its JWT checks do not share a GIL with a contender)."""

    def __init__(self, jwks_file: Path, latency: float) -> None:
        args = [sys.executable, str(Path(__file__).resolve()), "--sts-server", str(jwks_file)]
        args += ["--sts-latency", str(latency * 1000)]
        self.proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        first = self._read(timeout=60)
        self.url: str = first["url"]

    def _read(self, timeout: float = 30.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = _readline(self.proc.stdout, timeout)
        if not line:
            raise BenchError(f"the STS process exited (code {self.proc.poll()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def command(self, op: str, **fields: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def records(self) -> tuple[list[Record], int, list[str]]:
        answer = self.command("records")
        records = [Record(*row) for row in answer["records"]]
        return records, int(answer["probes"]), list(answer["internal_errors"])

    async def quiesce(self, quiet: float = 0.3, timeout: float = 30.0) -> None:
        """Wait until no call is in flight and none arrived for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        last: tuple[int, int] | None = None
        while True:
            counts = self.command("counts")
            snapshot = (int(counts["calls"]), int(counts["answered"]))
            if snapshot[0] == snapshot[1] and snapshot == last:
                return
            if time.monotonic() > deadline:
                raise BenchError(
                    f"STS still busy after {timeout:g} s: (calls, answered) {snapshot}"
                )
            last = snapshot
            await asyncio.sleep(quiet)

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _readline(stream: IO[str], timeout: float) -> str:
    """One line from a child's pipe, or BenchError after ``timeout`` seconds."""
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if reader.is_alive():
        raise BenchError(f"no answer from a child process within {timeout:g} s")
    return result[0]


# -- worker processes (workers-4) --------------------------------------------------------------


async def worker_main() -> int:
    """A worker: reads its job (one JSON line), says ready, waits for "go", runs its burst."""
    loop = asyncio.get_running_loop()
    job = json.loads(await loop.run_in_executor(None, sys.stdin.readline))
    setup = Setup.from_json(job["setup"])
    contender = CONTENDER_TYPES[job["contender"]](setup, VirtualClock())
    await contender.start()
    print(json.dumps({"ready": os.getpid()}), flush=True)
    if (await loop.run_in_executor(None, sys.stdin.readline)).strip() != "go":
        return 1
    try:
        samples = await burst(contender, make_identities(job["identities"]), job["requests"])
        # Let background work (none expected when cold) reach the STS before closing.
        await asyncio.sleep(0.2)
    finally:
        await contender.close()
    print(json.dumps({"samples": [s.encode() for s in samples]}), flush=True)
    return 0


class Workers:
    def __init__(self, n: int) -> None:
        args = [sys.executable, str(Path(__file__).resolve()), "--worker"]
        self.procs = [
            subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for _ in range(n)
        ]

    def send(self, proc: subprocess.Popen[str], line: str) -> None:
        assert proc.stdin is not None
        proc.stdin.write(line + "\n")
        proc.stdin.flush()

    def read(self, proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
        assert proc.stdout is not None
        line = _readline(proc.stdout, timeout)
        if not line:
            raise BenchError(f"worker {proc.pid} exited (code {proc.wait()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def stop(self) -> None:
        terminate(self.procs)


async def run_workers(
    name: str, setup: Setup, identities: int, requests: int, workers: int
) -> list[Sample]:
    fleet = Workers(workers)
    try:
        job = {"contender": name, "setup": setup.to_json(), "identities": identities}
        share, extra = divmod(requests, workers)
        for i, proc in enumerate(fleet.procs):
            fleet.send(proc, json.dumps({**job, "requests": share + (i < extra)}))
        for proc in fleet.procs:
            await asyncio.to_thread(fleet.read, proc, 90.0)
        for proc in fleet.procs:
            fleet.send(proc, "go")
        samples: list[Sample] = []
        for proc in fleet.procs:
            answer = await asyncio.to_thread(fleet.read, proc, 120.0)
            samples += [Sample.decode(row) for row in answer["samples"]]
        return samples
    finally:
        fleet.stop()


# -- cells -------------------------------------------------------------------------------------


@dataclass
class Cell:
    contender: str
    scenario: str
    lifetime_s: int
    identities: int
    requests: int
    sts_calls: int
    calls_per_identity: tuple[int, int]
    p50_ms: float
    p99_ms: float
    waited: int
    failed: int
    wrong: int
    sts_probes: int
    seconds: float
    expected_calls: int | None  # stscreds only: what its design promises
    problems: list[str]

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["calls_per_identity"] = list(self.calls_per_identity)
        return data

    @property
    def deviates(self) -> bool:
        return self.expected_calls is not None and self.sts_calls != self.expected_calls


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def expected_calls(contender: str, scenario: str, identities: int) -> int | None:
    if not contender.startswith("stscreds"):
        return None
    if scenario == "workers-4" and contender == "stscreds":
        return identities * WORKERS
    return identities


def judge(
    contender: str,
    scenario: str,
    lifetime: int,
    identities: list[Identity],
    samples: list[Sample],
    records: list[Record],
    counted_from: int,
    probes: int,
    internal: list[str],
    seconds: float,
) -> Cell:
    """The figures of one cell, and everything that makes it wrong."""
    problems: list[str] = [f"STS internal error: {e}" for e in internal]
    failed_calls = [r for r in records if r.status != 200]
    if failed_calls:
        codes = sorted({f"{r.error} ({r.status})" for r in failed_calls})
        problems.append(f"{len(failed_calls)} STS calls failed: {', '.join(codes)}")
    by_key = {r.key: r for r in records if r.key is not None}
    failed = [s for s in samples if s.error is not None or s.key is None]
    for s in failed[:3]:
        problems.append(f"request for identity {s.identity} failed: {s.error}")
    if len(failed) > 3:
        problems.append(f"... {len(failed)} failed requests in all")
    wrong = 0
    waited = 0
    for s in samples:
        if s.key is None:
            continue
        record = by_key.get(s.key)
        identity = identities[s.identity]
        if record is None or record.arn != identity.arn or record.subject != identity.subject:
            wrong += 1
            if wrong <= 3:
                got = "unknown key" if record is None else f"{record.arn} / {record.subject}"
                problems.append(f"identity {s.identity} got credentials of {got}")
            continue
        if record.answered is not None and record.answered > s.started:
            waited += 1
    if wrong > 3:
        problems.append(f"... {wrong} requests got someone else's credentials in all")
    counted = [r for r in records[counted_from:] if r.status == 200]
    per_identity = {i.arn: 0 for i in identities}
    for r in counted:
        if r.arn in per_identity:
            per_identity[r.arn] += 1
    latencies = [s.seconds for s in samples]
    return Cell(
        contender=contender,
        scenario=scenario,
        lifetime_s=lifetime,
        identities=len(identities),
        requests=len(samples),
        sts_calls=len(counted),
        calls_per_identity=(min(per_identity.values()), max(per_identity.values())),
        p50_ms=round(percentile(latencies, 50) * 1000, 2),
        p99_ms=round(percentile(latencies, 99) * 1000, 2),
        waited=waited,
        failed=len(failed),
        wrong=wrong,
        sts_probes=probes,
        seconds=round(seconds, 2),
        expected_calls=expected_calls(contender, scenario, len(identities)),
        problems=problems,
    )


@dataclass
class Plan:
    cold: int  # requests per cold burst
    steady_requests: int
    steady_rate: float
    workers_requests: int
    lifetime: int  # cold-1, cold-50, workers-4
    steady_lifetime: int

    @property
    def steady_seconds(self) -> float:
        return self.steady_requests / self.steady_rate


class Bench:
    def __init__(self, args: argparse.Namespace, plan: Plan, tmp: Path) -> None:
        self.args = args
        self.plan = plan
        self.tmp = tmp
        self.clock = VirtualClock()
        self.key = SigningKey.generate()
        self.store_key = generate_key()
        self.sts: StsProcess | None = None
        self.redis: Any = None

    def start(self) -> None:
        jwks_file = self.tmp / "jwks.json"
        jwks_file.write_text(json.dumps({"keys": [self.key.public_jwk()]}))
        self.sts = StsProcess(jwks_file, self.args.sts_latency / 1000)
        if any(c in ("cashews", "stscreds+redis") for c in self.args.contenders):
            from servers.redis import RedisServer, find_redis_server

            binary = find_redis_server()
            if binary is None:
                raise BenchError("redis-server is not installed (STSCREDS_REDIS_SERVER)")
            self.redis = RedisServer(binary)
            self.redis.start()

    def stop(self) -> None:
        if self.sts is not None:
            self.sts.stop()
        if self.redis is not None:
            self.redis.close()

    def set_clock(self, base: float, anchor: float, speed: float) -> None:
        assert self.sts is not None
        self.clock.set(base, anchor, speed)
        self.sts.command("clock", base=base, anchor=anchor, speed=speed)

    def setup_for(self, lifetime: int, speed: float) -> Setup:
        assert self.sts is not None
        return Setup(
            sts_url=self.sts.url,
            key_pem=self.key.to_pem(),
            lifetime=lifetime,
            speed=speed,
            redis_url=None if self.redis is None else self.redis.url,
            sqlite_path=str(self.tmp / f"store-{time.monotonic_ns()}.db"),
            store_key=self.store_key,
        )

    async def cell(self, contender: str, scenario: str) -> Cell:
        sts = self.sts
        assert sts is not None
        began = time.monotonic()
        now = time.time()
        self.set_clock(now, now, 1.0)
        sts.command("reset")
        if self.redis is not None:
            self.redis.flushall()
        plan = self.plan
        counted_from = 0
        lifetime = plan.steady_lifetime if scenario == "steady" else plan.lifetime
        if scenario == "workers-4":
            identities = make_identities(IDENTITIES)
            samples = await run_workers(
                contender,
                self.setup_for(lifetime, 1.0),
                IDENTITIES,
                plan.workers_requests,
                WORKERS,
            )
            await sts.quiesce()
        else:
            speed = 1.0
            if scenario == "steady":
                speed = lifetime / plan.steady_seconds
            instance = CONTENDER_TYPES[contender](self.setup_for(lifetime, speed), self.clock)
            await instance.start()
            try:
                if scenario in ("cold-1", "cold-50"):
                    identities = make_identities(1 if scenario == "cold-1" else IDENTITIES)
                    samples = await burst(instance, identities, plan.cold)
                else:
                    identities = make_identities(IDENTITIES)
                    warm = await burst(instance, identities, len(identities))
                    if any(s.error for s in warm):
                        raise BenchError(f"{contender}: warm-up failed: {warm[0].error}")
                    await sts.quiesce()
                    counted_from = len(sts.records()[0])
                    # From here one lifetime passes in `duration` seconds of wall time.
                    self.set_clock(self.clock.time(), time.time(), speed)
                    samples = await paced(
                        instance, identities, plan.steady_requests, plan.steady_rate
                    )
                await sts.quiesce()
            finally:
                await instance.close()
        records, probes, internal = sts.records()
        return judge(
            contender,
            scenario,
            lifetime,
            identities,
            samples,
            records,
            counted_from,
            probes,
            internal,
            time.monotonic() - began,
        )


# -- report ------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import redis

    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()} {platform.machine()}",
        "botocore": botocore.__version__,
        "cashews": importlib.metadata.version("cashews"),
        "redis_py": redis.__version__,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, timeout=5
        ).stdout
        info["redis_server"] = next(
            (p.split("=", 1)[1] for p in out.split() if p.startswith("v=")), None
        )
    return info


def table(cells: list[Cell]) -> str:
    lines = [
        "| scenario | contender | identities | requests | STS calls | per identity | waited "
        "| p50 ms | p99 ms |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for c in cells:
        low, high = c.calls_per_identity
        per = str(low) if low == high else f"{low}-{high}"
        calls = f"{c.sts_calls:,}" + (f" {MARK}" if c.deviates else "")
        if c.failed or c.wrong:
            calls += f" ({c.failed} failed, {c.wrong} wrong)"
        lines.append(
            f"| {c.scenario} | {c.contender} | {c.identities} | {c.requests:,} | {calls} | {per} "
            f"| {c.waited:,} | {c.p50_ms:.1f} | {c.p99_ms:.1f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts (under a minute)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated")
    parser.add_argument("--sts-latency", type=float, default=30.0, help="ms per STS call (30)")
    parser.add_argument(
        "--lifetime", type=int, default=3600, help="credential lifetime in cold-*, workers-4 (3600)"
    )
    parser.add_argument(
        "--steady-lifetime", type=int, default=900, help="credential lifetime in steady (900)"
    )
    parser.add_argument("--sts-server", metavar="JWKS_FILE", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.contenders = [c for c in args.contenders.split(",") if c]
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    for name in args.contenders:
        if name not in CONTENDERS:
            parser.error(f"unknown contender {name!r} (one of {', '.join(CONTENDERS)})")
    for name in args.scenarios:
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r} (one of {', '.join(SCENARIOS)})")
    for name in ("lifetime", "steady_lifetime"):
        if not 900 <= getattr(args, name) <= 43200:
            parser.error(f"--{name.replace('_', '-')}: STS grants 900 to 43200 seconds")
    if args.sts_latency < 0:
        parser.error("--sts-latency: must be >= 0")
    return args


def sparse_warning(plan: Plan) -> str | None:
    """A note when steady sends an identity too few requests to catch its refresh window."""
    interval = plan.steady_lifetime * IDENTITIES / plan.steady_requests
    # From the latest planned refresh (75% of stscreds' window before expiry) to its
    # mandatory window (60 s before expiry): a request must land in between.
    gap = advisory_window(plan.steady_lifetime) * 0.75 - 60
    if interval <= gap:
        return None
    return (
        f"note: steady sends each identity a request every {interval:.0f} s of credential "
        f"time, more than the {gap:.0f} s in which a background refresh can start: some "
        "identities will only be refreshed by a request that waits"
    )


def plan_for(args: argparse.Namespace) -> Plan:
    if args.quick:
        return Plan(
            cold=200,
            steady_requests=400,
            steady_rate=160.0,
            workers_requests=200,
            lifetime=args.lifetime,
            steady_lifetime=args.steady_lifetime,
        )
    return Plan(
        cold=1000,
        steady_requests=1000,
        steady_rate=100.0,
        workers_requests=1000,
        lifetime=args.lifetime,
        steady_lifetime=args.steady_lifetime,
    )


async def main_async(args: argparse.Namespace) -> int:
    began = time.monotonic()
    plan = plan_for(args)
    info = machine()
    note = sparse_warning(plan) if "steady" in args.scenarios else None
    if note:
        print(note, file=sys.stderr)
    cells: list[Cell] = []
    with tempfile.TemporaryDirectory(prefix="stscreds-compare-") as tmpdir:
        bench = Bench(args, plan, Path(tmpdir))
        try:
            bench.start()
            for scenario in args.scenarios:
                for contender in args.contenders:
                    print(f"{scenario} / {contender} ...", end=" ", flush=True, file=sys.stderr)
                    cell = await bench.cell(contender, scenario)
                    cells.append(cell)
                    print(
                        f"{cell.seconds:.1f} s, {cell.sts_calls} STS calls"
                        + (f", {len(cell.problems)} problem(s)" if cell.problems else ""),
                        file=sys.stderr,
                    )
        finally:
            bench.stop()
    runtime = time.monotonic() - began
    info["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    failed = [c for c in cells if c.problems]
    if args.json:
        result = {
            "sts_latency_ms": args.sts_latency,
            "lifetime_s": plan.lifetime,
            "steady_lifetime_s": plan.steady_lifetime,
            "steady_speed": round(plan.steady_lifetime / plan.steady_seconds, 1),
            "quick": args.quick,
            "plan": dataclasses.asdict(plan),
            "machine": info,
            "seconds": round(runtime, 1),
            "ok": not failed,
            "cells": [c.to_json() for c in cells],
        }
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        speed = plan.steady_lifetime / plan.steady_seconds
        print(
            f"Contenders against one strict STS ({args.sts_latency:g} ms per call, own process). "
            f"cold-*: {plan.cold:,} requests at once, {plan.lifetime} s credentials; steady: "
            f"{plan.steady_requests:,} requests at {plan.steady_rate:g}/s over {IDENTITIES} "
            f"warm identities through one lifetime of {plan.steady_lifetime} s credentials "
            f"({speed:.0f}x compressed time); workers-4: {WORKERS} processes, "
            f"{plan.workers_requests:,} requests at once in all, {plan.lifetime} s credentials."
        )
        print(
            f"Machine: {info['cpus']} CPUs, Python {info['python']} ({info['system']}), botocore "
            f"{info['botocore']}, cashews {info['cashews']}, redis-server "
            f"{info.get('redis_server')}; load average {info['load_average'][0]} at start, "
            f"{info['load_average_end'][0]} at end."
        )
        print()
        print(table(cells))
        print()
        print(
            "waited: requests whose credentials the STS issued after the request started. "
            f"{MARK}: a stscreds cell off its expected STS calls (1 per identity; {WORKERS} per "
            "identity without a store in workers-4)."
        )
        probes = sum(c.sts_probes for c in cells)
        if probes:
            print(f"Clock probes (refused GetCallerIdentity) sent by stscreds workers: {probes}.")
        print(f"Total runtime {runtime:.0f} s.")
    for c in failed:
        print(f"FAIL: {c.scenario} / {c.contender}:", file=sys.stderr)
        for problem in c.problems:
            print(f"    {problem}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.sts_server:
        return serve_sts(args.sts_server, args.sts_latency / 1000)
    if args.worker:
        return asyncio.run(worker_main())
    try:
        return asyncio.run(main_async(args))
    except BenchError as error:
        print(f"\nERROR: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
