"""GRPO's advantages and loss (jaxllm.alignment.grpo) against hand computations and TRL's own code."""

import collections
import types

import numpy as np
import pytest

from jaxllm.alignment.grpo import grpo_loss, group_advantages

RNG = np.random.default_rng(7)


def test_group_advantages_match_a_plain_loop_for_each_scaling():
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.5, -1.0, 3.0, 0.0])
    G = 4
    for scale in ("group", "batch", "none"):
        adv, std = group_advantages(rewards, G, scale=scale)
        want = []
        for g in range(len(rewards) // G):
            r = rewards[g * G:(g + 1) * G]
            s = np.std(rewards, ddof=1) if scale == "batch" else np.std(r, ddof=1)
            want += [(x - r.mean()) / (s + 1e-4) if scale != "none" else x - r.mean() for x in r]
        np.testing.assert_allclose(np.asarray(adv), want, rtol=1e-5, atol=1e-6)
    adv, std = group_advantages(rewards, G)
    assert np.all(np.asarray(adv)[4:8] == 0.0) and np.all(np.asarray(std)[4:8] == 0.0)   # a tied group
    adv, _ = group_advantages(rewards, 1)      # one sample per prompt: no baseline to compare with
    assert np.all(np.asarray(adv) == 0.0)
    with pytest.raises(ValueError, match="groups of 5"):
        group_advantages(rewards, 5)


def _rollout(B=6, T=7):
    mask = np.zeros((B, T), np.float32)
    for i, n in enumerate(RNG.integers(1, T + 1, B)):
        mask[i, :n] = 1.0
    old = RNG.normal(-2.0, 0.7, (B, T))
    logps = old + RNG.normal(0, 0.3, (B, T))     # some ratios leave [0.8, 1.2]
    ref = old + RNG.normal(0, 0.2, (B, T))
    adv = RNG.normal(0, 1, B)
    return logps, old, ref, adv, mask


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
def test_grpo_loss_matches_a_hand_computation(loss_type):
    logps, old, ref, adv, mask = _rollout()
    beta, eps = 0.04, 0.2
    ratio = np.exp(logps - old)
    per_token = -np.minimum(ratio * adv[:, None], np.clip(ratio, 1 - eps, 1 + eps) * adv[:, None])
    per_token += beta * (np.exp(ref - logps) - (ref - logps) - 1)
    want = (np.mean((per_token * mask).sum(1) / mask.sum(1)) if loss_type == "grpo"
            else (per_token * mask).sum() / (mask.shape[0] * 10))
    loss, m = grpo_loss(logps, old, adv, mask, ref, beta=beta, epsilon=eps, loss_type=loss_type,
                        max_completion_length=10)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert 0.0 < float(m["clip_ratio/region_mean"]) < 1.0


def test_on_policy_first_step_has_zero_kl_and_no_clipping():
    """logps == old == ref: the ratio is 1, KL exactly 0, and the loss is minus the mean advantage."""
    _, old, _, adv, mask = _rollout()
    loss, m = grpo_loss(old, old, adv, mask, old, beta=0.1)
    assert float(m["kl"]) == 0.0 and float(m["clip_ratio/region_mean"]) == 0.0
    np.testing.assert_allclose(float(loss), -adv.mean(), rtol=1e-5)


class _Accelerator:
    num_processes = 1

    @staticmethod
    def gather(x):
        return x

    @staticmethod
    def reduce(x, reduction="sum"):
        return x


@pytest.mark.parametrize("loss_type,beta,eps_high", [("grpo", 0.0, None), ("grpo", 0.04, 0.28),
                                                     ("dr_grpo", 0.04, None), ("dr_grpo", 0.0, 0.28)])
def test_grpo_loss_and_metrics_equal_trls_grpo_trainer_code(loss_type, beta, eps_high):
    """TRL's GRPOTrainer._compute_loss on the same per-token log-probs (a stub returns them), with
    the rollout's old and reference log-probs: loss and the logged KL and clip ratios within 1e-6."""
    trl = pytest.importorskip("trl", reason="TRL parity needs the torch extra (pip install -e '.[torch]')")
    import torch
    logps, old, ref, adv, mask = _rollout()
    B, T = mask.shape
    t = lambda x: torch.tensor(x, dtype=torch.float64)   # noqa: E731
    trainer = trl.GRPOTrainer.__new__(trl.GRPOTrainer)
    trainer.__dict__.update(
        model=types.SimpleNamespace(training=True), accelerator=_Accelerator(), top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta, loss_type=loss_type,
        epsilon_low=0.2, epsilon_high=0.2 if eps_high is None else eps_high, use_vllm=False,
        vllm_importance_sampling_correction=False, current_gradient_accumulation_steps=1,
        max_completion_length=T + 3, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None),
        _metrics={"train": collections.defaultdict(list)})
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (t(logps), torch.zeros(B, T, dtype=torch.float64), None)
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": t(mask),
              "advantages": t(adv), "old_per_token_logps": t(old), "ref_per_token_logps": t(ref)}
    trl_loss = trainer._compute_loss(None, inputs)
    loss, metrics = grpo_loss(logps, old, adv, mask, ref, beta=beta, epsilon=0.2, epsilon_high=eps_high,
                              loss_type=loss_type, max_completion_length=T + 3)
    np.testing.assert_allclose(float(loss), float(trl_loss), rtol=1e-6, atol=1e-7)
    assert ("kl" in metrics) == bool(beta)
    for name, value in metrics.items():
        np.testing.assert_allclose(float(value), trainer._metrics["train"][name][0], rtol=1e-6, atol=1e-7,
                                   err_msg=name)


def test_group_std_is_trls_nanstd():
    """The group std (Bessel-corrected, as TRL's nanstd) that scales the advantages."""
    pytest.importorskip("trl", reason="TRL parity needs the torch extra")
    import torch
    from trl.trainer.utils import nanstd
    rewards = RNG.normal(0, 1, 12)
    _, std = group_advantages(rewards, 4)
    want = nanstd(torch.tensor(rewards).view(-1, 4), dim=1).repeat_interleave(4).numpy()
    np.testing.assert_allclose(np.asarray(std), want, rtol=1e-5)
