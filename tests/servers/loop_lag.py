"""A probe of event-loop lag: a task that sleeps 10 ms in a loop and keeps the worst overshoot.

Anything that blocks the loop (a synchronous call, a long callback, a thread holding the GIL
in one C call) delays the probe's wake-up by as much; ``worst`` is the longest such delay seen,
measured with ``time.monotonic``. Use it around a scenario::

    async with LoopLagProbe() as probe:
        ...
    assert probe.worst <= 0.05

Set-up that blocks on purpose (building a client that loads its models, as an app does once at
start-up) can be left out with ``with probe.excluded(): ...``: the sleep it delays is not counted.

With ``exclude_full_gc=True`` a sleep during which CPython's cyclic collector walked its oldest
generation is not counted either (how long such passes took is kept in ``gc_pauses``): they
stop every thread, whatever the code under test does, and when they come is the interpreter's
choice, not the code's.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["LoopLagProbe"]


class LoopLagProbe:
    """Sleeps ``interval`` seconds in a loop on the running event loop; records overshoots."""

    def __init__(self, interval: float = 0.01, *, exclude_full_gc: bool = False) -> None:
        self.interval = interval
        self.exclude_full_gc = exclude_full_gc
        #: Durations (seconds) of full collections seen while probing (exclude_full_gc only).
        self.gc_pauses: list[float] = []
        self._gc_started = 0.0
        #: Longest overshoot of a sleep past ``interval`` (seconds).
        self.worst = 0.0
        #: Sleeps measured (the last, interrupted one included).
        self.samples = 0
        #: Sleeps left uncounted because an ``excluded()`` block ran during them.
        self.excluded_samples = 0
        self._task: asyncio.Task[None] | None = None
        self._sleeping_since: float | None = None
        self._exclusions = 0
        self._generation = 0

    async def __aenter__(self) -> LoopLagProbe:
        self.start()
        # Let the probe take its first step before the scenario starts.
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.stop()

    def start(self) -> None:
        """Start probing on the running loop."""
        if self._task is not None:
            raise RuntimeError("probe already started")
        if self.exclude_full_gc:
            gc.callbacks.append(self._on_gc)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag-probe")

    async def stop(self) -> None:
        """Stop probing; a sleep cut short counts too if it already overshot."""
        task, self._task = self._task, None
        if task is None:
            return
        if self.exclude_full_gc:
            gc.callbacks.remove(self._on_gc)
        since = self._sleeping_since
        if since is not None and self._exclusions == self._generation:
            self._record(time.monotonic() - since - self.interval)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        """Leave out the sleep during which this (synchronous) block runs."""
        self._exclusions += 1
        try:
            yield
        finally:
            self._exclusions += 1

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        # Runs on whichever thread triggered the collection; a full one excludes its sleep.
        if info["generation"] != 2:
            return
        self._exclusions += 1
        if phase == "start":
            self._gc_started = time.monotonic()
        else:
            self.gc_pauses.append(time.monotonic() - self._gc_started)

    def _record(self, overshoot: float) -> None:
        self.samples += 1
        if overshoot > self.worst:
            self.worst = overshoot

    async def _run(self) -> None:
        while True:
            self._generation = self._exclusions
            started = self._sleeping_since = time.monotonic()
            await asyncio.sleep(self.interval)
            self._sleeping_since = None
            if self._exclusions == self._generation:
                self._record(time.monotonic() - started - self.interval)
            else:
                self.excluded_samples += 1

    def __repr__(self) -> str:
        return f"LoopLagProbe(worst={self.worst * 1000:.1f} ms, samples={self.samples})"
