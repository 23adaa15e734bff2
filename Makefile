# Two commands: `make test` and `make serve`. Both set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0

.PHONY: setup test serve lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The pinned CPU wheel first: with it installed, the package's torch range needs nothing more.
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e '.[test]'
	# Build the native CPU kernels now; without a compiler this says so (PyTorch paths run).
	$(BIN)/python -m shardserve.kernels || true
	touch $@

setup: $(BIN)/.installed

lint: setup
	$(BIN)/ruff check src tests benchmarks

test: setup lint
	$(BIN)/pytest

# Serves the embedded default repository (built on first run into ~/.cache/shardserve) on
# two CPU devices at http://127.0.0.1:8000; prints a curl line to try.
serve: setup
	$(BIN)/shardserve serve --devices cpu:2

bench: setup
	$(BIN)/python benchmarks/tp_scaling.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
