# The two commands a newcomer needs: `make demo` and `make test`. Everything else is for us.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stscreds

.PHONY: venv demo test lint typecheck check bench clean

venv: $(STAMP)

# Re-install when the dependency list changes; the stamp keeps `make test` fast otherwise.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

demo: venv
	$(PY) examples/demo.py

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check middleware tests examples benchmarks
	$(VENV)/bin/ruff format --check middleware tests examples benchmarks

typecheck: venv
	$(VENV)/bin/mypy

check: lint typecheck test

bench: venv
	$(PY) benchmarks/hit_path.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
