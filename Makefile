# inferq developer entry points. `make demo` and `make test` work on a fresh Debian machine as root.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
STORE  ?= file
BENCH_STAMP := $(VENV)/.bench-stamp
BENCH_ARGS ?=
BENCH_HTTP_ARGS ?=
BENCH_VENV := .bench-venv
BENCH_VENV_STAMP := $(BENCH_VENV)/.installed-stamp
DURATION ?= 10m
SEED ?= 7

# The tests need PostgreSQL too (the PostgreSQL result store) and promtool (the alert rules' tests);
# `make test` starts or installs them.
.PHONY: help env lock broker postgres promtool demo test test-fast lint format bench bench-backfill bench-http chaos clean

help:
	@echo "make demo   run the end-to-end demo (RabbitMQ, a model directory, SQLite results)"
	@echo "make demo STORE=s3   the same demo on S3 stores (a local SeaweedFS it starts and stops)"
	@echo "make test   run the whole test suite against the real broker"
	@echo "make lint   ruff + mypy --strict"
	@echo "make lock   re-resolve every dependency and rewrite constraints.txt (the versions env and images install)"
	@echo "make bench  inferq vs the ideal pipeline, a naive worker and Celery (BENCH_ARGS='--jobs 20000' for a shorter run)"
	@echo "make bench-backfill  inferq backfill --out vs a pandas script on 2,000,000 rows (BENCH_BACKFILL_ARGS='--rows 200000' for less)"
	@echo "make bench-http  inferq serve under wrk: health route, admission, the synchronous round trip, MLServer"
	@echo "make chaos DURATION=10m [SEED=7]  soak on a private 3-node RabbitMQ cluster under random faults, then the audit"

# The package folders: a module added or removed there changes its folder, and the link tree is rebuilt.
PACKAGE_DIRS := . $(shell find shared model_store producer admin monitoring worker gateway cli -type d -not -name __pycache__)
LINKS := $(VENV)/.links-stamp

# Every extra (the dev extra pulls inferq[all]) at the versions constraints.txt pins, as the images do.
CONSTRAINTS := constraints.txt

$(STAMP): pyproject.toml $(CONSTRAINTS)
	scripts/ensure-python.sh $(PYTHON)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --quiet -c $(CONSTRAINTS) -e '.[dev]' --config-settings editable_mode=strict
	touch $(STAMP)

# A strict editable install: build/__editable__*/inferq/ links every module to the repository's file, so mypy
# follows the folder-to-package mapping (pyproject.toml) that the default editable import hook hides from it.
$(LINKS): $(STAMP) $(PACKAGE_DIRS)
	$(BIN)/pip install --quiet --quiet --no-deps -e . --config-settings editable_mode=strict
	touch $(LINKS)

env: $(STAMP) $(LINKS)

# The newest versions pyproject.toml allows, resolved in a throwaway venv and written to constraints.txt;
# commit the file, and the next `make env` and image build install exactly those.
lock:
	scripts/ensure-python.sh $(PYTHON)
	scripts/lock.sh $(PYTHON)

broker:
	scripts/ensure-rabbitmq.sh

postgres:
	scripts/ensure-postgres.sh

promtool:
	scripts/ensure-promtool.sh

demo: env broker
	$(BIN)/python scripts/demo.py --store $(STORE)

test: env broker postgres promtool
	$(BIN)/python -m pytest

# Not part of `make test`: minutes of random node, worker and store faults on a private cluster.
chaos: env broker
	$(BIN)/python tests/chaos.py --duration $(DURATION) --seed $(SEED)

lint: env
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: env
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The bench extra (psutil, Celery) is installed only for the benchmark; strict, like env, so mypy still
# sees the link tree.
$(BENCH_STAMP): $(STAMP) pyproject.toml $(CONSTRAINTS)
	$(BIN)/pip install --quiet --quiet -c $(CONSTRAINTS) -e '.[dev,bench]' --config-settings editable_mode=strict
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP) broker
	$(BIN)/python -m bench $(BENCH_ARGS)

# inferq backfill --out against the pandas script on one generated file (kept in var/bench-backfill/).
BENCH_BACKFILL_ARGS ?=
bench-backfill: env broker
	$(BIN)/python -m bench.backfill $(BENCH_BACKFILL_ARGS)

# MLServer, the peer of `make bench-http`, in a virtual environment of its own (its pins stay out of ours).
$(BENCH_VENV_STAMP): bench/mlserver-requirements.txt
	scripts/ensure-python.sh $(PYTHON)
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/pip install --quiet -r bench/mlserver-requirements.txt
	touch $(BENCH_VENV_STAMP)

# wrk (Debian's package, installed when missing) against one `inferq serve`, then MLServer; about 2 minutes.
bench-http: env broker $(BENCH_VENV_STAMP)
	scripts/ensure-wrk.sh
	$(BIN)/python -m bench.http_load $(BENCH_HTTP_ARGS)

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache $(BENCH_VENV)
