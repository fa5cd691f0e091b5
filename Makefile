# dreamer-jax: every entry point a researcher or CI needs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TASK ?= atari_pong
SEED ?= 0
LOGDIR ?= runs/$(TASK)/$(SEED)

.PHONY: help install install-gpu test test-fast lint format bench train

help:
	@echo "make install       .venv with CPU jax, the dependencies and dreamer-jax (editable)"
	@echo "make install-gpu   the same plus CUDA jax (CUDA_EXTRA=cuda12 or cuda13)"
	@echo "make test          the whole test suite, as CI runs it (about 25 min on 2 cores)"
	@echo "make test-fast     the tests not marked slow"
	@echo "make lint|format   ruff check and format of dreamer_jax, scripts, tests"
	@echo "make bench         the Atari learner benchmark; appends its block to docs/benchmarks.md"
	@echo "make train         one Atari run: TASK=$(TASK) SEED=$(SEED) LOGDIR=$(LOGDIR)"
	@echo "make gpu-wheels    Python 3.12 wheels for a lent GPU machine, in .whl/"

install:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -r requirements.txt
	$(BIN)/pip install -e . --no-deps

# CUDA 12 hosts by default; on CUDA 13 hosts: make install-gpu CUDA_EXTRA=cuda13
CUDA_EXTRA ?= cuda12
install-gpu: install
	$(BIN)/pip install "jax[$(CUDA_EXTRA)]"

# CI runs everything; test-fast skips the tests marked slow (learning, chaos, long CLI runs).
test:
	$(BIN)/python -m pytest -n 2 --durations=15 tests

test-fast:
	$(BIN)/python -m pytest -n 2 -m "not slow" --durations=5 tests

lint:
	$(BIN)/ruff check dreamer_jax scripts tests
	$(BIN)/ruff format --check dreamer_jax scripts tests

format:
	$(BIN)/ruff check --fix dreamer_jax scripts tests
	$(BIN)/ruff format dreamer_jax scripts tests

# Appends its block to docs/benchmarks.md (scripts/bench.py --no-record does not); the Atari
# learner takes seconds per update on a CPU.
bench:
	$(BIN)/python scripts/bench.py --configs atari

train:
	@echo "logs go to $(LOGDIR)"
	$(BIN)/python -m dreamer_jax.train --configs atari --task $(TASK) --logdir $(LOGDIR) --seed $(SEED)

# Python 3.12 wheels for a lent GPU machine, unpacked and pruned into .whl/ (carry it there;
# then `bash scripts/gpu_check.sh` for the speed figures, or `bash scripts/gpu_boxing.sh` for
# the ~1M-frame Boxing learning check; each fits one 10-minute call). Needs the package
# registry, not a GPU.
.PHONY: gpu-wheels
gpu-wheels:
	bash scripts/gpu_wheels.sh
