"""docs/operations.md against the code it describes.

The metrics table is checked against the METRICS catalogue, the log table against every
``logger.<level>(...)`` call in the package (read with ``ast``), the PromQL alerts against the
series that exist, and the two logging snippets are run (each in its own process, so this
process's logging is untouched) around a real exchange with the strict STS on loopback.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from servers.sts import StrictSTS
from stscreds import CredentialBroker, SigningKey
from stscreds._broker import (
    CLOCK_OFFSET_WARNING,
    HEALTH_FAILURES,
    HEALTH_WINDOW,
    PROCESS_WIDE_FAILURES,
)
from stscreds._metrics import KNOWN_CODES, METRICS, ROLE_METRIC
from stscreds.prometheus import _GAUGE_MODES, PREFIX

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "operations.md"
PACKAGE = ROOT / "middleware" / "stscreds"
LEVELS = {
    "debug": "DEBUG",
    "info": "INFO",
    "warning": "WARNING",
    "error": "ERROR",
    "exception": "ERROR",
    "critical": "CRITICAL",
}
SPECS = {PREFIX + spec.name: spec for spec in (*METRICS, ROLE_METRIC)}


def doc() -> str:
    return DOC.read_text(encoding="utf-8")


def section(heading: str) -> str:
    """The text under ``heading`` (a whole Markdown heading line) up to the next heading of
    the same or a higher level."""
    text = doc()
    level = len(heading) - len(heading.lstrip("#"))
    lines = text.splitlines()
    assert heading in lines, f"{heading!r} not in docs/operations.md"
    start = lines.index(heading) + 1
    body: list[str] = []
    in_code = False
    for line in lines[start:]:
        if line.startswith("```"):
            in_code = not in_code
        if not in_code and re.match(rf"#{{1,{level}}} ", line):
            break
        body.append(line)
    return "\n".join(body)


def first_table(text: str) -> list[list[str]]:
    """The cells of the first Markdown table in ``text``, header and separator left out."""
    rows: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            break
    assert len(rows) > 2, "no table found"
    assert set("".join(rows[1])) <= set("-: "), "the second row is not a separator"
    return rows[2:]


def code_spans(cell: str) -> list[str]:
    return re.findall(r"`([^`]*)`", cell)


def fenced_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.DOTALL | re.MULTILINE)


def snippet(marker: str) -> str:
    """The first ```python block after ``<!-- snippet: marker -->``."""
    text = doc()
    tag = f"<!-- snippet: {marker} -->"
    assert text.count(tag) == 1, tag
    blocks = fenced_blocks(text[text.index(tag) :], "python")
    assert blocks, f"no python block after {tag}"
    return blocks[0]


def package_sources() -> list[tuple[Path, ast.Module]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    assert len(paths) > 10
    return [(path, ast.parse(path.read_text(encoding="utf-8"))) for path in paths]


def log_calls() -> dict[str, str]:
    """Format string -> level of every ``logger.<level>(...)`` call in the package."""
    calls: dict[str, str] = {}
    for path, tree in package_sources():
        for node in ast.walk(tree):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in LEVELS
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "logger"
            ):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            assert node.args, f"{where}: a log call without a message"
            message = node.args[0]
            # Implicit concatenation is one Constant; an f-string would not be a fixed message.
            assert isinstance(message, ast.Constant), f"{where}: the message is not a literal"
            assert isinstance(message.value, str), where
            level = LEVELS[node.func.attr]
            assert calls.get(message.value, level) == level, f"{where}: two levels for one message"
            calls[message.value] = level
    return calls


# -- (a) the metrics reference ------------------------------------------------------------


def test_the_metrics_table_lists_every_metric_with_its_type_labels_and_combination() -> None:
    rows = first_table(section("## Metrics reference"))
    names = []
    for cells in rows:
        assert len(cells) == 5, cells
        name_cell, kind, labels, meaning, combine = cells
        (name,) = code_spans(name_cell)
        names.append(name)
        assert name in SPECS, f"{name} is not a metric stscreds reports"
        spec = SPECS[name]
        assert kind == spec.kind, name
        assert tuple(code_spans(labels)) == spec.labels, name
        if not spec.labels:
            assert labels == "-", name
        assert len(meaning) > 30, name
        if spec.kind == "gauge":
            # How prometheus_client combines the processes' values is the collector's mode.
            assert code_spans(combine)[0] == _GAUGE_MODES[spec.name], name
        else:
            assert combine == "sum", name
    # Exactly the catalogue, in its order, then the opt-in per-role counter.
    assert names == list(SPECS)
    assert set(_GAUGE_MODES) == {spec.name for spec in METRICS if spec.kind == "gauge"}


def test_the_label_values_name_every_known_code_and_every_reason_of_stscreds() -> None:
    text = section("### Label values")
    spans = set(code_spans(text))
    assert spans >= KNOWN_CODES, sorted(KNOWN_CODES - spans)
    for value in ("request", "background", "success", "rejected", "unavailable", "other"):
        assert value in spans, value
    for value in ("ok", "error", "timeout", "skipped", "redis", "sqlite", "memory"):
        assert value in spans, value

    # stscreds' own reasons: ``reason = "..."`` on its error classes, the codes
    # _exchange_done gives exceptions that are not CredentialsUnavailable, and the fallback of
    # error_label.
    reasons: set[str] = set()
    for _, tree in package_sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if (
                        isinstance(item, ast.Assign)
                        and [getattr(t, "id", None) for t in item.targets] == ["reason"]
                        and isinstance(item.value, ast.Constant)
                    ):
                        reasons.add(item.value.value)
            if isinstance(node, ast.FunctionDef) and node.name == "_exchange_done":
                for item in ast.walk(node):
                    if (
                        isinstance(item, ast.Assign)
                        and isinstance(item.targets[0], ast.Tuple)
                        and [getattr(t, "id", None) for t in item.targets[0].elts]
                        == ["outcome", "code"]
                        and isinstance(item.value, ast.Tuple)
                        and isinstance(item.value.elts[1], ast.Constant)
                    ):
                        reasons.add(item.value.elts[1].value)
            if isinstance(node, ast.FunctionDef) and node.name == "error_label":
                for item in ast.walk(node):
                    if isinstance(item, ast.Return) and isinstance(item.value, ast.Constant):
                        reasons.add(item.value.value)
    reasons -= {""}
    assert {"Timeout", "Unreachable", "ShortGrant", "Cancelled", "Error"} <= reasons
    documented = {
        code_spans(cells[0])[0] for cells in first_table(text.split("**stscreds' own reasons**")[1])
    }
    assert documented == reasons

    # The store operations are the store methods the shared tier calls.
    shared = (PACKAGE / "_shared.py").read_text(encoding="utf-8")
    operations = set(re.findall(r"self\._call\(\s*self\.store\.(\w+)", shared))
    assert len(operations) >= 7
    (row,) = [
        c for c in first_table(text) if c[1] == "`store_operations_total`" and "`get`" in c[2]
    ]
    assert set(code_spans(row[2])) == operations


# -- (b) the log messages -----------------------------------------------------------------


def test_the_log_table_lists_every_message_the_package_logs_at_its_level() -> None:
    calls = log_calls()
    assert len(calls) >= 20
    assert "exchange for %s: %s%s in %.0f ms (%d attempt%s, %d waiting)" in calls
    documented: dict[str, str] = {}
    for cells in first_table(section("### Log messages")):
        assert len(cells) == 4, cells
        level, message, when, what = cells
        (text,) = code_spans(message)
        assert text not in documented, f"listed twice: {text}"
        documented[text] = level
        assert when and what, text
    assert set(documented) == set(calls), (
        f"missing from the doc: {sorted(set(calls) - set(documented))}; "
        f"not in the code: {sorted(set(documented) - set(calls))}"
    )
    assert documented == calls


def test_the_exchange_event_fields_are_the_ones_the_broker_logs() -> None:
    (tree,) = [t for p, t in package_sources() if p.name == "_broker.py"]
    (done,) = [
        n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_exchange_done"
    ]
    (info,) = [
        n
        for n in ast.walk(done)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "info"
    ]
    (extra,) = [k.value for k in info.keywords if k.arg == "extra"]
    assert isinstance(extra, ast.Dict)
    fields = [k.value for k in extra.keys if isinstance(k, ast.Constant)]
    documented = [code_spans(c[0])[0] for c in first_table(section("### The exchange event"))]
    assert documented == fields


# -- (c) the logging snippets, run around a real exchange -----------------------------------

GOOD_ROLE = "arn:aws:iam::123456789012:role/ops-docs-good"
DENIED_ROLE = "arn:aws:iam::123456789012:role/ops-docs-denied"
ISSUER = "http://127.0.0.1:1/ops-docs"

# Appended to a snippet: one successful exchange, one refused, a record without extra fields
# and one with a traceback, all through the logging the snippet configured.
HARNESS = """
import asyncio
import sys

from stscreds import CredentialBroker, CredentialsRejected, Role, SigningKey


async def _run() -> None:
    issuer, endpoint, pem, good, denied = sys.argv[1:6]
    with open(pem, "rb") as handle:
        key = SigningKey.from_pem(handle.read())
    broker = CredentialBroker(issuer=issuer, signing_keys=[key], sts_endpoint_url=endpoint)
    async with broker:
        credentials = await broker.get(Role(good))
        print("exchanged", credentials.access_key_id)
        try:
            await broker.get(Role(denied))
        except CredentialsRejected as error:
            print("rejected", error.code)


asyncio.run(_run())
logging.getLogger("stscreds").warning("a record without extra fields")
try:
    1 / 0
except ZeroDivisionError:
    logging.getLogger("stscreds").exception("a record with a traceback")
"""


@pytest.mark.parametrize("marker", ["logging-dictconfig", "logging-structlog"])
def test_the_logging_snippet_prints_the_exchange_event_and_no_secret(
    marker: str, strict_sts: StrictSTS, tmp_path: Path
) -> None:
    key = SigningKey.generate("ES256")
    pem = tmp_path / "key.pem"
    pem.write_bytes(key.to_pem())
    strict_sts.configure(issuer=ISSUER, jwks={"keys": [key.public_jwk()]})
    strict_sts.reject_roles.add(DENIED_ROLE)
    script = tmp_path / "snippet.py"
    script.write_text("import logging\n" + snippet(marker) + HARNESS, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(script), ISSUER, strict_sts.url, str(pem), GOOD_ROLE, DENIED_ROLE],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NO_PROXY": "127.0.0.1,localhost", "PYTHONWARNINGS": "ignore"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert strict_sts.calls_for(GOOD_ROLE) == strict_sts.calls_for(DENIED_ROLE) == 1
    (issued,) = [r.credentials for r in strict_sts.requests if r.credentials]
    assert f"exchanged {issued['AccessKeyId']}" in result.stdout
    assert "rejected AccessDenied" in result.stdout

    lines = [line for line in result.stderr.splitlines() if line.strip()]
    records: list[dict[str, Any]] = [json.loads(line) for line in lines]  # every line is JSON

    def message(record: dict[str, Any]) -> str:
        return str(record.get("message", record.get("event")))

    (success,) = [r for r in records if message(r).startswith(f"exchange for {GOOD_ROLE}:")]
    assert success["role_arn"] == GOOD_ROLE
    assert success["outcome"] == "success"
    assert success["trigger"] == "request"
    assert success["error_code"] is None
    assert success["attempts"] == 1
    assert isinstance(success["duration_ms"], float) and success["duration_ms"] > 0
    assert str(success["level"]).upper() == "INFO"
    assert success["logger"] == "stscreds"
    assert re.fullmatch(r"[0-9a-f]{12}", success["identity"])

    (refused,) = [r for r in records if message(r).startswith(f"exchange for {DENIED_ROLE}:")]
    assert refused["outcome"] == "rejected"
    assert refused["error_code"] == "AccessDenied"
    assert "Not authorized" in refused["sts_message"]
    (warning,) = [r for r in records if message(r).startswith(f"no credentials for {DENIED_ROLE}")]
    assert warning["error_code"] == "AccessDenied"
    assert str(warning["level"]).upper() == "WARNING"

    (plain,) = [r for r in records if message(r) == "a record without extra fields"]
    assert "role_arn" not in plain
    (failed,) = [r for r in records if message(r) == "a record with a traceback"]
    assert "ZeroDivisionError" in json.dumps(failed)

    output = result.stdout + result.stderr
    secrets = [issued["SecretAccessKey"], issued["SessionToken"]]
    secrets += [r.params["WebIdentityToken"] for r in strict_sts.requests]
    assert len(secrets) == 4
    for secret in secrets:
        assert secret not in output
    assert "eyJ" not in output  # nothing shaped like a JWT
    pem_lines = key.to_pem().decode().splitlines()[1:-1]
    assert not any(line in output for line in pem_lines)


# -- (d) the alerts -------------------------------------------------------------------------


def test_every_promql_query_names_only_series_and_labels_that_exist() -> None:
    queries = fenced_blocks(doc(), "promql")
    assert len(queries) >= 9
    alerts = section("## Suggested alerts")
    assert all(query in alerts for query in queries)
    histograms = {name for name, spec in SPECS.items() if spec.kind == "histogram"}
    for query in queries:
        names = re.findall(r"\bstscreds_[a-z0-9_]+", query)
        assert names, query
        for name in names:
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            if base != name:
                assert base in histograms, f"{name}: only histograms have {name[len(base) :]}"
            else:
                assert name in SPECS, f"{name} is not a series stscreds exports"
        for name, matchers in re.findall(r"\b(stscreds_[a-z0-9_]+)\{([^}]*)\}", query):
            spec = SPECS[re.sub(r"_(bucket|count|sum)$", "", name)]
            for label, value in re.findall(r'(\w+)\s*(?:=~|!~|!=|=)\s*"([^"]*)"', matchers):
                assert label in spec.labels, f"{name} has no label {label}"
                if label == "outcome" and spec.name == "exchanges_total":
                    assert value in ("success", "rejected", "unavailable"), value
        for grouping in re.findall(r"\bby \(([^)]*)\)", query):
            for label in (part.strip() for part in grouping.split(",")):
                known = {"le", "instance", "job"} | {x for s in SPECS.values() for x in s.labels}
                assert label in known, f"grouping by an unknown label {label!r}"
        # Cheap syntax checks: balanced brackets, ranges are durations.
        for opening, closing in ("()", "[]", "{}"):
            assert query.count(opening) == query.count(closing), query
        for window in re.findall(r"\[([^\]]*)\]", query):
            assert re.fullmatch(r"\d+[smhd]", window), window


def test_every_series_the_doc_mentions_exists() -> None:
    histograms = {name for name, spec in SPECS.items() if spec.kind == "histogram"}
    mentioned = set(re.findall(r"\bstscreds_[a-z][a-z0-9_]*", doc()))
    assert len(mentioned) > 20
    for name in mentioned:
        base = re.sub(r"_(bucket|count|sum)$", "", name)
        assert name in SPECS or base in histograms, name


# -- health and links ------------------------------------------------------------------------


def test_the_health_section_matches_broker_health() -> None:
    text = section("## Health")
    rows = first_table(text.split("Status rules")[1])
    (wide,) = [cells for cells in rows if "no role escapes" in cells[1]]
    assert set(code_spans(wide[1])) == PROCESS_WIDE_FAILURES
    assert f"{HEALTH_FAILURES} exchanges failed within the last {HEALTH_WINDOW:.0f} s" in wide[1]
    assert f"more than {CLOCK_OFFSET_WARNING:.0f} s off" in text
    fields = [code_spans(cells[0]) for cells in first_table(text)]
    source = inspect.getsource(CredentialBroker.health)
    returned = re.findall(r'^\s+"(\w+)":', source.split("return {")[-1], flags=re.MULTILINE)
    assert [name for names in fields for name in names] == returned


def test_every_link_inside_the_page_has_its_heading() -> None:
    text = doc()
    headings = re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)
    # GitHub's anchors: lower case, punctuation dropped, spaces to hyphens.
    anchors = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert "opentelemetry" in links
    assert links <= anchors, sorted(links - anchors)
    assert (ROOT / "docs" / "failure-modes.md").exists()


def test_the_opentelemetry_table_lists_every_instrument_the_otel_module_makes() -> None:
    from stscreds.otel import otel_name, otel_unit

    text = section("## OpenTelemetry").split("### Metrics")[1]
    documented = {}
    for cells in first_table(text):
        prometheus, otel, kind, unit = cells
        documented[code_spans(prometheus)[0]] = (code_spans(otel)[0], kind, code_spans(unit)[0])
    expected = {
        f"stscreds_{spec.name}": (
            otel_name(spec),
            "Histogram"
            if spec.kind == "histogram"
            else "ObservableCounter"
            if spec.kind == "counter"
            else "ObservableGauge",
            otel_unit(spec),
        )
        for spec in METRICS
    }
    assert documented == expected
