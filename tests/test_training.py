"""Properties of the train step, optimizer, loop, checkpoints, metrics, config files and pretraining."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxllm.config import GPTConfig
from jaxllm.configfile import load_config
from jaxllm.losses import cross_entropy_sum
from jaxllm.model import GPT
from jaxllm.runs import load_checkpoint
from jaxllm.training.checkpoint import Checkpointer
from jaxllm.training.loop import LoopConfig, NonFiniteLossError, train_loop
from jaxllm.training.metrics import read_metrics
from jaxllm.training.optim import OptimConfig, decay_mask, lr_schedule, make_optimizer
from jaxllm.stages.pretrain import PretrainConfig, run_pretrain
from jaxllm.training.step import init_train_state, lm_loss_fn, make_train_step

TINY = GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32)
B, T = 4, TINY.block_size
# Constant lr (no warmup: the cosine span is one step and min_lr == lr), no weight decay.
CONST_LR = OptimConfig(learning_rate=1e-2, min_lr=1e-2, warmup_iters=0, lr_decay_iters=1,
                       weight_decay=0.0, grad_clip=1.0)


def _params(tree):
    return [np.asarray(a) for a in jax.tree.leaves(tree)]


def _fresh_state(model, optimizer):
    """A train state with its own buffers: the step donates its input state."""
    graphdef, state = init_train_state(model, optimizer)
    return graphdef, jax.tree.map(lambda a: jnp.array(a, copy=True), state)


def scaled_lm_loss(model, batch, key):
    """lm_loss_fn times a per-batch scale: scale NaN makes that step's loss NaN."""
    x, y, scale = batch
    loss_sum, count = cross_entropy_sum(model(x, dropout_key=key), y)
    return loss_sum * scale[0], count


def _fixed_batch(seed=0, scale=1.0):
    seq = np.random.default_rng(seed).integers(0, TINY.vocab_size, size=(B, T + 1)).astype(np.int32)
    return seq[None, :, :-1], seq[None, :, 1:], np.full((1, 1), scale, np.float32)


_jit_forward = jax.jit(lambda graphdef, state, x: nnx.merge(graphdef, state)(x), static_argnums=0)


def _forward(model, x):
    return np.asarray(_jit_forward(*nnx.split(model), x))


# --------------------------------------------------------------------------- step + optimizer


def test_tiny_model_overfits_one_batch_to_near_zero_loss():
    model = GPT(TINY, rngs=nnx.Rngs(0))
    optimizer = make_optimizer(CONST_LR)
    graphdef, state = _fresh_state(model, optimizer)
    step = make_train_step(graphdef, scaled_lm_loss, optimizer, lr_schedule(CONST_LR))
    batch = _fixed_batch()
    losses = []
    for _ in range(60):
        state, metrics = step(state, batch, jax.random.key(0))
        losses.append(float(metrics["loss"]))
    assert abs(losses[0] - math.log(TINY.vocab_size)) < 0.3  # starts near uniform
    assert losses[-1] < 0.05, losses[-10:]
    assert int(state.step) == 60


def test_nan_loss_leaves_state_unchanged_and_reports_not_finite():
    model = GPT(TINY, rngs=nnx.Rngs(0))
    optimizer = make_optimizer(CONST_LR)
    graphdef, state = _fresh_state(model, optimizer)
    step = make_train_step(graphdef, scaled_lm_loss, optimizer, lr_schedule(CONST_LR))
    before, before_params = _params(state), _params(state.trainable)
    state, metrics = step(state, _fixed_batch(scale=np.nan), jax.random.key(0))
    assert not bool(metrics["finite"]) and math.isnan(float(metrics["loss"]))
    for a, b in zip(before, _params(state)):  # params, optimizer moments and counters alike
        np.testing.assert_array_equal(a, b, err_msg="a NaN step must leave the train state as it was")
    assert int(state.step) == 0
    # The same compiled step does update on a finite loss: the guard is not a no-op switch.
    state, metrics = step(state, _fixed_batch(scale=1.0), jax.random.key(0))
    assert bool(metrics["finite"]) and int(state.step) == 1
    assert max(np.abs(a - b).max() for a, b in zip(before_params, _params(state.trainable))) > 1e-4


def test_grad_accum_2_equals_double_batch_normalised_by_token_count():
    model = GPT(TINY, rngs=nnx.Rngs(0))
    sgd = optax.sgd(1.0)  # params - new params == the gradient itself (Adam would hide its scale)
    rng = np.random.default_rng(1)
    x = rng.integers(0, TINY.vocab_size, size=(2 * 2, T)).astype(np.int32)
    y = rng.integers(0, TINY.vocab_size, size=(2 * 2, T)).astype(np.int32)
    y[:2, 3:] = -100  # micro-batch 0 (rows 0-1) counts 6 tokens,
    y[2, 0] = -100    # micro-batch 1 (rows 2-3) counts 31
    key = jax.random.key(0)
    p0 = _params(nnx.state(model, nnx.Param))

    def grads_and_metrics(batch):
        graphdef, state = _fresh_state(model, sgd)
        state, metrics = make_train_step(graphdef, lm_loss_fn, sgd)(state, batch, key)
        return [a - b for a, b in zip(p0, _params(state.trainable))], jax.device_get(metrics)

    accum, m_accum = grads_and_metrics((x.reshape(2, 2, T), y.reshape(2, 2, T)))
    whole, m_whole = grads_and_metrics((x[None], y[None]))
    assert float(m_accum["tokens"]) == float(m_whole["tokens"]) == 6 + 31
    np.testing.assert_allclose(float(m_accum["loss"]), float(m_whole["loss"]), rtol=1e-6)
    for a, b in zip(accum, whole):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    # Averaging the two micro-batch means instead would be far off: the comparison has teeth.
    # (Each half alone, repeated twice, gives that half's mean gradient through the same program.)
    half = [grads_and_metrics((np.stack([x[i:i + 2]] * 2), np.stack([y[i:i + 2]] * 2)))[0]
            for i in (0, 2)]
    naive = [(g0 + g1) / 2 for g0, g1 in zip(*half)]
    assert max(np.abs(n - w).max() for n, w in zip(naive, whole)) > 1e-4


def _nanogpt_get_lr(it, c):
    """nanoGPT's train.py get_lr, verbatim in logic."""
    if it < c.warmup_iters:
        return c.learning_rate * (it + 1) / (c.warmup_iters + 1)
    if it > c.lr_decay_iters:
        return c.min_lr
    decay_ratio = (it - c.warmup_iters) / (c.lr_decay_iters - c.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return c.min_lr + coeff * (c.learning_rate - c.min_lr)


def test_lr_schedule_equals_nanogpt_get_lr_in_warmup_cosine_and_after_decay():
    c = OptimConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, lr_decay_iters=110)
    steps = [0, 1, 5, 9, 10, 11, 35, 60, 100, 109, 110, 111, 500]
    got = np.asarray(jax.jit(jax.vmap(lr_schedule(c)))(jnp.asarray(steps)))
    want = np.asarray([_nanogpt_get_lr(s, c) for s in steps])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got[0] == pytest.approx(1e-3 / 11) and got[-1] == pytest.approx(1e-4)


def test_weight_decay_follows_what_a_parameter_is_in_the_base_and_in_every_peft_method():
    """Matrices decay wherever they live (base, LoRA, adapters, prefix); biases, norm scales and the
    prefix gate never do, whatever their shape (the gate is 2-D, LoRA's A and B are 3-D)."""
    from jaxllm import peft

    model = GPT(TINY, rngs=nnx.Rngs(0))
    peft.add_lora(model, peft.LoraConfig(r=2, target=("q", "v")))
    peft.add_adapters(model, peft.AdapterConfig(reduction_factor=8))
    peft.add_prefix(model, peft.PrefixConfig(num_virtual_tokens=2, projection=True, projection_hidden=8,
                                             gated=True))
    c = OptimConfig(learning_rate=0.1, min_lr=0.1, warmup_iters=0, lr_decay_iters=1, weight_decay=0.5)
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)   # nonzero everywhere (LoRA's B starts at zero)
    params = jax.tree.unflatten(treedef, [jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate(leaves)])
    optimizer = make_optimizer(c)

    @jax.jit
    def zero_grad_update(p):
        updates, _ = optimizer.update(jax.tree.map(jnp.zeros_like, p), optimizer.init(p), p)
        return optax.apply_updates(p, updates)

    new = zero_grad_update(params)
    names = [str(path[-2].key) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    decayed = {n for n, a, b in zip(names, _params(params), _params(new)) if not np.array_equal(a, b)}
    kept = set(names) - decayed
    assert decayed == {"kernel", "embedding", "a", "b", "down", "up", "w1", "w2"}
    assert kept == {"bias", "scale", "gate", "down_bias", "up_bias", "b1", "b2"}
    assert jax.tree.leaves(decay_mask(params)) == [n in decayed for n in names]
    for name, a, b in zip(names, _params(params), _params(new)):
        if name in decayed:  # AdamW with zero gradient: p <- p - lr * wd * p
            np.testing.assert_allclose(b, a * (1 - 0.1 * 0.5), rtol=1e-6)


# --------------------------------------------------------------------------- loop: NaN stop


def test_loop_stops_on_nan_naming_the_step_and_keeps_last_good_checkpoint(tmp_path):
    model = GPT(TINY, rngs=nnx.Rngs(0))
    init = _params(nnx.state(model, nnx.Param))
    loop = LoopConfig(out_dir=str(tmp_path / "run"), batch_size=B, max_iters=8, eval_interval=0,
                      log_interval=1, ckpt_interval=2, keep_ckpts=5, peak_flops=1e11,
                      tensorboard=False, progress=False)
    with pytest.raises(NonFiniteLossError, match=r"nan.*at step 5") as e:
        train_loop(model, scaled_lm_loss, lambda s: _fixed_batch(s, np.nan if s == 5 else 1.0),
                   optim=CONST_LR, loop=loop, meta={"model": TINY.to_dict()},
                   tokens_per_step=B * T, flops_per_token=TINY.flops_per_token(T))
    assert "step 4" in str(e.value)  # names the last good checkpoint
    ckpt = Checkpointer(loop.out_dir, create=False)
    try:
        assert ckpt.all_steps() == [2, 4]  # nothing written at or after the NaN step
        restored = _params(ckpt.restore_model(nnx.state(GPT(TINY, rngs=nnx.Rngs(1)), nnx.Param), 4))
    finally:
        ckpt.close()
    assert all(np.isfinite(a).all() for a in restored)
    assert max(np.abs(a - b).max() for a, b in zip(restored, init)) > 1e-4  # trained weights
    # the model object stays usable and holds finite trained weights (the NaN step was not applied)
    assert all(np.isfinite(a).all() for a in _params(nnx.state(model, nnx.Param)))
    assert np.isfinite(_forward(model, _fixed_batch(0)[0][0])).all()


def test_a_run_stopped_before_its_first_checkpoint_leaves_no_tokenizer_behind(tmp_path):
    """The tokenizer is written with the first checkpoint: a NaN at step 0 leaves no half run."""
    from jaxllm.tokenizer import CharTokenizer

    loop = LoopConfig(out_dir=str(tmp_path / "run"), batch_size=B, max_iters=4, eval_interval=0, log_interval=1,
                      ckpt_interval=2, peak_flops=1e11, tensorboard=False, progress=False)
    with pytest.raises(NonFiniteLossError, match="at step 0"):
        train_loop(GPT(TINY, rngs=nnx.Rngs(0)), scaled_lm_loss, lambda s: _fixed_batch(s, np.nan), optim=CONST_LR,
                   loop=loop, meta={"model": TINY.to_dict()}, tokens_per_step=B * T,
                   flops_per_token=TINY.flops_per_token(T), tokenizer=CharTokenizer(list("abc")))
    assert not (tmp_path / "run" / "tokenizer").exists()
    train_loop(GPT(TINY, rngs=nnx.Rngs(0)), scaled_lm_loss, _fixed_batch, optim=CONST_LR,
               loop=dataclasses.replace(loop, async_checkpoints=False), meta={"model": TINY.to_dict()},
               tokens_per_step=B * T, flops_per_token=TINY.flops_per_token(T), tokenizer=CharTokenizer(list("abc")))
    assert (tmp_path / "run" / "tokenizer").is_dir() and _checkpoint_steps(tmp_path / "run") == [2, 4]


def test_resume_check_reads_old_model_configs_with_defaults_for_fields_added_since():
    from jaxllm.training.loop import _check_model_config
    old = {k: v for k, v in TINY.to_dict().items() if k != "activation"}   # saved before the field existed
    _check_model_config({"model": old}, {"model": TINY.to_dict()}, "run")
    with pytest.raises(ValueError, match="model config"):
        _check_model_config({"model": old}, {"model": TINY.replace(n_layer=3).to_dict()}, "run")
    with pytest.raises(ValueError, match="model config"):
        _check_model_config({"model": old}, {"model": TINY.replace(activation="gelu").to_dict()}, "run")


def test_resume_with_nothing_to_resume_says_so_and_starts_at_step_0(tmp_path, capsys):
    model = GPT(TINY, rngs=nnx.Rngs(0))
    loop = LoopConfig(out_dir=str(tmp_path / "new"), batch_size=B, max_iters=1, eval_interval=0, log_interval=1,
                      ckpt_interval=0, peak_flops=1e11, tensorboard=False, progress=False, resume=True)
    result = train_loop(model, scaled_lm_loss, _fixed_batch, optim=CONST_LR, loop=loop,
                        meta={"model": TINY.to_dict()}, tokens_per_step=B * T, flops_per_token=TINY.flops_per_token(T))
    assert "holds no checkpoint yet; starting from step 0" in capsys.readouterr().out
    assert sorted(result.losses) == [0]


def test_interrupted_loop_leaves_the_model_usable_with_the_steps_that_ran(tmp_path):
    """Ctrl-C in a notebook: the donated train step took the model's buffers; the loop puts the
    latest weights back, so the model equals one trained for exactly the steps that ran."""
    def run(root, max_iters, interrupt_at=None):
        model = GPT(TINY, rngs=nnx.Rngs(0))
        loop = LoopConfig(out_dir=str(tmp_path / root), batch_size=B, max_iters=max_iters, eval_interval=0,
                          log_interval=1, ckpt_interval=0, peak_flops=1e11, tensorboard=False, progress=False)

        def batches(s):
            if s == interrupt_at:
                raise KeyboardInterrupt
            return _fixed_batch(s)
        try:
            train_loop(model, scaled_lm_loss, batches, optim=CONST_LR, loop=loop, meta={"model": TINY.to_dict()},
                       tokens_per_step=B * T, flops_per_token=TINY.flops_per_token(T))
        except KeyboardInterrupt:
            assert interrupt_at is not None
        return model

    interrupted = run("interrupted", 8, interrupt_at=3)
    for a, b in zip(_params(nnx.state(interrupted, nnx.Param)), _params(nnx.state(run("three", 3), nnx.Param)),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_ctrl_c_arriving_as_a_step_returns_keeps_the_state_that_step_returned(tmp_path, monkeypatch):
    """SIGINT after the donated step has run but before its result is bound: the loop holds the
    interrupt until the new state is bound, so the model equals one trained for exactly 3 steps."""
    import signal

    from jaxllm.training import loop as loop_module

    def run(root, max_iters):
        model = GPT(TINY, rngs=nnx.Rngs(0))
        loop = LoopConfig(out_dir=str(tmp_path / root), batch_size=B, max_iters=max_iters, eval_interval=0,
                          log_interval=1, ckpt_interval=0, peak_flops=1e11, tensorboard=False, progress=False)
        try:
            train_loop(model, scaled_lm_loss, _fixed_batch, optim=CONST_LR, loop=loop,
                       meta={"model": TINY.to_dict()}, tokens_per_step=B * T, flops_per_token=TINY.flops_per_token(T))
        except KeyboardInterrupt:
            return model, True
        return model, False

    three, _ = run("three", 3)
    real = loop_module.make_train_step

    def make_interrupting_step(*args, **kwargs):
        step, calls = real(*args, **kwargs), []

        def interrupting_step(*args):
            out = step(*args)
            calls.append(1)
            if len(calls) == 3:
                # to this thread (os.kill may hand a process-wide signal to another thread, whose
                # flag the main thread could then see only later); Python's handler runs at once
                signal.raise_signal(signal.SIGINT)
            return out
        return interrupting_step

    # the property holds under Python's own Ctrl-C handler (the loop leaves a foreign one alone):
    # start from it, unblocked, whatever an earlier test or library left behind
    prior = signal.signal(signal.SIGINT, signal.default_int_handler)
    blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        monkeypatch.setattr(loop_module, "make_train_step", make_interrupting_step)
        model, interrupted = run("interrupted", 8)
    finally:
        signal.signal(signal.SIGINT, prior)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    assert interrupted, f"SIGINT handler before the test: {prior!r}; blocked signals: {blocked}"
    for a, b in zip(_params(nnx.state(model, nnx.Param)), _params(nnx.state(three, nnx.Param)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_metrics_are_fetched_from_the_device_once_per_log_interval_not_per_step(tmp_path, monkeypatch):
    from jaxllm.training import loop as loop_module

    import inspect

    fetches = []
    real_get = jax.device_get

    def counted(tree):  # counts the loop's own fetches (Orbax and others call device_get too)
        if inspect.currentframe().f_back.f_globals.get("__name__") == loop_module.__name__:
            fetches.append(1)
        return real_get(tree)
    monkeypatch.setattr(loop_module.jax, "device_get", counted)
    model = GPT(TINY, rngs=nnx.Rngs(0))
    loop = LoopConfig(out_dir=str(tmp_path / "run"), batch_size=B, max_iters=12, eval_interval=0,
                      log_interval=4, ckpt_interval=0, peak_flops=1e11, tensorboard=False, progress=False)
    result = train_loop(model, scaled_lm_loss, _fixed_batch, optim=CONST_LR, loop=loop,
                        meta={"model": TINY.to_dict()}, tokens_per_step=B * T, flops_per_token=TINY.flops_per_token(T))
    assert len(fetches) == 12 // 4                       # steps 4, 8, 12 (the final checkpoint copies by itself)
    assert sorted(result.losses) == list(range(12))      # every step's loss is still recorded
    assert [r["step"] for r in read_metrics(loop.out_dir)] == [4, 8, 12]


def test_mfu_peak_is_the_published_one_for_the_compute_dtype_on_a_known_chip_else_measured():
    import types

    from jaxllm.training.perf import peak_flops

    h100 = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
    assert peak_flops("bfloat16", h100) == (989e12, "published bfloat16 peak of NVIDIA H100 80GB HBM3")
    assert peak_flops("float32", h100)[0] == 495e12       # TF32, what XLA uses for fp32 dots there
    v5e = types.SimpleNamespace(platform="tpu", device_kind="TPU v5 lite")
    assert peak_flops("bfloat16", v5e)[0] == 197e12
    flops, source = peak_flops("bfloat16", jax.devices("cpu")[0])
    assert flops > 1e8 and source.startswith("measured bfloat16")   # a CPU: measured, in the compute dtype


# --------------------------------------------------------------------------- pretraining runs


def _pretrain(overrides):
    return run_pretrain(load_config(PretrainConfig, None, overrides))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_overrides):
    """One uninterrupted 6-step run: checkpoints every 2 steps (keep 2), eval every 3."""
    root = tmp_path_factory.mktemp("pretrain")
    overrides = tiny_overrides(root, "train.ckpt_interval=2", "train.keep_ckpts=2",
                               "train.eval_interval=3", "train.tensorboard=true")
    return root, overrides, _pretrain(overrides)


def _checkpoint_steps(run_dir):
    ckpt = Checkpointer(run_dir, create=False)
    try:
        return ckpt.all_steps()
    finally:
        ckpt.close()


def test_checkpoints_keep_only_the_last_k(trained):
    root, _, _ = trained
    assert _checkpoint_steps(root / "run") == [4, 6]


def test_existing_run_is_not_overwritten_without_resume_or_overwrite(trained):
    root, overrides, _ = trained
    with pytest.raises(FileExistsError, match="train.resume=true.*train.overwrite=true"):
        _pretrain(overrides)
    assert _checkpoint_steps(root / "run") == [4, 6]


def test_load_checkpoint_rebuilds_model_with_identical_logits_and_tokenizer(trained):
    root, _, result = trained
    model, cfg, tok, meta = load_checkpoint(root / "run")
    assert cfg == result.config and meta["model"] == cfg.to_dict() and meta["kind"] == "pretrain"
    x = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, cfg.block_size)).astype(np.int32)
    logits = _forward(model, x)
    np.testing.assert_array_equal(logits, _forward(result.train.model, x))
    text = "the lazy fox 7"
    assert tok.vocab_size == cfg.vocab_size and tok.decode(tok.encode(text)) == text
    # An earlier checkpoint is a different model: the step argument is honoured.
    older, _, _, _ = load_checkpoint(root / "run", step=4)
    assert np.abs(_forward(older, x) - logits).max() > 1e-6


def test_metrics_jsonl_has_loss_lr_grad_norm_throughput_mfu_and_val_loss(trained):
    root, _, result = trained
    records = read_metrics(root / "run")
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in val] == [3, 6]
    assert val[-1]["val_loss"] == pytest.approx(result.val_loss) and 0 < result.val_loss < 5
    schedule = lr_schedule(load_config(PretrainConfig, None, trained[1]).optim)
    peak, flops = 1e11, result.config.flops_per_token(result.config.block_size)
    for r in train:
        assert r["loss"] == pytest.approx(result.train.losses[r["step"] - 1], rel=1e-6)
        assert r["lr"] == pytest.approx(float(schedule(r["step"] - 1)), rel=1e-6)
        assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
        assert r["mfu"] == pytest.approx(flops * r["tokens_per_s"] / peak, rel=1e-6)
    assert all(r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in train[2:])
    assert result.train.losses[5] < result.train.losses[0]


def test_tensorboard_event_files_are_written(trained):
    root, _, _ = trained
    events = list((root / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def _assert_same_params(a, b):
    la, lb = jax.tree.leaves(nnx.state(a, nnx.Param)), jax.tree.leaves(nnx.state(b, nnx.Param))
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _interrupted_run(root, tiny_overrides, *extra):
    """3 steps with a checkpoint at the end, then resumed to 6 in the same out_dir."""
    extra = ("train.eval_interval=3", "sample.max_new_tokens=0", *extra)
    first = _pretrain(tiny_overrides(root, "train.max_iters=3", *extra))
    resumed = _pretrain(tiny_overrides(root, "train.max_iters=6", "train.resume=true", *extra))
    return first, resumed


@pytest.fixture(scope="module")
def resumed(trained, tmp_path_factory, tiny_overrides):
    root = tmp_path_factory.mktemp("resume")
    return root, *_interrupted_run(root, tiny_overrides, f"data.dataset_dir={trained[0]}/data")


def test_resumed_run_is_bit_identical_to_uninterrupted_run(trained, resumed):
    full = trained[2].train
    _, first, second = resumed
    assert sorted(first.train.losses) == [0, 1, 2] and sorted(second.train.losses) == [3, 4, 5]
    assert [first.train.losses[s] for s in range(3)] == [full.losses[s] for s in range(3)]
    assert [second.train.losses[s] for s in range(3, 6)] == [full.losses[s] for s in range(3, 6)]
    _assert_same_params(second.train.model, full.model)
    assert second.val_loss == trained[2].val_loss


def test_a_run_resumes_with_remat_and_scan_layers_turned_on_and_continues_exactly(trained, tmp_path, tiny_overrides):
    """remat and scan_layers change how the network is computed, not what: resuming with them on
    (e.g. to fit memory) is allowed, and steps 4-6 equal the uninterrupted run's."""
    full = trained[2].train
    extra = ("train.eval_interval=3", "sample.max_new_tokens=0", f"data.dataset_dir={trained[0]}/data")
    _pretrain(tiny_overrides(tmp_path, "train.max_iters=3", *extra))
    second = _pretrain(tiny_overrides(tmp_path, "train.max_iters=6", "train.resume=true",
                                      "model.remat=true", "model.scan_layers=true", *extra))
    assert second.config.remat and second.config.scan_layers
    np.testing.assert_allclose([second.train.losses[s] for s in range(3, 6)],
                               [full.losses[s] for s in range(3, 6)], rtol=1e-6)


def test_resumed_run_metrics_have_each_step_once(resumed):
    root = resumed[0]
    records = read_metrics(root / "run")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]


def test_resumed_run_with_dropout_is_bit_identical(trained, tmp_path_factory, tiny_overrides):
    root = tmp_path_factory.mktemp("dropout")
    extra = ("model.dropout=0.2", f"data.dataset_dir={trained[0]}/data")
    full = _pretrain(tiny_overrides(root / "full", "train.eval_interval=3", "sample.max_new_tokens=0",
                                    *extra)).train
    first, second = _interrupted_run(root / "split", tiny_overrides, *extra)
    # Dropout is really on: the same init and batches give other losses than without it.
    assert full.losses[0] != trained[2].train.losses[0]
    assert [first.train.losses[s] for s in range(3)] == [full.losses[s] for s in range(3)]
    assert [second.train.losses[s] for s in range(3, 6)] == [full.losses[s] for s in range(3, 6)]
    _assert_same_params(second.train.model, full.model)


@pytest.mark.parametrize("extra,error,match", [
    (("data.source={short}", "model.block_size=64"), ValueError, r"val split.*block_size \+ 1 = 65"),
    (("model.vocab_size=10",), ValueError, r"model\.vocab_size=10"),
    (("model.preset=gpt5",), ValueError, r"gpt5.*cpu-small.*shakespeare-char"),
    (("data.source={root}/missing.txt",), FileNotFoundError, r"missing\.txt"),
])
def test_bad_pretraining_inputs_fail_with_a_message_naming_the_setting(
        tmp_path, tiny_overrides, extra, error, match):
    short = tmp_path / "short.txt"
    short.write_text("abcdefghij" * 12, encoding="utf-8")  # 120 chars: the val split has 12 tokens
    overrides = tiny_overrides(tmp_path, *[e.format(root=tmp_path, short=short) for e in extra])
    with pytest.raises(error, match=match):
        _pretrain(overrides)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_with_a_different_model_is_refused(trained, tmp_path):
    root, overrides, _ = trained
    with pytest.raises(ValueError, match="cannot resume.*model config"):
        _pretrain([*overrides, "train.resume=true", "model.n_layer=1"])


# --------------------------------------------------------------------------- config files


def test_unknown_config_key_error_lists_valid_keys_of_its_section():
    with pytest.raises(ValueError, match=r"train\.max_iter\b") as e:
        load_config(PretrainConfig, None, ["train.max_iter=5"])
    for key in ("train.max_iters", "train.batch_size", "train.resume", "train.out_dir"):
        assert key in str(e.value)


def test_unknown_config_section_error_lists_all_valid_keys(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("trian:\n  max_iters: 5\n", encoding="utf-8")
    with pytest.raises(ValueError, match="trian") as e:
        load_config(PretrainConfig, path)
    for key in ("train.max_iters", "optim.learning_rate", "model.n_layer", "data.source"):
        assert key in str(e.value)


def test_yaml_file_then_overrides_take_precedence_over_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  learning_rate: 2.0e-3\n  min_lr: 1e-5\ntrain:\n  max_iters: 7\n"
                    "  batch_size: 3\nmodel:\n  preset: gpt2\n", encoding="utf-8")
    c = load_config(PretrainConfig, path, ["train.max_iters=9", "model.n_layer=2"])
    assert (c.optim.learning_rate, c.train.max_iters, c.train.batch_size) == (2e-3, 9, 3)
    assert (c.model.preset, c.model.n_layer, c.model.n_embd) == ("gpt2", 2, None)
    assert c.optim.warmup_iters == PretrainConfig().optim.warmup_iters  # untouched default
    # PyYAML reads "1e-5" (no dot) as a string: it must still arrive as a float.
    assert isinstance(c.optim.min_lr, float) and c.optim.min_lr == 1e-5


def test_override_values_are_coerced_to_field_types():
    c = load_config(PretrainConfig, None, ["optim.learning_rate=1e-3", "train.max_iters=1e3",
                                           "train.resume=yes", "data.eval_batches=null",
                                           "model.dropout=0", "sample.prompt=42"])
    assert c.optim.learning_rate == 1e-3 and isinstance(c.optim.learning_rate, float)
    assert c.train.max_iters == 1000 and isinstance(c.train.max_iters, int)
    assert c.train.resume is True and c.data.eval_batches is None
    assert c.model.dropout == 0.0 and c.sample.prompt == "42"


@pytest.mark.parametrize("override,match", [
    ("train.max_iters=abc", r"train\.max_iters.*'abc'.*int"),
    ("train.max_iters=1.5", r"train\.max_iters.*1\.5"),
    ("train.resume=maybe", r"train\.resume.*maybe.*bool"),
    ("optim.learning_rate=fast", r"optim\.learning_rate.*fast.*float"),
    ("train=5", r"train.*mapping"),
    ("max_iters", r"section\.key=value"),
])
def test_bad_override_value_gives_clear_error(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(PretrainConfig, None, [override])


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(PretrainConfig, tmp_path / "nope.yaml")
