"""`jaxllm sft`: the SFT stage learns a synthetic task with a known answer, from JSONL or built-in
data, full or LoRA, with malformed data reported by file and line."""

import json

import numpy as np
import pytest

from helpers import run_main
from jaxllm.alignment.sft import SFTConfig, run_sft, sft_loss_fn
from jaxllm.configfile import load_config
from jaxllm.data.packing import Rows
from jaxllm.data.synthetic import make_splits, task_tokenizer
from jaxllm import peft

TINY_SFT = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=64",
            "train.batch_size=16", "train.eval_interval=0", "train.ckpt_interval=0", "train.progress=false",
            "train.tensorboard=false", "train.peak_flops=1e11", "optim.warmup_iters=20",
            "optim.learning_rate=3e-3", "eval.examples=50", "eval.batch_size=50"]


def _sft(tmp_path, *extra):
    return run_sft(load_config(SFTConfig, None, [f"train.out_dir={tmp_path}/run", *TINY_SFT, *extra]))


@pytest.fixture(scope="module")
def reversal(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    return root, _sft(root, "data.tasks=reverse", "data.n_train=2000", "data.n_eval=50",
                      "train.max_iters=500", "optim.lr_decay_iters=500")


def test_sft_on_word_reversal_beats_the_untrained_model_by_a_wide_margin(reversal):
    _, result = reversal
    assert result.before["exact_match/reverse"] <= 0.05
    assert result.after["exact_match/reverse"] >= result.before["exact_match/reverse"] + 0.2
    assert result.after["val_loss"] < 0.5 * result.before["val_loss"]
    assert result.rows_fill > 0.8   # packing fills rows with several short examples


def test_sft_from_jsonl_with_lora_trains_only_lora_on_the_base(reversal, tmp_path):
    root, base = reversal
    train, held = make_splits(200, 20, tasks=("reverse",), seed=1, format="compact")
    for name, records in (("train", train), ("eval", held)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    result = _sft(tmp_path, f"init.path={root}/run", "peft.method=lora", "peft.lora.target=all-linear",
                  f"data.train_file={tmp_path}/train.jsonl", f"data.eval_file={tmp_path}/eval.jsonl",
                  "train.max_iters=4", "eval.examples=20", "eval.batch_size=20")
    tuned = result.train.model
    assert peft.parameter_report(tuned)["trainable"] > 0
    base_params = {p: np.asarray(v[...]) for p, v in
                   __import__("flax").nnx.to_flat_state(__import__("flax").nnx.state(base.train.model))}
    for p, v in __import__("flax").nnx.to_flat_state(__import__("flax").nnx.state(tuned)):
        if p in base_params and not isinstance(v, peft.PeftParam):
            np.testing.assert_array_equal(np.asarray(v[...]), base_params[p])
    assert "exact_match" in result.after and (tmp_path / "run" / "checkpoints").is_dir()


def test_malformed_jsonl_line_is_named_or_skipped_with_a_count(tmp_path, capsys):
    good = {"instruction": "Reverse the word.", "input": "ab", "output": "ba"}
    lines = [json.dumps(good), "{not json", json.dumps({"instruction": "x"}), json.dumps(good)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "eval.jsonl").write_text(json.dumps(good) + "\n")
    task_tokenizer().save(tmp_path / "tok")
    args = ["sft", f"data.train_file={tmp_path}/train.jsonl", f"data.eval_file={tmp_path}/eval.jsonl",
            f"data.tokenizer={tmp_path}/tok", *TINY_SFT, "model.block_size=128", f"train.out_dir={tmp_path}/run",
            "train.max_iters=2",
            "eval.examples=1"]
    rc, out, err = run_main(args)
    assert rc == 2 and f"{tmp_path}/train.jsonl:2" in err and "JSON" in err
    rc, out, err = run_main(args + ["data.on_error=skip"])
    assert rc == 0, err
    assert "2 examples" in out and "2 skipped as malformed" in out
    assert "train.jsonl:3: field 'output'" in out


def test_sft_loss_counts_only_response_tokens():
    import jax
    from flax import nnx
    from jaxllm import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=8, block_size=8, n_layer=1, n_head=1, n_embd=8), rngs=nnx.Rngs(0))
    tokens = np.array([[1, 2, 3, 4, 5, 6, 0, 0]], np.int32)
    labels = np.array([[-100, -100, -100, 4, 5, 6, -100, -100]], np.int32)
    seg = np.array([[1, 1, 1, 1, 1, 1, 0, 0]], np.int32)
    pos = np.array([[0, 1, 2, 3, 4, 5, 0, 0]], np.int32)
    total, count = sft_loss_fn(model, Rows(tokens, labels, seg, pos), None)
    assert float(count) == 3
    logp = jax.nn.log_softmax(np.asarray(model(tokens[:, :6]))[0], axis=-1)
    expected = -sum(float(logp[t - 1, labels[0, t]]) for t in (3, 4, 5))
    assert float(total) == pytest.approx(expected, rel=1e-5)
