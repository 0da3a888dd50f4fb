"""Preference learning: reward model and DPO losses against hand computations and TRL's own code,
the reward read at the last real token, the reference frozen, LoRA leaving the base untouched, exact
resume, bad preference data named by file and line, and the `jaxllm reward` / `jaxllm dpo` commands."""

import collections
import json
import math
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import run_main
from jaxllm import peft
from jaxllm.alignment.dpo import DPOConfig, dpo_loss, run_dpo, sequence_logps
from jaxllm.alignment.reward import RewardConfig, load_reward_model, reward_loss, score
from jaxllm.configfile import load_config
from jaxllm.data.instruct import InstructDataError
from jaxllm.data.preference import load_preferences, tokenize_preferences
from jaxllm.data.synthetic import task_tokenizer
from jaxllm.heads import RewardModel
from jaxllm.model import GPT
from jaxllm.runs import load_checkpoint
from helpers import TINY

RNG = np.random.default_rng(0)
TINY_STAGE = ["train.batch_size=4", "train.eval_interval=0", "train.ckpt_interval=0", "train.log_interval=1",
              "train.progress=false", "train.tensorboard=false", "train.peak_flops=1e11", "data.eval_batch_size=8"]


# --------------------------------------------------------------------------- losses by hand


def _random_logps(n=6):
    pc, pr, rc, rr = (RNG.normal(-20, 5, n).astype(np.float32) for _ in range(4))
    lc, lr = RNG.integers(1, 12, n).astype(np.float32), RNG.integers(1, 12, n).astype(np.float32)
    return pc, pr, rc, rr, lc, lr


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_dpo_loss_matches_a_hand_computation(loss_type):
    pc, pr, rc, rr, lc, lr = (x.astype(np.float64) for x in _random_logps())
    beta, eps = 0.3, 0.2
    delta = (pc - rc) - (pr - rr)
    want = {"sigmoid": -np.log(_sig(beta * delta)),
            "hinge": np.maximum(0.0, 1 - beta * delta),
            "ipo": ((pc - rc) / lc - (pr - rr) / lr - 1 / (2 * beta)) ** 2,
            "robust": (-(1 - eps) * np.log(_sig(beta * delta)) + eps * np.log(_sig(-beta * delta))) / (1 - 2 * eps),
            }[loss_type].mean()
    loss, m = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps if loss_type == "robust" else 0.0,
                       chosen_lengths=lc, rejected_lengths=lr)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(m["rewards/margins"]), beta * delta.mean(), rtol=1e-5)
    assert float(m["rewards/accuracies"]) == pytest.approx(np.mean(delta > 0))


def test_dpo_sft_term_is_the_chosen_tokens_mean_nll_and_ignores_padding_pairs():
    """sft_weight adds w * (-sum of chosen log-probs / chosen token count) over the batch; padding
    pairs (weight 0, no tokens, log-prob 0) change neither the DPO part nor the SFT part."""
    from jaxllm.alignment.dpo import dpo_per_pair
    pc, pr, rc, rr, lc, lr = (x.astype(np.float64) for x in _random_logps())
    w_sft, beta = 0.5, 0.3
    plain, _ = dpo_loss(pc, pr, rc, rr, beta=beta)
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=beta, chosen_lengths=lc, sft_weight=w_sft)
    np.testing.assert_allclose(float(loss), float(plain) - w_sft * pc.sum() / lc.sum(), rtol=1e-6)
    pad = lambda x: np.concatenate([x, np.zeros(3)])   # noqa: E731
    weight = pad(np.ones_like(pc))
    per_pair, _ = dpo_per_pair(pad(pc), pad(pr), pad(rc), pad(rr), beta=beta, chosen_lengths=pad(lc),
                               rejected_lengths=pad(lr), sft_weight=w_sft, weight=weight)
    np.testing.assert_allclose(float(np.sum(per_pair * weight) / weight.sum()), float(loss), rtol=1e-6)
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(pc, pr, rc, rr, sft_weight=w_sft)


def test_dpo_loss_at_policy_equal_to_reference_is_ln2():
    pc, pr, _, _, _, _ = _random_logps()
    loss, m = dpo_loss(pc, pr, pc, pr)
    assert abs(float(loss) - math.log(2)) < 1e-7 and float(m["rewards/margins"]) == 0.0


def test_reward_loss_matches_a_hand_computation_with_margin_and_centring():
    rc, rr, margin = RNG.normal(0, 2, 8), RNG.normal(0, 2, 8), RNG.uniform(0, 1, 8)
    loss, m = reward_loss(rc, rr, margin, center_rewards_coefficient=0.01)
    want = np.mean(-np.log(_sig(rc - rr - margin))) + 0.01 * np.mean((rc + rr) ** 2)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert float(m["accuracy"]) == pytest.approx(np.mean(rc > rr))
    np.testing.assert_allclose([float(m["min_reward"]), float(m["max_reward"])],
                               [min(rc.min(), rr.min()), max(rc.max(), rr.max())], rtol=1e-6)


def test_sequence_logps_sums_the_labelled_tokens_log_softmax():
    model = GPT(TINY, rngs=nnx.Rngs(0))
    ids = RNG.integers(0, TINY.vocab_size, (2, 10)).astype(np.int32)
    labels = np.where(np.arange(10) >= 6, ids, -100).astype(np.int32)
    mask = np.ones((2, 10), bool)
    got = np.asarray(sequence_logps(model, ids, mask, labels))
    logp = np.asarray(jax.nn.log_softmax(model(ids).astype(jnp.float32), -1))
    want = [sum(logp[b, t - 1, ids[b, t]] for t in range(6, 10)) for b in range(2)]
    np.testing.assert_allclose(got, want, rtol=1e-5)


# --------------------------------------------------------------------------- against TRL's code


class _Accelerator:
    device = "cpu"

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


def _trl_or_skip():
    return pytest.importorskip("trl", reason="TRL parity needs the torch extra (pip install -e '.[torch]')")


@pytest.mark.parametrize("loss_type,sft_weight", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.0),
                                                   ("sigmoid", 0.7), ("ipo", 0.3)])
def test_dpo_loss_and_metrics_equal_trls_dpo_trainer_code(loss_type, sft_weight):
    """TRL's DPOTrainer._compute_loss fed the same per-token log-probs (a stub model returns them)
    and precomputed reference log-probs: loss and every logged metric agree to 1e-6. sft_weight w
    is TRL's loss_type=[type, "sft"] with loss_weights=[1, w]."""
    trl = _trl_or_skip()
    import torch
    B, T = 5, 12
    completion_mask = torch.zeros(2 * B, T, dtype=torch.long)
    lengths = RNG.integers(2, 8, 2 * B)
    for i, n in enumerate(lengths):
        completion_mask[i, T - n:] = 1
    per_token = torch.tensor(RNG.normal(-2.5, 1.0, (2 * B, T - 1)), dtype=torch.float64) * completion_mask[:, 1:]
    ref = torch.tensor(RNG.normal(-25, 4, 2 * B), dtype=torch.float64)
    beta, eps = 0.2, (0.1 if loss_type == "robust" else 0.0)
    outputs = types.SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                                    mean_logits=torch.zeros_like(per_token),
                                    is_top1=torch.zeros_like(per_token, dtype=torch.bool))
    model = types.SimpleNamespace(training=True)
    trainer = trl.DPOTrainer.__new__(trl.DPOTrainer)
    trainer.__dict__.update(model=model, accelerator=_Accelerator(), aux_loss_enabled=False, ld_alpha=None,
                            precompute_ref_logps=True, f_divergence_type="reverse_kl",
                            loss_types=[loss_type] + (["sft"] if sft_weight else []),
                            loss_weights=[1.0] + ([sft_weight] if sft_weight else []), beta=beta, label_smoothing=eps, use_weighting=False,
                            _metrics={"train": collections.defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * B, T, dtype=torch.long), "attention_mask": torch.ones(2 * B, T),
              "completion_mask": completion_mask, "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    trl_loss = trainer._compute_loss(lambda **kw: outputs, inputs, return_outputs=False)

    logps = per_token.sum(1).numpy()
    counts = completion_mask.sum(1).numpy().astype(np.float64)
    loss, metrics = dpo_loss(logps[:B], logps[B:], ref[:B].numpy(), ref[B:].numpy(), beta=beta,
                             loss_type=loss_type, label_smoothing=eps, chosen_lengths=counts[:B],
                             rejected_lengths=counts[B:], sft_weight=sft_weight)
    np.testing.assert_allclose(float(loss), float(trl_loss), rtol=1e-6)
    for name, value in metrics.items():
        np.testing.assert_allclose(float(value), trainer._metrics["train"][name][0], rtol=1e-6, atol=1e-7,
                                   err_msg=name)


def test_reward_loss_and_metrics_equal_trls_reward_trainer_code():
    trl = _trl_or_skip()
    import torch
    B = 6
    rewards = torch.tensor(RNG.normal(0, 2, (2 * B, 1)), dtype=torch.float64)
    margin = torch.tensor(RNG.uniform(0, 0.5, B), dtype=torch.float64)
    trainer = trl.RewardTrainer.__new__(trl.RewardTrainer)
    trainer.__dict__.update(model=types.SimpleNamespace(training=True), accelerator=_Accelerator(),
                            args=types.SimpleNamespace(center_rewards_coefficient=0.01),
                            _metrics={"train": collections.defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * B, 4, dtype=torch.long), "attention_mask": torch.ones(2 * B, 4),
              "margin": margin}
    trl_loss = trainer.compute_loss(lambda **kw: types.SimpleNamespace(logits=rewards), inputs)
    r = rewards[:, 0].numpy()
    loss, metrics = reward_loss(r[:B], r[B:], margin.numpy(), center_rewards_coefficient=0.01)
    np.testing.assert_allclose(float(loss), float(trl_loss), rtol=1e-6)
    for name, value in metrics.items():
        np.testing.assert_allclose(float(value), trainer._metrics["train"][name][0], rtol=1e-6, err_msg=name)


# --------------------------------------------------------------------------- the reward model


def test_reward_is_read_at_the_last_real_token_under_left_and_right_padding():
    rm = RewardModel(TINY, rngs=nnx.Rngs(0))
    seq = RNG.integers(1, TINY.vocab_size, 7).astype(np.int32)
    alone = float(rm(seq[None], attention_mask=np.ones((1, 7), bool))[0])
    right = np.zeros((1, 11), np.int32)
    right[0, :7] = seq
    left = np.zeros((1, 11), np.int32)
    left[0, 4:] = seq
    r_right = float(rm(right, attention_mask=right > 0)[0])
    r_left = float(rm(left, attention_mask=left > 0)[0])
    np.testing.assert_allclose([r_right, r_left], [alone, alone], rtol=1e-5, atol=1e-6)
    # and not at position -1: the padding's own hidden state gives another number
    assert abs(float(rm(right)[0]) - alone) > 1e-4


# --------------------------------------------------------------------------- data


def _pairs_file(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


GOOD = [{"prompt": f"add {a:03d}+{b:03d}=", "chosen": str(a + b)[::-1], "rejected": str(a + b + 1)[::-1]}
        for a, b in [(1, 2), (10, 20), (33, 44), (5, 6), (120, 7), (45, 45), (300, 1), (9, 90)]]


@pytest.mark.parametrize("bad, field", [({"prompt": "x", "chosen": "1"}, "rejected"),
                                        ({"prompt": "x", "chosen": "", "rejected": "2"}, "chosen"),
                                        ({"chosen": "1", "rejected": "2"}, "prompt"),
                                        ({"prompt": "x", "response_a": "1", "response_b": "2", "preference": 3},
                                         "preference")])
def test_a_bad_preference_record_names_file_line_and_field_or_is_skipped_and_counted(tmp_path, bad, field):
    tok = task_tokenizer()
    fmt = "comparison" if "response_a" in bad else "preference"
    records = ([{"prompt": "x", "response_a": "1", "response_b": "2", "preference": 0}] if fmt == "comparison"
               else GOOD[:1]) + [bad]
    path = _pairs_file(tmp_path / "p.jsonl", records)
    with pytest.raises(InstructDataError, match=rf"p.jsonl:2: field '{field}"):
        load_preferences(path, tok)
    ds = load_preferences(path, tok, on_error="skip", log=None)
    assert ds.stats.skipped == 1 and len(ds) == 1


def test_identical_pairs_are_dropped_and_long_pairs_truncated_with_counts(tmp_path):
    tok = task_tokenizer()
    records = GOOD[:2] + [{"prompt": "add 1+1=", "chosen": "2", "rejected": "2"},
                          {"prompt": "sort " + "9" * 40 + "=", "chosen": "1" * 30, "rejected": "2" * 30}]
    ds = load_preferences(_pairs_file(tmp_path / "p.jsonl", records), tok, max_len=24, log=None)
    assert (ds.stats.identical, ds.stats.truncated, len(ds)) == (1, 1, 3)
    long_ids, long_labels = ds.chosen[2].ids, ds.chosen[2].labels
    assert len(long_ids) == 24 and long_labels[0] == -100 and (long_labels[1:] != -100).all()
    assert tok.decode(long_ids[1:]) == "1" * 23            # the response's start, after one prompt token


def test_comparison_format_orders_the_pair_by_preference():
    tok = task_tokenizer()
    ds = tokenize_preferences([{"prompt": "p=", "response_a": "12", "response_b": "34", "preference": 1}], tok, log=None)
    assert tok.decode(ds.chosen[0].ids[2:-1]) == "34" and tok.decode(ds.rejected[0].ids[2:-1]) == "12"


# --------------------------------------------------------------------------- the stages


@pytest.fixture(scope="module")
def sft_base(tmp_path_factory):
    """A tiny SFT run on addition (its tokenizer has EOS and PAD) and preference files."""
    root = tmp_path_factory.mktemp("pref")
    rc, _, err = run_main(["sft", f"train.out_dir={root}/sft", "data.tasks=add", "data.n_train=200", "data.n_eval=8",
                           "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
                           "train.max_iters=2", "eval.examples=0", *TINY_STAGE[:-1]])
    assert rc == 0, err
    _pairs_file(root / "train.jsonl", GOOD)
    _pairs_file(root / "eval.jsonl", GOOD[:4])
    return root


def _stage_args(root, out, *extra):
    return [f"init.path={root}/sft", f"data.train_file={root}/train.jsonl", f"data.eval_file={root}/eval.jsonl",
            f"train.out_dir={out}", *TINY_STAGE, *extra]


def test_reward_cli_trains_saves_and_scores_with_its_own_tokenizer_only(sft_base, tmp_path):
    rc, out, err = run_main(["reward", *_stage_args(sft_base, tmp_path / "rm", "train.max_iters=3")])
    assert rc == 0, err
    assert "held-out pairs after" in out and "accuracy" in out
    model, tok, eos = load_reward_model(tmp_path / "rm")
    texts = [r["prompt"] + r["chosen"] for r in GOOD[:3]]
    s = score(model, tok, texts, eos_id=eos)
    assert s.shape == (3,) and np.isfinite(s).all()
    # the same rewards as the model's forward on rows built by hand (EOS appended, right padding)
    rows = [tok.encode(t) + [eos] for t in texts]
    T = max(map(len, rows))
    ids = np.asarray([r + [0] * (T - len(r)) for r in rows], np.int32)
    mask = np.asarray([[1] * len(r) + [0] * (T - len(r)) for r in rows], bool)
    np.testing.assert_allclose(s, np.asarray(model(ids, attention_mask=mask)), rtol=1e-5, atol=1e-6)
    from jaxllm.tokenizer import CharTokenizer
    other = CharTokenizer(sorted(set("".join(tok.chars))) [::-1])   # same characters, other ids
    with pytest.raises(ValueError, match="not the one the reward model .* was trained with"):
        load_reward_model(tmp_path / "rm", tokenizer=other)


def test_dpo_cli_first_loss_is_ln2_and_lora_leaves_the_base_untouched(sft_base, tmp_path):
    base, _, _, _ = load_checkpoint(sft_base / "sft")
    rc, out, err = run_main(["dpo", *_stage_args(sft_base, tmp_path / "dpo", "train.max_iters=3",
                                                 "peft.method=lora", "optim.learning_rate=1e-2")])
    assert rc == 0, err
    records = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    first = [r for r in records if "loss" in r][0]
    assert abs(first["loss"] - math.log(2)) < 1e-5           # policy == reference at step 0
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    tuned, _, _, meta = load_checkpoint(tmp_path / "dpo")
    assert meta["kind"] == "dpo" and peft.lora_layers(tuned)
    flat = dict(nnx.to_flat_state(nnx.state(base, nnx.Param)))
    for path, v in nnx.to_flat_state(nnx.state(tuned, nnx.Param)):
        if not isinstance(v, peft.PeftParam):
            np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(flat[path][...]))
    assert records[-1]["rewards/margins"] != 0.0


@pytest.mark.parametrize("reference", ["precomputed", "copy"])
def test_full_dpo_keeps_its_reference_fixed_and_resumes_bit_identically(sft_base, tmp_path, reference):
    """The reference's log-probs of the held-out pairs equal the base's after training, and a run
    stopped at step 2 and resumed to 4 ends with the weights of an unbroken 4-step run."""
    args = ["peft.method=full", f"dpo.reference={reference}", "optim.learning_rate=1e-2", "train.ckpt_interval=2"]
    whole = run_dpo(load_config(DPOConfig, None, _stage_args(sft_base, tmp_path / "whole", "train.max_iters=4", *args)))
    assert whole.reference == reference
    run_dpo(load_config(DPOConfig, None, _stage_args(sft_base, tmp_path / "part", "train.max_iters=2", *args)))
    resumed = run_dpo(load_config(DPOConfig, None, _stage_args(sft_base, tmp_path / "part", "train.max_iters=4",
                                                               "train.resume=true", *args)))
    for a, b in zip(jax.tree.leaves(nnx.state(whole.train.model)), jax.tree.leaves(nnx.state(resumed.train.model)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert whole.train.losses == {**{k: v for k, v in whole.train.losses.items() if k < 2},
                                  **resumed.train.losses}
    assert whole.reference_drift == 0.0 and resumed.reference_drift == 0.0   # the reference never moved
    # the held-out loss before training was ln 2: policy == reference; after, the policy moved away
    assert abs(whole.before["val_loss"] - math.log(2)) < 1e-5
    assert abs(whole.after["val_loss"] - math.log(2)) > 1e-4


@pytest.mark.parametrize("name,cls", [("reward.yaml", RewardConfig), ("dpo.yaml", DPOConfig)])
def test_shipped_yaml_configs_load_with_every_key_known(name, cls):
    """train/configs/{reward,dpo}.yaml parse into their stage's config (unknown keys are errors) and
    point at the README walkthrough's SFT run and pair files."""
    path = pathlib.Path(__file__).resolve().parent.parent / "train" / "configs" / name
    config = load_config(cls, str(path), [])
    assert config.init.path == "runs/sft-add"
    assert config.data.train_file == "runs/pairs/train.jsonl" and config.data.eval_file == "runs/pairs/eval.jsonl"
    assert config.optim.lr_decay_iters == config.train.max_iters


def test_sampled_pairs_prefer_the_exact_answer_greedy_mistake_first(monkeypatch):
    """sample_preference_pairs with scripted policy answers: the chosen answer is the record's exact
    response; the greedy answer, when wrong, is the first rejected; distinct wrong answers make up to
    pairs_per_prompt pairs; empty answers and answers holding a special token are never rejected;
    prompts with no right or no wrong answer give no pair, and the counts add up."""
    from jaxllm.data import synthetic
    tok = synthetic.task_tokenizer()
    eos, pad = tok.eos_id, tok.pad_id
    records = [{"prompt": p, "completion": c, "task": "add"}
               for p, c in (("add 001+002=", "3"), ("add 005+005=", "01"), ("add 009+009=", "81"))]
    sampled = {0: ["3", "4", "4", "", "5"], 1: ["01", "01", "01", "01", "01"], 2: ["7", "8", "9", "6", "5"]}
    greedy = {0: "9", 1: "01", 2: "7"}

    def fake(model, eos_id, pad_id, batch_size=32, sampling=None, key=None):
        def run(prompts, max_new_tokens):
            if sampling is None:                                   # the greedy call
                return [tok.encode(greedy[i]) + [eos] for i in range(len(prompts))]
            per = len(prompts) // len(records)
            out = [tok.encode(sampled[i // per][i % per]) + [eos] for i in range(len(prompts))]
            out[1] = [pad, eos]                                     # a sampled PAD: a special token, not text
            return out
        return run
    monkeypatch.setattr(synthetic, "greedy_generate_fn", fake)
    pairs, stats = synthetic.sample_preference_pairs(None, tok, records, samples=5, pairs_per_prompt=3,
                                                     eos_id=eos, pad_id=pad)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("3", "9"), ("3", "4"), ("3", "5")]
    assert all(p["prompt"] == "add 001+002=" for p in pairs)
    assert (stats.prompts, stats.samples, stats.pairs) == (3, 18, 3)
    assert (stats.all_correct, stats.none_correct, stats.greedy_correct) == (1, 1, 1)
    assert stats.correct == 1 + 6 + 0
    one, _ = synthetic.sample_preference_pairs(None, tok, records, samples=5, eos_id=eos, pad_id=pad)
    assert [(p["chosen"], p["rejected"]) for p in one] == [("3", "9")]
    with pytest.raises(ValueError, match="at least two answers"):
        synthetic.sample_preference_pairs(None, tok, records, samples=1, include_greedy=False)


def test_a_bad_pair_file_stops_dpo_before_it_touches_an_existing_run(sft_base, tmp_path):
    """`jaxllm dpo train.overwrite=true` on a finished run with a broken pair file: the error names
    file:line and field, and the run's checkpoint, metrics and tokenizer are still there, unchanged."""
    out = tmp_path / "dpo"
    rc, _, err = run_main(["dpo", *_stage_args(sft_base, out, "train.max_iters=2")])
    assert rc == 0, err
    before, _, _, _ = load_checkpoint(out)
    files = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad = _pairs_file(tmp_path / "bad.jsonl", GOOD[:2] + [{"prompt": "add 1+1=", "chosen": "2"}])
    args = [a if not a.startswith("data.train_file=") else f"data.train_file={bad}"
            for a in _stage_args(sft_base, out, "train.max_iters=2", "train.overwrite=true")]
    rc, _, err = run_main(["dpo", *args])
    assert rc != 0 and "bad.jsonl:3" in err and "rejected" in err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    after, _, _, _ = load_checkpoint(out)
    for a, b in zip(jax.tree.leaves(nnx.state(before)), jax.tree.leaves(nnx.state(after)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_reward_with_lora_trains_the_head_and_adapters_and_leaves_the_trunk_bit_identical(sft_base, tmp_path):
    """`jaxllm reward peft.method=lora`: between two checkpoints the scalar head and the LoRA weights
    move, while every trunk weight stays equal to the SFT base's."""
    from jaxllm.heads import HeadParam
    out = tmp_path / "rm-lora"
    rc, _, err = run_main(["reward", *_stage_args(sft_base, out, "train.max_iters=3", "train.ckpt_interval=1",
                                                  "train.keep_ckpts=3", "peft.method=lora",
                                                  "optim.learning_rate=1e-2", "optim.warmup_iters=0")])
    assert rc == 0, err
    base, _, _, _ = load_checkpoint(sft_base / "sft")
    first, _, _, _ = load_checkpoint(out, step=1)
    last, _, _, meta = load_checkpoint(out, step=3)
    assert meta.get("head") == "reward" and peft.lora_layers(last.trunk)
    flat = lambda m, f: dict(nnx.to_flat_state(nnx.state(m, f)))   # noqa: E731
    base_params = flat(base, nnx.Param)
    for path, v in flat(last.trunk, nnx.Param).items():
        if not isinstance(v, peft.PeftParam):
            np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(base_params[path][...]), err_msg=str(path))
    moved = lambda f: any(not np.array_equal(np.asarray(a[...]), np.asarray(b[...]))   # noqa: E731
                          for a, b in zip(flat(first, f).values(), flat(last, f).values(), strict=True))
    assert moved(HeadParam) and moved(peft.PeftParam)
