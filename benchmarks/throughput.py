"""Throughput of CredentialsMiddleware under a real ASGI server, as a ratio to the bare app.

One Starlette app with a plain-text endpoint (benchmarks/throughput_app.py) is served in five
variants, each its own server process bound to a free 127.0.0.1 port:

``bare``      the app alone;
``noop``      the app behind a pure-ASGI middleware that only forwards the call;
``prebuilt``  behind ``CredentialsMiddleware``, resolving a prebuilt Role by ``x-tenant`` header;
``template``  the same with the README's resolver: ``TENANT_ROLE.get(header)``, a RoleTemplate;
``built``     the same with ``Role(arn, subject=..., policy=...)`` built per request.

Servers: uvicorn (``--http httptools --loop uvloop``, one worker) and granian
(``--interface asgi --loop uvloop --http 1``, one worker, one runtime thread). The load is
``wrk -t1 -c32`` on loopback, its requests spread round-robin over three tenants (``x-tenant``
header, a small wrk Lua script). With two or more CPUs the servers are pinned to one CPU and
wrk to another (``taskset``).

Before anything is timed, every stscreds variant fetches credentials for the three tenants at
start-up (lifespan) from a strict local STS (``stscreds.testing.LocalSTS``) on loopback, which
is then stopped: a request that missed the cache would answer 503, not be quietly slow.

Method: rounds (default 15). In each round every variant of every server is loaded for
``--seconds`` (default 1), the variants in an order rotated from round to round, so all of
them see the same machine load; a variant's figure is the median of its rounds' req/s, and a
ratio (``prebuilt/bare``...) is computed per round, then its median taken. Short turns pair
better than long ones on a shared machine: a neighbour's burst lasts seconds, and the closer
in time two variants run, the more likely they share it. Next to wrk's req/s the benchmark
reports requests per CPU-second of the serving process (all its threads, from
``/proc/<pid>/task/*/schedstat``), which a neighbour taking part of the server's CPU disturbs
much less, and how much CPU the server got per second of load ("busy"; 1.00 = a whole CPU,
well below it means the figures of that run were cut by a neighbour). The goal (issue #10) is
>= 0.95 for ``prebuilt/bare`` and ``template/bare`` under uvicorn.

Correctness, checked after every wrk run (any failure stops the benchmark, exit 1): wrk saw no
non-2xx answer and no socket error; the endpoint answers 200 only when the request carries
exactly the credentials warmed for its tenant (without the middleware: none), and counted no
500; it served at least the requests wrk counted; and the broker made no STS exchange after the
warm-up and counted a cache hit for every request.

Usage::

    .venv/bin/python benchmarks/throughput.py            # 15 rounds x 1 s per variant (~3 min)
    .venv/bin/python benchmarks/throughput.py --quick    # 1 round x 1 s, a smoke test (< 60 s)
    .venv/bin/python benchmarks/throughput.py --json     # one JSON object on stdout
    .venv/bin/python benchmarks/throughput.py --servers uvicorn --rounds 25
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from throughput_app import STSCREDS_VARIANTS, TENANTS, VARIANTS  # noqa: E402

from stscreds.testing import LocalSTS  # noqa: E402

SERVERS = ("uvicorn", "granian")
GOAL = 0.95
CONNECTIONS = 32
#: Seconds to wait for a server to start and warm its cache.
START_TIMEOUT = 90.0

#: wrk script: the requests go round-robin to the tenants (built once, per wrk thread).
WRK_SCRIPT = """\
local tenants = {TENANTS}
local requests = {}
local i = 0
init = function(args)
  for k, tenant in ipairs(tenants) do
    requests[k] = wrk.format(nil, nil, {["x-tenant"] = tenant})
  end
end
request = function()
  i = i % #requests + 1
  return requests[i]
end
""".replace("TENANTS", ", ".join(f'"{tenant.decode()}"' for tenant in TENANTS))


class BenchmarkError(Exception):
    """A check failed: the figures would not be trustworthy."""


@dataclass
class Server:
    """One server process serving one variant."""

    server: str
    variant: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    last: dict[str, Any] = field(default_factory=dict)
    pid: int = 0  # the process that serves (granian's worker, not its supervisor)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/stats", timeout=timeout) as response:
            body: dict[str, Any] = json.load(response)
            return body

    def cpu_ns(self) -> int:
        """CPU time the serving process has used, all threads, in ns (scheduler accounting)."""
        total = 0
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            with contextlib.suppress(OSError):  # a thread that just ended
                total += int((task / "schedstat").read_text().split()[0])
        return total

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pinning(enabled: bool) -> tuple[list[str], list[str], str]:
    """taskset prefixes for the servers and for wrk, and a description of what was done."""
    if not enabled:
        return [], [], "not pinned (--no-pin)"
    cpus = sorted(os.sched_getaffinity(0))
    taskset = shutil.which("taskset")
    if taskset is None or len(cpus) < 2:
        why = "taskset not found" if taskset is None else f"only CPU {cpus} available"
        return [], [], f"not pinned ({why})"
    server_cpu, wrk_cpu = cpus[0], cpus[1]
    return (
        [taskset, "-c", str(server_cpu)],
        [taskset, "-c", str(wrk_cpu)],
        f"servers on CPU {server_cpu}, wrk on CPU {wrk_cpu} (taskset -c)",
    )


def server_command(server: str, port: int) -> list[str]:
    if server == "uvicorn":
        return [
            sys.executable,
            "-m",
            "uvicorn",
            "throughput_app:app",
            "--app-dir",
            str(HERE),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--http",
            "httptools",
            "--loop",
            "uvloop",
            "--lifespan",
            "on",
            "--no-access-log",
            "--log-level",
            "warning",
        ]
    granian = shutil.which("granian", path=str(Path(sys.executable).parent)) or "granian"
    return [
        granian,
        "--interface",
        "asgi",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--runtime-threads",
        "1",
        "--loop",
        "uvloop",
        "--http",
        "1",
        "--log-level",
        "warning",
        "throughput_app:app",
    ]


def start_server(
    server: str, variant: str, prefix: list[str], env: dict[str, str], workdir: Path
) -> Server:
    port = free_port()
    log = workdir / f"{server}-{variant}.log"
    process_env = {
        **os.environ,
        **env,
        "STSCREDS_BENCH_VARIANT": variant,
        # The same str hashes (hence dict layouts) in every variant's process.
        "PYTHONHASHSEED": "0",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*prefix, *server_command(server, port)],
            env=process_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: granian's worker stops with it
        )
    return Server(server, variant, port, process, log)


def wait_warm(servers: list[Server]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    pending = list(servers)
    while pending:
        for item in list(pending):
            if item.process.poll() is not None:
                raise BenchmarkError(
                    f"{item.server} ({item.variant}) exited with {item.process.returncode}:\n"
                    + item.log_tail()
                )
            with contextlib.suppress(OSError, ValueError):
                stats = item.stats(timeout=2.0)
                if stats["warmed"]:
                    item.last = stats
                    item.pid = stats["pid"]
                    pending.remove(item)
        if pending and time.monotonic() > deadline:
            names = ", ".join(f"{s.server}/{s.variant}" for s in pending)
            raise BenchmarkError(f"not warm after {START_TIMEOUT:.0f} s: {names}")
        if pending:
            time.sleep(0.2)


def stop_servers(servers: list[Server]) -> None:
    for item in servers:
        if item.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                item.process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 10
    for item in servers:
        try:
            item.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(item.process.pid, signal.SIGKILL)  # the group it was started in
            item.process.wait()


_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_TOTAL = re.compile(r"^\s*(\d+) requests in ", re.M)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def run_wrk(
    prefix: list[str], script: Path, urls: list[str], seconds: int
) -> list[tuple[float, int]]:
    """One wrk per URL, all at once: (req/s, requests completed) each; BenchmarkError on any
    error."""
    runs = [
        subprocess.Popen(
            [
                *prefix,
                "wrk",
                "-t1",
                f"-c{CONNECTIONS}",
                f"-d{seconds}s",
                "--timeout",
                "5s",
                "-s",
                str(script),
                url + "/data",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for url in urls
    ]
    outputs = [run.communicate(timeout=seconds + 30)[0] for run in runs]
    results = []
    for url, run, output in zip(urls, runs, outputs, strict=True):
        rps, total = _RPS.search(output), _TOTAL.search(output)
        if run.returncode != 0 or rps is None or total is None:
            raise BenchmarkError(f"wrk failed ({run.returncode}):\n{output}")
        non_2xx = _NON_2XX.search(output)
        if non_2xx and int(non_2xx.group(1)):
            raise BenchmarkError(f"{url}: {non_2xx.group(1)} non-2xx answers:\n{output}")
        errors = _SOCKET.search(output)
        if errors and any(int(count) for count in errors.groups()):
            raise BenchmarkError(f"{url}: socket errors:\n{output}")
        results.append((float(rps.group(1)), int(total.group(1))))
    return results


def check_after_run(item: Server, completed: int) -> int:
    """The server's own counters agree with wrk's: nothing failed, no STS call after warm-up.

    Returns the requests the server served during the run."""
    before, after = item.last, item.stats()
    where = f"{item.server}/{item.variant}"
    if after["failed"]:
        raise BenchmarkError(f"{where}: {after['failed']} requests lacked their credentials")
    served: int = after["served"] - before["served"]
    if served < completed:
        raise BenchmarkError(f"{where}: served {served} requests, wrk counted {completed}")
    if item.variant in STSCREDS_VARIANTS:
        broker = after["broker"]
        expected = len(TENANTS)
        if broker["exchanges"] != expected or broker["misses"] != expected:
            raise BenchmarkError(f"{where}: STS exchanges after the warm-up: {broker}")
        hits = broker["hits"] - before["broker"]["hits"]
        if hits != served:
            raise BenchmarkError(f"{where}: {hits} cache hits for {served} requests: {broker}")
    item.last = after
    return served


@dataclass
class Run:
    rps: float  # wrk's requests/s (wall clock)
    cpu_rps: float  # requests served per CPU-second of the serving process
    busy: float  # CPU-seconds the serving process got per second of the wrk run (wall)


def measure(items: list[Server], wrk_prefix: list[str], script: Path, seconds: int) -> list[Run]:
    """Checked wrk runs against ``items``, all at the same time (one wrk each)."""
    cpus, wall = [item.cpu_ns() for item in items], time.perf_counter()
    loads = run_wrk(wrk_prefix, script, [item.url for item in items], seconds)
    wall = time.perf_counter() - wall
    cpus = [item.cpu_ns() - cpu for item, cpu in zip(items, cpus, strict=True)]
    runs = []
    for item, (rps, completed), cpu in zip(items, loads, cpus, strict=True):
        served = check_after_run(item, completed)
        runs.append(Run(rps, served / (cpu / 1e9) if cpu else 0.0, cpu / 1e9 / wall))
    return runs


def rotated(names: tuple[str, ...], first: int) -> list[str]:
    first %= len(names)
    return list(names[first:] + names[:first])


def versions() -> dict[str, str]:
    found = {}
    for name in ("uvicorn", "granian", "starlette", "uvloop", "httptools"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "missing"
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    found["wrk"] = (wrk.stdout + wrk.stderr).split("Copyright")[0].strip()
    return found


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


@contextlib.contextmanager
def warm_sts() -> Iterator[tuple[LocalSTS, dict[str, str], Path]]:
    """A strict local STS trusting a fresh key, and the environment the apps need to use it."""
    from stscreds import SigningKey

    with tempfile.TemporaryDirectory(prefix="stscreds-throughput-") as tmp:
        workdir = Path(tmp)
        key = SigningKey.generate("ES256")
        key_file = workdir / "key.pem"
        key_file.write_bytes(key.to_pem())
        sts = LocalSTS().start()
        try:
            broker = sts.make_broker(signing_keys=[key])
            sts.configure(jwks=broker.jwks())  # a snapshot: the broker is not kept
            env = {
                "STSCREDS_BENCH_STS_URL": sts.url,
                "STSCREDS_BENCH_ISSUER": broker.issuer,
                "STSCREDS_BENCH_KEY_FILE": str(key_file),
            }
            broker.close()
            yield sts, env, workdir
        finally:
            sts.stop()


def log(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def benchmark(
    servers: list[str], seconds: int, rounds: int, pin: bool, quiet: bool, concurrent: bool = False
) -> dict[str, Any]:
    started = time.monotonic()
    server_prefix, wrk_prefix, pinned = pinning(pin)
    loads = [os.getloadavg()]
    processes: list[Server] = []
    with warm_sts() as (sts, env, workdir):
        script = workdir / "tenants.lua"
        script.write_text(WRK_SCRIPT)
        try:
            for server in servers:
                for variant in VARIANTS:
                    processes.append(start_server(server, variant, server_prefix, env, workdir))
            log(f"throughput: started {len(processes)} server processes; warming up", quiet)
            wait_warm(processes)
            sts_calls = sts.calls
            expected_calls = len(servers) * len(STSCREDS_VARIANTS) * len(TENANTS)
            if sts_calls != expected_calls:
                raise BenchmarkError(f"warm-up made {sts_calls} STS calls, not {expected_calls}")
            sts.stop()  # from here on a cache miss fails instead of being slow
            log(f"throughput: warm ({sts_calls} STS calls); STS stopped", quiet)
            by_name = {(item.server, item.variant): item for item in processes}

            # Untimed: the first connections, the first requests of every code path.
            for item in processes:
                measure([item], wrk_prefix, script, 1)

            samples: dict[str, dict[str, list[Run]]] = {
                server: {variant: [] for variant in VARIANTS} for server in servers
            }
            for index in range(rounds):
                for server in servers:
                    if concurrent:
                        items = [by_name[(server, variant)] for variant in VARIANTS]
                        for variant, run in zip(
                            VARIANTS, measure(items, wrk_prefix, script, seconds), strict=True
                        ):
                            samples[server][variant].append(run)
                        continue
                    for variant in rotated(VARIANTS, index):
                        (run,) = measure([by_name[(server, variant)]], wrk_prefix, script, seconds)
                        samples[server][variant].append(run)
                loads.append(os.getloadavg())
                figures = "  ".join(
                    f"{server}: "
                    + " ".join(f"{v}={samples[server][v][-1].rps:,.0f}" for v in VARIANTS)
                    for server in servers
                )
                log(f"round {index + 1}/{rounds}: {figures}", quiet)
            finals = {item.server + "/" + item.variant: item.last for item in processes}
        finally:
            stop_servers(processes)

    result: dict[str, Any] = {
        "benchmark": "throughput",
        "machine": {
            "nproc": os.cpu_count(),
            "cpu": cpu_model(),
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "platform": platform.platform(),
            "versions": versions(),
            "pinning": pinned,
            "load_average_1m": {
                "start": loads[0][0],
                "end": loads[-1][0],
                "max": max(load[0] for load in loads),
            },
        },
        "wrk": f"wrk -t1 -c{CONNECTIONS} -d{seconds}s --timeout 5s -s tenants.lua "
        f"(x-tenant round-robin over {', '.join(t.decode() for t in TENANTS)})",
        "seconds": seconds,
        "rounds": rounds,
        "mode": "concurrent" if concurrent else "interleaved",
        "goal": GOAL,
        "servers": {},
        "checks": {
            "sts_calls_at_warm_up": sts_calls,
            "final_stats": finals,
        },
    }
    for server in servers:
        per_variant = samples[server]
        result["servers"][server] = {
            "command": " ".join(server_command(server, 0)).replace("--port 0", "--port <free>"),
            "variants": {
                variant: {
                    "rps": statistics.median(run.rps for run in runs),
                    "min": min(run.rps for run in runs),
                    "max": max(run.rps for run in runs),
                    "rounds": [run.rps for run in runs],
                    "cpu_rps": statistics.median(run.cpu_rps for run in runs),
                    "cpu_rps_rounds": [round(run.cpu_rps, 1) for run in runs],
                    "busy_rounds": [round(run.busy, 3) for run in runs],
                }
                for variant, runs in per_variant.items()
            },
            "ratios": paired_ratios(
                {v: [run.rps for run in runs] for v, runs in per_variant.items()}
            ),
            "cpu_ratios": paired_ratios(
                {v: [run.cpu_rps for run in runs] for v, runs in per_variant.items()}
            ),
        }
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    return result


def paired_ratios(figures: dict[str, list[float]]) -> dict[str, float]:
    """``variant/base`` for base bare and noop: the median of the per-round ratios."""
    ratios: dict[str, float] = {}
    for base in ("bare", "noop"):
        for variant in VARIANTS:
            if variant == base or (base == "noop" and variant == "bare"):
                continue
            paired = [
                value / reference
                for value, reference in zip(figures[variant], figures[base], strict=True)
            ]
            ratios[f"{variant}/{base}"] = statistics.median(paired)
    return ratios


def ratio_cells(ratios: dict[str, float], variant: str) -> str:
    """The ``/ bare | / noop`` cells of a table row."""
    to_bare = "1" if variant == "bare" else f"{ratios[f'{variant}/bare']:.3f}"
    if variant == "noop":
        return f"{to_bare} | 1"
    return f"{to_bare} | {'' if variant == 'bare' else format(ratios[f'{variant}/noop'], '.3f')}"


def print_table(result: dict[str, Any]) -> None:
    machine = result["machine"]
    load = machine["load_average_1m"]
    print(
        f"throughput: {result['wrk']}; {result['rounds']} round(s) x {result['seconds']} s per "
        f"variant, {result['mode']}; {machine['implementation']} {machine['python']}, "
        f"nproc={machine['nproc']}; {machine['pinning']}; load average (1 min) "
        f"{load['start']:.2f} -> {load['end']:.2f} (max {load['max']:.2f}); "
        f"{result['wall_seconds']} s"
    )
    for server, figures in result["servers"].items():
        print()
        print(f"**{server}** (`{figures['command']}`)")
        print()
        print(
            "| variant | req/s (median) | min | max | / bare | / noop "
            "| req per CPU-s | / bare | / noop | server CPU busy |"
        )
        print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
        ratios, cpu_ratios = figures["ratios"], figures["cpu_ratios"]
        for variant, values in figures["variants"].items():
            busy = values["busy_rounds"]
            print(
                f"| {variant} | {values['rps']:,.0f} | {values['min']:,.0f} | "
                f"{values['max']:,.0f} | {ratio_cells(ratios, variant)} | "
                f"{values['cpu_rps']:,.0f} | {ratio_cells(cpu_ratios, variant)} | "
                f"{min(busy):.2f}-{max(busy):.2f} |"
            )
        verdicts = ", ".join(
            f"{name} {ratios[name]:.3f} ({'met' if ratios[name] >= result['goal'] else 'NOT met'})"
            for name in ("prebuilt/bare", "template/bare")
        )
        print()
        print(f"goal >= {result['goal']:.2f}: {verdicts}")
    print()
    print(
        "req/s: wrk's count over wall time. req per CPU-s: requests the server process served "
        "per second of CPU it got (all threads), which a busy neighbour disturbs less; "
        "server CPU busy: CPU-seconds it got per second of load (1.00 = a whole CPU). "
        "Ratios: per round, then the median."
    )
    print(
        f"checks: {result['checks']['sts_calls_at_warm_up']} STS calls at warm-up, none after; "
        "every request answered 200 with its tenant's warm credentials"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round x 1 s per variant")
    parser.add_argument("--seconds", type=int, help="seconds of load per variant per round (1)")
    parser.add_argument("--rounds", type=int, help="rounds (default 15)")
    parser.add_argument(
        "--servers", default=",".join(SERVERS), help="comma-separated: uvicorn,granian"
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    parser.add_argument(
        "--concurrent",
        action="store_true",
        help="load a server's five variants at the same time (five wrk, one CPU for the servers) "
        "instead of one after the other: a busy neighbour then slows them all alike",
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = parser.parse_args(argv)
    seconds = args.seconds or 1
    rounds = args.rounds or (1 if args.quick else 15)
    servers = [name.strip() for name in args.servers.split(",") if name.strip()]
    if seconds < 1 or rounds < 1:
        parser.error("--seconds and --rounds must be >= 1")
    if not servers or any(name not in SERVERS for name in servers):
        parser.error(f"--servers: a comma-separated subset of {','.join(SERVERS)}")
    if shutil.which("wrk") is None:
        parser.error("wrk is not installed")
    try:
        result = benchmark(
            servers,
            seconds,
            rounds,
            pin=not args.no_pin,
            quiet=args.json,
            concurrent=args.concurrent,
        )
    except BenchmarkError as error:
        print(f"throughput: FAILED: {error}", file=sys.stderr)
        return 1
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
