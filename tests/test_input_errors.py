"""Malformed input ends in an error that names what is wrong, never a traceback or a half-written run.

Each case here is one that benchmarks/soak_resume.py found: its CLI fuzz, an exception escaping
`jaxllm.cli.main` as a traceback or an error that did not say which file, line or setting was wrong;
its kill soak, a checkpoint that did not restore.
"""

import contextlib
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from helpers import TINY, run_main
from jaxllm.alignment.sft import SFTConfig, _scorable_records
from jaxllm.config import GPTConfig
from jaxllm.configfile import load_config
from jaxllm.data.instruct import InstructDataError, load_instruct
from jaxllm.data.synthetic import task_tokenizer
from jaxllm.model import GPT
from jaxllm.peft import LoraConfig, add_lora
from jaxllm.stages.pretrain import PretrainConfig
from jaxllm.tokenizer import build_tokenizer, load_tokenizer
from jaxllm.training.checkpoint import Checkpointer
from jaxllm.training.optim import OptimConfig, lr_schedule

TOK = task_tokenizer(extra="=")
GOOD = {"instruction": "Sort the items.", "input": "b,a", "output": "a,b"}


# --------------------------------------------------------------------------- config values


@pytest.mark.parametrize("override, match", [
    ("train.max_iters=[", r"override 'train\.max_iters=\[': the value is not valid YAML"),
    ("train.seed=`x", r"override 'train\.seed=`x': the value is not valid YAML"),
    ("train.seed=*alias", r"override 'train\.seed=\*alias': the value is not valid YAML.*undefined alias"),
    ("sample.prompt=!!python/object:os.system", r"override 'sample\.prompt=.*not valid YAML.*constructor"),
    ("sample.prompt=!!timestamp x", r"override 'sample\.prompt=!!timestamp x': the value is not valid YAML"),
    ("train.max_iters=!!int x", r"override 'train\.max_iters=!!int x': the value is not valid YAML"),
    ("train.seed=" + "9" * 5000, r"override 'train\.seed=9+': the value is not valid YAML"),
])
def test_an_override_value_yaml_cannot_read_is_named_with_the_fix(override, match):
    with pytest.raises(ValueError, match=match) as e:
        load_config(PretrainConfig, None, [override])
    assert "quote it" in str(e.value)


@pytest.mark.parametrize("override, match", [
    ("train.max_iters=.inf", r"config key 'train\.max_iters': cannot use inf as int \(a whole number"),
    ("train.max_iters=1e400", r"config key 'train\.max_iters': cannot use '1e400' as int"),
    ("train.seed=" + str(10 ** 30), r"config key 'train\.seed': cannot use 10{30} as int \(a whole number from "
                                    r"-9223372036854775808 to 9223372036854775807\)"),
    ("optim.beta1=" + "9" * 400, r"config key 'optim\.beta1': cannot use 9+ as float"),
])
def test_numbers_that_overflow_or_leave_the_64_bit_range_are_named(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(PretrainConfig, None, [override])


def test_a_large_int_setting_is_taken_exactly_not_through_a_float():
    assert load_config(PretrainConfig, None, [f"train.seed={2 ** 62 + 1}"]).train.seed == 2 ** 62 + 1


@pytest.mark.parametrize("text, match", [
    (b"train:\n  max_iters: 1\n  out_dir: r\xfcn\n", r"config file .*c\.yaml is not UTF-8 text \(byte 0xfc on line 3: invalid"),
    (b"1: 2\n", r"unknown config key\(s\) \['1'\]"),
    (b"null: x\n", r"unknown config key\(s\) \['None'\]"),
    (b"sample:\n  prompt: !!timestamp x\n", r"config file .*c\.yaml is not valid YAML"),
    (b"train:\n  seed: !!int x\n", r"config file .*c\.yaml is not valid YAML"),
])
def test_a_config_file_that_cannot_be_read_is_named(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_bytes(text)
    with pytest.raises(ValueError, match=match):
        load_config(PretrainConfig, path)


@pytest.mark.parametrize("overrides, match", [
    (["data.eval_batch_size=0"], r"data\.eval_batch_size must be positive, got 0"),
    (["data.eval_batch_size=-7"], r"data\.eval_batch_size must be positive, got -7"),
    (["data.eval_batches=0"], r"data\.eval_batches must be positive, or null"),
])
def test_eval_batches_that_hold_nothing_are_refused_before_training(overrides, match):
    """They used to train, then divide the val loss by zero windows (a ZeroDivisionError)."""
    with pytest.raises(ValueError, match=match):
        load_config(PretrainConfig, None, overrides)


@pytest.mark.parametrize("overrides, match", [
    (["eval.batch_size=0"], r"eval\.batch_size must be positive, got 0"),
    (["eval.examples=-1"], r"eval\.examples must be >= 0"),
])
def test_sft_eval_settings_are_checked(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(SFTConfig, None, overrides)


def test_negative_layer_norm_eps_is_refused():
    with pytest.raises(ValueError, match=r"layer_norm_eps must be a finite number >= 0.*-0\.5"):
        GPTConfig(layer_norm_eps=-0.5)


@pytest.mark.parametrize("target", [5, {"q": 1}, 1.5])
def test_a_lora_target_that_is_no_string_or_list_is_named(target):
    model = GPT(TINY, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"peft\.lora\.target must be a regex string"):
        add_lora(model, LoraConfig(r=2, target=target))


def test_lr_schedule_takes_iteration_counts_beyond_int32_inside_jit():
    c = OptimConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=3 * 10 ** 9, lr_decay_iters=10 ** 10)
    lr = float(jax.jit(lr_schedule(c))(5))
    assert np.isclose(lr, 1e-3 * 6 / (3e9 + 1))


# --------------------------------------------------------------------------- instruction files


@pytest.mark.parametrize("bad, problem", [
    (b'{"instruction": "x", "output": "\xff"}', r"not UTF-8 text \(byte 0xff at offset 32 of the line"),
    (b'{"instruction": "x", "output": ' + b"1" * 5000 + b"}", r"invalid JSON \(Exceeds the limit"),
    (b"[" * 100000, r"invalid JSON \(maximum recursion depth"),
])
def test_a_line_that_is_not_utf8_or_not_parsable_json_names_file_and_line(tmp_path, bad, problem):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + bad + b"\n" + json.dumps(GOOD).encode() + b"\n")
    with pytest.raises(InstructDataError, match=problem) as info:
        load_instruct(path, TOK)
    assert info.value.line == 2 and str(info.value).startswith(f"{path}:2: ")
    ds = load_instruct(path, TOK, on_error="skip", log=None)
    assert (ds.stats.kept, ds.stats.skipped, [e.line for e in ds.examples]) == (2, 1, [1, 3])


def test_held_out_records_skip_a_line_that_is_not_utf8(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe\n" + json.dumps(GOOD).encode() + b"\n")
    assert _scorable_records(path, "alpaca") == [GOOD, GOOD]


def test_a_lone_surrogate_is_a_value_error_of_the_bpe_tokenizer_and_names_the_line(tmp_path):
    bpe = build_tokenizer("bpe", text="Sort the items. a,b b,a " * 50, vocab_size=300)
    with pytest.raises(ValueError, match=r"lone surrogate '\\ud800' at position 1"):
        bpe.encode("a\ud800b")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + '{"instruction": "\\ud800", "output": "x"}\n', encoding="utf-8")
    with pytest.raises(InstructDataError, match=r"d\.jsonl:2: cannot tokenize: .*lone surrogate"):
        load_instruct(path, bpe)


# --------------------------------------------------------------------------- paths and the CLI


def test_a_run_directory_with_a_backslash_is_refused_before_anything_is_written(tmp_path):
    """TensorStore reads "\\" as a folder separator: the arrays of such a checkpoint land elsewhere,
    and the checkpoint, complete by name, never restores."""
    with pytest.raises(ValueError, match=r"backslash.*train\.out_dir"):
        Checkpointer(tmp_path / "run\\n")
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_is_written_beside_the_checkpoints_when_out_dir_starts_with_a_tilde(
        tmp_path, tiny_overrides, monkeypatch):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    rc, _, err = run_main(["pretrain", *tiny_overrides(tmp_path, "train.out_dir=~/run", "sample.max_new_tokens=0")])
    assert rc == 0, err
    runs = [p.parent for p in tmp_path.rglob("checkpoints")]
    assert len(runs) == 1 and (runs[0] / "tokenizer").is_dir() and (runs[0] / "metrics.jsonl").is_file()
    assert not [p for p in tmp_path.rglob("tokenizer") if p.parent != runs[0] and "data" not in p.parts]


def test_cli_names_an_unknown_users_home_instead_of_a_traceback(tmp_path, tiny_overrides):
    rc, _, err = run_main(["pretrain", *tiny_overrides(tmp_path, "data.source=~nosuchuser_jaxllm/x.txt")])
    assert rc == 2 and "jaxllm pretrain: error: a path given starts with ~user" in err


def test_cli_sample_errors_name_the_flag_or_path(tmp_path, tiny_overrides):
    rc, _, err = run_main(["pretrain", *tiny_overrides(tmp_path, "sample.max_new_tokens=0")])
    assert rc == 0, err
    run = tmp_path / "run"
    rc, _, err = run_main(["sample", "--ckpt", run, "--prompt", "\u00e9"])   # not in the char vocabulary
    assert rc == 2 and "jaxllm sample: error: --prompt '\u00e9' cannot be encoded" in err
    rc, _, err = run_main(["sample", "--ckpt", run, "--seed", 2 ** 70])
    assert rc == 2 and "--seed must be a 64-bit integer" in err
    rc, _, err = run_main(["sample", "--ckpt", tmp_path / ("x" * 300)])    # the system refuses the name
    assert rc == 2 and "jaxllm sample: error: [Errno 36] File name too long" in err


def test_a_file_that_is_no_tokenizer_json_is_a_value_error_naming_it(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("just text\n")
    with pytest.raises(ValueError, match=r"corpus\.txt is not a Hugging Face tokenizer\.json"):
        load_tokenizer(path)


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="resolves unlink(dir_fd=...) through /proc")
def test_a_checkpoint_whose_deletion_stops_halfway_is_no_longer_listed(tmp_path, monkeypatch):
    """Orbax deletes the checkpoints past `keep`; a run killed halfway through that deletion must not
    leave a listed step with files missing (benchmarks/soak_resume.py caught one: "Truncated
    Zstd-compressed stream"). Here every file of step 1 after the first refuses to go."""
    state = nnx.State({"w": nnx.Param(np.arange(4, dtype=np.float32))})
    ck = Checkpointer(tmp_path, keep=1)
    ck.save(1, state, {"step": np.int32(1)}, {"kind": "test"})
    ck.wait()
    real_unlink, removed = os.unlink, []

    def unlink(path, *args, dir_fd=None, **kwargs):
        full = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path) if dir_fd is not None else str(path)
        if f"{os.sep}checkpoints{os.sep}1{os.sep}" in full:
            if removed:
                raise OSError(5, "simulated kill in the middle of a deletion", full)
            removed.append(full)
        return real_unlink(path, *args, dir_fd=dir_fd, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    ck.save(2, state, {"step": np.int32(2)}, {"kind": "test"})
    with contextlib.suppress(Exception):
        ck.close()
    monkeypatch.undo()
    reader = Checkpointer(tmp_path, create=False)
    try:
        assert reader.all_steps() == [2]
        for step in reader.all_steps():
            assert reader.read_meta(step) == {"kind": "test"}
            restored = reader.restore_model(nnx.State({"w": nnx.Param(np.zeros(4, np.float32))}), step)
            np.testing.assert_array_equal(np.asarray(restored["w"][...]), np.arange(4))
    finally:
        reader.close()


@pytest.mark.parametrize("override, match", [
    ("optim.learning_rate=-1", r"optim\.learning_rate must be a finite number >= 0, got -1\.0"),
    ("optim.min_lr=inf", r"optim\.min_lr must be a finite number >= 0, got inf"),
    ("optim.weight_decay=nan", r"optim\.weight_decay must be a finite number >= 0, got nan"),
    ("optim.grad_clip=-0.5", r"optim\.grad_clip must be a finite number >= 0"),
    ("optim.beta1=-1", r"optim\.beta1 must be in \[0, 1\), got -1\.0"),
    ("optim.beta2=1", r"optim\.beta2 must be in \[0, 1\), got 1\.0"),
    ("optim.warmup_iters=-7", r"optim\.warmup_iters must be >= 0, got -7"),
])
def test_optimizer_settings_out_of_range_are_refused_not_trained_with(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(PretrainConfig, None, [override])


def test_an_empty_text_source_is_named_not_read_as_the_current_folder(tmp_path):
    from jaxllm.data import load_text

    with pytest.raises(FileNotFoundError, match="the text source is empty"):
        load_text("")
