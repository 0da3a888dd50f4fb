"""PPO for RLHF: the per-token rewards, GAE, whitening and the clipped losses (the rollout step and
`jaxllm ppo` come with issue 15's driver).

The formulas are InstructGPT's as "The N+ Implementation Details of RLHF with PPO" (Huang et al.,
2024) and TRL's PPOTrainer (v0.19; TRL 1.x no longer ships PPO) compute them. Arrays are (B, T) over
the response tokens, with a (B, T) mask of real tokens (the response up to and including its EOS):

- rewards_with_kl: -kl_coef * KL estimate at every real token, plus the reward model's score at the
  last real token (the EOS, where the reward model read it);
- gae: generalised advantage estimation backwards over the real tokens (gamma 1, lambda 0.95 by
  default), values past the last real token counted as 0; returns = advantages + values;
- whiten: (x - mean) / sqrt(var + 1e-8) over the real tokens, var with Bessel's correction;
- policy_loss: max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)), averaged over real tokens;
- value_loss: 0.5 max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2), averaged over real tokens.

Every mean here is over real tokens only: padding never reaches a metric or a gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("k1", "k3")


def masked_mean(x, mask, axis=None):
    mask = jnp.asarray(mask, x.dtype)
    return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def whiten(x, mask, *, shift_mean: bool = True):
    """x normalised to mean 0, variance 1 over the real tokens (`shift_mean=False`: the scale only,
    the mean kept, as for rewards); padding positions come back as 0."""
    x = jnp.asarray(x, jnp.float32)
    mask = jnp.asarray(mask, x.dtype)
    n = jnp.sum(mask)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask) * n / jnp.maximum(n - 1.0, 1.0)
    out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_estimate(logps, ref_logps, estimator: str = "k1"):
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs: k1 =
    logp - ref (unbiased, can be negative), k3 = (r - 1) - log r with r = exp(ref - logp) (>= 0)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"KL estimator must be one of {', '.join(KL_ESTIMATORS)}, got {estimator!r}")
    log_ratio = jnp.asarray(logps, jnp.float32) - jnp.asarray(ref_logps, jnp.float32)
    return log_ratio if estimator == "k1" else jnp.expm1(-log_ratio) + log_ratio


def rewards_with_kl(scores, logps, ref_logps, mask, kl_coef: float, *, estimator: str = "k1"):
    """(rewards (B, T), kl (B, T)): -kl_coef * KL at each real token, plus each row's score (B,)
    at its last real token; 0 at padding."""
    mask = jnp.asarray(mask, bool)
    kl = jnp.where(mask, kl_estimate(logps, ref_logps, estimator), 0.0)
    T = mask.shape[1]
    last = T - 1 - jnp.argmax(mask[:, ::-1], axis=1)                    # the EOS (last real token)
    at_last = (jnp.arange(T)[None, :] == last[:, None]) & mask
    rewards = -kl_coef * kl + jnp.where(at_last, jnp.asarray(scores, jnp.float32)[:, None], 0.0)
    return rewards, kl


def gae(rewards, values, mask, *, gamma: float = 1.0, lam: float = 0.95):
    """(advantages, returns), each (B, T), 0 at padding. Rewards and values past a row's real tokens
    are taken as 0, so the last real token bootstraps from nothing."""
    rewards, values = jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32)
    mask = jnp.asarray(mask, rewards.dtype)
    rewards, values = rewards * mask, values * mask
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = rewards + gamma * next_values - values

    def back(carry, delta_t):
        adv = delta_t + gamma * lam * carry
        return adv, adv
    _, adv_TB = jax.lax.scan(back, jnp.zeros_like(deltas[:, 0]), deltas.T, reverse=True)
    advantages = adv_TB.T * mask
    return advantages, (advantages + values) * mask


def policy_loss(logps, old_logps, advantages, mask, *, cliprange: float = 0.2) -> tuple[jax.Array, dict]:
    """PPO's clipped policy loss over real tokens, with policy/clipfrac (the share of tokens where
    the clipped term is the larger) and policy/approxkl (0.5 x mean squared log-ratio)."""
    logps, old_logps, advantages = (jnp.asarray(x, jnp.float32) for x in (logps, old_logps, advantages))
    log_ratio = logps - old_logps
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss1, loss2 = -advantages * ratio, -advantages * clipped
    loss = masked_mean(jnp.maximum(loss1, loss2), mask)
    # clipped where the clip moved the ratio and its term is the larger (a tie is no clip, whatever
    # rounding the compiler picks for the two equal products)
    metrics = {"policy/clipfrac": masked_mean(((clipped != ratio) & (loss2 > loss1)).astype(loss.dtype), mask),
               "policy/approxkl": 0.5 * masked_mean(log_ratio ** 2, mask)}
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def value_loss(values, old_values, returns, mask, *, cliprange_value: float = 0.2) -> tuple[jax.Array, dict]:
    """PPO's clipped value loss over real tokens, with val/clipfrac."""
    values, old_values, returns = (jnp.asarray(x, jnp.float32) for x in (values, old_values, returns))
    clipped = jnp.clip(values, old_values - cliprange_value, old_values + cliprange_value)
    loss1 = (values - returns) ** 2
    loss2 = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(jnp.maximum(loss1, loss2), mask)
    frac = masked_mean(((clipped != values) & (loss2 > loss1)).astype(loss.dtype), mask)
    return loss, {"val/clipfrac": jax.lax.stop_gradient(frac)}
