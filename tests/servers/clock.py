"""A wall clock for tests that only moves when told to."""

from __future__ import annotations


class FakeClock:
    """Wall-clock time that only moves when told to (``time()`` as the broker's ``clock``)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def set(self, now: float) -> None:
        self.now = now


class Skewed:
    """STS's clock for a StrictSTS: a local FakeClock plus ``offset`` seconds."""

    def __init__(self, local: FakeClock, offset: float = 0.0) -> None:
        self.local = local
        self.offset = offset

    def __call__(self) -> float:
        return self.local.time() + self.offset
