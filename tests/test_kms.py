"""Tests for stscreds._kms: signing keys held in AWS KMS (moto's KMS over loopback), end to end
through the strict STS, which verifies every token against the broker's published JWKS."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from collections.abc import Iterator
from typing import Any

import botocore.session
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from servers import in_fork
from servers.kms import LocalKMS
from servers.sts import StrictSTS
from stscreds import (
    CredentialsRejected,
    KMSSigningKey,
    Role,
    SigningKey,
    STSUnavailable,
)
from stscreds._metrics import error_label

REGION = "eu-west-1"
ROLE = Role("arn:aws:iam::123456789012:role/kms-signed", subject="tenant:acme")
# (KMS key spec, JWS algorithm, bytes of r and of s for ECDSA; 0 for RSA)
SPECS = [
    ("RSA_2048", "RS256", 0),
    ("RSA_3072", "RS384", 0),
    ("RSA_4096", "RS512", 0),
    ("ECC_NIST_P256", "ES256", 32),
    ("ECC_NIST_P384", "ES384", 48),
    ("ECC_NIST_P521", "ES512", 66),
]


@pytest.fixture(scope="module")
def kms() -> Iterator[LocalKMS]:
    server = LocalKMS().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _no_faults(kms: LocalKMS) -> Iterator[None]:
    kms.clear_faults()
    kms.calls.clear()
    yield
    kms.clear_faults()


def kms_key(kms: LocalKMS, spec: str = "ECC_NIST_P256", **options: Any) -> SigningKey:
    """A KMSSigningKey for a new moto key of ``spec``, via the public constructor."""
    arn = kms.create_signing_key(spec, REGION)
    return SigningKey.from_kms(
        arn, region=REGION, endpoint_url=kms.url, session=kms.session(), **options
    )


def kms_public_key(kms: LocalKMS, key_id: str) -> Any:
    """The key's public half as KMS hands it out, read independently of stscreds."""
    der = kms.client(REGION).get_public_key(KeyId=key_id)["PublicKey"]
    return serialization.load_der_public_key(der)


def sts_headers(sts: StrictSTS) -> list[dict[str, Any]]:
    """The JWT header of every token the STS accepted or refused, in order."""
    return [call.token_header for call in sts.requests_for(ROLE.arn)]


# --- the key and its tokens ------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "alg", "size"), SPECS, ids=[s[0] for s in SPECS])
def test_tokens_verify_with_the_public_key_kms_hands_out(
    kms: LocalKMS, spec: str, alg: str, size: int
) -> None:
    key = kms_key(kms, spec, alg=alg)
    assert isinstance(key, KMSSigningKey)
    assert key.alg == alg
    public = kms_public_key(kms, key.key_arn)
    token = key.sign({"sub": "tenant:acme", "n": 1})
    # Verified with KMS's own public key, not with anything stscreds derived from it.
    claims = jwt.decode(token, key=public, algorithms=[alg])
    assert claims == {"sub": "tenant:acme", "n": 1}
    assert jwt.get_unverified_header(token) == {"alg": alg, "kid": key.kid, "typ": "JWT"}
    signature = jwt.api_jws.base64url_decode(token.rsplit(".", 1)[1].encode())
    if size:
        assert len(signature) == 2 * size  # JWS r || s, not KMS's DER
    else:
        assert isinstance(public, rsa.RSAPublicKey)
        assert len(signature) == public.key_size // 8


@pytest.mark.parametrize(("spec", "alg", "size"), SPECS, ids=[s[0] for s in SPECS])
def test_the_published_jwk_is_the_kms_public_key(
    kms: LocalKMS, spec: str, alg: str, size: int
) -> None:
    key = kms_key(kms, spec, alg=alg)
    jwk = key.public_jwk()
    assert (jwk["alg"], jwk["kid"], jwk["use"]) == (alg, key.kid, "sig")
    published = jwt.PyJWK(jwk).key
    public = kms_public_key(kms, key.key_arn)
    assert published.public_numbers() == public.public_numbers()
    assert not {"d", "p", "q", "dp", "dq", "qi"} & set(jwk)


def test_default_alg_follows_the_key_and_kid_is_the_thumbprint(kms: LocalKMS) -> None:
    rsa_key = kms_key(kms, "RSA_2048")
    ec_key = kms_key(kms, "ECC_NIST_P384")
    assert (rsa_key.alg, ec_key.alg) == ("RS256", "ES384")
    # The kid is the RFC 7638 thumbprint, as for a PEM key of the same public key: every
    # worker (and every restart) names the KMS key the same way.
    public = kms_public_key(kms, ec_key.key_arn)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    fresh = kms_key(kms, "ECC_NIST_P384")
    assert fresh.kid != ec_key.kid
    again = SigningKey.from_kms(
        ec_key.key_arn, region=REGION, endpoint_url=kms.url, session=kms.session()
    )
    assert again.kid == ec_key.kid
    named = kms_key(kms, "ECC_NIST_P256", kid="issuer-2026")
    assert named.kid == "issuer-2026"


def test_an_alias_is_resolved_once_so_a_moved_alias_cannot_break_tokens(kms: LocalKMS) -> None:
    first = kms.create_signing_key("ECC_NIST_P256", REGION)
    second = kms.create_signing_key("ECC_NIST_P256", REGION)
    client = kms.client(REGION)
    client.create_alias(AliasName="alias/stscreds-move", TargetKeyId=first)
    key = SigningKey.from_kms(
        "alias/stscreds-move", region=REGION, endpoint_url=kms.url, session=kms.session()
    )
    assert isinstance(key, KMSSigningKey)
    assert (key.key_id, key.key_arn.rsplit("/", 1)[-1]) == (
        "alias/stscreds-move",
        first.rsplit("/", 1)[1],
    )
    client.update_alias(AliasName="alias/stscreds-move", TargetKeyId=second)
    token = key.sign({"sub": "x"})
    # Still signed by the key the JWKS publishes.
    assert jwt.decode(token, key=jwt.PyJWK(key.public_jwk()).key, algorithms=["ES256"])


def test_the_private_key_cannot_be_exported_and_the_repr_names_the_key(kms: LocalKMS) -> None:
    key = kms_key(kms)
    assert isinstance(key, KMSSigningKey)
    with pytest.raises(TypeError, match="held in KMS"):
        key.to_pem()
    assert repr(key) == f"KMSSigningKey(key_id={key.key_id!r}, alg='ES256', kid={key.kid!r})"


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda k: ("", {}), ValueError, "key_id: must be"),
        (lambda k: ("no-such-key", {}), ValueError, "key_id: .*NotFoundException"),
        (
            lambda k: (k.client(REGION).create_key()["KeyMetadata"]["Arn"], {}),
            ValueError,
            "not an asymmetric SIGN_VERIFY key",
        ),
        (
            lambda k: (k.create_signing_key("RSA_2048", REGION), {"alg": "ES256"}),
            ValueError,
            "alg: 'ES256' does not fit an RSA key",
        ),
        (
            lambda k: (k.create_signing_key("ECC_NIST_P256", REGION), {"alg": "PS256"}),
            ValueError,
            "alg: must be None or one of",
        ),
        (lambda k: ("x", {"read_timeout": 0}), ValueError, "read_timeout"),
        (lambda k: ("x", {"session": object()}), TypeError, "session"),
        (
            lambda k: (
                k.client(REGION).create_key(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")[
                    "KeyMetadata"
                ]["Arn"],
                {},
            ),
            ValueError,
            "not an asymmetric SIGN_VERIFY key",
        ),
    ],
    ids=["empty", "unknown", "symmetric", "alg-mismatch", "pss", "timeout", "session", "hmac"],
)
def test_bad_setups_fail_at_construction_naming_the_parameter(
    kms: LocalKMS, make: Any, error: type[Exception], match: str
) -> None:
    key_id, options = make(kms)
    options.setdefault("session", kms.session())
    with pytest.raises(error, match=match):
        SigningKey.from_kms(key_id, region=REGION, endpoint_url=kms.url, **options)


def test_a_throttled_get_public_key_at_start_up_is_tried_three_times(kms: LocalKMS) -> None:
    arn = kms.create_signing_key("ECC_NIST_P256", REGION)
    kms.calls.clear()
    kms.fail("ThrottlingException", "Rate exceeded", times=2, operation="GetPublicKey")
    key = SigningKey.from_kms(arn, region=REGION, endpoint_url=kms.url, session=kms.session())
    assert key.alg == "ES256"
    assert kms.calls["GetPublicKey"] == 3
    kms.fail("ThrottlingException", "Rate exceeded", operation="GetPublicKey")
    with pytest.raises(
        STSUnavailable, match=r"KMS ThrottlingException reading the public key of .*Rate exceeded"
    ):
        SigningKey.from_kms(arn, region=REGION, endpoint_url=kms.url, session=kms.session())
    assert kms.calls["GetPublicKey"] == 6


def test_start_up_without_credentials_or_kms_says_which(
    kms: LocalKMS, monkeypatch: pytest.MonkeyPatch
) -> None:
    arn = kms.create_signing_key("ECC_NIST_P256", REGION)
    bare = botocore.session.Session()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(STSUnavailable, match="no AWS credentials for KMS reading the public key"):
        SigningKey.from_kms(arn, region=REGION, endpoint_url=kms.url, session=bare)
    with pytest.raises(STSUnavailable, match="KMS unreachable reading the public key of"):
        SigningKey.from_kms(
            arn, region=REGION, endpoint_url="http://127.0.0.1:9", session=kms.session()
        )


def test_a_boto3_session_is_accepted(kms: LocalKMS) -> None:
    import boto3

    arn = kms.create_signing_key("ECC_NIST_P256", REGION)
    session = boto3.Session(aws_access_key_id="testing", aws_secret_access_key="testing")
    key = SigningKey.from_kms(arn, region=REGION, endpoint_url=kms.url, session=session)
    assert jwt.decode(key.sign({"sub": "x"}), key=kms_public_key(kms, arn), algorithms=["ES256"])


def test_without_a_region_the_error_says_so(
    kms: LocalKMS, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(ValueError, match="region: none given, key_id is no ARN"):
        SigningKey.from_kms("x", endpoint_url=kms.url, session=kms.session())
    # A key ARN names its region; so does AWS_REGION (botocore reads only AWS_DEFAULT_REGION).
    arn = kms.create_signing_key("ECC_NIST_P256", REGION)
    assert SigningKey.from_kms(arn, endpoint_url=kms.url, session=kms.session()).alg == "ES256"
    monkeypatch.setenv("AWS_REGION", REGION)
    key_id = arn.rsplit("/", 1)[1]
    assert SigningKey.from_kms(key_id, endpoint_url=kms.url, session=kms.session()).alg == "ES256"


# --- end to end through the strict STS -------------------------------------------------------


async def test_kms_signed_tokens_are_accepted_by_the_strict_sts(
    kms: LocalKMS, strict_sts: StrictSTS
) -> None:
    key = kms_key(kms, "RSA_2048")
    broker = strict_sts.make_broker(signing_keys=[key])
    try:
        credentials = await broker.get(ROLE)
        assert await broker.get(ROLE) is credentials  # a hit: no second signature
    finally:
        broker.close()
    assert strict_sts.calls_for(ROLE.arn) == 1
    assert kms.calls["Sign"] == 1
    (call,) = strict_sts.requests_for(ROLE.arn)
    assert call.token_header["kid"] == key.kid
    assert call.claims["sub"] == "tenant:acme"


@pytest.mark.parametrize("kms_first", [True, False], ids=["kms-signs", "pem-signs"])
async def test_mixed_rings_publish_both_keys_and_sign_with_the_first(
    kms: LocalKMS, strict_sts: StrictSTS, kms_first: bool
) -> None:
    remote, local = kms_key(kms, "ECC_NIST_P256"), SigningKey.generate("RS256")
    ring = [remote, local] if kms_first else [local, remote]
    broker = strict_sts.make_broker(signing_keys=ring)
    try:
        assert [k["kid"] for k in broker.jwks()["keys"]] == [k.kid for k in ring]
        assert broker.openid_configuration()["id_token_signing_alg_values_supported"] == [
            k.alg for k in ring
        ]
        await broker.get(ROLE)
    finally:
        broker.close()
    assert sts_headers(strict_sts)[0]["kid"] == ring[0].kid
    assert kms.calls["Sign"] == (1 if kms_first else 0)


async def test_many_identities_sign_in_parallel_not_one_at_a_time(
    kms: LocalKMS, strict_sts: StrictSTS
) -> None:
    # While a Sign call is on the wire its thread steps off the STS pool's gate; if it did
    # not, the server would never see two Sign calls at once.
    key = kms_key(kms)
    kms.delay = 0.2
    kms.max_signing = 0
    broker = strict_sts.make_broker(signing_keys=[key])
    roles = [Role(f"arn:aws:iam::123456789012:role/r{i}", subject=f"t:{i}") for i in range(8)]
    try:
        got = await asyncio.gather(*(broker.get(role) for role in roles))
    finally:
        broker.close()
    assert len({c.access_key_id for c in got}) == 8
    assert kms.max_signing > 1


async def test_a_transient_kms_error_is_retried_within_the_exchange(
    kms: LocalKMS, strict_sts: StrictSTS
) -> None:
    key = kms_key(kms)
    kms.fail("ThrottlingException", "Rate exceeded", times=1)
    broker = strict_sts.make_broker(signing_keys=[key], max_attempts=3)
    try:
        await broker.get(ROLE)
    finally:
        broker.close()
    assert kms.calls["Sign"] == 2
    assert strict_sts.calls_for(ROLE.arn) == 1


@pytest.mark.parametrize(
    ("code", "status", "error", "label", "sign_calls"),
    [
        ("AccessDeniedException", 400, CredentialsRejected, "SigningRejected", 1),
        ("DisabledException", 400, CredentialsRejected, "SigningRejected", 1),
        ("KMSInvalidStateException", 400, CredentialsRejected, "SigningRejected", 1),
        ("KMSInternalException", 500, STSUnavailable, "SigningUnavailable", 3),
        ("ThrottlingException", 400, STSUnavailable, "SigningUnavailable", 3),
    ],
)
async def test_kms_errors_map_like_sts_errors_and_keep_kms_message(
    kms: LocalKMS,
    strict_sts: StrictSTS,
    caplog: pytest.LogCaptureFixture,
    code: str,
    status: int,
    error: type[Exception],
    label: str,
    sign_calls: int,
) -> None:
    key = kms_key(kms)
    assert isinstance(key, KMSSigningKey)
    message = f"User: arn:aws:sts::123456789012:assumed-role/app is not allowed ({code})"
    kms.fail(code, message, status=status)
    broker = strict_sts.make_broker(signing_keys=[key], max_attempts=3, exchange_deadline=30.0)
    broker._exchanger.retry_base_delay = 0.01
    caplog.set_level(logging.INFO, logger="stscreds")
    try:
        with pytest.raises(error) as raised:
            await broker.get(ROLE)
    finally:
        broker.close()
    failure = raised.value
    assert isinstance(failure, CredentialsRejected | STSUnavailable)
    assert type(failure) is not error or error is STSUnavailable
    assert failure.code == code
    assert failure.role_arn == ROLE.arn
    assert failure.message == f"KMS {code} signing with {key.key_id}: {message}"
    assert error_label(failure) == label
    assert kms.calls["Sign"] == sign_calls
    assert strict_sts.calls_for(ROLE.arn) == 0  # nothing reached STS
    assert "eyJ" not in caplog.text
    assert any(message in r.getMessage() for r in caplog.records)


async def test_a_hung_kms_is_bounded_by_the_exchange_deadline_and_sts_is_never_called(
    kms: LocalKMS, strict_sts: StrictSTS
) -> None:
    key = kms_key(kms, read_timeout=30.0)
    kms.delay = 1.0
    broker = strict_sts.make_broker(signing_keys=[key], exchange_deadline=0.3)
    try:
        with pytest.raises(STSUnavailable) as raised:
            await asyncio.wait_for(broker.get(ROLE), 10)
    finally:
        broker.close()
    assert raised.value.message == "signing the token did not finish within 0.3s"
    assert error_label(raised.value) == "SigningUnavailable"
    # The signature arrives after the caller has gone: it is not sent to STS.
    assert not await asyncio.to_thread(strict_sts.wait_for_calls, 1, 2.0)
    assert kms.calls["Sign"] == 1


async def test_a_throttled_sts_costs_no_kms_signature_for_calls_the_budget_holds_back(
    kms: LocalKMS, strict_sts: StrictSTS
) -> None:
    key = kms_key(kms)
    strict_sts.fail_always("Throttling", 400, "Rate exceeded")
    broker = strict_sts.make_broker(
        signing_keys=[key], max_attempts=1, transient_negative_ttl=(0, 0), max_workers=8
    )
    roles = [Role(f"arn:aws:iam::123456789012:role/t{i}", subject=f"t:{i}") for i in range(80)]
    try:
        results = await asyncio.gather(*(broker.get(r) for r in roles), return_exceptions=True)
    finally:
        broker.close()
    assert all(isinstance(r, STSUnavailable) for r in results)
    assert sum(1 for r in results if error_label(r) == "BudgetRefused") > 0  # type: ignore[arg-type]
    # The budget is asked before signing: once it has closed, no signature is made for a call
    # it holds back. Only tokens being signed when it closed (at most one per pool thread)
    # are not sent: the budget is asked again as the call goes out, and wins.
    assert strict_sts.calls <= kms.calls["Sign"] <= strict_sts.calls + 8
    assert kms.calls["Sign"] < len(roles) // 2


async def test_attempts_count_the_calls_that_reached_sts_not_failed_signatures(
    kms: LocalKMS, strict_sts: StrictSTS, caplog: pytest.LogCaptureFixture
) -> None:
    key = kms_key(kms)
    kms.fail("ThrottlingException", "Rate exceeded", times=1)
    broker = strict_sts.make_broker(signing_keys=[key], max_attempts=3)
    caplog.set_level(logging.INFO, logger="stscreds")
    try:
        await broker.get(ROLE)
    finally:
        broker.close()
    (event,) = [r for r in caplog.records if r.getMessage().startswith("exchange for")]
    assert event.attempts == 1  # type: ignore[attr-defined]
    assert (kms.calls["Sign"], strict_sts.calls) == (2, 1)


async def test_an_unreachable_kms_is_unavailable_and_names_the_endpoint(
    strict_sts: StrictSTS,
) -> None:
    # A KMS that answered at start-up and then went away.
    gone = LocalKMS().start()
    try:
        key = kms_key(gone)
    finally:
        gone.stop()
    broker = strict_sts.make_broker(signing_keys=[key], max_attempts=1)
    try:
        with pytest.raises(STSUnavailable, match=f"KMS unreachable signing with .*{gone.url}"):
            await broker.get(ROLE)
    finally:
        broker.close()
    assert strict_sts.calls_for(ROLE.arn) == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("own_session", [False, True], ids=["session-given", "default-session"])
def test_a_forked_worker_signs_on_a_client_of_its_own(
    kms: LocalKMS, monkeypatch: pytest.MonkeyPatch, own_session: bool
) -> None:
    # gunicorn --preload: the key is built (GetPublicKey, a pooled connection) in the parent.
    if own_session:  # botocore's default chain: the environment's fake credentials
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
        key = SigningKey.from_kms(
            kms.create_signing_key("ECC_NIST_P256", REGION), region=REGION, endpoint_url=kms.url
        )
    else:
        key = kms_key(kms)
    assert isinstance(key, KMSSigningKey)
    parent_client, parent_session = key._client, key._session

    def child() -> bytes:  # sign, verify, report
        token = key.sign({"sub": "forked"})
        jwt.decode(token, key=jwt.PyJWK(key.public_jwk()).key, algorithms=["ES256"])
        client = b"fresh" if key._client is not parent_client else b"shared"
        # A session of the key's own is made anew (its locks may be held by a parent thread);
        # a session the app gave is the app's to manage.
        session = b"+session" if key._session is not parent_session else b""
        return client + session

    assert in_fork(child) == (b"fresh+session" if own_session else b"fresh")
    assert key._client is parent_client  # the parent keeps its own
    assert jwt.decode(key.sign({"sub": "parent"}), options={"verify_signature": False})


def test_botocore_debug_logging_of_kms_holds_neither_the_token_nor_the_session_token(
    kms: LocalKMS, caplog: pytest.LogCaptureFixture
) -> None:
    # KMS Sign's message and its signature together are a valid token, for token_ttl.
    session = kms.session()
    session.set_credentials("AKIATESTING", "secret-SECRETKEYVALUE", "token-SESSIONTOKENVALUE")
    caplog.set_level(logging.DEBUG, logger="botocore")
    arn = kms.create_signing_key("ECC_NIST_P256", REGION)
    key = SigningKey.from_kms(arn, region=REGION, endpoint_url=kms.url, session=session)
    token = key.sign({"sub": "tenant:acme"})
    signing_input, _, signature = token.rpartition(".")
    raw = jwt.api_jws.base64url_decode(signature.encode())
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "TrentService.Sign" in text and '"Signature"' in text  # the calls were logged
    for secret in (
        base64.b64encode(signing_input.encode()).decode()[:40],  # Sign's Message
        base64.b64encode(der).decode()[:40],  # KMS's signature
        signature[:40],
        "SESSIONTOKENVALUE",
        "SECRETKEYVALUE",
    ):
        assert secret not in text
