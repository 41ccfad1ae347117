"""StsBudget: one gate on every STS call of a process, which tightens when STS throttles.

STS rate quotas are per account; under account-wide throttling, identities retrying each on
their own multiply the load the more identities there are. The budget is a token bucket
that is open (no limit) while STS answers, and starts limiting - first attempts as well as
retries - the moment STS throttles: calls beyond the budget fail at once (with the time a
retry can succeed) instead of adding to the storm. Successes widen the budget again until
it is open. Background refreshes only take a token while the bucket is at least half full,
so they yield to requests that wait.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["StsBudget"]


class StsBudget:
    """A token bucket over STS calls that closes on throttling and reopens on success.

    ``initial_rate``: calls per second allowed after the first throttling answer, with up to
    ``burst`` calls at once; each further throttling answer (at most once a second) halves
    the rate, down to ``min_rate``. Each success adds ``recovery`` calls per second; at
    ``max_rate`` the budget is open again.
    Share one budget between brokers that call STS in one account and region.
    """

    def __init__(
        self,
        *,
        initial_rate: float = 5.0,
        min_rate: float = 0.5,
        max_rate: float = 50.0,
        burst: float = 10.0,
        recovery: float = 0.5,
        clock: Callable[[], float] | None = None,
    ) -> None:
        for name, value in (
            ("initial_rate", initial_rate),
            ("min_rate", min_rate),
            ("max_rate", max_rate),
            ("burst", burst),
            ("recovery", recovery),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"{name}: must be a positive number")
        if not min_rate <= initial_rate <= max_rate:
            raise ValueError("StsBudget: needs min_rate <= initial_rate <= max_rate")
        if clock is None:
            import time

            clock = time.time
        self.initial_rate = float(initial_rate)
        self.min_rate = float(min_rate)
        self.max_rate = float(max_rate)
        self.burst = max(1.0, float(burst))
        self.recovery = float(recovery)
        self._clock = clock
        # Exchanges run on a thread pool and several brokers may share one budget.
        self._lock = threading.Lock()
        #: True while STS has throttled recently and calls are rationed.
        self.limited = False
        #: Calls per second allowed while limited.
        self.rate = self.max_rate
        self._tokens = 0.0
        self._updated = 0.0
        self._decreased = float("-inf")
        #: Calls refused by the budget (never sent to STS).
        self.refused = 0
        #: Throttling answers seen.
        self.throttled_count = 0

    def acquire(self, *, background: bool = False) -> float:
        """Take a token for one STS call: 0.0 if granted, else seconds until one may be.

        A background refresh needs the bucket at least half full, so it yields to requests.
        """
        return self._ask(background, take=True)

    def check(self, *, background: bool = False) -> float:
        """Whether a call could go now, without taking a token: 0.0, or the seconds until one
        may (counted as refused). For work before a call (signing) that a refusal saves."""
        return self._ask(background, take=False)

    def _ask(self, background: bool, take: bool) -> float:
        with self._lock:
            if not self.limited:
                return 0.0
            now = self._clock()
            self._refill(now)
            # A background refresh leaves at least half the bucket for requests.
            need = min(1.0 + self.burst / 2, self.burst) if background else 1.0
            if self._tokens >= need:
                if take:
                    self._tokens -= 1.0
                return 0.0
            self.refused += 1
            return (need - self._tokens) / self.rate

    def throttled(self) -> None:
        """STS answered with throttling: start or tighten the limit."""
        with self._lock:
            now = self._clock()
            self.throttled_count += 1
            if not self.limited:
                self.limited = True
                self.rate = self.initial_rate
                # A burst's worth to start with: a few retries still go out, a storm not.
                self._tokens = self.burst
                self._updated = now
                self._decreased = now
            elif now - self._decreased >= 1.0:
                # Answers to calls already in flight arrive together: halve once a second.
                self._refill(now)
                self.rate = max(self.min_rate, self.rate / 2)
                self._tokens = min(self._tokens, 0.0)
                self._decreased = now

    def succeeded(self) -> None:
        """STS answered: widen the limit; open the budget once it reaches ``max_rate``."""
        if not self.limited:
            return
        with self._lock:
            if not self.limited:
                return
            self._refill(self._clock())
            self.rate += self.recovery
            if self.rate >= self.max_rate:
                self.limited = False
                self.rate = self.max_rate

    def after_fork(self) -> None:
        """In a forked child: a new lock (a parent's thread may have held the old one)."""
        self._lock = threading.Lock()

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self._updated)
        self._updated = now
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate)

    def __repr__(self) -> str:
        state = f"limited to {self.rate:g}/s" if self.limited else "open"
        return f"StsBudget({state}, refused={self.refused})"
