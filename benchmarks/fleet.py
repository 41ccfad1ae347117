"""STS calls per identity and client-side latency for a fleet of W worker processes.

For each variant and each W, W uvicorn processes (one per loopback port) serve
``GET /creds?tenant=NAME`` for R tenants (one IAM role each); a counting strict STS
(tests/servers/sts.py, loopback, ``--sts-delay`` seconds per call) answers them all.

Variants:

- ``redis``    stscreds + RedisStore (a redis-server started on a free loopback port)
- ``sqlite``   stscreds + SQLiteStore (one file shared by the W processes)
- ``none``     stscreds without a store (in-process cache and single-flight only)
- ``botocore`` botocore's own web-identity provider, one per role per process
               (benchmarks/botocore_app.py: AssumeRoleWithWebIdentityCredentialFetcher +
               DeferredRefreshableCredentials, ``get_frozen_credentials()`` in a thread)

stscreds workers run tests/servers/fleet_app.py. The W processes of a configuration are
started once and serve both phases:

1. cold burst: N requests per (worker, role) pair, ``--concurrency`` at a time; request i
   goes to worker i mod W for role (i div W) mod R, so the first W*R requests cover every
   pair (a deterministic spread: every process sees every identity).
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
asyncio socket client, one connection per request, ``Connection: close``; connect to EOF).

Checks: a shared-store variant must make exactly 1 STS call per identity per cycle and hand
every worker the same keys; stscreds without a store exactly W (one per process). Deviating
cells are marked ``✗``. The benchmark exits 1 on any failed request, STS error, worker that
does not start or settle, or a deviating stscreds cell (after printing the table).

Usage::

    .venv/bin/python benchmarks/fleet.py            # W in 1,2,4,8, 20 requests per pair
    .venv/bin/python benchmarks/fleet.py --quick    # W in 1,4, 8 requests per pair
    .venv/bin/python benchmarks/fleet.py --variants redis,sqlite --workers 2 -v
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

from servers.redis import RedisServer, find_redis_server  # noqa: E402
from servers.sts import StrictSTS  # noqa: E402
from stscreds import SigningKey  # noqa: E402
from stscreds.stores import generate_key  # noqa: E402

ISSUER = "http://127.0.0.1/stscreds-fleet-benchmark"
ACCOUNT = "123456789012"
MARK = "✗"
#: fleet_app's default FLEET_STORE_COOLDOWN (the broker's store_cooldown).
STORE_COOLDOWN = 5.0


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    app: str
    app_dir: Path
    store: str  # none | redis | sqlite
    shared: bool
    ours: bool  # stscreds (a deviation is our bug) or a peer (a deviation is reported)


VARIANTS = {
    v.name: v
    for v in (
        Variant(
            "redis",
            "stscreds + RedisStore",
            "servers.fleet_app:app",
            ROOT / "tests",
            "redis",
            True,
            True,
        ),
        Variant(
            "sqlite",
            "stscreds + SQLiteStore",
            "servers.fleet_app:app",
            ROOT / "tests",
            "sqlite",
            True,
            True,
        ),
        Variant(
            "none",
            "stscreds, no store",
            "servers.fleet_app:app",
            ROOT / "tests",
            "none",
            False,
            True,
        ),
        Variant(
            "botocore",
            "botocore RefreshableCredentials",
            "botocore_app:app",
            ROOT / "benchmarks",
            "none",
            False,
            False,
        ),
    )
}


class BenchError(Exception):
    """Something went wrong that makes the run's numbers meaningless."""


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
    """W uvicorn processes of one variant, one per loopback port."""

    def __init__(self, variant: Variant, workers: int, env: dict[str, str], logdir: Path):
        self.variant = variant
        self.ports = free_ports(workers)
        self.env = env
        self.logs = [logdir / f"{variant.name}-w{workers}-{i}.log" for i in range(workers)]
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        for port, log in zip(self.ports, self.logs, strict=True):
            args = [sys.executable, "-m", "uvicorn", "--app-dir", str(self.variant.app_dir)]
            args += [self.variant.app, "--host", "127.0.0.1", "--port", str(port)]
            args += ["--loop", "asyncio", "--http", "h11", "--log-level", "warning"]
            args += ["--no-access-log", "--timeout-graceful-shutdown", "2"]
            with log.open("wb") as out:
                self.procs.append(
                    subprocess.Popen(args, env=self.env, stdout=out, stderr=subprocess.STDOUT)
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
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

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
                        found[f"worker {i}: {line.strip()[:200]}"] += 1
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
    workers: int
    cold_calls: list[int]
    refresh_calls: list[int]
    cold_keys: int  # most distinct access keys any identity had across the fleet
    refresh_keys: int
    cold_samples: list[Sample]
    refresh_samples: list[Sample]
    seconds: float
    phases: dict[str, float]
    cold_store_errors: list[int] = field(default_factory=list)
    worker_stats: list[dict[str, Any]] = field(default_factory=list)
    log_lines: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def expected(self) -> int:
        return 1 if self.variant.shared else self.workers

    @property
    def deviates(self) -> bool:
        calls = self.cold_calls + self.refresh_calls
        keys_ok = not self.variant.shared or (self.cold_keys == 1 and self.refresh_keys == 1)
        return any(c != self.expected for c in calls) or not keys_ok


async def run_config(
    variant: Variant,
    workers: int,
    args: argparse.Namespace,
    sts: StrictSTS,
    sts_time: OffsetTime,
    env: dict[str, str],
    tmp: Path,
) -> Result:
    started = time.monotonic()
    tenants = [f"t{i}" for i in range(args.roles)]
    sts.reset()
    sts_time.offset = 0.0
    env = dict(env)
    if variant.store == "sqlite":
        # A new file per configuration: a store left by an earlier one would answer the cold burst.
        env["FLEET_STORE_URL"] = str(tmp / f"store-{time.monotonic_ns()}.db")
    fleet = Fleet(variant, workers, env, tmp)
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
        lap("start")

        cold = await burst(fleet.ports, tenants, args.per_pair, args.concurrency, args.timeout)
        lap("cold")
        await quiesce(sts)
        after_cold = sts_counts(sts)
        cold_keys: dict[str, set[str]] = collections.defaultdict(set)
        for s in cold:
            cold_keys[s.tenant].add(s.access_key_id)
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
        refresh_keys: dict[str, set[str]] = collections.defaultdict(set)
        for (_, tenant), key in served.items():
            refresh_keys[tenant].add(key)

        stats = [await get_json(port, "GET", "/stats") for port in fleet.ports]
    finally:
        fleet.stop()
        lap("stop")
    arns = [role_arn(t) for t in tenants]
    return Result(
        variant=variant,
        workers=workers,
        cold_calls=[after_cold[a] for a in arns],
        refresh_calls=[after_refresh[a] - after_cold[a] for a in arns],
        cold_keys=max(len(v) for v in cold_keys.values()),
        refresh_keys=max(len(v) for v in refresh_keys.values()),
        cold_samples=cold,
        refresh_samples=refresh,
        seconds=time.monotonic() - started,
        phases=phases,
        cold_store_errors=cold_errors,
        worker_stats=stats,
        log_lines=fleet.notable_log_lines(),
    )


# -- report --------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def calls_cell(calls: list[int], expected: int) -> str:
    low, high = min(calls), max(calls)
    text = str(low) if low == high else f"{low}-{high} ({','.join(map(str, calls))})"
    return text if low == high == expected else f"{text} {MARK}"


def latency_cell(samples: list[Sample]) -> str:
    values = [s.seconds for s in samples]
    return f"{percentile(values, 50) * 1000:.1f} / {percentile(values, 99) * 1000:.1f}"


def table(results: list[Result]) -> str:
    lines = [
        "| variant | W | STS calls / identity, cold | STS calls / identity, refresh "
        "| keys / identity (cold, refresh) | cold p50 / p99 ms | refresh p50 / p99 ms |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        keys = f"{r.cold_keys}, {r.refresh_keys}"
        if r.variant.shared and (r.cold_keys != 1 or r.refresh_keys != 1):
            keys += f" {MARK}"
        lines.append(
            f"| {r.variant.label} | {r.workers} | {calls_cell(r.cold_calls, r.expected)} "
            f"| {calls_cell(r.refresh_calls, r.expected)} | {keys} "
            f"| {latency_cell(r.cold_samples)} | {latency_cell(r.refresh_samples)} |"
        )
    return "\n".join(lines)


def describe(result: Result) -> str:
    """The evidence behind a deviating cell."""
    lines = [
        f"{result.variant.label}, W={result.workers}: expected {result.expected} STS call(s) "
        f"per identity per cycle; cold per role {result.cold_calls}, refresh per role "
        f"{result.refresh_calls}; distinct keys per identity cold {result.cold_keys}, "
        f"refresh {result.refresh_keys}"
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="W in 1,4 and 8 requests per pair")
    parser.add_argument("--workers", help="comma-separated W values (default 1,2,4,8)")
    parser.add_argument("--roles", type=int, default=5, help="R: identities (default 5)")
    parser.add_argument("--per-pair", type=int, help="requests per (worker, role) per phase")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    parser.add_argument("--sts-delay", type=float, default=0.05, help="seconds per STS call")
    parser.add_argument("--left", type=float, default=640.0, help="seconds left at refresh")
    parser.add_argument("--timeout", type=float, default=60.0, help="per request / settle")
    parser.add_argument("-v", "--verbose", action="store_true", help="per-worker stats")
    args = parser.parse_args(argv)
    args.workers = [
        int(w) for w in (args.workers or ("1,4" if args.quick else "1,2,4,8")).split(",")
    ]
    args.per_pair = args.per_pair or (8 if args.quick else 20)
    args.variants = [VARIANTS[v] for v in args.variants.split(",")]
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
    with tempfile.TemporaryDirectory(prefix="stscreds-fleet-") as tmpdir:
        tmp = Path(tmpdir)
        key = SigningKey.generate()
        key_file = tmp / "signing-key.pem"
        key_file.touch(mode=0o600)
        key_file.write_bytes(key.to_pem())
        sts_time = OffsetTime()
        sts = StrictSTS(issuer=ISSUER, jwks={"keys": [key.public_jwk()]}, clock=sts_time)
        sts.delay = args.sts_delay
        redis: RedisServer | None = None
        env = {
            **os.environ,
            "FLEET_ISSUER": ISSUER,
            "FLEET_KEY_FILE": str(key_file),
            "FLEET_STORE_KEY": generate_key(),
            "PYTHONUNBUFFERED": "1",
        }
        try:
            sts.start()
            env["FLEET_STS"] = sts.url
            if any(v.store == "redis" for v in args.variants):
                binary = find_redis_server()
                if binary is None:
                    raise BenchError("redis-server is not installed (STSCREDS_REDIS_SERVER)")
                redis = RedisServer(binary)
                redis.start()
            for variant in args.variants:
                for workers in args.workers:
                    print(f"{variant.label}, W={workers} ...", end=" ", flush=True, file=sys.stderr)
                    config_env = {**env, "FLEET_STORE": variant.store}
                    if variant.store == "redis":
                        assert redis is not None
                        redis.flushall()
                        config_env["FLEET_STORE_URL"] = redis.url
                    result = await run_config(
                        variant, workers, args, sts, sts_time, config_env, tmp
                    )
                    results.append(result)
                    laps = ", ".join(f"{k} {v:.1f}" for k, v in result.phases.items())
                    print(f"{result.seconds:.1f} s ({laps})", file=sys.stderr)
        finally:
            sts.stop()
            if redis is not None:
                redis.close()

    runtime = time.monotonic() - began
    requests = args.per_pair * args.roles
    print(
        f"Fleet benchmark: R={args.roles} identities, {args.per_pair} requests per "
        f"(worker, identity) per phase ({requests} per worker per phase), "
        f"{args.concurrency} in flight, STS delay {args.sts_delay * 1000:.0f} ms, "
        f"1 h credentials, refresh forced at {args.left:g} s left."
    )
    print(
        f"Machine: {os.cpu_count()} CPUs, Python {platform.python_version()} "
        f"({platform.system()} {platform.machine()}); workers: uvicorn, asyncio loop, h11."
    )
    print(
        "Latency: client-side per request (new connection, Connection: close), one run on a "
        "shared machine: compare variants within this run only."
    )
    print()
    print(table(results))
    print()
    print(
        f"STS calls / identity: per cycle, over the {args.roles} identities (a range lists each); "
        f"keys / identity: distinct access keys one identity had across the fleet; {MARK}: not "
        "the expected value (1 with a shared store, W otherwise)."
    )
    print(f"Total runtime {runtime:.0f} s.")

    failed = False
    for r in results:
        if args.verbose or r.deviates:
            print()
            print(("FAIL: " if r.deviates and r.variant.ours else "") + describe(r))
        if r.deviates and r.variant.ours:
            failed = True
    notable = [r for r in results if r.log_lines and not r.deviates]
    for r in notable:
        print()
        print(f"note: {r.variant.label}, W={r.workers}: workers logged:")
        for line, count in r.log_lines.most_common(5):
            print(f"    x{count}: {line}")
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
