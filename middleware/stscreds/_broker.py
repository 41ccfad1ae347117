"""CredentialBroker: role -> cached credentials, minting and exchanging once per identity."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import time
import weakref
from collections import deque
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

from cachetools import LRUCache

from ._budget import StsBudget
from ._cache import (
    DEFAULT_REFRESH_BACKOFF,
    MANDATORY_WINDOW,
    CacheEntry,
    Failure,
    L1Cache,
    plan_entry,
    refresh_backoff,
)
from ._clock import Clock, StsClock, SystemClock
from ._credentials import Credentials
from ._errors import (
    CredentialsRejected,
    CredentialsUnavailable,
    STSUnavailable,
    _Closed,
    _Timeout,
)
from ._exchange import BudgetRefused, ExchangeRequest, StsExchanger, classify_error
from ._metrics import (
    METRICS,
    ExchangeOutcome,
    Histogram,
    RoleCounts,
    error_label,
    outcome_label,
)
from ._roles import Role, identity_key
from ._shared import SharedTier, StoreStats
from ._signing import KeySource, KeySourcePoller, SigningKey, TokenMinter, check_ring
from ._telemetry import Tracing
from .stores import CredentialStore

__all__ = ["BrokerStats", "CredentialBroker"]

logger = logging.getLogger("stscreds")

#: How long an identity whose STS answer was already (nearly) expired is not asked for
#: again: such answers come from a clock or lifetime problem that is not fixed in seconds,
#: and every exchange would fail the same way.
CLOCK_SKEW_TTL = 30.0
#: Above this many seconds of difference between the local clock and STS's, one WARNING.
CLOCK_OFFSET_WARNING = 30.0
# A change of the learned offset larger than this moves the cached entries with it.
_OFFSET_STEP = 2.0
_CLOSED = "credential broker is closed"
_EXCHANGE_SPAN = "STS/AssumeRoleWithWebIdentity"
# The shared tier's metrics (empty without a store).
_STORE_METRICS = tuple(
    spec.name for spec in METRICS if spec.name.startswith("store_") and spec.labels
)


#: Failures that say this process cannot get credentials for any role (its issuer, clock or
#: network), as opposed to one role's trust policy: only these make health() unavailable.
PROCESS_WIDE_FAILURES = frozenset(
    {
        "InvalidIdentityToken",
        "IDPCommunicationError",
        "ShortGrant",
        "Timeout",
        "Unreachable",
        "BadResponse",
        "SigningUnavailable",
        "SigningRejected",
    }
)
#: health() is "unavailable" after this many process-wide failures in HEALTH_WINDOW seconds
#: with no successful exchange since.
HEALTH_FAILURES = 3
HEALTH_WINDOW = 60.0


#: Per kind of warning and error code: at most this many lines per WARNING_WINDOW seconds;
#: the rest are counted and summed up in one line (200 identities throttled at once must
#: not mean 200 WARNING lines; each exchange still logs its INFO event).
WARNING_LIMIT = 5
WARNING_WINDOW = 10.0


class _WarningSummary:
    """Lets the first few warnings of a kind and code through and sums up the rest."""

    __slots__ = ("_windows",)

    def __init__(self) -> None:
        # (kind, code) -> [window start, lines shown, lines held back]
        self._windows: dict[tuple[str, str], list[float]] = {}

    def allow(self, kind: str, code: str, now: float) -> bool:
        """True if this warning should be logged; False if it is only counted."""
        window = self._windows.get((kind, code))
        if window is None or now - window[0] >= WARNING_WINDOW:
            if window is not None:
                self._flush(kind, code, window, now)
            self._windows[kind, code] = [now, 1.0, 0.0]
            return True
        if window[1] < WARNING_LIMIT:
            window[1] += 1
            return True
        window[2] += 1
        if window[2] == 1:
            with contextlib.suppress(RuntimeError):  # no running loop: the next call flushes
                asyncio.get_running_loop().call_later(
                    WARNING_WINDOW, self._flush_late, kind, code, window
                )
        return False

    def _flush_late(self, kind: str, code: str, window: list[float]) -> None:
        if self._windows.get((kind, code)) is window:
            del self._windows[kind, code]
            self._flush(kind, code, window, window[0] + WARNING_WINDOW)

    @staticmethod
    def _flush(kind: str, code: str, window: list[float], now: float) -> None:
        if window[2]:
            logger.warning(
                "%d more identities: %s (%s) within %.0fs, not logged one by one; each "
                "exchange is logged at INFO",
                int(window[2]),
                kind,
                code,
                max(0.0, now - window[0]),
                extra={"error_code": code, "suppressed": int(window[2])},
            )
            window[2] = 0


class _StsTime:
    """A Clock reading STS's clock (the local one until STS's is known): dates the tokens."""

    __slots__ = ("_sts_clock",)

    def __init__(self, sts_clock: StsClock) -> None:
        self._sts_clock = sts_clock

    def time(self) -> float:
        """The current time on STS's clock, at its earliest: an ``iat`` a fraction of a
        second in STS's future would be refused."""
        sts_clock = self._sts_clock
        return sts_clock.now() - sts_clock.margin


class _ShortGrant(STSUnavailable):
    """STS answered with credentials that had (nearly) expired on arrival."""

    reason = "ShortGrant"


def _ttl_range(name: str, value: tuple[float, float]) -> tuple[float, float]:
    low, high = value
    if not 0 <= low <= high:
        raise ValueError(f"{name}: must be (low, high) with 0 <= low <= high")
    return low, high


class BrokerStats:
    """The broker's raw counters since it was made; ``broker.metrics()`` is the documented
    view of them (and of everything else worth watching)."""

    __slots__ = (
        "background_refreshes",
        "exchange_counts",
        "exchange_duration",
        "exchange_failures",
        "exchanges",
        "hits",
        "joins",
        "misses",
        "negative_hits",
        "request_wait",
        "roles",
        "warm_ups",
    )

    def __init__(self) -> None:
        self.hits = 0  # requests served from the L1 cache
        self.misses = 0  # requests that went to fetch()
        self.joins = 0  # misses that joined an exchange in flight
        self.exchanges = 0  # STS exchanges started
        self.exchange_failures = 0  # failed refreshes (STS, store marker or closed)
        self.background_refreshes = 0
        self.negative_hits = 0
        self.warm_ups = 0  # of the misses, those of a start-up warm-up (no request waiting)
        #: (trigger, outcome, code) -> finished STS exchanges.
        self.exchange_counts: dict[tuple[str, str, str], int] = {}
        self.exchange_duration = Histogram()
        self.request_wait = Histogram()
        self.roles = RoleCounts()

    def __repr__(self) -> str:
        return (
            f"BrokerStats(hits={self.hits}, misses={self.misses}, exchanges={self.exchanges}, "
            f"exchange_failures={self.exchange_failures})"
        )


class CredentialBroker:
    """Gives temporary credentials for a Role: from cache, or by one JWT + STS exchange.

    Knows nothing of HTTP; ``await broker.get(role)`` works in any coroutine. A broker serves
    one event loop at a time (the loop its in-flight exchanges run on).
    """

    def __init__(
        self,
        *,
        issuer: str,
        signing_keys: Sequence[SigningKey] | KeySource,
        signing_keys_interval: float = 60.0,
        region: str = "us-east-1",
        sts_endpoint_url: str | None = None,
        audience: str = "sts.amazonaws.com",
        default_subject: str = "stscreds",
        token_ttl: int = 300,
        cache_size: int = 10_000,
        connect_timeout: float = 2.0,
        read_timeout: float = 5.0,
        exchange_deadline: float = 10.0,
        max_attempts: int = 3,
        max_workers: int = 64,
        request_timeout: float = 20.0,
        advisory_window: float | None = None,
        refresh_backoff: tuple[float, float] = DEFAULT_REFRESH_BACKOFF,
        sts_budget: StsBudget | None = None,
        negative_ttl: tuple[float, float] = (1.0, 5.0),
        transient_negative_ttl: tuple[float, float] = (0.5, 2.0),
        store: CredentialStore | None = None,
        store_timeout: float = 0.25,
        store_cooldown: float = 5.0,
        lease_ttl: float | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._clock: Clock = clock or SystemClock()
        if (
            isinstance(request_timeout, bool)
            or not isinstance(request_timeout, int | float)
            or request_timeout <= 0
        ):
            raise ValueError("request_timeout: must be a positive number of seconds")
        if advisory_window is not None and (
            isinstance(advisory_window, bool)
            or not isinstance(advisory_window, int | float)
            or advisory_window <= MANDATORY_WINDOW
        ):
            raise ValueError("advisory_window: must be None or more than 60 seconds")
        self.request_timeout = float(request_timeout)
        self._advisory = None if advisory_window is None else float(advisory_window)
        self._refresh_backoff = _ttl_range("refresh_backoff", refresh_backoff)
        #: STS's clock as learned from its answers; expiry is planned on it.
        self.sts_clock = StsClock(self._clock)
        self._offset_warned = False
        # The offset the cached entries were planned with (see _check_offset).
        self._planned_offset = 0.0
        if (
            isinstance(signing_keys_interval, bool)
            or not isinstance(signing_keys_interval, int | float)
            or not 1 <= signing_keys_interval <= 86_400
        ):
            raise ValueError("signing_keys_interval: must be a number of seconds from 1 to 86400")
        self.signing_keys_interval = float(signing_keys_interval)
        #: The callable signing_keys was (re-read every signing_keys_interval), or None.
        self._key_source: KeySource | None = None
        if callable(signing_keys):
            self._key_source = signing_keys
            signing_keys = signing_keys()  # at start-up its errors are the caller's to see
        self._minter = TokenMinter(
            issuer=issuer,
            audience=audience,
            keys=signing_keys,
            token_ttl=token_ttl,
            # Tokens are dated on STS's clock once it is known: with the local clock minutes
            # behind, a token would be expired on arrival (InvalidIdentityToken) for good.
            clock=_StsTime(self.sts_clock),
        )
        self._negative_ttl = _ttl_range("negative_ttl", negative_ttl)
        self._transient_negative_ttl = _ttl_range("transient_negative_ttl", transient_negative_ttl)
        self._cache = L1Cache(cache_size)
        # The hit path reads these directly: a plain dict and a bound method, no Python calls.
        self._entries = self._cache.entries
        self._now = self._clock.time
        self._exchanger = StsExchanger(
            region=region,
            endpoint_url=sts_endpoint_url,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            deadline=exchange_deadline,
            max_attempts=max_attempts,
            max_workers=max_workers,
            sts_clock=self.sts_clock,
            budget=sts_budget if sts_budget is not None else StsBudget(clock=self._clock.time),
        )
        self._keys: dict[str, str] = {}
        self.default_subject = default_subject
        self._closed = False
        self._failures: LRUCache[str, Failure] = LRUCache(maxsize=cache_size)
        self._inflight: dict[str, asyncio.Task[Credentials]] = {}
        # Role's canonical encoding -> identity key (self._keys), so a hit neither re-encodes
        # the identity nor calls Role.__hash__ (Python code); a str caches its own hash.
        self._keys_max = cache_size * 2
        # Identity key -> the access key id AWS rejected (invalidate): never taken again
        # from the store, where it may still sit.
        self._rejected: LRUCache[str, str] = LRUCache(maxsize=cache_size)
        self.stats = BrokerStats()
        #: Where miss-path spans go (stscreds.otel.instrument can name a provider).
        self._tracing = Tracing()
        # Identity key -> callers waiting on its exchange (the log's "waiters").
        self._waiting: dict[str, int] = {}
        self._last_success: float | None = None
        # (time, message) of recent process-wide failures, for health().
        self._recent_failures: deque[tuple[float, str]] = deque(maxlen=HEALTH_FAILURES)
        self._last_failure: dict[str, Any] | None = None
        self._failed_since_success = False
        self._warnings = _WarningSummary()
        # Exchanges some caller gave up on (request_timeout): logged once each.
        self._timed_out: weakref.WeakSet[asyncio.Task[Credentials]] = weakref.WeakSet()
        # gunicorn --preload and multiprocessing fork a process that already made a broker.
        os.register_at_fork(after_in_child=partial(_reset_in_child, weakref.ref(self)))
        self._key_poller = self._start_key_poller()
        # The lease must outlive one whole exchange, or a slow holder loses it mid-call.
        self._shared = (
            None
            if store is None
            else SharedTier(
                store,
                op_timeout=store_timeout,
                breaker_cooldown=store_cooldown,
                lease_ttl=lease_ttl if lease_ttl is not None else exchange_deadline + 5.0,
                sts_clock=self.sts_clock,
                # A cold miss waits for another worker's exchange only as long as leaves
                # time for its own within request_timeout: a squatted lease costs no more.
                # (With a request_timeout shorter than that, half of it: the fleet still
                # shares one exchange, and the caller's own bound holds regardless.)
                lease_wait=max(self.request_timeout - exchange_deadline, self.request_timeout / 2),
                learn_clock=self._exchanger.learn_clock,
                tracing=self._tracing,
            )
        )

    @property
    def default_subject(self) -> str:
        """The ``sub`` of tokens for roles that name no subject."""
        return self._default_subject

    @default_subject.setter
    def default_subject(self, value: str) -> None:
        # Validates it the same way as Role.subject.
        Role("arn:aws:iam::000000000000:role/x", subject=value)
        self._default_subject = value
        # Identity keys of roles without a subject depend on it.
        self._keys.clear()

    @property
    def sts_budget(self) -> StsBudget | None:
        """The gate on STS calls that tightens under throttling."""
        return self._exchanger.budget

    @property
    def store_stats(self) -> StoreStats | None:
        """Counters of the shared store tier, or None without a store."""
        return None if self._shared is None else self._shared.stats

    @property
    def issuer(self) -> str:
        """The issuer URL (``iss``) without a trailing slash."""
        return self._minter.issuer

    @property
    def audience(self) -> str:
        """The ``aud`` claim of minted tokens."""
        return self._minter.audience

    @property
    def sts_endpoint_url(self) -> str:
        """The STS endpoint exchanges go to."""
        return self._exchanger.endpoint_url

    @property
    def signing_keys(self) -> tuple[SigningKey, ...]:
        """The key ring: every key is published in the JWKS, the first one signs."""
        return self._minter.keys

    def set_signing_keys(self, signing_keys: Sequence[SigningKey]) -> None:
        """Replace the key ring at runtime: tokens minted from now on are signed by the new
        first key, and the JWKS and discovery documents served from now on publish the new
        ring. Cached credentials stay as they are (they do not depend on the key).

        Validated like the constructor's ``signing_keys`` (ValueError, nothing replaced).
        Safe from any thread: the ring is swapped in one assignment; exchanges already
        waiting to sign sign with the new ring. With a key source, its next read replaces a
        ring set here whenever the two differ.
        """
        old = self._minter
        minter = old.with_keys(signing_keys)
        self._minter = minter
        signing = minter.keys[0].kid
        if signing not in {k.kid for k in old.keys}:
            # The rotation runbook's step 3 before its step 1: AWS has never seen this key.
            logger.warning(
                "signing with %s, which was not published before: AWS refuses its tokens "
                "(InvalidIdentityToken) until it has fetched the new JWKS; publish a key "
                "second first, wait, then switch",
                signing,
                extra={"signing_kid": signing},
            )
        logger.info(
            "signing keys replaced: %s signs, %s published",
            minter.keys[0].kid,
            ", ".join(k.kid for k in minter.keys),
            extra={"signing_kid": minter.keys[0].kid, "kids": [k.kid for k in minter.keys]},
        )

    def reload_signing_keys(self) -> bool:
        """Read the key source (``signing_keys`` given as a callable) now; True if the ring
        changed and was replaced.

        The broker calls this every ``signing_keys_interval`` seconds on a thread of its own.
        A source that raises, or returns a ring the broker refuses, is logged (WARNING) and
        the current ring kept. RuntimeError without a key source.
        """
        source = self._key_source
        if source is None:
            raise RuntimeError("no key source: signing_keys was given as a sequence")
        current = self._minter.keys
        try:
            ring = tuple(source())
        except Exception as error:
            logger.warning(
                "signing key source raised %s; keeping the current keys (%s signs)",
                _source_error(error),
                current[0].kid,
            )
            return False
        try:
            # Validated first: a ring of anything but SigningKeys is refused, not compared.
            check_ring(ring)
        except ValueError as error:  # stscreds' own validation: says what is wrong, no secret
            logger.warning(
                "signing key source returned a ring that was refused (%s); keeping the "
                "current keys (%s signs)",
                error,
                current[0].kid,
            )
            return False
        if [k.public_jwk() for k in ring] == [k.public_jwk() for k in current]:
            return False
        self.set_signing_keys(ring)
        return True

    def _mint(self, subject: str, claims: Mapping[str, Any] | None) -> str:
        # The ring of the moment the token is signed (on a pool thread, maybe much later than
        # the exchange started), never the one of the moment the exchange was set up.
        return self._minter.mint(subject, claims)

    def _start_key_poller(self) -> KeySourcePoller | None:
        if self._key_source is None or self._closed:
            return None
        return KeySourcePoller(self, "reload_signing_keys", self.signing_keys_interval)

    def jwks(self) -> dict[str, Any]:
        """The JWKS publishing every signing key (serve it at the issuer's jwks_uri)."""
        return self._minter.jwks()

    def openid_configuration(self) -> dict[str, Any]:
        """The issuer's OpenID Connect Discovery document."""
        return self._minter.openid_configuration()

    def identity_key(self, role: Role) -> str:
        """The digest naming the identity ``role`` resolves to under this broker."""
        key = self._keys.get(role._canonical)
        if key is None:
            key = identity_key(
                role,
                issuer=self._minter.issuer,
                audience=self._minter.audience,
                sts_endpoint=self._exchanger.endpoint_url,
                region=self._exchanger.region,
                default_subject=self._default_subject,
            )
            if len(self._keys) >= self._keys_max:
                self._keys.clear()
            self._keys[role._canonical] = key
        return key

    def get_cached(self, role: Role) -> Credentials | None:
        """Cached credentials for ``role`` if usable now, else None; never waits.

        Call it on a running event loop: in the advisory window it starts the one background
        refresh on that loop (outside one, that raises RuntimeError). Use ``peek`` from other
        threads. This is the whole cache-hit path: two dict lookups and a time comparison.
        """
        key = self._keys.get(role._canonical) or self.identity_key(role)
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = self._now()
        if now < entry.refresh_at:
            self.stats.hits += 1
            return entry.credentials
        if now < entry.mandatory_at:
            # Advisory window: one background refresh, everyone keeps the valid credentials.
            self.stats.hits += 1
            if now >= entry.retry_at and key not in self._inflight:
                self.stats.background_refreshes += 1
                self._start(key, role, background=True)
            return entry.credentials
        return None

    def peek(self, role: Role) -> Credentials | None:
        """Cached credentials for ``role`` if no refresh is due yet, else None.

        Safe to call from any thread (plain dict reads; it starts no work), so a WSGI worker
        thread can serve a hit without a hop to the broker's loop.
        """
        entry = self._entries.get(self._keys.get(role._canonical) or self.identity_key(role))
        if entry is not None and self._now() < entry.refresh_at:
            self.stats.hits += 1
            return entry.credentials
        return None

    async def get(self, role: Role) -> Credentials:
        """Credentials for ``role`` with more than the mandatory window (60 s) left, or, when
        a refresh fails, the cached ones while they have more than 5 s left.

        Concurrent callers for one identity share one exchange, and none waits longer than
        ``request_timeout``. Raises CredentialsRejected (STS refused) or STSUnavailable (STS
        down, slow or throttling; the broker closed); ``error.retry_after`` says when a retry
        can succeed.

        Failures are remembered per identity for a short while (``negative_ttl`` for
        rejections, ``transient_negative_ttl`` for STS being unavailable, about 30 s for
        answers that had already expired): callers in that time get the same error without
        a new STS call.
        """
        credentials = self.get_cached(role)
        if credentials is not None:
            return credentials
        return await self.fetch(role)

    async def fetch(self, role: Role) -> Credentials:
        """Wait for the (single, shared) exchange for ``role``; used when the cache missed."""
        if self._closed:
            raise _Closed(_CLOSED, role_arn=role.arn)
        key = self.identity_key(role)
        self.stats.misses += 1
        now = self._now()
        entry = self._entries.get(key)
        if entry is not None:
            if now < entry.mandatory_at:
                # Refreshed since the caller looked (or a WSGI peek saw a refresh due).
                return self.get_cached(role) or entry.credentials
            if now >= entry.serve_until:
                entry = None
            elif now < entry.retry_at:
                # A refresh failed moments ago: serve what is cached while it lasts (static
                # stability) rather than call STS again before the backoff ends.
                return entry.credentials
        if entry is None:
            failure = self._failures.get(key)
            if failure is not None:
                if now < failure.until:
                    self.stats.negative_hits += 1
                    raise failure.error._copy(retry_after=failure.until - now)
                del self._failures[key]
        task = self._inflight.get(key)
        if task is None or task.get_loop() is not asyncio.get_running_loop():
            task = self._start(key, role, background=False)
        else:
            self.stats.joins += 1
        waiting = self._waiting
        waiting[key] = waiting.get(key, 0) + 1
        started = time.perf_counter()
        try:
            # shield: a cancelled caller (client gone) must not cancel the exchange others
            # await; wait_for: no caller waits past request_timeout, whatever holds it up.
            return await asyncio.wait_for(asyncio.shield(task), self.request_timeout)
        except CredentialsUnavailable:
            stable = self._still_servable(key, entry)
            if stable is not None:
                return stable
            raise
        except asyncio.TimeoutError:
            stable = self._still_servable(key, entry)
            if stable is not None:
                return stable
            # One line per exchange that outlived request_timeout, not one per caller.
            if task not in self._timed_out and self._warnings.allow(
                "no credentials within request_timeout", "Timeout", self._now()
            ):
                logger.warning(
                    "no credentials for %s within request_timeout (%gs)",
                    role.arn,
                    self.request_timeout,
                    extra={"role_arn": role.arn, "error_code": "Timeout"},
                )
            self._timed_out.add(task)
            raise _Timeout(
                f"no credentials within {self.request_timeout:g}s", role_arn=role.arn
            ) from None
        finally:
            self.stats.request_wait.observe(time.perf_counter() - started)
            left = waiting.get(key, 1) - 1
            if left > 0:
                waiting[key] = left
            else:
                waiting.pop(key, None)

    def _still_servable(self, key: str, entry: CacheEntry | None) -> Credentials | None:
        # Static stability: the cached credentials while they last, unless they were
        # invalidated (or replaced) while the caller waited.
        if (
            entry is not None
            and self._entries.get(key) is entry
            and self._now() < entry.serve_until
        ):
            return entry.credentials
        return None

    def invalidate(self, role: Role, access_key_id: str | None = None) -> bool:
        """Drop the cached credentials for ``role`` (and remembered errors), so the next get
        exchanges anew for the whole fleet: the dropped access key id is never taken from
        the shared store again.

        With ``access_key_id`` (the key AWS refused), only credentials with that id are
        dropped: a caller holding credentials replaced since is a no-op. True if any were.
        """
        key = self.identity_key(role)
        entry = self._cache.get(key)
        if entry is None:
            if access_key_id is not None:
                self._rejected[key] = access_key_id
            self._failures.pop(key, None)
            return False
        if access_key_id is not None and entry.credentials.access_key_id != access_key_id:
            return False
        self._rejected[key] = entry.credentials.access_key_id
        del self._cache[key]
        self._failures.pop(key, None)
        return True

    def _after_fork(self) -> None:
        # The parent's in-flight tasks belong to a loop that never runs in this process;
        # cached credentials stay, they are valid in any process.
        self._inflight.clear()
        self._waiting.clear()
        # Health and log state describe this process's own exchanges.
        self._last_success = None
        self._last_failure = None
        self._failed_since_success = False
        self._recent_failures.clear()
        self._warnings = _WarningSummary()
        self._timed_out = weakref.WeakSet()
        self._exchanger.reset_after_fork()
        # The parent's poller thread does not exist here.
        self._key_poller = self._start_key_poller()
        self.sts_clock.after_fork()
        if self._exchanger.budget is not None:
            self._exchanger.budget.after_fork()
        if self._shared is not None:
            self._shared.reset_after_fork()

    def _start(self, key: str, role: Role, *, background: bool) -> asyncio.Task[Credentials]:
        task = asyncio.get_running_loop().create_task(self._refresh(key, role, background))
        self._inflight[key] = task
        task.add_done_callback(partial(self._finished, key))
        return task

    def _finished(self, key: str, task: asyncio.Task[Credentials]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            # Marks a background refresh's error as seen; it was handled in _refresh.
            task.exception()

    async def _refresh(self, key: str, role: Role, background: bool) -> Credentials:
        entry = self._cache.get(key)
        failure: CredentialsUnavailable | None = None
        try:
            if self._closed:
                raise _Closed(_CLOSED, role_arn=role.arn)
            exchange = partial(self._exchange, key, role, background)
            if self._shared is None:
                credentials, lifetime = await exchange()
            else:
                credentials, lifetime = await self._shared.obtain(
                    key,
                    exchange,
                    newer_than=None if entry is None else entry.credentials.expiration.timestamp(),
                    rejected=self._rejected.get(key),
                )
        except CredentialsUnavailable as error:
            self._record_failure(key, role, error)
            failure = error._copy()
        except asyncio.CancelledError:
            # close() cancels the pool's queued calls: that is the broker closing, not this
            # task being cancelled (aclose() cancels the tasks themselves, before the pool).
            if not self._exchanger.closed or _cancelling():
                raise
            failure = _Closed(_CLOSED, role_arn=role.arn)
            self._record_failure(key, role, failure)
        except Exception as exc:
            # A bug, or the pool shut down under us: the same error (and retry backoff) as
            # any failed exchange, never a raw exception for the middleware to turn into a 500.
            if self._closed:
                converted: CredentialsUnavailable = _Closed(_CLOSED, role_arn=role.arn)
            else:
                converted = classify_error(exc, role.arn)
                logger.error(
                    "unexpected %s in the exchange for %s",
                    type(exc).__name__,
                    role.arn,
                    extra={"role_arn": role.arn},
                )
            self._record_failure(key, role, converted)
            failure = converted
        if failure is not None:
            # A copy raised out here, not the original: its traceback (and the chained
            # context) would reach the app with the exchange's frames, whose locals hold the
            # web identity token.
            raise failure
        if credentials.access_key_id == self._rejected.get(key):
            # Read from the store before an invalidate() of these very credentials landed.
            raise STSUnavailable(
                "credentials were invalidated while being fetched", role_arn=role.arn
            )
        self._check_offset()
        now = self._now()
        # Planned on STS's clock: what is left of the credentials there, from here on.
        remaining = self.sts_clock.left(credentials.expiration.timestamp())
        self._cache[key] = plan_entry(
            credentials, now, remaining=remaining, lifetime=lifetime, advisory=self._advisory
        )
        self._failures.pop(key, None)
        return credentials

    async def _exchange(self, key: str, role: Role, background: bool) -> tuple[Credentials, float]:
        """One exchange at STS: the credentials and their granted lifetime (seconds left at
        receipt, on STS's clock)."""
        subject, session_name = role.effective_names(self.default_subject)
        request = ExchangeRequest(
            role_arn=role.arn,
            session_name=session_name,
            duration_seconds=role.duration_seconds,
            policy=role.policy,
        )
        self.stats.exchanges += 1
        trigger = "background" if background else "request"
        outcome = ExchangeOutcome()
        error: BaseException | None = None
        started = time.perf_counter()
        with self._tracing.span(
            _EXCHANGE_SPAN,
            {
                "rpc.system": "aws-api",
                "rpc.service": "STS",
                "rpc.method": "AssumeRoleWithWebIdentity",
                "cloud.region": self._exchanger.region,
                "server.address": self._exchanger.host,
                "aws.sts.role_arn": role.arn,
                "stscreds.identity": key[:12],
                "stscreds.trigger": trigger,
            },
        ) as span:
            try:
                credentials = await self._exchanger.exchange(
                    request,
                    partial(self._mint, subject, role.claims),
                    background=background,
                    outcome=outcome,
                )
                self._check_offset()
                remaining = credentials.expiration.timestamp() - self.sts_clock.now()
                if remaining <= MANDATORY_WINDOW:
                    # Already (nearly) expired on arrival: a failed refresh, not credentials
                    # to plan.
                    raise _ShortGrant(
                        f"STS answered with credentials that had {remaining:.0f}s left (60 s "
                        "or less): check the clocks and the role's maximum session duration",
                        role_arn=role.arn,
                    )
            except BaseException as exc:
                error = exc
                raise
            finally:
                label = self._exchange_done(
                    key, role, trigger, error, time.perf_counter() - started, outcome.attempts
                )
                span.set_attribute("stscreds.attempts", outcome.attempts)
                if error is not None:
                    span.fail(label, _describe(error))
        # STS's Expiration has one-second resolution: the granted lifetime (which sizes the
        # advisory window) is what is left, rounded up.
        return credentials, float(math.ceil(remaining))

    def _exchange_done(
        self,
        key: str,
        role: Role,
        trigger: str,
        error: BaseException | None,
        duration: float,
        attempts: int,
    ) -> str:
        """Count, remember and log one finished exchange; returns its code label."""
        if error is None or isinstance(error, CredentialsUnavailable):
            outcome, code = outcome_label(error), error_label(error)
        elif isinstance(error, asyncio.CancelledError):
            outcome, code = "unavailable", "Cancelled"
        else:
            outcome, code = "unavailable", "Error"
        stats = self.stats
        counts = stats.exchange_counts
        counts[trigger, outcome, code] = counts.get((trigger, outcome, code), 0) + 1
        stats.roles.add(role.arn, outcome, code)
        stats.exchange_duration.observe(duration)
        wall = self._now()
        if error is None:
            self._last_success = wall
            self._failed_since_success = False
            self._recent_failures.clear()
        else:
            self._failed_since_success = True
            self._last_failure = {
                "at": wall,
                "role_arn": role.arn,
                "outcome": outcome,
                "code": code,
                "message": _describe(error),
            }
            if code in PROCESS_WIDE_FAILURES:
                self._recent_failures.append((wall, _describe(error)))
        logger.info(
            "exchange for %s: %s%s in %.0f ms (%d attempt%s, %d waiting)",
            role.arn,
            outcome,
            "" if error is None else f" ({_describe(error)})",
            duration * 1000,
            attempts,
            "" if attempts == 1 else "s",
            self._waiting.get(key, 0),
            extra={
                "identity": key[:12],
                "role_arn": role.arn,
                "trigger": trigger,
                "outcome": outcome,
                "error_code": code or None,
                "sts_message": None if error is None else _describe(error),
                "duration_ms": round(duration * 1000, 1),
                "attempts": attempts,
                "waiters": self._waiting.get(key, 0),
            },
        )
        return code

    def _check_offset(self) -> None:
        offset = self.sts_clock.offset
        step = offset - self._planned_offset
        if abs(step) > _OFFSET_STEP:
            # The local clock was stepped (or STS's clock is known at last): the cached
            # entries' local times move with it, so expiry stays where STS has it.
            for entry in list(self._entries.values()):
                entry.shift(-step)
        self._planned_offset = offset
        if abs(offset) <= CLOCK_OFFSET_WARNING:
            self._offset_warned = False
        elif not self._offset_warned:
            self._offset_warned = True
            logger.warning(
                "the local clock is %.0fs %s STS's; credentials are planned on STS's "
                "clock, but check NTP on this host",
                abs(offset),
                "behind" if offset > 0 else "ahead of",
            )

    def _record_failure(self, key: str, role: Role, error: CredentialsUnavailable) -> None:
        self.stats.exchange_failures += 1
        now = self._now()
        short = isinstance(error, _ShortGrant)
        code = error_label(error)
        if isinstance(error, CredentialsRejected):
            low, high = self._negative_ttl
        elif short:
            low, high = 0.9 * CLOCK_SKEW_TTL, 1.1 * CLOCK_SKEW_TTL
        else:
            # Throttling, 5xx, timeouts: retried inside the exchange already; remembering the
            # error briefly keeps every arriving request from starting yet another exchange.
            low, high = self._transient_negative_ttl
        previous = self._failures.get(key)
        until = now + random.uniform(low, high)  # noqa: S311 - spreads retries, not a secret
        if error.retry_after is not None:
            # The STS budget knows when a call may go out again.
            until = max(until, now + error.retry_after)
        # A copy: the original's traceback holds the exchange's frames (and their locals).
        self._failures[key] = Failure(error._copy(), until)
        error.retry_after = until - now
        entry = self._cache.get(key)
        if entry is not None and now < entry.serve_until:
            # Static stability: keep serving the cached credentials; no STS call for this
            # identity until the backoff ends (waiting callers go once they run out). A call
            # the budget held back never reached STS: retry when the budget allows.
            entry.failures += 1
            entry.retry_at = (
                until
                if isinstance(error, BudgetRefused)
                else max(until, refresh_backoff(now, self._refresh_backoff))
            )
            if self._warnings.allow("refresh failed, cached credentials served", code, now):
                logger.warning(
                    "refresh failed for %s: %s; serving the cached credentials for up "
                    "to %.0fs more, next try in %.0fs",
                    role.arn,
                    error.message,
                    entry.serve_until - now,
                    entry.retry_at - now,
                    extra={"role_arn": role.arn, "error_code": code},
                )
            return
        # One line per identity per remembered period, however many callers it fails.
        if (
            previous is not None
            and now < previous.until
            and previous.error.message == error.message
        ):
            return
        if short:
            logger.error(
                "%s (%s); not asking STS for this identity again for %.0fs",
                error.message,
                role.arn,
                until - now,
                extra={"role_arn": role.arn, "error_code": code},
            )
        elif self._warnings.allow("no credentials", code, now):
            logger.warning(
                "no credentials for %s: %s",
                role.arn,
                error.message,
                extra={"role_arn": role.arn, "error_code": code},
            )

    def metrics(self) -> dict[str, Any]:
        """A snapshot of every metric, as plain data keyed by stable names.

        Keys are the Prometheus names without the ``stscreds_`` prefix (see
        ``stscreds.METRICS`` and docs/operations.md): counters and gauges without labels are
        numbers, labelled ones lists of ``{label: value, ..., "value": n}``, histograms
        ``{"buckets": [[le, cumulative], ...], "sum": s, "count": n}``. Cheap enough to call
        on every scrape, from any thread: it copies, never locks the hot path.
        """
        stats = self.stats
        now = self._now()
        entries, mandatory = self._servable(now)
        budget = self._exchanger.budget
        soonest = min((entry.expires_at for entry in entries), default=math.inf) - now
        snapshot: dict[str, Any] = {
            "l1_hits_total": stats.hits,
            "misses_total": stats.misses,
            "singleflight_joins_total": stats.joins,
            "background_refreshes_total": stats.background_refreshes,
            "negative_cache_hits_total": stats.negative_hits,
            "exchanges_total": [
                {"trigger": trigger, "outcome": outcome, "code": code, "value": value}
                for (trigger, outcome, code), value in sorted(stats.exchange_counts.items())
            ],
            "sts_calls_total": [
                {"operation": operation, "value": value}
                for operation, value in sorted(self._exchanger.calls.items())
            ],
            "sts_throttled_total": 0 if budget is None else budget.throttled_count,
            "sts_budget_refusals_total": 0 if budget is None else budget.refused,
            "cached_identities": len(entries),
            "inflight_exchanges": len(self._inflight),
            "mandatory_window_identities": mandatory,
            "soonest_expiry_seconds": max(0.0, soonest),
            "clock_offset_seconds": self.sts_clock.offset if self.sts_clock.known else 0.0,
            "sts_budget_limited": int(budget is not None and budget.limited),
            "exchange_duration_seconds": stats.exchange_duration.snapshot(),
            "request_wait_seconds": stats.request_wait.snapshot(),
            "role_exchanges_total": [
                {"role_arn": arn, "outcome": outcome, "code": code, "value": value}
                for (arn, outcome, code), value in sorted(stats.roles.items())
            ],
        }
        if self._shared is None:
            for name in _STORE_METRICS:
                snapshot[name] = []
        else:
            snapshot.update(self._shared.metrics())
        return snapshot

    def _servable(self, now: float) -> tuple[list[CacheEntry], int]:
        """The cache entries that can still be served, and how many are in the mandatory
        window. Entries past serve_until stay until evicted or refreshed, but nothing can be
        served from them: an idle tenant's expired credentials are not "cached". (A copy in
        one C call: safe from a scrape thread.)"""
        entries = [e for e in list(self._entries.values()) if now < e.serve_until]
        return entries, sum(1 for e in entries if now >= e.mandatory_at)

    def health(self) -> dict[str, Any]:
        """What a readiness probe needs: ``status`` is "ok", "degraded" (working, with a
        reason to look: store down, clock off, refreshes failing) or "unavailable" (closed,
        or the last 3 exchanges within a minute failed for a reason no role can escape - the
        issuer, the clock, the network - with no success since). ``reasons`` says why.
        """
        now = now_wall = self._now()
        entries, mandatory = self._servable(now)
        reasons: list[str] = []
        status = "ok"
        store: dict[str, Any] | None = None
        if self._shared is not None:
            store = {"kind": self._shared.kind, "breaker_open": self._shared.breaker_open}
            if self._shared.breaker_open:
                reasons.append("shared store unavailable: using STS directly")
        offset = self.sts_clock.offset if self.sts_clock.known else 0.0
        if abs(offset) > CLOCK_OFFSET_WARNING:
            reasons.append(f"local clock is {offset:+.0f}s off STS's: check NTP")
        failure = self._last_failure
        if failure is not None and self._failed_since_success:
            reasons.append(f"last exchange failed: {failure['code']}")
        if reasons:
            status = "degraded"
        # tuple(): one C-level copy, safe while the loop thread appends (a WSGI probe thread).
        recent = [
            (at, message)
            for at, message in tuple(self._recent_failures)
            if now_wall - at <= HEALTH_WINDOW
        ]
        if len(recent) >= HEALTH_FAILURES:
            status = "unavailable"
            reasons.insert(0, f"the last {len(recent)} exchanges failed: {recent[-1][1]}")
        if self._closed:
            status = "unavailable"
            reasons.insert(0, _CLOSED)
        return {
            "status": status,
            "reasons": reasons,
            "last_success_at": self._last_success,
            "seconds_since_success": (
                None if self._last_success is None else max(0.0, now_wall - self._last_success)
            ),
            "last_failure": None if failure is None else dict(failure),
            "clock": {"known": self.sts_clock.known, "offset_seconds": offset},
            "store": store,
            "cached_identities": len(entries),
            "mandatory_window_identities": mandatory,
            "inflight_exchanges": len(self._inflight),
        }

    async def aclose(self) -> None:
        """Cancel in-flight exchanges and release the STS client and its threads.

        Later cache misses raise STSUnavailable ("credential broker is closed").
        """
        self._closed = True
        if self._key_poller is not None:
            self._key_poller.stop()
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._exchanger.close()
        if self._shared is not None:
            await self._shared.aclose()

    def close(self) -> None:
        """Release the STS client and its threads.

        In-flight exchanges and later cache misses raise STSUnavailable.
        """
        self._closed = True
        if self._key_poller is not None:
            self._key_poller.stop()
        self._exchanger.close()

    async def __aenter__(self) -> CredentialBroker:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return (
            f"CredentialBroker(issuer={self.issuer!r}, sts_endpoint_url={self.sts_endpoint_url!r}, "
            f"cached={len(self._cache)})"
        )


def _source_error(error: BaseException) -> str:
    """What a key source's exception may say in a log: a file error (errno, path) and
    SigningKey.from_pem's own messages, which never quote key material; for anything else
    (its message could hold a key) the type only."""
    name = type(error).__name__
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return f"{name} ({error.strerror}{where})"
    if isinstance(error, ValueError) and str(error).startswith("pem: "):
        return f"{name} ({error})"
    return name


def _describe(error: BaseException) -> str:
    # Our errors' messages are redacted and hold no secret; anything else, its type alone.
    if isinstance(error, CredentialsUnavailable):
        return error.message
    return type(error).__name__


def _cancelling() -> int:
    # Task.cancelling() is Python 3.11+; on 3.10 a closed pool is taken to be the cause.
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return 0 if cancelling is None else cancelling()


def _reset_in_child(ref: weakref.ref[CredentialBroker]) -> None:
    broker = ref()
    if broker is not None:
        broker._after_fork()
