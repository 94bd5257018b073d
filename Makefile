# Jobdock: `make run` starts the service, `make test` runs the tests.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test test-postgres fuzz lint format engine test-image bench venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

engine:
	scripts/ensure-engine.sh

## Start the service on http://$(HOST):$(PORT): SQLite in ./jobdock.db, embedded workers.
run: venv engine
	$(BIN)/jobdock serve --host $(HOST) --port $(PORT)

## Run the test suite against a real Docker engine (started if needed).
test: venv
	scripts/ensure-engine.sh --test
	$(BIN)/pytest $(PYTEST_ARGS)

## The same suite with every test on its own PostgreSQL database (started if needed).
test-postgres: venv
	scripts/ensure-engine.sh --test
	JOBDOCK_TEST_DATABASE_URL="$$(scripts/ensure-postgres.sh)" $(BIN)/pytest $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy app tests migrations bench

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## Build the busybox image the tests and the README's examples use.
test-image: venv
	scripts/ensure-engine.sh --test
	$(BIN)/python -m tests.support.images

## Fuzz every operation of the live OpenAPI spec with schemathesis (no jobs are run).
fuzz: venv
	scripts/fuzz-api.sh $(FUZZ_ARGS)

## Benchmarks (not part of the tests): Jobdock against the bare engine.
bench: venv
	scripts/ensure-engine.sh --test
	$(BIN)/python -m bench.core $(BENCH_ARGS)

## Build Jobdock's image offline (a debootstrapped Debian base, host-built wheels), run it
## with the Docker socket and submit a job through it. Root on Debian (debootstrap).
.PHONY: docker-smoke
docker-smoke: venv
	scripts/docker-smoke.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
