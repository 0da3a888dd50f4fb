"""One GPU, a GPT-2 pretraining step: jaxllm against PyTorch (eager and torch.compile), same run.

Both sides train the same architecture with bf16 compute and fp32 master weights, AdamW (0.9, 0.95,
weight decay 0.1 on matrices), global-norm clipping at 1.0 and a warmup+cosine schedule, on random
tokens. jaxllm runs its real train step (`make_train_step`: clipping, schedule, NaN guard,
metrics). Reports ms/step, tokens/s, MFU against a bf16 matmul peak measured in the same run, peak
device memory and compile time. Prints JSON and writes benchmarks/results/gpu_pretrain.json.

    python benchmarks/gpu_pretrain.py                       # gpt2 (124M), block 1024, batch 8
    python benchmarks/gpu_pretrain.py --preset cpu-small --batch 4 --steps 3   # a smoke run on CPU
    python benchmarks/gpu_pretrain.py --skip-torch --scan-layers  # jaxllm with GPTConfig.scan_layers

`benchmarks/gpu_session.sh` runs what a lent GPU should measure, in one go.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def _timed(step, steps: int, sync) -> tuple[float, float, list[float]]:
    """(first-call seconds, median ms/step, per-step ms) with a sync after each step."""
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    for _ in range(2):
        step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(1000.0 * (time.perf_counter() - t0))
    return first, statistics.median(times), times


def run_jaxllm(cfg, batch: int, steps: int, data: np.ndarray) -> dict:
    import jax
    from flax import nnx

    from jaxllm.model import GPT
    from jaxllm.training.optim import OptimConfig, lr_schedule, make_optimizer
    from jaxllm.training.step import init_train_state, lm_loss_fn, make_train_step

    optim = OptimConfig(learning_rate=6e-4, min_lr=6e-5, warmup_iters=10, lr_decay_iters=1000,
                        beta1=0.9, beta2=0.95, weight_decay=0.1, grad_clip=1.0)
    optimizer = make_optimizer(optim)
    graphdef, state = init_train_state(GPT(cfg, rngs=nnx.Rngs(0)), optimizer)
    step_fn = make_train_step(graphdef, lm_loss_fn, optimizer, lr_schedule(optim))
    x = jax.device_put(data[None, :, :-1])
    y = jax.device_put(data[None, :, 1:])
    key = jax.random.key(0)
    holder = {"state": state, "metrics": None}

    def step():
        holder["state"], holder["metrics"] = step_fn(holder["state"], (x, y), key)

    first, median_ms, times = _timed(step, steps, lambda: jax.block_until_ready(holder["metrics"]))
    stats = jax.local_devices()[0].memory_stats() or {}
    return {"first_step_s": first, "ms_per_step": median_ms, "ms_all": times,
            "loss": float(holder["metrics"]["loss"]),
            "peak_memory_gb": stats.get("peak_bytes_in_use", 0) / 1e9 or None}


def run_torch(cfg, batch: int, steps: int, data: np.ndarray, compile_model: bool) -> dict:
    import torch

    from benchmarks.torch_gpt import TorchGPT, TorchGPTConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    model = TorchGPT(TorchGPTConfig(vocab_size=cfg.vocab_size, block_size=cfg.block_size,
                                    n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                    dropout=cfg.dropout, bias=cfg.bias)).to(device)
    params = list(model.parameters())
    opt = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=6e-4, betas=(0.9, 0.95), fused=device == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: min(1.0, (it + 1) / 10))
    fwd = torch.compile(model) if compile_model else model
    x = torch.as_tensor(data[:, :-1], device=device, dtype=torch.long)
    y = torch.as_tensor(data[:, 1:], device=device, dtype=torch.long)
    holder = {}

    def step():
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            _, loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        holder["loss"] = loss

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    first, median_ms, times = _timed(step, steps, sync)
    return {"first_step_s": first, "ms_per_step": median_ms, "ms_all": times,
            "loss": float(holder["loss"]), "torch_version": torch.__version__,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--block", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=None, help="e.g. 50304, nanoGPT's padded GPT-2 vocabulary")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--scan-layers", action="store_true", help="jaxllm runs its blocks as one scan")
    ap.add_argument("--out", default=str(HERE / "results" / "gpu_pretrain.json"))
    args = ap.parse_args()

    import jax

    from jaxllm.config import GPTConfig
    from jaxllm.training.perf import measure_matmul_peak

    cfg = GPTConfig.preset(args.preset).replace(block_size=args.block, dtype="bfloat16", dropout=0.0,
                                                scan_layers=args.scan_layers)
    if args.vocab:
        cfg = cfg.replace(vocab_size=args.vocab)
    data = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.block + 1)).astype(np.int32)
    tokens = args.batch * args.block
    flops_per_token = cfg.flops_per_token(args.block)
    peak = measure_matmul_peak(n=8192 if jax.default_backend() == "gpu" else 1024, dtype="bfloat16")

    def summarise(r: dict) -> dict:
        tok_s = tokens / (r["ms_per_step"] / 1000.0)
        return {**{k: v for k, v in r.items() if k != "ms_all"}, "tokens_per_s": tok_s,
                "mfu": flops_per_token * tok_s / peak}

    results = {"jaxllm": summarise(run_jaxllm(cfg, args.batch, args.steps, data))}
    if not args.skip_torch:
        for name, comp in (("torch_eager", False), ("torch_compile", True)):
            try:
                results[name] = summarise(run_torch(cfg, args.batch, args.steps, data, comp))
            except Exception as e:  # e.g. inductor without a compiler: record why, keep the rest
                results[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
    for name in ("torch_eager", "torch_compile"):
        if "ms_per_step" in results.get(name, {}):
            results[f"speedup_vs_{name}"] = results[name]["ms_per_step"] / results["jaxllm"]["ms_per_step"]
    out = {
        "benchmark": "gpu_pretrain_step",
        "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
        "jax_version": jax.__version__, "python": platform.python_version(),
        "model": {"preset": args.preset, **cfg.to_dict(), "params": cfg.num_params()},
        "batch": args.batch, "block": args.block, "tokens_per_step": tokens,
        "flops_per_token": flops_per_token, "bf16_matmul_peak_tflops": peak / 1e12,
        **results,
    }
    text = json.dumps(out, indent=2)
    print(text)
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
