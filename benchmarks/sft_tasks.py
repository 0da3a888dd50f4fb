"""SFT on the synthetic tasks from scratch on CPU: held-out exact match per task, wall time, and
training throughput with packing on and off, all in one run.

    python benchmarks/sft_tasks.py            # the default `jaxllm sft` run + a packing-off throughput run
    python benchmarks/sft_tasks.py --quick    # a few hundred steps: a smoke check, not the targets

Targets (issue: instruction tuning): >= 95% exact match on word reversal and >= 90% on addition of
numbers up to 3 digits, held out, within 15 minutes on 2 cores. Throughput is reported as row
tokens/s (what the step computes) and real tokens/s (row tokens that are not padding): packing
exists to raise the second.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

TARGETS = {"reverse": 0.95, "add": 0.90, "minutes": 15.0}


def _run(overrides):
    from jaxllm.alignment.sft import SFTConfig, run_sft
    from jaxllm.configfile import load_config

    config = load_config(SFTConfig, None, overrides)
    t0 = time.perf_counter()
    result = run_sft(config)
    wall = time.perf_counter() - t0
    tr, loop = result.train, config.train
    steps = loop.max_iters - 1  # the first step holds the compilation
    row_tokens = loop.batch_size * loop.grad_accum * result.config.block_size
    seconds = tr.train_seconds - tr.compile_seconds
    return result, {
        "wall_seconds": wall, "train_seconds": tr.train_seconds, "compile_seconds": tr.compile_seconds,
        "eval_seconds": tr.eval_seconds, "steps": loop.max_iters, "row_fill": result.rows_fill,
        "row_tokens_per_s": steps * row_tokens / seconds,
        "real_tokens_per_s": steps * row_tokens * result.rows_fill / seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="300 steps: checks the script, not the targets")
    ap.add_argument("--throughput-steps", type=int, default=100, help="steps of the packing-off run")
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    args = ap.parse_args()

    from jaxllm import parallel
    parallel.setup_cpu()  # as `jaxllm sft` does

    work = Path(tempfile.mkdtemp(prefix="sft_bench_"))
    common = ["train.progress=false", "train.tensorboard=false"]
    main_run = common + [f"train.out_dir={work}/packed"]
    if args.quick:
        main_run += ["train.max_iters=300", "optim.lr_decay_iters=300", "train.eval_interval=0"]
    load = os.getloadavg()
    result, packed = _run(main_run)
    after = result.after
    per_task = {k.split("/", 1)[1]: v for k, v in after.items() if k.startswith("exact_match/")}
    before = {k.split("/", 1)[1]: v for k, v in result.before.items() if k.startswith("exact_match/")}
    _, unpacked = _run(common + [f"train.out_dir={work}/unpacked", "data.packing=false",
                                 f"train.max_iters={args.throughput_steps}", "train.eval_interval=0",
                                 "eval.examples=0", "data.n_train=2000"])
    minutes = packed["wall_seconds"] / 60
    report = {
        "benchmark": "sft_tasks" + ("_quick" if args.quick else ""),
        "exact_match_after": per_task, "exact_match_before": before,
        "exact_match_all": after.get("exact_match"), "val_loss": after.get("val_loss"),
        "minutes": minutes, "packed": packed, "unpacked": unpacked,
        "real_tokens_speedup_packing": packed["real_tokens_per_s"] / unpacked["real_tokens_per_s"],
        "targets": TARGETS,
        "pass": {"reverse": per_task.get("reverse", 0) >= TARGETS["reverse"],
                 "add": per_task.get("add", 0) >= TARGETS["add"], "minutes": minutes <= TARGETS["minutes"]},
        "loadavg_start": load, "loadavg_end": os.getloadavg(), "cpus": os.cpu_count(),
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{report['benchmark']}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
