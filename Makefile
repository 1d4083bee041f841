# Two commands for a new user: `make demo` and `make test`. Both run `setup` when needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.installed

# Loopback-only Ray for the local demo and the tests (never set these when joining a real cluster).
LOCAL_RAY_ENV := RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0

.PHONY: setup demo test test-deps clean

setup: $(STAMP)

# torch goes in first, pinned: on a machine without an NVIDIA GPU we want the CPU build. pip picks a
# local 2.13.0+cpu wheel when one is on its find-links; otherwise we point it at the CPU index.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if $(PY) -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_VERSION)')" 2>/dev/null; then \
		echo "torch $(TORCH_VERSION) already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		$(PIP) install "torch==$(TORCH_VERSION)"; \
	elif $(PIP) download --no-deps --no-index -d /tmp/pllava-torch-probe "torch==$(TORCH_VERSION)+cpu" >/dev/null 2>&1; then \
		$(PIP) install "torch==$(TORCH_VERSION)+cpu"; \
	else \
		$(PIP) install "torch==$(TORCH_VERSION)" --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(PIP) install -e ".[test]"
	touch $(STAMP)

demo: setup
	$(LOCAL_RAY_ENV) $(PY) -m jobs.demo

# The contact-sheet test renders the report in headless Chromium (Debian's `chromium`).
test-deps:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		{ if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
		else echo "note: install chromium (apt-get install -y chromium) for the contact-sheet browser test"; fi; }

test: setup test-deps
	$(LOCAL_RAY_ENV) $(PY) -m pytest -q tests

clean:
	rm -rf build .pytest_cache .hypothesis
