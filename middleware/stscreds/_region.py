"""The AWS region a client is made for when the caller names none."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["default_region"]


def default_region(session: Any, arn: str | None = None) -> str | None:
    """The region an ARN names, else ``AWS_REGION``, else botocore's default
    (``AWS_DEFAULT_REGION``, the profile's); None when there is none.

    botocore reads only ``AWS_DEFAULT_REGION``; the other SDKs and the AWS runtimes (Lambda,
    ECS, EKS) set ``AWS_REGION``, so it is honoured here too.
    """
    if arn is not None and arn.startswith("arn:"):
        parts = arn.split(":", 5)
        if len(parts) == 6 and parts[3]:
            return parts[3]
    region = os.environ.get("AWS_REGION") or session.get_config_variable("region")
    return str(region) if region else None
