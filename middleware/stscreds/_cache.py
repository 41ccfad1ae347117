"""The in-process (L1) cache and its refresh policy: when to refresh, when to wait, when to stop."""

from __future__ import annotations

import random
from typing import Any

from cachetools import FIFOCache

from ._credentials import Credentials
from ._errors import CredentialsUnavailable

__all__ = [
    "MANDATORY_WINDOW",
    "CacheEntry",
    "Failure",
    "L1Cache",
    "advisory_window",
    "plan_entry",
    "retry_delay",
]

#: Seconds before expiry inside which callers wait for fresh credentials; credentials with
#: less than this left are never handed out.
MANDATORY_WINDOW = 60.0
#: Failed background refreshes are never retried more often than this.
MIN_RETRY_DELAY = 5.0
MAX_RETRY_DELAY = 300.0
# Spread refreshes of entries minted together over the first quarter of their window.
_JITTER_FRACTION = 0.25


def advisory_window(lifetime: float) -> float:
    """Seconds before expiry at which a background refresh starts, scaled by the lifetime.

    5 / 15 / 60 minutes for lifetimes <= 20 min / < 90 min / longer, so a 15 minute session
    is not refreshed on every call (the trap of a fixed 15 minute window).
    """
    if lifetime <= 20 * 60:
        return 5 * 60.0
    if lifetime < 90 * 60:
        return 15 * 60.0
    return 60 * 60.0


class CacheEntry:
    """Cached credentials with the POSIX times that drive refresh-ahead."""

    __slots__ = ("credentials", "expires_at", "failures", "mandatory_at", "refresh_at", "retry_at")

    def __init__(
        self, credentials: Credentials, expires_at: float, refresh_at: float, mandatory_at: float
    ) -> None:
        self.credentials = credentials
        self.expires_at = expires_at
        self.refresh_at = refresh_at
        self.mandatory_at = mandatory_at
        # A failed background refresh pushes the next try out to here.
        self.retry_at = refresh_at
        self.failures = 0

    def __repr__(self) -> str:
        return f"CacheEntry({self.credentials!r}, refresh_at={self.refresh_at:.0f})"


def plan_entry(
    credentials: Credentials,
    now: float,
    *,
    lifetime: float | None = None,
    rng: random.Random | None = None,
) -> CacheEntry:
    """Build the cache entry for ``credentials`` received at ``now``.

    ``lifetime`` is the credentials' whole lifetime when known (defaults to what is left).
    """
    expires_at = credentials.expiration.timestamp()
    window = advisory_window(expires_at - now if lifetime is None else lifetime)
    mandatory = min(MANDATORY_WINDOW, window)
    jitter = (rng or random).uniform(0.0, _JITTER_FRACTION)
    refresh_at = expires_at - window * (1.0 - jitter)
    return CacheEntry(credentials, expires_at, refresh_at, expires_at - mandatory)


def retry_delay(
    failures: int, now: float, mandatory_at: float, rng: random.Random | None = None
) -> float:
    """Seconds to wait before retrying a failed background refresh.

    Exponential with jitter, never below MIN_RETRY_DELAY, and short enough to leave at least one
    more try before the mandatory window when time allows.
    """
    backoff: float = (rng or random).uniform(1.0, 2.0) * MIN_RETRY_DELAY * 2 ** max(0, failures - 1)
    backoff = min(backoff, MAX_RETRY_DELAY)
    return max(MIN_RETRY_DELAY, min(backoff, (mandatory_at - now) / 2))


class Failure:
    """A remembered exchange failure, raised again (as a fresh copy) until ``until``."""

    __slots__ = ("error", "until")

    def __init__(self, error: CredentialsUnavailable, until: float) -> None:
        self.error = error
        self.until = until


class L1Cache(FIFOCache[str, CacheEntry]):
    """Bounded map of identity key to entry; ``entries`` is a plain dict view for lookups.

    Hits read ``entries`` directly (one dict lookup, safe from any thread) and do not reorder
    anything: eviction is by insertion, and every refresh re-inserts, so what goes first is the
    entry refreshed longest ago - in practice an identity nobody asked for since.
    """

    def __init__(self, maxsize: int) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError("cache_size: must be an integer >= 1")
        super().__init__(maxsize=maxsize)
        self.entries: dict[str, CacheEntry] = {}

    def __setitem__(self, key: str, value: CacheEntry, *args: Any) -> None:
        super().__setitem__(key, value, *args)
        self.entries[key] = value

    def __delitem__(self, key: str, *args: Any) -> None:
        # popitem (eviction) and pop both come through here.
        super().__delitem__(key, *args)
        del self.entries[key]

    def clear(self) -> None:
        """Remove every entry."""
        super().clear()
        self.entries.clear()
