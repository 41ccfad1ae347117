"""Test your app against a local, strict STS: LocalSTS and the local_sts/broker fixtures.

:class:`LocalSTS` is a threaded HTTP server on 127.0.0.1 answering STS
``AssumeRoleWithWebIdentity`` in AWS's own wire format. Unlike a mock it verifies the web
identity token the way AWS does (signature against the trusted issuer's JWKS, ``iss``, ``aud``,
``sub``, times), validates the parameters, and can inject faults (throttling, errors, slowness,
hangs, malformed answers), clock skew and short lifetimes.

The pytest plugin (``stscreds.testing.plugin``, registered by entry point) adds two fixtures:
``local_sts`` (a running LocalSTS) and ``broker`` (a CredentialBroker pointed at it and trusted
by it). This module does not import pytest. See docs/testing.md.
"""

from ._sts import (
    DEFAULT_ISSUER,
    KEY_FETCH_FAILED,
    LocalSTS,
    RecordedCall,
    STSError,
    build_success_xml,
)

__all__ = [
    "DEFAULT_ISSUER",
    "KEY_FETCH_FAILED",
    "LocalSTS",
    "RecordedCall",
    "STSError",
    "build_success_xml",
]
