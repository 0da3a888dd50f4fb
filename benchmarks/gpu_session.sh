#!/usr/bin/env bash
# What a lent GPU should measure, as one prepared run (device time is short: each step has a timeout).
# Usage on the GPU machine, from the repository root: bash benchmarks/gpu_session.sh OUT_DIR
#   1. GPT-2 (124M) pretraining step, block 1024, bf16: jaxllm against torch eager and torch.compile
#   2. the same jaxllm step with scan_layers (compile time and step time against 1.)
#   3. train-step compile times of gpt2 and gpt2-xl, layer loop against scan_layers (from shapes)
# Results land in OUT_DIR as JSON; copy the numbers into benchmarks/RESULTS.md.
set -u
out="${1:-benchmarks/results}"
mkdir -p "$out"
py="${PYTHON:-python}"
timeout 300 "$py" benchmarks/gpu_pretrain.py --out "$out/gpu_pretrain.json"; echo "gpu_pretrain rc $?"
timeout 120 "$py" benchmarks/gpu_pretrain.py --skip-torch --scan-layers --steps 10 \
    --out "$out/gpu_pretrain_scan.json"; echo "gpu_pretrain scan rc $?"
timeout 240 "$py" benchmarks/compile_time.py --presets gpt2,gpt2-xl --step-models "" --repeats 1 \
    --quiet-wait 0 --out-dir "$out"; echo "compile_time rc $?"
