"""The L1 cache's refresh policy: advisory windows, jitter, the mandatory window, the backoff
after a failed refresh, planned from what STS granted."""

from __future__ import annotations

import random
from datetime import datetime, timezone

import pytest

from stscreds import Credentials
from stscreds._cache import (
    DEFAULT_REFRESH_BACKOFF,
    MANDATORY_WINDOW,
    MIN_REFRESH_INTERVAL,
    MIN_SERVE,
    CacheEntry,
    L1Cache,
    advisory_window,
    plan_entry,
    refresh_backoff,
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


def plan(remaining: float, seed: int = 0, **kwargs: float) -> CacheEntry:
    return plan_entry(
        creds(NOW + remaining), NOW, remaining=remaining, rng=random.Random(seed), **kwargs
    )


@pytest.mark.parametrize(("lifetime", "window"), [(1200, 300), (3600, 900), (43200, 3600)])
def test_plan_entry_jitter_within_first_quarter_of_window(lifetime: int, window: int) -> None:
    rng = random.Random(1234)
    offsets = []
    for _ in range(2000):
        entry = plan_entry(creds(NOW + lifetime), NOW, remaining=lifetime, rng=rng)
        assert entry.expires_at == NOW + lifetime
        before_expiry = entry.expires_at - entry.refresh_at
        # Refresh starts between the full window and 3/4 of it before expiry.
        assert window * 0.75 <= before_expiry <= window
        offsets.append(before_expiry)
    # The jitter actually spreads: both ends of the quarter are approached.
    assert min(offsets) < window * 0.75 + window * 0.01
    assert max(offsets) > window - window * 0.01


def test_plan_entry_is_deterministic_for_a_seeded_rng() -> None:
    assert plan(3600, 7).refresh_at == plan(3600, 7).refresh_at
    assert plan(3600, 7).refresh_at != plan(3600, 8).refresh_at


@pytest.mark.parametrize("remaining", [65, 90, 300, 900, 3600, 43200])
def test_plan_entry_windows_are_relative_to_the_local_receipt(remaining: int) -> None:
    entry = plan(remaining, 1)
    assert entry.expires_at == NOW + remaining
    assert entry.mandatory_at == entry.expires_at - MANDATORY_WINDOW == NOW + remaining - 60
    assert entry.serve_until == entry.expires_at - MIN_SERVE
    assert NOW < entry.refresh_at <= entry.mandatory_at < entry.serve_until < entry.expires_at
    # A fresh entry retries no earlier than its first refresh and has no failures.
    assert entry.retry_at == entry.refresh_at
    assert entry.failures == 0


def test_plan_entry_lifetime_sizes_the_window_not_what_is_left() -> None:
    # Read from the store 10 minutes into a 1 h session: 50 min left, still a 15 min window.
    entry = plan(3000, 3, lifetime=3600)
    assert 0.75 * 900 <= entry.expires_at - entry.refresh_at <= 900
    # With the whole lifetime given (43200) the 60 min window applies instead: it has begun
    # already, so the refresh comes after half the usable life, not at once.
    entry = plan(3000, 3, lifetime=43200)
    assert entry.refresh_at == NOW + (3000 - MANDATORY_WINDOW) / 2
    # Without it, what is left sizes the window.
    entry = plan(3000, 3)
    assert 0.75 * 900 <= entry.expires_at - entry.refresh_at <= 900


def test_plan_entry_advisory_override() -> None:
    for seed in range(100):
        entry = plan(3600, seed, advisory=120.0)
        assert 90 <= entry.expires_at - entry.refresh_at <= 120


def test_plan_entry_900s_session_is_not_due_at_once() -> None:
    for seed in range(200):
        # At least 10 minutes of plain hits before the first refresh.
        assert plan(900, seed, lifetime=900).refresh_at - NOW >= 600


@pytest.mark.parametrize(
    "remaining", [65, 66, 70, 90, 120, 200, 300, 301, 360, 899, 900, 1201, 3600]
)
def test_plan_entry_never_refreshes_before_half_the_usable_life(remaining: int) -> None:
    # The storm: an STS granting less than the advisory window used to give entries born
    # inside it, so every call refreshed. Now at most one refresh per max(5 s, usable / 2).
    usable = remaining - MANDATORY_WINDOW
    for seed in range(300):
        entry = plan(remaining, seed)
        assert entry.refresh_at - NOW >= min(max(MIN_REFRESH_INTERVAL, usable / 2), usable)
        assert entry.refresh_at <= entry.mandatory_at


def test_plan_entry_with_nothing_usable_is_due_at_once() -> None:
    # 60 s or less left: the broker refuses such answers; the plan itself stays ordered.
    entry = plan(50)
    assert entry.refresh_at == entry.mandatory_at < NOW


def test_cache_entry_repr_has_no_secret() -> None:
    c = creds(NOW + 3600)
    entry = CacheEntry(c, NOW + 3600, NOW + 2700, NOW + 3540)
    text = repr(entry)
    assert c.secret_access_key not in text
    assert c.session_token not in text
    assert "refresh_at=" in text


# -- refresh_backoff -----------------------------------------------------------------------


def test_refresh_backoff_defaults_to_the_sep_300_to_600_s() -> None:
    assert DEFAULT_REFRESH_BACKOFF == (300.0, 600.0)
    rng = random.Random(5)
    delays = [refresh_backoff(NOW, rng=rng) - NOW for _ in range(2000)]
    assert all(300 <= d <= 600 for d in delays)
    assert min(delays) < 310 and max(delays) > 590  # jittered over the whole range


def test_refresh_backoff_is_configurable() -> None:
    rng = random.Random(6)
    assert all(10 <= refresh_backoff(NOW, (10.0, 20.0), rng) - NOW <= 20 for _ in range(500))
    assert refresh_backoff(NOW, (7.0, 7.0), rng) == NOW + 7


# -- L1Cache -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "10", None])
def test_l1_cache_validates_size(bad: object) -> None:
    with pytest.raises(ValueError, match="cache_size"):
        L1Cache(bad)  # type: ignore[arg-type]


def entry() -> CacheEntry:
    return plan(3600)


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
