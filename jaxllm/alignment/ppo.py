"""PPO for RLHF: the per-token rewards, GAE, whitening, the clipped losses, the rollout scoring and
`jaxllm ppo`.

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

The stage (`run_ppo`): each step samples one completion per prompt inside the training loop
(jaxllm.alignment.rollout), scores it with a reward model (`jaxllm reward`, same tokenizer) at its
EOS, minus `missing_eos_penalty` when it never emitted EOS, adds the per-token KL penalty to the
reference, computes GAE and whitens the advantages over the batch, then runs `rollout.epochs`
(TRL's num_ppo_epochs, 4) passes over `rollout.num_mini_batches` minibatches of the clipped policy
loss + vf_coef x the clipped value loss. The value head reads the policy's final hidden states
(`jaxllm.heads.PolicyWithValue`); by default its loss trains the head alone (`value_trains_trunk`):
with rewards of a few units the value loss is ~100x the policy loss, and through a shared trunk
its gradient rewrites the policy (measured: held-out exact match fell while the reward model's
score rose). The KL coefficient is fixed, or adaptive (Ziegler et al., 2019)
when `ppo.kl_target` is set; its current value is checkpointed with the run.
"""

from __future__ import annotations

import dataclasses
import typing

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm import parallel
from jaxllm.alignment.reward import load_reward_model
from jaxllm.alignment.rollout import (PromptDataConfig, RLResult, RolloutBatches, RolloutConfig, completion_features,
                                      completion_mask, full_sequence, load_prompt_sets, load_reward_function, reference_logps,
                                      reward_evaluator, start_policy, token_logps, train_online)
from jaxllm.peft import PeftSection
from jaxllm.stages.sections import InitConfig
from jaxllm.training.loop import LoopConfig
from jaxllm.training.optim import OptimConfig

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


# --------------------------------------------------------------------------- the stage


@dataclasses.dataclass(frozen=True)
class PPOSection:
    reward_model: typing.Optional[str] = None   # a `jaxllm reward` run (required)
    kl_coef: float = 0.05                       # the initial coefficient when adaptive
    kl_estimator: str = "k1"                    # k1 | k3
    kl_target: typing.Optional[float] = None    # set: adaptive coefficient aiming at this KL per sequence
    kl_horizon: int = 10000
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    missing_eos_penalty: typing.Optional[float] = 1.0   # subtracted from the score of a response without EOS
    value_trains_trunk: bool = False            # false: the value loss trains the head alone, on the
                                                # policy's features (its gradient never reaches the policy)

    def __post_init__(self):
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"ppo.kl_estimator must be one of {', '.join(KL_ESTIMATORS)}, got {self.kl_estimator!r}")
        if self.kl_coef < 0:
            raise ValueError(f"ppo.kl_coef must be >= 0, got {self.kl_coef}")
        if self.kl_target is not None and not self.kl_target > 0:
            raise ValueError(f"ppo.kl_target must be > 0 (or null: a fixed coefficient), got {self.kl_target}")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    init: InitConfig = dataclasses.field(default_factory=InitConfig)
    peft: PeftSection = dataclasses.field(default_factory=lambda: PeftSection(method="full"))
    data: PromptDataConfig = dataclasses.field(default_factory=PromptDataConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=lambda: RolloutConfig(temperature=0.7, epochs=4))
    ppo: PPOSection = dataclasses.field(default_factory=PPOSection)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(
        learning_rate=3e-6, min_lr=3e-6, warmup_iters=0, lr_decay_iters=100, weight_decay=0.0))
    train: LoopConfig = dataclasses.field(default_factory=lambda: LoopConfig(
        out_dir="runs/ppo", batch_size=32, max_iters=100, eval_interval=25, log_interval=1, ckpt_interval=25))


def ppo_loss_fn(section: PPOSection, P: int, temperature: float):
    """loss_fn(model, batch, key) on one minibatch: clipped policy loss + vf_coef x clipped value loss
    (means over real tokens), with TRL's metric names. No dropout: the ratio compares one policy."""
    def loss_fn(model, batch, key):
        h = completion_features(model.trunk, batch["tokens"], batch["attn"], P)
        logps, entropy = token_logps(model.trunk, h, batch["completion"], temperature)
        values = model.values(h if section.value_trains_trunk else jax.lax.stop_gradient(h))
        mask = batch["mask"]
        pg, pg_metrics = policy_loss(logps, batch["old_logps"], batch["advantages"], mask, cliprange=section.cliprange)
        vf, vf_metrics = value_loss(values, batch["old_values"], batch["returns"], mask,
                                    cliprange_value=section.cliprange_value)
        metrics = {**pg_metrics, **vf_metrics, "loss/policy": jax.lax.stop_gradient(pg),
                   "loss/value": jax.lax.stop_gradient(vf),
                   "policy/entropy": jax.lax.stop_gradient(masked_mean(entropy, mask))}
        return pg + section.vf_coef * vf, jnp.ones((), jnp.float32), metrics
    return loss_fn


def score_rollout(model, reward_model, reference, batch, P: int, temperature: float, kl_coef, section: PPOSection,
                  has_eos):
    """Traceable: the fields PPO's update reads (old log-probs and values, advantages, returns) and
    the rollout's metrics, from a batch of prompt + completion rows."""
    mask = batch["mask"]
    h = completion_features(model.trunk, batch["tokens"], batch["attn"], P)
    logps, entropy = token_logps(model.trunk, h, batch["completion"], temperature)
    values = model.values(h)
    ref = reference_logps(model, reference, batch, P, temperature)
    scores = reward_model(batch["tokens"], attention_mask=batch["attn"])     # read at the EOS (last real token)
    if section.missing_eos_penalty is not None:
        scores = jnp.where(has_eos, scores, scores - section.missing_eos_penalty)
    rewards, kl = rewards_with_kl(scores, logps, ref, mask, kl_coef, estimator=section.kl_estimator)
    if section.whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(rewards, values, mask, gamma=section.gamma, lam=section.lam)
    advantages = whiten(advantages, mask)
    kl_per_seq = jnp.sum(kl, axis=1)
    non_score = -kl_coef * kl_per_seq
    metrics = {"objective/kl": jnp.mean(kl_per_seq), "objective/kl_per_token": masked_mean(kl, mask),
               "objective/entropy": masked_mean(entropy, mask), "objective/scores": jnp.mean(scores),
               "objective/non_score_reward": jnp.mean(non_score),
               "objective/rlhf_reward": jnp.mean(scores + non_score)}
    fields = {"old_logps": logps, "old_values": values, "advantages": advantages, "returns": returns}
    return fields, metrics


class PPORollouts(RolloutBatches):
    def __init__(self, *args, section: PPOSection, reward_model, reference, **kwargs):
        super().__init__(*args, group=1, **kwargs)
        self.section, self.reference = section, reference
        self.rm_graphdef, self.rm_state = nnx.split(reward_model)
        self.kl_coef = float(section.kl_coef)

    def bind(self, graphdef, mesh) -> None:
        super().bind(graphdef, mesh)
        P, temperature, section = self.P, self.cfg.temperature, self.section
        ref_graphdef = self.reference[0] if isinstance(self.reference, tuple) else None
        self._ref_state = self._constant(self.reference[1] if isinstance(self.reference, tuple) else None)
        self.rm_state = self._constant(self.rm_state)
        rm_graphdef = self.rm_graphdef

        @jax.jit
        def score(trainable, frozen, ref_state, rm_state, batch, has_eos, kl_coef):
            model = nnx.merge(graphdef, trainable, frozen)
            reference = "adapter_off" if ref_state is None else nnx.merge(ref_graphdef, ref_state)
            return score_rollout(model, nnx.merge(rm_graphdef, rm_state), reference, batch, P, temperature,
                                 kl_coef, section, has_eos)
        self._score = score

    def score(self, state, batch, info):
        fields, metrics = parallel.gather_to_host(self._score(state.trainable, state.frozen, self._ref_state,
                                                              self.rm_state, batch, info["has_eos"],
                                                              np.float32(self.kl_coef)))
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["objective/kl_coef"] = self.kl_coef
        if self.section.kl_target is not None:   # Ziegler et al.'s proportional controller
            error = float(np.clip(metrics["objective/kl"] / self.section.kl_target - 1.0, -0.2, 0.2))
            self.kl_coef *= 1.0 + error * self.rows / self.section.kl_horizon
        return fields, metrics

    def state_dict(self) -> dict:
        return {"kl_coef": self.kl_coef}

    def load_state_dict(self, d: dict) -> None:
        self.kl_coef = float(d.get("kl_coef", self.section.kl_coef))


def run_ppo(config: PPOConfig) -> RLResult:
    section, ro, loop = config.ppo, config.rollout, config.train
    if not section.reward_model:
        raise ValueError("ppo.reward_model is required: a `jaxllm reward` run directory")
    model, gpt, cfg, tok, trainable, reference = start_policy(config, "ppo", value_head=True)
    reward_model, _, rm_eos = load_reward_model(section.reward_model, tokenizer=tok)
    train_prompts, held, eos, pad = load_prompt_sets(config.data, tok, cfg.block_size, ro.max_new_tokens, "ppo")
    if rm_eos != eos:
        raise ValueError(f"the reward model {section.reward_model} reads its score at EOS id {rm_eos}, but the "
                         f"policy ends responses with EOS id {eos}; set data.eos_id={rm_eos}")
    online = PPORollouts(train_prompts, tok, cfg, rollout=ro, accum=loop.grad_accum, micro=loop.batch_size,
                         eos=eos, pad=pad, seed=loop.seed, section=section, reward_model=reward_model,
                         reference=reference)
    print(f"ppo on {len(train_prompts):,} prompts, {online.rows} rollouts per step, {ro.epochs} epochs x "
          f"{ro.num_mini_batches} minibatches; kl_coef {section.kl_coef}"
          + (f" (adaptive, target {section.kl_target})" if section.kl_target is not None else ""))
    make_eval = None
    if held is not None:
        rm_graphdef, rm_state = nnx.split(reward_model)
        score_jit = jax.jit(lambda st, tokens, attn: nnx.merge(rm_graphdef, st)(tokens, attention_mask=attn))

        def rm_score(state, completion):
            tokens, attn = full_sequence(held.tokens, held.real, completion, completion_mask(completion, eos)[0])
            n, B = len(tokens), config.data.eval_batch_size
            scores = [parallel.gather_to_host(score_jit(rm_state, tokens[np.arange(s, s + B) % n],
                                                        attn[np.arange(s, s + B) % n]))
                      for s in range(0, n, B)]
            return {"val_score": float(np.concatenate(scores)[:n].mean())}
        # held-out records with answers are also scored by exact match: the true reward, where known
        fns = ["exact_match"] if all("target" in c or "answer" in c for c in held.columns) else []
        make_eval = reward_evaluator(held, tok, cfg, [load_reward_function(f) for f in fns], [1.0] * len(fns),
                                     ro.max_new_tokens, config.data.eval_batch_size, eos, pad, extra=rm_score)
    loss_fn = ppo_loss_fn(section, online.P, ro.temperature)
    return train_online("ppo", config, model, trainable, loss_fn, cfg, tok, online, make_eval,
                        meta_extra={"head": "value"})
