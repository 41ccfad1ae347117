"""CredentialBroker against a real StrictSTS over HTTP on loopback.

Time is injected: one FakeClock drives the broker and the STS (``strict_sts.clock``), so the
STS stamps ``Expiration = clock + duration`` and verifies the JWT against the same time.
Real waits happen only where a real server or store must answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import re
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import jwt
import pytest

from servers import in_fork
from servers.clock import FakeClock, Skewed
from servers.sts import StrictSTS
from stscreds import (
    CredentialBroker,
    Credentials,
    CredentialsRejected,
    CredentialsUnavailable,
    Role,
    SigningKey,
    STSUnavailable,
)
from stscreds._broker import HEALTH_WINDOW
from stscreds._cache import MANDATORY_WINDOW, MIN_REFRESH_INTERVAL, advisory_window
from stscreds._metrics import METRICS, ROLE_METRIC, error_label
from stscreds.stores import MemoryStore, StoreCipher, generate_key

ROLE = "arn:aws:iam::123456789012:role/app/reader"
OTHER_ROLE = "arn:aws:iam::123456789012:role/app/writer"
ISSUER = "http://127.0.0.1:1/broker-issuer"
KEY = SigningKey.generate("RS256")
T0 = 1_800_000_000.0
POLICY = '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:GetObject",' + (
    '"Resource":"arn:aws:s3:::bucket/*"}]}'
)


@pytest.fixture
def clock(strict_sts: StrictSTS) -> FakeClock:
    """A FakeClock the STS uses too (pass it to brokers as ``clock=``)."""
    fake = FakeClock(T0)
    strict_sts.clock = fake.time
    return fake


@pytest.fixture
async def make_broker(strict_sts: StrictSTS) -> AsyncIterator[Callable[..., CredentialBroker]]:
    brokers: list[CredentialBroker] = []

    def make(**kwargs: Any) -> CredentialBroker:
        kwargs.setdefault("connect_timeout", 1.0)
        kwargs.setdefault("read_timeout", 3.0)
        kwargs.setdefault("exchange_deadline", 5.0)
        kwargs.setdefault("signing_keys", [KEY])
        broker = CredentialBroker(issuer=ISSUER, sts_endpoint_url=strict_sts.url, **kwargs)
        if not brokers:
            strict_sts.configure(issuer=broker.issuer, jwks=broker.jwks)
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        # A BrokenStore's aclose raises; that case has its own test.
        with contextlib.suppress(ConnectionError):
            await broker.aclose()


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Contexts reported to the loop's exception handler ("Task exception was never retrieved")."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        yield errors
    finally:
        gc.collect()
        loop.set_exception_handler(previous)
        assert errors == []


async def wait_until(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    """Let the loop run (real time, small steps) until ``predicate()``; for real I/O only."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def sts_has_calls(sts: StrictSTS, n: int) -> None:
    assert await asyncio.to_thread(sts.wait_for_calls, n, 5.0)


def token_of(sts: StrictSTS, index: int = -1) -> str:
    return sts.requests[index].params["WebIdentityToken"]


# -- the exchange --------------------------------------------------------------------------


async def test_exchange_and_the_token_sts_received(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS
) -> None:
    broker = make_broker()  # the real clock, so PyJWT can check exp/nbf/iat itself
    subject = "alice@example.com/tenant:42 " + "x" * 80
    role = Role(
        ROLE,
        subject=subject,
        duration_seconds=1800,
        policy=POLICY,
        claims={"tenant": "acme", "amr": ["mfa"]},
    )
    credentials = await broker.get(role)

    assert strict_sts.calls == 1
    (rec,) = strict_sts.requests
    assert rec.status == 200 and rec.credentials is not None
    assert credentials.access_key_id == rec.credentials["AccessKeyId"]
    assert credentials.secret_access_key == rec.credentials["SecretAccessKey"]
    assert credentials.session_token == rec.credentials["SessionToken"]
    assert 1790 < credentials.seconds_left(time.time()) <= 1800

    token = rec.params["WebIdentityToken"]
    header = jwt.get_unverified_header(token)
    jwk = next(k for k in broker.jwks()["keys"] if k["kid"] == header["kid"])
    claims = jwt.decode(
        token,
        key=jwt.PyJWK(jwk),
        algorithms=[header["alg"]],
        audience=broker.audience,
        issuer=broker.issuer,
        options={"require": ["iss", "sub", "aud", "iat", "nbf", "exp", "jti"]},
    )
    assert claims["iss"] == ISSUER
    assert claims["sub"] == subject
    assert claims["aud"] == "sts.amazonaws.com"
    assert claims["nbf"] == claims["iat"]
    assert claims["exp"] - claims["iat"] == 300
    assert all(isinstance(claims[name], int) for name in ("iat", "nbf", "exp"))
    assert isinstance(claims["jti"], str) and len(claims["jti"]) >= 16
    assert claims["tenant"] == "acme"
    assert claims["amr"] == ["mfa"]

    # RoleSessionName: the subject with every character outside [\w+=,.@-] replaced, cut to 64.
    expected = re.sub(r"[^\w+=,.@-]", "-", subject, flags=re.ASCII)[:64]
    assert rec.session_name == expected
    assert len(rec.session_name) == 64
    assert rec.duration == 1800
    assert rec.policy == POLICY


async def test_defaults_explicit_session_name_and_fresh_jti(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS
) -> None:
    broker = make_broker(default_subject="svc-app")
    await broker.get(Role(ROLE))
    await broker.get(Role(ROLE, subject="bob", session_name="explicit-session"))
    first, second = strict_sts.requests
    assert first.claims is not None and second.claims is not None
    assert first.claims["sub"] == "svc-app"
    assert first.session_name == "svc-app"
    assert first.duration == 3600
    assert "Policy" not in first.params
    assert second.claims["sub"] == "bob"
    assert second.session_name == "explicit-session"
    assert first.claims["jti"] != second.claims["jti"]


async def test_thousand_concurrent_gets_make_one_call(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS
) -> None:
    broker = make_broker()
    strict_sts.delay = 0.2  # the exchange is still in flight while all 1000 arrive
    # Each caller builds its own (equal) Role, as a middleware resolving per request would.
    results = await asyncio.gather(*(broker.get(Role(ROLE, subject="u1")) for _ in range(1000)))
    assert strict_sts.calls == 1
    first = results[0]
    assert all(r is first for r in results)
    assert broker.stats.exchanges == 1
    assert broker._inflight == {}
    # And later callers are plain hits.
    assert await broker.get(Role(ROLE, subject="u1")) is first
    assert strict_sts.calls == 1


async def test_each_input_of_the_identity_gets_its_own_exchange(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS
) -> None:
    broker = make_broker()
    base: dict[str, Any] = {"arn": ROLE, "subject": "alice"}
    variants = [
        base,
        {**base, "arn": OTHER_ROLE},
        {**base, "subject": "bob"},
        {**base, "policy": POLICY},
        {**base, "claims": {"tenant": "a"}},
        {**base, "claims": {"tenant": "b"}},
        {**base, "session_name": "custom-session"},
        {**base, "duration_seconds": 1800},
    ]
    roles = [Role(**v) for v in variants]
    results = await asyncio.gather(*(broker.get(r) for r in roles))
    assert strict_sts.calls == len(variants)
    assert len({c.access_key_id for c in results}) == len(variants)
    assert len({broker.identity_key(r) for r in roles}) == len(variants)
    # Every variant reached STS with its own inputs.
    tenants = sorted(str((r.claims or {}).get("tenant")) for r in strict_sts.requests)
    assert tenants == ["None"] * 6 + ["a", "b"]

    # Equal roles built separately (claims and policy in another order/spelling) share.
    same = await asyncio.gather(
        broker.get(Role(ROLE, subject="alice")),
        broker.get(Role(ROLE, subject="alice", claims={"tenant": "a"})),
        broker.get(Role(ROLE, subject="alice", policy=json.loads(POLICY))),
    )
    assert strict_sts.calls == len(variants)
    assert same[0] is results[0]
    assert same[1] is results[4]
    assert same[2] is results[3]


async def test_default_subject_and_explicit_same_subject_share(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS
) -> None:
    # identity_key's contract: subject and session_name count as the values actually used
    # (after the broker's defaults), so these pairs are one identity: the same token claims and
    # the same STS parameters. Today Role._canonical (subject/session_name as given, None
    # included) is hashed too, so each pair costs two exchanges.
    broker = make_broker(default_subject="svc")
    a = await broker.get(Role(ROLE))
    b = await broker.get(Role(ROLE, subject="svc"))
    c = await broker.get(Role(ROLE, subject="alice"))
    d = await broker.get(Role(ROLE, subject="alice", session_name="alice"))
    sent = [(r.claims["sub"], r.session_name) for r in strict_sts.requests]  # type: ignore[index]
    assert sent[0] == ("svc", "svc")
    assert broker.identity_key(Role(ROLE)) == broker.identity_key(Role(ROLE, subject="svc"))
    assert a is b
    assert c is d
    assert strict_sts.calls == 2


async def test_brokers_of_different_issuers_or_audiences_have_different_keys(
    make_broker: Callable[..., CredentialBroker],
) -> None:
    role = Role(ROLE)
    a = make_broker()
    b = make_broker(audience="other-client")
    c = CredentialBroker(
        issuer="http://127.0.0.1:2/other", signing_keys=[KEY], sts_endpoint_url=a.sts_endpoint_url
    )
    try:
        assert len({a.identity_key(role), b.identity_key(role), c.identity_key(role)}) == 3
    finally:
        await c.aclose()


# -- cancellation --------------------------------------------------------------------------


async def test_cancelled_callers_do_not_cancel_the_shared_exchange(
    make_broker: Callable[..., CredentialBroker],
    strict_sts: StrictSTS,
    loop_errors: list[dict[str, Any]],
) -> None:
    broker = make_broker()
    role = Role(ROLE)
    strict_sts.hang = True
    getters = [asyncio.create_task(broker.get(role)) for _ in range(20)]
    await sts_has_calls(strict_sts, 1)
    (exchange,) = broker._inflight.values()

    getters[0].cancel()  # the caller that started the exchange
    await asyncio.sleep(0)
    assert getters[0].cancelled() or getters[0].cancelling()
    for task in getters[1:10]:
        task.cancel()
    await asyncio.gather(*getters[:10], return_exceptions=True)
    assert all(task.cancelled() for task in getters[:10])
    assert not exchange.done()
    assert not any(task.done() for task in getters[10:])

    strict_sts.release()
    results = await asyncio.gather(*getters[10:])
    assert all(r is results[0] for r in results)
    assert strict_sts.calls == 1
    assert await broker.get(role) is results[0]
    assert strict_sts.calls == 1


async def test_exchange_completes_when_every_caller_is_cancelled(
    make_broker: Callable[..., CredentialBroker],
    strict_sts: StrictSTS,
    loop_errors: list[dict[str, Any]],
) -> None:
    broker = make_broker()
    role = Role(ROLE)
    strict_sts.hang = True
    getters = [asyncio.create_task(broker.get(role)) for _ in range(10)]
    await sts_has_calls(strict_sts, 1)
    (exchange,) = broker._inflight.values()
    for task in getters:
        task.cancel()
    await asyncio.gather(*getters, return_exceptions=True)
    assert all(task.cancelled() for task in getters)

    strict_sts.release()
    credentials = await exchange  # nobody waits for it any more, yet it finishes
    assert broker._inflight == {}
    hits = broker.stats.hits
    assert await broker.get(role) is credentials
    assert broker.stats.hits == hits + 1
    assert strict_sts.calls == 1


async def test_failed_exchange_with_every_caller_cancelled_is_not_an_unretrieved_error(
    make_broker: Callable[..., CredentialBroker],
    strict_sts: StrictSTS,
    clock: FakeClock,
    loop_errors: list[dict[str, Any]],
    recwarn: pytest.WarningsRecorder,
) -> None:
    broker = make_broker(clock=clock, max_attempts=1)
    role = Role(ROLE)
    strict_sts.hang = True
    strict_sts.fail_next(1, "ServiceUnavailable", 503, "down")
    getters = [asyncio.create_task(broker.get(role)) for _ in range(5)]
    await sts_has_calls(strict_sts, 1)
    (exchange,) = broker._inflight.values()
    for task in getters:
        task.cancel()
    await asyncio.gather(*getters, return_exceptions=True)
    strict_sts.release()
    await asyncio.wait([exchange])
    assert isinstance(exchange.exception(), STSUnavailable)
    del exchange, getters
    gc.collect()
    assert loop_errors == []
    assert len(recwarn) == 0
    # Transient: remembered only briefly; past that the next get goes to STS and succeeds.
    clock.advance(2.01)
    assert await broker.get(role) is not None
    assert strict_sts.calls == 2


# -- refresh-ahead -------------------------------------------------------------------------


async def test_refresh_windows_for_a_one_hour_session(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS, clock: FakeClock
) -> None:
    broker = make_broker(clock=clock)
    role = Role(ROLE, duration_seconds=3600)
    key = broker.identity_key(role)
    first = await broker.get(role)
    entry = broker._cache[key]
    expires = T0 + 3600
    assert first.expiration.timestamp() == expires
    # Planned on STS's clock, read from its one-second Date header: half a second early.
    assert expires - 1 <= entry.expires_at <= expires
    # Lifetime < 90 min: a 15 min advisory window, jittered within its first quarter.
    assert advisory_window(3600) == 900
    assert entry.expires_at - 900 <= entry.refresh_at <= entry.expires_at - 900 * 0.75
    assert entry.mandatory_at == entry.expires_at - MANDATORY_WINDOW

    # Before the window: hits, no call, nothing started.
    for now in (T0 + 1, T0 + 1800, entry.refresh_at - 0.001):
        clock.set(now)
        assert await broker.get(role) is first
        assert broker.peek(role) is first
    assert strict_sts.calls == 1
    assert broker._inflight == {}

    # Advisory window: the OLD credentials at once, one background refresh for everyone.
    clock.set(expires - 600)
    assert broker.peek(role) is None  # WSGI threads hop to the loop from here on
    assert broker.get_cached(role) is first
    (refresh,) = broker._inflight.values()
    for _ in range(100):
        assert await broker.get(role) is first
    assert list(broker._inflight.values()) == [refresh]
    second = await refresh
    assert strict_sts.calls == 2
    assert broker.stats.background_refreshes == 1
    assert second is not first
    assert second.access_key_id != first.access_key_id
    assert second.expiration.timestamp() == expires - 600 + 3600
    assert await broker.get(role) is second
    assert broker._inflight == {}

    # Mandatory window: callers wait (the STS is held) and get new credentials.
    entry = broker._cache[key]
    clock.set(entry.mandatory_at)
    assert broker.get_cached(role) is None
    strict_sts.hang = True
    waiter = asyncio.create_task(broker.get(role))
    await sts_has_calls(strict_sts, 3)
    assert not waiter.done()
    strict_sts.release()
    third = await waiter
    assert third is not second
    assert 3599 <= third.seconds_left(clock.time()) <= 3600
    assert strict_sts.calls == 3


@pytest.mark.parametrize(("duration", "window"), [(900, 300), (3600, 900), (43200, 3600)])
async def test_advisory_window_scales_with_duration(
    make_broker: Callable[..., CredentialBroker],
    strict_sts: StrictSTS,
    clock: FakeClock,
    duration: int,
    window: int,
) -> None:
    broker = make_broker(clock=clock)
    role = Role(ROLE, duration_seconds=duration)
    first = await broker.get(role)
    entry = broker._cache[broker.identity_key(role)]
    assert advisory_window(duration) == window
    assert entry.expires_at - window <= entry.refresh_at <= entry.expires_at - window * 0.75
    # A session is not refreshed on every call: hits all the way up to its refresh time.
    step = duration / 100
    while clock.time() + step < entry.refresh_at:
        clock.advance(step)
        assert await broker.get(role) is first
    assert strict_sts.calls == 1
    assert broker.stats.background_refreshes == 0
    assert broker._inflight == {}
    # The planned expiry counts the clock margin (the Date header's second), so a jitter of
    # 0 puts the refresh that much before duration - window.
    assert entry.refresh_at - T0 >= duration - window - broker.sts_clock.margin


# -- failures during refresh ---------------------------------------------------------------


# -- negative caching ----------------------------------------------------------------------


async def test_rejections_are_negatively_cached(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS, clock: FakeClock
) -> None:
    broker = make_broker(clock=clock)
    role = Role(ROLE)
    strict_sts.reject_roles.add(ROLE)
    with pytest.raises(CredentialsRejected) as info:
        await broker.get(role)
    assert info.value.code == "AccessDenied"
    assert info.value.role_arn == ROLE
    assert strict_sts.calls == 1

    results = await asyncio.gather(*(broker.get(role) for _ in range(100)), return_exceptions=True)
    assert all(isinstance(r, CredentialsRejected) and r.code == "AccessDenied" for r in results)
    errors = set()
    for _ in range(100):
        clock.advance(0.009)  # 0.9 s in all: still below the negative TTL's low bound
        with pytest.raises(CredentialsRejected) as again:
            await broker.get(role)
        errors.add(id(again.value))
        assert again.value.code == "AccessDenied"
    assert strict_sts.calls == 1
    assert broker.stats.negative_hits == 200
    assert len({id(e) for e in errors}) == len(errors)  # fresh each time: no traceback pile-up

    clock.advance(5.0)  # past the negative TTL's high bound
    with pytest.raises(CredentialsRejected):
        await broker.get(role)
    assert strict_sts.calls == 2

    # Once STS accepts again (after the TTL), credentials flow.
    strict_sts.reject_roles.clear()
    clock.advance(5.01)
    assert isinstance(await broker.get(role), Credentials)
    assert strict_sts.calls == 3


async def test_concurrent_cold_gets_of_a_rejected_role_make_one_call(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS, clock: FakeClock
) -> None:
    broker = make_broker(clock=clock)
    strict_sts.reject_roles.add(ROLE)
    strict_sts.delay = 0.1
    results = await asyncio.gather(
        *(broker.get(Role(ROLE)) for _ in range(100)), return_exceptions=True
    )
    assert all(isinstance(r, CredentialsRejected) for r in results)
    assert strict_sts.calls == 1


async def test_transient_errors_are_retried_inside_the_exchange(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS, clock: FakeClock
) -> None:
    broker = make_broker(clock=clock)
    strict_sts.fail_next(1, "Throttling", 400, "Rate exceeded")
    credentials = await broker.get(Role(ROLE))
    assert strict_sts.calls == 2
    assert strict_sts.requests[0].error_code == "Throttling"
    assert credentials.access_key_id == strict_sts.requests[1].credentials["AccessKeyId"]  # type: ignore[index]
    assert broker.stats.exchanges == 1


async def test_unavailable_is_negatively_cached_briefly(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS, clock: FakeClock
) -> None:
    broker = make_broker(clock=clock, max_attempts=1)
    strict_sts.fail_next(1, "ServiceUnavailable", 503, "down")
    with pytest.raises(STSUnavailable) as first:
        await broker.get(Role(ROLE))
    assert broker._failures.currsize == 1
    remembered = broker._failures[broker.identity_key(Role(ROLE))]
    assert T0 + 0.5 <= remembered.until <= T0 + 2.0
    # A copy without a traceback (whose frames would keep the exchange's locals alive).
    assert remembered.error is not first.value
    assert remembered.error.__traceback__ is None
    # The same instant: the remembered error, a fresh copy, no STS call.
    with pytest.raises(STSUnavailable) as again:
        await broker.get(Role(ROLE))
    assert again.value.code == "ServiceUnavailable"
    assert again.value is not first.value
    assert strict_sts.calls == 1
    assert broker.stats.negative_hits == 1
    clock.advance(2.01)  # past the transient TTL's high bound
    assert isinstance(await broker.get(Role(ROLE)), Credentials)
    assert strict_sts.calls == 2
    assert broker._failures.currsize == 0


@pytest.mark.parametrize("ttl", [(-1.0, 1.0), (2.0, 1.0)])
async def test_transient_negative_ttl_is_validated(
    make_broker: Callable[..., CredentialBroker], ttl: tuple[float, float]
) -> None:
    with pytest.raises(ValueError, match="transient_negative_ttl"):
        make_broker(transient_negative_ttl=ttl)


async def test_negative_cache_keeps_a_copy_without_the_exchanges_frames(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS, clock: FakeClock
) -> None:
    broker = make_broker(clock=clock)
    strict_sts.reject_roles.add(ROLE)
    with pytest.raises(CredentialsRejected) as info:
        await broker.get(Role(ROLE))
    assert info.value.__traceback__ is not None
    (failure,) = broker._failures.values()
    assert failure.error is not info.value
    assert failure.error.__traceback__ is None
    assert failure.error.__context__ is None and failure.error.__cause__ is None
    assert (failure.error.code, failure.error.message) == (info.value.code, info.value.message)


# -- closing -------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["close", "aclose"])
async def test_cache_misses_after_close_raise_sts_unavailable(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS, how: str
) -> None:
    broker = make_broker()
    cached = await broker.get(Role(ROLE))
    if how == "close":
        broker.close()
    else:
        await broker.aclose()
    with pytest.raises(STSUnavailable, match="credential broker is closed") as info:
        await broker.get(Role(OTHER_ROLE))
    assert info.value.role_arn == OTHER_ROLE
    assert await broker.get(Role(ROLE)) is cached  # a hit is still a hit
    assert strict_sts.calls == 1


async def test_sync_close_fails_queued_exchanges_with_sts_unavailable(
    make_broker: Callable[..., CredentialBroker],
    strict_sts: StrictSTS,
    loop_errors: list[dict[str, Any]],
) -> None:
    broker = make_broker(max_workers=1)
    strict_sts.hang = True
    running = asyncio.create_task(broker.get(Role(OTHER_ROLE)))
    await sts_has_calls(strict_sts, 1)  # the one pool thread is busy
    queued = asyncio.create_task(broker.get(Role(ROLE)))
    await wait_until(lambda: len(broker._inflight) == 2)
    broker.close()  # cancels the pool's queued call
    with pytest.raises(STSUnavailable, match="credential broker is closed"):
        await queued
    strict_sts.release()
    await asyncio.gather(running, return_exceptions=True)
    assert strict_sts.calls == 1


async def test_unexpected_error_in_refresh_is_sts_unavailable_and_backs_off(
    make_broker: Callable[..., CredentialBroker],
    strict_sts: StrictSTS,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="stscreds")
    broker = make_broker(clock=clock)
    role = Role(ROLE)
    first = await broker.get(role)
    entry = broker._cache[broker.identity_key(role)]

    async def buggy(*args: Any) -> Credentials:
        raise TypeError("a bug")

    monkeypatch.setattr(broker._exchanger, "exchange", buggy)
    # A background refresh: the bug is recorded like a failed exchange, with its backoff.
    clock.set(entry.expires_at - 600)
    assert await broker.get(role) is first
    (refresh,) = broker._inflight.values()
    await asyncio.wait([refresh])
    error = refresh.exception()
    assert isinstance(error, STSUnavailable) and "TypeError" in error.message
    assert entry.failures == 1
    assert entry.retry_at - clock.time() >= MIN_REFRESH_INTERVAL
    assert await broker.get(role) is first
    assert broker._inflight == {}
    assert any("unexpected TypeError" in r.getMessage() for r in caplog.records)
    # A cold fetch: the caller gets STSUnavailable, never the raw TypeError.
    with pytest.raises(STSUnavailable, match="TypeError"):
        await broker.get(Role(OTHER_ROLE))
    assert broker.stats.exchange_failures == 2


# -- deadline and threads ------------------------------------------------------------------


async def test_exchange_deadline_and_a_free_loop(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS
) -> None:
    broker = make_broker(exchange_deadline=0.5, read_timeout=0.3)
    strict_sts.delay = 3.0
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticking = asyncio.create_task(ticker())
    started = time.monotonic()
    try:
        with pytest.raises(STSUnavailable):
            await broker.get(Role(ROLE))
    finally:
        ticking.cancel()
    # A bound for a hang, not a timing benchmark.
    assert time.monotonic() - started < 0.5 + 1.0
    assert ticks >= 10


async def test_sts_calls_run_on_the_stscreds_pool(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS
) -> None:
    broker = make_broker()
    strict_sts.hang = True
    getter = asyncio.create_task(broker.get(Role(ROLE)))
    await sts_has_calls(strict_sts, 1)
    names = {t.ident: t.name for t in threading.enumerate()}
    callers = [
        names.get(ident, "?")
        for ident, frame in sys._current_frames().items()
        if any(
            f.f_code.co_name == "_call" and f.f_code.co_filename.endswith("_exchange.py")
            for f in _stack(frame)
        )
    ]
    assert callers and all(name.startswith("stscreds-sts") for name in callers)
    # The loop is free while the call is blocked in that thread.
    loop_ok = await asyncio.wait_for(asyncio.sleep(0, result=True), 1.0)
    assert loop_ok and not getter.done()
    strict_sts.release()
    assert isinstance(await getter, Credentials)


def _stack(frame: Any) -> list[Any]:
    frames = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    return frames


# -- nothing secret anywhere ---------------------------------------------------------------


class BrokenStore:
    """A CredentialStore test double whose every method raises (and counts the invocations)."""

    def __init__(self) -> None:
        self.cipher = StoreCipher([generate_key()])
        self.invocations = 0

    async def _fail(self) -> Any:
        self.invocations += 1
        raise ConnectionError("redis://:hunter2-password@cache:6379 refused")

    async def get(self, key: str) -> bytes | None:
        return await self._fail()  # type: ignore[no-any-return]

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        await self._fail()

    async def acquire(self, key: str, owner: str, ttl: float) -> bool:
        return await self._fail()  # type: ignore[no-any-return]

    async def release(self, key: str, owner: str) -> bool:
        return await self._fail()  # type: ignore[no-any-return]

    async def extend(self, key: str, owner: str, ttl: float) -> bool:
        return await self._fail()  # type: ignore[no-any-return]

    async def holder(self, key: str) -> str | None:
        return await self._fail()  # type: ignore[no-any-return]

    async def notify(self, key: str) -> None:
        await self._fail()

    async def wait(self, key: str, timeout: float) -> None:
        await self._fail()

    async def aclose(self) -> None:
        await self._fail()


class SlowStore(MemoryStore):
    """A MemoryStore whose get takes 5 s."""

    async def get(self, key: str) -> bytes | None:
        await asyncio.sleep(5)
        return await super().get(key)


async def test_no_secret_in_logs_reprs_errors_or_stats(
    make_broker: Callable[..., CredentialBroker],
    strict_sts: StrictSTS,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # DEBUG for every logger, so any stscreds record at any level is captured. botocore's own
    # DEBUG logging prints request bodies (the WebIdentityToken included): that is botocore's
    # logging, which an app leaves off; the assertion is scoped to the "stscreds" loggers.
    caplog.set_level(logging.DEBUG)
    store_key = generate_key()
    store = MemoryStore(encryption_keys=[store_key])
    broker = make_broker(clock=clock, max_attempts=1, store=store, refresh_backoff=(5.0, 10.0))
    broken = make_broker(clock=clock, max_attempts=1, store=BrokenStore())
    texts: list[str] = []

    role = Role(ROLE, subject="alice", claims={"tenant": "acme"}, policy=POLICY)
    credentials = await broker.get(role)
    texts += [repr(credentials), str(credentials), repr(role)]
    # A background refresh that fails, then one that succeeds.
    clock.set(credentials.expiration.timestamp() - 600)
    strict_sts.fail_next(1, "Throttling", 400, "Rate exceeded")
    await broker.get(role)
    await asyncio.wait(list(broker._inflight.values()))
    clock.set(broker._cache[broker.identity_key(role)].retry_at)
    await broker.get(role)
    renewed = await next(iter(broker._inflight.values()))
    texts += [repr(renewed), repr(broker._cache[broker.identity_key(role)])]
    # Through the broken store (its error message holds a password).
    texts.append(repr(await broken.get(role)))

    # Rejected, rejected with the token quoted in STS's message, unavailable.
    errors: list[BaseException] = []
    strict_sts.reject_roles.add(OTHER_ROLE)
    with pytest.raises(CredentialsRejected) as rejected:
        await broker.get(Role(OTHER_ROLE))
    errors.append(rejected.value)
    with pytest.raises(CredentialsRejected) as rejected_again:
        await broker.get(Role(OTHER_ROLE))  # the negative-cache copy
    errors.append(rejected_again.value)
    quoted = token_of(strict_sts)
    strict_sts.fail_next(1, "InvalidIdentityToken", 400, f"Bad token {quoted} for provider")
    with pytest.raises(CredentialsRejected) as invalid:
        await broker.get(Role(ROLE, subject="carol"))
    errors.append(invalid.value)
    strict_sts.fail_always("ServiceUnavailable", 503, "Service unavailable")
    with pytest.raises(STSUnavailable) as unavailable:
        await broker.get(Role(ROLE, subject="dave"))
    errors.append(unavailable.value)
    strict_sts.clear_faults()

    for error in errors:
        texts += [str(error), repr(error), error.message]  # type: ignore[attr-defined]
    texts += [
        repr(broker),
        repr(broken),
        repr(broker.stats),
        repr(broker.store_stats),
        repr(broken.store_stats),
        repr(store),
        repr(store.cipher),
    ]
    ours = [r for r in caplog.records if r.name == "stscreds" or r.name.startswith("stscreds.")]
    assert ours, "the flow above logs warnings; the capture must not be vacuous"
    for record in ours:
        texts.append(record.getMessage())
        if record.exc_info:
            texts.append(logging.Formatter().formatException(record.exc_info))
    haystack = "\n".join(texts)

    secrets: list[str] = [store_key, "hunter2-password"]
    for rec in strict_sts.requests:
        token = rec.params["WebIdentityToken"]
        secrets += [token, *token.split(".")[1:]]  # the header segment alone is not secret
        if rec.credentials:
            secrets += [rec.credentials["SecretAccessKey"], rec.credentials["SessionToken"]]
    pem = KEY.to_pem().decode()
    secrets += [line for line in pem.splitlines() if line and not line.startswith("-----")]
    assert len(strict_sts.requests) >= 6
    leaked = [s for s in secrets if s in haystack]
    assert leaked == []
    assert "<redacted>" in str(invalid.value)


async def test_botocore_debug_logs_hold_no_token_or_credentials(
    make_broker: Callable[..., CredentialBroker],
    strict_sts: StrictSTS,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # DEBUG for every logger, botocore's included: it logs the request parameters (with the
    # WebIdentityToken) and the raw response body (with SecretAccessKey and SessionToken).
    caplog.set_level(logging.DEBUG)
    broker = make_broker()  # the real clock: StrictSTS verifies the token's times itself
    credentials = await broker.get(Role(ROLE, subject="alice"))
    # A rejection whose message quotes the token, and a retried throttle.
    quoted = token_of(strict_sts)
    strict_sts.fail_next(1, "InvalidIdentityToken", 400, f"Bad token {quoted} for provider")
    with pytest.raises(CredentialsRejected):
        await broker.get(Role(ROLE, subject="bob"))
    strict_sts.fail_next(1, "Throttling", 400, "Rate exceeded")
    await broker.get(Role(ROLE, subject="carol"))

    assert strict_sts.calls == 4
    # The token botocore sent is the real one: StrictSTS verified it on every success.
    assert [rec.claims is not None for rec in strict_sts.requests] == [True, False, False, True]
    secrets: list[str] = [credentials.secret_access_key, credentials.session_token]
    for rec in strict_sts.requests:
        token = rec.params["WebIdentityToken"]
        secrets += [token, *token.split(".")[1:]]
        if rec.credentials:
            secrets += [rec.credentials["SecretAccessKey"], rec.credentials["SessionToken"]]
    messages = [record.getMessage() for record in caplog.records]
    names = {record.name for record in caplog.records}
    # Not vacuous: botocore's body-logging records were captured.
    assert {"botocore.endpoint", "botocore.parsers"} <= names
    assert any("WebIdentityToken" in m for m in messages)
    assert any("<SecretAccessKey>" in m for m in messages)
    haystack = "\n".join([*messages, caplog.text])
    assert [s for s in secrets if s in haystack] == []


# -- the shared store ----------------------------------------------------------------------


async def test_four_brokers_sharing_a_store_make_one_call_and_one_refresh(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS, clock: FakeClock
) -> None:
    store = MemoryStore(encryption_keys=[generate_key()])
    brokers = [make_broker(clock=clock, store=store) for _ in range(4)]
    role = Role(ROLE, subject="shared")
    strict_sts.delay = 0.05
    results = await asyncio.gather(*(b.get(role) for b in brokers for _ in range(100)))
    assert strict_sts.calls == 1
    assert len({c.access_key_id for c in results}) == 1
    assert sum(b.store_stats.leases for b in brokers) == 1  # type: ignore[union-attr]
    assert sum(b.store_stats.hits for b in brokers) == 3  # type: ignore[union-attr]
    first = results[0]

    # Into every broker's advisory window (past any jitter): one refresh for all four.
    clock.set(first.expiration.timestamp() - 600)
    for broker in brokers:
        assert (await broker.get(role)).access_key_id == first.access_key_id
    refreshes = [t for b in brokers for t in b._inflight.values()]
    assert len(refreshes) == 4
    renewed = await asyncio.gather(*refreshes)
    assert strict_sts.calls == 2
    assert len({c.access_key_id for c in renewed}) == 1
    assert renewed[0].access_key_id != first.access_key_id
    for broker in brokers:
        assert (await broker.get(role)).access_key_id == renewed[0].access_key_id
    assert strict_sts.calls == 2


async def test_broken_store_fails_open_with_one_warning_and_a_breaker(
    make_broker: Callable[..., CredentialBroker],
    strict_sts: StrictSTS,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="stscreds")
    store = BrokenStore()
    broker = make_broker(clock=clock, store=store)
    for i in range(50):
        assert isinstance(await broker.get(Role(ROLE, subject=f"user-{i}")), Credentials)
    assert strict_sts.calls == 50
    stats = broker.store_stats
    assert stats is not None
    assert stats.errors >= 1
    assert stats.errors == store.invocations  # every invocation failed and was counted
    assert store.invocations <= 5  # the open breaker skips the store, not one timeout per get
    assert stats.outages == 1
    warnings = [r for r in caplog.records if "shared store unavailable" in r.getMessage()]
    assert len(warnings) == 1
    assert "ConnectionError" in warnings[0].getMessage()
    assert "hunter2" not in caplog.text


async def test_broker_aclose_survives_a_broken_store(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS
) -> None:
    # The protocol says every store method may raise; closing the broker must still work.
    broker = make_broker(store=BrokenStore())
    await broker.get(Role(ROLE))
    await broker.aclose()


async def test_slow_store_costs_at_most_the_store_timeout(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS, clock: FakeClock
) -> None:
    broker = make_broker(clock=clock, store=SlowStore(encryption_keys=[generate_key()]))
    started = time.monotonic()
    credentials = await broker.get(Role(ROLE))
    elapsed = time.monotonic() - started
    assert isinstance(credentials, Credentials)
    assert elapsed < 2.0  # at most the first-contact allowance (1 s), not the store's 5 s
    assert strict_sts.calls == 1
    assert broker.store_stats is not None and broker.store_stats.errors == 1


async def test_tampered_store_value_is_never_served(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS, clock: FakeClock
) -> None:
    store = MemoryStore(encryption_keys=[generate_key()])
    role = Role(ROLE, subject="victim")
    writer = make_broker(clock=clock, store=store)
    planted = await writer.get(role)
    key = store.cipher.store_key(writer.identity_key(role))
    # Untouched, the value serves another worker without a call.
    reader = make_broker(clock=clock, store=store)
    assert (await reader.get(role)).access_key_id == planted.access_key_id
    assert strict_sts.calls == 1

    value, expires = store._values[key]
    middle = len(value) // 2
    tampered = value[:middle] + bytes([value[middle] ^ 0x01]) + value[middle + 1 :]
    store._values[key] = (tampered, expires)
    victim = make_broker(clock=clock, store=store)
    fresh = await victim.get(role)
    assert fresh.access_key_id != planted.access_key_id
    assert fresh.secret_access_key != planted.secret_access_key
    assert strict_sts.calls == 2
    assert victim.store_stats is not None and victim.store_stats.rejected >= 1
    assert victim.store_stats.hits == 0


@pytest.mark.parametrize("encrypted", [True, False])
async def test_value_copied_under_another_identity_is_not_served(
    make_broker: Callable[..., CredentialBroker],
    strict_sts: StrictSTS,
    clock: FakeClock,
    encrypted: bool,
) -> None:
    store = (
        MemoryStore(encryption_keys=[generate_key()])
        if encrypted
        else MemoryStore(allow_plaintext=True)
    )
    alice, mallory = Role(ROLE, subject="alice"), Role(ROLE, subject="mallory")
    first = make_broker(clock=clock, store=store)
    alices = await first.get(alice)
    # Someone with write access to the store copies alice's value under mallory's key.
    name = store.cipher.store_key
    store._values[name(first.identity_key(mallory))] = store._values[
        name(first.identity_key(alice))
    ]
    second = make_broker(clock=clock, store=store)
    mallorys = await second.get(mallory)
    assert mallorys.access_key_id != alices.access_key_id
    assert strict_sts.calls == 2
    assert strict_sts.requests[1].claims is not None
    assert strict_sts.requests[1].claims["sub"] == "mallory"
    assert second.store_stats is not None and second.store_stats.rejected >= 1


async def test_store_value_near_expiry_is_not_served(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS, clock: FakeClock
) -> None:
    store = MemoryStore(encryption_keys=[generate_key()])
    role = Role(ROLE, duration_seconds=900)
    writer = make_broker(clock=clock, store=store)
    planted = await writer.get(role)
    expires = planted.expiration.timestamp()

    # 70 s left (more than the mandatory window + margin): served from the store.
    clock.set(expires - 70)
    early = make_broker(clock=clock, store=store)
    assert (await early.get(role)).access_key_id == planted.access_key_id
    assert strict_sts.calls == 1

    # 64 s left: the store's own TTL has not run out, but the value must not be served.
    clock.set(expires - 64)
    late = make_broker(clock=clock, store=store)
    fresh = await late.get(role)
    assert fresh.access_key_id != planted.access_key_id
    assert fresh.seconds_left(clock.time()) == 900
    assert strict_sts.calls == 2
    assert late.store_stats is not None and late.store_stats.hits == 0


async def test_lease_of_a_dead_owner_is_taken_over_after_it_expires(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS, clock: FakeClock
) -> None:
    lease_clock = FakeClock(1000.0)
    store = MemoryStore(encryption_keys=[generate_key()], clock=lease_clock.time)
    broker = make_broker(clock=clock, store=store, lease_ttl=5.0)
    role = Role(ROLE)
    key = store.cipher.store_key(broker.identity_key(role))
    assert await store.acquire(key, "dead-worker", 30.0)

    getter = asyncio.create_task(broker.get(role))
    stats = broker.store_stats
    assert stats is not None
    await wait_until(lambda: stats.waits >= 1)
    assert strict_sts.calls == 0
    assert not getter.done()

    lease_clock.advance(31.0)  # the dead worker's lease runs out
    await store.notify(key)  # wake the waiter now instead of after its wait slice
    credentials = await asyncio.wait_for(getter, 5.0)
    assert strict_sts.calls == 1
    assert stats.leases == 1
    assert key not in store._leases  # released after the put
    assert store._values[key][0]  # and the fleet can read the value
    assert isinstance(credentials, Credentials)


async def test_stuck_lease_holder_is_given_up_on(
    make_broker: Callable[..., CredentialBroker],
    strict_sts: StrictSTS,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="stscreds")
    lease_clock = FakeClock(1000.0)  # never advanced: the holder's lease never expires
    store = MemoryStore(encryption_keys=[generate_key()], clock=lease_clock.time)
    # request_timeout - exchange_deadline (5 s): 0.6 s for the fleet, then STS alone.
    broker = make_broker(clock=clock, store=store, lease_ttl=0.3, request_timeout=5.6)
    role = Role(ROLE)
    name = store.cipher.store_key(broker.identity_key(role))
    assert await store.acquire(name, "stuck-worker", 3600.0)
    started = time.monotonic()
    assert isinstance(await broker.get(role), Credentials)
    elapsed = time.monotonic() - started
    # It waited for the fleet (request_timeout - exchange_deadline), then went to STS alone.
    assert 0.5 <= elapsed < 3.0
    assert strict_sts.calls == 1
    assert any("gave up waiting" in r.getMessage() for r in caplog.records)


async def test_context_manager_cancels_in_flight_exchanges(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS
) -> None:
    broker = make_broker()
    strict_sts.hang = True
    async with broker:
        getter = asyncio.create_task(broker.get(Role(ROLE)))
        await sts_has_calls(strict_sts, 1)
        assert len(broker._inflight) == 1
    assert broker._inflight == {}
    with pytest.raises(asyncio.CancelledError):
        await getter
    strict_sts.release()


# -- metrics() and health() ----------------------------------------------------------------


def success_rows(value: int, trigger: str = "request") -> dict[str, Any]:
    return {"trigger": trigger, "outcome": "success", "code": "", "value": value}


def sts_calls(assume: int, probes: int = 0) -> list[dict[str, Any]]:
    return [
        {"operation": "AssumeRoleWithWebIdentity", "value": assume},
        {"operation": "GetCallerIdentity", "value": probes},
    ]


def exchange_events(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "stscreds" and r.levelno == logging.INFO and r.msg.startswith("exchange for")
    ]


@pytest.fixture
def refusing_port() -> Any:
    """A loopback port bound but not listening: every connection to it is refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


async def test_metrics_after_a_single_flight_burst_hits_and_misses(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS, clock: FakeClock
) -> None:
    broker = make_broker(clock=clock)
    role = Role(ROLE, subject="burst")
    burst = 25
    strict_sts.hang = True
    getters = [asyncio.create_task(broker.get(role)) for _ in range(burst)]
    await sts_has_calls(strict_sts, 1)
    held = broker.metrics()
    assert held["misses_total"] == burst
    assert held["singleflight_joins_total"] == burst - 1
    assert held["inflight_exchanges"] == 1
    assert broker.health()["inflight_exchanges"] == 1
    assert held["exchanges_total"] == []  # counted when it ends
    assert held["exchange_duration_seconds"]["count"] == 0
    assert held["request_wait_seconds"]["count"] == 0
    assert held["cached_identities"] == 0
    strict_sts.release()
    results = await asyncio.gather(*getters)
    assert all(r is results[0] for r in results)

    for _ in range(7):
        assert await broker.get(role) is results[0]
    for subject in ("m1", "m2", "m3"):
        await broker.get(Role(ROLE, subject=subject))

    metrics = broker.metrics()
    assert metrics["l1_hits_total"] == 7
    assert metrics["misses_total"] == burst + 3
    assert metrics["singleflight_joins_total"] == burst - 1
    assert metrics["background_refreshes_total"] == 0
    assert metrics["negative_cache_hits_total"] == 0
    assert metrics["exchanges_total"] == [success_rows(4)]
    assert metrics["sts_calls_total"] == sts_calls(4)
    assert strict_sts.calls == 4
    # Every miss waited (the burst for the one exchange), each exchange took some time.
    assert metrics["request_wait_seconds"]["count"] == burst + 3
    assert metrics["request_wait_seconds"]["buckets"][-1] == [math.inf, burst + 3]
    assert metrics["exchange_duration_seconds"]["count"] == 4
    assert metrics["exchange_duration_seconds"]["sum"] > 0
    assert metrics["role_exchanges_total"] == [
        {"role_arn": ROLE, "outcome": "success", "code": "", "value": 4}
    ]
    assert metrics["cached_identities"] == 4
    assert metrics["inflight_exchanges"] == 0
    assert metrics["mandatory_window_identities"] == 0
    assert metrics["sts_throttled_total"] == 0
    assert metrics["sts_budget_refusals_total"] == 0
    assert metrics["sts_budget_limited"] == 0


async def test_metrics_of_a_rejected_exchange_and_the_negative_cache(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS, clock: FakeClock
) -> None:
    broker = make_broker(clock=clock)
    strict_sts.reject_roles.add(OTHER_ROLE)
    with pytest.raises(CredentialsRejected):
        await broker.get(Role(OTHER_ROLE))
    first = broker.metrics()
    rejected = {"trigger": "request", "outcome": "rejected", "code": "AccessDenied", "value": 1}
    assert first["exchanges_total"] == [rejected]
    assert first["negative_cache_hits_total"] == 0
    assert first["request_wait_seconds"]["count"] == 1

    with pytest.raises(CredentialsRejected):
        await broker.get(Role(OTHER_ROLE))
    again = broker.metrics()
    assert again["negative_cache_hits_total"] == 1
    assert again["misses_total"] == 2
    assert again["request_wait_seconds"]["count"] == 1  # answered at once, no wait
    assert again["exchanges_total"] == [rejected]
    assert again["exchange_duration_seconds"]["count"] == 1
    assert again["sts_calls_total"] == sts_calls(1)
    assert again["role_exchanges_total"] == [
        {"role_arn": OTHER_ROLE, "outcome": "rejected", "code": "AccessDenied", "value": 1}
    ]
    assert again["cached_identities"] == 0

    # And one success of another role: both rows, sorted by their labels.
    await broker.get(Role(ROLE))
    assert broker.metrics()["exchanges_total"] == [rejected, success_rows(1)]


async def test_background_refresh_is_counted_with_its_trigger(
    make_broker: Callable[..., CredentialBroker],
    strict_sts: StrictSTS,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="stscreds")
    broker = make_broker(clock=clock)
    role = Role(ROLE)
    first = await broker.get(role)
    clock.set(first.expiration.timestamp() - 600)  # in the advisory window, past any jitter
    assert await broker.get(role) is first
    (refresh,) = broker._inflight.values()
    assert broker.metrics()["inflight_exchanges"] == 1
    await refresh
    metrics = broker.metrics()
    assert metrics["background_refreshes_total"] == 1
    assert metrics["exchanges_total"] == [success_rows(1, "background"), success_rows(1)]
    assert metrics["l1_hits_total"] == 1
    assert metrics["misses_total"] == 1
    assert metrics["request_wait_seconds"]["count"] == 1  # nobody waited for the refresh
    assert metrics["exchange_duration_seconds"]["count"] == 2
    assert metrics["sts_calls_total"] == sts_calls(2)
    assert [(r.trigger, r.waiters) for r in exchange_events(caplog)] == [  # type: ignore[attr-defined]
        ("request", 1),
        ("background", 0),
    ]


async def test_cache_gauges_follow_the_clock(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS, clock: FakeClock
) -> None:
    broker = make_broker(clock=clock)
    empty = broker.metrics()
    assert empty["cached_identities"] == 0
    assert empty["mandatory_window_identities"] == 0
    assert empty["soonest_expiry_seconds"] == math.inf  # nothing cached
    assert empty["clock_offset_seconds"] == 0.0  # STS not heard yet

    long, short = Role(ROLE, duration_seconds=3600), Role(OTHER_ROLE, duration_seconds=900)
    await broker.get(long)
    await broker.get(short)
    long_entry = broker._cache[broker.identity_key(long)]
    short_entry = broker._cache[broker.identity_key(short)]
    metrics = broker.metrics()
    assert metrics["cached_identities"] == 2
    assert metrics["mandatory_window_identities"] == 0
    assert metrics["soonest_expiry_seconds"] == short_entry.expires_at - clock.time()
    assert 898 <= metrics["soonest_expiry_seconds"] <= 900
    # STS's Date header (whole seconds, read as the middle of its second) on the same clock.
    assert metrics["clock_offset_seconds"] == broker.sts_clock.offset == 0.5

    clock.set(short_entry.mandatory_at)
    metrics = broker.metrics()
    assert metrics["mandatory_window_identities"] == 1
    assert metrics["soonest_expiry_seconds"] == MANDATORY_WINDOW
    health = broker.health()
    assert health["mandatory_window_identities"] == 1
    assert health["cached_identities"] == 2
    # The next request for it refreshes; nothing is wrong yet.
    assert (health["status"], health["reasons"]) == ("ok", [])

    # Up to serve_until the entry counts; from there on nothing can be served from it.
    clock.set(short_entry.serve_until - 0.001)
    assert broker.metrics()["cached_identities"] == 2
    clock.set(short_entry.serve_until)
    metrics = broker.metrics()
    assert metrics["cached_identities"] == 1
    assert metrics["mandatory_window_identities"] == 0
    assert metrics["soonest_expiry_seconds"] == long_entry.expires_at - clock.time()
    assert broker.health()["cached_identities"] == 1
    assert len(broker._cache) == 2  # still held, only not counted

    clock.set(long_entry.mandatory_at)
    metrics = broker.metrics()
    assert metrics["mandatory_window_identities"] == 1
    assert metrics["soonest_expiry_seconds"] == MANDATORY_WINDOW
    clock.set(long_entry.serve_until)
    metrics = broker.metrics()
    assert (metrics["cached_identities"], metrics["mandatory_window_identities"]) == (0, 0)
    assert metrics["soonest_expiry_seconds"] == math.inf
    assert strict_sts.calls == 2


async def test_clock_offset_of_a_skewed_sts(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS, clock: FakeClock
) -> None:
    strict_sts.clock = Skewed(clock, 120.0)  # STS's clock two minutes ahead of ours
    broker = make_broker(clock=clock)
    await broker.get(Role(ROLE))
    offset = broker.metrics()["clock_offset_seconds"]
    assert offset == broker.sts_clock.offset
    assert 120.0 <= offset <= 121.0
    health = broker.health()
    assert health["status"] == "degraded"
    assert health["clock"] == {"known": True, "offset_seconds": offset}
    (reason,) = health["reasons"]
    assert re.fullmatch(r"local clock is \+12[01]s off STS's: check NTP", reason)


async def test_clock_offset_is_zero_while_sts_sends_no_date(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS, clock: FakeClock
) -> None:
    strict_sts.clock = Skewed(clock, 120.0)
    strict_sts.send_date = False
    broker = make_broker(clock=clock)
    await broker.get(Role(ROLE))
    assert broker.metrics()["clock_offset_seconds"] == 0.0
    assert broker.health()["clock"] == {"known": False, "offset_seconds": 0.0}
    assert broker.health()["status"] == "ok"


async def test_store_metrics_with_a_memory_store(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS, clock: FakeClock
) -> None:
    store = MemoryStore(encryption_keys=[generate_key()])
    role = Role(ROLE, subject="shared")
    writer = make_broker(clock=clock, store=store)
    await writer.get(role)

    def one(value: int) -> list[dict[str, Any]]:
        return [{"store": "memory", "value": value}]

    def ops(*rows: tuple[str, int]) -> list[dict[str, Any]]:
        return [{"store": "memory", "operation": op, "outcome": "ok", "value": n} for op, n in rows]

    metrics = writer.metrics()
    assert metrics["store_hits_total"] == one(0)
    assert metrics["store_leases_total"] == one(1)
    assert metrics["store_waits_total"] == one(0)
    assert metrics["store_rejected_values_total"] == one(0)
    assert metrics["store_breaker_openings_total"] == one(0)
    assert metrics["store_breaker_open"] == one(0)
    # Read, lease, read again under the lease, exchange, put, release, wake the waiters.
    assert metrics["store_operations_total"] == ops(
        ("acquire", 1), ("get", 2), ("notify", 1), ("put", 1), ("release", 1)
    )
    assert metrics["exchanges_total"] == [success_rows(1)]

    reader = make_broker(clock=clock, store=store)
    await reader.get(role)
    metrics = reader.metrics()
    assert metrics["store_hits_total"] == one(1)
    assert metrics["store_leases_total"] == one(0)
    assert metrics["store_operations_total"] == ops(("get", 1))
    assert metrics["exchanges_total"] == []
    # No exchange, but one clock probe before judging the stored value's expiry.
    assert metrics["sts_calls_total"] == sts_calls(0, probes=1)
    assert metrics["cached_identities"] == 1
    assert strict_sts.calls == 1
    health = reader.health()
    assert health["store"] == {"kind": "memory", "breaker_open": False}
    assert health["status"] == "ok"


async def test_store_metrics_are_empty_lists_without_a_store(
    make_broker: Callable[..., CredentialBroker], clock: FakeClock
) -> None:
    broker = make_broker(clock=clock)
    await broker.get(Role(ROLE))
    metrics = broker.metrics()
    store_names = {spec.name for spec in METRICS if spec.name.startswith("store_")}
    assert len(store_names) == 7
    assert {name: metrics[name] for name in store_names} == {name: [] for name in store_names}
    assert broker.health()["store"] is None


async def test_metrics_keys_are_the_catalogue(
    make_broker: Callable[..., CredentialBroker], clock: FakeClock
) -> None:
    expected = {spec.name for spec in METRICS} | {ROLE_METRIC.name}
    assert ROLE_METRIC.name == "role_exchanges_total"
    plain = make_broker(clock=clock)
    shared = make_broker(clock=clock, store=MemoryStore(encryption_keys=[generate_key()]))
    for broker in (plain, shared):
        assert set(broker.metrics()) == expected
        await broker.get(Role(ROLE))
        assert set(broker.metrics()) == expected
    for spec in METRICS:
        value = shared.metrics()[spec.name]
        if spec.kind == "histogram":
            assert set(value) == {"buckets", "sum", "count"}
        elif spec.labels:
            assert isinstance(value, list)
            assert all(set(row) == {*spec.labels, "value"} for row in value)
        else:
            assert isinstance(value, int | float), spec.name


async def test_metrics_are_json_with_infinity_and_health_is_strict_json(
    make_broker: Callable[..., CredentialBroker], clock: FakeClock
) -> None:
    broker = make_broker(clock=clock)
    empty = broker.metrics()
    # +Inf is in every histogram's last bucket (and in soonest_expiry_seconds when nothing is
    # cached): json.dumps writes it as Infinity, which strict JSON has no word for.
    text = json.dumps(empty)
    assert '"soonest_expiry_seconds": Infinity' in text
    assert json.loads(text) == empty
    with pytest.raises(ValueError, match="Out of range float"):
        json.dumps(empty, allow_nan=False)

    await broker.get(Role(ROLE))
    cached = broker.metrics()
    assert math.isfinite(cached["soonest_expiry_seconds"])
    assert json.loads(json.dumps(cached)) == cached
    assert cached["request_wait_seconds"]["buckets"][-1][0] == math.inf
    with pytest.raises(ValueError, match="Out of range float"):
        json.dumps(cached, allow_nan=False)
    health = broker.health()
    assert json.loads(json.dumps(health, allow_nan=False)) == health


async def test_one_info_event_per_exchange_with_its_fields_and_no_secret(
    make_broker: Callable[..., CredentialBroker],
    strict_sts: StrictSTS,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="stscreds")
    broker = make_broker(clock=clock)
    role = Role(ROLE, subject="alice")
    burst = 10
    strict_sts.hang = True
    getters = [asyncio.create_task(broker.get(role)) for _ in range(burst)]
    await sts_has_calls(strict_sts, 1)
    strict_sts.release()
    credentials = (await asyncio.gather(*getters))[0]
    # One retried after a throttle, one rejected.
    strict_sts.fail_next(1, "Throttling", 400, "Rate exceeded")
    await broker.get(Role(ROLE, subject="bob"))
    strict_sts.reject_roles.add(OTHER_ROLE)
    with pytest.raises(CredentialsRejected):
        await broker.get(Role(OTHER_ROLE))
    with pytest.raises(CredentialsRejected):
        await broker.get(Role(OTHER_ROLE))  # remembered: no exchange, no event

    events = exchange_events(caplog)
    assert len(events) == 3 == broker.stats.exchanges
    fields = (
        "identity",
        "role_arn",
        "trigger",
        "outcome",
        "error_code",
        "sts_message",
        "duration_ms",
        "attempts",
        "waiters",
    )
    got = [{name: getattr(record, name) for name in fields} for record in events]
    for event in got:
        assert re.fullmatch(r"[0-9a-f]{12}", event["identity"])
        assert isinstance(event["duration_ms"], float) and event["duration_ms"] >= 0
        del event["duration_ms"]
    assert got[0] == {
        "identity": broker.identity_key(role)[:12],
        "role_arn": ROLE,
        "trigger": "request",
        "outcome": "success",
        "error_code": None,
        "sts_message": None,
        "attempts": 1,
        "waiters": burst,
    }
    assert got[1] == {
        "identity": broker.identity_key(Role(ROLE, subject="bob"))[:12],
        "role_arn": ROLE,
        "trigger": "request",
        "outcome": "success",
        "error_code": None,
        "sts_message": None,
        "attempts": 2,
        "waiters": 1,
    }
    assert got[2] == {
        "identity": broker.identity_key(Role(OTHER_ROLE))[:12],
        "role_arn": OTHER_ROLE,
        "trigger": "request",
        "outcome": "rejected",
        "error_code": "AccessDenied",
        "sts_message": "STS AccessDenied: Not authorized to perform sts:AssumeRoleWithWebIdentity",
        "attempts": 1,
        "waiters": 1,
    }
    assert "AccessDenied" in events[2].getMessage()

    secrets = [credentials.secret_access_key, credentials.session_token]
    for rec in strict_sts.requests:
        token = rec.params["WebIdentityToken"]
        secrets += [token, *token.split(".")[1:]]
        if rec.credentials:
            secrets += [rec.credentials["SecretAccessKey"], rec.credentials["SessionToken"]]
    ours = [r for r in caplog.records if r.name == "stscreds"]
    texts = [f"{name}={value!r}" for record in ours for name, value in vars(record).items()]
    texts += [record.getMessage() for record in ours]
    haystack = "\n".join(texts)
    assert [s for s in secrets if s in haystack] == []
    assert "eyJ" not in haystack


async def test_health_ok_before_and_after_a_success(
    make_broker: Callable[..., CredentialBroker], clock: FakeClock
) -> None:
    broker = make_broker(clock=clock)
    assert broker.health() == {
        "status": "ok",
        "reasons": [],
        "last_success_at": None,
        "seconds_since_success": None,
        "last_failure": None,
        "clock": {"known": False, "offset_seconds": 0.0},
        "store": None,
        "cached_identities": 0,
        "mandatory_window_identities": 0,
        "inflight_exchanges": 0,
    }
    await broker.get(Role(ROLE))
    health = broker.health()
    assert health["status"] == "ok"
    assert health["reasons"] == []
    assert isinstance(health["last_success_at"], float)
    assert health["seconds_since_success"] >= 0
    assert health["clock"] == {"known": True, "offset_seconds": 0.5}
    assert health["cached_identities"] == 1


async def test_health_degraded_after_a_rejection_and_ok_after_a_success(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS, clock: FakeClock
) -> None:
    broker = make_broker(clock=clock)
    await broker.get(Role(ROLE))
    strict_sts.reject_roles.add(OTHER_ROLE)
    with pytest.raises(CredentialsRejected):
        await broker.get(Role(OTHER_ROLE))
    health = broker.health()
    assert health["status"] == "degraded"
    assert health["reasons"] == ["last exchange failed: AccessDenied"]
    failure = health["last_failure"]
    assert isinstance(failure.pop("at"), float)
    assert failure == {
        "role_arn": OTHER_ROLE,
        "outcome": "rejected",
        "code": "AccessDenied",
        "message": "STS AccessDenied: Not authorized to perform sts:AssumeRoleWithWebIdentity",
    }
    assert health["last_failure"] is not broker._last_failure  # a copy

    await broker.get(Role(ROLE, subject="another"))
    health = broker.health()
    assert health["status"] == "ok"
    assert health["reasons"] == []
    assert health["last_failure"]["code"] == "AccessDenied"  # still reported, no longer a reason


async def test_per_role_rejections_never_make_health_unavailable(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS, clock: FakeClock
) -> None:
    broker = make_broker(clock=clock)
    strict_sts.reject_roles.add(OTHER_ROLE)
    for i in range(5):
        with pytest.raises(CredentialsRejected):
            await broker.get(Role(OTHER_ROLE, subject=f"user-{i}"))
    assert strict_sts.calls == 5
    health = broker.health()
    assert health["status"] == "degraded"
    assert health["reasons"] == ["last exchange failed: AccessDenied"]
    assert broker.metrics()["exchanges_total"] == [
        {"trigger": "request", "outcome": "rejected", "code": "AccessDenied", "value": 5}
    ]


async def test_health_degraded_while_the_store_breaker_is_open(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS, clock: FakeClock
) -> None:
    broker = make_broker(clock=clock, store=BrokenStore())
    assert broker.health()["store"] == {"kind": "broken", "breaker_open": False}
    await broker.get(Role(ROLE))
    health = broker.health()
    assert health["status"] == "degraded"
    assert health["store"] == {"kind": "broken", "breaker_open": True}
    assert health["reasons"] == ["shared store unavailable: using STS directly"]
    metrics = broker.metrics()
    assert metrics["store_breaker_open"] == [{"store": "broken", "value": 1}]
    assert metrics["store_breaker_openings_total"] == [{"store": "broken", "value": 1}]
    # The first read failed and opened the breaker; the rest were skipped, not tried.
    assert metrics["store_operations_total"] == [
        {"store": "broken", "operation": "acquire", "outcome": "skipped", "value": 1},
        {"store": "broken", "operation": "get", "outcome": "error", "value": 1},
        {"store": "broken", "operation": "put", "outcome": "skipped", "value": 1},
    ]
    assert metrics["exchanges_total"] == [success_rows(1)]


async def test_health_unavailable_after_three_short_grants_and_ok_after_a_success(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS, clock: FakeClock
) -> None:
    broker = make_broker(clock=clock, max_attempts=1)
    strict_sts.expiration = lambda now, _requested: now + 10  # (nearly) expired on arrival
    for i in range(3):
        assert broker.health()["status"] == ("ok" if i == 0 else "degraded")
        with pytest.raises(STSUnavailable):
            await broker.get(Role(ROLE, subject=f"user-{i}"))
    health = broker.health()
    assert health["status"] == "unavailable"
    assert health["reasons"][0].startswith(
        "the last 3 exchanges failed: STS answered with credentials that had 10s left"
    )
    assert health["reasons"][1:] == ["last exchange failed: ShortGrant"]
    assert broker.metrics()["exchanges_total"] == [
        {"trigger": "request", "outcome": "unavailable", "code": "ShortGrant", "value": 3}
    ]

    strict_sts.expiration = None
    await broker.get(Role(ROLE, subject="fine"))
    health = broker.health()
    assert health["status"] == "ok"
    assert health["reasons"] == []
    # One more process-wide failure after the success is not three.
    strict_sts.expiration = lambda now, _requested: now + 10
    with pytest.raises(STSUnavailable):
        await broker.get(Role(ROLE, subject="again"))
    assert broker.health()["status"] == "degraded"


async def test_health_unavailable_while_sts_is_unreachable(
    clock: FakeClock, refusing_port: int
) -> None:
    broker = CredentialBroker(
        issuer=ISSUER,
        signing_keys=[KEY],
        sts_endpoint_url=f"http://127.0.0.1:{refusing_port}",
        max_attempts=1,
        connect_timeout=1.0,
        clock=clock,
    )
    try:
        for i in range(3):
            with pytest.raises(STSUnavailable):
                await broker.get(Role(ROLE, subject=f"user-{i}"))
        health = broker.health()
        assert health["status"] == "unavailable"
        assert health["last_failure"]["code"] == "Unreachable"
        assert broker.metrics()["exchanges_total"] == [
            {"trigger": "request", "outcome": "unavailable", "code": "Unreachable", "value": 3}
        ]
        assert broker.metrics()["sts_calls_total"] == sts_calls(3)
    finally:
        await broker.aclose()


@pytest.mark.parametrize("how", ["close", "aclose"])
async def test_health_unavailable_once_closed(
    make_broker: Callable[..., CredentialBroker], clock: FakeClock, how: str
) -> None:
    broker = make_broker(clock=clock)
    await broker.get(Role(ROLE))
    assert broker.health()["status"] == "ok"
    if how == "close":
        broker.close()
    else:
        await broker.aclose()
    health = broker.health()
    assert health["status"] == "unavailable"
    assert health["reasons"] == ["credential broker is closed"]
    assert health["cached_identities"] == 1  # hits are still served


async def test_health_window_follows_the_brokers_clock(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS, clock: FakeClock
) -> None:
    broker = make_broker(clock=clock, max_attempts=1)
    strict_sts.expiration = lambda now, _requested: now + 10
    for i in range(3):
        with pytest.raises(STSUnavailable):
            await broker.get(Role(ROLE, subject=f"user-{i}"))
    assert broker.health()["status"] == "unavailable"
    clock.advance(HEALTH_WINDOW + 1)  # three failures, but more than a minute ago
    health = broker.health()
    assert health["status"] == "degraded"
    assert health["last_failure"]["at"] == T0


async def test_a_request_timeout_is_logged_once_per_exchange_not_per_caller(
    make_broker: Callable[..., CredentialBroker],
    strict_sts: StrictSTS,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="stscreds")
    broker = make_broker(request_timeout=0.3)
    strict_sts.hang = True
    try:
        results = await asyncio.gather(
            *(broker.get(Role(ROLE)) for _ in range(30)), return_exceptions=True
        )
    finally:
        strict_sts.release()
    assert all(isinstance(r, STSUnavailable) for r in results)
    lines = [r for r in caplog.records if "within request_timeout" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].error_code == "Timeout"  # type: ignore[attr-defined]
    assert broker.stats.request_wait.count == 30
    assert broker._waiting == {}


async def test_health_can_be_read_from_another_thread_while_exchanges_fail(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS
) -> None:
    # A WSGI probe thread reads health() while the loop records failures; the failures
    # deque must be copied, not iterated (RuntimeError: deque mutated during iteration).
    broker = make_broker(max_attempts=1, transient_negative_ttl=(0.0, 0.0))
    strict_sts.fail_always("InvalidIdentityToken", 400, "bad token")
    errors: list[BaseException] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            try:
                broker.health()
            except BaseException as error:
                errors.append(error)
                return

    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    thread = threading.Thread(target=probe)
    thread.start()
    try:
        for i in range(150):
            with contextlib.suppress(CredentialsUnavailable):
                await broker.get(Role(ROLE, subject=f"s{i}"))
    finally:
        done.set()
        thread.join()
        sys.setswitchinterval(previous)
    assert errors == []
    assert broker.health()["status"] == "unavailable"


async def test_health_and_log_state_start_afresh_in_a_forked_child(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS
) -> None:
    broker = make_broker(max_attempts=1)
    strict_sts.fail_always("InvalidIdentityToken", 400, "bad token")
    for i in range(3):
        with contextlib.suppress(CredentialsUnavailable):
            await broker.get(Role(ROLE, subject=f"s{i}"))
    assert broker.health()["status"] == "unavailable"
    broker._after_fork()  # what os.register_at_fork runs in the child
    health = broker.health()
    assert health["status"] == "ok"
    assert health["last_failure"] is None and health["last_success_at"] is None


@pytest.mark.parametrize("skew", [600.0, -600.0], ids=["sts-ahead", "sts-behind"])
async def test_a_cold_broker_minutes_off_stss_clock_signs_again_on_stss_time(
    make_broker: Callable[..., CredentialBroker],
    strict_sts: StrictSTS,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
    skew: float,
) -> None:
    # The local clock 10 minutes off STS's: a 5-minute token dated locally has expired (or is
    # not yet valid) when STS reads it. The refusal carries STS's Date: the exchange signs
    # again on STS's time and the first request gets credentials.
    strict_sts.clock = Skewed(clock, skew)
    broker = make_broker(clock=clock, max_attempts=1)
    caplog.set_level(logging.INFO, logger="stscreds")
    credentials = await broker.get(Role(ROLE))
    (event,) = [r for r in caplog.records if r.getMessage().startswith("exchange for")]
    assert event.attempts == 2  # type: ignore[attr-defined]
    assert broker.sts_clock.offset == pytest.approx(skew, abs=2)
    assert credentials.expiration.timestamp() - strict_sts.clock() > MANDATORY_WINDOW
    first, second = strict_sts.requests
    assert first.error_code == "InvalidIdentityToken"
    assert second.error_code is None
    assert second.claims is not None
    assert second.claims["iat"] == pytest.approx(strict_sts.clock(), abs=2)


async def test_a_refused_token_is_signed_again_only_once_and_only_after_a_clock_move(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS, clock: FakeClock
) -> None:
    # STS refuses for a reason of its own (no clock news): one call, the refusal as it came.
    broker = make_broker(clock=clock)
    strict_sts.fail_always("InvalidIdentityToken", 400, "Incorrect token audience")
    with pytest.raises(CredentialsRejected, match="audience"):
        await broker.get(Role(ROLE))
    assert strict_sts.calls == 1
    # STS's clock jumps and it keeps refusing: signed again once, then the refusal.
    strict_sts.reset()
    strict_sts.clock = Skewed(clock, 600.0)
    strict_sts.fail_always("InvalidIdentityToken", 400, "Token is expired")
    with pytest.raises(CredentialsRejected, match="expired"):
        await broker.get(Role(OTHER_ROLE))
    assert strict_sts.calls == 2


async def test_a_retry_after_a_failure_that_taught_stss_clock_is_signed_on_it(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS, clock: FakeClock
) -> None:
    # STS 10 minutes ahead answers a cold broker 503 first: its Date header moves the clock,
    # so the retry's token is dated anew (else it earns a refusal and a third call).
    strict_sts.clock = Skewed(clock, 600.0)
    strict_sts.fail_next(1, "ServiceUnavailable", 503, "Service unavailable")
    broker = make_broker(clock=clock, max_attempts=3)
    broker._exchanger.retry_base_delay = 0.001
    await broker.get(Role(ROLE))
    assert [call.error_code for call in strict_sts.requests] == ["ServiceUnavailable", None]


async def test_closing_during_a_retry_backoff_is_closed_not_an_sts_failure(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS
) -> None:
    strict_sts.fail_always("ServiceUnavailable", 503, "Service unavailable")
    broker = make_broker(max_attempts=3, exchange_deadline=30.0)
    broker._exchanger.retry_base_delay = 2.0  # the first retry waits 1-2 s
    pending = asyncio.ensure_future(broker.get(Role(ROLE)))
    await sts_has_calls(strict_sts, 1)
    broker.close()
    with pytest.raises(STSUnavailable) as raised:
        await asyncio.wait_for(pending, 10)
    assert error_label(raised.value) == "Closed"
    assert strict_sts.calls == 1


async def test_attempts_are_counted_when_the_exchange_is_cancelled(
    make_broker: Callable[..., CredentialBroker],
    strict_sts: StrictSTS,
    caplog: pytest.LogCaptureFixture,
) -> None:
    strict_sts.hang = True
    broker = make_broker()
    caplog.set_level(logging.INFO, logger="stscreds")
    pending = asyncio.ensure_future(broker.get(Role(ROLE)))
    await sts_has_calls(strict_sts, 1)
    await broker.aclose()
    strict_sts.release()
    with contextlib.suppress(STSUnavailable, asyncio.CancelledError):  # aclose cancelled it
        await pending
    (event,) = [r for r in caplog.records if r.getMessage().startswith("exchange for")]
    assert event.attempts == 1  # type: ignore[attr-defined]


# -- replacing the signing keys at runtime ---------------------------------------------------


async def test_set_signing_keys_signs_with_the_new_first_key_and_keeps_the_cache(
    make_broker: Callable[..., CredentialBroker],
    strict_sts: StrictSTS,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = make_broker()
    reader, writer = Role(ROLE, subject="reader"), Role(OTHER_ROLE, subject="writer")
    cached = await broker.get(reader)
    new = SigningKey.generate("ES256", kid="rotated-in")
    caplog.set_level(logging.INFO, logger="stscreds")
    broker.set_signing_keys([new, KEY])
    assert broker.signing_keys == (new, KEY)
    assert [k["kid"] for k in broker.jwks()["keys"]] == ["rotated-in", KEY.kid]
    assert broker.openid_configuration()["id_token_signing_alg_values_supported"] == [
        "ES256",
        "RS256",
    ]
    assert await broker.get(reader) is cached  # still cached: no exchange, no new token
    await broker.get(writer)
    assert len(strict_sts.requests) == 2
    assert jwt.get_unverified_header(token_of(strict_sts))["kid"] == "rotated-in"
    (record,) = [r for r in caplog.records if "signing keys replaced" in r.getMessage()]
    assert record.getMessage() == (
        f"signing keys replaced: rotated-in signs, rotated-in, {KEY.kid} published"
    )
    assert "PRIVATE" not in caplog.text


@pytest.mark.parametrize(
    ("ring", "match"),
    [
        ([], "non-empty sequence"),
        (KEY, "non-empty sequence"),
        (["-----BEGIN PRIVATE KEY-----"], "every item must be a SigningKey"),
        ([KEY, KEY], "share a kid"),
    ],
    ids=["empty", "one-key-not-a-list", "pem-text", "duplicate-kid"],
)
async def test_set_signing_keys_refuses_a_bad_ring_and_keeps_the_old_one(
    make_broker: Callable[..., CredentialBroker], ring: Any, match: str
) -> None:
    broker = make_broker()
    before = broker.signing_keys
    with pytest.raises(ValueError, match=f"signing_keys: .*{match}"):
        broker.set_signing_keys(ring)
    assert broker.signing_keys is before
    assert "BEGIN" not in repr(broker.signing_keys)


async def test_an_exchange_waiting_for_a_thread_signs_with_the_ring_of_the_moment_it_signs(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS
) -> None:
    # An exchange that started before set_signing_keys but signs after it (queued on the
    # pool, or waiting at its gate) must sign with the new first key: the old one may be
    # gone from the JWKS (a leaked key).
    broker = make_broker()
    new = SigningKey.generate("ES256", kid="after")
    gate = broker._exchanger._gate
    gate._lock.acquire()  # every pool thread now waits before it signs
    try:
        pending = asyncio.ensure_future(broker.get(Role(ROLE, subject="reader")))
        await wait_until(lambda: gate._lock.locked() and len(broker._inflight) == 1)
        broker.set_signing_keys([new])
    finally:
        gate._lock.release()
    await pending
    assert jwt.get_unverified_header(token_of(strict_sts))["kid"] == "after"


def test_switching_to_a_key_never_published_warns(
    make_broker: Callable[..., CredentialBroker], caplog: pytest.LogCaptureFixture
) -> None:
    broker = make_broker()
    new = SigningKey.generate("ES256", kid="brand-new")
    caplog.set_level(logging.INFO, logger="stscreds")
    broker.set_signing_keys([KEY, new])  # runbook step 1: publish second
    broker.set_signing_keys([new, KEY])  # step 3: switch to a published key
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    other = SigningKey.generate("ES256", kid="never-published")
    broker.set_signing_keys([other])
    (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.getMessage().startswith(
        "signing with never-published, which was not published before"
    )


# -- a key source re-read on an interval ------------------------------------------------------


class KeyFiles:
    """A key source: the PEM files of a directory, by name (what a mounted secret looks like)."""

    def __init__(self, directory: Any) -> None:
        self.directory = directory
        self.reads = 0
        self.fail: BaseException | None = None

    def write(self, name: str, key: SigningKey) -> None:
        (self.directory / name).write_bytes(key.to_pem())

    def remove(self, name: str) -> None:
        (self.directory / name).unlink()

    def __call__(self) -> list[SigningKey]:
        self.reads += 1
        if self.fail is not None:
            raise self.fail
        return [SigningKey.from_pem(p.read_bytes()) for p in sorted(self.directory.glob("*.pem"))]


@pytest.fixture
def key_files(tmp_path: Any) -> KeyFiles:
    files = KeyFiles(tmp_path)
    files.write("1-current.pem", KEY)
    return files


async def test_a_key_source_is_read_at_start_and_reloaded_when_it_changes(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS, key_files: KeyFiles
) -> None:
    broker = make_broker(signing_keys=key_files, signing_keys_interval=3600)
    assert [k.kid for k in broker.signing_keys] == [KEY.kid]
    cached = await broker.get(Role(ROLE, subject="reader"))
    # Re-read, equal keys (new objects): nothing replaced.
    assert broker.reload_signing_keys() is False
    new = SigningKey.generate("ES256")  # a PEM file holds no kid: the thumbprint is it
    key_files.write("0-new.pem", new)  # sorts first: it signs
    assert broker.reload_signing_keys() is True
    assert [k.kid for k in broker.signing_keys] == [new.kid, KEY.kid]
    assert [k["kid"] for k in broker.jwks()["keys"]] == [new.kid, KEY.kid]
    await broker.get(Role(OTHER_ROLE, subject="writer"))
    assert jwt.get_unverified_header(token_of(strict_sts))["kid"] == new.kid
    assert await broker.get(Role(ROLE, subject="reader")) is cached
    assert key_files.reads == 3


async def test_a_key_source_of_files_follows_the_runbook_by_renaming(
    make_broker: Callable[..., CredentialBroker], strict_sts: StrictSTS, key_files: KeyFiles
) -> None:
    """The deployment guide's directory: file names are the ring's order."""
    broker = make_broker(signing_keys=key_files, signing_keys_interval=3600)
    new = SigningKey.generate("ES256")
    key_files.write("2-next.pem", new)  # step 1: sorts after, published, not signing
    assert broker.reload_signing_keys() is True
    assert [k.kid for k in broker.signing_keys] == [KEY.kid, new.kid]
    await broker.get(Role(ROLE, subject="a"))
    assert jwt.get_unverified_header(token_of(strict_sts))["kid"] == KEY.kid
    (key_files.directory / "2-next.pem").rename(key_files.directory / "0-next.pem")  # step 3
    assert broker.reload_signing_keys() is True
    await broker.get(Role(ROLE, subject="b"))
    assert jwt.get_unverified_header(token_of(strict_sts))["kid"] == new.kid
    key_files.remove("1-current.pem")  # step 4
    assert broker.reload_signing_keys() is True
    assert [k["kid"] for k in broker.jwks()["keys"]] == [new.kid]


@pytest.mark.parametrize(
    ("fault", "logged"),
    [
        (
            ValueError("-----BEGIN PRIVATE KEY----- MIIE..."),
            f"signing key source raised ValueError; keeping the current keys ({KEY.kid} signs)",
        ),
        (
            "empty",
            "signing key source returned a ring that was refused (signing_keys: must be a "
            f"non-empty sequence of SigningKey); keeping the current keys ({KEY.kid} signs)",
        ),
        (
            "corrupt-file",
            "signing key source raised ValueError (pem: not a readable PEM private key); "
            f"keeping the current keys ({KEY.kid} signs)",
        ),
        (
            "unreadable-dir",
            "signing key source raised FileNotFoundError (No such file or directory: {dir}); "
            f"keeping the current keys ({KEY.kid} signs)",
        ),
        (
            "pem-text",
            "signing key source returned a ring that was refused (signing_keys: every item "
            f"must be a SigningKey); keeping the current keys ({KEY.kid} signs)",
        ),
    ],
    ids=["raises", "empty-ring", "corrupt-file", "unreadable-dir", "pem-text"],
)
async def test_a_failing_key_source_keeps_the_ring_and_says_why(
    make_broker: Callable[..., CredentialBroker],
    key_files: KeyFiles,
    caplog: pytest.LogCaptureFixture,
    fault: Any,
    logged: str,
) -> None:
    broker = make_broker(signing_keys=key_files, signing_keys_interval=3600)
    before = broker.signing_keys
    if fault == "empty":
        key_files.remove("1-current.pem")
    elif fault == "pem-text":  # PEM text, not SigningKey objects (as Django's list may hold)
        broker._key_source = lambda: [KEY.to_pem().decode()]
    elif fault == "corrupt-file":
        (key_files.directory / "2-broken.pem").write_bytes(KEY.to_pem()[:100])
    elif fault == "unreadable-dir":
        missing = key_files.directory / "gone"

        def read_missing() -> list[SigningKey]:
            return [SigningKey.from_pem((missing / "key.pem").read_bytes())]

        broker._key_source = read_missing
        logged = logged.replace("{dir}", str(missing / "key.pem"))
    else:
        key_files.fail = fault
    caplog.set_level(logging.WARNING, logger="stscreds")
    assert broker.reload_signing_keys() is False
    assert broker.signing_keys is before
    assert [r.getMessage() for r in caplog.records] == [logged]
    assert "BEGIN" not in caplog.text


async def test_the_broker_polls_its_key_source_on_a_thread_until_closed(
    strict_sts: StrictSTS, key_files: KeyFiles
) -> None:
    broker = CredentialBroker(
        issuer=ISSUER,
        signing_keys=key_files,
        signing_keys_interval=1,
        sts_endpoint_url=strict_sts.url,
    )
    poller = broker._key_poller
    assert poller is not None
    new = SigningKey.generate("ES256")
    key_files.write("0-new.pem", new)
    # A real thread on a real interval: wait for the event it brings, not for time to pass.
    await wait_until(lambda: broker.signing_keys[0].kid == new.kid, timeout=10)
    await broker.aclose()
    poller._thread.join(5)
    assert not poller._thread.is_alive()
    reads = key_files.reads
    await asyncio.sleep(0.1)
    assert key_files.reads == reads  # no reads after close


async def test_key_source_arguments_are_checked(
    make_broker: Callable[..., CredentialBroker], key_files: KeyFiles
) -> None:
    for interval in (0, 0.5, -1, float("nan"), float("inf"), 86_401, True, "60"):
        with pytest.raises(ValueError, match="signing_keys_interval: must be a number"):
            make_broker(signing_keys=key_files, signing_keys_interval=interval)
    key_files.fail = OSError("mount not ready")
    with pytest.raises(OSError, match="mount not ready"):  # at start-up: the caller's error
        make_broker(signing_keys=key_files)
    with pytest.raises(RuntimeError, match="no key source"):
        make_broker().reload_signing_keys()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_polls_its_key_source_with_a_thread_of_its_own(
    strict_sts: StrictSTS, key_files: KeyFiles
) -> None:
    broker = CredentialBroker(
        issuer=ISSUER,
        signing_keys=key_files,
        signing_keys_interval=3600,
        sts_endpoint_url=strict_sts.url,
    )
    try:
        parent = broker._key_poller
        assert parent is not None

        def child() -> bytes:
            poller = broker._key_poller
            fresh = poller is not None and poller is not parent and poller._thread.is_alive()
            return b"fresh" if fresh else b"none"

        assert in_fork(child) == b"fresh"
        assert broker._key_poller is parent and parent._thread.is_alive()
    finally:
        broker.close()
