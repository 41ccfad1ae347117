"""stscreds: per-request temporary AWS credentials for ASGI and WSGI apps.

The app is its own OIDC issuer: stscreds signs a short JWT, trades it at STS
AssumeRoleWithWebIdentity, caches the result per identity and refreshes it ahead of expiry.
"""

from ._asgi import CredentialsMiddleware
from ._broker import BrokerStats, CredentialBroker
from ._budget import StsBudget
from ._clock import Clock, SystemClock
from ._credentials import Credentials
from ._errors import CredentialsRejected, CredentialsUnavailable, STSUnavailable
from ._kms import KMSSigningKey
from ._metrics import METRICS, MetricSpec
from ._roles import Role, RoleTemplate
from ._signing import SigningKey
from ._wsgi import CredentialsWSGIMiddleware

__all__ = [
    "METRICS",
    "BrokerStats",
    "Clock",
    "CredentialBroker",
    "Credentials",
    "CredentialsMiddleware",
    "CredentialsRejected",
    "CredentialsUnavailable",
    "CredentialsWSGIMiddleware",
    "KMSSigningKey",
    "MetricSpec",
    "Role",
    "RoleTemplate",
    "STSUnavailable",
    "SigningKey",
    "StsBudget",
    "SystemClock",
]

__version__ = "0.1.0.dev0"
