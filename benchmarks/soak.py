"""Soak: many identities, a fleet of brokers on one Redis, simulated hours, STS faults.

W brokers (``--workers``, each with its own RedisStore client, STS budget and signing key,
standing in for W worker processes) share one redis-server and one strict STS
(tests/servers/sts.py), both started on free loopback ports and stopped at the end. Client
tasks send requests through ``CredentialsMiddleware`` (in-process ASGI calls, no sockets) for
N identities (``--identities``; one role ARN and subject each, Zipf-like popularity, the
worker picked at random for every request) for ``--seconds`` of wall time.

What it simulates:

- lifetimes from 65 s to 1 h: every identity has a lifetime class (65, 90, 120, 300, 600,
  900, 1800 or 3600 s, long ones more common); the STS grants exactly that, whatever
  DurationSeconds asked for (its ``expiration`` callable, keyed by the call's role ARN);
- a skewed clock: STS's clock (its Date header, the Expiration it grants, its JWT checks) is
  the brokers' clock plus ``--skew`` seconds (default +300; the STS's leeway is an hour);
- simulated time: one clock drives the brokers (``clock=``) and the STS (the brokers' clock
  plus the skew). It runs ``--speed`` times as fast as real time (default 240x, in jumps of
  up to 2 s every 4 ms), except that it never jumps while an STS exchange is in flight
  (from the call taking its STS budget token until its answer has been read: a worker's
  estimate of STS's clock must not see a jump the real world would not have; the time is
  made up afterwards), and it runs at real speed while any request has waited longer than
  20 ms, while a worker waits longer than 20 ms for an STS answer, and while Redis is down
  or any worker's store circuit breaker is open: slow answers, retry backoffs, lease and
  store waits, timeouts and the breaker's cooldown run on the brokers' real-time event loop
  and must last as long in simulated time as they do in real time (credentials must not
  expire under a request that waits a second). The report says how much simulated time
  that leaves (about an hour per minute on a 2-core machine). Redis TTLs and leases run on
  real time: values carry their own expiry;
- STS faults on ``--fault-rate`` of the calls (default 4%): Throttling (400), 503
  ServiceUnavailable, slow answers (0.1-1.5 s; the brokers' read timeout is 1 s) and
  malformed answers (truncated XML, an empty 200, a proxy's HTML 502, a 200 without
  Credentials);
- one Redis restart at half time (down ``--redis-down`` seconds; values and leases are lost).

Figures (all measured: STS calls are counted by the STS, lifetimes on its clock, statuses as
the middleware answered them): requests, STS calls (ok / failed, by fault), calls per
identity per refresh cycle (per lifetime class), failures, 5xx, worst remaining lifetime
served, p50/p99 request latency. Exit status 1 if an invariant broke:

0. every credential handed out was issued by the STS for that identity's role;
1. none was handed out with < 5 s left on STS's clock (its expiration minus the STS clock
   at the moment the middleware handed it to the app);
2. STS calls <= refresh cycles + 2 x faulted calls + the store-outage allowance, in total
   and for every identity: an identity with usable life U = lifetime - 60 s refreshes at
   most once per f = max(5, U/2) s, so its cycles are ceil(S / f) + 1 for S simulated
   seconds (U is taken from the shortest grant STS made for it - Expiration has whole
   seconds, the STS rounds it up - less 0.5 s, since a worker knows STS's clock only to the
   Date header's resolution: 65 s grants get f = 4.5 s); each faulted call (every injected
   fault, slow answers included) may be retried once; while a worker runs without the store
   (its circuit breaker open, measured from the broker's log lines) it refreshes on its own,
   allowed floor(D / f) + 1 more calls per identity for D seconds of it. The strict form,
   "early grants" (two grants for one identity less than f apart, no faulted call for it
   and no worker without its store in between), is printed, and is part of (2) with
   ``--strict``;
3. no request failed (5xx or an exception) while the credentials this worker last handed
   out for that identity still had > 5 s left on STS's clock. STS's Date header has whole
   seconds, so no worker can know that clock better than to a second: failures with 5-6 s
   left are counted apart (borderline), > 6 s is a violation. The same count across the
   whole fleet (credentials any worker handed out) is printed too; it is not an invariant,
   since a worker cannot serve what it never had and the store only shares credentials
   with more than 65 s left.

A harness failure (the Redis restart failing, a StrictSTS bug) also exits 1; a violation of
(1) names how far off the worker's estimate of STS's clock was when it planned that expiry.

Usage::

    .venv/bin/python benchmarks/soak.py                    # 60 s, 200 identities, 4 workers
    .venv/bin/python benchmarks/soak.py --seconds 5 --identities 20 --workers 2
    .venv/bin/python benchmarks/soak.py --skew -300 --seed 7 -v
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import contextvars
import itertools
import logging
import math
import platform
import random
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from servers.redis import RedisServer, find_redis_server  # noqa: E402
from servers.sts import StrictSTS, STSError, build_success_xml  # noqa: E402
from stscreds import CredentialBroker, CredentialsMiddleware, Role, SigningKey  # noqa: E402
from stscreds._budget import StsBudget  # noqa: E402
from stscreds.stores import RedisStore, generate_key  # noqa: E402

ISSUER = "http://127.0.0.1/stscreds-soak"
ACCOUNT = "123456789012"
#: The spec, not the package's constants: a package that changed them must show up here.
MANDATORY_WINDOW = 60.0
MIN_SERVE = 5.0
MIN_REFRESH_INTERVAL = 5.0
#: (lifetime seconds, weight): long lifetimes are the common case, short ones the hard one.
LIFETIME_CLASSES = (
    (65, 2),
    (90, 3),
    (120, 4),
    (300, 8),
    (600, 10),
    (900, 15),
    (1800, 25),
    (3600, 33),
)
#: Fault kinds and their share of the injected faults.
FAULT_KINDS = (("throttling", 35), ("unavailable", 30), ("slow", 15), ("malformed", 20))
SLOW_DELAY = (0.1, 1.5)
#: STS's Date header has whole seconds: no worker can know STS's clock better than this, so
#: a failure with up to this much more than MIN_SERVE left is counted apart (borderline).
DATE_RESOLUTION = 1.0
#: The shared store hands out credentials with more than 65 s left (mandatory window + 5 s).
STORE_SHARES = 65.0
#: Broker settings (real seconds): short enough that a soak sees timeouts and retries.
BROKER_OPTIONS: dict[str, Any] = {
    "connect_timeout": 1.0,
    "read_timeout": 1.0,
    "exchange_deadline": 4.0,
    "request_timeout": 8.0,
}
#: The simulated clock falls back to real time while something waited longer than this.
SLOW_GATE = 0.02
#: Clock driver tick and the largest jump per tick (seconds of real / simulated time).
TICK = 0.004
MAX_JUMP = 2.0
#: Simulated time held back while exchanges are in flight is made up afterwards, up to this.
MAX_OWED = 5.0
EXCHANGE = "exchange in flight"


# -- time ------------------------------------------------------------------------------------


class SimClock:
    """Simulated wall time: real elapsed time plus the jumps the driver adds."""

    def __init__(self, start: float) -> None:
        self._start = start
        self._mono0 = time.monotonic()
        self.extra = 0.0  # written by the driver (event loop thread), read by any thread

    def time(self) -> float:
        return self._start + (time.monotonic() - self._mono0) + self.extra


class ExchangeWindows:
    """The STS exchanges in flight, as the workers see them: from the moment a call takes its
    STS budget token (on the exchange thread, just before it reads the clock for ``sent_at``)
    until that thread's second clock read (``received_at``, read when the answer has been
    parsed). Simulated time does not jump inside a window, so a worker's estimate of STS's
    clock (Date header against the midpoint of send and receipt) is not skewed by a jump the
    real world would not have. Relies on the exchanger's order (token, sent_at, call,
    received_at); a window whose call ended otherwise (a timeout, an unparseable answer:
    no sample is taken then) stops counting after ``failsafe`` seconds or at the thread's next
    call.
    """

    def __init__(self, failsafe: float) -> None:
        self.failsafe = failsafe
        self._open: dict[int, list[float]] = {}  # thread id -> [opened (monotonic), reads]
        self._lock = threading.Lock()
        self.opened = 0
        self.closed = 0  # by the answer's receipt (the rest: timeouts, unparseable answers)

    def open(self) -> None:
        with self._lock:
            self._open[threading.get_ident()] = [time.monotonic(), 0.0]
            self.opened += 1

    def clock_read(self) -> None:
        window = self._open.get(threading.get_ident())
        if window is None:
            return
        window[1] += 1
        if window[1] >= 2:
            with self._lock:
                self._open.pop(threading.get_ident(), None)
                self.closed += 1

    def busy(self, now: float) -> bool:
        with self._lock:
            return any(now - opened < self.failsafe for opened, _ in self._open.values())


class WorkerClock:
    """One worker's clock (the ``clock=`` of its broker): the simulated time."""

    def __init__(self, sim: SimClock, windows: ExchangeWindows) -> None:
        self._sim = sim
        self._windows = windows

    def time(self) -> float:
        now = self._sim.time()
        self._windows.clock_read()
        return now


class WindowBudget(StsBudget):
    """The default STS budget (per worker, on its clock), opening an exchange window for every
    call it lets through."""

    def __init__(self, windows: ExchangeWindows, clock: Callable[[], float]) -> None:
        super().__init__(clock=clock)
        self._windows = windows

    def acquire(self, *, background: bool = False) -> float:
        wait = super().acquire(background=background)
        if wait == 0.0:
            self._windows.open()
        return wait


# -- the STS ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawAnswer:
    """What StrictSTS answers verbatim (its respond_raw fault, taken per call here)."""

    body: bytes
    status: int
    content_type: str


@dataclass
class Fault:
    kind: str
    delay: float = 0.0
    answer: STSError | RawAnswer | None = None


@dataclass
class CallLog:
    """One AssumeRoleWithWebIdentity call as the STS saw it."""

    role_arn: str | None
    worker: int | None
    fault: str | None
    status: int
    delay: float
    at: float  # STS clock at arrival
    granted: float | None  # seconds of life granted (success only), on STS's clock


def malformed_answers() -> list[RawAnswer]:
    truncated = build_success_xml(time.time() + 3600)[:180]
    no_credentials = (
        b'<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
        b"<AssumeRoleWithWebIdentityResult><Audience>sts.amazonaws.com</Audience>"
        b"</AssumeRoleWithWebIdentityResult><ResponseMetadata><RequestId>x</RequestId>"
        b"</ResponseMetadata></AssumeRoleWithWebIdentityResponse>"
    )
    return [
        RawAnswer(truncated, 200, "text/xml"),
        RawAnswer(b"", 200, "text/xml"),
        RawAnswer(b"<html><body>502 Bad Gateway</body></html>", 502, "text/html"),
        RawAnswer(no_credentials, 200, "text/xml"),
    ]


class FaultPlan:
    """Draws the fault (or none) for each STS call; thread-safe, seeded."""

    def __init__(self, rate: float, seed: int) -> None:
        self.rate = rate
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._kinds = [k for k, _ in FAULT_KINDS]
        self._weights = [w for _, w in FAULT_KINDS]
        self._malformed = malformed_answers()

    def draw(self) -> Fault | None:
        with self._lock:
            if self._rng.random() >= self.rate:
                return None
            kind = self._rng.choices(self._kinds, self._weights)[0]
            if kind == "throttling":
                return Fault(kind, answer=STSError("Throttling", "Rate exceeded", 400))
            if kind == "unavailable":
                return Fault(
                    kind, answer=STSError("ServiceUnavailable", "Service unavailable", 503)
                )
            if kind == "slow":
                return Fault(kind, delay=self._rng.uniform(*SLOW_DELAY))
            return Fault(kind, answer=self._rng.choice(self._malformed))


class SoakSTS(StrictSTS):
    """StrictSTS granting per-role lifetimes, with faults drawn per call, tracking calls in
    flight (for the clock driver) and which worker (signing key) made each call."""

    def __init__(
        self,
        *,
        lifetimes: dict[str, int],
        faults: FaultPlan,
        workers_by_kid: dict[str, int],
        clock: Callable[[], float],
    ) -> None:
        super().__init__(clock=clock, leeway=3600.0)
        self.lifetimes = lifetimes
        self.faults = faults
        self.workers_by_kid = workers_by_kid
        self.expiration = self._expire
        self.log: list[CallLog] = []
        self._tls = threading.local()
        self._track = threading.Lock()
        self._inflight: dict[int, float] = {}
        self._ids = itertools.count()
        self._halt = threading.Event()

    def start(self) -> SoakSTS:
        super().start()
        # http.server writes the headers and the body in two sends: with Nagle's algorithm
        # and the client's delayed ACK every answer then takes ~40 ms on loopback. Not what
        # is measured here, so the handler disables Nagle (falls back if the server changed).
        httpd = getattr(self, "_httpd", None)
        handler = getattr(httpd, "RequestHandlerClass", None)
        if httpd is not None and handler is not None:
            httpd.RequestHandlerClass = type(
                "NoDelayHandler", (handler,), {"disable_nagle_algorithm": True}
            )
        return self

    def stop(self) -> None:
        self._halt.set()
        super().stop()

    def slow_inflight(self, now: float, low: float, high: float) -> bool:
        """True if a call in flight arrived between ``high`` and ``low`` seconds before ``now``
        (time.monotonic()): slow, but not yet given up by its client."""
        with self._track:
            return any(low < now - arrived < high for arrived in self._inflight.values())

    def _handle(self, params: dict[str, str], request_id: str) -> tuple[int, bytes, str]:
        if params.get("Action") != "AssumeRoleWithWebIdentity":
            return super()._handle(params, request_id)
        call = next(self._ids)
        arrived = self.clock()
        with self._track:
            self._inflight[call] = time.monotonic()
        fault = self.faults.draw()
        try:
            if fault is not None and fault.delay:
                self._halt.wait(fault.delay)
            self._tls.role = params.get("RoleArn")
            self._tls.answer = None if fault is None else fault.answer
            self._tls.granted = None
            status, body, content_type = super()._handle(params, request_id)
        finally:
            with self._track:
                del self._inflight[call]
        worker = None
        with contextlib.suppress(jwt.PyJWTError, KeyError, TypeError):
            kid = jwt.get_unverified_header(params["WebIdentityToken"]).get("kid")
            worker = self.workers_by_kid.get(str(kid))
        entry = CallLog(
            role_arn=params.get("RoleArn"),
            worker=worker,
            fault=None if fault is None else fault.kind,
            status=status,
            delay=0.0 if fault is None else fault.delay,
            at=arrived,
            granted=self._tls.granted if status == 200 and fault is None else None,
        )
        with self._track:
            self.log.append(entry)
        return status, body, content_type

    def _take_fault(self) -> Any:
        answer = getattr(self._tls, "answer", None)
        self._tls.answer = None
        if answer is None:
            return super()._take_fault()
        if isinstance(answer, STSError):
            raise STSError(answer.code, answer.message, answer.status)
        return answer  # duck-typed like StrictSTS's own raw answers: body, status, content_type

    def _expire(self, now: float, requested: int) -> float:
        # Expiration has whole seconds: round up, so no grant is shorter than its lifetime.
        expiration = math.ceil(now) + self.lifetimes[self._tls.role]
        self._tls.granted = expiration - now
        return expiration


# -- identities --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    index: int
    role: Role
    lifetime: int
    weight: float


def refresh_floor(granted: float) -> float:
    """The shortest interval between two refreshes of credentials granted for ``granted``
    seconds: max(5, U/2) for a usable life U = granted - 60 s, where U is what a worker can
    know of it (half a second less: it knows STS's clock to the Date header's resolution);
    a usable life under 5 s must be refreshed when it ends."""
    usable = granted - MANDATORY_WINDOW - DATE_RESOLUTION / 2
    return max(min(MIN_REFRESH_INTERVAL, usable), usable / 2, 0.1)


def cycles(seconds: float, floor: float) -> int:
    """Most refreshes (first fetch included) of one identity in ``seconds`` (simulated)."""
    return math.ceil(seconds / floor) + 1 if seconds > 0 else 0


def alone(seconds: float, floor: float) -> int:
    """Most calls of one worker refreshing on its own for ``seconds``."""
    return math.floor(seconds / floor) + 1 if seconds > 0 else 0


def lifetime_counts(n: int) -> list[tuple[int, int]]:
    """Identities per lifetime class: by weight (largest remainder), at least one each."""
    total = sum(w for _, w in LIFETIME_CLASSES)
    exact = [(life, n * w / total) for life, w in LIFETIME_CLASSES]
    counts = {life: int(x) for life, x in exact}
    if n >= len(LIFETIME_CLASSES):
        for life in counts:
            counts[life] = max(1, counts[life])
    for life, _ in sorted(exact, key=lambda e: e[1] - int(e[1]), reverse=True):
        if sum(counts.values()) >= n:
            break
        counts[life] += 1
    while sum(counts.values()) > n:  # the minimum of one each overshot: trim the largest
        counts[max(counts, key=lambda life: counts[life])] -= 1
    return [(life, counts[life]) for life, _ in LIFETIME_CLASSES if counts[life]]


def make_identities(n: int, rng: random.Random) -> list[Identity]:
    lifetimes = [life for life, count in lifetime_counts(n) for _ in range(count)]
    # Zipf-like popularity (s = 0.8), shuffled across lifetimes: a few identities are asked
    # for all the time, the tail rarely (their cached credentials run out between requests).
    weights = [1.0 / (rank + 1) ** 0.8 for rank in range(n)]
    rng.shuffle(weights)
    return [
        Identity(
            i,
            Role(
                f"arn:aws:iam::{ACCOUNT}:role/soak/l{life}/id{i:04d}",
                subject=f"tenant:{i}",
                duration_seconds=3600,
            ),
            life,
            weights[i],
        )
        for i, life in enumerate(lifetimes)
    ]


# -- measurements ------------------------------------------------------------------------------


CURRENT_WORKER: contextvars.ContextVar[int] = contextvars.ContextVar("soak_worker", default=-1)


@dataclass
class Violation:
    invariant: str
    detail: str


@dataclass
class Measurements:
    requests: int = 0
    ok: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    exceptions: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    slow: Counter[int] = field(default_factory=Counter)  # lifetime class -> requests > 20 ms
    worst_left: float = math.inf
    worst_left_detail: str = ""
    served_below: int = 0  # (1)
    errors_while_valid: int = 0  # (3), same worker
    errors_borderline: int = 0  # (3) within DATE_RESOLUTION of MIN_SERVE: not a violation
    errors_while_valid_fleet: int = 0  # informational
    fleet_left: list[float] = field(default_factory=list)
    fleet_cases: list[str] = field(default_factory=list)
    handed: dict[int, set[str]] = field(default_factory=lambda: defaultdict(set))
    violations: list[Violation] = field(default_factory=list)
    # (worker, identity) -> expiration (POSIX, STS clock) of the last credentials handed out
    last: dict[tuple[int, int], float] = field(default_factory=dict)
    fleet_last: dict[int, float] = field(default_factory=dict)

    def violation(self, invariant: str, detail: str) -> None:
        if sum(v.invariant == invariant for v in self.violations) < 20:
            self.violations.append(Violation(invariant, detail))


class LogWatch(logging.Handler):
    """Counts the package's log lines and times each worker's store outages (sim time)."""

    def __init__(self, sim: SimClock, workers: int) -> None:
        super().__init__(logging.DEBUG)
        self.sim = sim
        self.lines: Counter[tuple[str, str]] = Counter()
        self.detached_since: dict[int, float] = {}
        # worker -> simulated seconds without its store
        self.detached: defaultdict[int, float] = defaultdict(float)
        self.intervals: list[tuple[float, float]] = []  # (from, to) simulated, any worker
        self.workers = workers

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        # One line per distinct message shape: the role ARN and numbers vary.
        shape = " ".join(
            "<arn>" if w.startswith("arn:") else "<n>" if any(c.isdigit() for c in w) else w
            for w in message.split()
        )
        self.lines[(record.levelname, shape[:160])] += 1
        worker = CURRENT_WORKER.get()
        now = self.sim.time()
        if "shared store unavailable" in message:
            # Unattributed (no worker's request behind it): count it for every worker.
            targets = [worker] if worker >= 0 else list(range(self.workers))
            for w in targets:
                self.detached_since.setdefault(w, now)
        elif "shared store is back" in message:
            targets = [worker] if worker >= 0 else list(self.detached_since)
            for w in targets:
                since = self.detached_since.pop(w, None)
                if since is not None:
                    self.detached[w] += now - since
                    self.intervals.append((since, now))

    def close_windows(self) -> None:
        now = self.sim.time()
        for w, since in self.detached_since.items():
            self.detached[w] += now - since
            self.intervals.append((since, now))
        self.detached_since.clear()


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Config:
    seconds: float
    identities: int
    workers: int
    clients: int
    seed: int
    speed: float
    skew: float
    fault_rate: float
    redis_down: float
    think: float
    verbose: bool
    strict: bool = False


class Soak:
    def __init__(self, config: Config, redis: RedisServer) -> None:
        self.config = config
        self.redis = redis
        self.rng = random.Random(config.seed)
        self.identities = make_identities(config.identities, self.rng)
        self.sim = SimClock(time.time())
        self.skew = config.skew
        self.m = Measurements()
        self.inflight_requests: dict[int, float] = {}
        self.stopping = False
        self.gated_real: defaultdict[str, float] = defaultdict(float)
        self.harness_errors: list[str] = []
        self.redis_window: tuple[float, float] | None = None  # sim times down .. up
        self.redis_down = False
        self.keys = [SigningKey.generate("ES256") for _ in range(config.workers)]
        jwks = {"keys": [key.public_jwk() for key in self.keys]}
        self.sts = SoakSTS(
            lifetimes={i.role.arn: i.lifetime for i in self.identities},
            faults=FaultPlan(config.fault_rate, config.seed + 1),
            workers_by_kid={key.kid: w for w, key in enumerate(self.keys)},
            clock=self.sts_now,
        )
        self.sts.configure(issuer=ISSUER, jwks=jwks)
        self.logwatch = LogWatch(self.sim, config.workers)
        self.windows = ExchangeWindows(failsafe=BROKER_OPTIONS["read_timeout"] + 0.1)
        self.brokers: list[CredentialBroker] = []
        self.apps: list[CredentialsMiddleware] = []
        self.sim_start = 0.0
        self.sim_end = 0.0
        self.wall = 0.0

    def sts_now(self) -> float:
        return self.sim.time() + self.skew

    # -- set-up -----------------------------------------------------------------------------

    def build(self) -> None:
        store_key = generate_key()
        identities = self.identities

        def resolve_role(scope: MutableMapping[str, Any]) -> Role:
            return identities[int(scope["soak.identity"])].role

        for w in range(self.config.workers):
            clock = WorkerClock(self.sim, self.windows)
            broker = CredentialBroker(
                issuer=ISSUER,
                signing_keys=[self.keys[w]],
                sts_endpoint_url=self.sts.url,
                store=RedisStore(self.redis.url, prefix="soak:", encryption_keys=[store_key]),
                clock=clock,
                sts_budget=WindowBudget(self.windows, clock.time),
                **BROKER_OPTIONS,
            )
            self.brokers.append(broker)
            self.apps.append(
                CredentialsMiddleware(self.app, broker=broker, resolve_role=resolve_role)
            )

    async def app(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        credentials = scope["state"]["aws_credentials"]
        # Measured here, where the app gets them: what is left on STS's clock right now.
        scope["soak.left"] = credentials.expiration.timestamp() - self.sts_now()
        scope["soak.credentials"] = credentials
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    # -- load -------------------------------------------------------------------------------

    async def request(self, worker: int, identity: Identity, rid: int) -> None:
        scope: dict[str, Any] = {
            "type": "http",
            "method": "GET",
            "path": "/soak",
            "raw_path": b"/soak",
            "query_string": b"",
            "headers": [],
            "soak.identity": identity.index,
        }
        sent: list[MutableMapping[str, Any]] = []

        async def receive() -> MutableMapping[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(message)

        token = CURRENT_WORKER.set(worker)
        start = time.perf_counter()
        self.inflight_requests[rid] = time.monotonic()
        status = 0
        try:
            await self.apps[worker](scope, receive, send)
            status = sent[0]["status"] if sent else 0
            if status != 200:
                scope["soak.body"] = b"".join(m.get("body", b"") for m in sent[1:])
        except Exception as error:  # a server would answer 500
            self.m.exceptions[type(error).__name__] += 1
            status = 500
        finally:
            del self.inflight_requests[rid]
            CURRENT_WORKER.reset(token)
        sts_now = self.sts_now()
        latency = time.perf_counter() - start
        self.m.latencies.append(latency)
        if latency > SLOW_GATE:
            self.m.slow[identity.lifetime] += 1
        self.record(worker, identity, status, scope, sts_now)

    def record(
        self, worker: int, identity: Identity, status: int, scope: dict[str, Any], sts_now: float
    ) -> None:
        m = self.m
        m.requests += 1
        m.statuses[status] += 1
        i = identity.index
        if status == 200:
            m.ok += 1
            credentials = scope["soak.credentials"]
            left = scope["soak.left"]
            expiration = credentials.expiration.timestamp()
            m.handed[i].add(credentials.access_key_id)
            if left < m.worst_left:
                m.worst_left = left
                m.worst_left_detail = (
                    f"identity {i} (lifetime {identity.lifetime}s) worker {worker}"
                )
            if left < MIN_SERVE:
                m.served_below += 1
                m.violation(
                    "1",
                    f"worker {worker} identity {i} (lifetime {identity.lifetime}s): handed out "
                    f"with {left:.2f}s left on STS's clock; "
                    + self.planning_error(worker, identity, expiration),
                )
            m.last[worker, i] = expiration
            m.fleet_last[i] = max(expiration, m.fleet_last.get(i, 0.0))
            return
        last = m.last.get((worker, i))
        if last is not None and MIN_SERVE < last - sts_now <= MIN_SERVE + DATE_RESOLUTION:
            m.errors_borderline += 1
        elif last is not None and last - sts_now > MIN_SERVE:
            m.errors_while_valid += 1
            m.violation(
                "3",
                f"worker {worker} identity {i} (lifetime {identity.lifetime}s): HTTP {status} "
                f"while its last credentials had {last - sts_now:.2f}s left on STS's clock",
            )
        fleet = m.fleet_last.get(i)
        if fleet is not None and fleet - sts_now > MIN_SERVE:
            m.errors_while_valid_fleet += 1
            m.fleet_left.append(fleet - sts_now)
            if fleet - sts_now > STORE_SHARES and len(m.fleet_cases) < 1000:
                body = scope.get("soak.body", b"")
                m.fleet_cases.append(
                    f"t={self.sim.time() - self.sim_start:,.0f}s worker {worker} identity {i} "
                    f"(lifetime {identity.lifetime}s): HTTP {status} {body[:80]!r}; this worker's "
                    f"last credentials: "
                    + ("none" if last is None else f"{last - sts_now:.0f}s left")
                    + f"; another's: {fleet - sts_now:.0f}s left; workers without store: "
                    + (", ".join(f"w{w}" for w in sorted(self.logwatch.detached_since)) or "none")
                )

    def planning_error(self, worker: int, identity: Identity, expiration: float) -> str:
        """Diagnosis only: how far off the worker's estimate of STS's clock was when it
        planned these credentials' expiry (read from its private cache entry)."""
        broker = self.brokers[worker]
        try:
            entry = broker._cache.get(broker.identity_key(identity.role))
            planned = float(entry.expires_at)  # type: ignore[union-attr]  # None: caught
        except (AttributeError, TypeError, ValueError):
            return "(no cache entry to diagnose)"
        error = (expiration - planned) - self.skew
        return (
            f"the worker's estimate of STS's clock was {error:+.2f}s off when it planned their "
            f"expiry (now {broker.sts_clock.offset - self.skew:+.2f}s)"
        )

    async def client(self, c: int, ids: itertools.count[int]) -> None:
        rng = random.Random(self.config.seed * 1000 + c)
        identities = self.identities
        cumulative = list(itertools.accumulate(i.weight for i in identities))
        workers = self.config.workers
        while not self.stopping:
            identity = identities[bisect.bisect(cumulative, rng.random() * cumulative[-1])]
            await self.request(rng.randrange(workers), identity, next(ids))
            await asyncio.sleep(rng.expovariate(1.0 / self.config.think))

    # -- time -------------------------------------------------------------------------------

    def gated(self, now: float) -> str | None:
        """Why simulated time must not jump now, or None."""
        if self.redis_down or self.logwatch.detached_since:
            # Redis down, or a worker's store circuit breaker open: real-time phenomena
            # (the outage, the cooldown) must not last minutes of simulated time.
            return "store outage"
        oldest = min(self.inflight_requests.values(), default=None)
        if oldest is not None and now - oldest > SLOW_GATE:
            return "waiting request"
        # A slow answer a worker still waits for (it gives up after its read timeout).
        if self.sts.slow_inflight(now, SLOW_GATE, BROKER_OPTIONS["read_timeout"] + 0.25):
            return "slow STS call"
        if self.windows.busy(now):
            return EXCHANGE
        return None

    async def drive_clock(self) -> None:
        """Advance simulated time ``speed`` times as fast as real time, except while something
        is slow (then at real speed) and never inside an exchange (then the jump is owed and
        made once the exchange is done): see the module docstring."""
        last = time.monotonic()
        extra_rate = self.config.speed - 1.0
        owed = 0.0
        while not self.stopping:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            elapsed, last = now - last, now
            reason = self.gated(now)
            if reason is not None:
                self.gated_real[reason] += elapsed
                # Held back by an exchange: owed. Real speed for the rest: dropped.
                owed = min(owed + extra_rate * elapsed, MAX_OWED) if reason == EXCHANGE else 0.0
                continue
            jump = min(owed + extra_rate * elapsed, MAX_JUMP)
            owed = max(0.0, owed + extra_rate * elapsed - jump)
            self.sim.extra += jump

    async def restart_redis(self, at: float) -> None:
        await asyncio.sleep(at)
        if self.stopping:
            return
        down = self.sim.time()
        self.redis_down = True
        try:
            await asyncio.to_thread(self.redis.stop)
            await asyncio.sleep(self.config.redis_down)
            await asyncio.to_thread(self.redis.start)
        except Exception as error:  # the rest of the run would measure nothing useful
            self.harness_errors.append(f"redis restart failed: {error!r}")
        finally:
            self.redis_down = False
        self.redis_window = (down, self.sim.time())

    # -- run --------------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        unhandled: list[str] = []

        def on_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            unhandled.append(str(context.get("exception") or context.get("message")))

        loop.set_exception_handler(on_loop_error)
        self.build()
        ids = itertools.count()
        self.sim_start = self.sim.time()
        began = time.monotonic()
        driver = asyncio.create_task(self.drive_clock())
        restart = asyncio.create_task(self.restart_redis(self.config.seconds / 2))
        clients = [asyncio.create_task(self.client(c, ids)) for c in range(self.config.clients)]
        await asyncio.sleep(self.config.seconds)
        self.stopping = True
        await asyncio.gather(*clients)
        self.sim_end = self.sim.time()
        self.wall = time.monotonic() - began
        await driver
        restart.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await restart
        self.logwatch.close_windows()
        for broker in self.brokers:
            token = CURRENT_WORKER.set(-2)  # closing: not a store outage of a worker
            try:
                await broker.aclose()
            finally:
                CURRENT_WORKER.reset(token)
        for text in unhandled:
            self.m.exceptions[f"unhandled in event loop: {text[:120]}"] += 1


# -- report ------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def report(soak: Soak) -> int:
    config, m, sts = soak.config, soak.m, soak.sts
    sim_seconds = soak.sim_end - soak.sim_start
    print(
        f"soak: {config.seconds:g} s wall, {config.identities} identities, {config.workers} "
        f"workers (brokers on one RedisStore), {config.clients} clients, seed {config.seed}; "
        f"{platform.python_implementation()} {platform.python_version()}"
    )
    print(
        f"simulated     {sim_seconds:,.0f} s ({sim_seconds / 3600:.2f} h) in {soak.wall:.1f} s "
        f"wall: {sim_seconds / soak.wall:.0f}x (target {config.speed:g}x)"
    )
    gated = sum(soak.gated_real.values())
    reasons = sorted(soak.gated_real.items(), key=lambda item: -item[1])
    print(
        f"  no jumps for {gated:.1f} s of the wall time ("
        + ", ".join(f"{why} {s:.1f} s" for why, s in reasons)
        + f"; made up afterwards: {EXCHANGE})"
    )
    classes = ", ".join(f"{life}s x{count}" for life, count in lifetime_counts(config.identities))
    print(f"lifetimes     {classes}")
    print(f"STS clock     {config.skew:+g} s from the workers' (leeway 3600 s)")
    offsets = [b.sts_clock.offset - config.skew for b in soak.brokers if b.sts_clock.known]
    if offsets:
        print(
            f"  workers' estimate of the STS clock at the end: error "
            f"{min(offsets):+.2f} .. {max(offsets):+.2f} s"
        )
    if soak.redis_window is not None:
        down, up = soak.redis_window
        print(
            f"redis restart at {down - soak.sim_start:,.0f} s simulated, down "
            f"{config.redis_down:g} s real ({up - down:,.0f} s simulated)"
        )
    else:
        print("redis restart: did not happen (run too short?)")

    # -- requests
    failures = m.requests - m.ok
    five_xx = sum(n for status, n in m.statuses.items() if status >= 500)
    print(
        f"requests      {m.requests:,} ({m.requests / soak.wall:,.0f}/s), {m.ok:,} ok, "
        f"{failures:,} failed"
    )
    statuses = ", ".join(f"{s}: {n:,}" for s, n in sorted(m.statuses.items()) if s != 200)
    print(f"failures      {failures:,}  (5xx: {five_xx:,}; {statuses or 'none'})")
    exceptions = sum(m.exceptions.values())
    print(f"exceptions    {exceptions}" + (f"  {dict(m.exceptions)}" if exceptions else ""))
    p50, p99 = percentile(m.latencies, 0.5), percentile(m.latencies, 0.99)
    print(
        f"latency       p50 {p50 * 1000:.3f} ms, p99 {p99 * 1000:.3f} ms, max "
        f"{max(m.latencies, default=math.nan) * 1000:.1f} ms (request through the middleware)"
    )
    slow = sum(m.slow.values())
    by_life = ", ".join(f"{k}s {n}" for k, n in sorted(m.slow.items()))
    print(
        f"waited > {SLOW_GATE * 1000:.0f} ms {slow:,} requests"
        + (f" (by lifetime: {by_life})" if by_life else "")
    )
    print(
        f"worst left    {m.worst_left:.2f} s on STS's clock ({m.worst_left_detail}); "
        f"handed out with < {MIN_SERVE:g} s: {m.served_below}"
    )

    # -- STS calls
    log = list(sts.log)
    calls = len(log)
    faulted = [c for c in log if c.fault is not None]
    ok_calls = [c for c in log if c.fault is None and c.status == 200]
    other_failed = [c for c in log if c.fault is None and c.status != 200]
    by_kind = Counter(c.fault for c in faulted)
    print(
        f"STS calls     {calls:,} ({len(ok_calls):,} ok, {len(faulted):,} faulted: "
        + ", ".join(f"{k} {n}" for k, n in sorted(by_kind.items()))
        + (f"; {len(other_failed)} failed unprovoked" if other_failed else "")
        + ")"
    )
    per_worker = Counter(c.worker for c in log)
    print(
        "  per worker  "
        + ", ".join(f"w{w}: {n:,}" for w, n in sorted(per_worker.items(), key=str))
        + "; budget refusals (never sent): "
        + str(sum(b.sts_budget.refused for b in soak.brokers if b.sts_budget is not None))
    )
    windows = soak.windows
    print(
        f"  exchange windows {windows.opened:,} opened, {windows.closed:,} closed by their "
        f"thread's next clock read (the answer's receipt), "
        f"{windows.opened - windows.closed:,} by the failsafe"
    )
    watch = soak.logwatch
    detached = {w: watch.detached[w] for w in range(config.workers) if watch.detached[w] > 0}
    print(
        "  without store "
        + (
            ", ".join(f"w{w}: {s:,.0f} s" for w, s in sorted(detached.items()))
            if detached
            else "never"
        )
        + " (simulated; circuit breaker open, from the workers' log lines)"
    )

    calls_for: Counter[str | None] = Counter(c.role_arn for c in log)
    faults_for: Counter[str | None] = Counter(c.role_arn for c in faulted)
    granted: dict[str, float] = {}
    for c in log:
        if c.granted is not None and c.role_arn is not None:
            granted[c.role_arn] = min(c.granted, granted.get(c.role_arn, math.inf))
    total_cycles = total_bound = 0
    over: list[str] = []
    rows: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
    floors: dict[int, float] = {}
    for identity in soak.identities:
        arn = identity.role.arn
        floor = refresh_floor(granted.get(arn, identity.lifetime))
        floors[identity.lifetime] = min(floor, floors.get(identity.lifetime, math.inf))
        n_cycles = cycles(sim_seconds, floor)
        outage = sum(alone(seconds, floor) for seconds in detached.values())
        bound = n_cycles + 2 * faults_for[arn] + outage
        total_cycles += n_cycles
        total_bound += bound
        row = rows[identity.lifetime]
        row[0] += 1
        row[1] += calls_for[arn]
        row[2] += faults_for[arn]
        row[3] += n_cycles
        row[4] += bound
        if calls_for[arn] > bound:
            over.append(
                f"identity {identity.index} (lifetime {identity.lifetime}s): {calls_for[arn]} "
                f"calls > bound {bound} (cycles {n_cycles} of {floor:.2f}s, faulted "
                f"{faults_for[arn]}, "
                f"outage allowance {outage})"
            )
    # The strict form of "at most once per f": two grants for one identity closer than f,
    # with no faulted call for it and no worker without its store in between.
    outages = [(a + soak.skew, b + soak.skew) for a, b in watch.intervals]  # on STS's clock
    by_role: defaultdict[str | None, list[CallLog]] = defaultdict(list)
    for c in log:
        by_role[c.role_arn].append(c)
    early: Counter[int] = Counter()
    early_same_worker = 0
    early_cases: list[str] = []
    for identity in soak.identities:
        floor = refresh_floor(granted.get(identity.role.arn, identity.lifetime))
        previous: CallLog | None = None
        for c in sorted(by_role[identity.role.arn], key=lambda c: c.at):
            if c.fault is not None or c.status != 200:
                previous = None  # a failure: the next grant may come at any time
                continue
            if (
                previous is not None
                and c.at - previous.at < floor
                and not any(a <= c.at and previous.at <= b for a, b in outages)
            ):
                early[identity.lifetime] += 1
                early_same_worker += c.worker == previous.worker
                if len(early_cases) < 5:
                    early_cases.append(
                        f"identity {identity.index} (lifetime {identity.lifetime}s, f "
                        f"{floor:.2f}s): grants {c.at - previous.at:.2f}s apart, to worker "
                        f"{previous.worker} then worker {c.worker}"
                    )
            previous = c
    print(
        f"bound (2)     {calls:,} calls <= {total_bound:,} = {total_cycles:,} refresh cycles + "
        f"2 x {len(faulted)} faulted + "
        f"{total_bound - total_cycles - 2 * len(faulted):,} store-outage allowance"
    )
    print(
        f"early grants  {sum(early.values())} (two grants for one identity less than f apart "
        "with no fault or store outage between"
        + ("" if config.strict else "; part of (2) only with --strict")
        + ")"
        + (": " + ", ".join(f"{k}s {n}" for k, n in sorted(early.items())) if early else "")
        + (f"; both to the same worker: {early_same_worker}" if early else "")
    )
    for case in early_cases[: 5 if config.verbose else 2]:
        print(f"    {case}")
    ratio = len(ok_calls) / total_cycles if total_cycles else math.nan
    print(f"calls per identity per refresh cycle  {ratio:.3f} (successful calls / cycles)")
    print(
        f"  {'lifetime':>8} {'ids':>5} {'floor':>8} {'calls':>7} {'faulted':>8} {'cycles':>7} "
        f"{'bound':>7}"
    )
    for life, (ids, n_calls, n_faulted, n_cycles, bound) in sorted(rows.items()):
        print(
            f"  {life:>7}s {ids:>5} {floors[life]:>7.1f}s {n_calls:>7} {n_faulted:>8} "
            f"{n_cycles:>7} {bound:>7}  {(n_calls - n_faulted) / n_cycles:.2f} ok calls/cycle"
        )

    # -- invariants
    issued: dict[str, str] = {}
    for rec in sts.requests:
        if rec.credentials is not None and rec.role_arn is not None:
            issued[rec.credentials["AccessKeyId"]] = rec.role_arn
    foreign = 0
    for i, handed in m.handed.items():
        arn = soak.identities[i].role.arn
        for key_id in handed:
            if issued.get(key_id) != arn:
                foreign += 1
                m.violation("0", f"identity {i} got access key {key_id[-4:]} not issued for it")
    total_calls = sum(calls_for.values())
    if total_calls > total_bound:
        m.violation("2", f"{total_calls} STS calls > bound {total_bound}")
    for line in over:
        m.violation("2", line)
    if config.strict:
        for case in early_cases:
            m.violation("2", f"early grant: {case}")
    if exceptions:
        m.violation("3", f"exceptions: {dict(m.exceptions)}")
    print(
        f"invariants    (0) foreign credentials: {foreign}; (1) handed out with < 5 s left: "
        f"{m.served_below}; (2) over the call bound: {int(total_calls > total_bound)} total, "
        f"{len(over)} identities"
        + (f", {sum(early.values())} early grants" if config.strict else "")
        + "; (3) errors while this worker's last credentials had > 6 s "
        f"left: {m.errors_while_valid} (+{exceptions} exceptions; 5-6 s left, within the Date "
        f"header's resolution: {m.errors_borderline})"
    )
    shareable = sum(left > STORE_SHARES for left in m.fleet_left)
    print(
        f"  fleet-wide: errors while any worker's last credentials had > 5 s left: "
        f"{m.errors_while_valid_fleet} (informational; with > {STORE_SHARES:g} s left, which "
        f"the store shares: {shareable}"
        + (f", up to {max(m.fleet_left):.0f} s" if m.fleet_left else "")
        + ")"
    )
    cases = m.fleet_cases if config.verbose else m.fleet_cases[:3] + m.fleet_cases[3:][-3:]
    for case in cases:
        print(f"    {case}")
    errors = [(level, text, n) for (level, text), n in watch.lines.items() if level == "ERROR"]
    if errors or config.verbose:
        print("log lines (stscreds logger):")
        for (level, text), n in watch.lines.most_common(None if config.verbose else 0):
            print(f"  {n:>6} {level:<7} {text}")
        for level, text, n in errors:
            if not config.verbose:
                print(f"  {n:>6} {level:<7} {text}")
    if sts.internal_errors:
        m.violation("harness", f"StrictSTS internal errors: {sts.internal_errors[:3]!r}")
    for error in soak.harness_errors:
        m.violation("harness", error)
    if other_failed:
        # Not injected: STS refused what a worker sent (a token's times, a parameter).
        codes = Counter(
            f"{r.error_code} ({r.status})" for r in sts.requests if r.status != 200 and not r.raw
        )
        m.violation("sts", f"{len(other_failed)} STS calls failed unprovoked; all codes: {codes}")
    if m.violations:
        print(f"FAIL: {len(m.violations)} violation(s) (first ones):")
        for v in m.violations[:40]:
            print(f"  ({v.invariant}) {v.detail}")
        return 1
    print("OK: all invariants held")
    return 0


async def soak_main(config: Config, redis: RedisServer) -> int:
    soak = Soak(config, redis)
    logger = logging.getLogger("stscreds")
    logger.addHandler(soak.logwatch)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    soak.sts.start()
    try:
        await soak.run()
    finally:
        soak.stopping = True
        await asyncio.to_thread(soak.sts.stop)
        logger.removeHandler(soak.logwatch)
    return report(soak)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="wall time (default 60)")
    parser.add_argument("--identities", type=int, default=200, help="identities (default 200)")
    parser.add_argument("--workers", type=int, default=4, help="brokers on one store (default 4)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument(
        "--speed", type=float, default=240.0, help="simulated seconds per real second (240)"
    )
    parser.add_argument(
        "--skew", type=float, default=300.0, help="STS clock minus the workers' (s, default 300)"
    )
    parser.add_argument(
        "--fault-rate", type=float, default=0.04, help="share of STS calls faulted (0.04)"
    )
    parser.add_argument(
        "--redis-down", type=float, default=1.0, help="seconds Redis stays down (default 1)"
    )
    parser.add_argument(
        "--think", type=float, default=0.008, help="mean pause between a client's requests (s)"
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="(2) also fails on early grants (two grants for one identity less than f apart)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="print every log line")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.identities < 1 or args.workers < 1 or args.clients < 1:
        parser.error("--seconds, --identities, --workers and --clients must be positive")
    if args.speed < 1 or not 0 <= args.fault_rate <= 1 or abs(args.skew) > 3000:
        parser.error("--speed >= 1, 0 <= --fault-rate <= 1, |--skew| <= 3000")
    if args.think <= 0 or args.redis_down < 0:
        parser.error("--think > 0, --redis-down >= 0")
    config = Config(
        seconds=args.seconds,
        identities=args.identities,
        workers=args.workers,
        clients=args.clients,
        seed=args.seed,
        speed=args.speed,
        skew=args.skew,
        fault_rate=args.fault_rate,
        redis_down=args.redis_down,
        think=args.think,
        verbose=args.verbose,
        strict=args.strict,
    )
    binary = find_redis_server()
    if binary is None:
        print("soak: redis-server is not installed (see `make deps`)", file=sys.stderr)
        return 2
    redis = RedisServer(binary)
    redis.start()
    try:
        return asyncio.run(soak_main(config, redis))
    finally:
        redis.close()


if __name__ == "__main__":
    sys.exit(main())
