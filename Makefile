# Two commands do all the set-up on a fresh Debian 12 machine (as root):
#   make run    installs what Cleanmail needs, migrates, and starts it on SQLite in ./instance
#   make test   installs what the tests need (Debian packages included) and runs them

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_RUN := libmagic1 python3-venv ca-certificates
APT_TEST := $(APT_RUN) postfix postgresql swaks chromium
APT_TEST += rspamd spamassassin spamd
PYTEST_ARGS ?=

.PHONY: run test lint bench clean apt-run apt-test bench-search

run: apt-run $(VENV)/.installed
	@$(BIN)/cleanmail db upgrade
	@echo
	@$(BIN)/cleanmail demo
	@echo
	@exec $(BIN)/cleanmail serve

test: apt-test $(VENV)/.installed
	$(BIN)/ruff check cleanmail tests bench migrations wsgi.py
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check cleanmail tests bench migrations wsgi.py

bench: $(VENV)/.installed
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/accuracy.py
	$(BIN)/python bench/reports.py

bench-search: apt-test $(VENV)/.installed
	$(BIN)/python bench/search.py

# Debian packages, installed only when one is missing. Postfix is installed without a
# system configuration: the tests run private instances of their own.
apt-run:
	@bash .ci/apt-install $(APT_RUN)

apt-test:
	@bash .ci/apt-install $(APT_TEST)

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
