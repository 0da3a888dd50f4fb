"""DPO step time: jaxllm against TRL's DPOTrainer, same model, same batch, same run.

A small GPT-2 (HF `GPT2Config`: 4 layers, 4 heads, 256 wide, GPT-2's 50,257-token vocabulary,
random weights, saved with `save_pretrained`) is trained with DPO by TRL 1.16 (`DPOTrainer`, full
fine-tuning, its default reference: a frozen copy of the starting model loaded from the same
directory) and by jaxllm (`jaxllm.alignment.dpo`, the same weights through `jaxllm.from_hf`, a
frozen copy as reference: `dpo.reference=copy`), on the same pairs: prompts of 32 tokens and
responses of 32 tokens (+ EOS), batches of 8 pairs, fp32 on both sides (`--bf16`: bf16 compute
with fp32 weights on both, TRL's default on a GPU; note that on a GPU XLA runs fp32 matmuls as
TF32 by default, torch in full fp32). On a CPU both use its
cores (torch: one thread per core; jaxllm: one JAX device per core, as `jaxllm dpo` runs, and on
one device); on a machine with a GPU both run there. Step time is the median over the steps after
the first two (compilation, warm-up) of wall time per optimizer step, the batch's assembly
included on both sides.

    python benchmarks/dpo_speed.py                    # ~3 min on 2 cores
    python benchmarks/dpo_speed.py --size quick --steps 10
    python benchmarks/dpo_speed.py --size gpt2        # GPT-2 124M's shape (on a GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from jaxllm.parallel import setup_cpu  # noqa: E402

setup_cpu()   # before JAX starts: one device per core, as the CLI

import jax  # noqa: E402
import numpy as np  # noqa: E402

# Words that GPT-2's BPE keeps as one token each (with their leading space), so a text of n words is
# n tokens alone and after any other word: every sequence has the same length on both sides.
WORDS = [" the", " and", " of", " to", " in", " that", " it", " with", " for", " his", " was", " he",
         " not", " be", " is", " you", " on", " my", " all", " have", " by", " we", " me", " this"]


SIZES = {"quick": (2, 4, 128), "small": (4, 4, 256), "gpt2": (12, 12, 768)}


def gpt2_tokenizer_dir(out: pathlib.Path) -> pathlib.Path:
    """GPT-2's tokenizer as a transformers directory, from the local rank file (no download)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from jaxllm.tokenizer import GPT2_PATTERN, find_gpt2_ranks

    backend = TikTokenConverter(vocab_file=str(find_gpt2_ranks()), pattern=GPT2_PATTERN,
                                extra_special_tokens=["<|endoftext|>"]).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.save_pretrained(out)
    return out


def make_pairs(n: int, prompt_len: int, response_len: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)

    def text(k):
        return "".join(rng.choice(WORDS, k))
    return [{"prompt": text(prompt_len), "chosen": text(response_len), "rejected": text(response_len)}
            for _ in range(n)]


def run_trl(model_dir, tok_dir, pairs, batch: int, steps: int, out_dir, bf16: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    gpu = torch.cuda.is_available()
    if not gpu:
        torch.set_num_threads(os.cpu_count() or 1)
    times = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    args = DPOConfig(output_dir=str(out_dir), per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-6,
                     logging_steps=10 ** 6, save_strategy="no", report_to=[], use_cpu=not gpu, dataloader_num_workers=0,
                     max_length=None, beta=0.1, loss_type=["sigmoid"], seed=0,
                     # TRL's defaults are bf16 and activation checkpointing: precision as asked (the
                     # same as jaxllm's), and no recomputation (its faster setting)
                     bf16=bf16, gradient_checkpointing=False)
    trainer = DPOTrainer(model=str(model_dir), args=args, train_dataset=Dataset.from_list(pairs),
                         processing_class=AutoTokenizer.from_pretrained(tok_dir), callbacks=[Clock()])
    start = time.perf_counter()
    trainer.train()
    steps_s = np.diff([start, *times])
    return {"seconds_per_step": statistics.median(steps_s[2:]), "first_step_s": float(steps_s[0]),
            "steps": len(times), "device": torch.cuda.get_device_name() if gpu else "cpu",
            "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__}


def run_jaxllm(model_dir, tok_dir, pairs, batch: int, steps: int, devices: int, bf16: bool) -> dict:
    from flax import nnx

    from jaxllm import from_hf, load_tokenizer, parallel
    from jaxllm.alignment.dpo import DPOSection, dpo_loss_fn
    from jaxllm.alignment.pairs import pair_batch
    from jaxllm.data.preference import tokenize_preferences
    from jaxllm.training.optim import OptimConfig, lr_schedule, make_optimizer
    from jaxllm.training.step import init_train_state, make_train_step

    # bf16: bf16 compute with fp32 weights, as torch's autocast under TRL's bf16=True
    model, cfg = from_hf(model_dir, dropout=0.0, **({"dtype": "bfloat16"} if bf16 else {}))
    tok = load_tokenizer(tok_dir)
    ds = tokenize_preferences(pairs, tok, log=None)
    T = max(len(x.ids) for x in ds.chosen + ds.rejected)
    data = pair_batch(ds.rows(T))
    ref_graphdef, ref_state = nnx.split(model)
    constants = jax.tree.map(lambda a: a.copy(), ref_state)
    optim = OptimConfig(learning_rate=1e-6, min_lr=1e-6, warmup_iters=0, lr_decay_iters=1, weight_decay=0.0)
    optimizer = make_optimizer(optim)
    graphdef, state = init_train_state(model, optimizer)
    mesh = parallel.data_mesh(batch, devices, can_pad=True)
    if mesh is not None:
        state = jax.device_put(state, parallel.replicated(mesh))
        constants = jax.device_put(constants, parallel.replicated(mesh))
    step = make_train_step(graphdef, dpo_loss_fn(DPOSection(), "copy", ref_graphdef), optimizer,
                           lr_schedule(optim), mesh)
    key = jax.random.key(0)
    times, losses = [], []
    for i in range(steps):
        t0 = time.perf_counter()
        idx = np.arange(i * batch, (i + 1) * batch) % len(ds)
        b = jax.tree.map(lambda a: a[idx][None], data)
        if mesh is not None:
            b = parallel.shard_batch(b, mesh, 1)
        state, metrics = step(state, b, key, constants)
        losses.append(float(metrics["loss"]))    # waits for the step: one step's wall time
        times.append(time.perf_counter() - t0)
    return {"seconds_per_step": statistics.median(times[2:]), "first_step_s": times[0], "steps": steps,
            "devices": 1 if mesh is None else mesh.size, "device": str(jax.devices()[0].device_kind),
            "first_loss": losses[0], "seq_len": T, "jax_version": jax.__version__,
            "matmul_precision": str(jax.config.jax_default_matmul_precision or "default")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--bf16", action="store_true", help="bf16 compute, fp32 weights, on both sides (TRL's default)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--response-len", type=int, default=32)
    p.add_argument("--size", choices=sorted(SIZES), default="small",
                   help="small: 4 layers x 256 (the default); quick: 2 x 128; gpt2: 12 x 768 (124M)")
    p.add_argument("--out", default=str(HERE / "results" / "dpo_speed.json"))
    args = p.parse_args()

    from transformers import GPT2Config, GPT2LMHeadModel
    import torch

    layers, heads, width = SIZES[args.size]
    config = GPT2Config(n_layer=layers, n_head=heads, n_embd=width,
                        n_positions=max(128, args.prompt_len + args.response_len + 1), vocab_size=50257,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    pairs = make_pairs(args.batch * args.steps, args.prompt_len, args.response_len)
    with tempfile.TemporaryDirectory(prefix="jaxllm-dpo-speed-") as tmp:
        tmp = pathlib.Path(tmp)
        torch.manual_seed(0)
        GPT2LMHeadModel(config).save_pretrained(tmp / "model")
        gpt2_tokenizer_dir(tmp / "tok")
        trl_result = run_trl(tmp / "model", tmp / "tok", pairs, args.batch, args.steps, tmp / "trl", args.bf16)
        jax_result = run_jaxllm(tmp / "model", tmp / "tok", pairs, args.batch, args.steps, 0, args.bf16)
        jax_one = (run_jaxllm(tmp / "model", tmp / "tok", pairs, args.batch, args.steps, 1, args.bf16)
                   if jax_result["devices"] > 1 else jax_result)
    out = {
        "benchmark": "dpo_speed", "date": time.strftime("%Y-%m-%d"),
        "model": f"GPT-2 config: {layers} layers, {heads} heads, {width} wide, vocab 50257, random weights",
        "batch_pairs": args.batch, "prompt_tokens": args.prompt_len,
        "response_tokens": args.response_len + 1, "reference": "frozen copy (both)",
        "precision": "bf16 compute, fp32 weights" if args.bf16 else "fp32",
        "trl": trl_result, "jaxllm": jax_result, "jaxllm_one_device": jax_one,
        "speedup": trl_result["seconds_per_step"] / jax_result["seconds_per_step"],
        "speedup_one_device": trl_result["seconds_per_step"] / jax_one["seconds_per_step"],
    }
    pathlib.Path(args.out).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
