# roombus — run `make help` for the targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The lock files pin every package of the dependency tree, with hashes: requirements.lock is
# what the image installs (runtime + the bridge and rs256 extras), requirements-dev.lock what
# `make` installs (the same + dev). `make lock` regenerates both from pyproject.toml with uv,
# run from a throwaway venv (it is not a dependency of roombus).
UV_VERSION := 0.13.9
LOCKENV := .lockenv
BUILD_REQS = $(PYTHON) -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['build-system']['requires']))"
UV_COMPILE = $(LOCKENV)/bin/uv pip compile --quiet --universal --python-version 3.11 \
	--generate-hashes --no-header --annotation-style line

.PHONY: help up test test-fast lint fmt bench bench-interest schemas clean compose-check lock

help: ## show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

# The project itself goes in last: editable, with no dependency resolution (the lock did that),
# built with the locked setuptools (no unpinned build environment). The Python client
# (clients/python, its own distribution: only `websockets`, already locked) goes in the same way.
$(STAMP): pyproject.toml requirements-dev.lock clients/python/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==25.3
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements-dev.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e clients/python
	touch $(STAMP)

lock: ## refresh requirements.lock and requirements-dev.lock (hashes) from pyproject.toml
	rm -rf $(LOCKENV)
	$(PYTHON) -m venv $(LOCKENV)
	$(LOCKENV)/bin/python -m pip install --quiet uv==$(UV_VERSION)
	$(BUILD_REQS) | $(UV_COMPILE) pyproject.toml - --extra bridge --extra rs256 -o requirements.lock
	$(BUILD_REQS) | $(UV_COMPILE) pyproject.toml - --extra dev -c requirements.lock \
		-o requirements-dev.lock
	rm -rf $(LOCKENV)

up: $(STAMP) ## run nats-server + the services locally (no Docker); Ctrl-C stops all
	$(BIN)/roombus up

# Tests run in parallel (pytest-xdist): each worker has its own brokers and services on free
# ports (the tests that need only the default services share one set per worker: Stack in
# tests/conftest.py), and much of a test's time is waiting on them, so 3 workers fit 2 cores.
TEST_WORKERS ?= 3

test: $(STAMP) lint ## lint, type-check and run the whole test suite (what CI runs)
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

test-fast: $(STAMP) ## the suite without the slow tests (fault injection, the compose check)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) -m 'not slow'

lint: $(STAMP) ## ruff + mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: $(STAMP) ## format and auto-fix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

schemas: $(STAMP) ## regenerate proto/schemas/*.json from the models
	$(BIN)/python -m proto.schemagen

compose-check: $(STAMP) ## build and test compose.yaml on a real Docker engine (root; part of make test)
	$(BIN)/python scripts/compose_check.py

bench: $(STAMP) ## run the benchmarks (not part of make test)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench

bench-interest: $(STAMP) ## wildcard vs per-room subscriptions (SUBSCRIBE, issue 21; a few minutes)
	$(BIN)/python -m bench.interest

clean: ## remove the venv and caches
	rm -rf $(VENV) $(LOCKENV) .pytest_cache .mypy_cache .ruff_cache
