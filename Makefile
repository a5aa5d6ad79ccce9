# From a fresh clone, one command each (both create the virtual environment .venv when it is missing):
#   make quickstart   the core install, then the README's quick start (data for cube-single task 1, then DBP on it)
#   make test         the full install, then the linters and the test suite
# Other targets: make lint (ruff format --check, ruff check), make venv-core, make venv-all.
# VENV=<folder> picks another environment (CI: .ci-venv); PYTHON=<interpreter> the Python that makes it (3.11).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --quiet --disable-pip-version-check
TORCH := $(shell grep -E '^torch==' requirements/core.txt)
export PYTHONUNBUFFERED := 1

.PHONY: quickstart test lint venv-core venv-all

# torch first, from its exact pin, so that no other package pulls a different (CUDA) build of it
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.core: requirements/core.txt | $(BIN)/python
	$(PIP) "$(TORCH)"
	$(PIP) -r requirements/core.txt
	touch $@

$(VENV)/.all: $(VENV)/.core requirements.txt $(wildcard requirements/*.txt)
	$(PIP) -r requirements.txt
	touch $@

venv-core: $(VENV)/.core
venv-all: $(VENV)/.all

quickstart: $(VENV)/.core
	$(BIN)/python scripts/generate_ogbench_dataset.py --env cube-single-play --kind expert --task 1 --episodes 40 --workers 1
	$(BIN)/python dbp_bc.py --env cube-single-play --task 1 --dataset-path ~/.ogbench/data/cube-single-expert-task1-v0.npz \
	    --backbone mlp --hidden-dim 256 --lr 1e-3 --warmup-epochs 0 --num-epochs 40 --eval-interval 500 --eval-episodes 20 --num-threads 1

lint: $(VENV)/.all
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

test: $(VENV)/.all lint
	$(BIN)/python -m pytest -q -n 2 tests
