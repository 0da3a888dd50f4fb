"""`jaxllm lora`: a base run (or HF directory) tuned with LoRA / adapters / a prefix through the shared
loop, checkpointing only the tuned weights, resuming exactly, and exporting adapter and merged model."""

import json
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from helpers import run_main
from jaxllm import peft
from jaxllm.configfile import load_config
from jaxllm.runs import load_checkpoint
from jaxllm.training.checkpoint import Checkpointer
from jaxllm.stages.finetune import FinetuneConfig, run_finetune
from jaxllm.stages.pretrain import PretrainConfig, run_pretrain


def _tune(root, base, *extra):
    overrides = [f"init.path={base}", f"data.dataset_dir={root}/data", f"train.out_dir={root}/run",
                 "train.batch_size=4", "train.max_iters=8", "train.eval_interval=4", "train.ckpt_interval=4",
                 "train.log_interval=1", "train.progress=false", "train.tensorboard=false",
                 "train.peak_flops=1e11", "data.eval_batch_size=8", "data.eval_batches=2",
                 "optim.learning_rate=3e-2", "optim.warmup_iters=0", "optim.lr_decay_iters=8",
                 "sample.max_new_tokens=4", *extra]
    return run_finetune(load_config(FinetuneConfig, None, overrides))


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_overrides, corpus_file):
    root = tmp_path_factory.mktemp("lora_base")
    run_pretrain(load_config(PretrainConfig, None, tiny_overrides(root, "sample.max_new_tokens=0", "train.max_iters=40",
                                                             "optim.learning_rate=1e-2")))
    return root / "run", corpus_file


@pytest.fixture(scope="module")
def tuned(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_run")
    run, corpus = base
    return root, _tune(root, run, f"data.source={corpus}")


def _params(model, filter=nnx.Param):
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, filter))}


def test_lora_run_trains_only_lora_and_lowers_val_loss(base, tuned):
    _, result = tuned
    before, _, _, _ = load_checkpoint(base[0])
    after = result.train.model
    base_params = _params(before)
    tuned_params = _params(after)
    lora = _params(after, peft.PeftParam)
    assert lora and all(p in tuned_params for p in lora)
    for path, value in base_params.items():  # every base weight is bit-identical
        np.testing.assert_array_equal(tuned_params[path], value, err_msg=str(path))
    assert set(tuned_params) - set(base_params) == set(lora)
    assert result.report["trainable"] == sum(v.size for v in lora.values())
    assert result.val_loss < result.val_loss_before


def test_lora_checkpoints_hold_only_the_tuned_weights_and_reload_with_the_base(base, tuned):
    root, result = tuned
    ckpt = Checkpointer(root / "run", create=False)
    try:
        meta = ckpt.read_meta()
        saved = ckpt.manager.restore(ckpt.latest_step(), args=ocp.args.Composite(
            model=ocp.args.StandardRestore()))["model"]
    finally:
        ckpt.close()
    n_saved = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(saved))
    assert n_saved == result.report["trainable"] < result.report["total"] // 10
    assert meta["base"]["kind"] == "run" and meta["peft"]["lora"]
    model, _, tok, _ = load_checkpoint(root / "run")
    x = np.arange(16, dtype=np.int32)[None] % tok.vocab_size
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(result.train.model(x)))


def test_lora_run_writes_adapter_files_that_reload_onto_the_base(base, tuned):
    root, result = tuned
    adapter = root / "run" / "adapter"
    names = sorted(p.name for p in adapter.iterdir())
    assert names == ["adapter.json", "adapter.safetensors", "adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    model, _, _, _ = load_checkpoint(base[0])
    peft.load_adapter(model, adapter)
    x = np.arange(16, dtype=np.int32)[None] % 8
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(result.train.model(x)))


def test_resumed_lora_run_is_bit_identical(base, tuned, tmp_path):
    run, corpus = base
    _, full = tuned
    data = f"data.source={corpus}"
    _tune(tmp_path, run, data, "train.max_iters=4")
    second = _tune(tmp_path, run, data, "train.resume=true")
    assert [second.train.losses[s] for s in range(4, 8)] == [full.train.losses[s] for s in range(4, 8)]
    a, b = _params(second.train.model, peft.PeftParam), _params(full.train.model, peft.PeftParam)
    for k in b:
        np.testing.assert_array_equal(a[k], b[k])


def test_lora_with_the_base_computed_by_remat_and_scan_matches_the_plain_run(base, tuned, tmp_path):
    """init.remat / init.scan_layers change how the base is computed while tuning, not the numbers:
    the same 8 losses as the plain run (LoRA on every layer: the scan is taken)."""
    run, corpus = base
    _, full = tuned
    got = _tune(tmp_path, run, f"data.source={corpus}", "init.remat=true", "init.scan_layers=true")
    assert got.train.model.config.remat and got.train.model.config.scan_layers
    np.testing.assert_allclose([got.train.losses[s] for s in range(8)], [full.train.losses[s] for s in range(8)],
                               rtol=1e-5)


@pytest.mark.parametrize("method", ["adapter", "prefix"])
def test_adapter_and_prefix_runs_train_only_their_weights(base, tmp_path, method):
    run, corpus = base
    result = _tune(tmp_path, run, f"data.source={corpus}", f"peft.method={method}",
                   "peft.prefix.num_virtual_tokens=4", "peft.adapter.reduction_factor=4",
                   "train.eval_interval=0", "train.ckpt_interval=0")
    trained = _params(result.train.model, peft.PeftParam)
    kind = {"adapter": peft.AdapterParam, "prefix": peft.PrefixParam}[method]
    assert trained and len(trained) == len(_params(result.train.model, kind))
    before, _, _, _ = load_checkpoint(run)
    for path, value in _params(before).items():
        np.testing.assert_array_equal(_params(result.train.model)[path], value)
    assert result.val_loss < result.val_loss_before


def test_lora_cli_tunes_samples_and_exports_a_merged_hf_model(base, tmp_path):
    run, corpus = base
    args = ["lora", f"init.path={run}", f"data.source={corpus}", f"data.dataset_dir={tmp_path}/data",
            f"train.out_dir={tmp_path}/run", "train.max_iters=3", "train.batch_size=4", "train.progress=false",
            "train.tensorboard=false", "train.eval_interval=0", "train.peak_flops=1e11",
            "data.eval_batches=1", "data.eval_batch_size=8", "sample.max_new_tokens=4"]
    rc, out, err = run_main(args)
    assert rc == 0, err
    assert "Trainable params:" in out and "adapter:" in out
    rc, out, err = run_main(["sample", "--ckpt", tmp_path / "run", "--max-new-tokens", "5", "--prompt", "ab"])
    assert rc == 0, err
    rc, out, err = run_main(["export-hf", "--ckpt", tmp_path / "run", "--out", tmp_path / "hf"])
    assert rc == 0, err
    from jaxllm.interop import from_hf
    merged, _ = from_hf(tmp_path / "hf")
    tuned, _, _, _ = load_checkpoint(tmp_path / "run")
    x = np.arange(16, dtype=np.int32)[None] % 8
    np.testing.assert_allclose(np.asarray(merged(x)), np.asarray(tuned(x)), atol=1e-5)
    rc, out, err = run_main(["lora", f"init.path={tmp_path}/missing", f"train.out_dir={tmp_path}/x"])
    assert rc == 2 and "neither a jaxllm run directory" in err


def test_lora_tunes_a_hugging_face_directory_with_its_own_tokenizer(base, tmp_path):
    from jaxllm.runs import checkpoint_to_hf

    run, corpus = base
    hf_dir = checkpoint_to_hf(run, tmp_path / "hf")   # config.json + model.safetensors + tokenizer files
    result = _tune(tmp_path, hf_dir, f"data.source={corpus}", "train.eval_interval=0", "train.ckpt_interval=0")
    assert result.val_loss < result.val_loss_before
    model, _, _, meta = load_checkpoint(tmp_path / "run")   # rebuilt from the HF base + the LoRA
    assert meta["base"]["kind"] == "hf"
    x = np.arange(16, dtype=np.int32)[None] % 8
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(result.train.model(x)))


def test_a_base_whose_weights_changed_is_refused_on_load_and_resume(base, tmp_path):
    """Same path, same config, other weights (a base re-exported or overwritten): the PEFT run's
    fingerprint of its base tells, so the LoRA is never put onto weights it was not trained on."""
    import safetensors.numpy
    from jaxllm.runs import checkpoint_to_hf

    run, corpus = base
    hf_dir = checkpoint_to_hf(run, tmp_path / "hf")
    _tune(tmp_path, hf_dir, f"data.source={corpus}", "train.max_iters=2", "train.eval_interval=0")
    load_checkpoint(tmp_path / "run")   # the base as it was: loads
    weights = safetensors.numpy.load_file(hf_dir / "model.safetensors")
    name = next(n for n in sorted(weights) if n.endswith("mlp.c_fc.weight"))
    weights[name] = weights[name] * 1.01
    safetensors.numpy.save_file(weights, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="same config, other weights"):
        load_checkpoint(tmp_path / "run")
    with pytest.raises(ValueError, match="other weights than the run was trained on"):
        _tune(tmp_path, hf_dir, f"data.source={corpus}", "train.max_iters=4", "train.resume=true",
              "train.eval_interval=0")


def test_resume_keeps_the_base_step_it_was_pinned_to_after_the_base_trained_on(base, tmp_path):
    """A LoRA run pins its base run's latest step; the base run then trains on. `jaxllm lora --resume`
    must continue on the pinned step (from the run's saved settings), not refuse or move."""
    run, corpus = base
    shutil.copytree(run, tmp_path / "base")
    tune = ["lora", f"init.path={tmp_path}/base", f"data.source={corpus}", f"data.dataset_dir={tmp_path}/data",
            f"train.out_dir={tmp_path}/lora", "train.batch_size=4", "train.max_iters=2", "train.eval_interval=0",
            "train.ckpt_interval=0", "train.progress=false", "train.tensorboard=false", "sample.max_new_tokens=0"]
    rc, _, err = run_main(tune)
    assert rc == 0, err
    pinned = load_checkpoint(tmp_path / "lora")[3]["base"]["step"]
    rc, _, err = run_main(["pretrain", f"train.out_dir={tmp_path}/base", "train.max_iters=45", "--resume"])
    assert rc == 0, err
    rc, out, err = run_main(["lora", f"train.out_dir={tmp_path}/lora", "train.max_iters=3", "--resume"])
    assert rc == 0, err
    assert "finished 3 steps" in out and load_checkpoint(tmp_path / "lora")[3]["base"]["step"] == pinned


def test_base_step_is_fixed_and_resume_refuses_changed_peft_settings(base, tuned, tmp_path):
    root, result = tuned
    ckpt = Checkpointer(base[0], create=False)
    try:
        base_step = ckpt.latest_step()
    finally:
        ckpt.close()
    _, _, _, meta = load_checkpoint(root / "run")
    assert meta["base"]["step"] == base_step is not None
    run, corpus = base
    _tune(tmp_path, run, f"data.source={corpus}", "train.max_iters=2", "train.eval_interval=0")
    with pytest.raises(ValueError, match="peft"):
        _tune(tmp_path, run, f"data.source={corpus}", "train.max_iters=4", "train.resume=true",
              "peft.lora.alpha=64", "train.eval_interval=0")


def test_a_lora_run_can_be_the_base_of_another_run(tuned, tmp_path, corpus_file):
    root, first = tuned
    second = _tune(tmp_path, root / "run", f"data.source={corpus_file}", "peft.method=adapter",
                   "peft.adapter.reduction_factor=4", "train.max_iters=2", "train.eval_interval=0")
    adapters = _params(second.train.model, peft.AdapterParam)
    assert second.report["trainable"] == sum(v.size for v in adapters.values()) > 0
    assert not peft.lora_layers(second.train.model)            # the first run's LoRA is folded in
    model, _, _, _ = load_checkpoint(tmp_path / "run")
    x = np.arange(16, dtype=np.int32)[None] % 8
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(second.train.model(x)))
