# demix: two-command quick start.  `make demo` and `make test` each set up everything they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.demix-installed
APT_PACKAGES := ffmpeg fluidsynth fluid-soundfont-gm libsndfile1 espeak-ng
DEMO_DIR ?= demo_out
PYTEST_ARGS ?=

export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: demo test install system-deps bench clean help

help:
	@echo "make demo   set up .venv and separate a few generated clips (offline, CPU)"
	@echo "make test   set up .venv and run the test suite"
	@echo "make bench  run bench/separate_bench.py (by hand; needs the bench extra)"

system-deps:
	@missing=""; \
	for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	else \
		echo "demix needs these Debian packages:$$missing"; \
		echo "run: sudo apt-get install$$missing   (then re-run make)"; exit 1; \
	fi

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[test]"
	@touch $(STAMP)

install: system-deps $(STAMP)

demo: install
	rm -rf $(DEMO_DIR)
	$(PY) -m pipeline.synth demo $(DEMO_DIR)/in
	$(VENV)/bin/demix separate $(DEMO_DIR)/in -o $(DEMO_DIR)/stems
	@echo; echo "stems written under $(DEMO_DIR)/stems:"; find $(DEMO_DIR)/stems -type f | sort

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PIP) install -q -e ".[bench]"
	$(PY) bench/separate_bench.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
