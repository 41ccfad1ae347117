"""Signing keys held in AWS KMS: the JWKS from ``GetPublicKey``, each JWT signed with ``Sign``."""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Mapping
from typing import Any

import botocore.session
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from ._errors import (
    CredentialsRejected,
    CredentialsUnavailable,
    _SigningRejected,
    _SigningUnavailable,
)
from ._exchange import install_log_filter, off_gate_on_the_wire, step_off_gate
from ._region import default_region
from ._signing import SigningKey

__all__ = ["KMSSigningKey", "classify_kms_error"]

# JWS algorithm -> KMS SigningAlgorithm. PKCS#1 v1.5 for RS*; PSS (PS*) is not offered: STS
# accepts only RS256/384/512 and ES256/384/512.
_KMS_ALGORITHMS = {
    "RS256": "RSASSA_PKCS1_V1_5_SHA_256",
    "RS384": "RSASSA_PKCS1_V1_5_SHA_384",
    "RS512": "RSASSA_PKCS1_V1_5_SHA_512",
    "ES256": "ECDSA_SHA_256",
    "ES384": "ECDSA_SHA_384",
    "ES512": "ECDSA_SHA_512",
}

#: KMS error codes that another try may fix (KMS busy, throttled, briefly unavailable).
KMS_TRANSIENT_CODES = frozenset(
    {
        "ThrottlingException",
        "LimitExceededException",
        "KMSInternalException",
        "DependencyTimeoutException",
        "KeyUnavailableException",
        "ServiceUnavailableException",
        "InternalFailure",
        "RequestTimeout",
    }
)


def classify_kms_error(
    error: BaseException, key_id: str, action: str = "signing with"
) -> CredentialsUnavailable:
    """A KMS failure as stscreds' errors: transient ones as STSUnavailable (retried within the
    exchange deadline), the rest (access denied, key disabled or deleted...) as
    CredentialsRejected. KMS's own message is kept: it says what to fix, and holds no secret.
    ``action`` says what was being done ("signing with", "reading the public key of")."""
    if isinstance(error, ClientError):
        info = error.response.get("Error", {})
        code = info.get("Code") or None
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        message = f"KMS {code or 'error'} {action} {key_id}: {info.get('Message') or '-'}"
        if code in KMS_TRANSIENT_CODES or status >= 500 or status == 429:
            return _SigningUnavailable(message, code=code)
        return _SigningRejected(message, code=code)
    if isinstance(error, NoCredentialsError):
        return _SigningUnavailable(f"no AWS credentials for KMS {action} {key_id}: {error}")
    if isinstance(error, BotoCoreError | OSError):
        # botocore's messages here name the endpoint or the missing credentials, nothing secret.
        return _SigningUnavailable(f"KMS unreachable {action} {key_id}: {error}")
    return _SigningUnavailable(f"KMS {action} {key_id} failed: {type(error).__name__}")


def _b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _json_b64url(value: Mapping[str, Any]) -> bytes:
    return _b64url(json.dumps(value, separators=(",", ":")).encode())


class KMSSigningKey(SigningKey):
    """A signing key held in AWS KMS: published from ``GetPublicKey``, signing with ``Sign``.

    The private key never enters the process. The key's public half is read once, here (a
    blocking call: build it at start-up); each token is then one ``Sign`` call (10-30 ms), made
    only when credentials are exchanged, on the STS pool's threads and inside the exchange
    deadline. ``Sign`` names the key by the ARN ``GetPublicKey`` answered with, so an alias
    moved to another key later cannot make tokens that the published JWKS does not verify.

    The process needs ``kms:GetPublicKey`` and ``kms:Sign`` on this key, nothing else.
    """

    __slots__ = (
        "_client",
        "_client_options",
        "_ecdsa_size",
        "_kms_algorithm",
        "_own_session",
        "_pid",
        "_session",
        "key_arn",
        "key_id",
    )

    def __init__(
        self,
        key_id: str,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        alg: str | None = None,
        kid: str | None = None,
        session: botocore.session.Session | None = None,
        connect_timeout: float = 2.0,
        read_timeout: float = 5.0,
    ) -> None:
        if not isinstance(key_id, str) or not key_id:
            raise ValueError("key_id: must be a KMS key id, key ARN, alias name or alias ARN")
        if alg is not None and alg not in _KMS_ALGORITHMS:
            raise ValueError(f"alg: must be None or one of {tuple(_KMS_ALGORITHMS)}")
        for name, value in (("connect_timeout", connect_timeout), ("read_timeout", read_timeout)):
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"{name}: must be a positive number of seconds")
        # botocore at DEBUG logs each Sign's message and signature (together: a usable token)
        # and each signed request's session token: the filter cuts them out.
        install_log_filter()
        #: A session of the key's own (none given): a forked worker makes itself a new one.
        self._own_session = session is None
        if session is None:
            session = botocore.session.get_session()
        elif not isinstance(session, botocore.session.Session):
            # A boto3.Session wraps the botocore one.
            session = getattr(session, "_session", None)
            if not isinstance(session, botocore.session.Session):
                raise TypeError("session: must be None, a botocore or a boto3 Session")
        region = region or default_region(session, key_id)
        if not region:
            raise ValueError(
                "region: none given, key_id is no ARN, and neither AWS_REGION, "
                "AWS_DEFAULT_REGION nor the profile names one"
            )
        #: The key as it was named (id, ARN or alias).
        self.key_id: str = key_id
        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # The exchange retries transient failures itself, inside its deadline.
            retries={"total_max_attempts": 1},
            max_pool_connections=64,
        )
        self._session: botocore.session.Session = session
        self._client_options: dict[str, Any] = {
            "region_name": region,
            "endpoint_url": endpoint_url,
            "config": config,
        }
        self._pid = 0
        self._client: BaseClient = self._client_for_this_process()
        answer = self._read_public_key(key_id)
        if answer.get("KeyUsage") != "SIGN_VERIFY":
            raise ValueError(
                f"key_id: {key_id} is not an asymmetric SIGN_VERIFY key "
                f"(KeyUsage {answer.get('KeyUsage')!r}, KeySpec {answer.get('KeySpec')!r})"
            )
        try:
            public = serialization.load_der_public_key(answer["PublicKey"])
        except (ValueError, UnsupportedAlgorithm):  # SM2, ML-DSA...: not for JWS
            raise ValueError(
                f"key_id: {key_id} has a key type JWS cannot use ({answer.get('KeySpec')!r}): "
                "use RSA_2048/3072/4096 or ECC_NIST_P256/P384/P521"
            ) from None
        if not isinstance(public, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise ValueError(f"key_id: {key_id} is neither an RSA nor an EC key")
        self._publish(public, alg, kid, "key_id")
        kms_algorithm = _KMS_ALGORITHMS[self.alg]
        offered = answer.get("SigningAlgorithms") or ()
        if kms_algorithm not in offered:
            raise ValueError(
                f"alg: {key_id} cannot sign {self.alg} ({kms_algorithm}); it offers "
                f"{', '.join(offered) or 'nothing'}"
            )
        #: The key's ARN, as KMS named it: what ``Sign`` is called with.
        self.key_arn: str = answer.get("KeyId") or key_id
        self._kms_algorithm = kms_algorithm
        # JWS wants ECDSA signatures as r || s, each the curve's size; KMS answers in DER.
        self._ecdsa_size = (
            (public.curve.key_size + 7) // 8 if isinstance(public, ec.EllipticCurvePublicKey) else 0
        )

    def _read_public_key(self, key_id: str) -> dict[str, Any]:
        """GetPublicKey, tried 3 times while KMS fails transiently (a fleet starting at once
        may be throttled). A key KMS refuses is a ValueError naming ``key_id``; KMS out of
        reach (or no credentials) is STSUnavailable."""
        for attempt in range(3):
            try:
                answer: dict[str, Any] = self._client.get_public_key(KeyId=key_id)
                return answer
            except (ClientError, BotoCoreError) as error:
                failure = classify_kms_error(error, key_id, "reading the public key of")
                if isinstance(failure, CredentialsRejected):
                    # At start-up KMS refusing the key is a setup error: say so, with why.
                    raise ValueError(f"key_id: {failure.message}") from None
                if attempt == 2 or isinstance(error, NoCredentialsError):
                    raise failure from None
            time.sleep(0.2 * 2**attempt)  # at start-up, before any loop: blocking is fine
        raise AssertionError("unreachable")

    def sign(self, payload: Mapping[str, Any]) -> str:
        """Sign ``payload`` as a compact JWT with KMS ``Sign`` (blocking: call it off the loop).

        Raises STSUnavailable (transient KMS failure) or CredentialsRejected (KMS refused).
        """
        client = self._client
        if self._pid != os.getpid():
            # A forked worker (gunicorn --preload): the parent's client holds connections the
            # parent opened, which two processes must never share. Left alone, not closed.
            # Made off the exchange's gate: a new client resolves its credentials (IMDS...).
            step_off_gate()
            client = self._client_for_this_process()
        header = {"alg": self.alg, "kid": self.kid, "typ": "JWT"}
        signing_input = _json_b64url(header) + b"." + _json_b64url(dict(payload))
        try:
            # RAW: KMS hashes the message itself. The signing input is far below the 4 KB
            # limit, and moto hashes a DIGEST message a second time.
            answer = client.sign(
                KeyId=self.key_arn,
                Message=signing_input,
                MessageType="RAW",
                SigningAlgorithm=self._kms_algorithm,
            )
        except Exception as error:
            raise classify_kms_error(error, self.key_id) from None
        signature: bytes = answer["Signature"]
        if self._ecdsa_size:
            r, s = decode_dss_signature(signature)
            size = self._ecdsa_size
            signature = r.to_bytes(size, "big") + s.to_bytes(size, "big")
        return (signing_input + b"." + _b64url(signature)).decode()

    def _client_for_this_process(self) -> BaseClient:
        if self._pid and self._own_session:
            # A forked worker: the parent's session may have held its credential refresh
            # lock at the fork, which nothing in this process would ever release.
            self._session = botocore.session.get_session()
        client: BaseClient = self._session.create_client("kms", **self._client_options)
        off_gate_on_the_wire(client, "kms.Sign")
        # The client first, then the pid: a thread that sees this pid sees this client.
        self._client = client
        self._pid = os.getpid()
        return client

    def to_pem(self) -> bytes:
        """Always raises TypeError: a KMS key's private key never leaves KMS."""
        raise TypeError(f"{self.key_id} is held in KMS: its private key cannot be exported")

    def __repr__(self) -> str:
        return f"KMSSigningKey(key_id={self.key_id!r}, alg={self.alg!r}, kid={self.kid!r})"
