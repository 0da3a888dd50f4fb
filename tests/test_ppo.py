"""PPO's pieces (jaxllm.alignment.ppo) against plain loops and hand computations."""

import numpy as np
import pytest

from jaxllm.alignment.ppo import gae, kl_estimate, policy_loss, rewards_with_kl, value_loss, whiten

RNG = np.random.default_rng(11)


def _mask(B=5, T=8):
    mask = np.zeros((B, T), bool)
    for i, n in enumerate(RNG.integers(1, T + 1, B)):
        mask[i, :n] = True
    mask[0] = True                       # one row that fills the width
    return mask


def test_gae_matches_a_plain_backward_loop_over_each_rows_real_tokens():
    mask = _mask()
    rewards, values = RNG.normal(0, 1, mask.shape), RNG.normal(0, 1, mask.shape)
    garbage = np.where(mask, 0.0, 1e3)   # padding must not leak in
    adv, ret = gae(rewards + garbage, values + garbage, mask, gamma=0.99, lam=0.9)
    for b in range(mask.shape[0]):
        n, last = int(mask[b].sum()), 0.0
        want = np.zeros(mask.shape[1])
        for t in reversed(range(n)):
            next_v = values[b, t + 1] if t + 1 < n else 0.0
            last = rewards[b, t] + 0.99 * next_v - values[b, t] + 0.99 * 0.9 * last
            want[t] = last
        np.testing.assert_allclose(np.asarray(adv)[b], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(ret)[b, :n], want[:n] + values[b, :n], rtol=1e-5, atol=1e-5)
        assert np.all(np.asarray(ret)[b, n:] == 0.0)


def test_whitening_uses_real_tokens_only():
    mask = _mask()
    x = RNG.normal(3, 2, mask.shape)
    w = np.asarray(whiten(x + np.where(mask, 0.0, 50.0), mask))
    real = x[mask]
    np.testing.assert_allclose(w[mask], (real - real.mean()) / np.sqrt(real.var(ddof=1) + 1e-8), rtol=1e-4)
    assert np.all(w[~mask] == 0.0)
    kept = np.asarray(whiten(x, mask, shift_mean=False))
    np.testing.assert_allclose(kept[mask].mean(), real.mean(), rtol=1e-4)   # the scale only


def test_kl_is_exactly_zero_when_policy_equals_reference_and_the_score_lands_on_eos():
    mask = _mask()
    logps = RNG.normal(-2, 1, mask.shape)
    scores = RNG.normal(0, 1, mask.shape[0])
    for est in ("k1", "k3"):
        rewards, kl = rewards_with_kl(scores, logps, logps, mask, 0.05, estimator=est)
        assert np.all(np.asarray(kl) == 0.0)
        rewards = np.asarray(rewards)
        for b in range(mask.shape[0]):
            last = np.flatnonzero(mask[b])[-1]
            np.testing.assert_allclose(rewards[b, last], scores[b], rtol=1e-6)
            assert np.all(np.delete(rewards[b], last) == 0.0)
    ref = logps + RNG.normal(0, 0.3, mask.shape)
    rewards, kl = rewards_with_kl(scores, logps, ref, mask, 0.05, estimator="k3")
    r = ref - logps
    np.testing.assert_allclose(np.asarray(kl)[mask], (np.exp(r) - 1 - r)[mask], rtol=1e-4, atol=1e-7)
    assert np.all(np.asarray(kl) >= 0.0) and np.all(np.asarray(kl)[~mask] == 0.0)
    np.testing.assert_allclose(np.asarray(kl_estimate(logps, ref, "k1")), logps - ref, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="k1, k3"):
        kl_estimate(logps, ref, "k2")


def test_clipped_policy_and_value_losses_match_a_hand_computation_over_real_tokens():
    mask = _mask()
    old = RNG.normal(-2, 1, mask.shape)
    new = old + RNG.normal(0, 0.4, mask.shape)
    adv = RNG.normal(0, 1, mask.shape)
    ratio = np.exp(new - old)
    per = np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.2))
    loss, m = policy_loss(new, old, adv, mask, cliprange=0.2)
    np.testing.assert_allclose(float(loss), per[mask].mean(), rtol=1e-5)
    clipped = (-adv * np.clip(ratio, 0.8, 1.2)) > (-adv * ratio)
    np.testing.assert_allclose(float(m["policy/clipfrac"]), clipped[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(m["policy/approxkl"]), 0.5 * ((new - old)[mask] ** 2).mean(), rtol=1e-5)
    assert 0.0 < float(m["policy/clipfrac"]) < 1.0
    v_old = RNG.normal(0, 1, mask.shape)
    v = v_old + RNG.normal(0, 0.5, mask.shape)
    ret = RNG.normal(0, 1, mask.shape)
    vl, vm = value_loss(v, v_old, ret, mask, cliprange_value=0.2)
    l1, l2 = (v - ret) ** 2, (np.clip(v, v_old - 0.2, v_old + 0.2) - ret) ** 2
    np.testing.assert_allclose(float(vl), 0.5 * np.maximum(l1, l2)[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(vm["val/clipfrac"]), (l2 > l1)[mask].mean(), rtol=1e-5)
    assert 0.0 < float(vm["val/clipfrac"]) < 1.0
    # on-policy (ratio 1): no clipping, and the loss is minus the mean advantage over real tokens
    loss, m = policy_loss(old, old, adv, mask)
    np.testing.assert_allclose(float(loss), -adv[mask].mean(), rtol=1e-5)
    assert float(m["policy/clipfrac"]) == 0.0 and float(m["policy/approxkl"]) == 0.0
