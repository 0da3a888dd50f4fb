"""Group Relative Policy Optimization: the advantages, the loss, the rollout scoring and `jaxllm grpo`.

GRPO (Shao et al., 2024) samples G completions per prompt and scores each with reward functions;
a completion's advantage is its reward against its group's: (r - mean_group) / (std + 1e-4), with
no value model. The loss is PPO's clipped objective per token, on the ratio pi / pi_old, plus beta
times a per-token KL estimate to the reference, exp(ref - logp) - (ref - logp) - 1 (k3). Both follow
TRL's GRPOTrainer (v1.16), including its loss types:

- grpo:    each completion's mean over its tokens, then the mean over completions;
- dr_grpo: the sum over all tokens / (completions x max_completion_length) (Dr. GRPO: no length
           bias, since a fixed constant replaces each completion's own length).

The loss and advantages are pure functions of arrays: (B, T) per-token log-probs of the completion
tokens, a (B, T) mask of real completion tokens, (B,) advantages. The stage (`run_grpo`) samples
`num_generations` completions per prompt inside the training loop (jaxllm.alignment.rollout), scores
them with reward functions of the decoded text (several, weighted; TRL's signature
`f(prompts, completions, **columns) -> list[float]`) and/or a reward model, and updates the policy
`rollout.epochs` (TRL's num_iterations) times over `rollout.num_mini_batches` minibatches.
"""

from __future__ import annotations

import dataclasses
import typing

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm import parallel
from jaxllm.alignment.reward import load_reward_model, score
from jaxllm.alignment.rollout import (PromptDataConfig, RLResult, RolloutBatches, RolloutConfig, call_reward,
                                      load_prompt_sets, load_reward_function, policy_logps, reference_logps,
                                      reward_evaluator, reward_name, start_policy, train_online)
from jaxllm.peft import PeftSection
from jaxllm.stages.sections import InitConfig
from jaxllm.training.loop import LoopConfig
from jaxllm.training.optim import OptimConfig

LOSS_TYPES = ("grpo", "dr_grpo")
SCALES = ("group", "batch", "none")


def _std(x, axis=None):
    """Standard deviation with Bessel's correction (NaN for a single value), as TRL's nanstd."""
    n = x.size if axis is None else x.shape[axis]
    if n < 2:
        return jnp.full(jnp.mean(x, axis=axis).shape, jnp.nan, x.dtype)
    return jnp.std(x, axis=axis, ddof=1)


def group_advantages(rewards, group_size: int, *, scale: str = "group", eps: float = 1e-4):
    """(advantages (N,), std (N,)) for N = prompts x group_size rewards, grouped consecutively:
    reward minus its group's mean, divided by std + eps where std is the group's (`scale="group"`,
    TRL's default), the whole batch's ("batch") or not at all ("none"). A group whose rewards are
    all equal gets advantage 0 (and std 0: it teaches nothing; TRL logs the fraction)."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    rewards = jnp.asarray(rewards, jnp.float32)
    if group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} rewards do not split into groups of {group_size}")
    grouped = rewards.reshape(-1, group_size)
    mean = jnp.repeat(jnp.mean(grouped, axis=1), group_size)
    if scale == "batch":
        std = jnp.broadcast_to(_std(rewards), rewards.shape)
    else:
        std = jnp.repeat(_std(grouped, axis=1), group_size)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + eps)
    return jnp.nan_to_num(advantages, nan=0.0), std


def grpo_loss(logps, old_logps, advantages, mask, ref_logps=None, *, beta: float = 0.0,
              epsilon: float = 0.2, epsilon_high: float | None = None, loss_type: str = "grpo",
              max_completion_length: int | None = None) -> tuple[jax.Array, dict]:
    """(loss, metrics) of GRPO on one batch of completions, as TRL's GRPOTrainer computes them.

    logps, old_logps, ref_logps: (B, T) per-token log-probs of the completion tokens under the
    policy being trained, the policy that sampled them, and the reference (needed when beta > 0).
    Metrics (means over real tokens): kl (when beta > 0), clip_ratio/low_mean, clip_ratio/high_mean
    and clip_ratio/region_mean (the share of tokens whose ratio the clip holds at 1 - epsilon with a
    negative advantage, or at 1 + epsilon_high with a positive one)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    if beta and ref_logps is None:
        raise ValueError("beta > 0 adds a KL term to the reference: pass ref_logps")
    eps_low = epsilon
    eps_high = epsilon if epsilon_high is None else epsilon_high
    mask = jnp.asarray(mask, jnp.float32)
    adv = jnp.asarray(advantages, jnp.float32)[:, None]
    ratio = jnp.exp(logps - old_logps)
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = -jnp.minimum(ratio * adv, clipped * adv)
    metrics = {}
    n_tokens = jnp.maximum(jnp.sum(mask), 1.0)

    def token_mean(x):
        return jnp.sum(x * mask) / n_tokens
    if beta:
        diff = ref_logps - logps
        kl = jnp.exp(diff) - diff - 1.0
        per_token = per_token + beta * kl
        metrics["kl"] = jax.lax.stop_gradient(token_mean(kl))
    if loss_type == "grpo":
        loss = jnp.mean(jnp.sum(per_token * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0))
    else:
        T = mask.shape[1] if max_completion_length is None else max_completion_length
        loss = jnp.sum(per_token * mask) / (mask.shape[0] * T)
    low = ((ratio < 1.0 - eps_low) & (adv < 0)).astype(jnp.float32)
    high = ((ratio > 1.0 + eps_high) & (adv > 0)).astype(jnp.float32)
    metrics.update({"clip_ratio/low_mean": jax.lax.stop_gradient(token_mean(low)),
                    "clip_ratio/high_mean": jax.lax.stop_gradient(token_mean(high)),
                    "clip_ratio/region_mean": jax.lax.stop_gradient(token_mean(jnp.maximum(low, high)))})
    return loss, metrics


# --------------------------------------------------------------------------- the stage


@dataclasses.dataclass(frozen=True)
class GRPOSection:
    num_generations: int = 8                    # G: completions per prompt
    beta: float = 0.0                           # KL weight to the reference (TRL's default 0: none loaded)
    epsilon: float = 0.2
    epsilon_high: typing.Optional[float] = None  # default: epsilon
    loss_type: str = "grpo"                     # grpo | dr_grpo
    scale_rewards: str = "group"                # group | batch | none
    reward_funcs: tuple = ("exact_match",)      # built-in names, "module:function" or "file.py:function"
    reward_weights: typing.Optional[tuple] = None  # default: 1 each
    reward_model: typing.Optional[str] = None   # a `jaxllm reward` run, scored as one more reward

    def __post_init__(self):
        if self.num_generations < 2:
            raise ValueError(f"grpo.num_generations must be >= 2 (advantages compare a group's samples), "
                             f"got {self.num_generations}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"grpo.loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.scale_rewards not in SCALES:
            raise ValueError(f"grpo.scale_rewards must be one of {', '.join(SCALES)}, got {self.scale_rewards!r}")
        if not self.reward_funcs and not self.reward_model:
            raise ValueError("grpo needs a reward: set grpo.reward_funcs and/or grpo.reward_model")
        n = len(self.reward_funcs) + bool(self.reward_model)
        if self.reward_weights is not None and len(self.reward_weights) != n:
            raise ValueError(f"grpo.reward_weights has {len(self.reward_weights)} weights for {n} rewards "
                             f"(reward_funcs, then the reward model)")
        if self.beta < 0:
            raise ValueError(f"grpo.beta must be >= 0, got {self.beta}")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    init: InitConfig = dataclasses.field(default_factory=InitConfig)
    peft: PeftSection = dataclasses.field(default_factory=lambda: PeftSection(method="full"))
    data: PromptDataConfig = dataclasses.field(default_factory=PromptDataConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=lambda: RolloutConfig(temperature=1.0))
    grpo: GRPOSection = dataclasses.field(default_factory=GRPOSection)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(
        learning_rate=1e-5, min_lr=1e-5, warmup_iters=0, lr_decay_iters=100, weight_decay=0.0))
    train: LoopConfig = dataclasses.field(default_factory=lambda: LoopConfig(
        out_dir="runs/grpo", batch_size=32, max_iters=100, eval_interval=25, log_interval=1, ckpt_interval=25))


def grpo_loss_fn(section: GRPOSection, P: int, temperature: float, max_new_tokens: int):
    def loss_fn(model, batch, key):
        logps = policy_logps(model, batch, P, temperature)[0]   # no dropout: ratios of one policy
        loss, metrics = grpo_loss(logps, batch["old_logps"], batch["advantages"], batch["mask"],
                                  batch.get("ref_logps"), beta=section.beta, epsilon=section.epsilon,
                                  epsilon_high=section.epsilon_high, loss_type=section.loss_type,
                                  max_completion_length=max_new_tokens)
        return loss, jnp.ones((), jnp.float32), metrics
    return loss_fn


class GRPORollouts(RolloutBatches):
    def __init__(self, *args, section: GRPOSection, reward_fns, weights, reference, **kwargs):
        super().__init__(*args, group=section.num_generations, **kwargs)
        self.section, self.reward_fns, self.weights, self.reference = section, reward_fns, weights, reference

    def bind(self, graphdef, mesh) -> None:
        super().bind(graphdef, mesh)
        P, temperature, beta = self.P, self.cfg.temperature, self.section.beta
        ref = self.reference
        ref_graphdef, ref_state = ref if isinstance(ref, tuple) else (None, None)

        @jax.jit
        def score(trainable, frozen, ref_state, batch):
            model = nnx.merge(graphdef, trainable, frozen)
            old, entropy, _ = policy_logps(model, batch, P, temperature)
            out = {"old_logps": old}
            if beta:
                reference = "adapter_off" if ref_state is None else nnx.merge(ref_graphdef, ref_state)
                out["ref_logps"] = reference_logps(model, reference, batch, P, temperature)
            mask = batch["mask"].astype(jnp.float32)
            return out, jnp.sum(entropy * mask) / jnp.maximum(jnp.sum(mask), 1.0)
        self._score = score
        self._ref_state = self._constant(ref_state)

    def score(self, state, batch, info):
        idx = info["idx"]
        prompts = [self.prompts.texts[i] for i in idx]
        columns = [self.prompts.columns[i] for i in idx]
        completions = self.decode(batch["completion"])
        total = np.zeros(len(completions), np.float32)
        metrics = {}
        for fn, w in zip(self.reward_fns, self.weights):
            r = call_reward(fn, prompts, completions, columns)
            metrics[f"rewards/{reward_name(fn)}/mean"] = float(r.mean())
            total += w * r
        advantages, std = group_advantages(total, self.group, scale=self.section.scale_rewards)
        fields, entropy = self._score(state.trainable, state.frozen, self._ref_state,
                                      {k: batch[k] for k in ("tokens", "attn", "completion", "mask")})
        fields = {**parallel.gather_to_host(fields), "advantages": np.asarray(advantages)}
        grouped = total.reshape(-1, self.group)
        metrics.update({"reward": float(total.mean()), "reward_std": float(grouped.std(axis=1, ddof=1).mean()),
                        "frac_reward_zero_std": float(np.mean(np.ptp(grouped, axis=1) == 0)),
                        "entropy": float(entropy)})
        return fields, metrics


def grpo_rewards(section: GRPOSection, tok):
    """(reward functions, weights): the configured functions, then the reward model's score."""
    fns = [load_reward_function(spec) for spec in section.reward_funcs]
    if section.reward_model:
        rm, rm_tok, rm_eos = load_reward_model(section.reward_model, tokenizer=tok)

        def reward_model(prompts, completions, **_):
            return score(rm, rm_tok, prompts, completions, eos_id=rm_eos).tolist()
        fns.append(reward_model)
    weights = list(section.reward_weights) if section.reward_weights is not None else [1.0] * len(fns)
    return fns, [float(w) for w in weights]


def run_grpo(config: GRPOConfig) -> RLResult:
    section, ro, loop = config.grpo, config.rollout, config.train
    model, gpt, cfg, tok, trainable, reference = start_policy(config, "grpo", need_reference=section.beta > 0)
    train_prompts, held, eos, pad = load_prompt_sets(config.data, tok, cfg.block_size, ro.max_new_tokens, "grpo")
    fns, weights = grpo_rewards(section, tok)
    online = GRPORollouts(train_prompts, tok, cfg, rollout=ro, accum=loop.grad_accum,
                          micro=loop.batch_size, eos=eos, pad=pad, seed=loop.seed, section=section,
                          reward_fns=fns, weights=weights, reference=reference)
    print(f"grpo ({section.loss_type}, {section.num_generations} completions per prompt, beta {section.beta}) on "
          f"{len(train_prompts):,} prompts; rewards: "
          + ", ".join(f"{reward_name(f)} x {w}" for f, w in zip(fns, weights)))
    make_eval = None
    if held is not None:
        make_eval = reward_evaluator(held, tok, cfg, fns, weights, ro.max_new_tokens, config.data.eval_batch_size,
                                     eos, pad)
    loss_fn = grpo_loss_fn(section, online.P, ro.temperature, ro.max_new_tokens)
    return train_online("grpo", config, model, trainable, loss_fn, cfg, tok, online, make_eval)
