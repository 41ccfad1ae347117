"""Injectable time source, so refresh logic is tested without sleeping."""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["Clock", "SystemClock"]


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
