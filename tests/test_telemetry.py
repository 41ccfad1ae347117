"""stscreds._telemetry: spans cost nothing and break nothing when nobody collects them, and
stscreds works without opentelemetry installed (checked in a process where it cannot be
imported, against a StrictSTS this test starts on loopback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from servers.sts import StrictSTS
from stscreds import CredentialBroker, CredentialsRejected, Role, SigningKey
from stscreds._telemetry import _NO_SPAN, Tracing, _NoSpan, _Span, otel_available
from stscreds.stores import MemoryStore, generate_key

ROLE = "arn:aws:iam::123456789012:role/app/reader"
DENIED_ROLE = "arn:aws:iam::123456789012:role/app/denied"
ISSUER = "http://127.0.0.1:1/telemetry-issuer"
KEY = SigningKey.generate("ES256")
MIDDLEWARE = Path(__file__).resolve().parents[1] / "middleware"


@pytest.fixture
async def make_broker(strict_sts: StrictSTS) -> AsyncIterator[Callable[..., CredentialBroker]]:
    brokers: list[CredentialBroker] = []
    strict_sts.configure(issuer=ISSUER, jwks={"keys": [KEY.public_jwk()]})
    strict_sts.reject_roles.add(DENIED_ROLE)

    def make(**kwargs: Any) -> CredentialBroker:
        broker = CredentialBroker(
            issuer=ISSUER, signing_keys=[KEY], sts_endpoint_url=strict_sts.url, **kwargs
        )
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        await broker.aclose()


def no_global_tracer_provider() -> bool:
    """True while nobody set this process's global tracer provider (the tests never do)."""
    return isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def test_tracing_without_a_provider_is_harmless() -> None:
    assert otel_available()
    assert no_global_tracer_provider()
    tracing = Tracing()
    with tracing.span("STS/AssumeRoleWithWebIdentity", {"rpc.system": "aws-api"}) as span:
        assert isinstance(span, _Span)
        assert not span.span.is_recording()  # the API's no-op span: nothing kept
        span.set_attribute("stscreds.attempts", 1)
        span.fail("AccessDenied", "STS AccessDenied: no")

    # The block's exception passes through unchanged (and is not recorded anywhere).
    error = KeyError("boom")
    with pytest.raises(KeyError) as info, tracing.span("x", {}):
        raise error
    assert info.value is error


def test_without_opentelemetry_every_span_is_the_shared_no_op() -> None:
    tracing = Tracing()
    tracing.tracer = None  # what Tracing holds when opentelemetry cannot be imported
    with tracing.span("x", {"a": 1}) as span:
        assert span is _NO_SPAN
        assert isinstance(span, _NoSpan)
        span.set_attribute("b", 2)
        span.fail("Code", "description")
    with pytest.raises(ValueError), tracing.span("x", {}):
        raise ValueError("passes through")


def test_use_switches_providers_and_none_is_the_global_one() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        tracing = Tracing(provider)
        with tracing.span("first", {"k": "v"}) as span:
            span.fail("Timeout", "no answer")
        tracing.use(None)
        with tracing.span("second", {}):
            pass
    finally:
        provider.shutdown()
    (first,) = exporter.get_finished_spans()  # "second" went to the (unset) global provider
    assert first.name == "first"
    assert first.kind is trace.SpanKind.CLIENT
    assert first.attributes == {"k": "v", "error.type": "Timeout"}
    assert first.status.status_code is trace.StatusCode.ERROR
    assert first.status.description == "no answer"
    assert no_global_tracer_provider()


async def test_a_broker_exchanges_with_no_provider_configured(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS
) -> None:
    assert no_global_tracer_provider()
    broker = make_broker(store=MemoryStore(encryption_keys=[generate_key()]))
    credentials = await broker.get(Role(ROLE))
    assert strict_sts.requests[0].credentials is not None
    assert credentials.access_key_id == strict_sts.requests[0].credentials["AccessKeyId"]
    assert await broker.get(Role(ROLE)) is credentials
    with pytest.raises(CredentialsRejected) as info:
        await broker.get(Role(DENIED_ROLE))
    assert info.value.code == "AccessDenied"
    assert broker.stats.exchanges == 2 and broker.stats.hits == 1


NO_OTEL_SCRIPT = textwrap.dedent(
    """
    import sys

    sys.modules["opentelemetry"] = None  # as if opentelemetry-api were not installed

    import asyncio, json, os

    from stscreds import CredentialBroker, CredentialsRejected, Role, SigningKey
    from stscreds._telemetry import otel_available
    from stscreds.stores import MemoryStore, generate_key

    result = {"otel_available": otel_available()}

    async def main():
        key = SigningKey.from_pem(os.environ["TEST_KEY_PEM"])
        for store in (None, MemoryStore(encryption_keys=[generate_key()])):
            broker = CredentialBroker(
                issuer=os.environ["TEST_ISSUER"],
                signing_keys=[key],
                sts_endpoint_url=os.environ["TEST_STS_URL"],
                store=store,
            )
            try:
                role = Role(os.environ["TEST_ROLE"], subject="store" if store else "plain")
                credentials = await broker.get(role)
                again = await broker.get(role)
                result.setdefault("access_key_ids", []).append(credentials.access_key_id)
                result.setdefault("hits", []).append(broker.stats.hits)
                result.setdefault("same", []).append(again is credentials)
                try:
                    await broker.get(Role(os.environ["TEST_DENIED_ROLE"]))
                except CredentialsRejected as error:
                    result.setdefault("rejected", []).append(error.code)
                result.setdefault("tracer", []).append(broker._tracing.tracer)
            finally:
                await broker.aclose()

    asyncio.run(main())
    try:
        import stscreds.otel
    except ImportError as error:
        result["otel_import_error"] = str(error)
    result["loaded"] = sorted(
        name for name, module in sys.modules.items()
        if name.startswith("opentelemetry") and module is not None
    )
    print(json.dumps(result))
    """
)


def test_without_opentelemetry_installed(strict_sts: StrictSTS) -> None:
    key = SigningKey.generate("ES256")
    strict_sts.configure(issuer=ISSUER, jwks={"keys": [key.public_jwk()]})
    strict_sts.reject_roles.add(DENIED_ROLE)
    env = {
        **os.environ,
        "PYTHONPATH": str(MIDDLEWARE),
        "TEST_KEY_PEM": key.to_pem().decode(),
        "TEST_ISSUER": ISSUER,
        "TEST_STS_URL": strict_sts.url,
        "TEST_ROLE": ROLE,
        "TEST_DENIED_ROLE": DENIED_ROLE,
    }
    done = subprocess.run(
        [sys.executable, "-c", NO_OTEL_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)

    assert result["otel_available"] is False
    assert result["loaded"] == []
    # Both brokers (without and with a store, whose operations start spans too) exchanged.
    issued = [rec.credentials["AccessKeyId"] for rec in strict_sts.requests if rec.credentials]
    assert result["access_key_ids"] == issued
    assert len(issued) == 2
    assert result["hits"] == [1, 1]
    assert result["same"] == [True, True]
    assert result["rejected"] == ["AccessDenied", "AccessDenied"]
    assert result["tracer"] == [None, None]
    assert "pip install 'stscreds[otel]'" in result["otel_import_error"]
