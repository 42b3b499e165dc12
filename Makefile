# Two commands on a fresh machine: `make repro` (the study) and `make test` (the tests).
# Both create or reuse the virtualenv in $(VENV) first.
VENV ?= .venv
PIP_VERSION := 26.3
SHARED_MIRROR := $(abspath ../shared/data/mnist)
export PATH := $(abspath $(VENV))/bin:$(PATH)
# A local MNIST mirror beside the checkout is used when present (no download needed).
ifneq ($(wildcard $(SHARED_MIRROR)/train-images-idx3-ubyte.gz),)
export PARAMSHARE_MNIST_MIRROR ?= $(SHARED_MIRROR)
endif

.PHONY: setup repro report test test-slow test-all lint bench clean mlflow-server

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet "pip==$(PIP_VERSION)"
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

setup: $(VENV)/.installed

repro: setup
	dvc repro

report: setup
	paramshare report

test: setup
	python -m pytest -m "not slow"

test-slow: setup
	python -m pytest -m slow || [ $$? -eq 5 ]

test-all: setup
	python -m pytest

bench: setup
	python benchmarks/train_speed.py

lint: setup
	ruff check .

# A tracking server for several people or machines, bound to 127.0.0.1 (it has no
# authentication: README, "A shared tracking server"). Defaults keep everything in mlflow-server/;
# e.g. make mlflow-server BACKEND_STORE_URI=postgresql://USER:PASS@127.0.0.1:5432/mlflow PORT=5001
MLFLOW_SERVER_DIR := $(abspath mlflow-server)
BACKEND_STORE_URI ?= sqlite:///$(MLFLOW_SERVER_DIR)/mlflow.db
ARTIFACTS_DESTINATION ?= $(MLFLOW_SERVER_DIR)/artifacts
PORT ?= 5000

mlflow-server: setup
	mkdir -p $(MLFLOW_SERVER_DIR)
	mlflow server --host 127.0.0.1 --port $(PORT) --backend-store-uri '$(BACKEND_STORE_URI)' \
		--artifacts-destination '$(ARTIFACTS_DESTINATION)'

clean:
	rm -rf $(VENV)
