"""The project's strict test STS: :class:`stscreds.testing.LocalSTS`, re-exported.

The implementation lives in ``stscreds.testing`` (public API). ``StrictSTS`` is LocalSTS with
the discovery cache off, the behaviour these tests were written against: in discovery mode
(``jwks=None``) every call refetches the issuer's JWKS, so tests can count the fetches.
"""

from __future__ import annotations

from typing import Any

from stscreds.testing._sts import (
    ACTION,
    ALGORITHMS,
    API_VERSION,
    KEY_FETCH_FAILED,
    XMLNS,
    LocalSTS,
    RecordedCall,
    STSError,
    build_success_xml,
)

__all__ = [
    "ACTION",
    "ALGORITHMS",
    "API_VERSION",
    "KEY_FETCH_FAILED",
    "XMLNS",
    "LocalSTS",
    "RecordedCall",
    "STSError",
    "StrictSTS",
    "build_success_xml",
]


class StrictSTS(LocalSTS):
    """LocalSTS that refetches a discovered JWKS on every call (``jwks_cache=False``)."""

    def __init__(self, **options: Any) -> None:
        options.setdefault("jwks_cache", False)
        super().__init__(**options)
