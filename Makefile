# anime2vec — every target sets up what it needs on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The stamp changes when the pins change, so `make` reinstalls exactly then.
# setup.py and the C source: the package install compiles the ranker's int8 kernel (anime2vec/native)
BUILD_INPUTS := requirements.lock pyproject.toml setup.py anime2vec/native/scan.c
STAMP := $(VENV)/.stamp-$(shell cat $(BUILD_INPUTS) | sha256sum | cut -c1-12)
PROTOS := $(wildcard protos/anime2vec/v1/*.proto)
GEN_STAMP := anime2vec/v1/.stamp
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup proto promtool postgres lint test run bench train evaluate clean help

help:
	@echo "make run    - set up, train a bundle if none exists, start encoder, ranker and gateway (SAMPLE=1: sample data)"
	@echo "make test   - set up and run the test suite (CI runs this)"
	@echo "make bench  - benchmarks (JSON + markdown + plots under reports/bench/)"
	@echo "make train  - train the default bundle on the full data (see README)"

setup: $(STAMP) $(GEN_STAMP)

$(STAMP): $(BUILD_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, from the CPU wheel: anything later that asks for torch finds it satisfied.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.lock
	$(PIP) install -q --no-deps -e .
	rm -f $(VENV)/.stamp-*; touch $@

proto: $(GEN_STAMP)

$(GEN_STAMP): $(STAMP) $(PROTOS)
	mkdir -p anime2vec/v1
	@if [ -n "$(PROTOS)" ]; then \
	  $(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS); fi
	touch anime2vec/v1/__init__.py $@

# promtool checks and unit-tests deploy/prometheus/rules.yml. Debian ships it only inside the
# `prometheus` server package, so that package is downloaded (apt-get download: no root) and only
# its promtool unpacked into .cache/tools/bin, which every target has on PATH: no server is
# installed, no service enabled. A promtool already on PATH is used as it is.
TOOLS := .cache/tools
export PATH := $(CURDIR)/$(TOOLS)/bin:$(PATH)

promtool:
	@command -v promtool >/dev/null || $(MAKE) --no-print-directory $(TOOLS)/bin/promtool

$(TOOLS)/bin/promtool:
	@rm -rf $(TOOLS)/deb; mkdir -p $(TOOLS)/deb $(TOOLS)/bin
	@cd $(TOOLS)/deb && apt-get download -q prometheus >/dev/null 2>download.log || { cat download.log; \
	  echo "promtool is missing and Debian's prometheus package could not be downloaded. Either run"; \
	  echo "'sudo apt-get update' once (apt-get download needs the package lists, not root), or put a"; \
	  echo "promtool binary (prometheus-*.linux-amd64.tar.gz from github.com/prometheus/prometheus/releases)"; \
	  echo "in $(TOOLS)/bin/ or on PATH."; exit 1; }
	dpkg-deb -x $(TOOLS)/deb/prometheus_*.deb $(TOOLS)/deb/root
	install -m 0755 $(TOOLS)/deb/root/usr/bin/promtool $@
	@rm -rf $(TOOLS)/deb
	$@ --version | head -1

# PostgreSQL (Debian package `postgresql`) for the store tests: the tests initdb a throwaway cluster in a
# temporary directory and run it on loopback (tests/store/postgres_server.py). apt needs root, as in CI;
# without root install it yourself or set A2V_PG_BIN to a directory holding initdb and pg_ctl.
postgres:
	ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null || [ -x "$$A2V_PG_BIN/pg_ctl" ] || \
	  (apt-get update && apt-get install -y --no-install-recommends postgresql)

# ruff: lint (rules and reasons in pyproject.toml) and the formatting check; mypy: the type check of the
# package and the services (settings in pyproject.toml); the import-direction checks are tests/test_structure.py
lint: setup
	$(PY) -m ruff check --quiet .
	$(PY) -m ruff format --check --quiet .
	$(PY) -m mypy

# Test files run in parallel, each file in one worker process (its module fixtures stay together); at most 4
# workers, because each one that draws an end-to-end file trains its own sample bundle and starts its own
# services. TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n < 4 ? n : 4 )))

test: setup promtool postgres lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

train: setup
	$(PY) -m anime2vec.cli train

# SAMPLE=1 serves a bundle trained on the small sample (trained on first use either way).
run: setup
	$(PY) -m anime2vec.runlocal $(if $(filter 1 yes true,$(SAMPLE)),--sample) $(RUN_ARGS)

evaluate: setup
	$(PY) -m anime2vec.cli evaluate

# BENCH_ARGS: e.g. --quick, --only gateway,encoder (see python -m bench --help)
bench: setup
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf anime2vec/v1 .pytest_cache
