# Two commands: `make test` and `make serve`. Both set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
DEMO_DIR := $(HOME)/.cache/shardserve/demo-llama-random

.PHONY: setup test serve lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The pinned CPU wheel first: with it installed, the package's torch range needs nothing more.
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/.installed

lint: setup
	$(BIN)/ruff check src tests benchmarks

test: setup lint
	$(BIN)/pytest

# The HTTP server arrives with issue 4; until then `make serve` builds the demo model and runs
# the offline engine on it across two CPU devices.
serve: setup
	$(BIN)/shardserve make-test-model --arch llama --size small --out $(DEMO_DIR) --skip-existing
	$(BIN)/shardserve generate --model $(DEMO_DIR) --tp 2 --devices cpu:2 \
		--prompt "The quick brown fox" --max-tokens 32

bench: setup
	$(BIN)/python benchmarks/tp_scaling.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
