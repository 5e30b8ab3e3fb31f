# The front door: `make demo` runs ledgerflow on a real example, `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install up down db-init demo serve bench fmt lint typecheck test test-unit check clean

CHROMIUM ?= /usr/bin/chromium

install: $(VENV)/.installed $(CHROMIUM)  ## create .venv and install ledgerflow with its dev tools

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check hatchling editables
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-build-isolation -e '.[dev]'
	@touch $@

# The web UI's browser tests drive Debian's chromium: Playwright never downloads a browser.
$(CHROMIUM):
	apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium

up:  ## make sure PostgreSQL and nats-server answer (start private ones if not)
	@bash ops/up.sh

down:  ## stop only what `make up` started
	@bash ops/down.sh

db-init: install up  ## create the database and the event-store tables
	$(BIN)/ledgerflow db init

demo: install up  ## a workflow written with the SDK, run by a worker and the service
	$(BIN)/python examples/workflow_tour.py

serve: db-init  ## run every role (commands, relay, projections, api) until Ctrl-C
	$(BIN)/ledgerflow serve

bench: db-init  ## the benchmarks of docs/performance.md (installs the `bench` extra: DBOS)
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-build-isolation -e '.[dev,bench]'
	$(BIN)/python -m benchmarks.commands --runs 5000
	$(BIN)/python -m benchmarks.commands --runs 5000 --keyed
	$(BIN)/python -m benchmarks.rebuild --events 100000
	$(BIN)/python -m benchmarks.workflows --sequential 100 --runs 500
	$(BIN)/python -m benchmarks.vs_dbos

fmt: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

# pytest's exit 5 means no test ran: that is a failure here, never a pass.
test: install up  ## every test: unit, property, integration (real PostgreSQL and NATS)
	@$(BIN)/pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest ran no tests: failing" >&2; exit 1; fi; exit $$rc

test-unit: install  ## the fast tests only (no servers needed)
	@$(BIN)/pytest tests/unit tests/property -m "not integration" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest ran no tests: failing" >&2; exit 1; fi; exit $$rc

check: lint typecheck test  ## lint, types and tests: green before every commit

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
