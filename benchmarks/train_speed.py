"""Training speed: jaxllm's full train step against PyTorch eager and torch.compile, same model.

Measures tokens/s (median of timed steps after warmup), MFU against the XLA fp32 matmul peak
measured in the same run, compile time and peak memory (RSS growth of the measuring process) for

    small  6 layers, 6 heads, 384 wide, block 256, batch 8, vocab 65 (nanoGPT's shakespeare-char)
    gpt2   the gpt2 preset (124M) with block 128, batch 4

Every (framework, model) pair runs in its own subprocess, so memory and thread pools never mix.
Both sides do the whole update: forward, backward, global-norm clipping, AdamW with weight decay on
matrices and embeddings, learning-rate schedule. Dropout is 0 on both (we time compute, not RNG).
Prints JSON and writes benchmarks/results/train_speed.{json,md} (--quick: train_speed_quick.*).

    python benchmarks/train_speed.py            # both models, torch eager and torch.compile
    python benchmarks/train_speed.py --quick    # small model, eager only, few steps (< 1 min)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

TORCH_THREADS = 2
MODELS = {
    "small": dict(model=dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65, bias=False),
                  batch=8),
    "gpt2": dict(model=dict(preset="gpt2", block_size=128), batch=4),
}
OPTIM = dict(learning_rate=6e-4, min_lr=6e-5, warmup_iters=2, lr_decay_iters=100, beta1=0.9, beta2=0.95,
             weight_decay=0.1, grad_clip=1.0)
TARGETS = {"speedup_vs_torch_eager": 2.5, "mfu_of_matmul_peak": 0.6}  # the issue's, set on another machine


# --------------------------------------------------------------------------- measured in a subprocess


def _rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak so far) of this process in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak only, off Linux


def gpt_config(spec: dict):
    from jaxllm.config import GPTConfig

    model = dict(spec["model"], dropout=0.0)
    preset = model.pop("preset", None)
    return GPTConfig.preset(preset, **model) if preset else GPTConfig(**model)


def jaxllm_step(cfg, optim, batch_size: int, seed: int = 0):
    """(step, state, place): the train step jaxllm's loop runs (AdamW, clipping, schedule, NaN
    guard), data-parallel over the devices that split the batch as the loop chooses, and the function
    that places a batch for it."""
    from flax import nnx

    from jaxllm.model import GPT, count_params
    from jaxllm.training.optim import make_optimizer
    from jaxllm.training.step import init_train_state

    optimizer = make_optimizer(optim)
    model = GPT(cfg, rngs=nnx.Rngs(seed))
    graphdef, state = init_train_state(model, optimizer)
    return placed_step(graphdef, state, optimizer, optim, batch_size, trainable_params=count_params(model))


def placed_step(graphdef, state, optimizer, optim, batch_size: int, devices: int = 0, trainable_params=None):
    """(step, state, place) for a train state: on the mesh `parallel.data_mesh` picks (state
    replicated, batch rows split) or on one device."""
    import jax

    from jaxllm import parallel
    from jaxllm.training.optim import lr_schedule
    from jaxllm.training.step import lm_loss_fn, make_train_step

    mesh = parallel.data_mesh(batch_size, devices, trainable_params=trainable_params)
    if mesh is None:
        return make_train_step(graphdef, lm_loss_fn, optimizer, lr_schedule(optim)), state, jax.device_put
    state = jax.device_put(state, parallel.replicated(mesh))
    step = make_train_step(graphdef, lm_loss_fn, optimizer, lr_schedule(optim), mesh)
    return step, state, lambda batch: parallel.shard_batch(batch, mesh, 1)


def compile_and_time(step, state, batches, warmup: int, steps: int, rss0: float):
    """(timing, compiled): the step compiled ahead of time (so compile is timed alone), then
    timed over `batches` as `_time_steps` does, the state threaded through (donated)."""
    import jax

    key = jax.random.key(0)
    t0 = time.perf_counter()
    compiled = step.lower(state, batches[0], key).compile()
    compile_s = time.perf_counter() - t0
    holder = {"state": state}
    del state

    def run(batch):
        holder["state"], metrics = compiled(holder["state"], batch, key)
        jax.block_until_ready(metrics["loss"])

    timing = _time_steps(run, batches, warmup, steps, rss0)
    timing["compile_s"] = compile_s
    return timing, compiled


def _batches(cfg, batch: int, n: int):
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (n, batch, cfg.block_size + 1), dtype=np.int64)
    return [(np.ascontiguousarray(b[:, :-1]), np.ascontiguousarray(b[:, 1:])) for b in ids]


def _reset_peak_rss() -> bool:
    """Restart VmHWM from the current RSS (Linux >= 4.0), so the steady-state peak excludes compilation."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _time_steps(run_step, batches, warmup: int, steps: int, rss0: float) -> dict:
    t0 = time.perf_counter()
    run_step(batches[0])
    first = time.perf_counter() - t0
    peak_with_compile = _rss_mb("VmHWM") - rss0
    steady = _reset_peak_rss()
    for i in range(warmup):
        run_step(batches[(1 + i) % len(batches)])
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        run_step(batches[(1 + warmup + i) % len(batches)])
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"first_step_s": first,
            # the first call compiles (jit / inductor): what it costs beyond a normal step
            "compile_s": max(first - median, 0.0), "step_s_median": median, "step_s_min": min(times),
            "step_s_all": times,
            "peak_rss_delta_mb": max(peak_with_compile, _rss_mb("VmHWM") - rss0),
            # peak RSS over the timed steps alone, above the RSS before the model was built
            "steady_peak_rss_delta_mb": _rss_mb("VmHWM") - rss0 if steady else None}


def measure_jaxllm(spec: dict, warmup: int, steps: int) -> dict:
    import jax
    import numpy as np

    from jaxllm.training.optim import OptimConfig
    from jaxllm.training.perf import measure_matmul_peak

    cfg = gpt_config(spec)
    rss0 = _rss_mb("VmRSS")
    step, state, place = jaxllm_step(cfg, OptimConfig(**OPTIM), spec["batch"])
    batches = [place(tuple(np.asarray(a[None], np.int32) for a in b)) for b in _batches(cfg, spec["batch"], 4)]
    result, compiled = compile_and_time(step, state, batches, warmup, steps, rss0)
    mem = compiled.memory_analysis()
    if mem is not None:
        result["xla_temp_mb"] = mem.temp_size_in_bytes / 2 ** 20
        result["xla_argument_mb"] = mem.argument_size_in_bytes / 2 ** 20
    # the peak again, right after the steps and under the same load from other processes
    result["matmul_peak_flops"] = measure_matmul_peak.__wrapped__(1024, "float32", 1.0)
    return {**result, "version": jax.__version__, "backend": jax.default_backend()}


def measure_torch(spec: dict, warmup: int, steps: int, compiled: bool) -> dict:
    import torch

    from benchmarks.torch_gpt import TorchGPT, TorchGPTConfig
    from benchmarks.torch_reference import nanogpt_lr

    torch.set_num_threads(TORCH_THREADS)
    torch.manual_seed(0)
    c = gpt_config(spec)
    rss0 = _rss_mb("VmRSS")
    model = TorchGPT(TorchGPTConfig(vocab_size=c.vocab_size, block_size=c.block_size, n_layer=c.n_layer,
                                    n_head=c.n_head, n_embd=c.n_embd, dropout=0.0, bias=c.bias,
                                    layer_norm_eps=c.layer_norm_eps)).train()
    opt = model.configure_optimizer(OPTIM["weight_decay"], OPTIM["learning_rate"], (OPTIM["beta1"], OPTIM["beta2"]))
    forward = torch.compile(model) if compiled else model
    batches = [tuple(torch.from_numpy(a) for a in b) for b in _batches(c, spec["batch"], 4)]
    it = {"n": 0}

    def run(batch):
        for group in opt.param_groups:
            group["lr"] = nanogpt_lr(it["n"], OPTIM)
        _, loss = forward(*batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        it["n"] += 1

    try:
        result = _time_steps(run, batches, warmup, steps, rss0)
    except Exception as e:  # inductor needs a working C++ toolchain; record why it could not run
        if not compiled:
            raise
        return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500],
                "version": torch.__version__}
    a = torch.randn(1024, 1024)
    t0, reps = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.5:
        a @ a
        reps += 1
    return {**result, "version": torch.__version__,
            "threads": torch.get_num_threads(),
            "sgemm_1024_gflops": 2 * 1024 ** 3 * reps / (time.perf_counter() - t0) / 1e9}


def worker(job: dict) -> dict:
    spec, kind = MODELS[job["model"]], job["framework"]
    if kind == "jaxllm":
        from jaxllm.parallel import setup_cpu
        setup_cpu()  # one device per core, as `jaxllm pretrain` does
        return measure_jaxllm(spec, job["warmup"], job["steps"])
    return measure_torch(spec, job["warmup"], job["steps"], compiled=kind == "torch_compile")


# --------------------------------------------------------------------------- the driver


def busy_cpus(seconds: float = 1.0) -> float | None:
    """How many CPUs other processes keep busy (we only sleep meanwhile), from /proc/stat."""
    def snapshot():
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # total, idle + iowait
    try:
        total0, idle0 = snapshot()
        time.sleep(seconds)
        total1, idle1 = snapshot()
    except (OSError, ValueError, IndexError):
        return None
    return (1.0 - (idle1 - idle0) / max(total1 - total0, 1)) * (os.cpu_count() or 1)


def wait_for_quiet(max_wait: float, threshold: float = 0.3) -> float | None:
    """Wait (up to max_wait s) until other processes use under `threshold` CPUs; the load last seen."""
    start = time.perf_counter()
    while True:
        load = busy_cpus()
        if load is None or load < threshold or time.perf_counter() - start >= max_wait:
            return load


def run_job(job: dict, timeout: float) -> dict:
    # Default XLA optimisation, and cold compiles on both sides: no XLA cache, a fresh inductor cache
    # (inductor's on-disk cache would otherwise turn a second run's compile into a lookup).
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
    cache = tempfile.mkdtemp(prefix="train-speed-inductor-")
    env["TORCHINDUCTOR_CACHE_DIR"] = cache
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True,
                              text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"worker exited {proc.returncode}: {tail}"[:500]}
    return json.loads(lines[-1])


def summarise(name: str, spec: dict, runs: dict, peak_flops: float) -> dict:
    cfg = gpt_config(spec)
    tokens = spec["batch"] * cfg.block_size
    fpt = cfg.flops_per_token(cfg.block_size)
    out = {"model": {k: v for k, v in cfg.to_dict().items() if k not in ("dtype", "param_dtype", "remat")},
           "params": cfg.num_params(), "batch": spec["batch"], "tokens_per_step": tokens,
           "flops_per_token": fpt}
    for fw, r in runs.items():
        if "step_s_median" in r:
            tps, best = tokens / r["step_s_median"], tokens / r["step_s_min"]
            r = {**r, "tokens_per_s": tps, "tokens_per_s_best": best, "achieved_gflops": fpt * tps / 1e9,
                 "mfu_of_matmul_peak": fpt * tps / peak_flops, "mfu_of_matmul_peak_best": fpt * best / peak_flops}
        out[fw] = r
    for fw in ("torch_eager", "torch_compile"):
        if "tokens_per_s" in out.get("jaxllm", {}) and "tokens_per_s" in out.get(fw, {}):
            out[f"speedup_vs_{fw}"] = out["jaxllm"]["tokens_per_s"] / out[fw]["tokens_per_s"]
            out[f"speedup_vs_{fw}_best"] = out["jaxllm"]["tokens_per_s_best"] / out[fw]["tokens_per_s_best"]
    return out


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Training speed (`python benchmarks/train_speed.py{' --quick' if result['settings']['quick'] else ''}`)", "",
             f"{m['cpu']}, {m['cores']} cores; XLA fp32 matmul peak measured in the run: "
             f"{m['xla_matmul_peak_gflops']:.0f} GFLOP/s (best of {len(m['xla_matmul_peak_samples_gflops'])} samples). jax {m['jax']}, torch {m['torch']} "
             f"({TORCH_THREADS} threads). Median of {result['settings']['steps']} timed steps after "
             f"{result['settings']['warmup']} warmup; MFU against the measured peak.", "",
             "| model | framework | tokens/s median (best) | ms/step median (best) | MFU median (best) | compile s "
             "| peak RSS +MB | other load (CPUs) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, c in result["configs"].items():
        for fw in ("jaxllm", "torch_eager", "torch_compile"):
            r = c.get(fw)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {name} | {fw} | — | — | — | — | {r['error'][:80]} | |")
                continue
            lines.append(f"| {name} | {fw} | {r['tokens_per_s']:,.0f} ({r['tokens_per_s_best']:,.0f}) | "
                         f"{1000 * r['step_s_median']:,.0f} ({1000 * r['step_s_min']:,.0f}) | "
                         f"{100 * r['mfu_of_matmul_peak']:.0f}% ({100 * r['mfu_of_matmul_peak_best']:.0f}%) | "
                         f"{r['compile_s']:.1f} | {r['peak_rss_delta_mb']:,.0f} | {_fmt(r.get('background_cpus_before'))} |")
    lines.append("")
    for name, c in result["configs"].items():
        ratios = ", ".join(f"{fw} {c[f'speedup_vs_{fw}']:.2f}x (best {c[f'speedup_vs_{fw}_best']:.2f}x)"
                           for fw in ("torch_eager", "torch_compile") if f"speedup_vs_{fw}" in c)
        if ratios:
            lines.append(f"- {name}: jaxllm tokens/s vs {ratios}")
    load = m.get("load_average_at_end")
    lines += ["", f"Load average at the end of the run: {', '.join(f'{x:.1f}' for x in load) if load else 'n/a'} "
              f"on {m['cores']} cores. 'Other load' is how many CPUs other processes kept busy just before "
              "each measurement; where it is not ~0, steps swing by several x and MFU can exceed 100% "
              "(the peak was measured under contention too). 'best' is the fastest timed step."]
    return "\n".join(lines) + "\n"


def add_run_args(ap: argparse.ArgumentParser) -> None:
    """The options every subprocess-per-measurement benchmark here shares."""
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per measurement")
    ap.add_argument("--quiet-wait", type=float, default=None,
                    help="seconds to wait for other processes to leave the CPUs before each measurement "
                         "(default 120, --quick 0)")
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small model, torch eager only, few steps")
    ap.add_argument("--models", default=None, help=f"comma-separated subset of {list(MODELS)}")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    add_run_args(ap)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    import jax
    import torch

    from jaxllm.training.perf import measure_matmul_peak

    models = args.models.split(",") if args.models else (["small"] if args.quick else list(MODELS))
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 2)  # + the untimed first step
    steps = args.steps if args.steps is not None else (2 if args.quick else 8)
    if args.quiet_wait is None:
        args.quiet_wait = 0.0 if args.quick else 120.0
    frameworks = ["jaxllm", "torch_eager"] + ([] if args.quick or args.no_compile else ["torch_compile"])
    peaks = [measure_matmul_peak.__wrapped__(1024, "float32", 0.5 if args.quick else 1.0)]
    runs = {}
    for name in models:
        runs[name] = {}
        for fw in frameworks:
            print(f"[train_speed] {name} / {fw} ...", file=sys.stderr, flush=True)
            background = wait_for_quiet(args.quiet_wait)
            runs[name][fw] = run_job({"model": name, "framework": fw, "warmup": warmup, "steps": steps}, args.timeout)
            # timings taken while other processes compete for the cores are not the hardware's
            runs[name][fw]["background_cpus_before"] = background
            peaks.append(runs[name][fw].get("matmul_peak_flops", 0.0))
    # Other processes share this machine: the best of the peaks taken before, between and after the
    # runs is the closest to what the hardware can do, and so the fairest MFU denominator.
    peak = max(peaks)
    configs = {name: summarise(name, MODELS[name], r, peak) for name, r in runs.items()}
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    result = {
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "jax": jax.__version__, "torch": torch.__version__,
                    "xla_matmul_peak_gflops": peak / 1e9,
                    "xla_matmul_peak_samples_gflops": [p / 1e9 for p in peaks if p],
                    "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "settings": {"quick": args.quick, "warmup": warmup, "steps": steps, "torch_threads": TORCH_THREADS,
                     "optim": OPTIM, "dropout": 0.0, "dtype": "float32"},
        "configs": configs,
        "targets": TARGETS,
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "train_speed_quick" if args.quick else "train_speed"  # a quick look never overwrites a full run
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
