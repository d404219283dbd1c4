# Two commands do all set-up: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# A machine without a CUDA GPU gets the CPU wheel of torch first (an unpinned torch pulls GBs of CUDA).
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_CPU := torch==2.13.0

.PHONY: demo test install install-dev lint clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.torch: | $(VENV)/bin/python
ifeq ($(HAS_GPU),1)
	$(PIP) install -q torch
else
	$(PIP) install -q $(TORCH_CPU)
endif
	touch $@

$(VENV)/.installed: setup.cfg pyproject.toml $(VENV)/.torch
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-dev: setup.cfg pyproject.toml $(VENV)/.installed
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# the demo: 2 epochs, a couple of minutes on a CPU; the long one (10 epochs): make demo ARGS=experiment=tiny_long
demo: $(VENV)/.installed
	$(PY) train.py $(ARGS)
	@$(if $(ARGS),,echo "the long demo (10 epochs, about 15 minutes on 2 CPU cores): make demo ARGS=experiment=tiny_long")

# FAST=1 leaves out the tests marked slow (several processes: DDP, sweeps, signals); CI runs them all.
test: $(VENV)/.installed-dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q $(if $(FAST),-m "not slow") $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache outputs logs
