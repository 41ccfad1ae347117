"""Tests for stscreds._signing: signing keys, kid thumbprints, minted JWTs, OIDC documents."""

from __future__ import annotations

import base64
import functools
import gc
import hashlib
import json
import threading
import time
from collections.abc import Sequence
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from stscreds._clock import SystemClock
from stscreds._signing import (
    KeySourcePoller,
    SigningKey,
    TokenMinter,
    _thumbprint,
    validate_issuer,
)

ALGS = ["RS256", "RS384", "RS512", "ES256", "ES384", "ES512"]
EC_CURVES = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}
JWK_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
PRIVATE_JWK_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}
ISSUER = "https://issuer.example.com"
AUDIENCE = "sts.amazonaws.com"
NOW = 1_700_000_000

# RFC 7638 section 3.1: this JWK's thumbprint is NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs.
RFC7638_JWK = {
    "kty": "RSA",
    "n": (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJEC"
        "PebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2Qvz"
        "qY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu"
        "0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    ),
    "e": "AQAB",
    "alg": "RS256",
    "kid": "2011-04-29",
}
RFC7638_THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


class FixedClock:
    """A clock that always answers ``now``."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


@functools.cache
def key_for(alg: str) -> SigningKey:
    """One generated key per algorithm, shared by the module (RSA generation is slow)."""
    return SigningKey.generate(alg)


def private_key_of(key: SigningKey) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    loaded = serialization.load_pem_private_key(key.to_pem(), password=None)
    assert isinstance(loaded, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
    return loaded


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_uint(value: int, length: int | None = None) -> str:
    size = length if length is not None else max(1, (value.bit_length() + 7) // 8)
    return b64url(value.to_bytes(size, "big"))


def independent_thumbprint(private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    """RFC 7638 thumbprint computed straight from the public numbers, not from any JWK."""
    if isinstance(private, rsa.RSAPrivateKey):
        numbers = private.public_key().public_numbers()
        text = f'{{"e":"{b64url_uint(numbers.e)}","kty":"RSA","n":"{b64url_uint(numbers.n)}"}}'
    else:
        ec_numbers = private.public_key().public_numbers()
        size = (private.curve.key_size + 7) // 8
        crv = JWK_CURVE_NAMES[private.curve.name]
        x, y = b64url_uint(ec_numbers.x, size), b64url_uint(ec_numbers.y, size)
        text = f'{{"crv":"{crv}","kty":"EC","x":"{x}","y":"{y}"}}'
    return b64url(hashlib.sha256(text.encode()).digest())


def make_minter(
    keys: Sequence[SigningKey] | None = None,
    *,
    issuer: str = ISSUER,
    audience: str = AUDIENCE,
    token_ttl: int = 300,
    clock: Any = None,
) -> TokenMinter:
    return TokenMinter(
        issuer=issuer,
        audience=audience,
        keys=[key_for("ES256")] if keys is None else keys,
        token_ttl=token_ttl,
        clock=FixedClock(NOW) if clock is None else clock,
    )


def verify(minter: TokenMinter, token: str, *, check_times: bool = False) -> dict[str, Any]:
    """Verify ``token`` the way a relying party would: against the minter's published JWKS."""
    key_set = jwt.PyJWKSet.from_dict(json.loads(json.dumps(minter.jwks())))
    public = key_set[jwt.get_unverified_header(token)["kid"]]
    return jwt.decode(
        token,
        public.key,
        algorithms=[public.algorithm_name],
        audience=minter.audience,
        issuer=minter.issuer,
        options={
            "require": ["iss", "sub", "aud", "exp", "iat", "nbf", "jti"],
            "verify_exp": check_times,
            "verify_iat": check_times,
            "verify_nbf": check_times,
        },
    )


def assert_rejected(field: str, call: Any) -> ValueError:
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value).startswith(f"{field}:"), str(info.value)
    return info.value


# --- SigningKey ------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ALGS)
def test_generate_makes_a_key_for_each_algorithm(alg: str) -> None:
    key = key_for(alg)
    private = private_key_of(key)
    assert key.alg == alg
    if alg.startswith("RS"):
        assert isinstance(private, rsa.RSAPrivateKey)
        assert private.key_size == 2048
    else:
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(private.curve, EC_CURVES[alg])


@pytest.mark.parametrize("alg", ALGS)
def test_public_jwk_describes_the_public_key_only(alg: str) -> None:
    key = key_for(alg)
    jwk = key.public_jwk()
    assert jwk["kid"] == key.kid
    assert jwk["alg"] == alg
    assert jwk["use"] == "sig"
    assert jwk["kty"] == ("RSA" if alg.startswith("RS") else "EC")
    assert not PRIVATE_JWK_MEMBERS & set(jwk)


def test_public_jwk_returns_a_copy() -> None:
    key = key_for("ES256")
    key.public_jwk()["kid"] = "tampered"
    assert key.public_jwk()["kid"] == key.kid


@pytest.mark.parametrize("alg", ["HS256", "none", "EdDSA", "rs256", "PS256", ""])
def test_generate_rejects_unknown_algorithms(alg: str) -> None:
    assert_rejected("alg", lambda: SigningKey.generate(alg))


def test_generate_uses_given_kid() -> None:
    assert SigningKey.generate("ES256", kid="my-key-2024").kid == "my-key-2024"


@pytest.mark.parametrize("kid", ["", 42])
def test_invalid_kid_is_rejected(kid: Any) -> None:
    assert_rejected("kid", lambda: SigningKey.generate("ES256", kid=kid))


@pytest.mark.parametrize("alg", ALGS)
def test_kid_is_the_rfc7638_thumbprint(alg: str) -> None:
    key = key_for(alg)
    assert key.kid == independent_thumbprint(private_key_of(key))


def test_generated_keys_get_distinct_kids() -> None:
    assert len({SigningKey.generate("ES256").kid for _ in range(20)}) == 20


def test_thumbprint_matches_rfc7638_example() -> None:
    assert _thumbprint(RFC7638_JWK) == RFC7638_THUMBPRINT


def test_thumbprint_ignores_non_required_members() -> None:
    extended = {**RFC7638_JWK, "use": "sig", "kid": "other", "alg": "RS512", "x5t": "abc"}
    assert _thumbprint(extended) == RFC7638_THUMBPRINT


def _ec_key_with_short_x(curve: ec.EllipticCurve) -> ec.EllipticCurvePrivateKey:
    """The first deterministic key whose x coordinate has a leading zero byte."""
    size = (curve.key_size + 7) // 8
    for secret in range(1, 20_000):
        private = ec.derive_private_key(secret, curve)
        if private.public_key().public_numbers().x.bit_length() <= 8 * (size - 1):
            return private
    raise AssertionError("no key with a short x coordinate found")


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP521R1()], ids=["P-256", "P-521"])
def test_ec_coordinates_keep_leading_zero_bytes(curve: ec.EllipticCurve) -> None:
    # RFC 7518 6.2.1.2: x and y are the full coordinate length; a minimal encoding would
    # produce a different kid than other implementations compute.
    private = _ec_key_with_short_x(curve)
    key = SigningKey(private)
    size = (curve.key_size + 7) // 8
    x = base64.urlsafe_b64decode(key.public_jwk()["x"] + "==")
    assert len(x) == size
    assert x[0] == 0
    assert key.kid == independent_thumbprint(private)


@pytest.mark.parametrize("alg", ALGS)
def test_pem_round_trip_keeps_kid_and_alg(alg: str) -> None:
    key = key_for(alg)
    pem = key.to_pem()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = SigningKey.from_pem(pem)
    assert loaded.kid == key.kid
    # A PEM does not record which RS* was chosen: RSA keys load as RS256 unless told.
    assert loaded.alg == (alg if alg.startswith("ES") else "RS256")
    assert {**loaded.public_jwk(), "alg": alg} == key.public_jwk()
    assert SigningKey.from_pem(pem, alg=alg).public_jwk() == key.public_jwk()


def test_from_pem_accepts_text() -> None:
    key = key_for("ES384")
    assert SigningKey.from_pem(key.to_pem().decode()).kid == key.kid


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_from_pem_accepts_traditional_openssl_format(alg: str) -> None:
    key = key_for(alg)
    pem = private_key_of(key).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    assert b"BEGIN PRIVATE KEY" not in pem
    assert SigningKey.from_pem(pem).kid == key.kid


def test_from_pem_with_explicit_kid_and_alg() -> None:
    key = SigningKey.from_pem(key_for("RS256").to_pem(), kid="rotating-2", alg="RS512")
    assert (key.kid, key.alg) == ("rotating-2", "RS512")
    assert key.public_jwk()["kid"] == "rotating-2"
    assert key.public_jwk()["alg"] == "RS512"
    header = jwt.get_unverified_header(key.sign({"sub": "x"}))
    assert (header["kid"], header["alg"]) == ("rotating-2", "RS512")


def test_from_pem_with_password() -> None:
    key = key_for("ES256")
    encrypted = private_key_of(key).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"correct horse"),
    )
    assert SigningKey.from_pem(encrypted, password=b"correct horse").kid == key.kid
    assert_rejected("pem", lambda: SigningKey.from_pem(encrypted))
    assert_rejected("pem", lambda: SigningKey.from_pem(encrypted, password=b"wrong"))


@pytest.mark.parametrize(
    ("alg", "wrong"),
    [("RS256", "ES256"), ("RS256", "HS256"), ("ES256", "ES384"), ("ES384", "RS256")],
)
def test_from_pem_rejects_an_alg_that_does_not_fit_the_key(alg: str, wrong: str) -> None:
    pem = key_for(alg).to_pem()
    assert_rejected("alg", lambda: SigningKey.from_pem(pem, alg=wrong))


def _truncated_pem() -> bytes:
    lines = key_for("RS256").to_pem().splitlines()
    return b"\n".join(lines[: len(lines) // 2] + lines[-1:])


@pytest.mark.parametrize(
    "pem",
    [
        pytest.param(b"this is not a key", id="garbage"),
        pytest.param(
            b"-----BEGIN PRIVATE KEY-----\n"
            b"R0FSQkFHRS1LRVktTUFURVJJQUw=\n"
            b"-----END PRIVATE KEY-----\n",
            id="garbage-in-armor",
        ),
        pytest.param(_truncated_pem(), id="truncated"),
        pytest.param(b"", id="empty"),
    ],
)
def test_from_pem_rejects_unreadable_pem_without_echoing_it(pem: bytes) -> None:
    error = assert_rejected("pem", lambda: SigningKey.from_pem(pem))
    message = str(error)
    for line in pem.decode().splitlines():
        if len(line) >= 8 and not line.startswith("-----"):
            assert line not in message
    # The loader's own exception (which could quote the input) is not chained either.
    assert error.__cause__ is None
    assert error.__suppress_context__


def test_from_pem_rejects_a_public_key() -> None:
    public_pem = (
        private_key_of(key_for("ES256"))
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    assert_rejected("pem", lambda: SigningKey.from_pem(public_pem))


def test_small_rsa_key_is_rejected() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    assert_rejected("key", lambda: SigningKey(small))
    pem = small.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert_rejected("key", lambda: SigningKey.from_pem(pem))


def test_ed25519_key_is_rejected() -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    assert_rejected("key", lambda: SigningKey(private))  # type: ignore[arg-type]
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert_rejected("pem", lambda: SigningKey.from_pem(pem))


def test_ec_key_on_unsupported_curve_is_rejected() -> None:
    private = ec.generate_private_key(ec.SECP256K1())
    assert_rejected("key", lambda: SigningKey(private))


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_repr_shows_alg_and_kid_but_no_key_material(alg: str) -> None:
    key = key_for(alg)
    text = repr(key)
    assert text == f"SigningKey(alg={alg!r}, kid={key.kid!r})"
    private = private_key_of(key)
    if isinstance(private, rsa.RSAPrivateKey):
        secret_numbers = [private.private_numbers().d, private.private_numbers().p]
        public_parts = [key.public_jwk()["n"]]
    else:
        secret_numbers = [private.private_numbers().private_value]
        public_parts = [key.public_jwk()["x"], key.public_jwk()["y"]]
    for number in secret_numbers:
        assert str(number) not in text
        assert b64url_uint(number)[:16] not in text
    for part in public_parts:
        assert part[:16] not in text
    assert "BEGIN" not in text


def test_sign_produces_a_verifiable_jwt_with_header() -> None:
    key = key_for("RS384")
    token = key.sign({"sub": "alice", "n": 1})
    assert jwt.get_unverified_header(token) == {"alg": "RS384", "kid": key.kid, "typ": "JWT"}
    public = jwt.PyJWK(key.public_jwk())
    assert jwt.decode(token, public.key, algorithms=["RS384"]) == {"sub": "alice", "n": 1}


# --- TokenMinter: minting --------------------------------------------------------------------


@pytest.mark.parametrize("alg", ALGS)
def test_minted_token_verifies_against_the_published_jwks(alg: str) -> None:
    minter = make_minter([key_for(alg)], clock=SystemClock())
    claims = verify(minter, minter.mint("alice"), check_times=True)
    assert claims["sub"] == "alice"


def test_minted_token_header() -> None:
    key = key_for("ES256")
    token = make_minter([key]).mint("alice")
    assert jwt.get_unverified_header(token) == {"alg": "ES256", "kid": key.kid, "typ": "JWT"}


def test_minted_token_hides_in_its_repr_but_is_the_jwt_as_a_string() -> None:
    minter = make_minter()
    token = minter.mint("alice", {"tenant": "acme"})
    text = str(token)
    payload = text.split(".")[1]
    # botocore logs request parameters with %r of a dict holding the token.
    for shown in (repr(token), repr({"WebIdentityToken": token}), repr([token])):
        assert payload not in shown
        assert "<web identity token>" in shown
    # Everywhere it is used as text, it is the real token.
    assert isinstance(token, str) and token == text and type(text) is str
    assert f"{token}" == text and "%s" % token == text  # noqa: UP031
    assert text.count(".") == 2 and token.encode() == text.encode()
    assert json.loads(json.dumps({"t": token})) == {"t": text}
    assert verify(minter, token)["tenant"] == "acme"


def test_minted_token_registered_claims() -> None:
    minter = make_minter(token_ttl=900)
    claims = verify(minter, minter.mint("user-42"))
    assert claims["iss"] == ISSUER
    assert claims["sub"] == "user-42"
    assert claims["aud"] == AUDIENCE
    assert claims["iat"] == NOW
    assert claims["nbf"] == NOW
    assert claims["exp"] == NOW + 900
    assert isinstance(claims["jti"], str) and len(claims["jti"]) >= 16


def test_timestamps_are_integers_taken_from_the_injected_clock() -> None:
    minter = make_minter(clock=FixedClock(NOW + 0.987), token_ttl=60)
    claims = verify(minter, minter.mint("alice"))
    for name in ("iat", "nbf", "exp"):
        assert type(claims[name]) is int
    assert claims["iat"] == NOW
    assert claims["exp"] == NOW + 60


def test_clock_is_read_at_each_mint() -> None:
    clock = FixedClock(NOW)
    minter = make_minter(clock=clock)
    first = verify(minter, minter.mint("alice"))
    clock.now = NOW + 1234
    second = verify(minter, minter.mint("alice"))
    assert (first["iat"], second["iat"]) == (NOW, NOW + 1234)


def test_jti_is_unique_per_token() -> None:
    minter = make_minter()
    jtis = {jwt.decode(minter.mint("alice"), options={"verify_signature": False})["jti"]}
    jtis |= {
        jwt.decode(minter.mint("alice"), options={"verify_signature": False})["jti"]
        for _ in range(999)
    }
    assert len(jtis) == 1000


def test_role_claims_are_included() -> None:
    minter = make_minter()
    extra = {"team": "data", "groups": ["a", "b"], "tier": 2, "nested": {"x": True}}
    claims = verify(minter, minter.mint("alice", extra))
    assert {name: claims[name] for name in extra} == extra


def test_extra_claims_cannot_override_registered_claims() -> None:
    minter = make_minter()
    extra = {"iss": "https://evil.example", "sub": "root", "aud": "other", "exp": 1, "team": "a"}
    claims = verify(minter, minter.mint("alice", extra))
    assert (claims["iss"], claims["sub"], claims["aud"]) == (ISSUER, "alice", AUDIENCE)
    assert claims["exp"] == NOW + minter.token_ttl
    assert claims["team"] == "a"
    assert extra["iss"] == "https://evil.example"  # the caller's mapping is not modified


# --- TokenMinter: rotation and documents -----------------------------------------------------


def test_first_key_signs_and_all_keys_are_published() -> None:
    current, previous = key_for("RS256"), key_for("ES256")
    minter = make_minter([current, previous])
    token = minter.mint("alice")
    assert jwt.get_unverified_header(token)["kid"] == current.kid
    assert [jwk["kid"] for jwk in minter.jwks()["keys"]] == [current.kid, previous.kid]
    assert verify(minter, token)["sub"] == "alice"


def test_token_signed_by_the_previous_key_still_verifies_after_rotation() -> None:
    old, new = key_for("ES384"), key_for("RS512")
    old_token = make_minter([old]).mint("alice")
    rotated = make_minter([new, old])
    assert verify(rotated, old_token)["sub"] == "alice"


def test_jwks_is_json_and_has_no_private_members() -> None:
    minter = make_minter([key_for(alg) for alg in ALGS])
    document = json.loads(json.dumps(minter.jwks()))
    assert set(document) == {"keys"}
    assert len(document["keys"]) == len(ALGS)
    for jwk in document["keys"]:
        assert not PRIVATE_JWK_MEMBERS & set(jwk)
        assert jwk["use"] == "sig"


def test_openid_configuration_lists_each_alg_once_in_key_order() -> None:
    second_rs256 = SigningKey.from_pem(key_for("RS256").to_pem(), kid="second")
    minter = make_minter([key_for("RS256"), key_for("ES256"), second_rs256])
    assert minter.openid_configuration()["id_token_signing_alg_values_supported"] == [
        "RS256",
        "ES256",
    ]


def test_openid_configuration_has_issuer_jwks_uri_and_required_fields() -> None:
    document = make_minter(issuer="https://issuer.example.com/tenant-a/").openid_configuration()
    assert document["issuer"] == "https://issuer.example.com/tenant-a"
    assert document["jwks_uri"] == "https://issuer.example.com/tenant-a/.well-known/jwks.json"
    for name in (
        "response_types_supported",
        "subject_types_supported",
        "id_token_signing_alg_values_supported",
    ):
        assert isinstance(document[name], list) and document[name]
    assert "none" not in document["id_token_signing_alg_values_supported"]
    assert json.loads(json.dumps(document)) == document


def test_minted_iss_matches_discovery_issuer() -> None:
    minter = make_minter(issuer="https://issuer.example.com/")
    claims = verify(minter, minter.mint("alice"))
    assert claims["iss"] == minter.openid_configuration()["issuer"] == "https://issuer.example.com"


# --- TokenMinter: validation -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("issuer", "expected"),
    [
        ("https://issuer.example.com", "https://issuer.example.com"),
        ("https://issuer.example.com/", "https://issuer.example.com"),
        ("https://issuer.example.com/a/b/", "https://issuer.example.com/a/b"),
        ("https://issuer.example.com:8443", "https://issuer.example.com:8443"),
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("http://localhost:8080/", "http://localhost:8080"),
        ("http://[::1]:9000", "http://[::1]:9000"),
    ],
)
def test_valid_issuers_are_accepted_without_trailing_slash(issuer: str, expected: str) -> None:
    assert validate_issuer(issuer) == expected
    assert make_minter(issuer=issuer).issuer == expected


@pytest.mark.parametrize(
    "issuer",
    [
        pytest.param("http://example.com", id="plain-http"),
        pytest.param("http://10.0.0.1:8000", id="http-private-ip"),
        pytest.param("http://localhost.example.com", id="http-localhost-lookalike"),
        pytest.param("ftp://example.com", id="ftp"),
        pytest.param("example.com", id="no-scheme"),
        pytest.param("https://", id="no-host"),
        pytest.param("https://example.com?x=1", id="query"),
        pytest.param("https://example.com/path?x=1", id="path-and-query"),
        pytest.param("https://example.com#frag", id="fragment"),
        pytest.param("https://user@example.com", id="userinfo"),
        pytest.param("", id="empty"),
        pytest.param(None, id="none"),
        pytest.param(b"https://example.com", id="bytes"),
    ],
)
def test_invalid_issuers_are_rejected(issuer: Any) -> None:
    assert_rejected("issuer", lambda: validate_issuer(issuer))
    assert_rejected("issuer", lambda: make_minter(issuer=issuer))


@pytest.mark.parametrize(
    "issuer",
    [
        pytest.param("https://example.com?", id="empty-query"),
        pytest.param("https://example.com/#", id="empty-fragment"),
        pytest.param("https://:secret@example.com", id="password-without-user"),
    ],
)
def test_issuer_with_empty_query_fragment_or_password_is_rejected(issuer: str) -> None:
    assert_rejected("issuer", lambda: validate_issuer(issuer))


@pytest.mark.parametrize("audience", ["", None, 42, ["sts.amazonaws.com"]])
def test_invalid_audience_is_rejected(audience: Any) -> None:
    assert_rejected("audience", lambda: make_minter(audience=audience))


@pytest.mark.parametrize(
    "keys",
    [
        pytest.param([], id="empty-list"),
        pytest.param((), id="empty-tuple"),
        pytest.param(None, id="none"),
    ],
)
def test_empty_keys_are_rejected(keys: Any) -> None:
    assert_rejected(
        "signing_keys",
        lambda: TokenMinter(
            issuer=ISSUER, audience=AUDIENCE, keys=keys, token_ttl=300, clock=FixedClock(NOW)
        ),
    )


def test_single_signing_key_not_in_a_sequence_is_rejected() -> None:
    assert_rejected("signing_keys", lambda: make_minter(key_for("ES256")))  # type: ignore[arg-type]


def test_keys_sharing_a_kid_are_rejected() -> None:
    key = key_for("ES256")
    assert_rejected("signing_keys", lambda: make_minter([key, key]))
    twin = SigningKey.generate("ES256", kid=key.kid)
    assert_rejected("signing_keys", lambda: make_minter([key, twin]))


def test_non_signing_key_items_are_rejected() -> None:
    raw = private_key_of(key_for("ES256"))
    assert_rejected("signing_keys", lambda: make_minter([key_for("ES256"), raw]))  # type: ignore[list-item]
    assert_rejected("signing_keys", lambda: make_minter([key_for("ES256").to_pem()]))  # type: ignore[list-item]


def test_keys_given_as_a_generator_are_not_silently_dropped() -> None:
    key = key_for("ES256")
    try:
        minter = make_minter(k for k in [key])  # type: ignore[arg-type]
    except ValueError:
        return  # rejecting non-sequences is an acceptable fix
    assert minter.keys == (key,)
    assert jwt.get_unverified_header(minter.mint("alice"))["kid"] == key.kid


@pytest.mark.parametrize("ttl", [60, 3600])
def test_token_ttl_bounds_are_accepted(ttl: int) -> None:
    assert make_minter(token_ttl=ttl).token_ttl == ttl


@pytest.mark.parametrize(
    "ttl",
    [
        pytest.param(59, id="below-min"),
        pytest.param(3601, id="above-max"),
        pytest.param(0, id="zero"),
        pytest.param(-60, id="negative"),
        pytest.param(True, id="bool"),
        pytest.param(300.0, id="float"),
        pytest.param("300", id="str"),
        pytest.param(None, id="none"),
    ],
)
def test_token_ttl_out_of_range_is_rejected(ttl: Any) -> None:
    assert_rejected("token_ttl", lambda: make_minter(token_ttl=ttl))


# --- KeySourcePoller -------------------------------------------------------------------------


class Owner:
    """Something the poller calls back: counts its reloads, and signals each one."""

    def __init__(self) -> None:
        self.reloads = 0
        self.reloaded = threading.Event()

    def reload(self) -> None:
        self.reloads += 1
        self.reloaded.set()


def test_the_poller_calls_its_owner_until_stopped() -> None:
    owner = Owner()
    poller = KeySourcePoller(owner, "reload", 0.01)
    assert owner.reloaded.wait(5)
    poller.stop()
    poller._thread.join(5)
    assert not poller._thread.is_alive()
    assert owner.reloads >= 1
    assert poller._thread.daemon  # never holds the process up at exit


def test_the_poller_ends_once_its_owner_is_garbage() -> None:
    owner = Owner()
    poller = KeySourcePoller(owner, "reload", 0.01)
    assert owner.reloaded.wait(5)
    del owner
    gc.collect()
    poller._thread.join(5)  # its next wake-up finds no owner: it ends without stop()
    assert not poller._thread.is_alive()


def test_the_poller_goes_on_after_its_owner_raised(caplog: pytest.LogCaptureFixture) -> None:
    class Failing(Owner):
        def reload(self) -> None:
            super().reload()
            if self.reloads == 1:
                raise AttributeError("a bug")

    owner = Failing()
    poller = KeySourcePoller(owner, "reload", 0.01)
    try:
        deadline = time.monotonic() + 5
        while owner.reloads < 2:  # waits for the thread's next call, not for time to pass
            assert time.monotonic() < deadline, "the poller stopped after an error"
            owner.reloaded.wait(0.05)
    finally:
        poller.stop()
    assert "reading the signing key source failed: AttributeError" in caplog.text
