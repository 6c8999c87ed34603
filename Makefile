# demix: two-command quick start.  `make demo` and `make test` each set up everything they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.demix-installed
# the synth profiles train and heldout also need the other GM soundfonts and the flite and festival voices;
# chromium: the report tests open the HTML reports in it (headless, driven by Playwright; never `playwright install`)
APT_PACKAGES := ffmpeg fluidsynth fluid-soundfont-gm libsndfile1 espeak-ng \
	musescore-general-soundfont fluidr3mono-gm-soundfont opl3-soundfont timgm6mb-soundfont csound-soundfont \
	flite festival festvox-kdlpc16k festvox-us-slt-hts \
	chromium
DEMO_DIR ?= demo_out
PYTEST_ARGS ?=

export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# tests/test_report_browser.py fails, instead of skipping, without chromium or playwright
export DEMIX_BROWSER_TESTS := required

.PHONY: demo demo-rerun test install system-deps bench clean help

help:
	@echo "make demo   set up .venv, generate a small catalog and separate it with the catalog flow (offline, CPU)"
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
	$(PY) -m demix.pipeline.data.synth demo-catalog $(DEMO_DIR)/catalog
	@# exit status 1 means "some tracks failed": expected here, the catalog holds one corrupt file
	$(VENV)/bin/demix run $(DEMO_DIR)/catalog/catalog.csv -o $(DEMO_DIR)/run --workers 2; rc=$$?; [ $$rc -le 1 ]
	@echo; echo "stems:     $(DEMO_DIR)/run/stems/<track_id>/<settings_hash>/<attempt>/<stem>.wav"; \
	echo "manifests: $(DEMO_DIR)/run/manifests/{tracks,stems,failures}.parquet"; \
	echo "rerun 'make demo-rerun' to see committed tracks skipped"; \
	echo "report:    $(DEMO_DIR)/run/report/index.html   (open it in a browser; rebuild: demix report $(DEMO_DIR)/run)"

demo-rerun: install
	$(VENV)/bin/demix run $(DEMO_DIR)/catalog/catalog.csv -o $(DEMO_DIR)/run --workers 2; rc=$$?; [ $$rc -le 1 ]

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PIP) install -q -e ".[bench]"
	$(PY) bench/separate_bench.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
