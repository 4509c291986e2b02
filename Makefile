# dcrouter developer and CI entry points.  `make help` lists them.
#
# Debian packages: one list per purpose, each a single variable, so an issue
# that needs another real peer adds it here (swaks, postfix, dnsutils,
# pebble, slapd, ...).  bin/deps-debian.sh installs only what is missing.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   := .venv
VBIN   := $(VENV)/bin

# Debian packages the tests need (system tests drive real peers).
DEBIAN_PACKAGES := openssl curl python3-venv haproxy nginx-light \
                   libnginx-mod-stream procps iproute2 slapd ldap-utils pebble \
                   bind9-dnsutils postfix swaks libnet-ssleay-perl libio-socket-ssl-perl \
                   chromium testssl.sh
# Extra Debian packages only the benchmark needs.
BENCH_DEBIAN_PACKAGES := wrk

# Project metadata the venv is built from: the venv is refreshed when it (or
# this Makefile) changes.
PROJECT_FILES := $(wildcard setup.cfg setup.py pyproject.toml) Makefile

# "compat" editable mode puts the repo root itself on sys.path (a plain .pth
# line). twistd finds plugins by scanning sys.path for twisted/plugins/, so
# the default editable mode (an import hook mapping only the packages) leaves
# `twistd dcrouter` an "Unknown command".
PIP_EDITABLE := --config-settings editable_mode=compat
VENV_STAMP    := $(VENV)/.dcrouter-installed

DEV_CONFIG := conf/dev.ini

# A hung test must fail CI, not eat its time budget: pytest as a whole is
# stopped (SIGTERM, then SIGKILL 30 s later) after this long; exit 124.
PYTEST_TIME_LIMIT ?= 35m

# mypy: with `files = ...` in setup.cfg's [mypy], plain `mypy`; else these.
MYPY_ARGS := $(if $(shell sed -n '/^\[mypy\]/,/^\[/p' setup.cfg 2>/dev/null | grep -E '^files[[:space:]]*='),,dcrouter)

.PHONY: help run deps-debian deps-bench venv lint test package-test bench clean

help:
	@echo "make run          venv, then twistd -n dcrouter --config $(DEV_CONFIG)"
	@echo "make deps-debian  apt-get install what the tests need (only if missing)"
	@echo "make venv         $(VENV) with 'pip install -e .[test]' (stamp on setup.cfg)"
	@echo "make lint         ruff check + mypy"
	@echo "make test         deps-debian + venv + lint + pytest (what CI runs)"
	@echo "make package-test bin/test-package.sh: build the .deb, lintian, install, smoke, suite on Debian's python3, purge (root)"
	@echo "make bench        bench/run.sh: dcrouter vs HAProxy vs nginx, TCP forwarding"
	@echo "make clean        remove $(VENV), caches, build output, state/"

deps-debian:
	bin/deps-debian.sh $(DEBIAN_PACKAGES)

deps-bench:
	bin/deps-debian.sh $(DEBIAN_PACKAGES) $(BENCH_DEBIAN_PACKAGES)

venv: $(VENV_STAMP)

$(VENV_STAMP): $(PROJECT_FILES)
	@if [ ! -f setup.cfg ] && [ ! -f pyproject.toml ]; then \
	    echo "make venv: no setup.cfg (or pyproject.toml) yet; nothing to install" >&2; \
	    exit 1; \
	fi
	@if [ ! -x $(VBIN)/python ]; then \
	    echo "make venv: creating $(VENV) with $$($(PYTHON) -c 'import sys; print(sys.executable)')"; \
	    $(PYTHON) -m venv $(VENV); \
	fi
	@# (the filter drops pip's notes about this machine's absent local indexes)
	$(VBIN)/python -m pip install --quiet --disable-pip-version-check \
	    $(PIP_EDITABLE) -e '.[test]' 2>&1 \
	    | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
	@touch $@

lint: venv
	$(VBIN)/ruff check --output-format=concise .
	$(VBIN)/mypy $(MYPY_ARGS)

test: deps-debian venv lint
	timeout --kill-after=30s $(PYTEST_TIME_LIMIT) $(VBIN)/python -m pytest $(PYTEST_ARGS)

run: venv
	@$(VBIN)/python bin/dev-hints.py $(DEV_CONFIG)
	@echo "starting: $(VBIN)/twistd -n --pidfile= dcrouter --config $(DEV_CONFIG)  (Ctrl-C stops it)"
	$(VBIN)/twistd -n --pidfile= dcrouter --config $(DEV_CONFIG)

# The bench runs HAProxy and nginx even when the venv cannot be built; the
# dcrouter column is then skipped with a message. BENCH_ARGS="--duration 2" etc.
package-test:
	bin/test-package.sh

bench: deps-bench
	@$(MAKE) --no-print-directory venv || echo "make bench: venv failed; dcrouter will be skipped"
	bench/run.sh $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist .eggs *.egg-info .mypy_cache .ruff_cache \
	       .pytest_cache .hypothesis state
	find . -path ./.git -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
	find . -path ./.git -prune -o -name dropin.cache -type f -exec rm -f {} +
