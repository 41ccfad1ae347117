# The two commands a newcomer needs: `make demo` and `make test`. Everything else is for us.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stscreds

.PHONY: venv deps demo test lint typecheck check bench soak clean docs

venv: $(STAMP)

# Re-install when the dependency list changes; the stamp keeps `make test` fast otherwise.
$(STAMP): pyproject.toml
	@echo "==> creating the virtual environment in $(VENV) (first run: about a minute)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "==> upgrading pip"
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	@echo "==> installing stscreds and its development dependencies"
	$(PY) -m pip install --disable-pip-version-check --progress-bar on -e '.[dev]'
	touch $@

demo: venv
	$(PY) examples/demo.py

# The tests start a real redis-server. Install it where we can (root with apt-get, as in CI);
# anywhere else say how, rather than let the Redis tests fail one by one.
deps:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing redis-server (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; \
	  else \
	    echo "make test needs redis-server: install it (Debian/Ubuntu: sudo apt-get install" \
	      "redis-server; macOS: brew install redis) and run make test again" >&2; \
	    exit 1; \
	  fi; \
	}

test: venv deps
	$(PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check middleware tests examples benchmarks
	$(VENV)/bin/ruff format --check middleware tests examples benchmarks

typecheck: venv
	$(VENV)/bin/mypy

check: lint typecheck test

# The documentation site (mkdocs.yml): --strict makes every warning, a broken link
# included, fail the build.
docs: venv
	$(VENV)/bin/mkdocs build --strict --site-dir site

# make bench: every benchmark, then docs/benchmarks.md, its plots and the README's headline
# figures rewritten (about 5 minutes). BENCH_ARGS="--only fleet" runs the fleet benchmark;
# BENCH_ARGS=--quick is CI's smoke run.
BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	touch $@

bench: venv deps $(BENCH_STAMP)
	@command -v wrk >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing wrk (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; \
	  else \
	    echo "make bench needs wrk (Debian/Ubuntu: sudo apt-get install wrk; macOS: brew install wrk)" >&2; \
	    exit 1; \
	  fi; \
	}
	$(PY) benchmarks/report.py $(BENCH_ARGS)

soak: venv deps
	$(PY) benchmarks/soak.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
