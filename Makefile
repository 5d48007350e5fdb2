# Each target sets itself up on a fresh machine: a .venv with the project and its test extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install test lint format demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

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
