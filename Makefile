# Two commands do all set-up on a fresh machine (README):  make demo   and   make test
# `make demo VERBOSE=1` shows Ray's own output (progress bars, worker logs) instead of a log file.
# Each creates .venv when it is missing. CPU torch is installed first so pip never pulls a CUDA build;
# DeepSpeed is installed without building its C++ ops (DS_BUILD_OPS=0, no build isolation).
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv assets demo test test-fast clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

assets: venv
	$(BIN)/python jobs/prepare_data.py

demo: assets
	$(BIN)/python jobs/demo.py $(if $(VERBOSE),--verbose)

test: assets
	$(BIN)/python -m pytest tests

test-fast: venv
	$(BIN)/python -m pytest tests -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info
