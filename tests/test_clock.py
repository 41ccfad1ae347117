"""SystemClock and StsClock: STS's time learned from its Date headers."""

from __future__ import annotations

import threading
import time

from servers.clock import FakeClock
from stscreds._clock import StsClock, SystemClock


def test_system_clock_is_the_wall_clock() -> None:
    before = time.time()
    assert before <= SystemClock().time() <= time.time()


def test_unknown_until_the_first_sample() -> None:
    clock = StsClock(FakeClock(1000.0))
    assert not clock.known and clock.offset == 0 and clock.now() == 1000.0


def test_a_sample_is_the_middle_of_the_second_and_of_the_round_trip() -> None:
    local = FakeClock(1000.0)
    clock = StsClock(local)
    # Sent at 1000, answered at 1002; STS stamped "1300" (somewhere in 1300.0-1300.999).
    assert clock.observe(1300.0, 1000.0, 1002.0) == 1300.5 - 1001.0
    assert clock.known
    assert clock.now() == 1000.0 + 299.5
    # Half a second either way for the Date's resolution, one more for the round trip: expiry
    # is judged that much early.
    assert clock.margin == 1.5
    assert clock.left(1000.0 + 299.5 + 10) == 10 - 1.5


def test_the_median_of_the_last_samples_ignores_a_slow_answer() -> None:
    clock = StsClock(FakeClock(0.0))
    for offset in (100.0, 101.0, 100.0, 99.0):
        clock.observe(offset - 0.5, 0.0, 0.0)
    # Sent at 0, answered 20 s later, stamped by STS at local 19 (STS time 119): its middle
    # is 9.5 s off, within its own uncertainty, so it is an outlier, not a step.
    clock.observe(119.0, 0.0, 20.0)
    assert clock.offset == 100.0
    # Only the last SAMPLES count.
    assert len(clock._samples) == StsClock.SAMPLES


def test_a_step_of_the_local_clock_is_followed_at_once() -> None:
    clock = StsClock(FakeClock(0.0))
    for _ in range(5):
        clock.observe(9.5, 0.0, 0.0)
    assert clock.offset == 10.0
    # A quick answer that disagrees by more than both uncertainties is a step (NTP set the
    # local clock): followed at once, not after the median has come round.
    clock.observe(309.5, 0.0, 0.0)
    assert clock.offset == 310.0
    clock.reset()
    assert clock.offset == 0 and not clock.known


def test_observe_from_many_threads() -> None:
    clock = StsClock(FakeClock(0.0))
    threads = [
        threading.Thread(target=lambda: [clock.observe(9.5, 0.0, 0.0) for _ in range(500)])
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert clock.offset == 10.0 and len(clock._samples) == StsClock.SAMPLES


def test_after_fork_keeps_the_offset_with_a_new_lock() -> None:
    clock = StsClock(FakeClock(0.0))
    clock.observe(9.5, 0.0, 0.0)
    old = clock._lock
    old.acquire()  # as if a parent thread held it at the fork
    clock.after_fork()
    assert clock._lock is not old and clock.offset == 10.0 and clock.known
    clock.observe(9.5, 0.0, 0.0)  # does not block
    old.release()
