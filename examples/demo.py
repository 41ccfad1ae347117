"""``make demo``: a local STS, the FastAPI example under uvicorn, a burst of requests, a report.

1. starts moto's STS server on loopback, wrapped to count AssumeRoleWithWebIdentity calls;
2. serves examples/fastapi_app.py with uvicorn on a free loopback port;
3. fires 500 concurrent requests for one tenant and 50 for each of 10 more, all at once;
4. prints requests, STS calls, hit ratio and p50/p99 latency (of the burst, and of 200 cache hits
   sent one at a time), then what the app's own /metrics says; exits 1 if anything failed.
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx  # readiness probe only
from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import WSGIRequestHandler, make_server

ROOT = Path(__file__).resolve().parent.parent
BIG_TENANT, BIG_BURST = "acme", 500
SMALL_TENANTS, SMALL_BURST = [f"tenant{i}" for i in range(10)], 50


class QuietHandler(WSGIRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:
        """One line per STS call would drown the report."""


class CountingSTS:
    """moto's server in a thread, counting the STS calls that reach it."""

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()
        self._server = make_server(
            "127.0.0.1", 0, self._app, threaded=True, request_handler=QuietHandler
        )
        self._moto = DomainDispatcherApplication(create_backend_app)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _app(self, environ: dict[str, Any], start_response: Any) -> Any:
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        if b"Action=AssumeRoleWithWebIdentity" in body:
            with self._lock:
                self.calls += 1
        environ["wsgi.input"] = io.BytesIO(body)
        return self._moto(environ, start_response)

    def __enter__(self) -> CountingSTS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def step(what: str) -> None:
    """One line per step, at once: a newcomer sees what is going on."""
    print(f"demo: {what}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"demo: the app exited with status {process.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit("demo: the app did not start in time")


async def get(port: int, tenant: str) -> tuple[float, int]:
    """One HTTP/1.1 request on its own connection; returns (seconds, status)."""
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = (
        f"GET /whoami HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Tenant: {tenant}\r\n"
        "Connection: close\r\n\r\n"
    )
    writer.write(request.encode())
    response = await reader.read()
    writer.close()
    await writer.wait_closed()
    status = int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0
    return time.perf_counter() - start, status


async def burst(port: int) -> tuple[list[float], list[int]]:
    """All requests at once: a plain socket client, so the figures are the server's, not
    an HTTP client library's connection pool."""
    tenants = [BIG_TENANT] * BIG_BURST + [t for t in SMALL_TENANTS for _ in range(SMALL_BURST)]
    results = await asyncio.gather(*(get(port, t) for t in tenants))
    return [r[0] for r in results], [r[1] for r in results]


async def one_at_a_time(port: int, count: int) -> tuple[list[float], list[int]]:
    """``count`` requests for the big tenant, each after the previous one finished."""
    results = [await get(port, BIG_TENANT) for _ in range(count)]
    return [r[0] for r in results], [r[1] for r in results]


def stscreds_metrics(base: str) -> dict[str, float]:
    """The app's /metrics (StscredsCollector), summed per series name over its labels."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics").text):
        for sample in family.samples:
            if sample.name.startswith("stscreds_"):
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> int:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with CountingSTS() as sts:
        env = {
            **os.environ,
            "STSCREDS_ISSUER": base,
            "STSCREDS_STS_ENDPOINT": sts.url,
            "PYTHONPATH": str(ROOT),
        }
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "examples.fastapi_app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]
        step(f"local STS (moto) at {sts.url}")
        step(f"starting examples/fastapi_app.py under uvicorn at {base}")
        app = subprocess.Popen(command, cwd=ROOT, env=env)
        try:
            wait_ready(f"{base}/.well-known/openid-configuration", app)
            total = BIG_BURST + len(SMALL_TENANTS) * SMALL_BURST
            step(f"sending {total:,} requests at once for {1 + len(SMALL_TENANTS)} tenants")
            started = time.perf_counter()
            latencies, statuses = asyncio.run(burst(port))
            elapsed = time.perf_counter() - started
            # The burst's latency is mostly queueing (1,000 connections at once, one worker);
            # one request at a time shows what a cache hit costs a request.
            step("sending 200 requests one at a time (cache hits)")
            single = asyncio.run(one_at_a_time(port, 200))
            step("reading the app's /metrics")
            metrics = stscreds_metrics(base)
        finally:
            app.terminate()
            app.wait(timeout=10)
        roles = 1 + len(SMALL_TENANTS)
        failed = sum(1 for s in statuses if s != 200)
        requests = len(statuses)
        print()
        print(f"requests      {requests} ({failed} failed) in {elapsed:.2f}s")
        print(f"roles         {roles}")
        print(f"STS calls     {sts.calls} (one per request without stscreds: {requests})")
        print(f"hit ratio     {(requests - sts.calls) / requests:.1%}")
        print(f"latency p50   {percentile(latencies, 0.50) * 1000:.1f} ms")
        print(f"latency p99   {percentile(latencies, 0.99) * 1000:.1f} ms  (all sent at once)")
        print(
            f"one at a time p50 {percentile(single[0], 0.50) * 1000:.1f} ms, "
            f"p99 {percentile(single[0], 0.99) * 1000:.1f} ms  ({len(single[0])} cache hits)"
        )
        count = metrics.get("stscreds_exchange_duration_seconds_count", 0.0)
        mean = metrics.get("stscreds_exchange_duration_seconds_sum", 0.0) / max(count, 1.0)
        print(
            f"app's /metrics {metrics.get('stscreds_exchanges_total', 0):.0f} exchanges "
            f"(mean {mean * 1000:.0f} ms), "
            f"{metrics.get('stscreds_singleflight_joins_total', 0):.0f} requests joined one "
            f"in flight, {metrics.get('stscreds_l1_hits_total', 0):.0f} cache hits"
        )
        failed += sum(1 for s in single[1] if s != 200)
        if failed or sts.calls != roles:
            print(f"demo: expected {roles} STS calls and no failures", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
