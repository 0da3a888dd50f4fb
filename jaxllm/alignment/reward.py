"""Reward modelling: `jaxllm reward` / `python train/reward.py`.

A reward model (`jaxllm.heads.RewardModel`: a GPT trunk, usually an SFT run, plus a scalar head read
at each row's last real token) learns from preference pairs with the Bradley-Terry loss, as TRL's
RewardTrainer (v1.16) computes it:

    loss = mean(-log sigmoid(r_chosen - r_rejected - margin)) [+ coef * mean((r_chosen + r_rejected)^2)]

with `margin` the record's own (0 when absent) and the centring term when
`reward.center_rewards_coefficient` is set (TRL's suggestion: 1e-2). Metrics under TRL's names:
accuracy (r_chosen > r_rejected), margin, and min/mean/max_reward. Full or LoRA training (the head
always trains); a run's checkpoints rebuild the RewardModel (`jaxllm.load_checkpoint`), and
`load_reward_model` + `score` turn it into a jitted, batched scorer of texts, refusing a tokenizer
other than the one the model was trained with.
"""

from __future__ import annotations

import dataclasses
import functools
import typing

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.alignment.pairs import (PairBatch, PreferenceDataConfig, base_and_tokenizer, both_sides,
                                    load_pair_files, pair_batch, pair_evaluator, train_on_pairs)
from jaxllm.heads import HeadParam, RewardModel
from jaxllm.model import count_params
from jaxllm.peft import PeftParam, PeftSection, apply_method, format_report, merge, parameter_report
from jaxllm.runs import load_checkpoint
from jaxllm.stages.sections import InitConfig
from jaxllm.tokenizer import tokenizer_differences
from jaxllm.training.loop import LoopConfig, TrainResult
from jaxllm.training.optim import OptimConfig


def reward_per_pair(rewards_chosen, rewards_rejected, margin=None, center_rewards_coefficient=None):
    """(loss per pair (B,), metrics per pair): see the module docstring."""
    diff = rewards_chosen - rewards_rejected
    losses = -jax.nn.log_sigmoid(diff - (0.0 if margin is None else margin))
    if center_rewards_coefficient is not None:
        losses = losses + center_rewards_coefficient * (rewards_chosen + rewards_rejected) ** 2
    diff = jax.lax.stop_gradient(diff)
    both = jax.lax.stop_gradient(jnp.stack([rewards_chosen, rewards_rejected]))
    metrics = {"accuracy": (diff > 0).astype(jnp.float32), "margin": diff, "mean_reward": both.mean(axis=0),
               "min_reward": both.min(axis=0), "max_reward": both.max(axis=0)}
    return losses, metrics


def reward_loss(rewards_chosen, rewards_rejected, margin=None, center_rewards_coefficient=None):
    """(mean loss over the pairs, metrics over the pairs), as TRL's RewardTrainer computes them."""
    losses, m = reward_per_pair(rewards_chosen, rewards_rejected, margin, center_rewards_coefficient)
    return jnp.mean(losses), {"accuracy": m["accuracy"].mean(), "margin": m["margin"].mean(),
                              "mean_reward": m["mean_reward"].mean(), "min_reward": m["min_reward"].min(),
                              "max_reward": m["max_reward"].max()}


@dataclasses.dataclass(frozen=True)
class RewardSection:
    center_rewards_coefficient: typing.Optional[float] = None   # TRL's suggestion when used: 1e-2
    disable_dropout: bool = True                                # as TRL's RewardConfig


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    init: InitConfig = dataclasses.field(default_factory=InitConfig)
    peft: PeftSection = dataclasses.field(default_factory=lambda: PeftSection(method="full"))
    data: PreferenceDataConfig = dataclasses.field(default_factory=PreferenceDataConfig)
    reward: RewardSection = dataclasses.field(default_factory=RewardSection)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(
        learning_rate=1e-4, min_lr=1e-5, warmup_iters=20, lr_decay_iters=300, weight_decay=0.0))
    train: LoopConfig = dataclasses.field(default_factory=lambda: LoopConfig(
        out_dir="runs/reward", batch_size=16, max_iters=300, eval_interval=100, log_interval=10,
        ckpt_interval=100))


@dataclasses.dataclass
class RewardResult:
    train: TrainResult
    before: dict
    after: dict
    config: typing.Any    # GPTConfig


def reward_loss_fn(section: RewardSection):
    """loss_fn(model, batch, key) for the shared train step: weighted sums over the batch's pairs."""
    def loss_fn(model, batch: PairBatch, key):
        tokens, mask, _ = both_sides(batch)
        r = model(tokens, attention_mask=mask, dropout_key=None if section.disable_dropout else key)
        B = batch.weight.shape[0]
        losses, metrics = reward_per_pair(r[:B], r[B:], batch.margin, section.center_rewards_coefficient)
        w = batch.weight
        real = w > 0
        aux = {k: (jnp.min(jnp.where(real, v, jnp.inf)) if k.startswith("min_") else
                   jnp.max(jnp.where(real, v, -jnp.inf)) if k.startswith("max_") else jnp.sum(v * w))
               for k, v in metrics.items()}
        return jnp.sum(losses * w), jnp.sum(w), aux
    return loss_fn


def run_reward(config: RewardConfig) -> RewardResult:
    d = config.data
    gpt, cfg, tok = base_and_tokenizer(config.init, d.tokenizer, "reward")
    T = cfg.block_size
    train_ds, held_ds = load_pair_files(d, tok, T)
    trainable = apply_method(gpt, config.peft)
    trainable = nnx.Param if trainable is nnx.Param else nnx.Any(PeftParam, HeadParam)   # the head always trains
    model = RewardModel(trunk=gpt, rngs=nnx.Rngs(config.peft.seed))
    report = parameter_report(model, trainable)
    print(f"reward model on {len(train_ds):,} pairs, {len(held_ds):,} held out; {count_params(model):,} "
          f"parameters; method: {config.peft.method}; {format_report(report)}")
    loss_fn = reward_loss_fn(config.reward)
    make_eval = pair_evaluator(pair_batch(held_ds.rows(T)), d.eval_batch_size, loss_fn)
    result, before, after = train_on_pairs("reward", config, model, trainable, loss_fn, cfg, tok, train_ds,
                                           pair_batch(train_ds.rows(T)), make_eval, meta_extra={"head": "reward"})
    return RewardResult(result, before, after, cfg)


# --------------------------------------------------------------------------- using a reward model


def load_reward_model(run_dir, step: int | None = None, tokenizer=None):
    """(RewardModel, tokenizer, eos_id) from a `jaxllm reward` run (LoRA folded in for speed).
    A `tokenizer` given must encode as the run's own does: a reward model read through another
    tokenizer would score token ids it never saw as those texts, so it is refused with the reason."""
    model, _, own, meta = load_checkpoint(run_dir, step)
    if meta.get("head") != "reward":
        raise ValueError(f"{run_dir} is a {meta.get('kind', 'training')!r} run, not a reward model "
                         f"(`jaxllm reward` writes those)")
    if own is None:
        raise FileNotFoundError(f"{run_dir}/tokenizer is missing: the reward model's own tokenizer is needed")
    if tokenizer is not None:
        diff = tokenizer_differences(own, tokenizer)
        if diff:
            raise ValueError(f"the tokenizer given is not the one the reward model in {run_dir} was trained "
                             f"with ({'; '.join(diff)}); score with its own tokenizer (load_reward_model "
                             f"returns it) or retrain the reward model on this tokenizer")
    merge(model.trunk, unload=True)   # a LoRA trunk becomes a plain GPT (adapters/prefix are kept)
    return model, own, meta.get("data", {}).get("eos_id", own.eos_id)


@functools.partial(jax.jit, static_argnums=0)
def _rewards_jit(graphdef, state, tokens, mask):
    return nnx.merge(graphdef, state)(tokens, attention_mask=mask)


def score(model: RewardModel, tokenizer, texts, responses=None, *, eos_id: int | None = None,
          batch_size: int = 32) -> np.ndarray:
    """Rewards (N,) of `texts` (whole sequences), or of prompt + response pairs (`responses`), each
    followed by EOS as in training. One jitted forward per batch; rows are right-padded to a power of
    two (at most the block), so a few shapes serve any lengths; longer inputs keep their last tokens."""
    eos = tokenizer.eos_id if eos_id is None else eos_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS; pass eos_id= (the reward model scores text followed by EOS)")
    texts = list(texts)
    if responses is not None and len(list(responses)) != len(texts):
        raise ValueError(f"{len(texts)} prompts but {len(list(responses))} responses")
    rows = [tokenizer.encode(t) + (tokenizer.encode(r) if responses is not None else []) + [eos]
            for t, r in zip(texts, responses if responses is not None else [None] * len(texts))]
    T_max = model.config.block_size
    rows = [r[-T_max:] for r in rows]
    graphdef, state = nnx.split(model)
    out = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        T = min(T_max, 1 << (max(len(r) for r in chunk) - 1).bit_length())
        tokens = np.zeros((batch_size, T), np.int32)
        mask = np.zeros((batch_size, T), bool)
        for i, r in enumerate(chunk):
            tokens[i, :len(r)], mask[i, :len(r)] = r, True
        mask[len(chunk):, 0] = True     # filler rows: one token, ignored
        out.append(np.asarray(_rewards_jit(graphdef, state, tokens, mask))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)
