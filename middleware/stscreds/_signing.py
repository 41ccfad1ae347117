"""Signing keys, the JWTs stscreds mints, and the OIDC documents AWS reads to verify them."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from ._clock import Clock

__all__ = ["KeySource", "KeySourcePoller", "SigningKey", "TokenMinter"]

logger = logging.getLogger("stscreds")

Algorithm = Literal["RS256", "RS384", "RS512", "ES256", "ES384", "ES512"]
_RSA_ALGS = ("RS256", "RS384", "RS512")
_EC_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "ES256": ec.SECP256R1,
    "ES384": ec.SECP384R1,
    "ES512": ec.SECP521R1,
}
_EC_ALG_BY_CURVE = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
# RFC 7638: the members that identify a public key, in lexicographic order.
_THUMBPRINT_MEMBERS = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y")}

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


class _Token(str):
    """A minted JWT: the real text wherever it is used as a string, hidden in its repr.

    botocore logs the request parameters at DEBUG with ``%r`` of a dict holding the token;
    the request body it sends is built from the string value, so STS still gets the token.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "'<web identity token>'"


class SigningKey:
    """A private key that signs stscreds' JWTs, with its algorithm and key id (``kid``)."""

    __slots__ = ("_jwk", "_key", "alg", "kid")

    def __init__(self, key: PrivateKey, *, alg: str | None = None, kid: str | None = None):
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise ValueError("key: must be an RSA or EC private key")
        self._key: PrivateKey = key
        self._publish(key.public_key(), alg, kid, "key")

    def _publish(self, public: PublicKey, alg: str | None, kid: str | None, name: str) -> None:
        """Set ``alg``, ``kid`` and the JWK from ``public`` (``name``: the parameter in errors)."""
        if isinstance(public, rsa.RSAPublicKey):
            alg = alg or "RS256"
            if alg not in _RSA_ALGS:
                raise ValueError(f"alg: {alg!r} does not fit an RSA key (use one of {_RSA_ALGS})")
            if public.key_size < 2048:
                raise ValueError(f"{name}: RSA keys must have at least 2048 bits")
            jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            expected = _EC_ALG_BY_CURVE.get(public.curve.name)
            if expected is None:
                raise ValueError(f"{name}: unsupported EC curve {public.curve.name}")
            alg = alg or expected
            if alg != expected:
                raise ValueError(
                    f"alg: {alg!r} does not fit a {public.curve.name} key (use {expected})"
                )
            jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        else:
            raise ValueError(f"{name}: must be an RSA or EC key")
        if kid is not None and (not isinstance(kid, str) or not kid):
            raise ValueError("kid: must be a non-empty string")
        self.alg: str = alg
        self.kid: str = kid or _thumbprint(jwk)
        self._jwk = {**jwk, "kid": self.kid, "alg": alg, "use": "sig"}

    @classmethod
    def generate(cls, alg: str = "RS256", kid: str | None = None) -> SigningKey:
        """Make a new key for ``alg`` (RSA 2048 bits for RS*, the matching curve for ES*)."""
        if alg in _RSA_ALGS:
            key: PrivateKey = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif alg in _EC_CURVES:
            key = ec.generate_private_key(_EC_CURVES[alg]())
        else:
            raise ValueError(f"alg: must be one of {_RSA_ALGS + tuple(_EC_CURVES)}")
        return cls(key, alg=alg, kid=kid)

    @classmethod
    def from_pem(
        cls,
        pem: bytes | str,
        *,
        kid: str | None = None,
        alg: str | None = None,
        password: bytes | None = None,
    ) -> SigningKey:
        """Load a PEM private key (PKCS#8 or traditional); ``alg`` defaults from the key type."""
        data = pem.encode() if isinstance(pem, str) else pem
        try:
            key = serialization.load_pem_private_key(data, password=password)
        except (ValueError, TypeError):
            # The loader's message could echo key material; say only what went wrong.
            raise ValueError("pem: not a readable PEM private key") from None
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise ValueError("pem: must hold an RSA or EC private key")
        return cls(key, alg=alg, kid=kid)

    @classmethod
    def from_kms(
        cls,
        key_id: str,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        alg: str | None = None,
        kid: str | None = None,
        session: Any = None,
        connect_timeout: float = 2.0,
        read_timeout: float = 5.0,
    ) -> SigningKey:
        """An asymmetric AWS KMS key that signs with KMS ``Sign``: its private key never
        enters this process (see :class:`stscreds.KMSSigningKey`)."""
        from ._kms import KMSSigningKey

        return KMSSigningKey(
            key_id,
            region=region,
            endpoint_url=endpoint_url,
            alg=alg,
            kid=kid,
            session=session,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )

    def to_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM (for writing to a 0600 file)."""
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def public_jwk(self) -> dict[str, Any]:
        """The public key as a JWK with ``kid``, ``alg`` and ``use``."""
        return dict(self._jwk)

    def sign(self, payload: Mapping[str, Any]) -> str:
        """Sign ``payload`` as a compact JWT with header alg, kid and typ."""
        return jwt.encode(
            dict(payload), self._key, algorithm=self.alg, headers={"kid": self.kid, "typ": "JWT"}
        )

    def __repr__(self) -> str:
        return f"SigningKey(alg={self.alg!r}, kid={self.kid!r})"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _thumbprint(jwk: Mapping[str, Any]) -> str:
    members = {name: jwk[name] for name in _THUMBPRINT_MEMBERS[jwk["kty"]]}
    encoded = json.dumps(members, sort_keys=True, separators=(",", ":")).encode()
    return _b64url(hashlib.sha256(encoded).digest())


def validate_issuer(issuer: str) -> str:
    """Return ``issuer`` without a trailing slash, or raise ValueError if IAM would refuse it.

    IAM requires https; plain http is accepted only for loopback hosts (local STS, tests).
    """
    if not isinstance(issuer, str):
        raise ValueError("issuer: must be a URL string")
    parts = urlsplit(issuer)
    loopback = parts.hostname in {"localhost", "127.0.0.1", "::1"}
    if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
        raise ValueError("issuer: must be an https:// URL (http:// only for loopback hosts)")
    if not parts.hostname or "?" in issuer or "#" in issuer or "@" in parts.netloc:
        raise ValueError("issuer: must be scheme://host[:port][/path] with no query or fragment")
    return issuer.rstrip("/")


def check_ring(keys: object) -> tuple[SigningKey, ...]:
    """``keys`` as a key ring, or ValueError naming ``signing_keys``: a non-empty sequence of
    SigningKey with distinct kids."""
    if isinstance(keys, SigningKey) or not isinstance(keys, Iterable):
        raise ValueError("signing_keys: must be a non-empty sequence of SigningKey")
    ring = tuple(keys)
    if not ring:
        raise ValueError("signing_keys: must be a non-empty sequence of SigningKey")
    if not all(isinstance(k, SigningKey) for k in ring):
        raise ValueError("signing_keys: every item must be a SigningKey")
    kids = [k.kid for k in ring]
    if len(set(kids)) != len(kids):
        raise ValueError("signing_keys: two keys share a kid")
    return ring


class TokenMinter:
    """Mints short-lived JWTs for one issuer and audience, and publishes its keys."""

    __slots__ = ("audience", "clock", "issuer", "keys", "token_ttl")

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        keys: Sequence[SigningKey],
        token_ttl: int,
        clock: Clock,
    ) -> None:
        self.issuer = validate_issuer(issuer)
        if not isinstance(audience, str) or not audience:
            raise ValueError("audience: must be a non-empty string")
        ring = check_ring(keys)
        if (
            isinstance(token_ttl, bool)
            or not isinstance(token_ttl, int)
            or not 60 <= token_ttl <= 3600
        ):
            raise ValueError("token_ttl: must be an integer from 60 to 3600 seconds")
        self.audience = audience
        self.keys = ring
        self.token_ttl = token_ttl
        self.clock = clock

    def with_keys(self, keys: Sequence[SigningKey]) -> TokenMinter:
        """This minter with another key ring (validated like the constructor's)."""
        return TokenMinter(
            issuer=self.issuer,
            audience=self.audience,
            keys=keys,
            token_ttl=self.token_ttl,
            clock=self.clock,
        )

    def mint(self, subject: str, claims: Mapping[str, Any] | None = None) -> str:
        """Return a signed JWT for ``subject`` carrying the extra ``claims``.

        A ``str`` whose ``repr`` hides the token (so a logged container does not leak it).
        """
        now = int(self.clock.time())
        payload: dict[str, Any] = dict(claims) if claims else {}
        payload.update(
            iss=self.issuer,
            sub=subject,
            aud=self.audience,
            iat=now,
            nbf=now,
            exp=now + self.token_ttl,
            jti=secrets.token_urlsafe(16),
        )
        return _Token(self.keys[0].sign(payload))

    def jwks(self) -> dict[str, Any]:
        """The JSON Web Key Set publishing every configured key (first one signs)."""
        return {"keys": [k.public_jwk() for k in self.keys]}

    def openid_configuration(self) -> dict[str, Any]:
        """The OpenID Connect Discovery document for this issuer."""
        algs = list(dict.fromkeys(k.alg for k in self.keys))
        return {
            "issuer": self.issuer,
            "jwks_uri": f"{self.issuer}/.well-known/jwks.json",
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": algs,
            "claims_supported": ["sub", "aud", "exp", "iat", "iss", "nbf", "jti"],
        }


#: A callable returning the current key ring (first key signs), re-read on an interval.
KeySource = Callable[[], Sequence[SigningKey]]


class KeySourcePoller:
    """Calls ``reload()`` of ``owner`` every ``interval`` seconds on a daemon thread, until
    ``stop()`` or until ``owner`` is garbage (the thread holds only a weak reference)."""

    __slots__ = ("_stop", "_thread", "interval")

    def __init__(self, owner: Any, reload: str, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_poll,
            args=(weakref.ref(owner), reload, interval, self._stop),
            name="stscreds-key-source",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """End the thread (at its next wake-up; never waits for a source call)."""
        self._stop.set()


def _poll(owner: weakref.ref[Any], reload: str, interval: float, stop: threading.Event) -> None:
    while not stop.wait(interval):
        target = owner()
        if target is None:
            return
        try:
            getattr(target, reload)()
        except Exception as error:  # a bug: the thread must go on polling all the same
            logger.error("reading the signing key source failed: %s", type(error).__name__)
        del target  # between polls the owner stays collectable
