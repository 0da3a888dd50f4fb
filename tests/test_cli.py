"""Smoke tests of `jaxllm <command>` and the `python train/pretrain.py` script entry."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from helpers import run_main
from jaxllm.data import TokenDataset

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tiny_overrides):
    root = tmp_path_factory.mktemp("cli")
    return root, run_main(["pretrain", *tiny_overrides(root)])


def test_prepare_writes_a_token_dataset_of_the_whole_text(tmp_path, corpus_file):
    rc, out, _ = run_main(["prepare", "--source", corpus_file, "--out", tmp_path / "ds"])
    assert rc == 0
    ds = TokenDataset(tmp_path / "ds")
    text = corpus_file.read_text(encoding="utf-8")
    assert len(ds.train) + len(ds.val) == len(text)
    assert ds.vocab_size == len(set(text))
    assert f"vocab_size={ds.vocab_size}" in out


def test_pretrain_command_trains_and_prints_val_loss_and_sample(pretrained):
    root, (rc, out, err) = pretrained
    assert rc == 0, err
    assert "finished 6 steps" in out
    val = re.search(r"val loss: (\d+\.\d+)", out)
    assert val and 0 < float(val.group(1)) < 5
    sample = out.split("--- sample ---\n", 1)[1][:-1]  # print adds one newline
    assert sample.startswith("\n") and len(sample) == 1 + 8  # default prompt + 8 new characters
    assert (root / "run" / "checkpoints" / "6").is_dir()
    assert (root / "run" / "tokenizer").is_dir()


def test_resume_takes_the_runs_own_settings_and_continues_exactly(tmp_path, tiny_overrides, monkeypatch):
    """`--resume` with only a longer max_iters continues a run started with other model and
    optimizer settings, as nanoGPT's init_from=resume does: losses equal an unbroken run."""
    changed = ("model.n_layer=1", "optim.learning_rate=3e-3", "train.log_interval=1")
    rc, _, err = run_main(["pretrain", *tiny_overrides(tmp_path / "a", *changed)])
    assert rc == 0, err
    # moved to where the default train.out_dir points: resumed there, not back where it started
    moved = tmp_path / "moved" / "runs" / "shakespeare-char"
    shutil.copytree(tmp_path / "a" / "run", moved)
    monkeypatch.chdir(tmp_path / "moved")
    rc, out, err = run_main(["pretrain", "train.max_iters=9", "--resume"])
    assert rc == 0, err
    assert "finished 9 steps" in out and "checkpoints: runs/shakespeare-char/checkpoints" in out
    assert sorted(p.name for p in (tmp_path / "a" / "run" / "checkpoints").iterdir() if p.name.isdigit()) == ["6"]
    assert (moved / "checkpoints" / "9").is_dir()
    rc, _, err = run_main(["pretrain", *tiny_overrides(tmp_path / "b", *changed, "train.max_iters=9")])
    assert rc == 0, err
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
               if "loss" in json.loads(line)] for run in (moved, tmp_path / "b" / "run")]
    assert losses[0] == losses[1] and len(losses[0]) == 9


def test_sample_command_continues_the_prompt_from_a_checkpoint(pretrained):
    root, _ = pretrained
    rc, out, err = run_main(["sample", "--ckpt", root / "run", "--prompt", "the lazy",
                             "--max-new-tokens", 5, "--seed", 1])
    assert rc == 0, err
    text = out[:-1]
    assert text.startswith("the lazy") and len(text) == len("the lazy") + 5


def test_sample_command_without_checkpoints_exits_2_naming_the_directory(tmp_path):
    rc, _, err = run_main(["sample", "--ckpt", tmp_path / "no_run"])
    assert rc == 2 and "no_run" in err and "jaxllm sample: error" in err


def test_unknown_config_key_exits_2_listing_valid_keys(tmp_path):
    rc, out, err = run_main(["pretrain", "train.max_iter=3", f"train.out_dir={tmp_path}/run"])
    assert rc == 2
    assert "train.max_iter" in err and "valid keys" in err
    for key in ("train.max_iters", "train.batch_size", "train.resume"):
        assert key in err
    assert not (tmp_path / "run").exists()


def test_train_pretrain_script_runs_from_another_directory(tmp_path, tiny_overrides):
    # Relative paths: data and run land under the working directory, not the repository.
    cmd = [sys.executable, str(REPO / "train" / "pretrain.py"), *tiny_overrides(".")]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "val loss:" in proc.stdout and "--- sample ---" in proc.stdout
    assert (tmp_path / "run" / "checkpoints" / "6").is_dir()
    assert (tmp_path / "data" / "meta.json").is_file()


def test_export_hf_command_writes_a_directory_that_loads_back_with_the_same_logits(pretrained, tmp_path):
    import numpy as np

    from jaxllm.interop import from_hf
    from jaxllm.runs import load_checkpoint

    root, _ = pretrained
    rc, out, err = run_main(["export-hf", "--ckpt", root / "run", "--out", tmp_path / "hf"])
    assert rc == 0, err
    assert "AutoModelForCausalLM" in out and (tmp_path / "hf" / "model.safetensors").is_file()
    exported, _ = from_hf(tmp_path / "hf")
    original, _, tok, _ = load_checkpoint(root / "run")
    x = np.asarray([tok.encode("the lazy fox")])
    np.testing.assert_allclose(np.asarray(exported(x)), np.asarray(original(x)), atol=1e-5)
    rc, _, err = run_main(["export-hf", "--ckpt", root / "run", "--out", tmp_path / "hf"])
    assert rc == 2 and "hf" in err and "pass --overwrite" in err  # refused, naming the CLI's flag
