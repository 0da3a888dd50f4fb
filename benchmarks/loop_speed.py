"""The training loop's own cost, before and after a change, on nanoGPT's CPU Shakespeare recipe.

Runs `run_pretrain` with the recipe's model and optimizer (4 layers, 128 wide, block 64, batch 12)
for --iters steps with evaluation and checkpoints at fixed intervals, alternating between this
checkout's jaxllm and the one at --before (a git worktree made here), each in its own process,
--repeats times each. Reports steps/s of the steps alone (compile excluded) and of the whole loop
(eval and checkpoints included), the median of each, and their ratio after/before.

    python benchmarks/loop_speed.py                      # before = the commit issue 13 started from
    python benchmarks/loop_speed.py --iters 200 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
BEFORE = "72e89e9"  # the loop that read every step's metrics and wrote checkpoints synchronously

# One measurement, run in a fresh process with the jaxllm under test first on sys.path.
DRIVER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from jaxllm.parallel import setup_cpu
setup_cpu()                                   # as `jaxllm pretrain` does (both versions have it)
from jaxllm.configfile import load_config
try:
    from jaxllm.stages.pretrain import PretrainConfig, run_pretrain      # after the layering change
except ImportError:
    from jaxllm.training.pretrain import PretrainConfig, run_pretrain    # before it
overrides = json.loads(sys.argv[2])
t0 = time.perf_counter()
result = run_pretrain(load_config(PretrainConfig, None, overrides))
wall = time.perf_counter() - t0
t = result.train
steps = len(t.losses)
print("RESULT " + json.dumps({
    "steps": steps, "compile_s": t.compile_seconds, "train_s": t.train_seconds, "eval_s": t.eval_seconds,
    "checkpoint_s": t.checkpoint_seconds, "run_wall_s": wall, "val_loss": result.val_loss,
    "step_per_s": (steps - 1) / max(t.train_seconds - t.compile_seconds, 1e-9),
    "loop_step_per_s": (steps - 1) / max(t.train_seconds + t.eval_seconds + t.checkpoint_seconds
                                          - t.compile_seconds, 1e-9)}))
"""


def measure(jaxllm_root: pathlib.Path, overrides: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(jaxllm_root), json.dumps(overrides)],
                          capture_output=True, text=True, cwd=jaxllm_root,
                          env={**os.environ, "PYTHONPATH": str(jaxllm_root)})
    if proc.returncode != 0:
        raise RuntimeError(f"run under {jaxllm_root} failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", default=BEFORE, help="git commit of the loop to compare against")
    p.add_argument("--iters", type=int, default=500)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(HERE / "results" / "loop_speed.json"))
    args = p.parse_args()

    sys.path.insert(0, str(REPO))
    from jaxllm.data import prepare

    with tempfile.TemporaryDirectory(prefix="jaxllm-loop-speed-") as tmp:
        tmp = pathlib.Path(tmp)
        data = prepare("shakespeare", tmp / "data", tokenizer="char")
        before_root = tmp / "before"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(before_root), args.before],
                       check=True)
        try:
            runs = {"before": [], "after": []}
            for i in range(args.repeats):
                for label, root in (("before", before_root), ("after", REPO)):
                    overrides = [
                        f"data.dataset_dir={data}", "data.eval_batches=20", f"train.out_dir={tmp / label / str(i)}",
                        f"train.max_iters={args.iters}", "train.eval_interval=250", "train.ckpt_interval=100",
                        "train.log_interval=10", "train.progress=false", "train.tensorboard=true",
                        "train.peak_flops=1e11", "sample.max_new_tokens=0"]
                    r = measure(root, overrides)
                    runs[label].append(r)
                    print(f"{label} #{i}: {r['step_per_s']:.2f} steps/s (steps), "
                          f"{r['loop_step_per_s']:.2f} (whole loop), val {r['val_loss']:.4f}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(before_root)], check=False)

    def med(label, key):
        return statistics.median(r[key] for r in runs[label])

    out = {
        "benchmark": "loop_speed", "date": time.strftime("%Y-%m-%d"), "cpu": _cpu_name(),
        "recipe": "nanoGPT CPU Shakespeare: 4L/4H/128, block 64, batch 12; eval every 250 (20 batches of 64), "
                  "checkpoint every 100, log every 10",
        "iters": args.iters, "repeats": args.repeats, "before_commit": args.before,
        "before": {"step_per_s": med("before", "step_per_s"), "loop_step_per_s": med("before", "loop_step_per_s"),
                   "checkpoint_s": med("before", "checkpoint_s")},
        "after": {"step_per_s": med("after", "step_per_s"), "loop_step_per_s": med("after", "loop_step_per_s"),
                  "checkpoint_s": med("after", "checkpoint_s")},
        "runs": runs,
    }
    out["ratio_steps"] = out["after"]["step_per_s"] / out["before"]["step_per_s"]
    out["ratio_loop"] = out["after"]["loop_step_per_s"] / out["before"]["loop_step_per_s"]
    pathlib.Path(args.out).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=2))


def _cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
