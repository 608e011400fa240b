# `make demo` and `make test` bootstrap a local virtual environment (.venv) on first use, then reuse it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Re-installs when pyproject.toml changes.
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench bench-gpu bench-quick clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python train.py experiment=demo $(ARGS)

# Tests in parallel (pytest-xdist, a worker per core, at most 4; ARGS="-n 0" for one process, e.g. with -s or --pdb).
test: $(STAMP) lint
	$(BIN)/python -m pytest -q -n auto --maxprocesses=4 $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

# Speed and memory against Hugging Face, and cost growth per attention scheme (~10 min on 2 cores).
bench: $(STAMP)
	$(BIN)/python benchmarks/run.py $(ARGS)

# On a CUDA machine: ours vs HF training/inference throughput, MFU, largest batch (benchmarks/README.md, part 4).
bench-gpu: $(STAMP)
	$(BIN)/python benchmarks/gpu.py $(ARGS)

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/run.py --quick $(ARGS)

clean-venv:
	rm -rf $(VENV)
