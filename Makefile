# Each target sets itself up on a fresh machine: a .venv with the project and its test extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install test lint format demo bench clean pgbouncer chromium

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

test: $(STAMP) pgbouncer chromium
	$(BIN)/python -m pytest -q

# The transaction-pooler tests run a real PgBouncer (Debian's package); install it when missing.
pgbouncer:
	@command -v pgbouncer >/dev/null 2>&1 || test -x /usr/sbin/pgbouncer || { \
	  echo "installing pgbouncer for the transaction-pooler tests"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq pgbouncer >/dev/null; }

# The HTML report is tested in a real headless browser (Debian's chromium); install it when missing.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  echo "installing chromium for the HTML report tests"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium >/dev/null; }

lint: $(STAMP)
	$(BIN)/ruff check aggregator tests
	$(BIN)/ruff format --check aggregator tests

format: $(STAMP)
	$(BIN)/ruff check --fix aggregator tests
	$(BIN)/ruff format aggregator tests

demo: $(STAMP)
	$(BIN)/python -m aggregator demo

bench: $(STAMP)
	$(BIN)/python -m aggregator.bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
