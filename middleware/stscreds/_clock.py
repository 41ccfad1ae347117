"""Injectable time source, so refresh logic is tested without sleeping."""

from __future__ import annotations

import threading
import time
from typing import Protocol

__all__ = ["Clock", "StsClock", "SystemClock"]


class Clock(Protocol):
    """A source of wall-clock time in seconds since the epoch (UTC)."""

    def time(self) -> float:
        """Return the current time as a POSIX timestamp."""
        ...


class SystemClock:
    """The real wall clock (``time.time``)."""

    __slots__ = ()

    # The builtin itself, not a method wrapping it: the cache-hit path reads the clock on
    # every request, and a Python-level call costs more than the read.
    time = staticmethod(time.time)


# A sample this far (beyond both uncertainties) from the offset is a clock step.
_STEP = 2.0


class StsClock:
    """STS's clock as seen from here: the local clock plus an offset learned from the HTTP
    ``Date`` headers of STS's answers.

    Expiry is STS's business: credentials are planned on its clock, so a local clock that is
    minutes off neither hands out expired credentials nor refreshes on every call. The offset
    is the median of the last few samples, so one slow or odd answer does not move it.
    """

    __slots__ = ("_lock", "_samples", "known", "local", "margin", "offset")

    #: Samples the median is taken over.
    SAMPLES = 5

    def __init__(self, local: Clock) -> None:
        self.local = local
        #: Seconds STS's clock is ahead of the local one (negative: behind).
        self.offset = 0.0
        #: How far off ``offset`` may be (the Date header's second and the round trip):
        #: expiry is judged this much early, so nothing is served past its floor.
        self.margin = 0.0
        #: True once at least one answer from STS carried a usable Date header.
        self.known = False
        self._samples: list[tuple[float, float]] = []
        # Answers are observed on the exchange threads.
        self._lock = threading.Lock()

    def now(self) -> float:
        """The current time on STS's clock (the local clock until an offset is known)."""
        return self.local.time() + self.offset

    def left(self, expiration: float) -> float:
        """Seconds until the STS-clock time ``expiration``, counted short by ``margin``."""
        return expiration - (self.local.time() + self.offset + self.margin)

    def observe(self, sts_date: float, sent_at: float, received_at: float) -> float:
        """Learn from one answer: ``sts_date`` its Date header, the local send and receipt
        times around the call. Returns the new offset."""
        # Date has one-second resolution and was stamped between send and receipt: the
        # middle of both intervals, give or take half of each.
        sample = sts_date + 0.5 - (sent_at + received_at) / 2
        spread = 0.5 + max(0.0, received_at - sent_at) / 2
        with self._lock:
            if self.known and abs(sample - self.offset) > spread + self.margin + _STEP:
                # Not an outlier but a step (NTP set the local clock): a quick answer that
                # disagrees by more than both uncertainties. Start over from it rather than
                # wait for the median to follow.
                self._samples.clear()
            self._samples.append((sample, spread))
            if len(self._samples) > self.SAMPLES:
                del self._samples[0]
            ordered = sorted(self._samples)
            middle = len(ordered) // 2
            if len(ordered) % 2:
                self.offset, self.margin = ordered[middle]
            else:
                (low, low_spread), (high, high_spread) = ordered[middle - 1], ordered[middle]
                self.offset = (low + high) / 2
                self.margin = max(low_spread, high_spread) + (high - low) / 2
            self.known = True
            return self.offset

    def after_fork(self) -> None:
        """In a forked child: a new lock (a parent's thread may have held the old one); the
        learned offset stays, it is as true here."""
        self._lock = threading.Lock()

    def reset(self) -> None:
        """Forget every sample (and, after a fork, the parent's lock)."""
        self._lock = threading.Lock()
        self._samples.clear()
        self.offset = 0.0
        self.margin = 0.0
        self.known = False

    def __repr__(self) -> str:
        return f"StsClock(offset={self.offset:+.1f}s, known={self.known})"
