"""pytest plugin (entry point ``stscreds``): the ``local_sts`` and ``broker`` fixtures.

A fixture of the same name in a conftest.py or test module overrides these, as usual.
"""

from __future__ import annotations

from collections.abc import Iterator

try:
    import pytest
except ImportError as _error:  # pytest loads this module; nothing else should need to
    raise ImportError("stscreds.testing.plugin is a pytest plugin: pip install pytest") from _error

from .._broker import CredentialBroker
from ._sts import LocalSTS

__all__ = ["broker", "local_sts"]


@pytest.fixture
def local_sts() -> Iterator[LocalSTS]:
    """A running LocalSTS on 127.0.0.1 trusting no issuer yet; stopped after the test."""
    sts = LocalSTS()
    sts.start()
    try:
        yield sts
    finally:
        sts.stop()
    if sts.internal_errors:  # a bug in LocalSTS (or a test clock that raised), not in the app
        pytest.fail(f"LocalSTS internal errors: {sts.internal_errors!r}", pytrace=False)


@pytest.fixture
def broker(local_sts: LocalSTS) -> Iterator[CredentialBroker]:
    """A CredentialBroker using ``local_sts``, trusted by it (fresh ES256 key); closed after."""
    made = local_sts.make_broker()
    try:
        yield made
    finally:
        made.close()
