"""nanoGPT's CPU recipe for character-level Shakespeare: jaxllm against the PyTorch reference.

Both train the same model (4 layers, 4 heads, 128 wide, block 64, batch 12, no bias, dropout 0,
AdamW lr 1e-3 with 100 warmup steps and cosine decay to 1e-4, beta2 0.99, wd 0.1, clip 1.0) on the
same token ids, in the same run, one after the other, and both report the loss on the full val
split in non-overlapping 64-token windows. Prints JSON and writes benchmarks/results/.

    python benchmarks/shakespeare_char.py            # the full 2000-iteration recipe
    python benchmarks/shakespeare_char.py --iters 200 # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.torch_reference import NANOGPT_CPU_RECIPE, run_torch_reference  # noqa: E402
from jaxllm.configfile import load_config  # noqa: E402
from jaxllm.parallel import setup_cpu  # noqa: E402
from jaxllm.data import TokenDataset, prepare  # noqa: E402
from jaxllm.training.perf import measure_matmul_peak  # noqa: E402
from jaxllm.stages.pretrain import PretrainConfig, run_pretrain  # noqa: E402

VAL_LOSS_TARGET = 1.90      # the PyTorch reference reaches 1.898
WALL_RATIO_TARGET = 0.7     # jaxllm wall time / PyTorch wall time


def run_jaxllm(dataset_dir: str, recipe: dict, seed: int, progress: bool) -> dict:
    r = recipe
    with tempfile.TemporaryDirectory() as out_dir:
        config = load_config(PretrainConfig, None, [
            "model.preset=cpu-small", f"model.n_layer={r['n_layer']}", f"model.n_head={r['n_head']}",
            f"model.n_embd={r['n_embd']}", f"model.block_size={r['block_size']}",
            f"model.bias={r['bias']}", f"model.dropout={r['dropout']}", f"model.activation={r['activation']}",
            f"data.dataset_dir={dataset_dir}", "data.eval_batch_size=256",
            f"optim.learning_rate={r['learning_rate']}", f"optim.min_lr={r['min_lr']}",
            f"optim.warmup_iters={r['warmup_iters']}", f"optim.lr_decay_iters={r['lr_decay_iters']}",
            f"optim.beta1={r['beta1']}", f"optim.beta2={r['beta2']}",
            f"optim.weight_decay={r['weight_decay']}", f"optim.grad_clip={r['grad_clip']}",
            f"train.out_dir={out_dir}", f"train.batch_size={r['batch_size']}",
            f"train.max_iters={r['max_iters']}", "train.eval_interval=0", "train.ckpt_interval=0",
            "train.log_interval=50", f"train.seed={seed}", f"train.progress={progress}",
            "train.tensorboard=false", "sample.max_new_tokens=0"])
        result = run_pretrain(config)
    t = result.train
    iters = r["max_iters"]
    losses = [t.losses[s] for s in sorted(t.losses)]
    return {
        "val_loss": result.val_loss,
        "train_wall_s": t.train_seconds,
        "compile_s": t.compile_seconds,
        "ms_per_iter": 1000.0 * t.train_seconds / iters,
        "ms_per_iter_after_compile": 1000.0 * (t.train_seconds - t.compile_seconds) / max(iters - 1, 1),
        "train_loss_last": sum(losses[-50:]) / len(losses[-50:]),
        "losses": losses[::10],
        "flops_per_iter": result.config.flops_per_token() * r["batch_size"] * r["block_size"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=NANOGPT_CPU_RECIPE["max_iters"])
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--activation", default=NANOGPT_CPU_RECIPE["activation"], choices=("gelu", "gelu_tanh"),
                    help="MLP GELU of both runs: nanoGPT's exact erf form (default) or GPT-2's tanh form")
    ap.add_argument("--skip-torch", action="store_true", help="only run jaxllm")
    ap.add_argument("--dataset-dir", default="data_cache/shakespeare-char")
    ap.add_argument("--out", default=str(HERE / "results" / "shakespeare_char.json"))
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    setup_cpu()  # one JAX device per core, as `jaxllm pretrain` does

    recipe = dict(NANOGPT_CPU_RECIPE, activation=args.activation, max_iters=args.iters, lr_decay_iters=args.iters,
                  warmup_iters=min(NANOGPT_CPU_RECIPE["warmup_iters"], args.iters // 2))
    if not (pathlib.Path(args.dataset_dir) / "meta.json").is_file():
        prepare("shakespeare", args.dataset_dir, tokenizer="char")
    ds = TokenDataset(args.dataset_dir)

    report = {"benchmark": "shakespeare_char_cpu", "recipe": recipe, "cpu_count": os.cpu_count()}
    report["matmul_peak_gflops"] = measure_matmul_peak() / 1e9
    if not args.skip_torch:
        torch_result = run_torch_reference(ds.train, ds.val, ds.vocab_size, recipe, seed=args.seed,
                                           progress=not args.no_progress)
        torch_result.pop("losses")
        report["torch"] = torch_result
    jax_result = run_jaxllm(str(ds.path), recipe, args.seed, progress=not args.no_progress)
    jax_result.pop("losses")
    jx = report["jaxllm"] = jax_result
    jx["achieved_gflops_after_compile"] = jx["flops_per_iter"] / jx["ms_per_iter_after_compile"] / 1e6
    jx["fraction_of_matmul_peak"] = jx["achieved_gflops_after_compile"] / report["matmul_peak_gflops"]
    report["val_loss_target"] = VAL_LOSS_TARGET
    report["val_loss_ok"] = jx["val_loss"] <= VAL_LOSS_TARGET if args.iters == 2000 else None
    if "torch" in report:
        report["wall_ratio_jax_over_torch"] = jx["train_wall_s"] / report["torch"]["train_wall_s"]
        report["wall_ratio_target"] = WALL_RATIO_TARGET
        report["speedup_vs_torch"] = report["torch"]["train_wall_s"] / jx["train_wall_s"]
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
