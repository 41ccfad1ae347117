"""The in-process (L1) cache and its refresh policy: when to refresh, when to wait, when to stop."""

from __future__ import annotations

import random
from typing import Any

from cachetools import FIFOCache

from ._credentials import Credentials
from ._errors import CredentialsUnavailable

__all__ = [
    "DEFAULT_REFRESH_BACKOFF",
    "MANDATORY_WINDOW",
    "MIN_SERVE",
    "CacheEntry",
    "Failure",
    "L1Cache",
    "advisory_window",
    "plan_entry",
    "refresh_backoff",
]

#: Seconds before expiry (on STS's clock) inside which callers wait for fresh credentials.
MANDATORY_WINDOW = 60.0
#: Credentials with less than this left (on STS's clock) are never handed out.
MIN_SERVE = 5.0
#: A background refresh never starts sooner than this after the credentials arrived...
MIN_REFRESH_INTERVAL = 5.0
#: ...nor before half of their usable life (until the mandatory window) has passed.
_MIN_USED_FRACTION = 0.5
#: After a failed refresh while cached credentials remain, no new STS call for this many
#: seconds (random in range), as the AWS SDKs' Credential Refresh SEP asks.
DEFAULT_REFRESH_BACKOFF = (300.0, 600.0)
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
    """Cached credentials with the local-clock times that drive refresh-ahead.

    Every time is on the local clock, converted from STS's clock when the entry was planned,
    so the hit path compares one local time to ``refresh_at`` and nothing else.
    """

    __slots__ = (
        "credentials",
        "expires_at",
        "failures",
        "mandatory_at",
        "refresh_at",
        "retry_at",
        "serve_until",
    )

    def __init__(
        self, credentials: Credentials, expires_at: float, refresh_at: float, mandatory_at: float
    ) -> None:
        self.credentials = credentials
        self.expires_at = expires_at
        self.refresh_at = refresh_at
        self.mandatory_at = mandatory_at
        #: Past this the credentials are never handed out (MIN_SERVE before expiry).
        self.serve_until = expires_at - MIN_SERVE
        #: A failed refresh pushes the next STS call out to here (see refresh_backoff).
        self.retry_at = refresh_at
        self.failures = 0

    def shift(self, seconds: float) -> None:
        """Move every time by ``seconds`` (the local clock was stepped by minus that)."""
        self.expires_at += seconds
        self.refresh_at += seconds
        self.mandatory_at += seconds
        self.serve_until += seconds
        self.retry_at += seconds

    def __repr__(self) -> str:
        return f"CacheEntry({self.credentials!r}, refresh_at={self.refresh_at:.0f})"


def plan_entry(
    credentials: Credentials,
    now: float,
    *,
    remaining: float,
    lifetime: float | None = None,
    advisory: float | None = None,
    rng: random.Random | None = None,
) -> CacheEntry:
    """Plan the cache entry for ``credentials`` received at local time ``now``.

    ``remaining``: seconds they had left at receipt on STS's clock (what STS granted, not
    what was asked for). ``lifetime``: their whole granted lifetime, which sizes the advisory
    window (defaults to ``remaining``); ``advisory`` overrides that window.

    A refresh is never due before half the usable life (until the mandatory window) has
    passed, and never sooner than 5 s after receipt: a grant shorter than the advisory
    window (an STS that caps sessions, a skewed clock) cannot make every call a refresh.
    """
    expires_at = now + remaining
    mandatory_at = expires_at - MANDATORY_WINDOW
    usable = mandatory_at - now
    if advisory is None:
        advisory = advisory_window(remaining if lifetime is None else lifetime)
    jitter = (rng or random).uniform(0.0, _JITTER_FRACTION)
    refresh_at = expires_at - advisory * (1.0 - jitter)
    earliest = now + max(usable * _MIN_USED_FRACTION, min(MIN_REFRESH_INTERVAL, usable))
    refresh_at = min(max(refresh_at, earliest), mandatory_at)
    return CacheEntry(credentials, expires_at, refresh_at, mandatory_at)


def refresh_backoff(
    now: float,
    backoff: tuple[float, float] = DEFAULT_REFRESH_BACKOFF,
    rng: random.Random | None = None,
) -> float:
    """The local time before which no new STS call follows a failed refresh."""
    low, high = backoff
    return now + (rng or random).uniform(low, high)


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
