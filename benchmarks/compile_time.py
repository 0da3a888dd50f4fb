"""Compile time of the train step with the Python layer loop against GPTConfig.scan_layers, and what
the scan costs per step.

compile: jaxllm's real train step (`make_train_step` with `lm_loss_fn` and `make_optimizer`: forward,
backward, global-norm clipping, AdamW, schedule, NaN guard) for the gpt2 (124M) and gpt2-xl (1.5B)
presets at block 1024, one sequence per step, on one device; and the loss gradient alone (no
optimizer), to tell the model's share from the update's. The state is abstract (`nnx.eval_shape`,
`jax.ShapeDtypeStruct`), so no weights are made: `jax.jit(...).trace(...)`, `.lower()` and
`.compile()` are timed apart (Python tracing, StableHLO, XLA) and summed. The loop's program holds
every layer; the scan's one block, whatever the depth. Each compile runs `--repeats` times in fresh
processes and the fastest counts.

step: on models that fit here, the same step run for real, loop and scan in one process, timed in
alternation. The scan stacks each layer's weights into one array inside the step (and slices the
gradient back per layer), a copy the loop does not make, because storage keeps per-layer state
paths; the ratio of step times (scan / loop) is its cost.

    small  6 layers, 6 heads, 384 wide, block 256, batch 8 (train_speed.py's small)
    gpt2   the gpt2 preset with block 256, batch 1

Every measurement runs in a subprocess (default XLA settings plus jaxllm's CPU speed flags, no
compilation cache, one device), after waiting for other processes to leave the CPUs. Prints JSON and
writes benchmarks/results/compile_time.json.

    python benchmarks/compile_time.py                          # ~8 minutes on 2 cores
    python benchmarks/compile_time.py --presets gpt2 --step-models small --repeats 1 --quiet-wait 0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.lora_speed import _xla_costs, run_worker as lora_run_worker  # noqa: E402
from benchmarks.train_speed import (MODELS as SPEED_MODELS, OPTIM, _batches, _rss_mb, add_run_args,  # noqa: E402
                                    gpt_config, jaxllm_step, wait_for_quiet)

PRESETS = ("gpt2", "gpt2-xl")
STEP_MODELS = {
    "small": SPEED_MODELS["small"],
    "gpt2": dict(model=dict(preset="gpt2", block_size=256), batch=1),
}
LAYOUTS = {"loop": False, "scan": True}


# --------------------------------------------------------------------------- measured in a subprocess


def measure_compile(preset: str, block: int, batch: int, scan: bool, program: str) -> dict:
    """program "step": the whole train step; "grad": the loss gradient alone (no optimizer), to
    tell the model's share of the compile time from the update's."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxllm.config import GPTConfig
    from jaxllm.model import GPT
    from jaxllm.training.optim import OptimConfig, lr_schedule, make_optimizer
    from jaxllm.training.step import abstract_train_state, lm_loss_fn, make_train_step

    cfg = GPTConfig.preset(preset, block_size=block, dropout=0.0, scan_layers=scan)
    optim = OptimConfig(**OPTIM)
    optimizer = make_optimizer(optim)
    rss0 = _rss_mb("VmRSS")
    t0 = time.perf_counter()
    graphdef, state = abstract_train_state(lambda: GPT(cfg, rngs=nnx.Rngs(0)), optimizer)
    abstract_s = time.perf_counter() - t0
    x = jax.ShapeDtypeStruct((1, batch, block), jnp.int32)   # (accum, rows, tokens)
    if program == "step":
        fn, args = make_train_step(graphdef, lm_loss_fn, optimizer, lr_schedule(optim)), (state, (x, x), jax.random.key(0))
    else:
        def loss(params, frozen, batch):
            return lm_loss_fn(nnx.merge(graphdef, params, frozen), batch, None)[0]
        rows = jax.ShapeDtypeStruct((batch, block), jnp.int32)
        fn, args = jax.jit(jax.grad(loss)), (state.trainable, state.frozen, (rows, rows))
    t0 = time.perf_counter()
    traced = fn.trace(*args)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    return {"preset": preset, "layout": "scan" if scan else "loop", "program": program, "n_layer": cfg.n_layer,
            "params": cfg.num_params(), "batch": batch, "block": block,
            "trace_s": t1 - t0, "lower_s": t2 - t1, "compile_s": t3 - t2, "total_s": t3 - t0,
            "abstract_state_s": abstract_s,
            "stablehlo_lines": lowered.as_text().count("\n"),
            **_xla_costs(compiled),
            "peak_rss_delta_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0,
            "backend": jax.default_backend(), "jax": jax.__version__}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure_step(name: str, warmup: int, steps: int) -> dict:
    """Loop and scan steps of one model in one process, timed in alternation (A B, B A, ...), so a
    load that comes and goes on a shared machine falls on both; the ratio is the median of the
    per-round ratios. Process CPU seconds per step are recorded beside wall time: they swing less
    when other processes compete for the cores."""
    import jax
    import numpy as np

    from jaxllm.training.optim import OptimConfig

    spec = STEP_MODELS[name]
    key = jax.random.key(0)
    runs = {}
    for layout, scan in LAYOUTS.items():
        cfg = gpt_config(spec).replace(scan_layers=scan)
        step, state, place = jaxllm_step(cfg, OptimConfig(**OPTIM), spec["batch"])
        batches = [place(tuple(np.asarray(a[None], np.int32) for a in b)) for b in _batches(cfg, spec["batch"], 4)]
        t0 = time.perf_counter()
        compiled = step.lower(state, batches[0], key).compile()
        compile_s = time.perf_counter() - t0
        state, metrics = compiled(state, batches[0], key)
        runs[layout] = {"compiled": compiled, "state": state, "batches": batches, "first_loss": float(metrics["loss"]),
                        "record": {"compile_s": compile_s, **_xla_costs(compiled), "step_s_all": [], "cpu_s_all": []}}

    def one(layout, i):
        run = runs[layout]
        t0, c0 = time.perf_counter(), _cpu_seconds()
        run["state"], metrics = run["compiled"](run["state"], run["batches"][i % len(run["batches"])], key)
        jax.block_until_ready(metrics["loss"])
        return time.perf_counter() - t0, _cpu_seconds() - c0

    for i in range(warmup):
        for layout in LAYOUTS:
            one(layout, 1 + i)
    for i in range(steps):
        for layout in (LAYOUTS if i % 2 == 0 else list(LAYOUTS)[::-1]):
            wall, cpu = one(layout, 1 + warmup + i)
            runs[layout]["record"]["step_s_all"].append(wall)
            runs[layout]["record"]["cpu_s_all"].append(cpu)
    out = {"model": name, "n_layer": gpt_config(spec).n_layer, "params": gpt_config(spec).num_params(),
           "batch": spec["batch"], "block": gpt_config(spec).block_size,
           "first_loss": {layout: run["first_loss"] for layout, run in runs.items()}}
    for layout, run in runs.items():
        r = run["record"]
        out[layout] = {**r, "step_s_median": statistics.median(r["step_s_all"]), "step_s_min": min(r["step_s_all"]),
                       "cpu_s_median": statistics.median(r["cpu_s_all"])}
    loop, scan = out["loop"], out["scan"]
    out["ratio_scan_over_loop_paired_median"] = statistics.median(
        s / l for s, l in zip(scan["step_s_all"], loop["step_s_all"]))
    out["ratio_scan_over_loop_best"] = scan["step_s_min"] / loop["step_s_min"]
    out["cpu_ratio_scan_over_loop_paired_median"] = statistics.median(
        s / l for s, l in zip(scan["cpu_s_all"], loop["cpu_s_all"]))
    return {**out, "devices": len(jax.devices()), "backend": jax.default_backend(), "jax": jax.__version__}


def worker(job: dict) -> dict:
    from jaxllm.parallel import setup_cpu
    setup_cpu(1)   # one device, and the XLA:CPU speed flags jaxllm's commands use
    if job["kind"] == "compile":
        return measure_compile(job["preset"], job["block"], job["batch"], job["scan"], job["program"])
    return measure_step(job["model"], job["warmup"], job["steps"])


# --------------------------------------------------------------------------- the driver


def run_worker(job: dict, timeout: float) -> dict:
    # Cold compiles with default XLA settings, in a fresh process running this file's worker.
    t0 = time.perf_counter()
    result = lora_run_worker(job, timeout, script=__file__)
    return result if "error" in result else {**result, "subprocess_s": time.perf_counter() - t0}


def _ratio(a: dict, b: dict, key: str):
    return a[key] / b[key] if key in a and key in b and b[key] else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default=",".join(PRESETS), help="presets whose train step is compiled")
    ap.add_argument("--block", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1, help="sequences per step in the compiled program")
    ap.add_argument("--step-models", default=",".join(STEP_MODELS),
                    help=f"models timed step by step, a subset of {list(STEP_MODELS)} (empty: none)")
    ap.add_argument("--repeats", type=int, default=2, help="fresh-process measurements of each compile (fastest kept)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    ap.add_argument("--steps", type=int, default=8, help="timed steps")
    add_run_args(ap)
    ap.set_defaults(timeout=1800.0)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    quiet_wait = 120.0 if args.quiet_wait is None else args.quiet_wait
    start, load_start = time.perf_counter(), os.getloadavg() if hasattr(os, "getloadavg") else None
    # each compile is measured `repeats` times in fresh processes, loop and scan in turn: the fastest
    # of them is the one least disturbed by other processes on a shared machine
    jobs = [{"kind": "compile", "program": program, "preset": p, "block": args.block, "batch": args.batch, "scan": scan}
            for _ in range(args.repeats) for p in filter(None, args.presets.split(","))
            for program in ("step", "grad") for scan in LAYOUTS.values()]
    jobs += [{"kind": "step", "model": m, "warmup": args.warmup, "steps": args.steps}
             for m in filter(None, args.step_models.split(","))]
    results = []
    for job in jobs:
        label = (f"{job['preset']} {job['program']} / {'scan' if job['scan'] else 'loop'}" if job["kind"] == "compile"
                 else f"{job['model']} loop and scan")
        print(f"[compile_time] {job['kind']} {label} ...", file=sys.stderr, flush=True)
        background = wait_for_quiet(quiet_wait)
        r = run_worker(job, args.timeout)
        # timings taken while other processes compete for the cores are not the hardware's
        r.update(kind=job["kind"], background_cpus_before=background,
                 load_average_after=os.getloadavg() if hasattr(os, "getloadavg") else None)
        if job["kind"] == "compile":
            r.update(layout="scan" if job["scan"] else "loop", preset=job["preset"], program=job["program"])
        else:
            r.setdefault("model", job["model"])
        print(json.dumps({k: v for k, v in r.items() if k not in ("loop", "scan")}), file=sys.stderr, flush=True)
        results.append(r)

    def fastest(preset, program, layout):
        runs = [r for r in results if r["kind"] == "compile" and r["preset"] == preset
                and r["program"] == program and r["layout"] == layout and "total_s" in r]
        return min(runs, key=lambda r: r["total_s"]) if runs else {}

    def samples(preset, program, layout):
        return [round(r["total_s"], 2) for r in results if r["kind"] == "compile" and r["preset"] == preset
                and r["program"] == program and r["layout"] == layout and "total_s" in r]

    compile_summary = {}
    for p in dict.fromkeys(r["preset"] for r in results if r["kind"] == "compile"):
        loop, scan = fastest(p, "step", "loop"), fastest(p, "step", "scan")
        loop_grad, scan_grad = fastest(p, "grad", "loop"), fastest(p, "grad", "scan")
        compile_summary[p] = {
            "loop_total_s": loop.get("total_s"), "scan_total_s": scan.get("total_s"),
            "speedup_loop_over_scan": _ratio(loop, scan, "total_s"),
            "loop_trace_s": loop.get("trace_s"), "scan_trace_s": scan.get("trace_s"),
            "loop_xla_compile_s": loop.get("compile_s"), "scan_xla_compile_s": scan.get("compile_s"),
            "grad_only_loop_total_s": loop_grad.get("total_s"), "grad_only_scan_total_s": scan_grad.get("total_s"),
            "samples_total_s": {f"{program} {layout}": samples(p, program, layout)
                                for program in ("step", "grad") for layout in LAYOUTS},
            "loop_hlo_dot_ops": loop.get("hlo_dot_ops"), "scan_hlo_dot_ops": scan.get("hlo_dot_ops"),
            "loop_xla_temp_mb": loop.get("xla_temp_mb"), "scan_xla_temp_mb": scan.get("xla_temp_mb")}
    step_summary = {}
    for r in results:
        if r["kind"] != "step" or "loop" not in r:
            continue
        step_summary[r["model"]] = {
            "loop_step_s_median": r["loop"]["step_s_median"], "scan_step_s_median": r["scan"]["step_s_median"],
            "ratio_scan_over_loop_paired_median": r["ratio_scan_over_loop_paired_median"],
            "ratio_scan_over_loop_best": r["ratio_scan_over_loop_best"],
            "cpu_ratio_scan_over_loop_paired_median": r["cpu_ratio_scan_over_loop_paired_median"],
            "first_loss": r["first_loss"],
            "loop_compile_s": r["loop"]["compile_s"], "scan_compile_s": r["scan"]["compile_s"],
            "loop_xla_temp_mb": r["loop"].get("xla_temp_mb"), "scan_xla_temp_mb": r["scan"].get("xla_temp_mb")}
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), cpu)
    result = {
        "compile": compile_summary,
        "step": step_summary,
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "load_average_at_start": load_start,
                    "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "settings": {"block": args.block, "batch": args.batch, "repeats": args.repeats,
                     "warmup": args.warmup, "steps": args.steps,
                     "optim": OPTIM, "dropout": 0.0, "dtype": "float32", "devices": 1,
                     "step_models": {m: STEP_MODELS[m] for m in step_summary}},
        "runs": results,
        "runtime_s": time.perf_counter() - start,
        "notes": ["compile total_s = trace + lower + XLA compile of the whole train step from abstract "
                  "state; abstract_state_s (eval_shape of the model and optimizer) is not in it",
                  "grad_only: the same for the loss gradient alone (forward + backward, no optimizer "
                  "update, clipping or NaN guard)",
                  "hlo_dot_ops and xla_flops count the compiled program's text: a scan's body is counted "
                  "once, not once per layer",
                  "background_cpus_before: CPUs other processes kept busy just before a measurement; "
                  "where it is not ~0 the times are not the hardware's"],
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compile_time.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
