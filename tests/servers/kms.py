"""moto's KMS on 127.0.0.1 (free port) for the KMS signing tests, with injectable faults.

moto signs ``MessageType=RAW`` messages as KMS does (it hashes a ``DIGEST`` message again,
one reason stscreds signs RAW). The wrapper counts calls by operation, answers chosen calls
with KMS's own JSON errors, holds calls for ``delay`` seconds, and records how many ``Sign``
calls were on the wire at once.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from servers.moto import MotoServer

__all__ = ["LocalKMS"]


class LocalKMS(MotoServer):
    """moto's KMS on loopback; ``fail()``, ``delay``: faults; ``max_signing``: concurrency."""

    name = "local-kms"

    def __init__(self) -> None:
        super().__init__()
        #: Seconds every ``Sign`` call waits before it is answered.
        self.delay = 0.0
        self._faults: list[tuple[str, str, str, int, int | None]] = []
        self._signing = 0
        #: The most ``Sign`` calls that were in this server at once.
        self.max_signing = 0

    def start(self) -> LocalKMS:
        super().start()
        return self

    def client(self, region: str = "eu-west-1") -> Any:
        """A new raw botocore KMS client on this server."""
        return self.session().create_client("kms", region_name=region, endpoint_url=self.url)

    def create_signing_key(self, spec: str = "RSA_2048", region: str = "eu-west-1") -> str:
        """A new asymmetric SIGN_VERIFY key of ``spec``; returns its ARN."""
        metadata = self.client(region).create_key(KeySpec=spec, KeyUsage="SIGN_VERIFY")
        arn: str = metadata["KeyMetadata"]["Arn"]
        return arn

    def fail(
        self,
        code: str,
        message: str,
        status: int = 400,
        times: int | None = None,
        operation: str = "Sign",
    ) -> None:
        """Answer the next ``times`` ``operation`` calls (every one: None) with error ``code``."""
        with self._state:
            self._faults.append((operation, code, message, status, times))

    def clear_faults(self) -> None:
        with self._state:
            self._faults.clear()
            self.delay = 0.0

    def _take_fault(self, operation: str) -> tuple[str, str, int] | None:
        with self._state:
            for index, (target, code, message, status, times) in enumerate(self._faults):
                if target != operation:
                    continue
                if times is not None:
                    if times <= 1:
                        del self._faults[index]
                    else:
                        self._faults[index] = (target, code, message, status, times - 1)
                return code, message, status
            return None

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        operation = self._count(environ)
        signing = operation == "Sign"
        if signing:
            with self._state:
                self._signing += 1
                self.max_signing = max(self.max_signing, self._signing)
                delay = self.delay
        try:
            if signing and delay:
                time.sleep(delay)
            fault = self._take_fault(operation)
            if fault is None:
                return self._forward(environ, start_response)
            code, message, status = fault
            body = json.dumps({"__type": code, "message": message}).encode()
            start_response(
                f"{status} Error",
                [
                    ("Content-Type", "application/x-amz-json-1.1"),
                    ("Content-Length", str(len(body))),
                    ("x-amzn-RequestId", uuid.uuid4().hex),
                ],
            )
            return [body]
        finally:
            if signing:
                with self._state:
                    self._signing -= 1
