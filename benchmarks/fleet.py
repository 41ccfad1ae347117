"""STS calls per identity, client-side latency and store-operation latency for a fleet of W
worker processes split over two "hosts", for every store.

For each variant and each W, W uvicorn processes (one per loopback port) serve
``GET /creds?tenant=NAME`` for R tenants (one IAM role each); a counting strict STS
(tests/servers/sts.py, loopback, ``--sts-delay`` seconds per call) answers them all. The W
processes are split into two process groups, "hosts" A and B: A gets ceil(W/2) of them, B the
rest (W = 1: A only). A store a fleet shares over the network (Redis, DynamoDB) is shared by
both hosts; a store that is one file per machine (SQLite) is one file per host.

Variants (each one entry of ``VARIANTS``: how to start its store's server, the workers'
environment per host, and what one STS call per identity per cycle is counted over):

- ``redis``    stscreds + RedisStore: one redis-server (free loopback port) for both hosts
- ``cluster``  stscreds + RedisStore on a Redis Cluster of 3 primaries (``redis+cluster://``)
- ``sentinel`` stscreds + RedisStore on a Sentinel-managed primary with a replica and 3
               Sentinels (``redis+sentinel://``); both from tests/servers/redis_ha.py, and
               left out of the default list where that file or RedisStore's URLs are missing
- ``sqlite``   stscreds + SQLiteStore: one file per host (the W/2 processes of a host share it)
- ``dynamodb`` stscreds + DynamoDBStore: one table on a local moto DynamoDB for both hosts
               (tests/servers/dynamodb.py in its own process, one call at a time, at nice
               -10 where allowed); its workers call ``store.check()`` at start-up and get
               ``store_timeout`` = 1 s (the others the default 0.25 s): the emulator queues
               calls for up to ~0.5 s at W = 8 on 2 CPUs
- ``none``     stscreds without a store (in-process cache and single-flight only)
- ``botocore`` botocore's own web-identity provider, one per role per process
               (benchmarks/botocore_app.py: AssumeRoleWithWebIdentityCredentialFetcher +
               DeferredRefreshableCredentials, ``get_frozen_credentials()`` in a thread)

stscreds workers run tests/servers/fleet_app.py, their store wrapped so that each worker records
how long every store call took (``FLEET_STORE_TIMING=1``, ``POST /_store_ops``). The W processes
of a configuration are started once and serve both phases:

1. cold burst: N requests per (worker, role) pair, ``--concurrency`` at a time; request i
   goes to worker i mod W for role (i div W) mod R, so the first W*R requests cover every
   pair (a deterministic spread: every process, on both hosts, sees every identity).
2. forced refresh: every worker's clock and the STS clock move forward together so that
   the newest cold credentials have ``--left`` seconds (default 640) to live: inside both
   advisory windows (botocore 900 s; stscreds 675-900 s, jittered, for 1 h credentials)
   and outside both mandatory windows (botocore 600 s; stscreds 60 s). A second burst of
   the same shape follows; then every (worker, role) pair is polled until it serves the
   new credentials, and the STS calls of the cycle are counted. If a worker's store circuit
   breaker opened during the cold burst, the refresh first waits until it closed again: in
   production the refresh comes ~45 min after the cold start.

Reported per configuration: STS calls per identity (cold and refresh separately), distinct
access keys per identity across the fleet, client-side latency p50/p99 per phase (a plain
asyncio socket client, one connection per request, ``Connection: close``; connect to EOF), and
the store operations' p50/p99 over both phases and all workers (get, put, acquire, release,
extend, holder, notify: each from the broker's call to its answer, as the worker's event loop
sees it; ``wait``, which lasts until a notify or its timeout, is left out).

Checks: one STS call per identity per cycle per store: 1 with a store both hosts share (and
every worker hands out the same keys), 1 per host with SQLite (2 once both hosts have workers;
every worker of a host hands out the same keys), W without a store (one per process).
Deviating cells are marked ``✗``. The benchmark exits 1 on any failed request, STS error,
worker that does not start or settle, or a deviating stscreds cell (after printing the table).

Usage::

    .venv/bin/python benchmarks/fleet.py            # W in 1,2,4,8, 20 requests per pair
    .venv/bin/python benchmarks/fleet.py --quick    # W in 1,4, 8 requests per pair
    .venv/bin/python benchmarks/fleet.py --variants redis,dynamodb --workers 2 -v
    .venv/bin/python benchmarks/fleet.py --json     # the table on stderr, one JSON object on stdout

JSON (``--json``): ``{"sts_delay_ms", "roles", "per_pair", "concurrency", "left_s", "quick",
"hosts", "seconds", "machine": {...}, "ok", "cells": [CELL]}``; CELL is ``{"variant", "label",
"store", "scope", "ours", "workers", "hosts", "workers_per_host", "ok", "cold": PHASE,
"refresh": PHASE, "store_timeout_s", "store_ops", "server_calls", "cold_store_errors",
"seconds"}``; PHASE is ``{"sts_calls", "per_identity", "per_identity_each", "expected", "ok",
"keys", "keys_per_host", "requests", "p50_ms", "p99_ms"}``: ``sts_calls`` over all identities,
``per_identity`` = sts_calls / roles, ``per_identity_each`` one count per identity,
``expected`` the count per identity a correct fleet makes. ``scope`` is what one call per
identity per cycle is per: "fleet", "host" or "process"; ``hosts`` the hosts with workers.
``store_ops`` (null without a store): ``{"p50_ms", "p99_ms", "count", "by_phase": {phase:
{...}}, "by_operation": {op: {"count", "p50_ms", "p99_ms"}}}``; its p50/p99/count leave ``wait``
out (``by_operation`` lists it). ``server_calls`` (DynamoDB only, else null): ``{phase: {op:
n}}``, the requests the emulator received, which is what DynamoDB bills.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import os
import platform
import select
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from servers import terminate  # noqa: E402
from servers.dynamodb import worker_env  # noqa: E402
from servers.redis import RedisServer, find_redis_server  # noqa: E402
from servers.sts import StrictSTS  # noqa: E402
from stscreds import SigningKey  # noqa: E402
from stscreds.stores import generate_key  # noqa: E402

ISSUER = "http://127.0.0.1/stscreds-fleet-benchmark"
ACCOUNT = "123456789012"
MARK = "✗"
#: fleet_app's default FLEET_STORE_COOLDOWN (the broker's store_cooldown).
STORE_COOLDOWN = 5.0
#: fleet_app's default FLEET_STORE_TIMEOUT (the broker's store_timeout, and its default).
DEFAULT_STORE_TIMEOUT = 0.25
#: The two process groups a fleet is split over.
HOSTS = ("A", "B")
#: What one STS call per identity per cycle is counted over.
FLEET, HOST, PROCESS = "fleet", "host", "process"
#: Store operations whose latency is reported (``wait`` lasts until a notify: not a round trip).
TIMED_OPERATIONS = ("get", "put", "acquire", "release", "extend", "holder", "notify")


class BenchError(Exception):
    """Something went wrong that makes the run's numbers meaningless."""


# -- stores ------------------------------------------------------------------------------------


class Backend:
    """A variant's store server(s): started before its first configuration, stopped after its
    last; ``fresh`` empties the store for a new configuration; ``env`` is what the workers of
    one host get."""

    store = "none"
    #: The broker's store_timeout (seconds) the workers get: fleet_app's default.
    store_timeout = DEFAULT_STORE_TIMEOUT

    @classmethod
    def missing(cls) -> str | None:
        """Why this backend cannot run here (None if it can)."""
        return None

    def start(self, tmp: Path) -> None:
        self.tmp = tmp

    def fresh(self, config: str) -> None:
        self.config = config

    def env(self, host: str, base: dict[str, str]) -> dict[str, str]:
        return {**base, "FLEET_STORE": self.store}

    def calls(self) -> dict[str, int] | None:
        """Requests the store's server received since the last ``calls()``, if it counts them."""
        return None

    def stop(self) -> None:
        pass

    def version(self) -> str | None:
        return None


class RedisBackend(Backend):
    """One redis-server on a free loopback port, shared by both hosts."""

    store = "redis"

    def start(self, tmp: Path) -> None:
        self.binary = redis_binary()
        self.server = RedisServer(self.binary)
        self.server.start()

    def fresh(self, config: str) -> None:
        self.server.flushall()

    def env(self, host: str, base: dict[str, str]) -> dict[str, str]:
        return {**base, "FLEET_STORE": "redis", "FLEET_STORE_URL": self.server.url}

    def stop(self) -> None:
        with contextlib.suppress(AttributeError):
            self.server.close()

    def version(self) -> str | None:
        return tool_version([self.binary, "--version"], "v=")


class RedisClusterBackend(RedisBackend):
    """A Redis Cluster of three primaries (tests/servers/redis_ha.py), shared by both hosts;
    the workers' RedisStore gets its ``redis+cluster://`` URL."""

    @classmethod
    def missing(cls) -> str | None:
        return redis_ha_missing()

    def start(self, tmp: Path) -> None:
        from servers.redis_ha import LocalCluster

        self.binary = redis_binary()
        self.cluster = LocalCluster(self.binary, primaries=3)
        self.cluster.start()

    def fresh(self, config: str) -> None:
        for node in self.cluster.primaries():
            node.command("FLUSHALL")

    def env(self, host: str, base: dict[str, str]) -> dict[str, str]:
        return {**base, "FLEET_STORE": "redis", "FLEET_STORE_URL": self.cluster.url}

    def stop(self) -> None:
        with contextlib.suppress(AttributeError):
            self.cluster.close()


class RedisSentinelBackend(RedisBackend):
    """A primary, its replica and three Sentinels (tests/servers/redis_ha.py), shared by both
    hosts; the workers' RedisStore gets its ``redis+sentinel://`` URL."""

    @classmethod
    def missing(cls) -> str | None:
        return redis_ha_missing()

    def start(self, tmp: Path) -> None:
        from servers.redis_ha import LocalSentinel

        self.binary = redis_binary()
        self.group = LocalSentinel(self.binary)
        self.group.start()

    def fresh(self, config: str) -> None:
        self.group.primary.command("FLUSHALL")  # the replica follows

    def env(self, host: str, base: dict[str, str]) -> dict[str, str]:
        return {**base, "FLEET_STORE": "redis", "FLEET_STORE_URL": self.group.url}

    def stop(self) -> None:
        with contextlib.suppress(AttributeError):
            self.group.close()


def redis_ha_missing() -> str | None:
    from stscreds.stores import RedisStore

    if not hasattr(RedisStore, "from_cluster") or not (ROOT / "tests/servers/redis_ha.py").exists():
        return "needs RedisStore with Cluster and Sentinel URLs and tests/servers/redis_ha.py"
    return None


def redis_binary() -> str:
    binary = find_redis_server()
    if binary is None:
        raise BenchError("redis-server is not installed (STSCREDS_REDIS_SERVER)")
    return binary


class SQLiteBackend(Backend):
    """One SQLite file per host: the processes of one machine share it, hosts do not."""

    store = "sqlite"

    def env(self, host: str, base: dict[str, str]) -> dict[str, str]:
        # A new file per configuration: one left by an earlier one would answer the cold burst.
        path = self.tmp / f"store-{self.config}-{host}.db"
        return {**base, "FLEET_STORE": "sqlite", "FLEET_STORE_URL": str(path)}

    def version(self) -> str | None:
        import sqlite3

        return sqlite3.sqlite_version


#: Runs tests/servers/dynamodb.py's LocalDynamoDB and prints its URL; then answers each line
#: "calls" with the calls it received since the last one (JSON, by operation); exits at EOF.
_DYNAMODB_SERVER = """
import json, sys
sys.path.insert(0, sys.argv[1])
from servers.dynamodb import LocalDynamoDB
server = LocalDynamoDB().start()
print(server.url, flush=True)
for line in sys.stdin:
    with server._state:
        calls, server.calls = dict(server.calls), type(server.calls)()
    print(json.dumps(calls), flush=True)
server.stop()
"""


#: The emulator's nice value, where allowed (root): DynamoDB runs on machines of its own, not
#: on the CPUs the workers compete for; at W = 8 this halves its queueing in the refresh.
EMULATOR_NICE = -10


def _raise_priority() -> None:
    """In the emulator's process before exec: a higher priority if allowed, else as is."""
    with contextlib.suppress(OSError):
        os.nice(EMULATOR_NICE)


class DynamoDBBackend(Backend):
    """moto's DynamoDB (one call at a time) in its own process; one new table per
    configuration, shared by both hosts. Workers sign with fake credentials."""

    store = "dynamodb"
    region = "eu-west-1"
    # moto answers one call at a time from one Python process that shares the CPUs with the
    # workers: 2-15 ms per call alone, but at W = 8 on 2 CPUs calls queue for 50-400 ms (in
    # DynamoDB they take a few ms and run in parallel). The default 0.25 s would measure the
    # emulator's queue through the breaker; a second is the multi-process tests' value.
    store_timeout = 1.0

    @classmethod
    def missing(cls) -> str | None:
        import importlib.util

        return None if importlib.util.find_spec("moto") else "needs moto (the dev extras)"

    def start(self, tmp: Path) -> None:
        import botocore.session

        self.log = tmp / "dynamodb.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _DYNAMODB_SERVER, str(ROOT / "tests")],
                env=worker_env(os.environ),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                preexec_fn=_raise_priority,
            )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 60.0)
        line = self.proc.stdout.readline().decode().strip() if ready else ""
        if not line.startswith("http://"):
            self.stop()
            tail = self.log.read_text(errors="replace")[-2000:]
            raise BenchError(f"local DynamoDB did not start:\n{tail}")
        self.url = line
        session = botocore.session.Session()
        session.set_credentials("testing", "testing")
        self.client = session.create_client(
            "dynamodb", region_name=self.region, endpoint_url=self.url
        )

    def fresh(self, config: str) -> None:
        self.table = f"stscreds-fleet-{config}"
        self.client.create_table(
            TableName=self.table,
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
            BillingMode="PAY_PER_REQUEST",
        )

    def env(self, host: str, base: dict[str, str]) -> dict[str, str]:
        return {
            **worker_env(base),  # fake credentials, none of the host's AWS configuration
            "FLEET_STORE": "dynamodb",
            "FLEET_STORE_URL": self.url,
            "FLEET_DYNAMODB_TABLE": self.table,
            "FLEET_DYNAMODB_REGION": self.region,
            # store.check() at start-up, as the docs suggest: it also builds the botocore
            # client (service model, credentials) before the first request needs it.
            "FLEET_DYNAMODB_CHECK": "1",
        }

    def calls(self) -> dict[str, int]:
        """DynamoDB calls received since the last ``calls()``, by operation."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"calls\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], 30.0)
        if not ready:
            raise BenchError(f"local DynamoDB does not answer (log: {self.log})")
        answer: dict[str, int] = json.loads(self.proc.stdout.readline())
        return answer

    def stop(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is None:
            return
        with contextlib.suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def version(self) -> str | None:
        import importlib.metadata

        nice = os.getpriority(os.PRIO_PROCESS, self.proc.pid)
        return f"moto {importlib.metadata.version('moto')}, nice {nice}"


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    backend: type[Backend]  # the store's server(s) and the workers' environment
    scope: str  # FLEET | HOST | PROCESS: what one STS call per identity per cycle is per
    ours: bool = True  # stscreds (a deviation is our bug) or a peer (a deviation is reported)
    app: str = "servers.fleet_app:app"
    app_dir: Path = ROOT / "tests"

    def expected(self, per_host: list[int]) -> int:
        """STS calls per identity per cycle a correct fleet makes."""
        if self.scope == FLEET:
            return 1
        if self.scope == HOST:
            return sum(1 for n in per_host if n)
        return sum(per_host)


VARIANTS = {
    v.name: v
    for v in (
        Variant("redis", "stscreds + RedisStore", RedisBackend, FLEET),
        Variant("cluster", "stscreds + RedisStore (Cluster)", RedisClusterBackend, FLEET),
        Variant("sentinel", "stscreds + RedisStore (Sentinel)", RedisSentinelBackend, FLEET),
        Variant("sqlite", "stscreds + SQLiteStore", SQLiteBackend, HOST),
        Variant("dynamodb", "stscreds + DynamoDBStore", DynamoDBBackend, FLEET),
        Variant("none", "stscreds, no store", Backend, PROCESS),
        Variant(
            "botocore",
            "botocore RefreshableCredentials",
            Backend,
            PROCESS,
            ours=False,
            app="botocore_app:app",
            app_dir=ROOT / "benchmarks",
        ),
    )
}


def split(workers: int) -> list[int]:
    """Workers per host: A gets ceil(W/2), B the rest."""
    first = (workers + 1) // 2
    return [first, workers - first]


# -- HTTP client ---------------------------------------------------------------------------


async def http(port: int, method: str, target: str, timeout: float) -> tuple[int, bytes, float]:
    """One request on a fresh connection; returns (status, body, seconds connect-to-EOF)."""
    request = (
        f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Connection: close\r\nContent-Length: 0\r\n\r\n"
    ).encode()

    async def exchange() -> tuple[bytes, float]:
        start = time.perf_counter()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(request)
            data = await reader.read()
            elapsed = time.perf_counter() - start
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        return data, elapsed

    data, elapsed = await asyncio.wait_for(exchange(), timeout)
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise BenchError(f"port {port}: not an HTTP response: {data[:80]!r}") from None
    return status, body, elapsed


async def get_json(port: int, method: str, target: str, timeout: float = 10.0) -> dict[str, Any]:
    status, body, _ = await http(port, method, target, timeout)
    if status != 200:
        raise BenchError(f"{method} {target} on port {port}: HTTP {status} {body[:200]!r}")
    result: dict[str, Any] = json.loads(body)
    return result


# -- worker processes ----------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


class Fleet:
    """W uvicorn processes of one variant, one per loopback port, over the hosts of ``per_host``.

    ``envs``: the environment of each host's workers.
    """

    def __init__(
        self, variant: Variant, per_host: list[int], envs: dict[str, dict[str, str]], logdir: Path
    ):
        self.variant = variant
        self.hosts = [host for host, n in zip(HOSTS, per_host, strict=True) for _ in range(n)]
        workers = len(self.hosts)
        self.ports = free_ports(workers)
        self.envs = envs
        self.logs = [
            logdir / f"{variant.name}-w{workers}-{i}-{host}.log"
            for i, host in enumerate(self.hosts)
        ]
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        for port, log, host in zip(self.ports, self.logs, self.hosts, strict=True):
            args = [sys.executable, "-m", "uvicorn", "--app-dir", str(self.variant.app_dir)]
            args += [self.variant.app, "--host", "127.0.0.1", "--port", str(port)]
            args += ["--loop", "asyncio", "--http", "h11", "--log-level", "warning"]
            args += ["--no-access-log", "--timeout-graceful-shutdown", "2"]
            env = {**self.envs[host], "FLEET_HOST": host}
            with log.open("wb") as out:
                self.procs.append(
                    subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
                )

    async def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        pending = set(range(len(self.ports)))
        while pending:
            for i in sorted(pending):
                if self.procs[i].poll() is not None:
                    raise BenchError(f"worker {i} exited at start:\n{self.log_tail(i)}")
                with contextlib.suppress(OSError, asyncio.TimeoutError, BenchError):
                    await get_json(self.ports[i], "GET", "/stats", timeout=2.0)
                    pending.discard(i)
            if pending and time.monotonic() > deadline:
                raise BenchError(f"workers {sorted(pending)} did not answer in {timeout:.0f} s")
            if pending:
                await asyncio.sleep(0.1)

    def stop(self) -> None:
        terminate(self.procs)

    def log_tail(self, i: int, chars: int = 3000) -> str:
        try:
            return self.logs[i].read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def notable_log_lines(self) -> collections.Counter[str]:
        """Warnings, errors and tracebacks the workers wrote (e.g. a store outage)."""
        found: collections.Counter[str] = collections.Counter()
        for i, log in enumerate(self.logs):
            with contextlib.suppress(OSError):
                for line in log.read_text(errors="replace").splitlines():
                    if any(s in line for s in ("stscreds", "Traceback", "Error", "WARNING")):
                        found[f"worker {i} ({self.hosts[i]}): {line.strip()[:200]}"] += 1
        return found


# -- bursts --------------------------------------------------------------------------------


def role_arn(tenant: str) -> str:
    return f"arn:aws:iam::{ACCOUNT}:role/fleet-{tenant}"


@dataclass
class Sample:
    worker: int
    tenant: str
    seconds: float
    access_key_id: str
    expiration: float
    started: float  # seconds after the burst began


async def burst(
    ports: list[int], tenants: list[str], per_pair: int, concurrency: int, timeout: float
) -> list[Sample]:
    """per_pair requests for every (worker, tenant) pair, round-robin, concurrency at a time."""
    workers, roles = len(ports), len(tenants)
    limit = asyncio.Semaphore(concurrency)
    failures: list[str] = []
    began = time.perf_counter()

    async def one(i: int) -> Sample | None:
        worker, tenant = i % workers, tenants[(i // workers) % roles]
        async with limit:
            started = time.perf_counter() - began
            try:
                status, body, seconds = await http(
                    ports[worker], "GET", f"/creds?tenant={tenant}", timeout
                )
            except (OSError, asyncio.TimeoutError) as error:
                failures.append(f"worker {worker} tenant {tenant}: {type(error).__name__}")
                return None
        if status != 200:
            failures.append(f"worker {worker} tenant {tenant}: HTTP {status} {body[:160]!r}")
            return None
        data = json.loads(body)
        return Sample(
            worker, tenant, seconds, data["access_key_id"], float(data["expiration"]), started
        )

    results = await asyncio.gather(*(one(i) for i in range(per_pair * workers * roles)))
    if failures:
        shown = "\n  ".join(failures[:10])
        raise BenchError(f"{len(failures)} of {len(results)} requests failed:\n  {shown}")
    return [s for s in results if s is not None]


async def settle(
    ports: list[int], tenants: list[str], newer_than: float, timeout: float
) -> dict[tuple[int, str], str]:
    """Poll every (worker, tenant) until it serves credentials expiring after newer_than.

    Returns the access key id each pair serves then.
    """
    deadline = time.monotonic() + timeout
    pending = {(w, t) for w in range(len(ports)) for t in tenants}
    served: dict[tuple[int, str], str] = {}
    while pending:
        for worker, tenant in sorted(pending):
            data = await get_json(ports[worker], "GET", f"/creds?tenant={tenant}")
            if float(data["expiration"]) > newer_than:
                served[worker, tenant] = data["access_key_id"]
                pending.discard((worker, tenant))
        if pending:
            if time.monotonic() > deadline:
                stale = ", ".join(f"worker {w}/{t}" for w, t in sorted(pending))
                raise BenchError(
                    f"still serving pre-refresh credentials after {timeout} s: {stale}"
                )
            await asyncio.sleep(0.1)
    return served


# -- STS accounting ------------------------------------------------------------------------


class OffsetTime:
    """The strict STS's clock: wall clock plus the offset the workers' clocks have."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


async def quiesce(sts: StrictSTS, quiet: float = 0.3, timeout: float = 60.0) -> None:
    """Wait until no STS call is in flight and none arrived for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    last: tuple[int, int] | None = None
    while True:
        snapshot = (sts.calls, len(sts.requests))
        if snapshot[0] == snapshot[1] and snapshot == last:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"STS still busy after {timeout} s (calls, answered) = {snapshot}")
        last = snapshot
        await asyncio.sleep(quiet)


def sts_counts(sts: StrictSTS) -> collections.Counter[str]:
    """Successful calls per role ARN; raises on any failed call or server bug."""
    if sts.internal_errors:
        raise BenchError(f"StrictSTS internal errors: {sts.internal_errors[:3]!r}")
    failed = [r for r in sts.requests if r.status != 200]
    if failed:
        codes = collections.Counter(f"{r.error_code} ({r.status})" for r in failed)
        raise BenchError(f"{len(failed)} STS calls failed: {dict(codes)}")
    return collections.Counter(r.role_arn for r in sts.requests if r.role_arn is not None)


# -- one configuration ---------------------------------------------------------------------


@dataclass
class Result:
    variant: Variant
    per_host: list[int]  # workers on host A, on host B
    cold_calls: list[int]  # STS calls per identity, in role order
    refresh_calls: list[int]
    cold_keys: int  # most distinct access keys any identity had across the fleet
    refresh_keys: int
    cold_host_keys: int  # most distinct access keys any identity had on one host
    refresh_host_keys: int
    cold_samples: list[Sample]
    refresh_samples: list[Sample]
    seconds: float
    phases: dict[str, float]
    #: Store-call durations (ms) by phase ("cold", "refresh") and operation, all workers.
    store_ops: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    #: Requests the store's server received, by phase and its operation (DynamoDB only).
    server_calls: dict[str, dict[str, int]] = field(default_factory=dict)
    cold_store_errors: list[int] = field(default_factory=list)
    worker_stats: list[dict[str, Any]] = field(default_factory=list)
    log_lines: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def workers(self) -> int:
        return sum(self.per_host)

    @property
    def hosts(self) -> int:
        return sum(1 for n in self.per_host if n)

    @property
    def expected(self) -> int:
        return self.variant.expected(self.per_host)

    def keys_ok(self, phase: str) -> bool:
        """Every worker that shares a store hands out the keys of its store's one call."""
        keys, host_keys = (
            (self.cold_keys, self.cold_host_keys)
            if phase == "cold"
            else (self.refresh_keys, self.refresh_host_keys)
        )
        if self.variant.scope == FLEET:
            return keys == 1
        if self.variant.scope == HOST:
            return host_keys == 1 and keys == self.hosts
        return True

    def phase_ok(self, phase: str) -> bool:
        calls = self.cold_calls if phase == "cold" else self.refresh_calls
        return all(c == self.expected for c in calls) and self.keys_ok(phase)

    @property
    def deviates(self) -> bool:
        return not (self.phase_ok("cold") and self.phase_ok("refresh"))

    def timed_ops(self, phase: str | None = None) -> list[float]:
        """Durations (ms) of the timed operations, of one phase or both."""
        phases = [phase] if phase else list(self.store_ops)
        return [
            ms
            for name in phases
            for op, values in self.store_ops.get(name, {}).items()
            if op in TIMED_OPERATIONS
            for ms in values
        ]


def distinct_keys(pairs: list[tuple[int, str, str]], hosts: list[str]) -> tuple[int, int]:
    """(most keys one identity had across the fleet, most it had on one host) of
    (worker, tenant, access key id) triples."""
    fleet: dict[str, set[str]] = collections.defaultdict(set)
    per_host: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
    for worker, tenant, key in pairs:
        fleet[tenant].add(key)
        per_host[hosts[worker], tenant].add(key)
    return max(len(v) for v in fleet.values()), max(len(v) for v in per_host.values())


async def drain_store_ops(fleet: Fleet) -> dict[str, list[float]]:
    """Every worker's store-call durations (ms) since the last drain, merged by operation."""
    merged: dict[str, list[float]] = collections.defaultdict(list)
    for port in fleet.ports:
        answer = await get_json(port, "POST", "/_store_ops")
        for op, values in answer["ops"].items():
            merged[op].extend(values)
    return dict(merged)


async def run_config(
    variant: Variant,
    workers: int,
    args: argparse.Namespace,
    sts: StrictSTS,
    sts_time: OffsetTime,
    backend: Backend,
    envs: dict[str, dict[str, str]],
    tmp: Path,
) -> Result:
    started = time.monotonic()
    tenants = [f"t{i}" for i in range(args.roles)]
    sts.reset()
    sts_time.offset = 0.0
    per_host = split(workers)
    fleet = Fleet(variant, per_host, envs, tmp)
    timed = variant.backend.store != "none"
    store_ops: dict[str, dict[str, list[float]]] = {}
    server_calls: dict[str, dict[str, int]] = {}
    phases: dict[str, float] = {}
    mark = time.monotonic()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.monotonic()
        phases[name] = now - mark
        mark = now

    try:
        fleet.start()
        await fleet.wait_ready()
        if timed:
            await drain_store_ops(fleet)  # start-up calls (a store's check) are not the burst's
        backend.calls()
        lap("start")

        cold = await burst(fleet.ports, tenants, args.per_pair, args.concurrency, args.timeout)
        lap("cold")
        await quiesce(sts)
        after_cold = sts_counts(sts)
        if timed:
            store_ops["cold"] = await drain_store_ops(fleet)
        calls = backend.calls()
        if calls is not None:
            server_calls["cold"] = calls
        cold_keys = distinct_keys(
            [(s.worker, s.tenant, s.access_key_id) for s in cold], fleet.hosts
        )
        newest = max(s.expiration for s in cold)
        # A store operation that failed or timed out opens the worker's circuit breaker for
        # store_cooldown seconds (the store is skipped meanwhile). A real refresh comes ~45 min
        # after the cold start, long after it closed: wait it out so the phases are independent.
        cold_errors = [
            (s.get("store") or {}).get("errors", 0)
            for s in [await get_json(port, "GET", "/stats") for port in fleet.ports]
        ]
        if any(cold_errors):
            await asyncio.sleep(STORE_COOLDOWN + 1)
        lap("between")

        # Forced refresh: the newest cold credentials now have args.left seconds to live.
        offset = newest - args.left - time.time()
        for port in fleet.ports:
            await get_json(port, "POST", f"/_clock?offset={offset:.3f}")
        sts_time.offset = offset
        refresh = await burst(fleet.ports, tenants, args.per_pair, args.concurrency, args.timeout)
        lap("refresh")
        served = await settle(fleet.ports, tenants, newest + args.left / 2, args.timeout)
        lap("settle")
        await quiesce(sts)
        after_refresh = sts_counts(sts)
        if timed:
            store_ops["refresh"] = await drain_store_ops(fleet)
        calls = backend.calls()
        if calls is not None:
            server_calls["refresh"] = calls
        refresh_keys = distinct_keys([(w, t, k) for (w, t), k in served.items()], fleet.hosts)

        stats = [await get_json(port, "GET", "/stats") for port in fleet.ports]
    finally:
        fleet.stop()
        lap("stop")
    arns = [role_arn(t) for t in tenants]
    return Result(
        variant=variant,
        per_host=per_host,
        cold_calls=[after_cold[a] for a in arns],
        refresh_calls=[after_refresh[a] - after_cold[a] for a in arns],
        cold_keys=cold_keys[0],
        refresh_keys=refresh_keys[0],
        cold_host_keys=cold_keys[1],
        refresh_host_keys=refresh_keys[1],
        cold_samples=cold,
        refresh_samples=refresh,
        seconds=time.monotonic() - started,
        phases=phases,
        store_ops=store_ops,
        server_calls=server_calls,
        cold_store_errors=cold_errors,
        worker_stats=[{"host": h, **st} for h, st in zip(fleet.hosts, stats, strict=True)],
        log_lines=fleet.notable_log_lines(),
    )


# -- report --------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def expected_cell(r: Result) -> str:
    if r.variant.scope == FLEET:
        return "1"
    if r.variant.scope == HOST:
        return f"1 per host = {r.expected}"
    return f"W = {r.expected}"


def calls_cell(r: Result, phase: str) -> str:
    calls = r.cold_calls if phase == "cold" else r.refresh_calls
    low, high = min(calls), max(calls)
    text = str(low) if low == high else f"{low}-{high} ({','.join(map(str, calls))})"
    return text if low == high == r.expected else f"{text} {MARK}"


def keys_cell(r: Result) -> str:
    text = f"{r.cold_keys}, {r.refresh_keys}"
    if r.variant.scope == HOST:
        text += f" ({r.cold_host_keys}, {r.refresh_host_keys} per host)"
    if not (r.keys_ok("cold") and r.keys_ok("refresh")):
        text += f" {MARK}"
    return text


def latency_cell(samples: list[Sample]) -> str:
    values = [s.seconds for s in samples]
    return f"{percentile(values, 50) * 1000:.1f} / {percentile(values, 99) * 1000:.1f}"


def ops_cell(r: Result) -> str:
    values = r.timed_ops()
    if not values:
        return "n/a"
    return f"{percentile(values, 50):.2f} / {percentile(values, 99):.2f} ({len(values)})"


def table(results: list[Result]) -> str:
    lines = [
        "| variant | W (A+B) | expected / identity / cycle | STS calls / identity, cold "
        "| STS calls / identity, refresh | keys / identity (cold, refresh) "
        "| cold p50 / p99 ms | refresh p50 / p99 ms | store op p50 / p99 ms (ops) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        hosts = "+".join(str(n) for n in r.per_host if n)
        lines.append(
            f"| {r.variant.label} | {r.workers} ({hosts}) | {expected_cell(r)} "
            f"| {calls_cell(r, 'cold')} | {calls_cell(r, 'refresh')} | {keys_cell(r)} "
            f"| {latency_cell(r.cold_samples)} | {latency_cell(r.refresh_samples)} "
            f"| {ops_cell(r)} |"
        )
    return "\n".join(lines)


def store_table(results: list[Result]) -> str:
    """One row per store at the largest W: the issue's "Done when" at a glance."""
    largest = max(r.workers for r in results)
    lines = [
        f"| store (W = {largest}, two hosts) | STS calls / identity / cycle (cold, refresh) "
        "| expected | cold-burst p99 ms | store op p50 / p99 ms |",
        "|---|--:|--:|--:|--:|",
    ]
    for r in results:
        if r.workers != largest or not r.variant.ours:
            continue
        values = r.timed_ops()
        ops = f"{percentile(values, 50):.2f} / {percentile(values, 99):.2f}" if values else "n/a"
        p99 = percentile([s.seconds for s in r.cold_samples], 99) * 1000
        lines.append(
            f"| {r.variant.label} | {calls_cell(r, 'cold')}, {calls_cell(r, 'refresh')} "
            f"| {expected_cell(r)} | {p99:.1f} | {ops} |"
        )
    return "\n".join(lines)


def describe(result: Result) -> str:
    """The evidence behind a deviating cell."""
    lines = [
        f"{result.variant.label}, W={result.workers} (hosts {result.per_host}): expected "
        f"{result.expected} STS call(s) per identity per cycle; cold per role "
        f"{result.cold_calls}, refresh per role {result.refresh_calls}; distinct keys per "
        f"identity cold {result.cold_keys} ({result.cold_host_keys} on one host), refresh "
        f"{result.refresh_keys} ({result.refresh_host_keys} on one host)"
    ]
    if any(result.cold_store_errors):
        failing = sum(1 for e in result.cold_store_errors if e)
        lines.append(
            f"    cold burst: {sum(result.cold_store_errors)} failed/timed-out store operations "
            f"in {failing} of {result.workers} workers; waited {STORE_COOLDOWN + 1:g} s for "
            "their circuit breakers to close before the refresh"
        )
    for stats in result.worker_stats:
        lines.append(f"    worker stats: {json.dumps(stats, sort_keys=True)}")
    for phase, ops in result.store_ops.items():
        shown = ", ".join(
            f"{op} {len(v)}x p50 {percentile(v, 50):.2f} p99 {percentile(v, 99):.2f} "
            f"max {max(v):.1f}"
            for op, v in sorted(ops.items())
            if v
        )
        lines.append(f"    store ops {phase} (ms): {shown or 'none'}")
    for phase, calls in result.server_calls.items():
        shown = ", ".join(f"{op} {n}" for op, n in sorted(calls.items()))
        lines.append(f"    store server received, {phase}: {sum(calls.values())} ({shown})")
    for line, count in result.log_lines.most_common(10):
        lines.append(f"    log x{count}: {line}")
    for phase, samples in (("cold", result.cold_samples), ("refresh", result.refresh_samples)):
        slowest = sorted(samples, key=lambda s: s.seconds, reverse=True)[:3]
        shown = "; ".join(
            f"{s.seconds * 1000:.0f} ms (worker {s.worker}, {s.tenant}, sent at +{s.started:.2f} s)"
            for s in slowest
        )
        lines.append(f"    slowest {phase}: {shown}")
    return "\n".join(lines)


def ms(value: float) -> float:
    return round(value, 2)


def summary(values: list[float]) -> dict[str, Any]:
    """count, p50_ms, p99_ms of durations in ms (None when there are none)."""
    if not values:
        return {"count": 0, "p50_ms": None, "p99_ms": None}
    return {
        "count": len(values),
        "p50_ms": ms(percentile(values, 50)),
        "p99_ms": ms(percentile(values, 99)),
    }


def cell_json(r: Result) -> dict[str, Any]:
    def phase(name: str) -> dict[str, Any]:
        calls = r.cold_calls if name == "cold" else r.refresh_calls
        samples = r.cold_samples if name == "cold" else r.refresh_samples
        values = [s.seconds for s in samples]
        total = sum(calls)
        per_identity = total / len(calls)
        return {
            "sts_calls": total,
            "per_identity": int(per_identity) if per_identity.is_integer() else per_identity,
            "per_identity_each": calls,
            "expected": r.expected,
            "ok": r.phase_ok(name),
            "keys": r.cold_keys if name == "cold" else r.refresh_keys,
            "keys_per_host": r.cold_host_keys if name == "cold" else r.refresh_host_keys,
            "requests": len(samples),
            "p50_ms": ms(percentile(values, 50) * 1000),
            "p99_ms": ms(percentile(values, 99) * 1000),
        }

    store_ops: dict[str, Any] | None = None
    if r.store_ops:
        operations = sorted({op for ops in r.store_ops.values() for op in ops})
        store_ops = {
            **summary(r.timed_ops()),
            "by_phase": {name: summary(r.timed_ops(name)) for name in r.store_ops},
            "by_operation": {
                op: summary([v for ops in r.store_ops.values() for v in ops.get(op, [])])
                for op in operations
            },
        }
    return {
        "variant": r.variant.name,
        "label": r.variant.label,
        "store": r.variant.backend.store,
        "scope": r.variant.scope,
        "ours": r.variant.ours,
        "workers": r.workers,
        "hosts": r.hosts,
        "workers_per_host": dict(zip(HOSTS, r.per_host, strict=True)),
        "ok": not r.deviates,
        "cold": phase("cold"),
        "refresh": phase("refresh"),
        "store_timeout_s": r.variant.backend.store_timeout if r.store_ops else None,
        "store_ops": store_ops,
        "server_calls": r.server_calls or None,
        "cold_store_errors": sum(r.cold_store_errors),
        "seconds": round(r.seconds, 1),
    }


def tool_version(command: list[str], prefix: str = "") -> str | None:
    """A tool's version: the word of its ``--version`` output that starts with ``prefix``."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(command, capture_output=True, text=True, timeout=5).stdout
        for word in out.split():
            if word.startswith(prefix):
                return word[len(prefix) :]
    return None


def machine(versions: dict[str, str | None]) -> dict[str, Any]:
    import importlib.metadata

    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()} {platform.machine()}",
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    for package in ("uvicorn", "starlette", "botocore", "redis"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info[package.replace("redis", "redis_py")] = importlib.metadata.version(package)
    info.update(versions)
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="W in 1,4 and 8 requests per pair")
    parser.add_argument("--workers", help="comma-separated W values (default 1,2,4,8)")
    parser.add_argument("--roles", type=int, default=5, help="R: identities (default 5)")
    parser.add_argument("--per-pair", type=int, help="requests per (worker, role) per phase")
    parser.add_argument(
        "--variants", help=f"comma-separated, of {','.join(VARIANTS)} (default: all that can run)"
    )
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    parser.add_argument("--sts-delay", type=float, default=0.05, help="seconds per STS call")
    parser.add_argument("--left", type=float, default=640.0, help="seconds left at refresh")
    parser.add_argument("--timeout", type=float, default=60.0, help="per request / settle")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("-v", "--verbose", action="store_true", help="per-worker stats")
    args = parser.parse_args(argv)
    args.workers = [
        int(w) for w in (args.workers or ("1,4" if args.quick else "1,2,4,8")).split(",")
    ]
    args.per_pair = args.per_pair or (8 if args.quick else 20)
    if args.variants is None:
        args.variants = [v for v in VARIANTS.values() if v.backend.missing() is None]
    else:
        names = args.variants.split(",")
        unknown = [v for v in names if v not in VARIANTS]
        if unknown:
            parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
        args.variants = [VARIANTS[v] for v in names]
        for variant in args.variants:
            reason = variant.backend.missing()
            if reason is not None:
                parser.error(f"variant {variant.name}: {reason}")
    if args.roles < 1 or args.per_pair < 1 or min(args.workers) < 1:
        parser.error("--roles, --per-pair and --workers must be >= 1")
    if not 600 < args.left < 675:
        print(
            f"note: --left {args.left:g} is outside (600, 675): not in the advisory window "
            "of both libraries",
            file=sys.stderr,
        )
    return args


async def main_async(args: argparse.Namespace) -> int:
    began = time.monotonic()
    results: list[Result] = []
    load = [round(x, 2) for x in os.getloadavg()]
    versions: dict[str, str | None] = {}
    with tempfile.TemporaryDirectory(prefix="stscreds-fleet-") as tmpdir:
        tmp = Path(tmpdir)
        key = SigningKey.generate()
        key_file = tmp / "signing-key.pem"
        key_file.touch(mode=0o600)
        key_file.write_bytes(key.to_pem())
        sts_time = OffsetTime()
        sts = StrictSTS(issuer=ISSUER, jwks={"keys": [key.public_jwk()]}, clock=sts_time)
        sts.delay = args.sts_delay
        env = {
            **os.environ,
            "FLEET_ISSUER": ISSUER,
            "FLEET_KEY_FILE": str(key_file),
            "FLEET_STORE_KEY": generate_key(),
            "FLEET_STORE_TIMING": "1",
            "PYTHONUNBUFFERED": "1",
        }
        try:
            sts.start()
            env["FLEET_STS"] = sts.url
            configs = 0
            for variant in args.variants:
                backend = variant.backend()
                try:
                    backend.start(tmp)
                    if backend.store != "none":
                        versions[backend.store] = backend.version()
                    for workers in args.workers:
                        print(
                            f"{variant.label}, W={workers} ...",
                            end=" ",
                            flush=True,
                            file=sys.stderr,
                        )
                        configs += 1
                        backend.fresh(f"{variant.name}-w{workers}-{configs}")
                        timeout = {"FLEET_STORE_TIMEOUT": str(backend.store_timeout)}
                        envs = {host: {**backend.env(host, env), **timeout} for host in HOSTS}
                        result = await run_config(
                            variant, workers, args, sts, sts_time, backend, envs, tmp
                        )
                        results.append(result)
                        laps = ", ".join(f"{k} {v:.1f}" for k, v in result.phases.items())
                        print(f"{result.seconds:.1f} s ({laps})", file=sys.stderr)
                finally:
                    backend.stop()
        finally:
            sts.stop()

    runtime = time.monotonic() - began
    out = sys.stderr if args.json else sys.stdout
    requests = args.per_pair * args.roles
    print(
        f"Fleet benchmark: R={args.roles} identities, {args.per_pair} requests per "
        f"(worker, identity) per phase ({requests} per worker per phase), "
        f"{args.concurrency} in flight, STS delay {args.sts_delay * 1000:.0f} ms, "
        f"1 h credentials, refresh forced at {args.left:g} s left. W workers over two "
        f'"hosts" (process groups): A has ceil(W/2), B the rest; Redis and DynamoDB are shared '
        "by both, SQLite is one file per host.",
        file=out,
    )
    print(
        f"Machine: {os.cpu_count()} CPUs, Python {platform.python_version()} "
        f"({platform.system()} {platform.machine()}), load average {load[0]:g} at the start; "
        "workers: uvicorn, asyncio loop, h11.",
        file=out,
    )
    print(
        "Latency: client-side per request (new connection, Connection: close), one run on a "
        "shared machine: compare variants within this run only.",
        file=out,
    )
    print(file=out)
    print(table(results), file=out)
    print(file=out)
    print(
        f"STS calls / identity: per cycle, over the {args.roles} identities (a range lists each); "
        "expected: 1 with a store both hosts share, 1 per host with SQLite (a file per host), "
        f"W without a store; keys / identity: distinct access keys one identity had across the "
        "fleet (and on one host); store op: the stscreds workers' store calls over both phases "
        "(get, put, acquire, release, extend, holder, notify; not wait), from the broker's call "
        f"to its answer; {MARK}: not the expected value.",
        file=out,
    )
    for variant in args.variants:
        if variant.backend.store_timeout != DEFAULT_STORE_TIMEOUT:
            print(
                f"{variant.label}: store_timeout {variant.backend.store_timeout:g} s (the "
                f"others {DEFAULT_STORE_TIMEOUT:g} s, the default).",
                file=out,
            )
    if any(r.variant.name == "dynamodb" for r in results):
        print(
            "DynamoDB is moto (tests/servers/dynamodb.py): one call at a time, in one Python "
            f"process on the workers' CPUs (nice {EMULATOR_NICE} where allowed: "
            f"{versions.get('dynamodb')}); its latencies are the emulator's, not DynamoDB's.",
            file=out,
        )
    if any(r.variant.ours for r in results):
        print(file=out)
        print(store_table(results), file=out)
    print(f"Total runtime {runtime:.0f} s.", file=out)

    failed = False
    for r in results:
        if args.verbose or r.deviates:
            print(file=out)
            print(("FAIL: " if r.deviates and r.variant.ours else "") + describe(r), file=out)
        if r.deviates and r.variant.ours:
            failed = True
    notable = [r for r in results if r.log_lines and not r.deviates]
    for r in notable:
        print(file=out)
        print(f"note: {r.variant.label}, W={r.workers}: workers logged:", file=out)
        for line, count in r.log_lines.most_common(5):
            print(f"    x{count}: {line}", file=out)

    if args.json:
        info = machine(
            {
                f"{store}_server" if store != "sqlite" else "sqlite": v
                for store, v in versions.items()
            }
        )
        info["load_average"] = load
        document = {
            "sts_delay_ms": round(args.sts_delay * 1000, 3),
            "roles": args.roles,
            "per_pair": args.per_pair,
            "concurrency": args.concurrency,
            "left_s": args.left,
            "quick": args.quick,
            "hosts": list(HOSTS),
            "seconds": round(runtime, 1),
            "machine": info,
            "ok": not failed,
            "cells": [cell_json(r) for r in results],
        }
        print(json.dumps(document, indent=1))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(main_async(args))
    except BenchError as error:
        print(f"\nERROR: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
