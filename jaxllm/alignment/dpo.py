"""Direct Preference Optimization: `jaxllm dpo` / `python train/dpo.py`.

DPO (Rafailov et al., 2023) trains the policy on preference pairs directly, with no reward model and
no sampling: the implicit reward of a response is beta * (log pi(y|x) - log pi_ref(y|x)), and the
loss asks the chosen response's implicit reward to exceed the rejected one's. The loss types follow
TRL's DPOTrainer (v1.16), on delta = (chosen log-ratio) - (rejected log-ratio):

- sigmoid: -log sigmoid(beta * delta)                                   (DPO)
- hinge:   relu(1 - beta * delta)                                       (SLiC)
- ipo:     (delta_avg - 1 / (2 beta))^2, each log-ratio averaged over its response's token count
           (IPO; beta is its tau)
- robust:  (-(1 - eps) log sigmoid(beta delta) + eps log sigmoid(-beta delta)) / (1 - 2 eps), eps =
           label_smoothing, the probability that a preference label is flipped, in [0, 0.5)

`sft_weight` w > 0 adds w times the chosen responses' negative log-likelihood, averaged over their
tokens in the batch: TRL's loss_type=["<type>", "sft"] with loss_weights=[1, w] (RPO, Pang et al.,
2024). Pure DPO only asks the chosen response to gain on the rejected one, and both often lose
probability (the mass goes to answers in neither): when the chosen responses are the right answers,
the likelihood term keeps them likely.

Metrics carry TRL's names: rewards/chosen, rewards/rejected (beta x log-ratio, means over pairs),
rewards/accuracies, rewards/margins, logps/chosen, logps/rejected (summed over response tokens).
Chosen rewards often fall while the margin rises: the model moves mass off both responses, more
off the rejected one. That is expected, not a bug.

The reference log-probs come from (peft... `dpo.reference`):
- adapter_off: the policy with its LoRA/adapters/prefix switched off (`jaxllm.peft.disabled`): the
  base, with no second copy of the weights (PEFT runs; TRL does the same);
- copy: a frozen copy of the starting weights, computed at every step (twice the weights in memory);
- precomputed: computed once, before training, with the starting model (the default for full
  fine-tuning: with dropout off it gives a copy's numbers at no cost per step).
"""

from __future__ import annotations

import dataclasses
import typing

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm import peft
from jaxllm.alignment.pairs import (PairBatch, PreferenceDataConfig, base_and_tokenizer, both_sides, eval_batches,
                                    load_pair_files, pair_batch, pair_evaluator, train_on_pairs)
from jaxllm.losses import label_logps
from jaxllm.model import count_params
from jaxllm.peft import PeftSection, apply_method, format_report, parameter_report
from jaxllm.stages.sections import InitConfig
from jaxllm.training.loop import LoopConfig, TrainResult
from jaxllm.training.optim import OptimConfig

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
REFERENCES = ("auto", "adapter_off", "copy", "precomputed")


# --------------------------------------------------------------------------- the loss


def dpo_per_pair(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
                 beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 chosen_lengths=None, rejected_lengths=None, sft_weight: float = 0.0,
                 weight=None) -> tuple[jax.Array, dict]:
    """(loss per pair (B,), metrics per pair {name: (B,)}); see the module docstring. `weight` (B,)
    marks the real pairs (1) among padding ones (0): the SFT term's per-token mean counts only
    those, and a pair's share is scaled so the weighted mean over pairs is that token mean."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) (robust DPO's flip probability), got {label_smoothing}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -jax.nn.log_sigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1.0 - beta * delta)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type='ipo' averages each log-ratio over its response's tokens: "
                             "pass chosen_lengths and rejected_lengths")
        avg = (chosen_logratios / jnp.maximum(chosen_lengths, 1.0)
               - rejected_logratios / jnp.maximum(rejected_lengths, 1.0))
        losses = (avg - 1.0 / (2.0 * beta)) ** 2
    else:  # robust
        eps = label_smoothing
        losses = (-(1.0 - eps) * jax.nn.log_sigmoid(beta * delta)
                  + eps * jax.nn.log_sigmoid(-beta * delta)) / (1.0 - 2.0 * eps)
    if sft_weight:
        if chosen_lengths is None:
            raise ValueError("sft_weight averages the chosen responses' log-probs over their tokens: "
                             "pass chosen_lengths")
        w = jnp.ones_like(policy_chosen_logps) if weight is None else weight
        tokens = jnp.maximum(jnp.sum(chosen_lengths * w), 1.0)
        losses = losses - sft_weight * policy_chosen_logps * (jnp.sum(w) / tokens)
    chosen_rewards = jax.lax.stop_gradient(beta * chosen_logratios)
    rejected_rewards = jax.lax.stop_gradient(beta * rejected_logratios)
    metrics = {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
               "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(jnp.float32),
               "rewards/margins": chosen_rewards - rejected_rewards,
               "logps/chosen": jax.lax.stop_gradient(policy_chosen_logps),
               "logps/rejected": jax.lax.stop_gradient(policy_rejected_logps)}
    return losses, metrics


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths=None, rejected_lengths=None, sft_weight: float = 0.0) -> tuple[jax.Array, dict]:
    """(mean loss over the pairs, metrics averaged over the pairs), as TRL's DPOTrainer computes them."""
    losses, metrics = dpo_per_pair(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                   ref_rejected_logps, beta=beta, loss_type=loss_type,
                                   label_smoothing=label_smoothing, chosen_lengths=chosen_lengths,
                                   rejected_lengths=rejected_lengths, sft_weight=sft_weight)
    return jnp.mean(losses), {k: jnp.mean(v) for k, v in metrics.items()}


def sequence_logps(model, input_ids, attention_mask, labels, *, dropout_key=None, return_counts: bool = False):
    """(B,) sum of the log-probs of the labelled tokens of each row (labels -100 elsewhere, aligned
    with the ids: the shift is done here); with `return_counts`, also how many tokens each sums."""
    logits_BTV = model(input_ids, attention_mask=attention_mask, dropout_key=dropout_key)
    sums, counts = label_logps(logits_BTV, labels)
    return (sums, counts) if return_counts else sums


# --------------------------------------------------------------------------- the stage


@dataclasses.dataclass(frozen=True)
class DPOSection:
    beta: float = 0.1
    loss_type: str = "sigmoid"             # sigmoid | ipo | hinge | robust
    label_smoothing: float = 0.0           # robust: the probability a label is flipped, in [0, 0.5)
    sft_weight: float = 0.0                # > 0: plus this times the chosen tokens' NLL (RPO; TRL's "sft" loss)
    reference: str = "auto"                # auto | adapter_off | copy | precomputed (see the module docstring)
    disable_dropout: bool = True           # as TRL: the policy's log-probs without dropout

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"dpo.loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.reference not in REFERENCES:
            raise ValueError(f"dpo.reference must be one of {', '.join(REFERENCES)}, got {self.reference!r}")
        if not 0.0 < self.beta < float("inf"):
            raise ValueError(f"dpo.beta must be a positive number, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if not 0.0 <= self.sft_weight < float("inf"):
            raise ValueError(f"dpo.sft_weight must be a number >= 0, got {self.sft_weight}")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    init: InitConfig = dataclasses.field(default_factory=InitConfig)
    peft: PeftSection = dataclasses.field(default_factory=lambda: PeftSection(method="full"))
    data: PreferenceDataConfig = dataclasses.field(default_factory=PreferenceDataConfig)
    dpo: DPOSection = dataclasses.field(default_factory=DPOSection)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(
        learning_rate=5e-5, min_lr=5e-5, warmup_iters=10, lr_decay_iters=300, weight_decay=0.0))
    train: LoopConfig = dataclasses.field(default_factory=lambda: LoopConfig(
        out_dir="runs/dpo", batch_size=16, max_iters=300, eval_interval=100, log_interval=10,
        ckpt_interval=100))


@dataclasses.dataclass
class DPOResult:
    train: TrainResult
    before: dict          # held-out loss and metrics of the starting model (loss ln 2 for sigmoid)
    after: dict
    reference: str        # the reference mode used
    reference_drift: float  # largest change of a held-out reference log-prob during training (0: frozen)
    config: typing.Any    # GPTConfig


def resolve_reference(section: DPOSection, method: str) -> str:
    if section.reference == "auto":
        return "precomputed" if method == "full" else "adapter_off"
    if section.reference == "adapter_off" and method == "full":
        raise ValueError("dpo.reference=adapter_off needs a PEFT method (peft.method=lora|adapter|prefix): "
                         "with full fine-tuning there is no adapter to switch off; use precomputed or copy")
    return section.reference


def dpo_loss_fn(section: DPOSection, reference: str, ref_graphdef=None):
    """loss_fn(model, batch, key[, ref_state]) for the shared train step: sums over the batch's
    pairs (weighted: padding pairs weigh 0) and the pair count, plus TRL's metrics as sums."""

    def loss_fn(model, batch: PairBatch, key, ref_state=None):
        tokens, mask, labels = both_sides(batch)
        key = None if section.disable_dropout else key
        logps, counts = sequence_logps(model, tokens, mask, labels, dropout_key=key, return_counts=True)
        if reference == "adapter_off":
            with peft.disabled(model):
                ref = jax.lax.stop_gradient(sequence_logps(model, tokens, mask, labels))
        elif reference == "copy":
            ref = jax.lax.stop_gradient(sequence_logps(nnx.merge(ref_graphdef, ref_state), tokens, mask, labels))
        else:
            ref = jnp.concatenate([batch.ref_chosen, batch.ref_rejected])
        B = batch.weight.shape[0]
        losses, metrics = dpo_per_pair(logps[:B], logps[B:], ref[:B], ref[B:], beta=section.beta,
                                       loss_type=section.loss_type, label_smoothing=section.label_smoothing,
                                       chosen_lengths=counts[:B], rejected_lengths=counts[B:],
                                       sft_weight=section.sft_weight, weight=batch.weight)
        w = batch.weight
        return jnp.sum(losses * w), jnp.sum(w), {k: jnp.sum(v * w) for k, v in metrics.items()}
    return loss_fn


@jax.jit
def _logps_jit(graphdef, state, tokens, mask, labels):
    return sequence_logps(nnx.merge(graphdef, state), tokens, mask, labels)


def _held_out_reference(model, reference: str, data: PairBatch, batch_size: int, ref_graphdef, constants):
    """(B,) + (B,) reference log-probs of the held-out pairs, read from wherever the mode keeps them."""
    if reference == "precomputed":
        return data.ref_chosen, data.ref_rejected
    if reference == "copy":
        return reference_logps(nnx.merge(ref_graphdef, constants), data, batch_size)
    with peft.disabled(model):
        return reference_logps(model, data, batch_size)


def reference_logps(model, data: PairBatch, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The model's summed response log-probs of every pair's two sides, computed once (no dropout)."""
    graphdef, state = nnx.split(model)
    n = data.weight.shape[0]
    out = []
    for batch in eval_batches(data, batch_size):
        out.append(np.asarray(_logps_jit(graphdef, state, *both_sides(batch))))
    both = np.concatenate([o.reshape(2, -1) for o in out], axis=1)[:, :n]
    return both[0], both[1]


def run_dpo(config: DPOConfig) -> DPOResult:
    d, section = config.data, config.dpo
    model, cfg, tok = base_and_tokenizer(config.init, d.tokenizer, "dpo")
    T = cfg.block_size
    train_ds, held_ds = load_pair_files(d, tok, T)
    trainable = apply_method(model, config.peft)
    reference = resolve_reference(section, config.peft.method)
    report = parameter_report(model, trainable)
    loss_name = section.loss_type + (f" + {section.sft_weight} x sft" if section.sft_weight else "")
    print(f"dpo ({loss_name}, beta {section.beta}, reference: {reference}) on {len(train_ds):,} pairs, "
          f"{len(held_ds):,} held out; model: {count_params(model):,} parameters; method: "
          f"{config.peft.method}; {format_report(report)}")

    train_data, held_data = pair_batch(train_ds.rows(T)), pair_batch(held_ds.rows(T))
    ref_graphdef = constants = None
    if reference == "precomputed":  # with the starting model (the base: a resumed run restores later)
        train_data = train_data._replace(**dict(zip(("ref_chosen", "ref_rejected"),
                                                     reference_logps(model, train_data, d.eval_batch_size))))
        held_data = held_data._replace(**dict(zip(("ref_chosen", "ref_rejected"),
                                                   reference_logps(model, held_data, d.eval_batch_size))))
    elif reference == "copy":
        ref_graphdef, ref_state = nnx.split(model)
        constants = jax.tree.map(jnp.copy, ref_state)   # its own buffers: the train step donates the model's
    loss_fn = dpo_loss_fn(section, reference, ref_graphdef)
    make_eval = pair_evaluator(held_data, d.eval_batch_size, loss_fn, constants)

    ref_before = _held_out_reference(model, reference, held_data, d.eval_batch_size, ref_graphdef, constants)
    result, before, after = train_on_pairs("dpo", config, model, trainable, loss_fn, cfg, tok, train_ds, train_data,
                                           make_eval, constants=constants)
    ref_after = _held_out_reference(result.model, reference, held_data, d.eval_batch_size, ref_graphdef, constants)
    drift = float(max(np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(ref_before, ref_after)))
    return DPOResult(result, before, after, reference, drift, cfg)
