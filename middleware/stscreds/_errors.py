"""Exceptions raised when credentials cannot be had."""

from __future__ import annotations

import re
from typing import ClassVar

__all__ = ["CredentialsRejected", "CredentialsUnavailable", "STSUnavailable"]

# A JWT is three base64url segments; STS messages can quote parts of the token, so anything
# shaped like one is cut from a message before it reaches an exception or a log line.
_JWT_LIKE = re.compile(r"eyJ[\w-]*\.[\w-]*\.[\w-]*|eyJ[\w-]{8,}")
_MAX_MESSAGE = 300


def redact(message: str) -> str:
    """Return ``message`` with anything shaped like a JWT removed and its length capped."""
    cleaned = _JWT_LIKE.sub("<redacted>", message)
    return cleaned if len(cleaned) <= _MAX_MESSAGE else cleaned[: _MAX_MESSAGE - 3] + "..."


class CredentialsUnavailable(Exception):
    """No credentials could be had for a role; ``code`` is the STS error code, if STS gave one."""

    #: HTTP status the middlewares answer with for this error.
    status_code: int = 503
    #: stscreds' own reason when STS gave no code (a bounded metric label), else None.
    reason: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        role_arn: str | None = None,
        retry_after: float | None = None,
    ):
        self.message = redact(message)
        self.code = code
        self.role_arn = role_arn
        #: Seconds until a retry can succeed (a remembered failure expires, the STS budget
        #: refills), or None if unknown; the middlewares send it as ``Retry-After``.
        self.retry_after = retry_after
        super().__init__(self.message)

    def __repr__(self) -> str:
        # The public class: stscreds' private subclasses only carry a reason label.
        name = next(c.__name__ for c in type(self).__mro__ if not c.__name__.startswith("_"))
        return f"{name}({self.message!r}, code={self.code!r})"

    def _copy(
        self, retry_after: float | None = None, role_arn: str | None = None
    ) -> CredentialsUnavailable:
        # Negative caching raises a fresh instance each time, so tracebacks never pile up.
        return type(self)(
            self.message,
            code=self.code,
            role_arn=self.role_arn if role_arn is None else role_arn,
            retry_after=self.retry_after if retry_after is None else retry_after,
        )


class CredentialsRejected(CredentialsUnavailable):
    """STS refused the exchange for a reason retrying will not fix (AccessDenied, bad token...)."""

    status_code = 502


class STSUnavailable(CredentialsUnavailable):
    """STS could not be reached in time or answered with a transient error (5xx, Throttling...)."""

    status_code = 503


class _Timeout(STSUnavailable):
    """No answer from STS within the exchange deadline (or the request's own bound)."""

    reason = "Timeout"


class _Unreachable(STSUnavailable):
    """STS could not be reached (connection refused or reset, DNS, socket timeouts)."""

    reason = "Unreachable"


class _BadResponse(STSUnavailable):
    """STS answered with something that is not a usable AssumeRoleWithWebIdentity answer."""

    reason = "BadResponse"


class _SigningUnavailable(STSUnavailable):
    """The remote signer (AWS KMS) could not sign in time or answered with a transient error."""

    reason = "SigningUnavailable"


class _SigningRejected(CredentialsRejected):
    """The remote signer (AWS KMS) refused to sign: a setup to fix (permission, key state)."""

    reason = "SigningRejected"


class _Closed(STSUnavailable):
    """The broker was closed."""

    reason = "Closed"
