# Quick start: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo demo-continuous test lint format setup postgres chromium bench bench-peers clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# CPU build of PyTorch from the local wheel when no GPU is present; GPU users get theirs via the torch>=2.4 range.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# The main job: ingest digits, train three CNNs on two workers each, select, serve, ask it, stop it.
# `make demo DEMO_FLAGS=--keep-serving` leaves the service up.
demo: $(STAMP)
	$(BIN)/distml demo $(DEMO_FLAGS)

# Continuous training: the training data arrives in three waves while a service answers a steady
# load; prints per wave the model, its accuracy, promoted or not and why, requests answered/failed.
demo-continuous: $(STAMP)
	$(BIN)/distml demo-continuous $(DEMO_FLAGS)

# Peers the benchmarks measure side by side, in their own environment (.venv-peers).
bench-peers:
	bash scripts/bench-peers.sh

# The PostgreSQL tests start a private server from Debian's packages; install them when missing.
postgres:
	@bash scripts/ensure-postgres.sh

# The UI tests (tests/ui) drive Debian's Chromium through Playwright (the dev extra); install it when
# missing. Playwright's own browser download (`playwright install`) is never used.
chromium:
	@bash scripts/ensure-chromium.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Three xdist workers on this 2-core machine: the suite waits on processes and sockets more than it
# computes (it keeps 1.1 cores busy on average), so a third worker shortens it (390 s -> 351 s, measured).
# The heavy tests (real trainings, pipelines, watches, services) run one group after another on a
# worker, the light tests beside them (tests/conftest.py). TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 3
test: $(STAMP) lint postgres chromium
	@# Bytecode is cached for the suite even where PYTHONDONTWRITEBYTECODE is set: distml's modules
	@# compiled once here, not again in each of the suite's hundreds of processes, and pytest's
	@# rewritten test modules kept (each xdist worker spends 6 s rewriting them otherwise).
	$(BIN)/python -m compileall -q src
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest -q --durations=15 $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup)

# Every benchmark (--quick; BENCH_FLAGS= for the full runs; BENCH_ONLY="workflow serving" for some),
# then one table of ratios against targets.
bench: $(STAMP)
	$(BIN)/python scripts/bench_table.py

clean:
	rm -rf $(VENV) .venv-peers .distml .pytest_cache build src/*.egg-info
