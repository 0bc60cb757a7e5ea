# The README's first two commands: `make demo` and `make test`. Each sets up what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LATEST := .venv-latest
PROTO_SRC := protos/advgrpo/reward/v1/reward.proto
PROTO_OUT := protos/advgrpo/reward/v1/reward_pb2.py
UNIT_FILES := $(wildcard */pyproject.toml) protos/setup.py
PYTEST_ARGS ?=
# Two pytest workers (pytest-xdist), a test file per worker at a time (module fixtures start their
# servers once): most of the suite waits on processes it starts, so two overlap on 2 cores.
# PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(PYTEST_WORKERS)),-p no:xdist,-n $(PYTEST_WORKERS) --dist loadfile)

.PHONY: all venv proto demo test test-fast test-latest lock sysdeps bench reliability clean

all: venv proto

# The virtualenv holds exactly the locked set (requirements/lock.txt, hashes checked), torch from
# the machine's own wheel, and every unit editable; it is rebuilt when any of those change.
$(STAMP): requirements/lock.txt requirements/bootstrap.txt constraints.txt $(UNIT_FILES) scripts/setup-venv.sh
	PYTHON=$(PYTHON) bash scripts/setup-venv.sh $(VENV) locked
	touch $@

venv: $(STAMP)

$(PROTO_OUT): $(PROTO_SRC) $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=protos --pyi_out=protos \
		--grpc_python_out=protos $(PROTO_SRC)

proto: $(PROTO_OUT)

# Refresh requirements/lock.txt from the units' ranges and requirements/*.in (keeps current pins
# where they still fit; `make lock LOCK_ARGS=--upgrade` takes the newest).
lock: venv
	$(PY) scripts/lock.py $(LOCK_ARGS)

# System packages the browser test needs (headless Chromium for the dashboard).
sysdeps:
	@bash scripts/install-sysdeps.sh

# The toy world's short version: experiments 1 and 2 (a hackable proxy, and Adv-GRPO) side by side
# on the shipped toy models, their table, plot and sample grids (docs/EXPERIMENTS.md).
DEMO_OUTPUT ?= demo-output
demo: venv proto
	$(PY) -m experiments.toy_world.run --quick --out $(DEMO_OUTPUT)

test: venv proto sysdeps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: venv proto
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The whole suite against the newest releases the ranges allow (a separate virtualenv), so that
# the next upstream break is found on purpose, not by a user.
test-latest: sysdeps
	PYTHON=$(PYTHON) bash scripts/setup-venv.sh $(LATEST) latest
	$(LATEST)/bin/python -m pytest $(XDIST) $(PYTEST_ARGS)

# Reward server, feature cache and trainer on this machine; the kernel benchmark needs a CUDA GPU.
# Issue 15's long runs (load 32 clients x 60 s, 20 SIGKILLs, 2000 fuzz inputs; ~8 min on 2 cores):
# bench/results/reliability.json and docs/RELIABILITY.md. make test runs the short versions.
reliability: venv proto
	$(PY) -m bench.reliability

bench: venv proto
	$(PY) -m bench.run_all
	$(PY) -m bench.feature_cache
	$(PY) -m bench.trainer_overlap
	@echo "GPU kernel benchmark (needs CUDA): $(PY) -m bench.kernels"

clean:
	rm -rf $(VENV) $(LATEST) protos/advgrpo/reward/v1/*_pb2*.py protos/advgrpo/reward/v1/*_pb2*.pyi
