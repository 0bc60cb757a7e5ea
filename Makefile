# The README's first two commands: `make demo` and `make test`. Each sets up what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# Every install unit, editable (one source root each, all under the advgrpo. namespace).
UNITS := -e ./protos -e "./common[config,torch]" -e ./client -e "./kernels[triton]" -e ./reward_server -e ./trainer
STAMP := $(VENV)/.installed
PROTO_SRC := protos/advgrpo/reward/v1/reward.proto
PROTO_OUT := protos/advgrpo/reward/v1/reward_pb2.py
PYTEST_ARGS ?=

.PHONY: all venv proto demo test test-fast sysdeps bench clean

all: venv proto

# The virtualenv is rebuilt when the project's requirements change.
$(STAMP): constraints.txt requirements/dev.in */pyproject.toml protos/setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt $(UNITS) -r requirements/dev.in
	touch $@

venv: $(STAMP)

$(PROTO_OUT): $(PROTO_SRC) $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=protos --pyi_out=protos \
		--grpc_python_out=protos $(PROTO_SRC)

proto: $(PROTO_OUT)

# System packages the browser test needs (headless Chromium for the dashboard).
sysdeps:
	@bash scripts/install-sysdeps.sh

demo: venv proto
	$(PY) -m advgrpo.trainer.demo

test: venv proto sysdeps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv proto
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Reward server, feature cache and trainer on this machine; the kernel benchmark needs a CUDA GPU.
bench: venv proto
	$(PY) -m bench.run_all
	$(PY) -m bench.feature_cache
	$(PY) -m bench.trainer_overlap
	@echo "GPU kernel benchmark (needs CUDA): $(PY) -m bench.kernels"

clean:
	rm -rf $(VENV) protos/advgrpo/reward/v1/*_pb2*.py protos/advgrpo/reward/v1/*_pb2*.pyi
