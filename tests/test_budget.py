"""StsBudget: the process-wide gate on STS calls (pure: an injected clock, no STS)."""

from __future__ import annotations

import threading

import pytest

from stscreds._budget import StsBudget


class Now:
    def __init__(self) -> None:
        self.value = 0.0

    def __call__(self) -> float:
        return self.value


def test_open_until_sts_throttles() -> None:
    budget = StsBudget(clock=Now())
    assert not budget.limited
    assert all(budget.acquire() == 0.0 for _ in range(10_000))
    assert all(budget.acquire(background=True) == 0.0 for _ in range(100))
    assert budget.refused == 0


def test_first_throttle_allows_one_burst_then_the_rate() -> None:
    now = Now()
    budget = StsBudget(clock=now, initial_rate=5, burst=10)
    budget.throttled()
    assert budget.limited and budget.rate == 5
    assert [budget.acquire() for _ in range(10)] == [0.0] * 10
    wait = budget.acquire()
    assert wait == pytest.approx(1 / 5)
    assert budget.refused == 1
    now.value += 1.0  # one second at 5/s: five calls
    assert [budget.acquire() for _ in range(5)] == [0.0] * 5
    assert budget.acquire() > 0


def test_more_throttling_halves_the_rate_at_most_once_a_second() -> None:
    now = Now()
    budget = StsBudget(clock=now, initial_rate=8, min_rate=1)
    budget.throttled()
    budget.throttled()  # answers of calls already in flight: no further halving yet
    assert budget.rate == 8
    for expected in (4, 2, 1, 1):
        now.value += 1.0
        budget.throttled()
        assert budget.rate == expected
    assert budget.throttled_count == 6


def test_background_refreshes_yield_to_requests() -> None:
    now = Now()
    budget = StsBudget(clock=now, burst=10, initial_rate=5)
    assert budget.acquire(background=True) == 0.0  # open: anything goes
    budget.throttled()
    for _ in range(5):
        assert budget.acquire() == 0.0  # requests take the bucket down to half...
    # ...below which a background refresh waits, while a request still gets a token.
    assert budget.acquire(background=True) > 0
    assert budget.acquire() == 0.0
    now.value += 2.0  # refilled
    assert budget.acquire(background=True) == 0.0


def test_budget_reopens_after_enough_successes() -> None:
    budget = StsBudget(clock=Now(), initial_rate=5, max_rate=10, recovery=1)
    budget.throttled()
    assert budget.limited
    for _ in range(4):
        budget.succeeded()
        assert budget.limited
    budget.succeeded()
    assert not budget.limited
    assert budget.acquire() == 0.0
    assert "open" in repr(budget)


def test_successes_while_open_change_nothing() -> None:
    budget = StsBudget(clock=Now())
    budget.succeeded()
    assert not budget.limited and budget.rate == budget.max_rate


def test_thread_safe_under_concurrent_acquires() -> None:
    now = Now()
    budget = StsBudget(clock=now, burst=50, initial_rate=1)
    budget.throttled()
    granted: list[int] = []
    lock = threading.Lock()

    def take() -> None:
        mine = sum(budget.acquire() == 0.0 for _ in range(100))
        with lock:
            granted.append(mine)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(granted) == 50  # exactly the burst, however the threads interleave


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"initial_rate": 100, "max_rate": 10}, "min_rate <= initial_rate"),
        ({"min_rate": 6, "initial_rate": 5}, "min_rate <= initial_rate"),
        ({"burst": 0}, "burst"),
        ({"recovery": -1}, "recovery"),
        ({"initial_rate": True}, "initial_rate"),
    ],
)
def test_arguments_are_validated(options: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StsBudget(**options)


def test_after_fork_gets_a_new_lock() -> None:
    budget = StsBudget(clock=Now())
    old = budget._lock
    old.acquire()  # as if a parent thread held it at the fork
    budget.after_fork()
    budget.throttled()  # does not block
    assert budget.limited
    old.release()


def test_check_looks_without_taking_a_token() -> None:
    now = Now()
    budget = StsBudget(clock=now, initial_rate=5, burst=3)
    assert budget.check() == 0.0  # open: nothing to take
    budget.throttled()
    assert [budget.check() for _ in range(10)] == [0.0] * 10  # looks: the bucket stays full
    assert [budget.acquire() for _ in range(3)] == [0.0] * 3
    assert budget.check() == pytest.approx(1 / 5)  # empty: refused, and counted
    assert budget.check(background=True) > budget.check()
    assert budget.refused == 3
