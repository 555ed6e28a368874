# roombus — run `make help` for the targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help up test test-fast lint fmt bench schemas clean compose-check

help: ## show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==25.3
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

up: $(STAMP) ## run nats-server + the services locally (no Docker); Ctrl-C stops all
	$(BIN)/roombus up

test: $(STAMP) lint ## lint, type-check and run the whole test suite (what CI runs)
	$(BIN)/python -m pytest

test-fast: $(STAMP) ## the suite without the slow fault tests
	$(BIN)/python -m pytest -m 'not slow'

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

clean: ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
