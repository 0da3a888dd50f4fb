"""Group Relative Policy Optimization: the advantages and the loss (the rollout step and `jaxllm
grpo` come with issue 15's driver).

GRPO (Shao et al., 2024) samples G completions per prompt and scores each with reward functions;
a completion's advantage is its reward against its group's: (r - mean_group) / (std + 1e-4), with
no value model. The loss is PPO's clipped objective per token, on the ratio pi / pi_old, plus beta
times a per-token KL estimate to the reference, exp(ref - logp) - (ref - logp) - 1 (k3). Both follow
TRL's GRPOTrainer (v1.16), including its loss types:

- grpo:    each completion's mean over its tokens, then the mean over completions;
- dr_grpo: the sum over all tokens / (completions x max_completion_length) (Dr. GRPO: no length
           bias, since a fixed constant replaces each completion's own length).

Everything here is a pure function of arrays: (B, T) per-token log-probs of the completion tokens,
a (B, T) mask of real completion tokens, (B,) advantages.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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
