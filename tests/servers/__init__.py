"""Real servers the tests and benchmarks start on loopback, and helpers to stop them."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from typing import Any


def terminate(procs: Iterable[subprocess.Popen[Any]], timeout: float = 10.0) -> None:
    """SIGTERM every process still running, then reap each (SIGKILL if it outlasts timeout)."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
