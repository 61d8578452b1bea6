# The README's two commands: `make demo` and `make test`. Each creates or reuses
# .venv and installs everything into it. On a machine without torch in the venv,
# torch 2.13.0 (the CPU build) is installed first; a CUDA user creates .venv and
# installs their own torch into it before running make.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.tunefix-installed

.PHONY: setup demo test lint assets clean go

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/tunefix demo

assets: setup
	$(VENV)/bin/tunefix assets fetch

# Go's text/template renders Ollama templates in the Jinja == Ollama checks (Debian: golang-go).
go:
	@command -v go >/dev/null 2>&1 || test -x /usr/lib/go-1.19/bin/go || \
	  { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	    (apt-get update -qq && apt-get install -y -qq golang-go) ; } || \
	  echo "warning: no Go toolchain; install golang-go for the template checks"

test: setup assets go
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV) build *.egg-info
