"""PPO's pieces (jaxllm.alignment.ppo) against plain loops and hand computations."""

import ast
import pathlib
import textwrap
import types
import typing
import zipfile

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


# --------------------------------------------------------------------------- against TRL's own code
# TRL 1.x ships no PPO; its last PPOTrainer is in TRL 0.19.1, which cannot be installed beside the
# TRL 1.16 the other parity tests use. `make install-dev` downloads its wheel into .cache/wheels and
# these tests run the very lines of its ppo_trainer.py (steps 4-6 of a rollout, and the minibatch
# losses) and core.py (masked_mean, masked_whiten), read from the wheel, on the same tensors.

WHEELS = pathlib.Path(__file__).resolve().parents[1] / ".cache" / "wheels"


def _trl_019():
    wheels = sorted(WHEELS.glob("trl-0.19.1-*.whl"))
    if not wheels:
        pytest.skip(f"TRL 0.19.1's wheel is not in {WHEELS} (`make install-dev` downloads it)")
    torch = pytest.importorskip("torch")
    with zipfile.ZipFile(wheels[0]) as z:
        core, trainer = z.read("trl/core.py").decode(), z.read("trl/trainer/ppo_trainer.py").decode()
    namespace = {"torch": torch, "Optional": typing.Optional, "INVALID_LOGPROB": 1.0, "empty_cache": lambda: None}
    tree = ast.parse(core)
    wanted = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("masked_mean", "masked_var",
                                                                                    "masked_whiten")]
    assert len(wanted) == 3, "TRL 0.19.1's core.py no longer has masked_mean/var/whiten"
    exec(compile(ast.Module(wanted, []), "trl/core.py", "exec"), namespace)
    return torch, trainer, namespace


def _lines(source: str, first: str, last: str) -> str:
    """The lines of `source` from the one containing `first` through the one containing `last`, dedented."""
    lines = source.splitlines()
    start = next(i for i, line in enumerate(lines) if first in line)
    end = next(i for i in range(start, len(lines)) if last in lines[i])
    return textwrap.dedent("\n".join(lines[start:end + 1]))


def _trl_rollout(B=6, T=8, seed=3):
    """A fixed rollout as TRL holds it: responses padded after EOS, sequence_lengths = EOS index."""
    rng = np.random.default_rng(seed)
    ends = rng.integers(0, T, B)
    ends[0], ends[1] = T - 1, 0          # EOS at the last position, EOS first
    return {"ends": ends, "logprobs": rng.normal(-1.5, 0.6, (B, T)), "ref_logprobs": rng.normal(-1.5, 0.6, (B, T)),
            "values": rng.normal(0.3, 1.0, (B, T)), "scores": rng.normal(0.0, 2.0, B)}


@pytest.mark.parametrize("estimator,whiten_rewards", [("k1", False), ("k3", False), ("k1", True)])
def test_rewards_gae_and_whitened_advantages_equal_trls_ppo_trainer_code(estimator, whiten_rewards):
    """TRL puts the score one past EOS (its "p1" position, where a value is kept) unless EOS is last;
    the same layout is jaxllm's functions with the mask extended by that one position (the score
    lands on the mask's last token), advantages whitened over the real tokens."""
    torch, trainer, ns = _trl_019()
    r = _trl_rollout()
    B, T = r["logprobs"].shape
    args = types.SimpleNamespace(kl_estimator=estimator, kl_coef=0.07, whiten_rewards=whiten_rewards, gamma=1.0,
                                 lam=0.95)
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in r.items() if k != "ends"}
    ns.update(args=args, responses=torch.zeros((B, T), dtype=torch.long),
              sequence_lengths=torch.tensor(r["ends"]), **t)
    exec(_lines(trainer, "response_idxs = torch.arange(responses.shape[1]",
                "advantages = torch.masked_fill(advantages, padding_mask, 0)"), ns)
    mask = ~ns["padding_mask"].numpy()
    mask_p1 = ~ns["padding_mask_p1"].numpy()
    logps, ref = ns["logprobs"].numpy(), ns["ref_logprobs"].numpy()           # INVALID_LOGPROB past EOS
    rewards, kl = rewards_with_kl(r["scores"], logps, ref, mask_p1, 0.07, estimator=estimator)
    if whiten_rewards:
        rewards = whiten(rewards, mask_p1, shift_mean=False)
    np.testing.assert_allclose(np.asarray(rewards), ns["rewards"].numpy(), rtol=1e-6, atol=1e-6)
    adv, ret = gae(rewards, ns["values"].numpy(), mask_p1, gamma=1.0, lam=0.95)
    np.testing.assert_allclose(np.asarray(ret), ns["returns"].numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(whiten(adv, mask)), ns["advantages"].numpy(), rtol=1e-5, atol=1e-6)


def test_clipped_policy_and_value_losses_equal_trls_ppo_trainer_code():
    torch, trainer, ns = _trl_019()
    r = _trl_rollout(seed=5)
    rng = np.random.default_rng(9)
    B, T = r["logprobs"].shape
    idx = np.arange(T)[None, :]
    padding_mask, padding_mask_p1 = idx > r["ends"][:, None], idx > (r["ends"] + 1)[:, None]
    old = np.where(padding_mask, 1.0, r["logprobs"])
    new = np.where(padding_mask, 1.0, old + rng.normal(0, 0.3, (B, T)))     # some ratios leave [0.8, 1.2]
    old_values = np.where(padding_mask_p1, 0.0, r["values"])
    vpred = np.where(padding_mask_p1, 0.0, old_values + rng.normal(0, 0.4, (B, T)))
    adv = np.where(padding_mask, 0.0, rng.normal(0, 1, (B, T)))
    returns = np.where(padding_mask_p1, 0.0, rng.normal(0, 1, (B, T)))
    tt = lambda x: torch.tensor(x, dtype=torch.float64)   # noqa: E731
    ns.update(args=types.SimpleNamespace(cliprange=0.2, cliprange_value=0.2, vf_coef=0.1), micro_batch_inds=slice(None),
              padding_mask=torch.tensor(padding_mask), padding_mask_p1=torch.tensor(padding_mask_p1),
              vpred=tt(vpred), mb_values=tt(old_values), mb_return=tt(returns), new_logprobs=tt(new),
              mb_logprobs=tt(old), mb_advantage=tt(adv))
    exec(_lines(trainer, "vpredclipped = torch.clamp(", "loss = pg_loss + args.vf_coef * vf_loss"), ns)
    exec(_lines(trainer, "pg_clipfrac = masked_mean(", "(pg_losses2 > pg_losses).float()") + "\n)", ns)
    pg, pg_metrics = policy_loss(new, old, adv, ~padding_mask, cliprange=0.2)
    vf, vf_metrics = value_loss(vpred, old_values, returns, ~padding_mask_p1, cliprange_value=0.2)
    np.testing.assert_allclose(float(pg), ns["pg_loss"].item(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(vf), ns["vf_loss"].item(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(pg_metrics["policy/clipfrac"]), ns["pg_clipfrac"].item(), atol=1e-7)
    np.testing.assert_allclose(float(vf_metrics["val/clipfrac"]), ns["vf_clipfrac"].item(), atol=1e-7)
    assert 0.0 < ns["pg_clipfrac"].item() < 1.0 and 0.0 < ns["vf_clipfrac"].item() < 1.0
