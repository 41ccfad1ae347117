"""Temporary AWS credentials, safe to print."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

__all__ = ["Credentials"]


@dataclass(frozen=True, slots=True, repr=False)
class Credentials:
    """Temporary AWS credentials; ``repr()`` and ``str()`` never show the secret or the token."""

    access_key_id: str
    secret_access_key: str
    session_token: str
    expiration: datetime

    def __post_init__(self) -> None:
        if self.expiration.tzinfo is None or self.expiration.utcoffset() is None:
            raise ValueError("expiration: must be a timezone-aware datetime")
        if self.expiration.tzinfo is not timezone.utc:
            object.__setattr__(self, "expiration", self.expiration.astimezone(timezone.utc))

    def __repr__(self) -> str:
        # The access key id is not a secret, but only its tail is needed to tell two apart.
        return (
            f"Credentials(access_key_id='...{self.access_key_id[-4:]}', "
            f"expiration='{self.expiration.isoformat()}')"
        )

    __str__ = __repr__

    def boto3_kwargs(self) -> dict[str, str]:
        """Keyword arguments for ``boto3.Session(...)``, ``boto3.client(...)`` or botocore's
        ``session.create_client(...)``."""
        return {
            "aws_access_key_id": self.access_key_id,
            "aws_secret_access_key": self.secret_access_key,
            "aws_session_token": self.session_token,
        }

    def seconds_left(self, now: float) -> float:
        """Seconds from the POSIX time ``now`` until these credentials expire."""
        return self.expiration.timestamp() - now
