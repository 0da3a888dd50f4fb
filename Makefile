# Two commands on a fresh machine:  `make run` (train the default model)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test install install-dev bench bench-quick clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Runtime dependencies only.
install: $(BIN)/python
	$(BIN)/pip install -q -e .

# Tests and PyTorch baselines. torch is pinned exactly (2.13.0, CPU build) in the `torch` extra.
# GPT-2's BPE ranks ship inside openai-whisper; --no-deps keeps its CUDA torch requirement out.
install-dev: $(BIN)/python
	$(BIN)/pip install -q -e ".[dev,torch]"
	$(BIN)/pip install -q --no-deps openai-whisper==20250625

run: install
	$(BIN)/jaxllm pretrain

test: install-dev
	$(BIN)/python -m pytest

bench: install-dev
	$(BIN)/python benchmarks/shakespeare_char.py

bench-quick: install-dev
	$(BIN)/python benchmarks/shakespeare_char.py --iters 200

.PHONY: bench-decode
bench-decode: install-dev
	$(BIN)/python benchmarks/decode.py

clean:
	rm -rf runs data_cache
