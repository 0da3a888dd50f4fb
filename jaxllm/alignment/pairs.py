"""What the preference stages (reward model, DPO) share: the `data` section, the base they start
from, the batch of pairs they train on, and the forward pass that reads each pair's two rows.

A batch is a `PairBatch` (a pytree): chosen and rejected rows (jaxllm.data.packing.Rows, one example
per row, right-padded), a margin per pair, the reference model's log-probs of each side (DPO with
precomputed references; zeros otherwise) and a weight per pair, 1 for a real pair and 0 for the rows
that pad a batch to a multiple of the device count, so that they count for nothing.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.configfile import to_dict
from jaxllm.data.packing import Rows
from jaxllm.data.preference import PreferenceDataset, PreferenceRows, load_preferences
from jaxllm.losses import IGNORE_INDEX
from jaxllm.runs import check_resume, load_base, peft_run_meta
from jaxllm.stages.sections import InitConfig
from jaxllm.tokenizer import load_tokenizer
from jaxllm.training.loop import TrainResult, train_loop
from jaxllm.training.step import evaluate_model, make_eval_step, metric_means, metric_reduction


@dataclasses.dataclass(frozen=True)
class PreferenceDataConfig:
    train_file: typing.Optional[str] = None   # JSONL: prompt/chosen/rejected or prompt/response_a/response_b/preference
    eval_file: typing.Optional[str] = None    # JSONL of held-out pairs
    format: str = "auto"                      # auto | preference | comparison
    tokenizer: typing.Optional[str] = None    # default: the base's own
    on_error: str = "raise"                   # raise | skip (malformed lines, counted)
    eos_id: typing.Optional[int] = None
    pad_id: typing.Optional[int] = None
    eval_batch_size: int = 32

    def __post_init__(self):
        if self.eval_batch_size <= 0:
            raise ValueError(f"data.eval_batch_size must be positive, got {self.eval_batch_size}")


class PairBatch(NamedTuple):
    chosen: Rows
    rejected: Rows
    margin: np.ndarray          # (N,)
    ref_chosen: np.ndarray      # (N,) reference log-probs of the chosen response (DPO, precomputed)
    ref_rejected: np.ndarray    # (N,)
    weight: np.ndarray          # (N,) 1 = a real pair, 0 = padding


def pad_values(pad_id: int) -> PairBatch:
    """The fill of rows added to reach a multiple of the device count: weight 0, no targets."""
    row = Rows(pad_id, IGNORE_INDEX, 0, 0)
    return PairBatch(row, row, 0.0, 0.0, 0.0, 0.0)


def pair_batch(rows: PreferenceRows, ref_chosen=None, ref_rejected=None) -> PairBatch:
    n = rows.margin.shape[0]
    zeros = np.zeros((n,), np.float32)
    return PairBatch(rows.chosen, rows.rejected, rows.margin,
                     zeros if ref_chosen is None else np.asarray(ref_chosen, np.float32),
                     zeros if ref_rejected is None else np.asarray(ref_rejected, np.float32),
                     np.ones((n,), np.float32))


def both_sides(batch: PairBatch):
    """(tokens, (B, T) attention mask, labels) of the 2B rows [chosen; rejected]: one forward pass."""
    tokens = jnp.concatenate([batch.chosen.tokens, batch.rejected.tokens])
    mask = jnp.concatenate([batch.chosen.segment_ids, batch.rejected.segment_ids]) > 0
    labels = jnp.concatenate([batch.chosen.labels, batch.rejected.labels])
    return tokens, mask, labels


def rows_batch_fn(data, seed: int, batch_size: int, accum: int):
    """batch_fn(step, rows=None) over `data`, a pytree of arrays with one row per example (preference
    pairs, SFT rows): rows drawn with a generator seeded by (seed, step), so resume needs no state.
    `rows` (of each micro-batch's batch_size rows) gathers only those, equal to the same rows of the
    whole batch (see jaxllm.training.loop.train_loop)."""
    n = jax.tree.leaves(data)[0].shape[0]

    def batch_fn(step, rows=None):
        idx = np.random.default_rng([seed, step]).integers(0, n, batch_size * accum).reshape(accum, batch_size)
        if rows is not None:   # every draw is made, so pair i is the same whoever asks for it
            idx = idx[:, rows]
        return jax.tree.map(lambda a: a[idx], data)
    return batch_fn


def eval_batches(data: PairBatch, batch_size: int):
    """Fixed-shape batches over every pair once; the last one wraps and its repeats weigh 0."""
    n = data.weight.shape[0]
    for s in range(0, n, batch_size):
        idx = np.arange(s, s + batch_size) % n
        keep = (np.arange(s, s + batch_size) < n).astype(np.float32)
        batch = jax.tree.map(lambda a: a[idx], data)
        yield batch._replace(weight=batch.weight * keep)


def base_and_tokenizer(init: InitConfig, tokenizer: str | None, stage: str):
    """(model, cfg, tokenizer) of the base a preference stage starts from (a jaxllm run, typically an
    SFT run, or an HF GPT-2 directory)."""
    if not init.path:
        raise ValueError(f"init.path is required: the jaxllm run (e.g. an SFT run) or HF GPT-2 directory "
                         f"that `jaxllm {stage}` starts from")
    model, cfg, base_tok = load_base(init.path, init.step, **init.compute())
    tok = load_tokenizer(tokenizer) if tokenizer else base_tok
    if tok is None:
        raise ValueError(f"the base {init.path} has no tokenizer; set data.tokenizer")
    return model, cfg, tok


def load_pair_files(d: PreferenceDataConfig, tok, block_size: int) -> tuple[PreferenceDataset, PreferenceDataset]:
    if not d.train_file or not d.eval_file:
        raise ValueError("data.train_file and data.eval_file are required: JSONL preference pairs "
                         "(prompt/chosen/rejected or prompt/response_a/response_b/preference)")
    common = dict(format=d.format, max_len=block_size, on_error=d.on_error, eos_id=d.eos_id, pad_id=d.pad_id)
    train, held = load_preferences(d.train_file, tok, **common), load_preferences(d.eval_file, tok, **common)
    for ds, what in ((train, d.train_file), (held, d.eval_file)):
        if not len(ds):
            raise ValueError(f"no usable pairs in {what}: {ds.stats.summary()}")
    return train, held


def pair_evaluator(data: PairBatch, batch_size: int, loss_fn, constants=None):
    """make_eval for the loop: a pair loss and its metrics, averaged over every held-out pair
    ("min_"/"max_" metrics reduced as such)."""
    bound = constants

    def make_eval(graphdef, mesh=None, constants=None):
        # the loop hands over the constants it already placed on its mesh
        eval_step = make_eval_step(graphdef, loss_fn, mesh, bound if constants is None else constants)

        def evaluate(state):
            total = count = 0.0
            sums: dict = {}
            for batch in eval_batches(data, batch_size):
                t, c, aux = eval_step(state, batch)
                total, count = total + t, count + c
                sums = {k: metric_reduction(k)(sums[k], v) if k in sums else v for k, v in aux.items()}
            count = float(count)
            return {"val_loss": float(total) / count, **metric_means({k: float(v) for k, v in sums.items()}, count)}
        return evaluate
    return make_eval


def train_on_pairs(kind: str, config, model, trainable, loss_fn, cfg, tok, train_ds: PreferenceDataset,
                   train_data: PairBatch, make_eval, *, meta_extra: dict | None = None,
                   constants=None) -> tuple[TrainResult, dict, dict]:
    """The part of `jaxllm reward` and `jaxllm dpo` after their model and loss are set: the run's
    metadata, the held-out metrics before, the shared training loop, the held-out metrics after.
    `config` is the stage's config (init, data, optim, train sections). Returns (result, before, after)."""
    d, loop = config.data, config.train
    T = cfg.block_size
    peft_meta = peft_run_meta(model, trainable, config.init)
    meta = {"kind": kind, **(meta_extra or {}), "model": cfg.to_dict(), "config": to_dict(config),
            "data": {"train": d.train_file, "eval": d.eval_file, "eos_id": train_ds.eos_id,
                     "pad_id": train_ds.pad_id}, **peft_meta}
    before = evaluate_model(model, trainable, make_eval)
    print("before: " + ", ".join(f"{k} {v:.4f}" for k, v in before.items()))
    result = train_loop(model, loss_fn, rows_batch_fn(train_data, loop.seed, loop.batch_size, loop.grad_accum),
                        optim=config.optim, loop=loop, meta=meta, make_eval=make_eval, trainable=trainable,
                        tokens_per_step=2 * loop.batch_size * loop.grad_accum * T,
                        flops_per_token=cfg.flops_per_token(T), tokenizer=tok, checkpoint_frozen=not peft_meta,
                        check_resume=lambda saved, where: check_resume(saved, meta, where),
                        pad_values=pad_values(train_ds.pad_id), constants=constants)
    after = result.evals[max(result.evals)] if result.evals else {}
    print("after:  " + ", ".join(f"{k} {v:.4f}" for k, v in after.items()))
    return result, before, after
