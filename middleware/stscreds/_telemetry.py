"""Spans for the miss path (STS exchanges, store operations) through the OpenTelemetry API.

Without opentelemetry-api installed every span is a shared no-op context manager. With it,
spans go to the global tracer provider (or the one ``stscreds.otel.instrument`` names); with
no SDK configured the API's own no-op tracer makes them cost a few microseconds, on the
miss path only: the cache-hit path never starts a span.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

try:  # the extra: stscreds[otel]
    from opentelemetry import trace as _trace
except ImportError:  # pragma: no cover - exercised by the no-extra test in a subprocess
    _trace = None  # type: ignore[assignment]

__all__ = ["Tracing", "otel_available"]

_NAME = "stscreds"


def otel_available() -> bool:
    """True if opentelemetry-api can be imported."""
    return _trace is not None


class _NoSpan:
    """Stands in for a span when OpenTelemetry is absent: every call does nothing."""

    __slots__ = ()

    def set_attribute(self, key: str, value: Any) -> None:
        """Ignore the attribute."""

    def fail(self, error_type: str, description: str) -> None:
        """Ignore the failure."""


class _Span:
    """A recording span with the one failure idiom stscreds uses; never raises (a tracing
    SDK's failure must not fail an exchange)."""

    __slots__ = ("span",)

    def __init__(self, span: Any) -> None:
        self.span = span

    def set_attribute(self, key: str, value: Any) -> None:
        """Set one attribute."""
        with contextlib.suppress(Exception):
            self.span.set_attribute(key, value)

    def fail(self, error_type: str, description: str) -> None:
        """Mark the span failed: ``error.type`` and an ERROR status with ``description``."""
        with contextlib.suppress(Exception):
            self.span.set_attribute("error.type", error_type)
            self.span.set_status(_trace.Status(_trace.StatusCode.ERROR, description))


_NO_SPAN = _NoSpan()


class Tracing:
    """The tracer a broker starts its spans with (None: OpenTelemetry is not installed)."""

    __slots__ = ("tracer",)

    def __init__(self, tracer_provider: Any = None) -> None:
        self.tracer: Any = None
        self.use(tracer_provider)

    def use(self, tracer_provider: Any = None) -> None:
        """Start spans with ``tracer_provider``'s tracer (None: the global provider's)."""
        if _trace is None:
            return
        from . import __version__

        self.tracer = _trace.get_tracer(_NAME, __version__, tracer_provider=tracer_provider)

    @contextlib.contextmanager
    def span(self, name: str, attributes: Mapping[str, Any]) -> Iterator[_Span | _NoSpan]:
        """A CLIENT span around the block. Exceptions are not recorded on it (a traceback's
        frames can hold the token): the caller marks failures with ``fail``."""
        if self.tracer is None:
            yield _NO_SPAN
            return
        # Started, made current and ended by hand, each guarded: an SDK's span processor
        # that raises must not turn a successful exchange into a failed one.
        try:
            span = self.tracer.start_span(
                name, kind=_trace.SpanKind.CLIENT, attributes=dict(attributes)
            )
        except Exception:
            yield _NO_SPAN
            return
        try:
            with _trace.use_span(
                span, end_on_exit=False, record_exception=False, set_status_on_exception=False
            ):
                yield _Span(span)
        finally:
            with contextlib.suppress(Exception):
                span.end()
