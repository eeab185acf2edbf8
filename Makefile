# Two commands do all the set-up on a fresh machine (Python 3.11 or 3.12):
#   make demo   create .venv, install, run the whole experiment with `dvc repro` on the embedded default
#   make test   create .venv, install (plus the validation tools), run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROJECT := $(VENV)/.project
SOURCES := $(shell git ls-files model components pipelines 2>/dev/null)

.PHONY: demo test lint format tools lock clean-venv image gpu-check

# The dependencies, pinned by constraints.txt (slow: only when the pins change).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt '.[dev]'
	touch $(STAMP)

# The project itself, installed like the image installs it (a wheel, not an editable link), so the tests
# and `dvc repro` run what users and containers run; refreshed whenever a source file changes.
$(PROJECT): $(STAMP) $(SOURCES)
	$(BIN)/pip install --quiet --no-deps --force-reinstall -c constraints.txt .
	rm -rf build *.egg-info
	touch $(PROJECT)

# DVC stages call `atmask`, so the venv's bin goes first on PATH.
demo: $(PROJECT)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	@cat reports/ablations.md
	@echo
	@echo "Report: reports/ablations.md (and .csv); metrics: runs/<ablation>/metrics.json"
	@echo "Compare the runs: $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db"

tools: $(STAMP)
	bash .ci/tools.sh

test: $(PROJECT) tools
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest

# Both images built here (README "Container image"): starts a Docker engine if none answers, makes the local
# Debian base when missing, then `atmask image build` for the atmask and mlflow targets, tagged atmask:dev and
# atmask-mlflow:dev. Override e.g. BASE_IMAGE= (the Dockerfile's default), TORCH_INDEX_URL=, CA_FILE=,
# WHEELHOUSE=dir (offline). The compiled pipeline is left as it is.
BASE_IMAGE ?= atmask-base:bookworm
TORCH_INDEX_URL ?= https://pypi.org/simple
CA_FILE ?= $(wildcard /etc/ssl/certs/ca-certificates.crt)
WHEELHOUSE ?=
IMAGE_TAG ?= dev
IMAGE_OPTIONS = --tag $(IMAGE_TAG) --no-compile $(if $(BASE_IMAGE),--base-image $(BASE_IMAGE)) \
	$(if $(CA_FILE),--ca-file $(CA_FILE)) $(if $(WHEELHOUSE),--wheelhouse $(WHEELHOUSE))
image: $(STAMP)
	bash .ci/docker.sh engine
	$(if $(filter atmask-base:bookworm,$(BASE_IMAGE)),BASE_IMAGE=$(BASE_IMAGE) bash .ci/docker.sh base)
	$(BIN)/atmask image build --target mlflow --repository atmask-mlflow $(IMAGE_OPTIONS)
	$(BIN)/atmask image build --target atmask --repository atmask $(IMAGE_OPTIONS) \
		$(if $(TORCH_INDEX_URL),--torch-index-url $(TORCH_INDEX_URL))

# The GPU figures (issue 19) on one GPU in at most ~8 minutes: model step, training throughput through the
# Penn-Fudan loader, inference latency, evaluate of a tiny run, the CUDA-only tests. Prints them and writes
# gpu_check.json. Rehearse on CPU: make gpu-check GPU_CHECK_ARGS="--quick --device cpu"
gpu-check: $(PROJECT)
	PATH="$(CURDIR)/$(BIN):$$PATH" PYTHONPATH="$(CURDIR)" $(BIN)/python bench/gpu_check.py --out gpu_check.json $(GPU_CHECK_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Re-pin constraints.txt after a change to pyproject.toml (resolves from scratch in a throwaway venv).
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet -e '.[dev]'
	{ sed -n '1,/^# Regenerate/p' constraints.txt; .lock-venv/bin/pip freeze --exclude-editable | grep -v '^atmask'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt && rm -rf .lock-venv

clean-venv:
	rm -rf $(VENV)
