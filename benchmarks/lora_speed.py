"""LoRA fine-tuning against full fine-tuning: step time, optimizer state, parameters, compile, memory.

Both variants run jaxllm's real train step (`init_train_state` + `make_train_step` with `lm_loss_fn`
and `make_optimizer`: AdamW, global-norm clipping, schedule, NaN guard) on the same random model and
the same random token batches:

    full   trainable=nnx.Param (every weight)
    lora   add_lora(LoraConfig(r=8, alpha=16, target=("q", "v"))), trainable=jaxllm.peft.PeftParam

on the gpt2 preset (124M) with block 128, batch 4 (--quick: 4 layers, 256 wide, block 64). Each
variant runs in its own subprocess, so memory and compilation caches never mix (as in
train_speed.py, whose helpers this file imports). Devices are laid out as `jaxllm lora` and
train_speed.py do: one JAX CPU device per core, batch rows split across them (--devices 1: one
device). Besides wall-clock numbers, each worker records XLA's own FLOP count of the compiled step,
which shows whether the frozen kernels' weight gradients were dropped (they should be: LoRA's step
then does ~2/3 of the full step's matmul work, forward + activation gradients, no weight gradients).

Prints one JSON object and writes benchmarks/results/lora_speed.json (--quick: lora_speed_quick.json).

    python benchmarks/lora_speed.py            # gpt2 preset, a few minutes on 2 cores
    python benchmarks/lora_speed.py --quick    # small model, under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.train_speed import (OPTIM, _batches, _rss_mb, add_run_args, compile_and_time,  # noqa: E402
                                    gpt_config, placed_step, wait_for_quiet)

MODELS = {
    "gpt2": dict(model=dict(preset="gpt2", block_size=128), batch=4),
    "quick": dict(model=dict(preset="gpt2", n_layer=4, n_head=4, n_embd=256, block_size=64), batch=4),
}
LORA = dict(r=8, alpha=16.0, target=("q", "v"))
VARIANTS = ("full", "lora")
TARGETS = {"step_speedup_full_over_lora_min": 1.5, "opt_state_ratio_lora_over_full_max": 0.05}


# --------------------------------------------------------------------------- measured in a subprocess


def _nbytes(tree) -> int:
    import jax
    return int(sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree.leaves(tree)))


def _xla_costs(compiled) -> dict:
    """XLA's static view of the compiled step: FLOPs, bytes touched, matmul count, scratch memory."""
    out = {}
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        out["xla_flops"] = float(cost.get("flops", 0.0))
        out["xla_bytes_accessed"] = float(cost.get("bytes accessed", 0.0))
    except Exception:  # noqa: BLE001 -- optional diagnostics, backend-dependent
        pass
    try:
        text = compiled.as_text()
        out["hlo_dot_ops"] = text.count(" dot(") + text.count(" convolution(")
    except Exception:  # noqa: BLE001
        pass
    mem = compiled.memory_analysis()
    if mem is not None:
        out["xla_temp_mb"] = mem.temp_size_in_bytes / 2 ** 20
        out["xla_argument_mb"] = mem.argument_size_in_bytes / 2 ** 20
    return out


def measure(spec: dict, variant: str, devices: int, warmup: int, steps: int) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from jaxllm.model import GPT
    from jaxllm.peft import LoraConfig, PeftParam, add_lora, parameter_report
    from jaxllm.training.optim import OptimConfig, make_optimizer
    from jaxllm.training.step import init_train_state

    cfg = gpt_config(spec)
    rss0 = _rss_mb("VmRSS")
    model = GPT(cfg, rngs=nnx.Rngs(0))
    trainable = nnx.Param
    if variant == "lora":
        add_lora(model, LoraConfig(**LORA), rngs=nnx.Rngs(1))
        trainable = PeftParam
    report = parameter_report(model, trainable)

    optim = OptimConfig(**OPTIM)
    optimizer = make_optimizer(optim)
    graphdef, state = init_train_state(model, optimizer, trainable)
    del model
    sizes = {"opt_state_bytes": _nbytes(state.opt_state), "trainable_bytes": _nbytes(state.trainable),
             "frozen_bytes": _nbytes(state.frozen)}

    step, state, place = placed_step(graphdef, state, optimizer, optim, spec["batch"], devices,
                                     trainable_params=report["trainable"])
    batches = [place(tuple(np.asarray(a[None], np.int32) for a in b)) for b in _batches(cfg, spec["batch"], 4)]
    n_devices = len(jax.tree.leaves(state)[0].sharding.device_set)
    timing, compiled = compile_and_time(step, state, batches, warmup, steps, rss0)
    return {"variant": variant, "params_total": report["total"], "params_trainable": report["trainable"],
            "trainable_percent": report["trainable_percent"], **sizes, **timing, **_xla_costs(compiled),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "devices": n_devices, "backend": jax.default_backend(),
            "jax": jax.__version__}


def worker(job: dict) -> dict:
    from jaxllm.parallel import setup_cpu
    # One device per core (devices=0) as `jaxllm lora` does, or exactly `devices`; also sets the
    # measured XLA:CPU speed flags, so both variants and train_speed.py compile alike.
    setup_cpu(job["devices"] or None)
    return measure(MODELS[job["model"]], job["variant"], job["devices"], job["warmup"], job["steps"])


# --------------------------------------------------------------------------- the driver


def run_worker(job: dict, timeout: float, script: str = __file__) -> dict:
    # Cold compiles, default XLA settings apart from what setup_cpu adds, as in train_speed.run_job
    # (which runs train_speed's own worker, hence this small twin); `script`: whose --worker to run
    # (benchmarks/compile_time.py runs its own through this).
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
    try:
        proc = subprocess.run([sys.executable, script, "--worker", json.dumps(job)], capture_output=True,
                              text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"worker exited {proc.returncode}: {tail}"[:500]}
    return json.loads(lines[-1])


def compare(full: dict, lora: dict) -> dict:
    out = {}
    if "step_s_median" in full and "step_s_median" in lora:
        out["step_speedup_full_over_lora"] = full["step_s_median"] / lora["step_s_median"]
        out["step_speedup_full_over_lora_best"] = full["step_s_min"] / lora["step_s_min"]
        out["opt_state_ratio_lora_over_full"] = lora["opt_state_bytes"] / full["opt_state_bytes"]
        out["trainable_ratio_lora_over_full"] = lora["params_trainable"] / full["params_trainable"]
        if full.get("xla_flops") and lora.get("xla_flops"):
            # what the speedup would be if the step were all matmuls at one speed
            out["xla_flops_ratio_full_over_lora"] = full["xla_flops"] / lora["xla_flops"]
        out["pass"] = {
            "step_speedup": out["step_speedup_full_over_lora"] >= TARGETS["step_speedup_full_over_lora_min"],
            "opt_state_ratio": out["opt_state_ratio_lora_over_full"] < TARGETS["opt_state_ratio_lora_over_full_max"],
        }
    return out


def _summary(r: dict) -> dict:
    """The headline numbers of one variant (the raw per-step times stay in the full record)."""
    keys = ("params_total", "params_trainable", "opt_state_bytes", "compile_s", "step_s_median", "step_s_min",
            "peak_rss_mb", "steady_peak_rss_delta_mb", "xla_flops", "hlo_dot_ops", "background_cpus_before")
    return {k: r[k] for k in keys if k in r} | ({"error": r["error"]} if "error" in r else {})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 layers, 256 wide, block 64, few steps (< 1 min)")
    ap.add_argument("--devices", type=int, default=0,
                    help="JAX CPU devices splitting the batch: 0 = one per core, as `jaxllm lora` (default); 1 = one")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps after the first (default 2, --quick 1)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 8, --quick 4)")
    add_run_args(ap)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    name = "quick" if args.quick else "gpt2"
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    steps = args.steps if args.steps is not None else (4 if args.quick else 8)
    quiet_wait = args.quiet_wait if args.quiet_wait is not None else (0.0 if args.quick else 120.0)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    runs = {}
    for variant in VARIANTS:
        print(f"[lora_speed] {name} / {variant} ...", file=sys.stderr, flush=True)
        background = wait_for_quiet(quiet_wait)
        runs[variant] = run_worker({"model": name, "variant": variant, "devices": args.devices,
                                    "warmup": warmup, "steps": steps}, args.timeout)
        # timings taken while other processes compete for the cores are not the hardware's
        runs[variant]["background_cpus_before"] = background
        runs[variant]["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None

    cfg = gpt_config(MODELS[name])
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), cpu)
    result = {
        "summary": {"full": _summary(runs["full"]), "lora": _summary(runs["lora"]),
                    **compare(runs["full"], runs["lora"]), "targets": TARGETS},
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "load_average_at_start": load_start,
                    "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "settings": {"model_name": name, "quick": args.quick, "lora": LORA, "batch": MODELS[name]["batch"],
                     "tokens_per_step": MODELS[name]["batch"] * cfg.block_size, "warmup": warmup, "steps": steps,
                     "devices": runs["full"].get("devices", args.devices or "per core"), "optim": OPTIM,
                     "dropout": 0.0, "dtype": "float32",
                     "model": {k: v for k, v in cfg.to_dict().items() if k not in ("dtype", "param_dtype", "remat")}},
        "runs": runs,
        "notes": ["xla_flops, hlo_dot_ops and xla_temp_mb describe the compiled per-device program "
                  "(with several devices each sees batch/devices rows)",
                  "opt_state_bytes is the logical size of state.opt_state (one replica)",
                  "background_cpus_before: CPUs other processes kept busy just before the variant ran; "
                  "where it is not ~0 the step times are not the hardware's"],
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "lora_speed_quick" if args.quick else "lora_speed"  # a quick look never overwrites a full run
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
