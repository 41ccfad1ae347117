"""Every public module of stscreds documents itself: ``python -m pydoc`` (what ``help()``
prints) works for each, in a fresh process with no Django settings, so no module reads
configuration, opens a connection or needs a framework set up when it is imported or inspected.

The modules are discovered, not listed: a new public module is covered the day it is added.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Finds every module of the package (importing the subpackages, as walk_packages must); a
# subpackage that fails to import fails the discovery instead of being skipped in silence.
DISCOVER = """
import json, pkgutil, stscreds

def fail(name):
    raise RuntimeError(f"cannot import {name}")

names = ["stscreds"] + [
    module.name
    for module in pkgutil.walk_packages(stscreds.__path__, "stscreds.", onerror=fail)
]
print(json.dumps(names))
"""

# Whatever else is discovered (stscreds.testing, stscreds.aio, ...) is checked too.
EXPECTED = {
    "stscreds",
    "stscreds.aws",
    "stscreds.django",
    "stscreds.fastapi",
    "stscreds.otel",
    "stscreds.prometheus",
    "stscreds.stores",
}


def clean_env() -> dict[str, str]:
    """The environment without Django settings (nor a PYTHONPATH that could provide some)."""
    drop = {"DJANGO_SETTINGS_MODULE", "PYTHONPATH"}
    return {name: value for name, value in os.environ.items() if name not in drop}


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def public_modules(cwd: Path) -> list[str]:
    result = run(["-c", DISCOVER], cwd)
    assert result.returncode == 0, result.stderr
    names: list[str] = json.loads(result.stdout)
    return [name for name in names if not any(part.startswith("_") for part in name.split("."))]


def test_pydoc_renders_every_public_module(tmp_path: Path) -> None:
    modules = public_modules(tmp_path)
    assert set(modules) >= EXPECTED, f"not discovered: {sorted(EXPECTED - set(modules))}"

    # One fresh process per module: one module's imports must not set up another's.
    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = pool.map(lambda name: run(["-m", "pydoc", name], tmp_path), modules)
        results = dict(zip(modules, outcomes, strict=True))

    failures = {
        name: (result.stdout + result.stderr)[-2000:]
        for name, result in results.items()
        if result.returncode != 0
        or not re.match(rf"Help on (module|package) {re.escape(name)}\b", result.stdout)
    }
    assert failures == {}, "\n\n".join(f"{name}:\n{out}" for name, out in failures.items())


def test_help_renders_a_module_in_process_without_django_settings(tmp_path: Path) -> None:
    """``help(module)`` itself (the pager writes to a pipe) and pydoc.render_doc, on all of
    them in one process: inspecting one module must not break another either."""
    names = public_modules(tmp_path)
    script = (
        "import importlib, pydoc, sys\n"
        f"for name in {names!r}:\n"
        "    module = importlib.import_module(name)\n"
        "    help(module)\n"
        "    assert pydoc.render_doc(module).strip(), name\n"
        "from django.conf import settings\n"
        "assert not settings.configured\n"
    )
    result = run(["-c", script], tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
