"""moto's WSGI app on 127.0.0.1 (free port), behind a wrapper that counts calls and injects
faults: the base of ``LocalDynamoDB`` and ``LocalKMS``.

The server is moto's own WSGI app (what ``moto.server.ThreadedMotoServer`` serves). A subclass
answers in ``_app`` and passes the calls it does not fault on to ``_forward``.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterable
from typing import Any

import botocore.session

__all__ = ["TEST_CREDENTIALS", "MotoServer", "fake_session"]

# Fake credentials for moto (it checks none), also given to worker processes.
TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def fake_session() -> botocore.session.Session:
    """A botocore session with moto's fake credentials (none of the host's)."""
    session = botocore.session.Session()
    session.set_credentials(
        access_key=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        secret_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )
    return session


class MotoServer:
    """moto on loopback; ``calls``: calls received by operation (``X-Amz-Target``'s last part)."""

    name = "local-moto"

    def __init__(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

        self._moto = DomainDispatcherApplication(create_backend_app)
        self._state = threading.Lock()
        #: Calls received (faults included), by operation name (``GetItem``, ``Sign``...).
        self.calls: collections.Counter[str] = collections.Counter()
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def start(self) -> Any:
        from moto.moto_server.werkzeug_app import MotoRequestHandler
        from werkzeug.serving import make_server

        class QuietHandler(MotoRequestHandler):
            def log_request(self, *args: Any, **kwargs: Any) -> None:
                """No access log line per request."""

        self._server = make_server(
            "127.0.0.1", 0, self._app, threaded=True, request_handler=QuietHandler
        )
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name=self.name, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)

    def session(self) -> botocore.session.Session:
        """A botocore session with moto's fake credentials (none of the host's)."""
        return fake_session()

    def _count(self, environ: dict[str, Any]) -> str:
        """Count the call; returns its operation name."""
        operation = str(environ.get("HTTP_X_AMZ_TARGET", "")).rpartition(".")[2]
        with self._state:
            self.calls[operation] += 1
        return operation

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        self._count(environ)
        return self._forward(environ, start_response)

    def _forward(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        """moto's answer, read whole."""
        answer = self._moto(environ, start_response)
        try:
            return [b"".join(answer)]
        finally:
            close = getattr(answer, "close", None)
            if close is not None:
                close()
