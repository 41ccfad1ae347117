"""Shared fixtures: real servers on loopback with free ports (STS, Redis, WSGI, uvicorn)."""

import pathlib
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

# tests/ is a rootdir without a package; make tests/servers importable as ``servers``.
sys.path.insert(0, str(pathlib.Path(__file__).parent))

from servers.redis import RedisServer, find_redis_server
from servers.sts import StrictSTS


@pytest.fixture
def strict_sts() -> Iterator[StrictSTS]:
    """A started StrictSTS with no provider configured; call ``.configure(...)`` in the test."""
    sts = StrictSTS()
    sts.start()
    try:
        yield sts
    finally:
        sts.stop()


@pytest.fixture(scope="session")
def moto_sts() -> Iterator[str]:
    """URL of moto's own server (accepts any web identity token) on 127.0.0.1."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on 127.0.0.1 (free port) for the session; ``.stop()``/``.start()``."""
    binary = find_redis_server()
    if binary is None:
        pytest.fail("redis-server is not installed: run `make test`, which installs it")
    server = RedisServer(binary)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session's redis-server, running and emptied (FLUSHALL) for this test."""
    redis_server.start()  # a no-op unless an earlier test left it stopped
    redis_server.flushall()
    return redis_server.url


@pytest.fixture
def wsgi_server() -> Iterator[Callable[[Any], str]]:
    """Serve a WSGI app with Werkzeug's threaded server (a thread per request) on 127.0.0.1.

    Call it with the app; it returns the base URL. Every server is shut down after the test.
    """
    from werkzeug.serving import WSGIRequestHandler, make_server

    class QuietHandler(WSGIRequestHandler):
        def log_request(self, *args: Any, **kwargs: Any) -> None:
            """No access log line per request."""

    servers: list[tuple[Any, threading.Thread]] = []

    def serve(app: Any) -> str:
        server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=QuietHandler)
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_port}"

    yield serve
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def uvicorn_server() -> Iterator[Callable[..., str]]:
    """Serve an ASGI app with uvicorn in a thread on 127.0.0.1; returns the base URL.

    Keyword arguments go to ``uvicorn.Config``. Logs propagate to the root logger (caplog
    sees them). Servers are shut down (lifespan shutdown included) after the test.
    """
    import uvicorn

    running: list[tuple[Any, threading.Thread, socket.socket]] = []

    def serve(app: Any, **options: Any) -> str:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(app, log_config=None, **options)
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        running.append((server, thread, sock))
        deadline = time.monotonic() + 10
        while not server.started:  # waits for an event (start-up), never to let time pass
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield serve
    for server, thread, sock in running:
        server.should_exit = True
        thread.join(10)
        sock.close()
