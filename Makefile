# ssnarec — see README.md.  Every target has its defaults here; override on the command line.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
export SSNAREC_HOME ?= $(CURDIR)/workspace

DATASET ?= sci
LLM ?= minilm
METHOD ?= ssna
SEEDS ?= 0
ARGS ?=
# Processes for embeddings/train (torchrun, one per GPU). TORCHRUN_ARGS passes torchrun's own options through,
# e.g. multi-node: TORCHRUN_ARGS="--nnodes=2 --node-rank=0 --rdzv-backend=c10d --rdzv-endpoint=host0:29400 --rdzv-id=job1"
NPROC ?= 1
TORCHRUN_ARGS ?=
ifeq ($(strip $(NPROC))$(strip $(TORCHRUN_ARGS)),1)
LAUNCH = $(BIN)/ssnarec
else
LAUNCH = $(BIN)/torchrun --nproc-per-node=$(NPROC) $(if $(strip $(TORCHRUN_ARGS)),$(TORCHRUN_ARGS),--standalone) -m pipeline.cli
endif

.PHONY: help setup test lint demo embeddings train eval report bench bench-quick clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The stamp depends on pyproject.toml, so `make setup` is a no-op (seconds) until dependencies change.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed  ## create .venv with pinned torch, then the project (idempotent)

test: setup  ## run the test suite
	$(BIN)/python -m pytest -q $(ARGS)

lint: setup  ## ruff
	$(BIN)/ruff check pipeline featurestore train evaluate tests benchmarks

embeddings: setup  ## stage one: make embeddings DATASET=sci LLM=minilm [NPROC=2] (comma-separated lists allowed)
	$(LAUNCH) embed --dataset $(DATASET) --llm $(LLM) $(ARGS)

train: setup  ## stage two: make train METHOD=ssna DATASET=sci LLM=minilm [NPROC=2]
	$(LAUNCH) train --method $(METHOD) --dataset $(DATASET) --llm $(LLM) $(ARGS)

eval: setup  ## the paper's tables from the results store
	$(BIN)/ssnarec eval $(ARGS)

report: setup  ## tables and figures as one markdown page under reports/
	$(BIN)/ssnarec report $(ARGS)

demo: setup  ## the whole job on ml100k + all-MiniLM-L6-v2, offline
	$(BIN)/ssnarec demo $(ARGS)

bench: setup  ## every performance figure in one run -> benchmarks/results/latest.json; README section regenerated
	$(BIN)/python -m benchmarks.run $(ARGS)
	$(BIN)/python -m benchmarks.readme_section

bench-quick: setup  ## the same in <= 5 minutes (bounded runs, small scales, flagged in the JSON)
	$(BIN)/python -m benchmarks.run --quick $(ARGS)
	$(BIN)/python -m benchmarks.readme_section

clean:  ## remove the workspace (keeps .venv)
	rm -rf $(SSNAREC_HOME)
