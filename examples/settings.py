"""Example configuration from environment variables, shared by the example apps.

Defaults work with ``make demo``: a local STS on loopback and an issuer on 127.0.0.1:8000.

| variable                 | default                   | meaning                                  |
|--------------------------|---------------------------|------------------------------------------|
| STSCREDS_ISSUER          | http://127.0.0.1:8000     | issuer URL (https in production)         |
| STSCREDS_KEY_FILE        | (none: a throwaway key)   | PEM key (python -m stscreds keygen)      |
| STSCREDS_KMS_KEY_ID      | (none)                    | sign with this AWS KMS key instead       |
| STSCREDS_KMS_ENDPOINT    | (none: regional AWS KMS)  | KMS endpoint override (a local KMS)      |
| STSCREDS_STS_ENDPOINT    | (none: regional AWS STS)  | STS endpoint override (local STS)        |
| STSCREDS_REGION          | us-east-1                 | STS region                               |
| STSCREDS_ACCOUNT_ID      | 123456789012              | account holding the tenant roles         |
"""

from __future__ import annotations

import logging
import os

from stscreds import CredentialBroker, Role, RoleTemplate, SigningKey

logger = logging.getLogger("examples")


def signing_key() -> SigningKey:
    """The KMS key STSCREDS_KMS_KEY_ID, the key from STSCREDS_KEY_FILE, or a throwaway one
    (fine for a demo, not for AWS)."""
    kms_key_id = os.environ.get("STSCREDS_KMS_KEY_ID")
    if kms_key_id:
        # The private key stays in KMS; this process needs kms:GetPublicKey and kms:Sign.
        return SigningKey.from_kms(
            kms_key_id,
            region=os.environ.get("STSCREDS_REGION", "us-east-1"),
            endpoint_url=os.environ.get("STSCREDS_KMS_ENDPOINT") or None,
        )
    path = os.environ.get("STSCREDS_KEY_FILE")
    if path:
        with open(path, "rb") as handle:
            return SigningKey.from_pem(handle.read())
    logger.warning("STSCREDS_KEY_FILE not set: signing with a throwaway key")
    return SigningKey.generate()


def make_broker() -> CredentialBroker:
    """A CredentialBroker configured from the environment."""
    return CredentialBroker(
        issuer=os.environ.get("STSCREDS_ISSUER", "http://127.0.0.1:8000"),
        signing_keys=[signing_key()],
        region=os.environ.get("STSCREDS_REGION", "us-east-1"),
        sts_endpoint_url=os.environ.get("STSCREDS_STS_ENDPOINT") or None,
    )


ACCOUNT_ID = os.environ.get("STSCREDS_ACCOUNT_ID", "123456789012")


#: Each tenant has its own role: built and validated the first time a tenant is seen.
TENANT_ROLE = RoleTemplate(
    f"arn:aws:iam::{ACCOUNT_ID}:role/tenant-{{tenant}}", subject="tenant:{tenant}"
)


def role_for_tenant(tenant: str | bytes | None) -> Role | None:
    """The tenant's Role; requests without a (valid) tenant get no credentials."""
    return None if tenant is None else TENANT_ROLE.get(tenant)
