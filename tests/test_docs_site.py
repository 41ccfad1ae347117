"""The documentation site builds with ``mkdocs build --strict``: every page in the nav exists,
no link or anchor is broken, every snippet (the changelog) is found and every ``:::`` API
block resolves against the code."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_docs_site_builds_strictly(tmp_path: Path) -> None:
    missing = [
        name
        for name in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
        if _find(name) is None
    ]
    if missing:
        pytest.skip(
            f"the docs tools are not installed ({', '.join(missing)}): "
            "pip install -e '.[docs]' (make venv installs them)"
        )
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}{result.stderr}"
    for page in ("index.html", "reference/index.html", "changelog/index.html"):
        assert (site / page).is_file(), page
    # The API blocks rendered (not left as ":::" text), and the changelog was included.
    reference = (site / "reference" / "index.html").read_text()
    assert 'id="stscreds.CredentialBroker"' in reference
    assert "::: stscreds" not in reference  # every directive rendered (S3 ARNs hold ":::")
    changelog = (site / "changelog" / "index.html").read_text()
    assert "Unreleased" in changelog
    assert "--8&lt;--" not in changelog


def _find(name: str) -> object:
    try:
        return importlib.util.find_spec(name)
    except ModuleNotFoundError:  # a parent package is missing
        return None


def headline_rows(text: str, start: str, end: str) -> list[tuple[str, str, str]]:
    """(figure, target, value) of each row of the markdown table between two markers."""
    block = text[text.index(start) : text.index(end, text.index(start))]
    rows = []
    for line in block.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and not set(cells[0]) <= {"-"} and cells[1] not in ("target",):
            rows.append((cells[0], cells[1], cells[2]))
    return rows


def test_the_readme_quotes_the_benchmark_page_of_the_same_run() -> None:
    # make bench writes both from one run: a README edited by hand (or a page regenerated
    # without it) would quote figures no run produced.
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    page = (root / "docs" / "benchmarks.md").read_text()
    quoted = headline_rows(readme, "<!-- bench:headline -->", "<!-- /bench:headline -->")
    measured = headline_rows(page, "## Headline", "\n## ")
    assert quoted, "the README's Performance section quotes no figure"
    assert quoted == measured
    assert "make bench --quick" not in page, "docs/benchmarks.md was written by a quick run"
