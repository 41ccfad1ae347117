"""A real ``redis-server`` process on 127.0.0.1 for the store tests, restartable on its port.

It speaks to the server with a few raw RESP bytes (PING, FLUSHALL), so it needs no client
library. ``STSCREDS_REDIS_SERVER`` picks another binary (e.g. ``valkey-server``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["RedisServer", "find_redis_server"]


def find_redis_server() -> str | None:
    """Path of the server binary to test against, or None when it is not installed."""
    return shutil.which(os.environ.get("STSCREDS_REDIS_SERVER", "redis-server"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One ``redis-server`` without persistence, bound to 127.0.0.1 on a free port."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.TemporaryDirectory(prefix="stscreds-redis-")
        self._log = Path(self._dir.name) / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start (or restart, on the same port) and return once it answers PING."""
        if self.running:
            return
        args = [self.binary, "--save", "", "--appendonly", "no"]
        args += ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", self._dir.name]
        with self._log.open("ab") as log:
            self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                self._proc = None
                raise RuntimeError(f"{self.binary} exited at start:\n{self._log_tail()}")
            try:
                if self.command(b"PING") == b"+PONG":
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.binary} did not answer PING:\n{self._log_tail()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the process (connections drop at once); ``start()`` brings it back."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections stay open but nothing answers."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo ``pause()``."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def flushall(self) -> None:
        """Delete every key."""
        reply = self.command(b"FLUSHALL")
        if reply != b"+OK":
            raise RuntimeError(f"FLUSHALL answered {reply!r}")

    def command(self, *args: bytes) -> bytes:
        """Send one command and return the first line of its reply (enough for +OK/+PONG)."""
        payload = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
            sock.sendall(payload)
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionError("redis-server closed the connection")
                reply += chunk
        return reply.split(b"\r\n", 1)[0]

    def close(self) -> None:
        """Stop the process and remove its directory."""
        self.stop()
        self._dir.cleanup()

    def _log_tail(self) -> str:
        try:
            return self._log.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"
