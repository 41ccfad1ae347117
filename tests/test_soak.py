"""Smoke test of benchmarks/soak.py: a 5 s soak (20 identities, 2 workers) runs clean.

Part of the normal suite, and short: the soak runs 5 s of wall time (about 7 s with start-up
and the report) in a subprocess, which is killed after 120 s whatever happens. The full soak
(60 s, 200 identities, 4 workers) is run by hand: ``.venv/bin/python benchmarks/soak.py``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from servers.redis import find_redis_server

ROOT = Path(__file__).resolve().parent.parent
SOAK = ROOT / "benchmarks" / "soak.py"

#: The start of every line the report must have.
REPORT_LINES = (
    "soak:",
    "simulated",
    "lifetimes",
    "STS clock",
    "redis restart at",
    "requests",
    "failures",
    "exceptions",
    "latency       p50",
    "worst left",
    "STS calls",
    "bound (2)",
    "calls per identity per refresh cycle",
    "invariants",
    "OK: all invariants held",
)


def test_soak_runs_clean_for_five_seconds() -> None:
    if find_redis_server() is None:
        pytest.fail("redis-server is not installed: run `make test`, which installs it")
    args = [sys.executable, str(SOAK), "--seconds", "5", "--identities", "20"]
    args += ["--workers", "2", "--clients", "8", "--redis-down", "0.5"]
    result = subprocess.run(
        args, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    lines = result.stdout.splitlines()
    missing = [start for start in REPORT_LINES if not any(x.startswith(start) for x in lines)]
    assert not missing, f"report lines missing: {missing}\n{output}"
    # Figures were measured, not left at zero: the soak made requests and STS calls.
    requests = next(x for x in lines if x.startswith("requests"))
    assert int(requests.split()[1].replace(",", "")) > 1000, requests
    calls = next(x for x in lines if x.startswith("STS calls"))
    assert int(calls.split()[2].replace(",", "")) > 20, calls
