"""The L1 cache's refresh policy: advisory windows, jitter, the mandatory window, retry backoff."""

from __future__ import annotations

import random
from datetime import datetime, timezone

import pytest

from stscreds import Credentials
from stscreds._cache import (
    MANDATORY_WINDOW,
    MAX_RETRY_DELAY,
    MIN_RETRY_DELAY,
    CacheEntry,
    L1Cache,
    advisory_window,
    plan_entry,
    retry_delay,
)

NOW = 1_700_000_000.0


def creds(expires_at: float) -> Credentials:
    return Credentials(
        access_key_id="ASIAEXAMPLE000000001",
        secret_access_key="secret/" + "s" * 33,
        session_token="token" * 20,
        expiration=datetime.fromtimestamp(expires_at, timezone.utc),
    )


# -- advisory_window -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lifetime", "window"),
    [
        (900, 300),
        (1200, 300),  # <= 20 min -> 5 min
        (1201, 900),  # just above 20 min -> 15 min
        (3600, 900),
        (5399, 900),  # < 90 min -> 15 min
        (5400, 3600),  # 90 min -> 60 min
        (43200, 3600),
    ],
)
def test_advisory_window_table(lifetime: int, window: int) -> None:
    assert advisory_window(lifetime) == window


def test_advisory_window_fractional_boundaries() -> None:
    assert advisory_window(1200.0) == 300
    assert advisory_window(1200.001) == 900
    assert advisory_window(5399.999) == 900
    assert advisory_window(5400.0) == 3600


@pytest.mark.parametrize("lifetime", [900, 1200, 1201, 3600, 5399, 5400, 43200])
def test_advisory_window_leaves_most_of_the_lifetime_usable(lifetime: int) -> None:
    # The trap: a fixed 15 min window on a 15 min session refreshes on every call. Here at
    # least a quarter of any lifetime is served from cache before the first refresh is due.
    assert advisory_window(lifetime) <= lifetime * 0.75


# -- plan_entry ----------------------------------------------------------------------------


@pytest.mark.parametrize(("lifetime", "window"), [(900, 300), (3600, 900), (43200, 3600)])
def test_plan_entry_jitter_within_first_quarter_of_window(lifetime: int, window: int) -> None:
    rng = random.Random(1234)
    expires_at = NOW + lifetime
    offsets = []
    for _ in range(2000):
        entry = plan_entry(creds(expires_at), NOW, lifetime=lifetime, rng=rng)
        assert entry.expires_at == expires_at
        before_expiry = expires_at - entry.refresh_at
        # Refresh starts between the full window and 3/4 of it before expiry.
        assert window * 0.75 <= before_expiry <= window
        offsets.append(before_expiry)
    # The jitter actually spreads: both ends of the quarter are approached.
    assert min(offsets) < window * 0.75 + window * 0.01
    assert max(offsets) > window - window * 0.01


def test_plan_entry_is_deterministic_for_a_seeded_rng() -> None:
    a = plan_entry(creds(NOW + 3600), NOW, lifetime=3600, rng=random.Random(7))
    b = plan_entry(creds(NOW + 3600), NOW, lifetime=3600, rng=random.Random(7))
    c = plan_entry(creds(NOW + 3600), NOW, lifetime=3600, rng=random.Random(8))
    assert a.refresh_at == b.refresh_at
    assert a.refresh_at != c.refresh_at


@pytest.mark.parametrize("lifetime", [900, 3600, 43200])
def test_plan_entry_mandatory_is_min_of_60s_and_window(lifetime: int) -> None:
    expires_at = NOW + lifetime
    entry = plan_entry(creds(expires_at), NOW, lifetime=lifetime, rng=random.Random(1))
    mandatory = min(MANDATORY_WINDOW, advisory_window(lifetime))
    assert mandatory == 60.0
    assert entry.mandatory_at == expires_at - mandatory
    assert entry.refresh_at < entry.mandatory_at < entry.expires_at
    # A fresh entry retries no earlier than its first refresh and has no failures.
    assert entry.retry_at == entry.refresh_at
    assert entry.failures == 0


def test_plan_entry_lifetime_defaults_to_time_left() -> None:
    # Credentials read back 10 minutes into a 1 h session: 50 min left -> 15 min window.
    entry = plan_entry(creds(NOW + 3000), NOW, rng=random.Random(3))
    assert 0.75 * 900 <= entry.expires_at - entry.refresh_at <= 900
    # With the whole lifetime given (43200) the 60 min window applies instead.
    entry = plan_entry(creds(NOW + 3000), NOW, lifetime=43200, rng=random.Random(3))
    assert 0.75 * 3600 <= entry.expires_at - entry.refresh_at <= 3600


def test_plan_entry_900s_session_is_not_due_at_once() -> None:
    for seed in range(200):
        entry = plan_entry(creds(NOW + 900), NOW, lifetime=900, rng=random.Random(seed))
        # At least 10 minutes of plain hits before the first refresh.
        assert entry.refresh_at - NOW >= 600


def test_cache_entry_repr_has_no_secret() -> None:
    c = creds(NOW + 3600)
    entry = CacheEntry(c, NOW + 3600, NOW + 2700, NOW + 3540)
    text = repr(entry)
    assert c.secret_access_key not in text
    assert c.session_token not in text
    assert "refresh_at=" in text


# -- retry_delay ---------------------------------------------------------------------------


@pytest.mark.parametrize("failures", [0, 1, 2, 3, 5, 8, 20, 100])
def test_retry_delay_bounds(failures: int) -> None:
    rng = random.Random(failures)
    for _ in range(500):
        # Plenty of time before the mandatory window: the cap applies.
        delay = retry_delay(failures, NOW, NOW + 100_000, rng=rng)
        assert MIN_RETRY_DELAY <= delay <= MAX_RETRY_DELAY


def test_retry_delay_grows_exponentially_until_the_cap() -> None:
    far = NOW + 100_000
    # failures=1: 5-10 s; failures=2: 10-20 s; failures=3: 20-40 s; failures=7+: capped at 300.
    for failures, (low, high) in {1: (5, 10), 2: (10, 20), 3: (20, 40), 4: (40, 80)}.items():
        rng = random.Random(failures)
        for _ in range(200):
            assert low <= retry_delay(failures, NOW, far, rng=rng) <= high
    assert retry_delay(10, NOW, far, rng=random.Random(0)) == MAX_RETRY_DELAY


@pytest.mark.parametrize("left", [10.0, 30.0, 120.0, 600.0, 3000.0])
def test_retry_delay_leaves_time_before_mandatory(left: float) -> None:
    rng = random.Random(int(left))
    for failures in range(1, 12):
        delay = retry_delay(failures, NOW, NOW + left, rng=rng)
        assert delay >= MIN_RETRY_DELAY
        # At most half the time left, so at least one more try fits before the window.
        assert NOW + delay <= NOW + left / 2 + 1e-9
        assert NOW + delay < NOW + left


def test_retry_delay_floor_wins_when_time_is_short() -> None:
    # Less than 2 * MIN_RETRY_DELAY left: still never retried more often than every 5 s.
    assert retry_delay(1, NOW, NOW + 4, rng=random.Random(0)) == MIN_RETRY_DELAY
    assert retry_delay(1, NOW, NOW, rng=random.Random(0)) == MIN_RETRY_DELAY


# -- L1Cache -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "10", None])
def test_l1_cache_validates_size(bad: object) -> None:
    with pytest.raises(ValueError, match="cache_size"):
        L1Cache(bad)  # type: ignore[arg-type]


def entry() -> CacheEntry:
    return plan_entry(creds(NOW + 3600), NOW, rng=random.Random(0))


def test_l1_cache_is_bounded_and_evicts_the_entry_refreshed_longest_ago() -> None:
    cache = L1Cache(2)
    cache["a"], cache["b"] = entry(), entry()
    cache["a"] = entry()  # a refresh re-inserts "a": "b" is now the oldest
    cache["c"] = entry()
    assert set(cache) == {"a", "c"}
    assert set(cache.entries) == {"a", "c"}


def test_l1_cache_view_follows_every_removal() -> None:
    cache = L1Cache(3)
    cache["a"], cache["b"], cache["c"] = entry(), entry(), entry()
    assert cache.entries["b"] is cache["b"]
    del cache["a"]
    cache.pop("b")
    assert dict(cache.entries) == {"c": cache["c"]}
    cache.clear()
    assert cache.entries == {} and len(cache) == 0
