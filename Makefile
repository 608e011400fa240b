# `make demo` and `make test` bootstrap a local virtual environment (.venv) on first use, then reuse it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Re-installs when pyproject.toml changes.
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python train.py experiment=demo $(ARGS)

test: $(STAMP) lint
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean-venv:
	rm -rf $(VENV)
