"""Data parallelism: a step on a device mesh computes what the same step computes on one device."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm import parallel
from jaxllm.config import GPTConfig
from jaxllm.model import GPT
from jaxllm.training.step import init_train_state, lm_loss_fn, make_eval_step, make_train_step

TINY = GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.1)


def _state(optimizer):
    from flax import nnx
    graphdef, state = init_train_state(GPT(TINY, rngs=nnx.Rngs(0)), optimizer)
    return graphdef, jax.tree.map(lambda a: jnp.array(a, copy=True), state)


def _batches(n, accum, rows, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        seq = rng.integers(0, TINY.vocab_size, size=(accum, rows, TINY.block_size + 1)).astype(np.int32)
        yield seq[..., :-1], seq[..., 1:]


if jax.default_backend() == "cpu":
    assert len(jax.local_devices()) == 8, "tests/conftest.py should force 8 CPU devices"
pytestmark = pytest.mark.skipif(
    len(jax.local_devices()) < 8,
    reason="needs 8 devices; on CPU tests/conftest.py forces them, on a GPU/TPU host JAX's devices "
           "are the accelerators present")


@pytest.mark.parametrize("batch, devices, expected", [(12, 0, 6), (8, 0, 8), (9, 0, 3), (11, 0, 1), (4, 2, 2), (4, 1, 1)])
def test_mesh_uses_the_devices_that_split_the_batch_evenly(batch, devices, expected):
    mesh = parallel.data_mesh(batch, devices)
    assert (1 if mesh is None else mesh.size) == expected


@pytest.mark.parametrize("batch, expected_devices, expected_rows", [(12, 8, 16), (13, 8, 16), (8, 8, 8), (5, 5, 5)])
def test_a_stage_that_can_pad_uses_every_device_whatever_the_batch(batch, expected_devices, expected_rows):
    mesh = parallel.data_mesh(batch, 0, can_pad=True)
    assert mesh.size == expected_devices and parallel.padded_rows(batch, mesh) == expected_rows


def test_padded_rows_weigh_nothing_batch_12_on_8_devices_trains_as_on_one(tmp_path):
    """Batch 12 on 8 devices: 4 rows of padding (targets -100) make it 16 rows, 2 per device;
    losses and weights equal a one-device run of the same 12 rows."""
    from flax import nnx

    from jaxllm.losses import IGNORE_INDEX
    from jaxllm.training.loop import LoopConfig, train_loop
    from jaxllm.training.optim import OptimConfig

    cfg = TINY.replace(dropout=0.0)
    batches = list(_batches(4, accum=1, rows=12, seed=3))

    def run(devices):
        model = GPT(cfg, rngs=nnx.Rngs(0))
        loop = LoopConfig(out_dir=str(tmp_path / f"d{devices}"), batch_size=12, devices=devices, max_iters=4,
                          eval_interval=0, log_interval=1, ckpt_interval=0, peak_flops=1e11,
                          tensorboard=False, progress=False)
        result = train_loop(model, lm_loss_fn, lambda s: batches[s], optim=OptimConfig(warmup_iters=0), loop=loop,
                            meta={"model": cfg.to_dict()}, tokens_per_step=12 * cfg.block_size,
                            flops_per_token=cfg.flops_per_token(), pad_values=(0, IGNORE_INDEX))
        return result.losses, nnx.state(model, nnx.Param)

    losses8, params8 = run(0)
    losses1, params1 = run(1)
    np.testing.assert_allclose([losses8[i] for i in range(4)], [losses1[i] for i in range(4)], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params8), jax.tree.leaves(params1), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def test_pad_rows_fills_each_leaf_with_its_own_value():
    x, y = np.ones((2, 3, 4), np.int32), np.ones((2, 3, 4), np.int32)
    px, py = parallel.pad_rows((x, y), 5, (0, -100), axis=1)
    assert px.shape == py.shape == (2, 5, 4)
    assert (px[:, 3:] == 0).all() and (py[:, 3:] == -100).all() and (px[:, :3] == 1).all()


def test_automatic_mesh_on_cpu_keeps_one_device_for_many_trained_parameters_unless_asked():
    big = parallel.CPU_DATA_PARALLEL_MAX_PARAMS + 1
    on_cpu = jax.local_devices()[0].platform == "cpu"
    assert (parallel.data_mesh(8, 0, trainable_params=big) is None) == on_cpu
    assert parallel.data_mesh(8, 0, trainable_params=parallel.CPU_DATA_PARALLEL_MAX_PARAMS).size == 8
    assert parallel.data_mesh(8, 4, trainable_params=big).size == 4  # an explicit count is kept


def test_bad_device_counts_are_refused_naming_the_setting():
    with pytest.raises(ValueError, match="train.batch_size=6 does not split evenly over train.devices=4"):
        parallel.data_mesh(6, 4)
    with pytest.raises(ValueError, match="train.devices=16 but JAX sees 8"):
        parallel.data_mesh(16, 16)


def test_data_parallel_steps_match_single_device_steps_with_dropout_and_accumulation():
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
    graphdef, single = _state(optimizer)
    _, sharded = _state(optimizer)
    mesh = parallel.data_mesh(8, 4)
    sharded = jax.device_put(sharded, parallel.replicated(mesh))
    step_1 = make_train_step(graphdef, lm_loss_fn, optimizer)
    step_4 = make_train_step(graphdef, lm_loss_fn, optimizer, mesh=mesh)
    key = jax.random.key(3)
    for batch in _batches(3, accum=2, rows=8):
        single, m1 = step_1(single, batch, key)
        sharded, m4 = step_4(sharded, parallel.shard_batch(batch, mesh, 1), key)
        np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-6)
        np.testing.assert_allclose(float(m4["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(sharded.trainable), jax.tree.leaves(single.trainable)):
        assert len(a.sharding.device_set) == 4  # replicated on the mesh, not gathered to one device
        # Summation order differs across devices; Adam divides by sqrt(v), which magnifies float
        # noise on near-zero gradients, so weights agree to 1e-4 of the 3e-2 that 3 steps can move.
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
    assert int(sharded.step) == 3


def test_data_parallel_eval_matches_single_device_eval():
    graphdef, state = _state(optax.sgd(0.1))
    mesh = parallel.data_mesh(8, 8)
    x, y = next(_batches(1, accum=1, rows=8))
    s1, c1 = make_eval_step(graphdef, lm_loss_fn)(state, (x[0], y[0]))
    s8, c8 = make_eval_step(graphdef, lm_loss_fn, mesh)(state, (x[0], y[0]))
    np.testing.assert_allclose(float(s8), float(s1), rtol=1e-6)
    assert float(c8) == float(c1) == 8 * TINY.block_size


def test_setup_cpu_exposes_one_device_per_core_in_a_fresh_process():
    code = ("import os; from jaxllm import parallel; os.environ.pop('XLA_FLAGS', None); "
            "assert parallel.setup_cpu(); import jax; "
            "assert len(jax.devices('cpu')) == parallel.cpu_core_count(), jax.devices(); "
            "assert not parallel.setup_cpu()  # too late once JAX has started")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_checkpoint_saved_from_a_mesh_loads_onto_one_device(tmp_path):
    from flax import nnx

    from jaxllm.runs import load_checkpoint
    from jaxllm.training.checkpoint import Checkpointer
    model = GPT(TINY, rngs=nnx.Rngs(0))
    mesh = parallel.data_mesh(8, 4)
    state = jax.device_put(nnx.state(model), parallel.replicated(mesh))
    ckpt = Checkpointer(tmp_path / "run", keep=1)
    ckpt.save(1, state, {"step": jnp.ones((), jnp.int32)}, {"model": TINY.to_dict()})
    ckpt.close()
    loaded, cfg, _, _ = load_checkpoint(tmp_path / "run")
    leaves = jax.tree.leaves(nnx.state(loaded))
    assert all(len(a.sharding.device_set) == 1 for a in leaves)  # one device, not the saving mesh
    for a, b in zip(leaves, jax.tree.leaves(nnx.state(model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_import_leaves_the_environment_alone_and_setup_cpu_adds_flags_the_user_did_not_set():
    import jaxlib
    code = ("import os, sys, logging; before = dict(os.environ); "
            "levels = {n: logging.getLogger(n).level for n in ('', 'absl', 'jax')}; "
            "import jaxllm, jaxllm.cli, jaxllm.stages.pretrain, jaxllm.alignment.sft, jaxllm.apps; "
            "assert dict(os.environ) == before, 'import changed the environment'; "
            "assert levels == {n: logging.getLogger(n).level for n in levels}, 'import changed logging'; "
            "assert logging.getLogger().handlers == [], f'import added {logging.getLogger().handlers}'; "
            "from jaxllm import parallel; parallel.setup_cpu(int(sys.argv[1])); print(os.environ.get('XLA_FLAGS', ''))")

    def flags_after_setup(user_flags, devices=3):
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        if user_flags is not None:
            env["XLA_FLAGS"] = user_flags
        proc = subprocess.run([sys.executable, "-c", code, str(devices)], capture_output=True, text=True, env=env,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()

    expected = ["--xla_force_host_platform_device_count=3", *parallel._CPU_SPEED_FLAGS.get(jaxlib.__version__, ())]
    assert flags_after_setup(None) == expected
    mine = "--xla_cpu_experimental_ynn_fusion_type=individual_dot --xla_cpu_enable_fast_math=false"
    got = flags_after_setup(mine)
    assert got[:2] == mine.split()  # the user's value of the same flag is kept, not overridden
    assert [f for f in got if f.startswith("--xla_cpu_experimental_ynn_fusion_type")] == mine.split()[:1]
