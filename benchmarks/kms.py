"""Signing with a KMS key in a burst: 1,000 concurrent cold requests, each exchange one KMS Sign.

What: burst.py's scenario (one ``CredentialBroker``, a fresh one per round, receives 1,000
concurrent cold ``await broker.get(role)`` calls over N identities, default 50) in three
variants that differ only in the signing key:

- ``pem``: a PEM ES256 key, signed in process (the baseline);
- ``kms``: a KMS ECC_NIST_P256 key (ES256) from ``SigningKey.from_kms``, as shipped: each
  exchange's JWT is one KMS ``Sign`` call, and the call steps off the STS pool's gate while it
  is on the wire, so the identities' signatures overlap;
- ``kms-serial``: the same KMS key with those two gate hooks unregistered from its client: what
  a burst would cost if remote signatures were serialised by the gate (the counterfactual).

The headline figures are two ratios measured in the same run: ``kms p99 / pem p99`` (what KMS
signing costs a burst) and ``kms-serial p99 / kms p99`` (what stepping off the gate saves).
Expected: ``kms-serial`` about N KMS round trips; ``kms`` about ``pem`` plus one round trip,
plus what moto costs: each ``Sign`` is milliseconds of Python in moto's process, whose one GIL
and this machine's cores make the burst's signatures queue there (a real KMS's do not). The
figures printed under the table (time on the wire, CPU per ``Sign``) tell the two apart.

Method: the strict STS (``stscreds.testing.LocalSTS``, burst.py's ``RemoteSTS``: it verifies
every JWT against a JWKS holding both keys' public JWKs) and moto's KMS
(``tests/servers/kms.py``'s ``LocalKMS``, moto's WSGI app on a threaded werkzeug server) each
run in a spawned process of their own, as both are remote in production: their CPU must not
compete for this process's GIL. The STS holds every answer ``--sts-latency`` ms (default 30),
the KMS every ``Sign`` ``--kms-latency`` ms (default 20). The two KMS keys are built once, at
start-up (``GetPublicKey``), on the same moto key, and keep their clients (and connections)
across rounds, as an application's would; the brokers, their STS clients and pool threads are
new every round. One untimed warm-up round per variant, then ``--rounds`` rounds; in each round
every variant runs once, the variant that goes first rotating from round to round, so that all
three see the same machine. A round's figures are burst.py's (``run_round``: latency from the
start of the burst, p50, p99, max; this process's CPU) plus the KMS process's: ``Sign`` calls,
the most ``Sign`` calls in the server at once, and its CPU; and, timed in this process, each
``Sign``'s time on the wire and when they left and came back. A variant's figure is the median
over rounds; the ratios are of those medians (the median of the per-round ratios is printed
alongside). Before the rounds, each key signs alone, one token at a time: the wall time of a
signature (for KMS at ``--kms-latency`` and at 0 ms, i.e. moto's and botocore's own time) and
the CPU per ``Sign`` of this process and of moto's.

Usage::

    .venv/bin/python benchmarks/kms.py                     # 50 identities, 5 rounds
    .venv/bin/python benchmarks/kms.py --quick             # 2 rounds, a smoke test
    .venv/bin/python benchmarks/kms.py --kms-latency 10    # a nearer KMS
    .venv/bin/python benchmarks/kms.py --json              # one JSON object on stdout

Exit status 1 when a correctness check fails (burst.py's: a caller got another identity's
credentials, an identity cost more or fewer than one STS call, a request failed; and here: a KMS
variant made other than one ``Sign`` call per identity, ``pem`` made any, or ``kms-serial`` had
two ``Sign`` calls on the wire at once), or with ``--fail-above RATIO`` when ``kms p99 / pem
p99`` is above RATIO.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # burst.py, however this file is started
sys.path.insert(0, str(HERE.parent / "tests"))  # servers.kms (moto's KMS), in the KMS process

import botocore  # noqa: E402
import botocore.session  # noqa: E402
from burst import ISSUER, RemoteProcess, RemoteSTS, _timeit, percentile, run_round  # noqa: E402

from servers.moto import fake_session  # noqa: E402
from stscreds import KMSSigningKey, SigningKey, SystemClock  # noqa: E402
from stscreds._exchange import OFF_GATE_AT, ON_GATE_AT, _step_off_gate, _step_on_gate  # noqa: E402
from stscreds._signing import TokenMinter  # noqa: E402

REGION = "eu-west-1"
VARIANTS = ("pem", "kms", "kms-serial")


# -- moto's KMS, in its own process ----------------------------------------------------------


def _serve_kms(conn: Connection, region: str, latency: float) -> None:
    """The KMS process: a LocalKMS with one ECC_NIST_P256 signing key, driven over ``conn``."""
    from servers.kms import LocalKMS

    kms = LocalKMS().start()
    arn = kms.create_signing_key("ECC_NIST_P256", region)
    kms.delay = latency
    conn.send((kms.url, arn))
    try:
        while True:
            message = conn.recv()
            command, *args = message if isinstance(message, tuple) else (message,)
            if command == "reset":
                with kms._state:
                    kms.calls.clear()
                    kms.max_signing = 0
                conn.send(time.process_time())
            elif command == "report":
                with kms._state:
                    report = {
                        "calls": dict(kms.calls),
                        "max_signing": kms.max_signing,
                        "cpu": time.process_time(),
                    }
                conn.send(report)
            elif command == "delay":
                kms.delay = args[0]
                conn.send(None)
            else:  # "stop", or anything else
                break
    finally:
        kms.stop()
        conn.close()


class RemoteKMS(RemoteProcess):
    """A LocalKMS in a spawned process; ``url`` and ``key_arn``: its endpoint and its key."""

    def __init__(self, latency: float) -> None:
        super().__init__(_serve_kms, (REGION, latency), "kms-bench-kms", 120)
        self.latency = latency
        self.url, self.key_arn = self.started

    def reset(self) -> float:
        """Forget counted calls; the KMS process's CPU seconds so far."""
        cpu: float = self._ask(("reset",))
        return cpu

    def report(self) -> dict[str, Any]:
        report: dict[str, Any] = self._ask(("report",))
        return report

    def set_delay(self, seconds: float) -> None:
        self._ask(("delay", seconds))

    def signing_key(self) -> KMSSigningKey:
        key = SigningKey.from_kms(
            self.key_arn, region=REGION, endpoint_url=self.url, session=fake_session()
        )
        assert isinstance(key, KMSSigningKey), key
        return key


def serialised(key: KMSSigningKey) -> KMSSigningKey:
    """``key`` made to keep the STS pool's gate while its ``Sign`` call is on the wire.

    A benchmark's counterfactual, so it reaches into internals on purpose: the key's client and
    the hooks ``off_gate_on_the_wire`` registered on it. Without them one ``Sign`` at a time
    goes out, across every identity of the burst.
    """
    events = key._client.meta.events
    events.unregister(f"{OFF_GATE_AT}.kms.Sign", _step_off_gate)
    events.unregister(f"{ON_GATE_AT}.kms.Sign", _step_on_gate)
    return key


class SignTimer:
    """Times a KMS key's ``Sign`` calls on the wire, from this process (outside the gate).

    From botocore's ``before-send`` to its ``before-parse`` (the answer read included), both
    first in line: ``before-parse`` runs ahead of the hook that waits to take the gate again.
    """

    def __init__(self, key: KMSSigningKey) -> None:
        self._sent: dict[int, float] = {}
        self.wire: list[float] = []
        self.sends: list[float] = []
        self.answers: list[float] = []
        events = key._client.meta.events
        events.register_first("before-send.kms.Sign", self._before_send)
        events.register_first("before-parse.kms.Sign", self._before_parse)

    def reset(self) -> None:
        self._sent.clear()
        self.wire.clear()
        self.sends.clear()
        self.answers.clear()

    def _before_send(self, **kwargs: Any) -> None:
        now = time.perf_counter()
        self._sent[threading.get_ident()] = now
        self.sends.append(now)

    def _before_parse(self, **kwargs: Any) -> None:
        now = time.perf_counter()
        self.wire.append(now - self._sent.pop(threading.get_ident()))
        self.answers.append(now)

    def summary(self) -> dict[str, float]:
        if not self.wire:
            return {}
        return {
            "wire_p50_ms": percentile(self.wire, 50) * 1e3,
            "wire_max_ms": max(self.wire) * 1e3,
            # First Sign sent to last sent, and first answer to last, in ms.
            "sends_spread_ms": (max(self.sends) - min(self.sends)) * 1e3,
            "answers_spread_ms": (max(self.answers) - min(self.answers)) * 1e3,
        }


# -- rounds ----------------------------------------------------------------------------------


async def kms_round(
    sts: RemoteSTS,
    kms: RemoteKMS,
    variant: str,
    key: SigningKey,
    identities: int,
    requests: int,
    round_name: str,
    timer: SignTimer | None,
) -> dict[str, Any]:
    """burst.py's round for ``key``, plus what the KMS process saw (AssertionError if wrong)."""
    if timer is not None:
        timer.reset()
    kms_cpu_before = kms.reset()
    figures = await run_round(sts, key, identities, requests, f"{variant}-{round_name}")
    report = kms.report()
    signs = report["calls"].get("Sign", 0)
    others = {op: n for op, n in report["calls"].items() if op != "Sign" and n}
    expected = 0 if variant == "pem" else identities
    assert signs == expected, f"{variant}: {signs} KMS Sign calls for {identities} identities"
    assert not others, f"{variant}: KMS calls other than Sign during the round: {others}"
    if variant == "kms-serial":
        # The counterfactual must be what it claims: one Sign on the wire at a time.
        assert report["max_signing"] == 1, f"kms-serial: {report['max_signing']} Sign at once"
    kms_cpu = (report["cpu"] - kms_cpu_before) * 1e3
    figures.update(
        kms_sign_calls=signs,
        kms_max_signing=report["max_signing"],
        kms_cpu_ms=kms_cpu,
        kms_cpu_per_sign_ms=kms_cpu / signs if signs else None,
        sign=timer.summary() if timer is not None else {},
    )
    return figures


def isolated_costs(kms: RemoteKMS, keys: dict[str, SigningKey], n: int) -> dict[str, float]:
    """Each key signing alone, one token at a time (outside any pool: no gate to step off)."""

    def minter(key: SigningKey) -> TokenMinter:
        return TokenMinter(
            issuer=ISSUER,
            audience="sts.amazonaws.com",
            keys=[key],
            token_ttl=300,
            clock=SystemClock(),
        )

    pem, remote = minter(keys["pem"]), minter(keys["kms"])
    pem.mint("tenant-0")
    costs = {"pem_sign_ms": _timeit(lambda: pem.mint("tenant-0"), 200)}
    kms.set_delay(0.0)
    try:
        remote.mint("tenant-0")
        cpu_before = kms.reset()
        client_cpu_before = time.process_time()
        costs["kms_sign_no_latency_ms"] = _timeit(lambda: remote.mint("tenant-0"), n)
        # This process's CPU for one KMS signature: botocore's KMS client (JSON, SigV4, HTTP).
        costs["kms_client_cpu_per_sign_ms"] = (time.process_time() - client_cpu_before) * 1e3 / n
        report = kms.report()
        costs["kms_cpu_per_sign_ms"] = (report["cpu"] - cpu_before) * 1e3 / report["calls"]["Sign"]
    finally:
        kms.set_delay(kms.latency)
    costs["kms_sign_ms"] = _timeit(lambda: remote.mint("tenant-0"), n)
    return costs


def _summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    def median(name: str) -> float:
        return statistics.median(f[name] for f in rounds)

    summary: dict[str, Any] = {
        name: median(name) for name in ("p50_ms", "p99_ms", "max_ms", "wall_ms", "cpu_ms")
    }
    summary["sts_calls"] = sorted({f["sts_calls"] for f in rounds})
    summary["kms_sign_calls"] = sorted({f["kms_sign_calls"] for f in rounds})
    summary["kms_max_signing"] = max(f["kms_max_signing"] for f in rounds)
    per_sign = [f["kms_cpu_per_sign_ms"] for f in rounds if f["kms_cpu_per_sign_ms"] is not None]
    summary["kms_cpu_per_sign_ms"] = statistics.median(per_sign) if per_sign else None
    signs = [f["sign"] for f in rounds if f["sign"]]
    summary["sign"] = (
        {name: statistics.median(s[name] for s in signs) for name in signs[0]} if signs else {}
    )
    return summary


async def benchmark(
    identities: int, requests: int, sts_latency_ms: float, kms_latency_ms: float, rounds: int
) -> dict[str, Any]:
    kms = RemoteKMS(kms_latency_ms / 1e3)
    sts: RemoteSTS | None = None
    try:
        kms_key, serial_key = kms.signing_key(), serialised(kms.signing_key())
        keys: dict[str, SigningKey] = {
            "pem": SigningKey.from_pem(SigningKey.generate("ES256").to_pem()),
            "kms": kms_key,
            "kms-serial": serial_key,
        }
        timers = {"pem": None, "kms": SignTimer(kms_key), "kms-serial": SignTimer(serial_key)}
        # Both KMS keys are the same moto key: one JWK (same kid) covers them.
        jwks = {"keys": [keys["pem"].public_jwk(), keys["kms"].public_jwk()]}
        sts = RemoteSTS(jwks, sts_latency_ms / 1e3)
        isolated = isolated_costs(kms, keys, 20)
        warmup = {
            variant: await kms_round(
                sts, kms, variant, keys[variant], identities, requests, "w", timers[variant]
            )
            for variant in VARIANTS
        }
        per_variant: dict[str, list[dict[str, Any]]] = {variant: [] for variant in VARIANTS}
        for index in range(rounds):
            shift = index % len(VARIANTS)
            for variant in VARIANTS[shift:] + VARIANTS[:shift]:
                figures = await kms_round(
                    sts,
                    kms,
                    variant,
                    keys[variant],
                    identities,
                    requests,
                    f"r{index}",
                    timers[variant],
                )
                figures["order"] = VARIANTS[shift:] + VARIANTS[:shift]
                per_variant[variant].append(figures)
    finally:
        if sts is not None:
            sts.stop()
        kms.stop()

    summaries = {variant: _summary(per_variant[variant]) for variant in VARIANTS}

    def ratio(a: str, b: str) -> dict[str, float]:
        return {
            "of_medians": summaries[a]["p99_ms"] / summaries[b]["p99_ms"],
            "median_per_round": statistics.median(
                fa["p99_ms"] / fb["p99_ms"]
                for fa, fb in zip(per_variant[a], per_variant[b], strict=True)
            ),
        }

    import moto  # only for its version: the KMS process imported it, not this one

    return {
        "benchmark": "kms",
        "identities": identities,
        "requests": requests,
        "sts_latency_ms": sts_latency_ms,
        "kms_latency_ms": kms_latency_ms,
        "rounds": rounds,
        "variants": {
            variant: {
                **summaries[variant],
                "rounds": per_variant[variant],
                "warmup": warmup[variant],
            }
            for variant in VARIANTS
        },
        "ratios": {
            "kms_p99_over_pem_p99": ratio("kms", "pem"),
            "kms_serial_p99_over_kms_p99": ratio("kms-serial", "kms"),
        },
        "isolated": isolated,
        "machine": {
            "nproc": os.cpu_count(),
            "loadavg": list(os.getloadavg()),
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "platform": platform.platform(),
            "botocore": botocore.__version__,
            "moto": moto.__version__,
        },
    }


def print_table(result: dict[str, Any]) -> None:
    machine = result["machine"]
    identities = result["identities"]
    print(
        f"kms: {result['requests']} concurrent cold requests over {identities} identities, "
        f"STS latency {result['sts_latency_ms']:g} ms, KMS Sign latency "
        f"{result['kms_latency_ms']:g} ms, {result['rounds']} rounds; "
        f"{machine['implementation']} {machine['python']}, nproc={machine['nproc']}, "
        f"load {machine['loadavg'][0]:.2f}"
    )
    print(
        f"{'variant':<12}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'STS calls':>11}{'Signs':>7}"
        f"{'at once':>9}{'CPU ms':>9}{'KMS CPU/Sign':>14}"
    )
    for variant, v in result["variants"].items():
        per_sign = v["kms_cpu_per_sign_ms"]
        print(
            f"{variant:<12}{v['p50_ms']:>9.1f}{v['p99_ms']:>9.1f}{v['max_ms']:>9.1f}"
            f"{'/'.join(map(str, v['sts_calls'])):>11}"
            f"{'/'.join(map(str, v['kms_sign_calls'])):>7}{v['kms_max_signing']:>9}"
            f"{v['cpu_ms']:>9.1f}{'-' if per_sign is None else f'{per_sign:.2f} ms':>14}"
        )
    ratios = result["ratios"]
    for label, name in (
        ("kms p99 / pem p99", "kms_p99_over_pem_p99"),
        ("kms-serial p99 / kms p99", "kms_serial_p99_over_kms_p99"),
    ):
        r = ratios[name]
        print(
            f"{label:<26}{r['of_medians']:>7.2f}   (median of per-round ratios "
            f"{r['median_per_round']:.2f})"
        )
    variants = result["variants"]
    for variant in ("kms", "kms-serial"):
        sign = variants[variant]["sign"]
        if sign:
            print(
                f"{variant} Sign on the wire: p50 {sign['wire_p50_ms']:.1f} max "
                f"{sign['wire_max_ms']:.1f} ms; sent over {sign['sends_spread_ms']:.1f} ms, "
                f"answered over {sign['answers_spread_ms']:.1f} ms"
            )
    iso = result["isolated"]
    print(
        f"one signature alone: pem {iso['pem_sign_ms']:.3f} ms; KMS {iso['kms_sign_ms']:.1f} ms "
        f"({iso['kms_sign_no_latency_ms']:.1f} ms at 0 latency; CPU per Sign: this process "
        f"{iso['kms_client_cpu_per_sign_ms']:.2f} ms, moto {iso['kms_cpu_per_sign_ms']:.2f} ms)"
    )
    moto_cpu = variants["kms"]["kms_cpu_per_sign_ms"] * identities
    print(
        f"reading: kms - pem p99 = {variants['kms']['p99_ms'] - variants['pem']['p99_ms']:.1f} ms "
        f"against one KMS signature alone, {iso['kms_sign_ms']:.1f} ms, plus moto's CPU for "
        f"{identities} Signs under its one GIL, {moto_cpu:.0f} ms (a real KMS does not queue "
        f"like that); kms-serial p99 {variants['kms-serial']['p99_ms']:.0f} ms against "
        f"{identities} signatures in a row, {identities * iso['kms_sign_ms']:.0f} ms"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--identities", type=int, default=50, help="identities (default 50)")
    parser.add_argument("--requests", type=int, default=1000, help="requests (default 1000)")
    parser.add_argument(
        "--sts-latency", type=float, default=30.0, metavar="MS", help="STS latency (default 30)"
    )
    parser.add_argument(
        "--kms-latency",
        type=float,
        default=20.0,
        metavar="MS",
        help="KMS latency per Sign (default 20)",
    )
    parser.add_argument("--rounds", type=int, help="timed rounds (default 5; --quick: 2)")
    parser.add_argument("--quick", action="store_true", help="2 rounds, a smoke test")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--fail-above",
        type=float,
        metavar="RATIO",
        help="exit 1 when kms p99 / pem p99 (of the medians) exceeds RATIO",
    )
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)
    if args.identities < 1 or args.requests < args.identities or rounds < 1:
        parser.error("need --identities >= 1, --requests >= --identities and --rounds >= 1")
    if args.sts_latency < 0 or args.kms_latency < 0:
        parser.error("--sts-latency and --kms-latency must be >= 0")

    try:
        result = asyncio.run(
            benchmark(args.identities, args.requests, args.sts_latency, args.kms_latency, rounds)
        )
    except AssertionError as error:
        print(f"kms: correctness check failed: {error}", file=sys.stderr)
        return 1
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print_table(result)
    ratio = result["ratios"]["kms_p99_over_pem_p99"]["of_medians"]
    if args.fail_above is not None and ratio > args.fail_above:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
