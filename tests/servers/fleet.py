"""Fleets of ``fleet_app`` worker processes for multi-process tests, and a raw HTTP client.

Each worker is its own ``uvicorn`` process serving ``fleet_app:app`` on a listening socket the
parent bound (127.0.0.1, free port) and passed down by file descriptor: the port is known before
the process starts (so the issuer URL can name a worker), no port can be taken in between, and
requests to a given worker go to exactly that process (unlike ``uvicorn --workers N``, where the
kernel picks the worker). The parent closes its copy of each socket once the worker has it, so a
killed worker's port refuses connections instead of queueing them.

Workers exit on their own when the test process dies (a watchdog thread notices the parent
change), so an interrupted test run leaves no server behind; ``Fleet.stop`` is still the normal way.

Run as a script (``python fleet.py --fd N``) it is the worker: it serves on inherited fd N.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Fleet", "Response", "Worker", "http_request"]

_HERE = Path(__file__).resolve().parent


@dataclass
class Response:
    """An HTTP response read to EOF (requests are sent with ``Connection: close``)."""

    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def http_request(
    port: int, path: str, *, method: str = "GET", timeout: float = 30.0
) -> Response:
    """One request on its own connection to 127.0.0.1:``port`` (no pool, no keep-alive)."""

    async def exchange() -> Response:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                "Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
            # Reset by a killed server: the answer (or its absence) decides, not the close.
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        head, sep, body = raw.partition(b"\r\n\r\n")
        if not sep:
            raise ConnectionError(f"incomplete HTTP response from port {port}: {raw[:80]!r}")
        status_line = head.split(b"\r\n", 1)[0].split()
        if len(status_line) < 2 or b"chunked" in head.lower():
            raise ConnectionError(f"unexpected HTTP response from port {port}: {head[:200]!r}")
        return Response(int(status_line[1]), body)

    return await asyncio.wait_for(exchange(), timeout)


class Worker:
    """One worker process of a Fleet."""

    def __init__(self, index: int, sock: socket.socket, log_path: Path) -> None:
        self.index = index
        self.sock: socket.socket | None = sock
        self.port: int = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "worker not started"
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        """Everything the worker wrote to stdout and stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 10.0) -> None:
        """Send ``sig`` and wait (bounded) for the process to exit."""
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(sig)
            self.proc.wait(timeout)

    async def get(self, path: str, *, method: str = "GET", timeout: float = 30.0) -> Response:
        return await http_request(self.port, path, method=method, timeout=timeout)

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc is not None else None
        return f"Worker(index={self.index}, port={self.port}, pid={pid}, alive={self.alive})"


class Fleet:
    """``size`` fleet_app workers sharing one configuration (FLEET_* environment variables).

    The issuer (``FLEET_ISSUER``) is the URL of worker ``issuer_index``, which serves the
    OpenID configuration and JWKS, as the app's IdP would in production.
    """

    def __init__(
        self,
        size: int,
        *,
        workdir: Path,
        sts_url: str,
        store: str = "none",
        store_url: str = "",
        store_key: str = "",
        env: Mapping[str, str] | None = None,
        issuer_index: int = 0,
    ) -> None:
        from stscreds import SigningKey

        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        key_file = workdir / "signing-key.pem"
        key_file.write_bytes(SigningKey.generate("RS256").to_pem())
        key_file.chmod(0o600)
        self.workers: list[Worker] = []
        for index in range(size):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sock.listen(4096)
            self.workers.append(Worker(index, sock, workdir / f"worker-{index}.log"))
        self.issuer = self.workers[issuer_index].url
        self.env = {
            **os.environ,
            "FLEET_ISSUER": self.issuer,
            "FLEET_KEY_FILE": str(key_file),
            "FLEET_STS": sts_url,
            "FLEET_STORE": store,
            "FLEET_STORE_URL": store_url,
            "FLEET_STORE_KEY": store_key,
            "FLEET_PARENT_PID": str(os.getpid()),
            # Unbuffered, so a worker's log file is complete even if it is killed.
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }

    def __getitem__(self, index: int) -> Worker:
        return self.workers[index]

    def __iter__(self) -> Any:
        return iter(self.workers)

    def __len__(self) -> int:
        return len(self.workers)

    @property
    def alive(self) -> list[Worker]:
        return [worker for worker in self.workers if worker.alive]

    def start(self) -> Fleet:
        """Spawn every worker (returns at once; ``await ready()`` waits until they answer)."""
        for worker in self.workers:
            assert worker.sock is not None, "a worker can only be started once"
            fd = worker.sock.fileno()
            with worker.log_path.open("ab") as log:
                worker.proc = subprocess.Popen(
                    [sys.executable, str(_HERE / "fleet.py"), "--fd", str(fd)],
                    pass_fds=(fd,),
                    env=self.env,
                    cwd=str(self.workdir),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            worker.sock.close()
            worker.sock = None
        return self

    async def ready(self, timeout: float = 30.0) -> None:
        """Return once every worker answers ``GET /stats``; fail (with its log) if one exits."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for worker in self.workers:
            while True:
                if not worker.alive:
                    raise RuntimeError(f"{worker!r} exited at start:\n{worker.log()[-3000:]}")
                try:
                    response = await worker.get("/stats", timeout=2.0)
                    if response.status == 200 and response.json()["pid"] == worker.pid:
                        break
                except (OSError, asyncio.TimeoutError, ValueError):
                    pass  # not listening yet: the kernel queues, the app is still importing
                if loop.time() > deadline:
                    raise RuntimeError(f"{worker!r} did not answer:\n{worker.log()[-3000:]}")
                await asyncio.sleep(0.05)

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate every worker (SIGKILL whoever ignores SIGTERM) and reap them all."""
        for worker in self.workers:
            if worker.sock is not None:
                worker.sock.close()
                worker.sock = None
            if worker.alive:
                assert worker.proc is not None
                worker.proc.terminate()
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            if worker.proc is None:
                continue
            try:
                worker.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                worker.proc.wait()

    async def set_clock(self, offset: float) -> None:
        """Move the OffsetClock of every live worker ``offset`` seconds ahead of the wall clock."""
        for worker in self.alive:
            response = await worker.get(f"/_clock?offset={offset}", method="POST")
            assert response.status == 200, response

    def logs(self) -> str:
        return "\n".join(f"--- worker {w.index} ---\n{w.log()}" for w in self.workers)


# -- the worker process ------------------------------------------------------------------------


def _exit_with_parent(parent: int) -> None:
    """Exit as soon as the test process that started us is gone (we were re-parented)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(3)

    threading.Thread(target=watch, name="fleet-watchdog", daemon=True).start()


def _serve(argv: Sequence[str]) -> None:
    if len(argv) != 2 or argv[0] != "--fd":
        raise SystemExit("usage: fleet.py --fd N")
    parent = int(os.environ.get("FLEET_PARENT_PID", "0"))
    if parent:
        _exit_with_parent(parent)
    # Python put this directory first on sys.path; its redis.py would shadow redis-py.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
    import importlib.util

    import uvicorn

    spec = importlib.util.spec_from_file_location("fleet_app", _HERE / "fleet_app.py")
    assert spec is not None and spec.loader is not None
    fleet_app = importlib.util.module_from_spec(spec)
    sys.modules["fleet_app"] = fleet_app
    spec.loader.exec_module(fleet_app)

    sock = socket.socket(fileno=int(argv[1]))  # family and type detected from the fd
    config = uvicorn.Config(
        fleet_app.app,
        log_level=os.environ.get("FLEET_LOG_LEVEL", "warning"),
        access_log=False,
        timeout_graceful_shutdown=2,
    )
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    _serve(sys.argv[1:])
