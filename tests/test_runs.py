"""Run directories and the data a run is made from: cached datasets match what is asked for,
overwrite leaves nothing of the old run, a finished run always reports, a dataset directory is
usable alone, and a resumed run finds its data from any working directory."""

import json

import pytest

from helpers import run_main
from jaxllm.data import TokenDataset, prepare
from jaxllm.runs import load_checkpoint
from jaxllm.stages.corpus import load_or_prepare
from jaxllm.stages.sections import DataConfig


def _without(overrides, *keys):
    return [o for o in overrides if o.split("=", 1)[0] not in keys]


def _saved_config(run):
    return load_checkpoint(run)[3]["config"]


def test_cached_dataset_is_reused_only_for_the_same_settings(tmp_path, corpus_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    small = load_or_prepare(DataConfig(source=str(corpus_file), tokenizer="bpe", vocab_size=270))
    again = load_or_prepare(DataConfig(source=str(corpus_file), tokenizer="bpe", vocab_size=270))
    assert again.path == small.path and again.meta["created"] == small.meta["created"]
    larger = load_or_prepare(DataConfig(source=str(corpus_file), tokenizer="bpe", vocab_size=290))
    assert larger.meta["settings"]["vocab_size"] == 290 and larger.vocab_size > small.vocab_size
    # a cached dataset prepared with another split is prepared again, not reused
    other_split = load_or_prepare(DataConfig(source=str(corpus_file), tokenizer="char", val_fraction=0.2))
    assert other_split.meta["val_fraction"] == 0.2
    assert load_or_prepare(DataConfig(source=str(corpus_file), tokenizer="char")).meta["val_fraction"] == 0.1


def test_an_explicit_dataset_dir_that_differs_from_the_request_is_refused_by_name(tmp_path, corpus_file):
    prepare(corpus_file, tmp_path / "ds", tokenizer="bpe", vocab_size=270)
    with pytest.raises(ValueError, match=r"data.vocab_size=270 \(asked: 300\)"):
        load_or_prepare(DataConfig(dataset_dir=str(tmp_path / "ds"), tokenizer="bpe", vocab_size=300))
    with pytest.raises(ValueError, match=r"data.val_fraction=0.1 \(asked: 0.3\)"):
        load_or_prepare(DataConfig(dataset_dir=str(tmp_path / "ds"), val_fraction=0.3))
    ds = load_or_prepare(DataConfig(dataset_dir=str(tmp_path / "ds"), source=str(corpus_file), tokenizer="bpe"))
    assert ds.meta["settings"]["vocab_size"] == 270


def test_a_prepared_dataset_dir_alone_trains_without_naming_its_source(tmp_path, corpus_file, tiny_overrides):
    rc, _, err = run_main(["prepare", "--source", corpus_file, "--tokenizer", "bpe", "--vocab-size", 280,
                           "--out", tmp_path / "ds"])
    assert rc == 0, err
    overrides = _without(tiny_overrides(tmp_path), "data.source", "data.dataset_dir")
    rc, out, err = run_main(["pretrain", *overrides, f"data.dataset_dir={tmp_path / 'ds'}"])
    assert rc == 0, err
    _, cfg, tok, meta = load_checkpoint(tmp_path / "run")
    assert meta["data"]["settings"] == {"source": str(corpus_file), "tokenizer": "bpe", "vocab_size": 280,
                                        "val_fraction": 0.1, "text_key": None}
    assert tok.kind == "bpe" and cfg.vocab_size == TokenDataset(tmp_path / "ds").vocab_size


def test_overwrite_replaces_the_tokenizer_metrics_and_tensorboard_of_the_old_run(tmp_path, tiny_overrides):
    old_corpus, new_corpus = tmp_path / "old.txt", tmp_path / "new.txt"
    old_corpus.write_text("abcdefgh " * 200, encoding="utf-8")
    new_corpus.write_text("stuvwxyz\n" * 200, encoding="utf-8")
    common = ("train.tensorboard=true", "sample.max_new_tokens=0")
    rc, _, err = run_main(["pretrain", *tiny_overrides(tmp_path, *common, f"data.source={old_corpus}",
                                                       f"data.dataset_dir={tmp_path / 'old'}")])
    assert rc == 0, err
    rc, _, err = run_main(["pretrain", *tiny_overrides(tmp_path, *common, f"data.source={new_corpus}",
                                                       f"data.dataset_dir={tmp_path / 'new'}",
                                                       "train.overwrite=true", "train.max_iters=4")])
    assert rc == 0, err
    run = tmp_path / "run"
    _, _, tok, _ = load_checkpoint(run)
    assert tok.chars == TokenDataset(tmp_path / "new").tokenizer.chars     # not the old run's tokenizer
    assert len(list((run / "tensorboard").iterdir())) == 1                 # the old event file is gone
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]   # the new run's curve only
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["4"]
    assert not [p for p in run.iterdir() if ".tmp" in p.name]              # the tokenizer was swapped in


def test_a_finished_run_reports_its_result_when_the_sample_prompt_cannot_be_encoded(tmp_path, tiny_overrides):
    corpus = tmp_path / "no_newlines.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog " * 40, encoding="utf-8")
    rc, out, err = run_main(["pretrain", *tiny_overrides(tmp_path, f"data.source={corpus}")])
    assert rc == 0, err
    assert "val loss:" in out and "cannot be encoded" in out and "--- sample ---" in out


def test_a_relative_dataset_dir_is_found_again_when_resumed_from_another_directory(tmp_path, corpus_file,
                                                                                  tiny_overrides, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    overrides = _without(tiny_overrides(tmp_path), "data.dataset_dir", "train.out_dir")
    rc, _, err = run_main(["pretrain", *overrides, "data.dataset_dir=data", "train.out_dir=run"])
    assert rc == 0, err
    assert _saved_config(tmp_path / "a" / "run")["data"]["dataset_dir"] == str(tmp_path / "a" / "data")
    monkeypatch.chdir(tmp_path / "b")
    rc, out, err = run_main(["pretrain", f"train.out_dir={tmp_path / 'a' / 'run'}", "train.max_iters=9", "--resume"])
    assert rc == 0, err
    assert "finished 9 steps" in out and "preparing" not in out
    assert not (tmp_path / "b" / "data").exists()
