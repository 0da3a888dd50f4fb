"""PyTorch reference run of nanoGPT's CPU recipe for char-level tiny Shakespeare.

The recipe (nanoGPT README, "I only have a macbook"): config/train_shakespeare_char.py with
--device=cpu --compile=False --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
--max_iters=2000 --lr_decay_iters=2000 --dropout=0.0. Eager fp32, no gradient accumulation.

Usage: python benchmarks/torch_reference.py [--iters N] [--threads N] [--losses]
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.torch_gpt import TorchGPT, TorchGPTConfig

NANOGPT_CPU_RECIPE = dict(
    n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, bias=False, dropout=0.0,
    activation="gelu",  # nanoGPT's MLP uses nn.GELU(), the exact erf form (GPT-2's is "gelu_tanh")
    max_iters=2000, learning_rate=1e-3, warmup_iters=100, lr_decay_iters=2000, min_lr=1e-4,
    beta1=0.9, beta2=0.99, weight_decay=0.1, grad_clip=1.0,
)


def nanogpt_lr(it, r):
    """nanoGPT's get_lr: linear warmup, cosine decay to min_lr, then flat."""
    if it < r["warmup_iters"]:
        return r["learning_rate"] * (it + 1) / (r["warmup_iters"] + 1)
    if it > r["lr_decay_iters"]:
        return r["min_lr"]
    ratio = (it - r["warmup_iters"]) / (r["lr_decay_iters"] - r["warmup_iters"])
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return r["min_lr"] + coeff * (r["learning_rate"] - r["min_lr"])


@torch.no_grad()
def full_split_loss(model, ids: np.ndarray, block_size: int, batch_windows: int = 256) -> float:
    """Mean next-token loss over every full non-overlapping block_size window of `ids`."""
    data = torch.from_numpy(ids.astype(np.int64))
    n_windows = (len(data) - 1) // block_size
    x_all = data[: n_windows * block_size].view(n_windows, block_size)
    y_all = data[1: n_windows * block_size + 1].view(n_windows, block_size)
    total = 0.0
    for i in range(0, n_windows, batch_windows):
        _, loss = model(x_all[i:i + batch_windows], y_all[i:i + batch_windows])
        total += loss.item() * x_all[i:i + batch_windows].numel()
    return total / (n_windows * block_size)


def run_torch_reference(train_ids: np.ndarray, val_ids: np.ndarray, vocab_size: int, recipe: dict,
                        seed=1337, threads=None, progress=True) -> dict:
    r = {**NANOGPT_CPU_RECIPE, **(recipe or {})}
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    cfg = TorchGPTConfig(vocab_size=vocab_size, block_size=r["block_size"], n_layer=r["n_layer"],
                         n_head=r["n_head"], n_embd=r["n_embd"], dropout=r["dropout"], bias=r["bias"],
                         activation=r["activation"])
    model = TorchGPT(cfg)
    model.train()
    opt = model.configure_optimizer(r["weight_decay"], r["learning_rate"], (r["beta1"], r["beta2"]))

    train = torch.from_numpy(train_ids.astype(np.int64))
    T, B = r["block_size"], r["batch_size"]

    def get_batch():
        ix = torch.randint(len(train) - T, (B,), generator=gen)
        return torch.stack([train[i:i + T] for i in ix]), torch.stack([train[i + 1:i + 1 + T] for i in ix])

    losses_every10, recent, iter_s = [], [], []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=r["max_iters"], desc="torch reference", mininterval=1.0)
    t0 = time.perf_counter()
    for it in range(r["max_iters"]):
        t_it = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = nanogpt_lr(it, r)
        x, y = get_batch()
        _, loss = model(x, y)
        loss.backward()
        if r["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), r["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_f = loss.item()  # nanoGPT syncs on the loss when logging too; cheap on CPU
        iter_s.append(time.perf_counter() - t_it)
        recent.append(loss_f)
        if it % 10 == 0:
            losses_every10.append(loss_f)
        if bar is not None:
            bar.update(1)
            if it % 50 == 0:
                bar.set_postfix(loss=f"{loss_f:.4f}")
    train_wall_s = time.perf_counter() - t0
    if bar is not None:
        bar.close()

    model.eval()
    val_loss = full_split_loss(model, val_ids, T)
    return {
        "val_loss": val_loss,
        "train_wall_s": train_wall_s,
        "ms_per_iter": 1000.0 * train_wall_s / max(r["max_iters"], 1),
        # The median shrugs off bursts of other work on a shared machine; the mean above does not.
        "ms_per_iter_median": 1000.0 * float(np.median(iter_s)) if iter_s else float("nan"),
        "train_loss_last": float(np.mean(recent[-50:])) if recent else float("nan"),
        "losses": losses_every10,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def load_tiny_shakespeare_chars():
    """(train_ids, val_ids, vocab_size) with nanoGPT's char vocab and 90/10 split.

    The text and the vocabulary come from jaxllm's own source reader and char tokenizer, so both
    sides of a comparison see the same ids.
    """
    from jaxllm.data import load_text
    from jaxllm.tokenizer import CharTokenizer

    text = load_text("shakespeare")
    tok = CharTokenizer.from_text(text)
    ids = np.asarray(tok.encode(text), dtype=np.uint16)
    n = int(0.9 * len(ids))
    return ids[:n], ids[n:], tok.vocab_size


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=NANOGPT_CPU_RECIPE["max_iters"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--losses", action="store_true", help="include the every-10-iters train losses")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()

    train_ids, val_ids, vocab_size = load_tiny_shakespeare_chars()
    # Shorter runs keep the recipe's schedule shape: decay ends at the last iteration.
    recipe = dict(max_iters=args.iters, lr_decay_iters=args.iters,
                  warmup_iters=min(NANOGPT_CPU_RECIPE["warmup_iters"], args.iters // 2))
    result = run_torch_reference(train_ids, val_ids, vocab_size, recipe, seed=args.seed,
                                 threads=args.threads, progress=not args.no_progress)
    if not args.losses:
        result.pop("losses")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
