"""The shared tier between the L1 cache and STS: a CredentialStore used with a lease.

One worker per identity exchanges at STS and puts the sealed result; the others wait for it.
Any store failure (error, timeout, garbage) makes the tier step aside: the broker goes to
STS directly, a circuit breaker keeps a dead store from adding its timeout to every request,
and the outage is logged once, not once per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import secrets
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime, timezone
from typing import Any, TypeVar

from ._cache import MANDATORY_WINDOW
from ._clock import StsClock
from ._credentials import Credentials
from ._errors import CredentialsRejected, CredentialsUnavailable, STSUnavailable
from ._telemetry import Tracing
from .stores import CredentialStore

__all__ = ["SharedTier", "StoreStats"]

logger = logging.getLogger("stscreds")

T = TypeVar("T")
# The first operations on a store also open its connections, at a cold start, which is when
# a burst of requests arrives and the loop lags: they get this long at least. Only once, so a
# store that hangs from the start costs one such wait per process, then the breaker opens.
_FIRST_CONTACT_TIMEOUT = 1.0
# How long (seconds, random in range) the fleet remembers a failed exchange: (transient,
# rejected). Short: it only has to stop the waiters from repeating the failure one by one.
_FAILURE_TTL = {False: (0.5, 2.0), True: (1.0, 5.0)}
# Credentials read from the store need this much more than the mandatory window left, so a
# value is not handed out only to enter the mandatory window a moment later.
_READ_MARGIN = 5.0
# A failure marker is honoured only this close to its write time (plus its TTL), on STS's
# clock: hosts' estimates of that clock differ by about a second.
_MARKER_SKEW = 2.0


class _Failed:
    """Marks a store call that failed, timed out or was skipped by the open breaker."""


class _Skipped(_Failed):
    """Marks a store call the open breaker skipped: the store never saw it."""


_FAILED = _Failed()
_SKIPPED = _Skipped()


class StoreStats:
    """Raw counters of the shared tier (``broker.metrics()`` is the documented view)."""

    __slots__ = ("errors", "hits", "leases", "operations", "outages", "rejected", "waits")

    def __init__(self) -> None:
        self.hits = 0  # credentials taken from the store
        self.leases = 0  # leases won (this worker exchanged for the fleet)
        self.waits = 0  # waits for another worker's exchange
        self.errors = 0  # failed or timed-out store operations
        self.outages = 0  # times the breaker opened after the store had been healthy
        self.rejected = 0  # values that failed to open or parse (tampered, foreign, garbage)
        #: (operation, outcome) -> store calls; outcome: ok, error, timeout, skipped.
        self.operations: dict[tuple[str, str], int] = {}

    def as_dict(self) -> dict[str, int]:
        """The plain counters as a dict."""
        return {name: getattr(self, name) for name in self.__slots__ if name != "operations"}

    def __repr__(self) -> str:
        return f"StoreStats({self.as_dict()})"


class SharedTier:
    """Reads, leases and writes credentials in a CredentialStore, failing open."""

    def __init__(
        self,
        store: CredentialStore,
        *,
        sts_clock: StsClock,
        op_timeout: float = 0.25,
        lease_ttl: float = 15.0,
        breaker_cooldown: float = 5.0,
        lease_wait: float = 10.0,
        wait_slice: float = 0.5,
        learn_clock: Callable[[], Awaitable[object]] | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        if not isinstance(store, CredentialStore):
            raise TypeError("store: must implement stscreds.stores.CredentialStore")
        for name, value in (
            ("store_timeout", op_timeout),
            ("lease_ttl", lease_ttl),
            ("store_cooldown", breaker_cooldown),
        ):
            if not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"{name}: must be a positive number of seconds")
        self.store = store
        self._sts_clock = sts_clock
        #: Longest a cold miss waits for another worker's exchange before calling STS itself:
        #: what a squatted lease can cost a request.
        self.lease_wait = max(0.0, float(lease_wait))
        # Asks STS for its clock (one cheap call) before a worker that has not heard STS yet
        # judges a value's expiry: an offset measured on another host means nothing here.
        self._learn_clock = learn_clock
        self._clock_probe: asyncio.Future[object] | None = None
        self._next_probe = 0.0
        self.op_timeout = float(op_timeout)
        self.lease_ttl = float(lease_ttl)
        self.breaker_cooldown = float(breaker_cooldown)
        self.wait_slice = wait_slice
        self._open_until = 0.0
        self._outage = False
        self._probing = False
        self._contacted = False
        self._background: set[asyncio.Task[Any]] = set()
        self.stats = StoreStats()
        #: The store's label in metrics and spans: "redis", "sqlite", "memory" or the class.
        self.kind = store_kind(store)
        self._tracing = tracing if tracing is not None else Tracing()

    @property
    def breaker_open(self) -> bool:
        """True from a failed store call until one succeeds again (the store is skipped)."""
        return self._outage

    def metrics(self) -> dict[str, list[dict[str, Any]]]:
        """The tier's part of ``broker.metrics()``."""
        stats = self.stats

        def one(value: int) -> list[dict[str, Any]]:
            return [{"store": self.kind, "value": value}]

        return {
            "store_hits_total": one(stats.hits),
            "store_leases_total": one(stats.leases),
            "store_waits_total": one(stats.waits),
            "store_rejected_values_total": one(stats.rejected),
            "store_operations_total": [
                {"store": self.kind, "operation": op, "outcome": outcome, "value": value}
                for (op, outcome), value in sorted(stats.operations.items())
            ],
            "store_breaker_openings_total": one(stats.outages),
            "store_breaker_open": one(int(self._outage)),
        }

    async def obtain(
        self,
        key: str,
        exchange: Callable[[], Awaitable[tuple[Credentials, float]]],
        *,
        newer_than: float | None,
        rejected: str | None = None,
    ) -> tuple[Credentials, float]:
        """Credentials for ``key`` from the store, or from ``exchange`` under the lease.

        ``exchange`` returns credentials and their granted lifetime. ``newer_than``: only
        credentials expiring after this POSIX time (STS clock) will do (a refresh).
        ``rejected``: an access key id AWS refused; a value holding it is passed over.
        Returns the credentials and their whole granted lifetime in seconds.
        """
        loop = asyncio.get_running_loop()
        names = _Names(self.store.cipher.store_key(key), self.store.cipher.store_key(f"f|{key}"))
        give_up_at = loop.time() + self.lease_wait
        owner = secrets.token_hex(16)
        waited_for: str | None = None
        while True:
            found = await self._read(key, names.value, newer_than, rejected)
            if found is not None:
                return found
            if waited_for is not None:
                # The holder we waited for may have failed: its error, not our own STS call.
                await self._raise_remembered_failure(key, names.failure, waited_for)
            won = await self._call(self.store.acquire, names.value, owner, self.lease_ttl)
            if isinstance(won, _Failed):
                if not isinstance(won, _Skipped):
                    # The store may have granted it after our timeout: give it back, or the
                    # fleet waits out a lease nobody holds.
                    self._detach(self._call(self.store.release, names.value, owner, force=True))
                break
            if won:
                return await self._exchange_under_lease(
                    key, names, owner, exchange, newer_than, rejected
                )
            remaining = give_up_at - loop.time()
            if remaining <= 0:
                logger.warning(
                    "gave up waiting %.1fs for another worker's exchange; calling STS",
                    self.lease_wait,
                )
                break
            # Who we wait for: only that holder's failure marker is believed.
            holder = await self._call(self.store.holder, names.value)
            waited_for = holder if isinstance(holder, str) else None
            self.stats.waits += 1
            slice_ = min(remaining, self.wait_slice)
            if isinstance(
                await self._call(self.store.wait, names.value, slice_, timeout=slice_ + 1),
                _Failed,
            ):
                break
        credentials, lifetime = await exchange()
        await self._write(key, names.value, credentials, lifetime)
        return credentials, lifetime

    async def _exchange_under_lease(
        self,
        key: str,
        names: _Names,
        owner: str,
        exchange: Callable[[], Awaitable[tuple[Credentials, float]]],
        newer_than: float | None,
        rejected: str | None,
    ) -> tuple[Credentials, float]:
        self.stats.leases += 1
        # Extends the lease while this worker exchanges, so a slow exchange (throttling,
        # retries) keeps it; a dead worker stops extending and its lease runs out.
        keeper = asyncio.get_running_loop().create_task(self._keep_lease(names.value, owner))
        try:
            # Someone may have put between our read and our lease.
            found = await self._read(key, names.value, newer_than, rejected)
            if found is None:
                found = await exchange()
                await self._write(key, names.value, *found, force=True, announce=False)
        except BaseException as error:
            await _stop(keeper)
            if isinstance(error, CredentialsUnavailable):
                await self._remember_failure(key, names.failure, owner, error)
            # Release before waking the waiters, so the one that wakes first can take the
            # lease at once instead of waiting out its slice. Forced: an open breaker must
            # not leave the fleet waiting for a lease nobody holds.
            await self._call(self.store.release, names.value, owner, force=True)
            await self._call(self.store.notify, names.value, force=True)
            raise
        await _stop(keeper)
        # Released before the waiters wake: one that cannot use the value (or finds none)
        # takes the free lease at once instead of sleeping out a wait slice.
        await self._call(self.store.release, names.value, owner, force=True)
        await self._call(self.store.notify, names.value, force=True)
        return found

    async def _remember_failure(
        self, key: str, name: str, owner: str, error: CredentialsUnavailable
    ) -> None:
        # The waiters read this instead of each repeating the failed exchange in turn. It
        # names its writer and its time, so a copy replayed later, or under a lease someone
        # else holds, is not believed.
        low, high = _FAILURE_TTL[isinstance(error, CredentialsRejected)]
        ttl = random.uniform(low, high)  # noqa: S311 - spreads retries, not a secret
        known = self._sts_clock.known
        marker = json.dumps(
            {
                "k": key,
                "r": isinstance(error, CredentialsRejected),
                "c": error.code,
                "m": error.message,
                "h": owner,
                # Written on STS's clock when this worker knows it ("o" its offset), else on
                # the local clock: the reader judges the age on the same footing.
                "w": self._sts_clock.local.time() + (known and self._sts_clock.offset),
                "o": self._sts_clock.offset if known else None,
                "ttl": ttl,
            }
        ).encode()
        value = self.store.cipher.seal(name, marker)
        await self._call(self.store.put, name, value, ttl, force=True)

    async def _raise_remembered_failure(self, key: str, name: str, holder: str) -> None:
        value = await self._call(self.store.get, name)
        if not isinstance(value, bytes):
            return
        plaintext = self.store.cipher.open(name, value)
        if plaintext is None:
            return
        try:
            data = json.loads(plaintext)
            if data["k"] != key or data["h"] != holder:
                return
            offset = data.get("o")
            if offset is not None and self._sts_clock.known:
                age = self._sts_clock.now() - float(data["w"])
            else:
                # One side has not heard STS: both judge on their local clocks (a fleet's
                # hosts keep theirs close), the writer's being its STS time less its offset.
                written = float(data["w"]) - (0.0 if offset is None else float(offset))
                age = self._sts_clock.local.time() - written
            if not -_MARKER_SKEW <= age <= float(data["ttl"]) + _MARKER_SKEW:
                return
            kind = CredentialsRejected if data["r"] else STSUnavailable
            error = kind(
                str(data["m"]),
                code=data["c"] if isinstance(data["c"], str) else None,
                retry_after=max(0.0, float(data["ttl"]) - age),
            )
        except (ValueError, KeyError, TypeError):
            return
        raise error

    def _detach(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _keep_lease(self, key: str, owner: str) -> None:
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            if await self._call(self.store.extend, key, owner, self.lease_ttl) is not True:
                return

    async def _read(
        self, key: str, name: str, newer_than: float | None, rejected: str | None
    ) -> tuple[Credentials, float] | None:
        value = await self._call(self.store.get, name)
        if value is None or isinstance(value, _Failed):
            return None
        found = self._decode(key, name, value)
        if found is None:
            self.stats.rejected += 1
            return None
        credentials, lifetime = found
        if rejected is not None and credentials.access_key_id == rejected:
            return None
        if not self._sts_clock.known:
            await self._probe_clock()
        expires_at = credentials.expiration.timestamp()
        # The embedded absolute expiry decides, on STS's clock, not the store's TTL. The
        # margin shrinks for short grants, or a 65 s grant would never be shared.
        margin = min(_READ_MARGIN, max(0.0, lifetime - MANDATORY_WINDOW) / 2)
        if self._sts_clock.left(expires_at) <= MANDATORY_WINDOW + margin:
            return None
        if newer_than is not None and expires_at <= newer_than:
            return None
        self.stats.hits += 1
        return credentials, lifetime

    async def _probe_clock(self) -> None:
        """Learn STS's clock once (shared by concurrent readers; retried a minute later if
        STS did not tell); until then the local clock stands in for it."""
        if self._learn_clock is None:
            return
        loop = asyncio.get_running_loop()
        probe = self._clock_probe
        if probe is None or probe.done():
            if loop.time() < self._next_probe:
                return
            self._next_probe = loop.time() + 60.0
            probe = self._clock_probe = asyncio.ensure_future(self._learn_clock())
        with contextlib.suppress(Exception):
            await asyncio.shield(probe)

    async def _write(
        self,
        key: str,
        name: str,
        credentials: Credentials,
        lifetime: float,
        *,
        force: bool = False,
        announce: bool = True,
    ) -> bool:
        """Put (and with ``announce``, notify) the credentials; False if the put failed."""
        ttl = self._sts_clock.left(credentials.expiration.timestamp()) - MANDATORY_WINDOW
        if ttl <= 0:
            return False
        value = self.store.cipher.seal(name, _encode(key, credentials, lifetime))
        if isinstance(await self._call(self.store.put, name, value, ttl, force=force), _Failed):
            return False
        if announce:
            await self._call(self.store.notify, name, force=force)
        return True

    def _decode(self, key: str, name: str, value: Any) -> tuple[Credentials, float] | None:
        if not isinstance(value, bytes):
            return None
        plaintext = self.store.cipher.open(name, value)
        if plaintext is None:
            return None
        try:
            data = json.loads(plaintext)
            if data["k"] != key:
                return None
            credentials = Credentials(
                access_key_id=data["a"],
                secret_access_key=data["s"],
                session_token=data["t"],
                expiration=datetime.fromtimestamp(float(data["e"]), timezone.utc),
            )
            lifetime = float(data["l"])
        except (ValueError, KeyError, TypeError, OverflowError):
            return None
        if not all(
            isinstance(v, str) and v
            for v in (
                credentials.access_key_id,
                credentials.secret_access_key,
                credentials.session_token,
            )
        ):
            return None
        return credentials, lifetime

    async def _call(
        self,
        method: Callable[..., Awaitable[T]],
        *args: Any,
        timeout: float | None = None,
        force: bool = False,
    ) -> T | _Failed:
        """Run one store operation with a timeout; ``_FAILED`` on any error.

        While the breaker is open calls are skipped, except ``force``d ones (releasing a lease,
        waking waiters, sharing fresh credentials: cheap, and costly to leave undone). When it
        half-opens, one call probes the store while the others keep skipping it.
        """
        loop = asyncio.get_running_loop()
        if not force:
            if loop.time() < self._open_until or self._probing:
                self._count(getattr(method, "__name__", "call"), "skipped")
                return _SKIPPED
            if self._outage:
                self._probing = True
                try:
                    return await self._call(method, *args, timeout=timeout, force=True)
                finally:
                    self._probing = False
        if timeout is None:
            timeout = (
                self.op_timeout if self._contacted else max(self.op_timeout, _FIRST_CONTACT_TIMEOUT)
            )
        operation = getattr(method, "__name__", "call")
        with self._tracing.span(
            f"stscreds.store {operation}",
            {"db.system.name": self.kind, "db.operation.name": operation},
        ) as span:
            try:
                result = await asyncio.wait_for(method(*args), timeout)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # any store failure means: go on without it
                self._contacted = True
                outcome = "timeout" if isinstance(error, asyncio.TimeoutError) else "error"
                self._count(operation, outcome)
                span.fail(outcome if outcome == "timeout" else type(error).__name__, outcome)
                self._trip(loop, error)
                return _FAILED
        self._contacted = True
        self._count(operation, "ok")
        if self._outage:
            self._outage = False
            logger.warning("shared store is back", extra={"store": self.kind})
        return result

    def _count(self, operation: str, outcome: str) -> None:
        operations = self.stats.operations
        operations[operation, outcome] = operations.get((operation, outcome), 0) + 1

    def reset_after_fork(self) -> None:
        """In a forked child: let the store drop connections tied to the parent's loop."""
        self._open_until = 0.0
        self._outage = False
        self._probing = False
        self._contacted = False
        self._background = set()
        reset = getattr(self.store, "reset_after_fork", None)
        if callable(reset):
            reset()

    def _trip(self, loop: asyncio.AbstractEventLoop, error: Exception) -> None:
        self.stats.errors += 1
        self._open_until = loop.time() + self.breaker_cooldown
        if not self._outage:
            self._outage = True
            self.stats.outages += 1
            # The type only: a backend's message may quote a value or a password.
            logger.warning(
                "shared store unavailable (%s); using STS directly, retrying the store in %.0fs",
                type(error).__name__,
                self.breaker_cooldown,
                extra={"store": self.kind},
            )

    async def aclose(self) -> None:
        """Close the store; a store that fails to close is logged, never raised (shutdown)."""
        try:
            await asyncio.wait_for(self.store.aclose(), self.op_timeout * 4)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the protocol allows any error; shutdown must go on
            logger.warning(
                "closing the shared store failed (%s)",
                type(error).__name__,
                extra={"store": self.kind},
            )


def store_kind(store: CredentialStore) -> str:
    """A short label for a store: its class name, lower-cased, without "Store"."""
    name = type(store).__name__
    if name.endswith("Store") and len(name) > len("Store"):
        name = name[: -len("Store")]
    return name.lower()


class _Names:
    """The store keys of one identity: its value (and lease) and its failure marker."""

    __slots__ = ("failure", "value")

    def __init__(self, value: str, failure: str) -> None:
        self.value = value
        self.failure = failure


async def _stop(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _encode(key: str, credentials: Credentials, lifetime: float) -> bytes:
    return json.dumps(
        {
            "k": key,
            "a": credentials.access_key_id,
            "s": credentials.secret_access_key,
            "t": credentials.session_token,
            "e": credentials.expiration.timestamp(),
            "l": lifetime,
        },
        separators=(",", ":"),
    ).encode()
