"""Many identities at once: 1,000 concurrent cold requests against a slow STS.

What: one ``CredentialBroker`` (no store, an RS256 key, the defaults otherwise) receives 1,000
concurrent ``await broker.get(role)`` calls spread over N identities (default 50) while its
cache is empty. Every identity must cost exactly one STS call, and every caller must get the
credentials STS issued for its own role. The figure is the latency a caller sees: p50, p99 and
max from the moment the burst starts, in ms (issue #10: p99 <= 150 ms for 50 identities on a
2-core machine against a 30 ms STS).

Method: the project's strict STS (``stscreds.testing.LocalSTS``: it verifies every JWT against
the broker's JWKS and answers in AWS's wire format) runs in a separate process, as a real STS is
remote: its CPU must not compete for this process's GIL. It listens on a free 127.0.0.1 port
and holds every answer ``--sts-latency`` ms (default 30) before sending it. The benchmark runs
one untimed warm-up round (imports, botocore's lazily loaded models) and then ``--rounds``
rounds, each with a fresh broker (cold cache, new connections, new threads) against the same
STS process; the headline is the median over rounds of each round's p99. Requests are created
together and gathered; request i asks for identity ``i % N``. A round's latencies are measured
from the start of the gather to the moment each ``get`` returned. Before each round the previous
round's broker is garbage-collected, so no full collection lands in the middle of a burst.
Each round also reports this process's CPU time (all threads), the event loop thread's own, and
the STS process's.

``--profile`` adds one instrumented round and isolated micro-measurements, to say where the
time goes per exchange: JWT signing (the minter), botocore's own work for one call
(serialization, event hooks, parsing) with the network replaced by a canned answer, the wait
for a pool thread, botocore building the request, the time a call spends on the wire (30 ms of
it is the STS's latency), botocore parsing the answer (in the instrumented round: after any
wait to be let do so), when the calls left and their answers came back, the event loop's lag
(a 1 ms sleep), and the STS process's CPU per call. The instrumentation wraps the broker's
internals from the outside (this file only); it costs a few microseconds per exchange.

Usage::

    .venv/bin/python benchmarks/burst.py                   # 50 identities, 7 rounds
    .venv/bin/python benchmarks/burst.py --identities 1    # 1,000 callers of one identity
    .venv/bin/python benchmarks/burst.py --quick           # 3 rounds, a smoke test
    .venv/bin/python benchmarks/burst.py --profile         # plus the per-exchange breakdown
    .venv/bin/python benchmarks/burst.py --json            # one JSON object on stdout

Exit status 1 when a correctness check fails (a caller got another identity's credentials, an
identity cost more or fewer than one STS call, a request failed), or with ``--fail-above MS``
when the median p99 is above MS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from multiprocessing.connection import Connection
from typing import Any

import botocore
import botocore.awsrequest

from stscreds import CredentialBroker, Credentials, Role, SigningKey, SystemClock

ISSUER = "http://127.0.0.1/burst-benchmark"
ACCOUNT = "123456789012"
TARGET_P99_MS = 150.0


# -- the STS, in its own process -------------------------------------------------------------


def _serve_sts(conn: Connection, issuer: str, jwks: dict[str, Any], latency: float) -> None:
    """The STS process: a LocalSTS answering after ``latency`` s, driven over ``conn``."""
    from stscreds.testing import LocalSTS

    sts = LocalSTS(issuer=issuer, jwks=jwks)
    sts.delay = latency
    sts.start()
    conn.send(sts.url)
    try:
        while True:
            command = conn.recv()
            if command == "reset":
                sts.reset()
                conn.send(time.process_time())
            elif command == "report":
                with sts._lock:
                    requests = list(sts.requests)
                issued: dict[str, list[str]] = {}
                failed = 0
                for record in requests:
                    if record.status != 200 or record.credentials is None:
                        failed += 1
                        continue
                    issued.setdefault(record.role_arn or "", []).append(
                        record.credentials["AccessKeyId"]
                    )
                conn.send(
                    {
                        "calls": sts.calls,
                        "failed": failed,
                        "issued": issued,
                        "cpu": time.process_time(),
                        "internal_errors": [repr(e) for e in sts.internal_errors],
                    }
                )
            else:  # "stop", or anything else
                break
    finally:
        sts.stop()
        conn.close()


class RemoteProcess:
    """A server run by ``target(conn, *args)`` in a spawned process (its CPU is not this
    process's GIL), driven over a pipe: ``started`` is the first thing it sends."""

    def __init__(self, target: Any, args: tuple[Any, ...], name: str, start_timeout: float):
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=target, args=(child, *args), name=name, daemon=True)
        self._process.start()
        child.close()
        if not self._conn.poll(start_timeout):
            self.stop()
            raise RuntimeError(f"{name} did not start within {start_timeout:g} s")
        self.started: Any = self._conn.recv()

    def _ask(self, message: Any) -> Any:
        self._conn.send(message)
        return self._conn.recv()

    def stop(self) -> None:
        with contextlib.suppress(OSError):  # the process is gone already
            self._conn.send("stop")  # any message a server does not know ends it
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()


class RemoteSTS(RemoteProcess):
    """A LocalSTS in a spawned process."""

    def __init__(self, jwks: dict[str, Any], latency: float) -> None:
        super().__init__(_serve_sts, (ISSUER, jwks, latency), "burst-sts", 60)
        self.url: str = self.started

    def reset(self) -> float:
        """Forget recorded calls; the STS process's CPU seconds so far."""
        cpu: float = self._ask("reset")
        return cpu

    def report(self) -> dict[str, Any]:
        report: dict[str, Any] = self._ask("report")
        return report


# -- one round -------------------------------------------------------------------------------


def roles_for(identities: int, round_name: str) -> list[Role]:
    # Distinct ARNs and subjects per identity; the round's name keeps the warm-up's apart.
    return [
        Role(
            f"arn:aws:iam::{ACCOUNT}:role/burst-{round_name}-{index}",
            subject=f"tenant-{index}",
        )
        for index in range(identities)
    ]


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q`` percentile (0 < q <= 100) of ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def new_broker(sts: RemoteSTS, key: SigningKey) -> CredentialBroker:
    return CredentialBroker(issuer=ISSUER, signing_keys=[key], sts_endpoint_url=sts.url)


async def run_round(
    sts: RemoteSTS,
    key: SigningKey,
    identities: int,
    requests: int,
    round_name: str,
    probe: Probe | None = None,
) -> dict[str, Any]:
    """One burst with a fresh broker; returns its figures (raises AssertionError if wrong)."""
    roles = roles_for(identities, round_name)
    broker = new_broker(sts, key)
    # The previous round's broker (a botocore client: ~100k objects) is garbage now; collected
    # here, not by a full collection in the middle of this round's burst.
    gc.collect()
    sts_cpu_before = sts.reset()
    try:
        if probe is not None:
            probe.attach(broker)
        latencies: list[float] = [0.0] * requests
        results: list[Credentials | None] = [None] * requests

        async def one(index: int, started: float) -> None:
            results[index] = await broker.get(roles[index % identities])
            latencies[index] = time.perf_counter() - started

        cpu_before = time.process_time()
        loop_cpu_before = time.thread_time()
        started = time.perf_counter()
        if probe is not None:
            probe.started = started
        outcomes = await asyncio.gather(
            *(one(index, started) for index in range(requests)), return_exceptions=True
        )
        wall = time.perf_counter() - started
        loop_cpu = time.thread_time() - loop_cpu_before
        cpu = time.process_time() - cpu_before
        stats = broker.stats
        exchanges, failures = stats.exchanges, stats.exchange_failures
    finally:
        await broker.aclose()
    report = sts.report()

    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert not errors, f"{len(errors)} requests failed, first: {errors[0]!r}"
    assert not report["internal_errors"], report["internal_errors"]
    assert report["failed"] == 0, f"STS refused {report['failed']} calls"
    assert report["calls"] == identities, f"{report['calls']} STS calls for {identities} identities"
    assert exchanges == identities and failures == 0, (exchanges, failures)
    issued: dict[str, list[str]] = report["issued"]
    for role in roles:
        assert len(issued.get(role.arn, [])) == 1, (role.arn, issued.get(role.arn))
    for index, credentials in enumerate(results):
        role = roles[index % identities]
        assert credentials is not None, index
        assert credentials.access_key_id == issued[role.arn][0], (
            f"request {index} got credentials that STS did not issue for {role.arn}"
        )

    figures: dict[str, Any] = {
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "max_ms": max(latencies) * 1e3,
        "sts_calls": report["calls"],
        "wall_ms": wall * 1e3,
        "cpu_ms": cpu * 1e3,
        "loop_cpu_ms": loop_cpu * 1e3,
        "sts_cpu_ms": (report["cpu"] - sts_cpu_before) * 1e3,
    }
    if probe is not None:
        figures["probe"] = probe.summary()
    return figures


# -- where the time goes ---------------------------------------------------------------------


class _TimedPool:
    """Stands in for the exchanger's pool: records submit, start and end of every job."""

    def __init__(self, pool: Executor, jobs: list[dict[str, Any]]) -> None:
        self._pool = pool
        self._jobs = jobs

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        record: dict[str, Any] = {"fn": _name(fn), "submitted": time.perf_counter()}
        self._jobs.append(record)

        def timed() -> Any:
            record["started"] = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                record["ended"] = time.perf_counter()

        return self._pool.submit(timed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


class _TimedMinter:
    """Stands in for the broker's minter: times every ``mint`` on the thread running it."""

    def __init__(self, minter: Any, signs: list[float]) -> None:
        self._minter = minter
        self._signs = signs

    def mint(self, *args: Any, **kwargs: Any) -> str:
        started = time.perf_counter()
        try:
            token: str = self._minter.mint(*args, **kwargs)
            return token
        finally:
            self._signs.append(time.perf_counter() - started)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._minter, name)


def _name(fn: Callable[..., Any]) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


class Probe:
    """Instruments one broker from the outside: pool jobs, signing, the wire, the loop's lag."""

    def __init__(self) -> None:
        self.jobs: list[dict[str, Any]] = []
        self.signs: list[float] = []
        self.builds: list[float] = []
        self.wire: list[float] = []
        self.reads: list[float] = []
        self._sent: dict[int, float] = {}
        self._called: dict[int, float] = {}
        self._read: dict[int, float] = {}
        self.lags: list[float] = []
        self._ticker: asyncio.Task[None] | None = None
        #: perf_counter() at the start of the burst (set by run_round).
        self.started = 0.0
        self.sends: list[float] = []
        self.answers: list[float] = []

    def attach(self, broker: CredentialBroker) -> None:
        exchanger = broker._exchanger
        exchanger._pool = _TimedPool(exchanger._pool, self.jobs)  # type: ignore[assignment]
        broker._minter = _TimedMinter(broker._minter, self.signs)  # type: ignore[assignment]
        events = exchanger._get_client().meta.events
        operation = "sts.AssumeRoleWithWebIdentity"
        # before-call .. before-send: botocore builds the request; before-send .. before-parse:
        # the wire (the answer read included); before-parse .. after-call: botocore parses the
        # answer (after any wait to do so). First in line, ahead of the exchanger's handlers.
        events.register_first(f"before-call.{operation}", self._before_call)
        events.register_first(f"before-send.{operation}", self._before_send)
        events.register_first(f"before-parse.{operation}", self._before_parse)
        events.register_last(f"after-call.{operation}", self._after_call)
        self._ticker = asyncio.get_running_loop().create_task(self._tick())

    def _before_call(self, **kwargs: Any) -> None:
        self._called[threading.get_ident()] = time.perf_counter()

    def _before_send(self, **kwargs: Any) -> None:
        now = time.perf_counter()
        thread = threading.get_ident()
        self.builds.append(now - self._called.pop(thread))
        self._sent[thread] = now
        self.sends.append(now)

    def _before_parse(self, **kwargs: Any) -> None:
        now = time.perf_counter()
        thread = threading.get_ident()
        self.wire.append(now - self._sent.pop(thread))
        self._read[thread] = now
        self.answers.append(now)

    def _after_call(self, **kwargs: Any) -> None:
        self.reads.append(time.perf_counter() - self._read.pop(threading.get_ident()))

    async def _tick(self) -> None:
        # The event loop's lag: how late a 1 ms sleep wakes up while the burst runs.
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            self.lags.append(time.perf_counter() - before - 0.001)

    def summary(self) -> dict[str, Any]:
        if self._ticker is not None:
            self._ticker.cancel()

        def ms(values: list[float]) -> dict[str, float]:
            if not values:
                return {}
            return {
                "mean": statistics.fmean(values) * 1e3,
                "p50": percentile(values, 50) * 1e3,
                "max": max(values) * 1e3,
            }

        done = [job for job in self.jobs if "ended" in job]
        by_fn: dict[str, list[dict[str, Any]]] = {}
        for job in done:
            by_fn.setdefault(job["fn"], []).append(job)
        return {
            "pool_jobs": {
                fn: {
                    "count": len(jobs),
                    "queue_ms": ms([j["started"] - j["submitted"] for j in jobs]),
                    "run_ms": ms([j["ended"] - j["started"] for j in jobs]),
                }
                for fn, jobs in by_fn.items()
            },
            "sign_ms": ms(self.signs),
            "build_ms": ms(self.builds),
            "wire_ms": ms(self.wire),
            "parse_ms": ms(self.reads),
            "loop_lag_ms": ms(self.lags),
            # When the calls left and their answers arrived, from the start of the burst.
            "timeline_ms": {
                "first_job": (min(j["submitted"] for j in self.jobs) - self.started) * 1e3
                if self.jobs
                else None,
                "first_send": (min(self.sends) - self.started) * 1e3 if self.sends else None,
                "last_send": (max(self.sends) - self.started) * 1e3 if self.sends else None,
                "first_answer": (min(self.answers) - self.started) * 1e3 if self.answers else None,
                "last_answer": (max(self.answers) - self.started) * 1e3 if self.answers else None,
            },
        }


def _timeit(fn: Callable[[], Any], n: int) -> float:
    """Median ms of ``n`` calls of ``fn`` (one at a time, nothing else running)."""
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e3


def isolated_costs(key: SigningKey, n: int = 300) -> dict[str, float]:
    """Per-exchange CPU of signing and of botocore's own work, measured alone (no burst)."""
    from stscreds._exchange import ExchangeRequest, StsExchanger
    from stscreds._signing import TokenMinter
    from stscreds.testing import build_success_xml

    minter = TokenMinter(
        issuer=ISSUER, audience="sts.amazonaws.com", keys=[key], token_ttl=300, clock=SystemClock()
    )
    sign = _timeit(lambda: minter.mint("tenant-0"), n)

    # botocore with the network replaced: before-send answers a canned STS success.
    body = build_success_xml(time.time() + 3600)
    headers = {"content-type": "text/xml", "date": "Mon, 01 Jan 2024 00:00:00 GMT"}

    class _Body:
        def stream(self, **kwargs: Any) -> Any:
            yield body

    def canned(request: Any, **kwargs: Any) -> botocore.awsrequest.AWSResponse:
        return botocore.awsrequest.AWSResponse(request.url, 200, headers, _Body())

    exchanger = StsExchanger(endpoint_url="http://127.0.0.1:9")
    try:
        client = exchanger._get_client()
        client.meta.events.register("before-send.sts.AssumeRoleWithWebIdentity", canned)
        request = ExchangeRequest(f"arn:aws:iam::{ACCOUNT}:role/x", "burst", 3600, None)
        params = request.params(minter.mint("tenant-0"))
        exchanger._call(params)  # warm
        call = _timeit(lambda: exchanger._call(params), n)
    finally:
        exchanger.close()
    return {"sign_ms": sign, "botocore_call_ms": call}


# -- the benchmark ---------------------------------------------------------------------------


async def benchmark(
    identities: int, requests: int, latency_ms: float, rounds: int, profile: bool
) -> dict[str, Any]:
    key = SigningKey.generate("RS256")
    sts = RemoteSTS({"keys": [key.public_jwk()]}, latency_ms / 1e3)
    try:
        warmup = await run_round(sts, key, identities, requests, "warmup")
        figures = [
            await run_round(sts, key, identities, requests, f"r{index}") for index in range(rounds)
        ]
        probed = None
        if profile:
            probed = await run_round(sts, key, identities, requests, "probe", Probe())
    finally:
        sts.stop()

    result: dict[str, Any] = {
        "benchmark": "burst",
        "identities": identities,
        "requests": requests,
        "sts_latency_ms": latency_ms,
        "rounds": figures,
        "warmup": warmup,
        "p99_ms_median": statistics.median(f["p99_ms"] for f in figures),
        "p50_ms_median": statistics.median(f["p50_ms"] for f in figures),
        "max_ms_median": statistics.median(f["max_ms"] for f in figures),
        "target_p99_ms": TARGET_P99_MS,
        "machine": {
            "nproc": os.cpu_count(),
            "loadavg": list(os.getloadavg()),
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "platform": platform.platform(),
            "botocore": botocore.__version__,
        },
    }
    if probed is not None:
        per_call = {
            "cpu_ms": statistics.median(f["cpu_ms"] / identities for f in figures),
            "loop_cpu_ms": statistics.median(f["loop_cpu_ms"] / identities for f in figures),
            "sts_cpu_ms": statistics.median(f["sts_cpu_ms"] / identities for f in figures),
        }
        result["profile"] = {
            "isolated": isolated_costs(key),
            "per_exchange_in_burst": per_call,
            "probed_round": probed,
        }
    return result


def print_table(result: dict[str, Any]) -> None:
    machine = result["machine"]
    print(
        f"burst: {result['requests']} concurrent cold requests over {result['identities']} "
        f"identities, STS latency {result['sts_latency_ms']:g} ms, {len(result['rounds'])} rounds; "
        f"{machine['implementation']} {machine['python']}, nproc={machine['nproc']}, "
        f"load {machine['loadavg'][0]:.2f}"
    )
    print(
        f"{'round':<8}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'STS calls':>11}{'wall ms':>9}"
        f"{'CPU ms':>9}{'loop CPU':>10}{'STS CPU':>9}"
    )
    rows = [("warm-up", result["warmup"])] + [
        (str(index), figures) for index, figures in enumerate(result["rounds"], 1)
    ]
    for name, f in rows:
        print(
            f"{name:<8}{f['p50_ms']:>9.1f}{f['p99_ms']:>9.1f}{f['max_ms']:>9.1f}"
            f"{f['sts_calls']:>11}{f['wall_ms']:>9.1f}{f['cpu_ms']:>9.1f}{f['loop_cpu_ms']:>10.1f}"
            f"{f['sts_cpu_ms']:>9.1f}"
        )
    p99 = result["p99_ms_median"]
    verdict = "met" if p99 <= result["target_p99_ms"] else "NOT met"
    print(
        f"median p50 {result['p50_ms_median']:.1f} ms, p99 {p99:.1f} ms "
        f"(target <= {result['target_p99_ms']:g} ms for 50 identities: {verdict}), "
        f"max {result['max_ms_median']:.1f} ms"
    )
    profile = result.get("profile")
    if profile:
        iso, per = profile["isolated"], profile["per_exchange_in_burst"]
        print("per exchange, measured alone:")
        print(f"  JWT signing (mint)            {iso['sign_ms']:.3f} ms")
        print(f"  botocore call, canned answer  {iso['botocore_call_ms']:.3f} ms (no network)")
        print("per exchange, in the burst (round CPU / identities):")
        print(f"  this process CPU              {per['cpu_ms']:.3f} ms")
        print(f"  of which the event loop       {per['loop_cpu_ms']:.3f} ms")
        print(f"  STS process CPU               {per['sts_cpu_ms']:.3f} ms")
        probe = profile["probed_round"]["probe"]
        print(f"instrumented round (p99 {profile['probed_round']['p99_ms']:.1f} ms):")
        for fn, job in probe["pool_jobs"].items():
            print(
                f"  pool job {fn:<22} x{job['count']:<4} queue mean {job['queue_ms']['mean']:.1f} "
                f"max {job['queue_ms']['max']:.1f} ms; run mean {job['run_ms']['mean']:.1f} "
                f"max {job['run_ms']['max']:.1f} ms"
            )
        labels = {
            "sign_ms": "JWT signing",
            "build_ms": "botocore builds the request",
            "wire_ms": "on the wire (STS and reading)",
            "parse_ms": "botocore parses the answer",
        }
        for name, label in labels.items():
            value = probe[name]
            if value:
                print(
                    f"  {label:<31} mean {value['mean']:.2f} p50 {value['p50']:.2f} "
                    f"max {value['max']:.2f} ms"
                )
        line = probe["timeline_ms"]
        if line["first_send"] is not None:
            print(
                f"  first pool job at {line['first_job']:.1f} ms, "
                f"calls sent from {line['first_send']:.1f} to {line['last_send']:.1f} ms, "
                f"answers read from {line['first_answer']:.1f} to {line['last_answer']:.1f} ms"
            )
        lag = probe["loop_lag_ms"]
        if lag:
            print(f"  event loop lag                mean {lag['mean']:.2f} max {lag['max']:.2f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--identities", type=int, default=50, help="identities (default 50)")
    parser.add_argument("--requests", type=int, default=1000, help="requests (default 1000)")
    parser.add_argument(
        "--sts-latency", type=float, default=30.0, metavar="MS", help="STS latency (default 30)"
    )
    parser.add_argument("--rounds", type=int, help="timed rounds (default 7; --quick: 3)")
    parser.add_argument("--quick", action="store_true", help="3 rounds, a smoke test")
    parser.add_argument("--profile", action="store_true", help="add the per-exchange breakdown")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--fail-above", type=float, metavar="MS", help="exit 1 when the median p99 exceeds MS"
    )
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 7)
    if args.identities < 1 or args.requests < args.identities or rounds < 1:
        parser.error("need --identities >= 1, --requests >= --identities and --rounds >= 1")
    if args.sts_latency < 0:
        parser.error("--sts-latency must be >= 0")

    try:
        result = asyncio.run(
            benchmark(args.identities, args.requests, args.sts_latency, rounds, args.profile)
        )
    except AssertionError as error:
        print(f"burst: correctness check failed: {error}", file=sys.stderr)
        return 1
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print_table(result)
    if args.fail_above is not None and result["p99_ms_median"] > args.fail_above:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
