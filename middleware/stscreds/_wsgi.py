"""CredentialsWSGIMiddleware: WSGI (Flask, Django); puts each request's credentials in the environ.

A cache hit is served in the request's own thread (``broker.peek``). Anything else runs on one
event loop per broker, on a daemon thread started on first use and shared by every middleware
using that broker, so the broker's single-flight covers every WSGI thread (of every mounted
app): N threads asking for one cold identity make one call.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import inspect
import json
import logging
import os
import threading
import weakref
from collections.abc import Callable, Coroutine, Iterable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, TypeVar

from ._asgi import (
    MISCONFIGURED_BODY,
    ResolverCheck,
    check_health_path,
    error_body,
    health_response,
    oidc_documents,
    retry_after_header,
    run_warm_up,
    warm_up_roles,
)
from ._broker import CredentialBroker
from ._credentials import Credentials
from ._errors import CredentialsUnavailable, STSUnavailable
from ._roles import Role

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    WSGIRoleResolver = Callable[[WSGIEnvironment], Role | None]
    WSGIErrorHandler = Callable[[WSGIEnvironment, CredentialsUnavailable], WSGIApplication | None]

__all__ = ["CredentialsWSGIMiddleware"]

T = TypeVar("T")

logger = logging.getLogger("stscreds")


class CredentialsWSGIMiddleware:
    """Resolves each request's Role and puts its Credentials in ``environ[environ_key]``.

    ``resolve_role(environ)`` is a plain function returning a Role, or None for a request that
    needs no credentials. Failures answer 502/503 with the same JSON body as the ASGI
    middleware, unless ``on_error(environ, error)`` returns a WSGI app (a Flask or Werkzeug
    Response is one) to answer instead. Also serves the issuer's OIDC documents.

    ``warm_up`` roles are fetched in the background as soon as the middleware is made
    (``wait_warm_up`` waits for them); failures are logged, never fatal. ``timeout`` bounds
    how long a request thread waits for credentials (default: the broker's
    ``request_timeout``, which ends the wait first, plus one second). Safe across ``fork``
    (gunicorn ``--preload``): a child starts its own event loop and keeps the parent's cached
    credentials.

    ``health_path`` (off by default; a path such as ``"/healthz"``): a GET or HEAD to exactly
    that path answers ``broker.health()`` as JSON, 200 unless its status is "unavailable"
    (then 503), before any role is resolved, like the OIDC documents. It names the role ARN
    and STS message of the last failed exchange: serve it where only probes can reach it.
    """

    def __init__(
        self,
        wsgi_app: WSGIApplication,
        *,
        broker: CredentialBroker,
        resolve_role: WSGIRoleResolver,
        environ_key: str = "stscreds.credentials",
        on_error: WSGIErrorHandler | None = None,
        warm_up: Iterable[Role] = (),
        timeout: float | None = None,
        serve_oidc: bool = True,
        oidc_max_age: int = 300,
        health_path: str | None = None,
    ) -> None:
        if not isinstance(broker, CredentialBroker):
            raise TypeError("broker: must be a CredentialBroker")
        if not callable(resolve_role):
            raise TypeError("resolve_role: must be callable")
        if inspect.iscoroutinefunction(resolve_role):
            raise TypeError("resolve_role: must be a plain function under WSGI, not async")
        if not isinstance(environ_key, str) or not environ_key:
            raise ValueError("environ_key: must be a non-empty string")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0
        ):
            raise ValueError("timeout: must be None or a positive number of seconds")
        documents = oidc_documents(broker, oidc_max_age)
        check_health_path(health_path, documents if serve_oidc else {})
        self.app = wsgi_app
        self.broker = broker
        self.resolve_role = resolve_role
        self._check = ResolverCheck(resolve_role)
        self.environ_key = environ_key
        self.on_error = on_error
        # The broker bounds every caller by request_timeout; the thread waits a little more
        # for that answer to travel back.
        self.timeout = broker.request_timeout + 1.0 if timeout is None else float(timeout)
        self.warm_up = warm_up_roles(warm_up)
        # One loop thread per broker, shared: a broker serves one event loop at a time.
        self._loop = _loop_for(broker)
        self._closed = False
        # WSGI paths are decoded bytes as latin-1 text: match the issuer's path the same way.
        # The health path is in the same dict (value None): one lookup for all of them.
        self._documents: dict[str, tuple[bytes, list[tuple[str, str]]] | None] = (
            dict(_as_wsgi(documents)) if serve_oidc else {}
        )
        if health_path is not None:
            self._documents[health_path.encode("utf-8", "surrogatepass").decode("latin-1")] = None
        self._oidc_max_age = oidc_max_age
        # The key ring the documents were rendered from: a new ring renders them again.
        self._documents_keys = broker.signing_keys if serve_oidc else None
        self._render_lock = threading.Lock()
        self._warm_up: concurrent.futures.Future[int] | None = None
        if self.warm_up:
            self._warm_up = self._loop.submit(run_warm_up, broker, self.warm_up)
        _MIDDLEWARES.add(self)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self._documents:
            path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
            if path in self._documents:
                return self._serve_document(path, environ, start_response)
        role = self.resolve_role(environ)
        if role is None:
            environ[self.environ_key] = None
        elif not isinstance(role, Role):
            self._check.error(role)
            start_response(
                _status_line(500),
                [
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(MISCONFIGURED_BODY))),
                    ("Cache-Control", "no-store"),
                ],
            )
            return [MISCONFIGURED_BODY]
        else:
            credentials = self.broker.peek(role)
            if credentials is None:
                try:
                    credentials = self.get(role)
                except CredentialsUnavailable as error:
                    return self._fail(environ, start_response, error)
            environ[self.environ_key] = credentials
        return self.app(environ, start_response)

    def get(self, role: Role) -> Credentials:
        """Credentials for ``role`` from any thread: cached, or from the one shared exchange.

        Blocks the calling thread (never call it on an event loop) for at most ``timeout``
        seconds. Raises CredentialsRejected or STSUnavailable.
        """
        credentials = self.broker.peek(role)
        if credentials is not None:
            return credentials
        try:
            if self._closed:
                raise RuntimeError("closed")
            future = self._loop.submit(self.broker.get, role)
        except RuntimeError:
            raise STSUnavailable(
                "stscreds: the WSGI middleware is closed", role_arn=role.arn
            ) from None

        def gave_up() -> None:
            logger.warning(
                "gave up waiting for credentials for %s after %gs",
                role.arn,
                self.timeout,
                extra={"role_arn": role.arn, "error_code": "Timeout"},
            )

        return wait_for_credentials(
            future,
            self.timeout,
            role,
            closed="stscreds: the WSGI middleware closed",
            on_timeout=gave_up,
        )

    def wait_warm_up(self, timeout: float | None = None) -> bool:
        """Wait for the warm-up to finish; True once it has (or if there is none).

        Under gunicorn ``--preload`` this lets every worker start with a warm cache.
        """
        if self._warm_up is None:
            return True
        concurrent.futures.wait([self._warm_up], timeout)
        return self._warm_up.done()

    def close(self, timeout: float = 5.0) -> None:
        """Stop using the broker's event loop thread; the last middleware using it stops it.

        Requests that miss the cache afterwards answer 503; the broker is left open. Also
        done at interpreter exit.
        """
        with _LOOPS_LOCK:
            if self._closed:
                return
            self._closed = True
        self._loop.release(timeout)

    def _fail(
        self,
        environ: WSGIEnvironment,
        start_response: StartResponse,
        error: CredentialsUnavailable,
    ) -> Iterable[bytes]:
        if self.on_error is not None:
            response = self.on_error(environ, error)
            if response is not None:
                return response(environ, start_response)
        body = json.dumps(error_body(error)).encode()
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
        ]
        if error.status_code == 503:
            headers.append(("Retry-After", retry_after_header(error)))
        start_response(_status_line(error.status_code), headers)
        return [body]

    def _serve_document(
        self, path: str, environ: WSGIEnvironment, start_response: StartResponse
    ) -> Iterable[bytes]:
        document = self._documents[path]
        if document is not None and self.broker.signing_keys is not self._documents_keys:
            # broker.set_signing_keys: serve the new ring (its own ETag) from now on. One
            # thread renders: two could leave the older ring's documents under the newer's.
            with self._render_lock:
                keys = self.broker.signing_keys  # first: a ring replaced meanwhile renders again
                if keys is not self._documents_keys:
                    rendered = _as_wsgi(oidc_documents(self.broker, self._oidc_max_age))
                    self._documents.update(rendered)
                    self._documents_keys = keys
            document = self._documents[path]
        method = environ.get("REQUEST_METHOD")
        if method not in ("GET", "HEAD"):
            start_response(_status_line(405), [("Allow", "GET, HEAD"), ("Content-Length", "0")])
            return [b""]
        if document is None:  # the health path
            status, health = health_response(self.broker)
            start_response(
                _status_line(status),
                [
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(health))),
                    ("Cache-Control", "no-store"),
                ],
            )
            return [b"" if method == "HEAD" else health]
        body, headers = document
        etag = headers[-1][1]
        if_none_match = environ.get("HTTP_IF_NONE_MATCH", "")
        # RFC 9110: "*" matches any current representation, as does our own ETag.
        if if_none_match.strip() == "*" or etag in if_none_match:
            start_response(_status_line(304), headers)
            return [b""]
        start_response(_status_line(200), headers)
        return [b"" if method == "HEAD" else body]

    def _after_fork_in_child(self) -> None:
        # A parent's thread may have held it at the fork.
        self._render_lock = threading.Lock()
        # The shared loop thread itself is reset once, by the module's fork hook.
        if self._warm_up is not None and not self._warm_up.done():
            # The parent's loop will never finish it here; the child keeps what was cached.
            self._warm_up = concurrent.futures.Future()
            self._warm_up.set_result(0)


def wait_for_credentials(
    future: concurrent.futures.Future[Credentials],
    timeout: float,
    role: Role,
    *,
    closed: str,
    on_timeout: Callable[[], None] | None = None,
) -> Credentials:
    """The credentials ``future`` (a ``broker.get`` on a loop thread) brings within ``timeout``
    seconds; else STSUnavailable, ``closed`` its message when the loop went away.

    A timeout cancels only this wait: the shared exchange goes on for the others.
    """
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        future.cancel()
        if on_timeout is not None:
            on_timeout()
        raise STSUnavailable(f"no credentials within {timeout:g}s", role_arn=role.arn) from None
    except concurrent.futures.CancelledError:
        raise STSUnavailable(closed, role_arn=role.arn) from None


def _as_wsgi(
    documents: dict[bytes, tuple[bytes, list[tuple[bytes, bytes]]]],
) -> dict[str, tuple[bytes, list[tuple[str, str]]]]:
    """``oidc_documents`` keyed and headed as WSGI has them (latin-1 text)."""
    return {
        path.decode("latin-1"): (body, [(k.decode(), v.decode()) for k, v in headers])
        for path, (body, headers) in documents.items()
    }


def _status_line(status: int) -> str:
    return f"{status} {HTTPStatus(status).phrase}"


class _LoopThread:
    """An event loop on a daemon thread: started on first use, stopped by close() or at exit,
    and started afresh in a forked child (the parent's thread does not exist there).

    ``users`` counts the middlewares sharing it (see ``_loop_for``); ``release`` by the last
    one closes it.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self.users = 0

    @property
    def closed(self) -> bool:
        return self._closed

    def release(self, timeout: float = 5.0) -> None:
        """One user is done with the loop; the last one closes it."""
        with _LOOPS_LOCK:
            self.users -= 1
            if self.users > 0:
                return
            # Closed for _loop_for at once: a middleware made now gets a new loop, not this one.
            self._closed = True
        self.close(timeout)

    def submit(
        self, function: Callable[..., Coroutine[Any, Any, T]], *args: Any
    ) -> concurrent.futures.Future[T]:
        """Run ``function(*args)`` on the loop; RuntimeError once closed."""
        with self._lock:
            if self._closed:
                raise RuntimeError("closed")
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=self._run, args=(self._loop,), name=self.name, daemon=True
                )
                self._thread.start()
            # The coroutine is made only once it is sure to be scheduled (never "not awaited").
            return asyncio.run_coroutine_threadsafe(function(*args), self._loop)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the loop: pending work is cancelled, the thread joined (up to ``timeout``)."""
        with self._lock:
            self._closed = True
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
            if loop is not None:
                loop.call_soon_threadsafe(loop.stop)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def after_fork_in_child(self) -> None:
        """Forget the parent's loop and thread; the next submit starts new ones."""
        # The parent's lock may have been held by a thread that does not exist here.
        self._lock = threading.Lock()
        if self._loop is not None:
            # That loop can be neither used nor closed here (it "runs" on a thread that does
            # not exist); kept referenced so its finalizer never warns about it.
            _ORPHANED_LOOPS.append(self._loop)
        self._loop = self._thread = None

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


_MIDDLEWARES: weakref.WeakSet[CredentialsWSGIMiddleware] = weakref.WeakSet()
_ORPHANED_LOOPS: list[asyncio.AbstractEventLoop] = []
# The loop thread each broker runs on, shared by every middleware using that broker: two
# loops driving one broker would each start their own exchange for one identity.
_LOOPS: weakref.WeakKeyDictionary[CredentialBroker, _LoopThread] = weakref.WeakKeyDictionary()
_LOOPS_LOCK = threading.Lock()


def _loop_for(broker: CredentialBroker) -> _LoopThread:
    """The broker's loop thread (a new one if it has none or it was closed), with one more user."""
    with _LOOPS_LOCK:
        loop = _LOOPS.get(broker)
        if loop is None or loop.closed:
            loop = _LOOPS[broker] = _LoopThread("stscreds-wsgi")
        loop.users += 1
        return loop


def _after_fork_in_child() -> None:
    global _LOOPS_LOCK
    # The parent's lock may have been held by a thread that does not exist here.
    _LOOPS_LOCK = threading.Lock()
    loops = {id(m._loop): m._loop for m in list(_MIDDLEWARES)}
    loops.update((id(loop), loop) for loop in list(_LOOPS.values()))
    for loop in loops.values():
        loop.after_fork_in_child()
    for middleware in list(_MIDDLEWARES):
        middleware._after_fork_in_child()


def _close_at_exit() -> None:
    for middleware in list(_MIDDLEWARES):
        middleware.close(timeout=1.0)
    # A middleware dropped without close() left its loop's user count up: stop them all.
    for loop in list(_LOOPS.values()):
        loop.close(timeout=1.0)


if hasattr(os, "register_at_fork"):  # POSIX only; there is no fork elsewhere
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_at_exit)
