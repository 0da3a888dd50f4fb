"""Online RL stages (jaxllm ppo, jaxllm grpo): rollout scoring, the update, resume, LoRA, bad input."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import run_main
from jaxllm import peft
from jaxllm.alignment.grpo import GRPOConfig, run_grpo
from jaxllm.alignment.ppo import PPOConfig, PPOSection, ppo_loss_fn, run_ppo, score_rollout
from jaxllm.alignment.rollout import (RolloutBatches, RolloutConfig, call_reward, completion_mask, full_sequence,
                                      policy_logps)
from jaxllm.config import GPTConfig
from jaxllm.configfile import load_config
from jaxllm.data.prompts import tokenize_prompts
from jaxllm.data.synthetic import make_splits
from jaxllm.heads import PolicyWithValue, RewardModel
from jaxllm.model import GPT
from jaxllm.runs import load_checkpoint
from jaxllm.tokenizer import CharTokenizer

CFG = GPTConfig(vocab_size=20, n_layer=1, n_head=2, n_embd=16, block_size=24, dropout=0.0)
EOS, PAD = 1, 0
TINY = ["train.batch_size=8", "train.eval_interval=0", "train.ckpt_interval=0", "train.log_interval=1",
        "train.progress=false", "train.tensorboard=false", "train.peak_flops=1e11", "data.eval_batch_size=8",
        "rollout.max_new_tokens=5"]


# --------------------------------------------------------------------------- rollout scoring


def _rollout_batch(B=4, P=5, R=6, seed=0):
    """Left-padded prompts and completions: EOS at various places, one row without EOS, PAD after EOS."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(2, CFG.vocab_size, (B, P)).astype(np.int32)
    real = np.ones((B, P), bool)
    real[1, :2] = real[3, :1] = False
    prompt[~real] = PAD
    completion = rng.integers(2, CFG.vocab_size, (B, R)).astype(np.int32)
    for b, at in enumerate([2, 0, None, 5]):       # row 2 never ends
        if at is not None:
            completion[b, at] = EOS
            completion[b, at + 1:] = PAD
    mask, has_eos = completion_mask(completion, EOS)
    tokens, attn = full_sequence(prompt, real, completion, mask)
    return {"tokens": tokens, "attn": attn, "completion": completion, "mask": mask}, has_eos


def _models(lora=False):
    gpt = GPT(CFG, rngs=nnx.Rngs(0))
    if lora:
        peft.add_lora(gpt, peft.LoraConfig(r=2), rngs=nnx.Rngs(1))
        reference = "adapter_off"
    else:
        reference = GPT(CFG, rngs=nnx.Rngs(0))          # the same weights: a frozen copy
    return PolicyWithValue(gpt, rngs=nnx.Rngs(2)), RewardModel(CFG, rngs=nnx.Rngs(3)), reference


def test_completion_mask_keeps_the_tokens_through_the_first_eos():
    mask, has_eos = completion_mask(np.array([[5, 1, 0, 0], [5, 6, 7, 8], [1, 0, 1, 0]]), EOS)
    np.testing.assert_array_equal(np.asarray(mask), [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(has_eos), [True, False, True])


@pytest.mark.parametrize("lora", [False, True])
def test_kl_is_exactly_zero_at_the_start_and_the_score_is_read_at_eos_with_the_missing_eos_penalty(lora):
    policy, rm, reference = _models(lora)
    batch, has_eos = _rollout_batch()
    section = PPOSection(missing_eos_penalty=2.5)
    fields, metrics = score_rollout(policy, rm, reference, batch, 5, 0.7, 0.05, section, has_eos)
    assert float(metrics["objective/kl"]) == 0.0 and float(metrics["objective/non_score_reward"]) == 0.0
    # the reward model's score of each row alone: prompt's real tokens + completion through its EOS
    want = []
    for b in range(4):
        row = np.concatenate([batch["tokens"][b, :5][batch["attn"][b, :5]], batch["completion"][b][batch["mask"][b]]])
        want.append(float(rm(row[None])[0]) - (0.0 if has_eos[b] else 2.5))
    np.testing.assert_allclose(float(metrics["objective/scores"]), np.mean(want), rtol=1e-5, atol=1e-6)
    # with KL 0 the rewards are the score alone, at the EOS: GAE's return at the first token is
    # the score (gamma 1, lambda 0.95 only shapes the advantages)
    returns = np.asarray(fields["returns"])
    per_row = [float(rm(np.concatenate([batch["tokens"][b, :5][batch["attn"][b, :5]],
                                        batch["completion"][b][batch["mask"][b]]])[None])[0]) for b in range(4)]
    assert returns.shape == (4, 6) and np.all(returns[~batch["mask"]] == 0.0)
    assert per_row[2] - 2.5 == pytest.approx(want[2])


def test_metrics_and_fields_ignore_what_follows_eos():
    """Garbage after EOS (where the sampler writes PAD) changes no metric and no field at a real token."""
    policy, rm, reference = _models()
    batch, has_eos = _rollout_batch()
    section = PPOSection()
    garbled = dict(batch, completion=np.where(batch["mask"], batch["completion"], 7))
    garbled["tokens"] = np.concatenate([batch["tokens"][:, :5], garbled["completion"]], axis=1)
    f1, m1 = score_rollout(policy, rm, reference, batch, 5, 0.7, 0.1, section, has_eos)
    f2, m2 = score_rollout(policy, rm, reference, garbled, 5, 0.7, 0.1, section, has_eos)
    for k in m1:
        np.testing.assert_allclose(float(m1[k]), float(m2[k]), rtol=1e-6, atol=1e-6, err_msg=k)
    for k in f1:
        np.testing.assert_allclose(np.where(batch["mask"], f1[k], 0), np.where(batch["mask"], f2[k], 0),
                                   rtol=1e-5, atol=1e-6, err_msg=k)
        assert np.all(np.asarray(f1[k])[~batch["mask"]] == 0.0) or k in ("old_logps", "old_values")


def test_first_ppo_pass_has_ratio_one_a_hand_computed_loss_and_a_nonzero_gradient():
    """At the weights that sampled, ratio = 1: the policy loss is -mean(advantages) (0 after
    whitening) and the value loss 0.5 mean((V - R)^2) over real tokens; the gradient is not 0."""
    policy, rm, reference = _models()
    batch, has_eos = _rollout_batch()
    section = PPOSection(vf_coef=0.1)
    fields, _ = score_rollout(policy, rm, reference, batch, 5, 0.7, 0.05, section, has_eos)
    full = {**batch, **fields}
    loss_fn = ppo_loss_fn(section, 5, 0.7)
    loss, _, metrics = loss_fn(policy, full, None)
    m = batch["mask"]
    adv, ret, val = (np.asarray(fields[k]) for k in ("advantages", "returns", "old_values"))
    want_pg = -adv[m].mean()
    want_vf = 0.5 * ((val - ret)[m] ** 2).mean()
    np.testing.assert_allclose(float(metrics["loss/policy"]), want_pg, atol=1e-6)
    np.testing.assert_allclose(float(metrics["loss/value"]), want_vf, rtol=1e-5)
    np.testing.assert_allclose(float(loss), want_pg + 0.1 * want_vf, rtol=1e-5, atol=1e-6)
    assert float(metrics["policy/clipfrac"]) == 0.0 and float(metrics["policy/approxkl"]) < 1e-10
    graphdef, state = nnx.split(policy)
    grads = jax.grad(lambda s: loss_fn(nnx.merge(graphdef, s), full, None)[0])(state)
    trunk_norm = sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(grads["trunk"]))
    assert trunk_norm > 0.0


def test_logps_are_scored_at_the_sampling_temperature():
    gpt = GPT(CFG, rngs=nnx.Rngs(0))
    batch, _ = _rollout_batch()
    lp1, _, h = policy_logps(gpt, batch, 5, 1.0)
    lp2, _, _ = policy_logps(gpt, batch, 5, 0.5)
    logits = np.asarray(gpt.logits(h), np.float64) / 0.5
    want = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    want = np.take_along_axis(want, batch["completion"][..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(lp2), want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.asarray(lp1), np.asarray(lp2))


# --------------------------------------------------------------------------- bad input


def test_reward_function_errors_name_the_function_and_the_sample():
    prompts, completions, cols = ["a", "b"], ["x", "y"], [{}, {}]

    def raises(prompts, completions, **kw):
        raise KeyError("boom")

    def gives_nan(prompts, completions, **kw):
        return [1.0, float("nan")]

    def gives_none(prompts, completions, **kw):
        return [None, 1.0]

    def gives_text(prompts, completions, **kw):
        return [1.0, "high"]

    with pytest.raises(RuntimeError, match="'raises' raised KeyError"):
        call_reward(raises, prompts, completions, cols)
    with pytest.raises(ValueError, match=r"'gives_nan' returned nan for sample 1 \(prompt 'b', completion 'y'\)"):
        call_reward(gives_nan, prompts, completions, cols)
    with pytest.raises(ValueError, match="'gives_none' returned None for sample 0"):
        call_reward(gives_none, prompts, completions, cols)
    with pytest.raises(ValueError, match="'gives_text' returned 'high' for sample 1"):
        call_reward(gives_text, prompts, completions, cols)
    with pytest.raises(ValueError, match="returned 1 rewards for 2"):
        call_reward(lambda p, c, **k: [1.0], prompts, completions, cols)


def test_prompts_longer_than_the_room_are_truncated_or_skipped_and_counted():
    tok = CharTokenizer(list("\x00\x03abcdefgh"))
    records = [{"prompt": "abc"}, {"prompt": "abcdefgh", "answer": "x"}, {"prompt": "ab", "completion": "c"}]
    ps = tokenize_prompts(records, tok, eos_id=1, pad_id=0, max_prompt_len=4, log=None)
    assert ps.stats.truncated == 1 and len(ps) == 3 and ps.tokens.shape == (3, 4)
    assert tok.decode(ps.tokens[1].tolist()) == "efgh"               # its last tokens kept
    assert ps.columns[1] == {"answer": "x"} and ps.columns[2] == {"completion": "c", "target": "c"}
    ps = tokenize_prompts(records, tok, eos_id=1, pad_id=0, max_prompt_len=4, long_prompts="skip", log=None)
    assert ps.stats.too_long == 1 and len(ps) == 2
    with pytest.raises(ValueError, match="no room for a prompt"):
        tokenize_prompts(records, tok, eos_id=1, pad_id=0, max_prompt_len=0)


def test_every_completion_cut_before_eos_is_warned_with_the_fix():
    tok = CharTokenizer(list("\x00\x03abcdefgh"))
    ps = tokenize_prompts([{"prompt": "abc"}] * 4, tok, eos_id=1, pad_id=0, max_prompt_len=8, log=None)

    class Stub(RolloutBatches):
        def score(self, state, batch, info):
            return {}, {}
    ro = Stub(ps, tok, CFG, rollout=RolloutConfig(max_new_tokens=3), accum=1, micro=4, group=2,
              eos=1, pad=0, seed=0)
    ro._sample = lambda *a: np.full((4, 3), 5, np.int32)      # no EOS anywhere
    ro.mesh, ro.settings = None, None
    state = type("S", (), {"trainable": None, "frozen": None})()
    with pytest.warns(RuntimeWarning, match="all 4 completions reached rollout.max_new_tokens=3 without EOS.*Raise"):
        batch, metrics = ro(0, state)
    assert metrics["completions/clipped_ratio"] == 1.0
    assert batch["tokens"].shape == (1, 1, 4, 3 + 3)            # (updates, accum, rows, P + R)


# --------------------------------------------------------------------------- the stages


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny SFT run on addition, compact prompt files, and a tiny reward model on its tokenizer."""
    root = tmp_path_factory.mktemp("rl")
    rc, _, err = run_main(["sft", f"train.out_dir={root}/sft", "data.tasks=add", "data.n_train=200", "data.n_eval=8",
                           "model.n_layer=1", "model.n_head=2", "model.n_embd=32",
                           "model.block_size=24", "train.max_iters=2", "eval.examples=0", *TINY[:-2]])
    assert rc == 0, err
    train, held = make_splits(40, 8, tasks=("add",), format="compact")
    for name, records in (("train", train), ("eval", held)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": r["completion"] + "1"} for r in train]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    rc, _, err = run_main(["reward", f"init.path={root}/sft", f"data.train_file={root}/pairs.jsonl",
                           f"data.eval_file={root}/pairs.jsonl", f"train.out_dir={root}/rm", "train.max_iters=2",
                           *TINY[:-1]])
    assert rc == 0, err
    return root


def _args(root, out, *extra):
    return [f"init.path={root}/sft", f"data.train_file={root}/train.jsonl", f"data.eval_file={root}/eval.jsonl",
            f"train.out_dir={out}", *TINY, *extra]


def _same_base(tuned, base_model):
    flat = dict(nnx.to_flat_state(nnx.state(base_model, nnx.Param)))
    n = 0
    for path, v in nnx.to_flat_state(nnx.state(tuned, nnx.Param)):
        if not isinstance(v, peft.PeftParam):
            np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(flat[path][...]))
            n += 1
    return n


def test_grpo_cli_with_lora_logs_trls_metrics_and_leaves_the_base_bit_identical(base, tmp_path):
    rc, out, err = run_main(["grpo", *_args(base, tmp_path / "g", "train.max_iters=3", "peft.method=lora",
                                            "grpo.num_generations=4", "optim.learning_rate=1e-2",
                                            "train.eval_interval=3")])
    assert rc == 0, err
    assert "held-out after: val_reward" in out
    records = [json.loads(line) for line in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 3
    for key in ("reward", "reward_std", "rewards/exact_match/mean", "frac_reward_zero_std", "entropy",
                "completions/mean_length", "completions/clipped_ratio", "clip_ratio/region_mean",
                "time/rollout", "time/scoring"):
        assert key in steps[-1], key
    tuned, _, _, meta = load_checkpoint(tmp_path / "g")
    assert meta["kind"] == "grpo" and peft.lora_layers(tuned)
    base_model, _, _, _ = load_checkpoint(base / "sft")
    assert _same_base(tuned, base_model) > 0


def test_ppo_cli_with_lora_trains_head_and_adapters_only_and_the_run_loads_as_a_policy(base, tmp_path):
    rc, out, err = run_main(["ppo", *_args(base, tmp_path / "p", "train.max_iters=2", "peft.method=lora",
                                           f"ppo.reward_model={base}/rm", "optim.learning_rate=1e-2",
                                           "rollout.epochs=2", "rollout.num_mini_batches=2")])
    assert rc == 0, err
    assert "val_score" in out
    records = [json.loads(line) for line in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "loss" in r][-1]
    for key in ("objective/kl", "objective/entropy", "objective/scores", "policy/clipfrac", "policy/approxkl",
                "loss/policy", "loss/value", "val/clipfrac", "completions/mean_length", "objective/kl_coef"):
        assert key in last, key
    assert last["objective/kl"] != 0.0                  # the adapters moved the policy off the reference
    policy, _, _, meta = load_checkpoint(tmp_path / "p")
    assert isinstance(policy, GPT) and meta["head"] == "value"     # the policy, without its value head
    base_model, _, _, _ = load_checkpoint(base / "sft")
    assert _same_base(policy, base_model) > 0


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_rl_resume_is_bit_identical_and_the_full_reference_never_moves(base, tmp_path, stage):
    cls, run = (PPOConfig, run_ppo) if stage == "ppo" else (GRPOConfig, run_grpo)
    extra = ["optim.learning_rate=1e-2", "train.ckpt_interval=2", "rollout.epochs=2"]
    extra += ([f"ppo.reward_model={base}/rm", "ppo.kl_target=0.01", "ppo.kl_horizon=100"] if stage == "ppo"
              else ["grpo.num_generations=4", "grpo.beta=0.1"])
    whole = run(load_config(cls, None, _args(base, tmp_path / "whole", "train.max_iters=4", *extra)))
    run(load_config(cls, None, _args(base, tmp_path / "part", "train.max_iters=2", *extra)))
    resumed = run(load_config(cls, None, _args(base, tmp_path / "part", "train.max_iters=4", "train.resume=true",
                                               *extra)))
    for a, b in zip(jax.tree.leaves(nnx.state(whole.train.model)), jax.tree.leaves(nnx.state(resumed.train.model)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert whole.train.losses == {**{k: v for k, v in whole.train.losses.items() if k < 2}, **resumed.train.losses}
    if stage == "ppo":   # the adaptive coefficient moved, and resumed where it was
        coefs = [h["objective/kl_coef"] for h in whole.history]
        assert coefs[0] == 0.05 and coefs[3] != 0.05
        assert [h["objective/kl_coef"] for h in resumed.history] == coefs[2:]
    # the frozen copy the KL is measured against still holds the base's weights
    base_model, _, _, _ = load_checkpoint(base / "sft")
    ref_state = whole.reference[1]
    for a, b in zip(jax.tree.leaves(ref_state), jax.tree.leaves(nnx.state(base_model)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                zip(jax.tree.leaves(nnx.state(whole.train.model if stage == "grpo" else whole.train.model.trunk)),
                    jax.tree.leaves(nnx.state(base_model))))
    assert moved


def test_ppo_refuses_a_reward_model_whose_tokenizer_differs(base, tmp_path):
    shutil.copytree(base / "rm", tmp_path / "rm")
    own = load_checkpoint(base / "rm")[2]
    other = CharTokenizer(list(reversed(own.chars)))        # the same characters under other ids
    shutil.rmtree(tmp_path / "rm" / "tokenizer")
    other.save(tmp_path / "rm" / "tokenizer")
    with pytest.raises(ValueError, match="not the one the reward model .* was trained with"):
        run_ppo(load_config(PPOConfig, None, _args(base, tmp_path / "p", f"ppo.reward_model={tmp_path}/rm")))


def test_the_value_loss_trains_the_head_alone_unless_asked_to_train_the_trunk():
    policy, rm, reference = _models()
    batch, has_eos = _rollout_batch()
    fields, _ = score_rollout(policy, rm, reference, batch, 5, 0.7, 0.05, PPOSection(), has_eos)
    full = {**batch, **fields, "returns": np.asarray(fields["returns"]) + 3.0}     # a value error to learn from
    graphdef, state = nnx.split(policy)

    def grads(**section):
        loss_fn = ppo_loss_fn(PPOSection(**section), 5, 0.7)
        return jax.grad(lambda s: loss_fn(nnx.merge(graphdef, s), full, None)[0])(state)
    policy_only = grads(vf_coef=0.0)
    detached, shared = grads(vf_coef=0.5), grads(vf_coef=0.5, value_trains_trunk=True)
    for a, b in zip(jax.tree.leaves(policy_only["trunk"]), jax.tree.leaves(detached["trunk"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(jnp.abs(detached["head"]["kernel"][...]).sum()) > 0.0
    assert any(not np.allclose(np.asarray(a), np.asarray(b)) for a, b in
               zip(jax.tree.leaves(policy_only["trunk"]), jax.tree.leaves(shared["trunk"])))


@pytest.mark.parametrize("name,cls", [("ppo.yaml", PPOConfig), ("grpo.yaml", GRPOConfig)])
def test_shipped_rl_yaml_configs_load_with_every_key_known(name, cls):
    """train/configs/{ppo,grpo}.yaml parse into their stage's config (unknown keys are errors) and
    point at the README walkthrough's SFT run and prompt files."""
    import pathlib
    path = pathlib.Path(__file__).resolve().parent.parent / "train" / "configs" / name
    config = load_config(cls, str(path), [])
    assert config.init.path == "runs/sft-add"
    assert config.data.train_file == "runs/prompts/train.jsonl" and config.data.eval_file == "runs/prompts/eval.jsonl"
    assert config.optim.lr_decay_iters == config.train.max_iters
    rows = config.rollout.num_mini_batches * config.train.batch_size * config.train.grad_accum
    assert rows == 256
    if cls is PPOConfig:
        assert config.ppo.reward_model == "runs/reward-deep-add" and config.ppo.kl_coef == 1.0
    else:
        assert rows % config.grpo.num_generations == 0 and config.grpo.reward_funcs == ["exact_match"]
