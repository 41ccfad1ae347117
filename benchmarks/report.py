"""``make bench``: run the benchmarks and write ``docs/benchmarks.md`` with its plots.

Each benchmark runs as its own process with ``--json`` (its progress goes to the console).
Its result is kept in ``docs/data/benchmarks/<name>.json`` with when and on what it ran, and
the page is written from the last result of every benchmark:

- ``docs/benchmarks.md``: the machine, a headline table (each figure with its target and
  whether it was met), then one section per benchmark, saying when it ran, with its tables
  and plots;
- ``docs/img/benchmarks/*.png``: the plots (matplotlib, the ``bench`` extra). Every figure is
  a ratio to, or a count against, a baseline measured in the same run of that benchmark (a
  no-op middleware, the 1-identity burst, the naive contender, the app without the
  middleware, the identities), never an absolute time from another day;
- the README's headline block, between ``<!-- bench:headline -->`` markers.

By default the four fast benchmarks run (hit_path, burst, compare, throughput: about five
minutes here); ``fleet`` (several minutes of worker processes per store) runs with
``--only fleet`` and its last result stays on the page meanwhile. How each benchmark
measures is in ``docs/benchmarks-method.md`` (hand-written).

Usage::

    .venv/bin/python benchmarks/report.py                 # the default set, then the page
    .venv/bin/python benchmarks/report.py --only fleet    # one benchmark, then the page
    .venv/bin/python benchmarks/report.py --quick --out /tmp/bench   # CI's smoke run

A benchmark that fails its own correctness checks (or runs past its time limit) fails the
report, and the page is not rewritten. A page with any quick-mode result says so, and the
README is only rewritten from full results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HEADLINE_START = "<!-- bench:headline -->"
HEADLINE_END = "<!-- /bench:headline -->"


class BenchmarkFailed(RuntimeError):
    """A benchmark exited non-zero, printed no JSON or ran past its limit."""


# --- running ------------------------------------------------------------------------------


def run_json(script: str, args: list[str], limit: float) -> tuple[dict[str, Any], float]:
    """Run ``benchmarks/<script> --json ...``; return its result and the seconds it took."""
    command = [sys.executable, str(ROOT / "benchmarks" / script), "--json", *args]
    print(f"==> {' '.join(command[1:])}", file=sys.stderr, flush=True)
    started = time.monotonic()
    try:
        done = subprocess.run(
            command, cwd=ROOT, stdout=subprocess.PIPE, text=True, timeout=limit, check=False
        )
    except subprocess.TimeoutExpired:
        raise BenchmarkFailed(f"{script} ran longer than {limit:.0f} s") from None
    took = time.monotonic() - started
    if done.returncode != 0:
        raise BenchmarkFailed(f"{script} exited with status {done.returncode}")
    text = done.stdout
    start = text.find("{")
    if start < 0:
        raise BenchmarkFailed(f"{script} printed no JSON")
    try:
        result = json.loads(text[start:])
    except json.JSONDecodeError as error:
        raise BenchmarkFailed(f"{script} printed invalid JSON: {error}") from None
    print(f"    {script}: {took:.0f} s", file=sys.stderr, flush=True)
    return result, took


def tool_version(command: list[str]) -> str:
    """The first line a tool prints about its version, or "not installed"."""
    if shutil.which(command[0]) is None:
        return "not installed"
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe_machine() -> dict[str, Any]:
    """What the figures were measured on: the numbers mean little without it."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.0f} GiB"
                break
    except (OSError, ValueError):
        pass
    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "memory": memory,
        "platform": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "load_before": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "packages": {
            name: package_version(name)
            for name in (
                "starlette",
                "botocore",
                "PyJWT",
                "cryptography",
                "uvicorn",
                "uvloop",
                "httptools",
                "granian",
                "redis",
                "cashews",
            )
        },
        # "Redis server v=7.0.15 sha=... malloc=..." and "wrk debian/4.1.0 [epoll] Copyright...":
        # the name and version are enough.
        "redis_server": tool_version(["redis-server", "--version"]).split(" sha=")[0],
        "wrk": tool_version(["wrk", "--version"]).split(" [")[0],
    }


# --- the page -----------------------------------------------------------------------------


def ratio(value: float) -> str:
    return f"{value:.3f}"


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def verdict(met: bool) -> str:
    return "met" if met else "**not met**"


class Page:
    """Markdown lines plus the plots, written at the end."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.lines: list[str] = []
        self.headline: list[tuple[str, str, str, bool]] = []
        self.images = out / "img" / "benchmarks"

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.add("| " + " | ".join(header) + " |", "|" + "---|" * len(header))
        self.add(*("| " + " | ".join(row) + " |" for row in rows))
        self.add("")

    def target(self, figure: str, target: str, value: str, met: bool) -> None:
        self.headline.append((figure, target, value, met))

    def plot(self, name: str, draw: Callable[[Any], None], caption: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.images.mkdir(parents=True, exist_ok=True)
        figure, axes = plt.subplots(figsize=(8, 3.6), dpi=100)
        draw(axes)
        axes.grid(axis="x" if axes.get_yaxis().get_label_text() == "" else "y", alpha=0.3)
        figure.tight_layout()
        figure.savefig(self.images / f"{name}.png")
        plt.close(figure)
        self.add(f"![{caption}](img/benchmarks/{name}.png)", "")


def hbar(
    axes: Any, labels: list[str], values: list[float], xlabel: str, lines: dict[str, float]
) -> None:
    """Horizontal bars, one per label, with vertical reference lines (targets, baselines)."""
    positions = list(range(len(labels)))[::-1]
    axes.barh(positions, values, color="#4c72b0")
    axes.set_yticks(positions, labels)
    for position, value in zip(positions, values, strict=True):
        axes.text(value, position, f" {value:.2f}", va="center", fontsize=8)
    for name, x in lines.items():
        axes.axvline(x, color="#c44e52", linestyle="--", linewidth=1)
        axes.text(x, len(labels) - 0.4, f" {name}", color="#c44e52", fontsize=8)
    axes.set_xlabel(xlabel)
    axes.set_xlim(0, max([*values, *lines.values()]) * 1.18)


def section_hit_path(page: Page, result: dict[str, Any]) -> None:
    figures = result["ns_per_request"]
    noop = figures["noop"]["median"]
    page.add(
        "## Hit path: what a warm request costs",
        "",
        "`benchmarks/hit_path.py`: Starlette apps called in process, "
        f"{result['requests_per_round']:,} requests x {result['rounds']} interleaved rounds "
        "per variant; median ns/request and its ratio to the same app behind a no-op "
        "middleware. Every request is a cache hit (asserted: the broker made exactly its two "
        "warm-up exchanges).",
        "",
    )
    labels = {
        "bare": "the app alone",
        "noop": "a no-op middleware (the baseline)",
        "stscreds": "CredentialsMiddleware, Role from a dict by header",
        "stscreds-fixed": "CredentialsMiddleware, one prebuilt Role",
        "stscreds-template": "per-tenant Role with a session policy, RoleTemplate",
        "stscreds-built": "per-tenant Role with a session policy, Role(...) per request",
    }
    rows = []
    for name, data in figures.items():
        rows.append(
            [
                f"`{name}`",
                labels.get(name, ""),
                f"{data['median']:,.0f}",
                ratio(data["median"] / noop),
            ]
        )
    page.table(["variant", "what", "ns/request", "/ noop"], rows)
    page.plot(
        "hit_path",
        lambda axes: hbar(
            axes,
            list(figures),
            [data["median"] / noop for data in figures.values()],
            "ns/request, as a ratio to the no-op middleware (same run)",
            {"1.10": 1.10, "1.20": 1.20},
        ),
        "Hit path: ns/request as a ratio to a no-op middleware",
    )
    fixed = result["ratio_stscreds_fixed_to_noop"]
    template = result["ratio_stscreds_template_to_noop"]
    page.target(
        "Warm request, prebuilt Role, / no-op middleware", "<= 1.10", ratio(fixed), fixed <= 1.10
    )
    page.target(
        "Warm request, per-tenant Role + session policy (RoleTemplate), / no-op middleware",
        "<= 1.20",
        ratio(template),
        template <= 1.20,
    )


BURST_METHOD = "benchmarks-method.md#many-identities-at-once-benchmarksburstpy"


def section_burst(page: Page, result: dict[str, Any]) -> None:
    runs = result["runs"]
    first = runs[0]
    page.add(
        "## Many identities at once: cold bursts",
        "",
        f"`benchmarks/burst.py`: {first['requests']:,} concurrent cold `broker.get()` calls "
        "in one asyncio process over N identities, against the strict test STS in its own "
        f"process with {first['sts_latency_ms']:g} ms of latency per call. Figures are medians "
        f"over {len(first['rounds'])} rounds (a fresh broker each round). The baseline is the "
        "burst over 1 identity, measured in the same run: 1,000 callers waiting on one "
        "exchange. Where the time goes (signing, botocore, the pool, the STS) is measured in "
        f"[How the benchmarks work]({BURST_METHOD}): "
        "the STS thread pool was most of it before #10.",
        "",
    )
    base = next((run["p99_ms_median"] for run in runs if run["identities"] == 1), None)
    rows = []
    for run in runs:
        rows.append(
            [
                str(run["identities"]),
                f"{run['requests']:,}",
                str(run["rounds"][0]["sts_calls"]),
                ms(run["p50_ms_median"]),
                ms(run["p99_ms_median"]),
                "-" if not base else ratio(run["p99_ms_median"] / base),
            ]
        )
    page.table(
        ["identities", "requests", "STS calls", "p50 ms", "p99 ms", "p99 / 1 identity"], rows
    )
    if base:
        page.plot(
            "burst",
            lambda axes: hbar(
                axes,
                [f"{run['identities']} identities" for run in runs],
                [run["p99_ms_median"] / base for run in runs],
                "p99 as a ratio to the 1-identity burst (one exchange; same run)",
                {},
            ),
            "Cold bursts: p99 as a ratio to the 1-identity burst",
        )
    for run in runs:
        if run["identities"] == 50 and run["sts_latency_ms"] == 30 and run["requests"] == 1000:
            p99 = run["p99_ms_median"]
            page.target(
                "1,000 cold requests over 50 identities, 30 ms STS: p99",
                "<= 150 ms",
                f"{p99:.0f} ms",
                p99 <= 150,
            )


def run_burst(quick: bool, limit: float) -> tuple[dict[str, Any], float]:
    """burst.py over 1 identity (the baseline) and over 50."""
    runs, took = [], 0.0
    for identities in (1, 50):
        args = ["--identities", str(identities)] + (["--quick"] if quick else [])
        result, seconds = run_json("burst.py", args, limit)
        runs.append(result)
        took += seconds
    return {"runs": runs}, took


CONTENDERS = {
    "naive": "naive: one STS call per request",
    "botocore": "botocore RefreshableCredentials per identity",
    "cashews": "cashews cache (Redis) around the exchange",
    "stscreds": "stscreds, no store",
    "stscreds+sqlite": "stscreds + SQLiteStore",
    "stscreds+redis": "stscreds + RedisStore",
}


SCENARIOS = {
    "cold-1": "every request at once, nothing cached, one identity.",
    "cold-50": "every request at once, nothing cached, 50 identities.",
    "steady": "50 identities warmed first, then requests at a steady rate while one whole "
    "credential lifetime (900 s, on a compressed clock) passes: every identity is refreshed.",
    "workers-4": "the cold burst over 50 identities shared by 4 worker processes.",
}


def section_compare(page: Page, result: dict[str, Any]) -> None:
    cells = result["cells"]
    scenarios = list(dict.fromkeys(cell["scenario"] for cell in cells))
    contenders = list(dict.fromkeys(cell["contender"] for cell in cells))

    def find(scenario: str, contender: str) -> dict[str, Any] | None:
        return next(
            (c for c in cells if c["scenario"] == scenario and c["contender"] == contender), None
        )

    page.add(
        "## Against the alternatives",
        "",
        f"`benchmarks/compare.py`: every contender against the same counting strict STS "
        f'({result["sts_latency_ms"]:g} ms per call). STS calls are counted by the STS; "waited" '
        "is the number of requests whose answer included an STS round trip.",
        "",
    )
    for scenario in scenarios:
        page.add(f"**{scenario}**: {SCENARIOS.get(scenario, '')}", "")
        rows = []
        for cell in cells:
            if cell["scenario"] != scenario:
                continue
            rows.append(
                [
                    CONTENDERS.get(cell["contender"], cell["contender"]),
                    str(cell["identities"]),
                    f"{cell['requests']:,}",
                    f"{cell['sts_calls']:,}",
                    ms(cell.get("p50_ms")),
                    ms(cell.get("p99_ms")),
                    f"{cell.get('waited', 0):,}",
                ]
            )
        page.table(
            ["contender", "identities", "requests", "STS calls", "p50 ms", "p99 ms", "waited"], rows
        )

    def calls(axes: Any) -> None:
        width = 0.8 / max(1, len(contenders))
        for index, contender in enumerate(contenders):
            values = []
            for scenario in scenarios:
                cell = find(scenario, contender)
                values.append(cell["sts_calls"] / max(1, cell["identities"]) if cell else 0)
            axes.bar(
                [s + index * width for s in range(len(scenarios))], values, width, label=contender
            )
        axes.set_xticks([s + 0.4 - width / 2 for s in range(len(scenarios))], scenarios)
        axes.set_yscale("log")
        axes.set_ylabel("STS calls per identity")
        axes.legend(fontsize=7, ncol=3)

    page.plot("compare_sts_calls", calls, "STS calls per identity, by contender and scenario")

    def latency(axes: Any) -> None:
        width = 0.8 / max(1, len(contenders))
        for index, contender in enumerate(contenders):
            values = []
            for scenario in scenarios:
                cell = find(scenario, contender)
                naive = find(scenario, "naive")
                values.append(
                    (cell.get("p99_ms") or 0) / naive["p99_ms"]
                    if cell and naive and naive.get("p99_ms")
                    else 0
                )
            axes.bar(
                [s + index * width for s in range(len(scenarios))], values, width, label=contender
            )
        axes.set_xticks([s + 0.4 - width / 2 for s in range(len(scenarios))], scenarios)
        axes.set_yscale("log")
        axes.set_ylabel("p99 / naive's p99")
        axes.legend(fontsize=7, ncol=3)

    page.plot(
        "compare_p99",
        latency,
        "p99 latency as a ratio to the naive contender's, same scenario and run",
    )
    headline_compare(page, find)


def headline_compare(page: Page, find: Callable[[str, str], dict[str, Any] | None]) -> None:
    """Three rows of the headline: STS calls cold, waits in steady state, a fleet's calls."""
    cold = [find("cold-50", name) for name in ("naive", "botocore", "cashews", "stscreds")]
    if all(cold):
        calls = " / ".join(f"{cell['sts_calls']:,}" for cell in cold if cell)
        ours = cold[-1]
        assert ours is not None
        page.target(
            f"{ours['requests']:,} cold requests over 50 identities: STS calls, naive / botocore "
            "/ cashews / stscreds",
            "1 per identity",
            calls,
            ours["sts_calls"] == ours["identities"],
        )
    steady = [find("steady", name) for name in ("naive", "botocore", "cashews", "stscreds")]
    if all(steady):
        waited = " / ".join(f"{cell['waited']:,}" for cell in steady if cell)
        ours = steady[-1]
        assert ours is not None
        page.target(
            f"Steady state through one refresh, {ours['requests']:,} requests: requests that "
            "waited on STS, naive / botocore / cashews / stscreds",
            "0",
            waited,
            ours["waited"] == 0,
        )
    fleet = [find("workers-4", name) for name in ("cashews", "stscreds", "stscreds+redis")]
    if all(fleet):
        calls = " / ".join(f"{cell['sts_calls']:,}" for cell in fleet if cell)
        ours = fleet[-1]
        assert ours is not None
        page.target(
            "4 worker processes, 50 identities: STS calls, cashews / stscreds without a store / "
            "stscreds + RedisStore",
            "1 per identity with a store",
            calls,
            ours["sts_calls"] == ours["identities"],
        )


def section_throughput(page: Page, result: dict[str, Any]) -> None:
    page.add(
        "## Throughput under a real server",
        "",
        f"`benchmarks/throughput.py`: one server process, `wrk` on loopback, {result['rounds']} "
        f"interleaved rounds of {result['seconds']:g} s per variant; req/s (median of rounds) and "
        "the ratio to the same app without the middleware, computed per round, median.",
        "",
    )
    for server, data in result["servers"].items():
        page.add(f"**{server}**", "")
        rows = []
        bare = data["variants"]["bare"]["rps"]
        for name, variant in data["variants"].items():
            key = f"{name}/bare"
            value = data["ratios"].get(key, variant["rps"] / bare)
            rows.append([f"`{name}`", f"{variant['rps']:,.0f}", ratio(value)])
        page.table(["variant", "req/s", "/ bare"], rows)
    servers = result["servers"]

    def draw(axes: Any) -> None:
        labels, values = [], []
        for server, data in servers.items():
            for name in data["variants"]:
                if name == "bare":
                    continue
                labels.append(f"{server}: {name}")
                values.append(data["ratios"][f"{name}/bare"])
        hbar(
            axes,
            labels,
            values,
            "req/s as a ratio to the app without middleware (same run)",
            {"0.95": 0.95},
        )

    page.plot("throughput", draw, "Throughput as a ratio to the app without middleware")
    uvicorn = servers.get("uvicorn")
    if uvicorn:
        for name, label in (
            ("prebuilt", "prebuilt Role"),
            ("template", "per-tenant RoleTemplate resolver"),
        ):
            value = uvicorn["ratios"].get(f"{name}/bare")
            if value is not None:
                page.target(
                    f"uvicorn (httptools + uvloop) req/s, {label}, / app alone",
                    ">= 0.95",
                    ratio(value),
                    value >= 0.95,
                )


def section_fleet(page: Page, result: dict[str, Any]) -> None:
    cells = result["cells"]
    variants = list(dict.fromkeys(cell["variant"] for cell in cells))
    page.add(
        "## A fleet: worker processes on two hosts",
        "",
        f'`benchmarks/fleet.py`: W uvicorn workers split over two process groups ("hosts"), '
        f"{result['roles']} identities, one counting strict STS ({result['sts_delay_ms']:g} ms "
        "per call): a cold burst, then one forced refresh cycle. STS calls are per identity "
        "(the expected count: 1 with a store shared by the fleet; 1 per host with SQLite, one "
        "file per host; W without a store). Store operations are timed in the workers; "
        "DynamoDB's are those of its emulator (moto, one Python process on the same CPUs), not "
        "DynamoDB's.",
        "",
    )
    rows = []
    for cell in cells:
        cold, refresh, ops = cell["cold"], cell["refresh"], cell.get("store_ops") or {}
        rows.append(
            [
                cell["variant"],
                str(cell["workers"]),
                f"{cold['per_identity']:g} ({cold['expected']:g})",
                f"{refresh['per_identity']:g} ({refresh['expected']:g})",
                ms(cold.get("p50_ms")),
                ms(cold.get("p99_ms")),
                ms(ops.get("p50_ms")),
                ms(ops.get("p99_ms")),
            ]
        )
    page.table(
        [
            "variant",
            "W",
            "cold: STS calls / identity (expected)",
            "refresh: STS calls / identity (expected)",
            "cold p50 ms",
            "cold p99 ms",
            "store op p50 ms",
            "store op p99 ms",
        ],
        rows,
    )

    def draw(axes: Any) -> None:
        for variant in variants:
            mine = sorted(
                (cell for cell in cells if cell["variant"] == variant),
                key=lambda cell: cell["workers"],
            )
            axes.plot(
                [cell["workers"] for cell in mine],
                [cell["refresh"]["per_identity"] for cell in mine],
                marker="o",
                label=variant,
            )
        axes.set_xlabel("worker processes (W), over two hosts")
        axes.set_ylabel("STS calls per identity per refresh")
        axes.set_xscale("log", base=2)
        axes.legend(fontsize=7, ncol=3)

    page.plot("fleet", draw, "STS calls per identity per refresh cycle, by store and W")
    widest = max(cell["workers"] for cell in cells)
    shared = [
        cell
        for cell in cells
        if cell["workers"] == widest and cell["variant"] not in ("none", "botocore")
    ]
    if shared:
        value = " / ".join(
            f"{cell['variant']} {cell['refresh']['per_identity']:g}" for cell in shared
        )
        page.target(
            f"{widest} workers on 2 hosts: STS calls per identity per refresh, by store",
            "1 (SQLite: 1 per host)",
            value,
            all(cell["refresh"]["per_identity"] == cell["refresh"]["expected"] for cell in shared),
        )


def write(page: Page, records: list[dict[str, Any]]) -> str:
    """The page's text: intro, machine, headline, then the sections already added."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    quick = any(record["quick"] for record in records)
    head = [
        "# Benchmarks",
        "",
        "<!-- Generated by `make bench` (benchmarks/report.py): edit the script, not the page -->",
        "",
        f"Written by `make bench{' --quick' if quick else ''}` on {now} from the last result of "
        "each benchmark (kept in `docs/data/benchmarks/`; each section says when it ran). "
        "Every ratio compares figures measured in the same run of one benchmark. How each "
        "benchmark measures, and what was learnt making stscreds faster, is in "
        "[How the benchmarks work](benchmarks-method.md).",
        "",
    ]
    if quick:
        head += [
            '!!! warning "Quick mode"',
            "    This page was written by the smoke-test mode (few requests, short rounds): its "
            "figures only show that every benchmark runs.",
            "",
        ]
    newest = max(records, key=lambda record: str(record["measured"]))
    head += ["**Machine.** " + machine_line(newest["machine"]), "", "## Headline", ""]
    rows = [[figure, target, value, verdict(met)] for figure, target, value, met in page.headline]
    head += ["| figure | target | measured | |", "|---|---|---|---|"]
    head += ["| " + " | ".join(row) + " |" for row in rows]
    head += [""]
    return "\n".join(head + page.lines).rstrip() + "\n"


def machine_line(machine: dict[str, Any]) -> str:
    packages = ", ".join(f"{name} {version}" for name, version in machine["packages"].items())
    load = machine.get("load_before")
    return (
        f"{machine['cpu']}, nproc = {machine['nproc']}, {machine['memory']}; "
        f"{machine['platform']}; "
        f"{machine['python']}; {packages}; {machine['redis_server']}; {machine['wrk']}. "
        + (f"Load average (1 min) at the newest run's start: {load:.1f}. " if load else "")
        + "The machine is shared and noisy: compare ratios measured in one run, not absolute times."
    )


def readme_headline(page: Page) -> str:
    lines = [HEADLINE_START, "| measured by `make bench` | target | last run |", "|---|---|---|"]
    lines += [f"| {figure} | {target} | {value} |" for figure, target, value, _ in page.headline]
    lines.append(HEADLINE_END)
    return "\n".join(lines)


def update_readme(readme: Path, block: str) -> None:
    text = readme.read_text()
    pattern = re.compile(re.escape(HEADLINE_START) + ".*?" + re.escape(HEADLINE_END), re.DOTALL)
    if not pattern.search(text):
        raise BenchmarkFailed(f"{readme} has no {HEADLINE_START} block")
    readme.write_text(pattern.sub(lambda _: block, text, count=1))


#: Interleaved 1 s rounds per server. Each ratio moves by +-3-4 % from round to round on this
#: shared machine (two rounds of one variant differ by more than stscreds costs), so uvicorn,
#: whose figure is the issue's target, gets most of the time.
THROUGHPUT_ROUNDS = {"uvicorn": 25, "granian": 9}


def run_throughput(quick: bool, limit: float) -> tuple[dict[str, Any], float]:
    """throughput.py per server, with the rounds above (one quick run in quick mode)."""
    if quick:
        return run_json("throughput.py", ["--quick"], limit)
    merged: dict[str, Any] = {}
    took = 0.0
    for server, rounds in THROUGHPUT_ROUNDS.items():
        result, seconds = run_json(
            "throughput.py", ["--servers", server, "--rounds", str(rounds)], limit
        )
        took += seconds
        if not merged:
            merged = result
        else:
            merged["servers"].update(result["servers"])
    merged["rounds"] = ", ".join(
        f"{rounds} ({server})" for server, rounds in THROUGHPUT_ROUNDS.items()
    )
    return merged, took


Runner = Callable[[bool, float], tuple[dict[str, Any], float]]


def script(name: str) -> Runner:
    """Run ``name`` once, with ``--quick`` in quick mode."""
    return lambda quick, limit: run_json(name, ["--quick"] if quick else [], limit)


#: name, how to run it, its section of the page, time limit (s), run by default.
BENCHMARKS: list[tuple[str, Runner, Callable[[Page, dict[str, Any]], None], float, bool]] = [
    ("hit_path", script("hit_path.py"), section_hit_path, 300, True),
    ("burst", run_burst, section_burst, 300, True),
    ("compare", script("compare.py"), section_compare, 420, True),
    ("throughput", run_throughput, section_throughput, 360, True),
    # Several minutes of worker processes per store: run on its own (--only fleet); the page
    # shows its last saved result.
    ("fleet", script("fleet.py"), section_fleet, 600, False),
]


def data_dir(out: Path) -> Path:
    """Where each benchmark's last result is kept, next to the page it feeds."""
    return out / "data" / "benchmarks"


def save(
    out: Path, name: str, result: dict[str, Any], took: float, quick: bool, machine: dict[str, Any]
) -> None:
    record = {
        "benchmark": name,
        "measured": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": quick,
        "seconds": round(took, 1),
        "machine": machine,
        "result": result,
    }
    folder = data_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def load(out: Path, name: str) -> dict[str, Any] | None:
    path = data_dir(out) / f"{name}.json"
    if not path.is_file():
        return None
    record: dict[str, Any] = json.loads(path.read_text())
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every benchmark in its smoke mode")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "docs",
        help="where the page and plots go (default docs/)",
    )
    parser.add_argument(
        "--only",
        help="comma-separated benchmarks to run (default: all but fleet): "
        + ",".join(b[0] for b in BENCHMARKS),
    )
    parser.add_argument(
        "--no-readme", action="store_true", help="leave the README's headline block alone"
    )
    args = parser.parse_args(argv)
    chosen = set(args.only.split(",")) if args.only else set()
    unknown = chosen - {b[0] for b in BENCHMARKS}
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")

    page = Page(args.out)
    try:
        for name, run, _, limit, default in BENCHMARKS:
            if name in chosen if args.only else default:
                machine = describe_machine()  # the load average before it runs
                result, took = run(args.quick, limit)
                save(args.out, name, result, took, args.quick, machine)
    except BenchmarkFailed as error:
        print(f"make bench: {error}; the page was not rewritten", file=sys.stderr)
        return 1
    # The page shows the last saved result of every benchmark: those just run and the others.
    records = []
    for name, _, section, _, _ in BENCHMARKS:
        record = load(args.out, name)
        if record is None:
            continue
        records.append(record)
        start = len(page.lines)
        section(page, record["result"])
        # Right under the section's heading: when it ran, and in which mode.
        mode = ", quick mode" if record["quick"] else ""
        page.lines[start + 2 : start + 2] = [
            f"*Measured {record['measured']} ({record['seconds']:.0f} s{mode}).*",
            "",
        ]
    if not records:
        print("make bench: no benchmark result to write a page from", file=sys.stderr)
        return 1
    target = args.out / "benchmarks.md"
    target.write_text(write(page, records))
    print(
        f"wrote {target} and {len(list(page.images.glob('*.png')))} plots in {page.images}",
        file=sys.stderr,
    )
    # The README quotes the full run's figures; a quick run (CI) or a run written elsewhere
    # leaves it alone.
    quick = any(record["quick"] for record in records)
    if not quick and not args.no_readme and args.out.resolve() == (ROOT / "docs").resolve():
        update_readme(ROOT / "README.md", readme_headline(page))
        print("updated the README's headline block", file=sys.stderr)
    for figure, target_text, value, met in page.headline:
        print(
            f"{'met    ' if met else 'NOT MET'}  {figure}: {value} (target {target_text})",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
