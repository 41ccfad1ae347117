"""Real servers the tests and benchmarks start on loopback, and helpers to stop them."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterable
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


def in_fork(child: Callable[[], bytes]) -> bytes:
    """Run ``child`` in a forked copy of this process; returns what it returned.

    The child leaves with ``os._exit`` (never through pytest's own exit); an exception in it
    fails the caller with the child's exit status.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.write(write, child())
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        reported = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the forked child failed"
    return reported
