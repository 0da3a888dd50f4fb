"""The named mesh (train.mesh): data, FSDP and tensor parallelism compute what one device computes,
and FSDP really splits the parameters and the optimizer state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxllm import parallel
from jaxllm.config import GPTConfig
from jaxllm.configfile import load_config
from jaxllm.model import GPT
from jaxllm.peft.lora import LoraConfig, add_lora
from jaxllm.stages.pretrain import PretrainConfig, run_pretrain
from jaxllm.training.optim import OptimConfig, make_optimizer
from jaxllm.training.step import TrainState, init_train_state, lm_loss_fn, make_train_step

TINY = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)

pytestmark = pytest.mark.skipif(len(jax.devices()) != 8, reason="tests/conftest.py forces 8 CPU devices")


# --------------------------------------------------------------------------- parsing the mesh

@pytest.mark.parametrize("spec, expected", [
    ("data:8", {"data": 8, "fsdp": 1, "tensor": 1}),
    ("fsdp:-1", {"data": 1, "fsdp": 8, "tensor": 1}),
    ("data:2, fsdp:2, tensor:2", {"data": 2, "fsdp": 2, "tensor": 2}),
    ("tensor:4,data:-1", {"data": 2, "fsdp": 1, "tensor": 4}),
])
def test_mesh_spec_gives_every_axis_a_size_that_uses_all_devices(spec, expected):
    assert parallel.parse_mesh(spec) == expected
    mesh = parallel.make_mesh(spec)
    assert mesh.axis_names == ("data", "fsdp", "tensor") and dict(mesh.shape) == expected
    assert mesh.size == 8


@pytest.mark.parametrize("spec, match", [
    ("pipeline:8", r"train.mesh='pipeline:8': unknown axis 'pipeline'; train.mesh takes axis:size pairs"),
    ("data:2,data:4", r"axis 'data' is given twice; name each axis once"),
    ("data:two", r"bad size 'two' for data; sizes are positive integers, or -1"),
    ("data:0,fsdp:-1", r"bad size '0' for data"),
    ("data", r"'data' has no size"),
    ("data:2,fsdp:2", r"multiply to 4 but there are 8 devices; choose sizes whose product is 8"),
    ("data:-1,fsdp:-1", r"only one axis may be -1, got data, fsdp"),
    ("data:3,fsdp:-1", r"take 3 devices, which does not divide the 8 devices"),
    ("", r"names no axis"),
])
def test_bad_mesh_specs_are_refused_naming_the_setting_and_the_fix(spec, match):
    with pytest.raises(ValueError, match=match):
        parallel.parse_mesh(spec)


# --------------------------------------------------------------------------- partition rules

def _state(cfg=TINY, optimizer=None, lora=False):
    model = GPT(cfg, rngs=nnx.Rngs(0))
    trainable = nnx.Param
    if lora:
        add_lora(model, LoraConfig(r=4, target="all-linear"))
        from jaxllm.peft import LoraParam
        trainable = LoraParam
    optimizer = optimizer or make_optimizer(OptimConfig())
    graphdef, state = init_train_state(model, optimizer, trainable)
    return graphdef, jax.tree.map(lambda a: jnp.array(a, copy=True), state), optimizer


def _specs(tree):
    return {parallel.path_name(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_rules_split_embeddings_over_fsdp_and_heads_and_mlp_over_tensor():
    mesh = parallel.make_mesh("data:2,fsdp:2,tensor:2")
    _, state, _ = _state()
    specs = _specs(parallel.state_shardings(state.trainable, mesh))
    assert specs["wte.embedding"] == P(None, "fsdp")        # the vocabulary stays whole
    assert specs["wpe.embedding"] == P(None, "fsdp")
    assert specs["h.0.attn.c_attn.kernel"] == P("fsdp", None, "tensor")   # (D, 3, D): whole heads of q, k, v
    assert specs["h.0.attn.c_attn.bias"] == P(None, "tensor")
    assert specs["h.1.attn.c_proj.kernel"] == P("tensor", "fsdp")
    assert specs["h.1.attn.c_proj.bias"] == P()
    assert specs["h.0.mlp.c_fc.kernel"] == P("fsdp", "tensor")
    assert specs["h.0.mlp.c_fc.bias"] == P("tensor")
    assert specs["h.0.mlp.c_proj.kernel"] == P("tensor", "fsdp")
    assert specs["h.0.ln_1.scale"] == specs["ln_f.bias"] == P()
    batch = parallel.batch_sharding(mesh, 1)
    assert batch.spec == P(None, ("data", "fsdp"))


def test_lora_factors_follow_their_base_layer_with_the_rank_whole_and_adam_moments_their_params():
    mesh = parallel.make_mesh("fsdp:2,tensor:4")
    _, state, optimizer = _state(lora=True)
    params = parallel.state_shardings(state.trainable, mesh)
    specs = _specs(params)
    assert specs["h.0.attn.c_attn.lora.a"] == P(None, "fsdp")              # (parts, in, r)
    assert specs["h.0.attn.c_attn.lora.b"] == P(None, None, "tensor")      # (parts, r, out)
    assert specs["h.0.attn.c_proj.lora.a"] == P(None, "tensor")
    assert specs["h.0.mlp.c_proj.lora.b"] == P(None, None, "fsdp")
    # optax.tree_map_params (by structure) and the path rules (by name) agree on Adam's mu and nu
    by_structure = parallel.opt_state_shardings(optimizer, state.opt_state, params, mesh)
    by_path = parallel.state_shardings(state.opt_state, mesh)
    leaves_s, leaves_p = jax.tree.leaves(by_structure), jax.tree.leaves(by_path)
    assert len(leaves_s) == len(leaves_p) == len(jax.tree.leaves(state.opt_state))
    assert [s.spec for s in leaves_s] == [s.spec for s in leaves_p]
    assert sum(s.spec != P() for s in leaves_s) == 2 * sum(s.spec != P() for s in jax.tree.leaves(params))


def test_a_split_that_does_not_divide_names_the_parameter_setting_and_fix():
    mesh = parallel.make_mesh("tensor:4,data:2")
    with pytest.raises(ValueError, match=r"n_head=6 does not split over tensor:4 \(train.mesh="):
        parallel.check_model_split(TINY.replace(n_head=6, n_embd=48), mesh)
    with pytest.raises(ValueError, match=r"parameter h.0.mlp.c_fc.kernel \(shape \(32, 100\)\): dimension 1 "
                                         r"\(mlp, size 100\) does not split over tensor:8 \(train.mesh\)"):
        parallel.partition_spec("h.0.mlp.c_fc.kernel", (32, 100), parallel.make_mesh("tensor:8"))


# --------------------------------------------------------------------------- FSDP memory

def test_fsdp_keeps_an_eighth_of_params_and_optimizer_state_per_device_through_a_step():
    """Per-device bytes of params + Adam state under fsdp:8 <= (split part)/8 + replicated part,
    before and after a step (the jitted step keeps the split, the state is donated)."""
    mesh = parallel.make_mesh("fsdp:8")
    graphdef, state, optimizer = _state()
    params = parallel.state_shardings(state.trainable, mesh)
    sharding = TrainState(parallel.replicated(mesh), params, parallel.state_shardings(state.frozen, mesh),
                          parallel.opt_state_shardings(optimizer, state.opt_state, params, mesh))
    total = sum(x.nbytes for x in jax.tree.leaves(state))
    replicated = sum(x.nbytes for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(sharding))
                     if s.is_fully_replicated)
    state = jax.device_put(state, sharding)
    step = make_train_step(graphdef, lm_loss_fn, optimizer, mesh=mesh, state_sharding=sharding)
    x = np.random.default_rng(0).integers(0, TINY.vocab_size, (1, 8, TINY.block_size + 1)).astype(np.int32)
    batch = parallel.shard_batch((x[..., :-1], x[..., 1:]), mesh, 1)
    bound = (total - replicated) / 8 + replicated
    for when in ("placed", "after a step"):
        per_device = parallel.bytes_per_device(state)
        print(f"fsdp:8 {when}: total {total:,} B (replicated {replicated:,} B); per device "
              f"max {max(per_device.values()):,} B, bound {bound:,.0f} B, total/8 {total / 8:,.0f} B")
        assert len(per_device) == 8 and max(per_device.values()) <= bound
        assert replicated < 0.1 * total
        state, metrics = step(state, batch, jax.random.key(0))
        assert bool(metrics["finite"])
    assert jax.tree.leaves(state.trainable)[0].sharding == jax.tree.leaves(sharding.trainable)[0]


# --------------------------------------------------------------------------- training on a mesh

def _pretrain(root, tiny_overrides, *extra):
    overrides = tiny_overrides(root, "model.n_head=4", "train.batch_size=8", "train.max_iters=3",
                               "sample.max_new_tokens=0", "model.dropout=0.1", *extra)
    return run_pretrain(load_config(PretrainConfig, None, overrides))


@pytest.fixture(scope="module")
def one_device(tmp_path_factory, tiny_overrides):
    root = tmp_path_factory.mktemp("one")
    return root, _pretrain(root, tiny_overrides, "train.devices=1")


@pytest.mark.parametrize("mesh", ["data:8", "fsdp:8", "tensor:4,data:-1", "data:2,fsdp:2,tensor:2"])
def test_three_steps_on_a_mesh_match_one_device_losses_weights_and_eval(mesh, one_device, tmp_path, tiny_overrides):
    root, reference = one_device
    result = _pretrain(tmp_path, tiny_overrides, f"train.mesh={mesh}", f"data.dataset_dir={root}/data")
    losses = [result.train.losses[i] for i in range(3)]
    expected = [reference.train.losses[i] for i in range(3)]
    print(f"{mesh}: losses {losses} vs one device {expected}")
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    np.testing.assert_allclose(result.val_loss, reference.val_loss, rtol=1e-5)
    got, want = nnx.state(result.train.model, nnx.Param), nnx.state(reference.train.model, nnx.Param)
    # Adam divides by sqrt(nu): where a gradient is ~0, a last-bit difference of the summation order
    # moves that element's update by a fraction of lr (1e-3), hence atol 1e-5 rather than 1e-6
    worst = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True))
    print(f"{mesh}: largest weight difference to one device {worst:.2e}")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert len(a.sharding.device_set) == 1   # written back to one device for inference
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    # the checkpoint saved from the split state restores on one device with the same values
    from jaxllm.runs import load_checkpoint
    restored = nnx.state(load_checkpoint(tmp_path / "run")[0], nnx.Param)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_batch_that_does_not_split_over_data_and_fsdp_is_refused(tmp_path, tiny_overrides):
    with pytest.raises(ValueError, match=r"train.batch_size=6 does not split over data x fsdp = 2 x 2 = 4 "
                                         r"devices of train.mesh='data:2,fsdp:2,tensor:2'"):
        _pretrain(tmp_path, tiny_overrides, "train.mesh=data:2,fsdp:2,tensor:2", "train.batch_size=6")


def test_heads_that_do_not_split_over_tensor_are_refused(tmp_path, tiny_overrides):
    with pytest.raises(ValueError, match=r"n_head=6 does not split over tensor:4 \(train.mesh='tensor:4,data:2'\)"):
        _pretrain(tmp_path, tiny_overrides, "train.mesh=tensor:4,data:2", "model.n_head=6", "model.n_embd=48")


def test_a_run_checkpointed_under_fsdp_resumes_under_another_mesh_as_if_uninterrupted(
        one_device, tmp_path, tiny_overrides, monkeypatch):
    from jaxllm.training.checkpoint import Checkpointer
    root, reference = one_device
    data = f"data.dataset_dir={root}/data"
    _pretrain(tmp_path, tiny_overrides, "train.mesh=fsdp:8", "train.max_iters=2", data)
    placed = []   # the resume restores each array straight into the new mesh's split
    for name in ("restore_model", "restore_train"):
        original = getattr(Checkpointer, name)
        def spy(self, *args, _original=original, **kwargs):
            out = _original(self, *args, **kwargs)
            placed.extend(leaf.sharding for leaf in jax.tree.leaves(out))
            return out
        monkeypatch.setattr(Checkpointer, name, spy)
    resumed = _pretrain(tmp_path, tiny_overrides, "train.mesh=data:2,fsdp:2,tensor:2", "train.resume=true", data)
    assert placed and all(len(s.device_set) == 8 for s in placed)
    assert sum(not s.is_fully_replicated for s in placed) > len(placed) / 2
    assert list(resumed.train.losses) == [2]
    np.testing.assert_allclose(resumed.train.losses[2], reference.train.losses[2], rtol=1e-5)
    got, want = nnx.state(resumed.train.model, nnx.Param), nnx.state(reference.train.model, nnx.Param)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_lora_steps_on_a_mesh_match_one_device_with_the_frozen_base_split_too():
    mesh = parallel.make_mesh("data:2,fsdp:2,tensor:2")
    graphdef, single, optimizer = _state(lora=True)
    _, state, _ = _state(lora=True)
    params = parallel.state_shardings(state.trainable, mesh)
    sharding = TrainState(parallel.replicated(mesh), params, parallel.state_shardings(state.frozen, mesh),
                          parallel.opt_state_shardings(optimizer, state.opt_state, params, mesh))
    state = jax.device_put(state, sharding)
    step_1 = make_train_step(graphdef, lm_loss_fn, optimizer)
    step_mesh = make_train_step(graphdef, lm_loss_fn, optimizer, mesh=mesh, state_sharding=sharding)
    rng = np.random.default_rng(1)
    for _ in range(2):
        x = rng.integers(0, TINY.vocab_size, (2, 4, TINY.block_size + 1)).astype(np.int32)  # 2 micro-batches
        batch = (x[..., :-1], x[..., 1:])
        single, m1 = step_1(single, batch, jax.random.key(0))
        state, m = step_mesh(state, parallel.shard_batch(batch, mesh, 1), jax.random.key(0))
        np.testing.assert_allclose(float(m["loss"]), float(m1["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state.trainable), jax.tree.leaves(single.trainable), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    kernel = state.frozen["h"][0]["mlp"]["c_fc"]["kernel"][...]
    assert kernel.sharding.spec == P("fsdp", "tensor") and not kernel.sharding.is_fully_replicated


def test_train_mesh_and_train_devices_together_are_refused():
    from jaxllm.training.loop import LoopConfig
    with pytest.raises(ValueError, match=r"train.mesh='data:8' and train.devices=2 are both set"):
        LoopConfig(mesh="data:8", devices=2)


# --------------------------------------------------------------------------- resharding checkpoints

def test_a_checkpoint_written_under_fsdp8_restores_bit_exactly_on_another_mesh_and_on_one_device(tmp_path):
    """Saved from arrays split over fsdp:8, restored straight into data:2,tensor:2 (four devices) and
    onto one device: every array equal bit for bit, each carrying the sharding asked for."""
    from jaxllm.training.checkpoint import Checkpointer
    fsdp = parallel.make_mesh("fsdp:8")
    _, state, optimizer = _state()
    state = state._replace(step=jnp.asarray(7, jnp.int32))
    model_state = nnx.merge_state(state.trainable, state.frozen)
    train = {"step": state.step, "opt_state": state.opt_state}
    saved_model = jax.device_put(model_state, parallel.state_shardings(model_state, fsdp))
    saved_train = jax.device_put(train, parallel.state_shardings(train, fsdp))
    assert jax.tree.leaves(saved_model)[-1].sharding.spec != P()
    ckpt = Checkpointer(tmp_path)
    ckpt.save(3, saved_model, saved_train, {"note": "fsdp:8"})
    ckpt.close()

    reader = Checkpointer(tmp_path, create=False)
    other = parallel.make_mesh("data:2,tensor:2", jax.devices()[:4])
    targets = {"data:2,tensor:2 (4 devices)": (parallel.state_shardings(model_state, other),
                                                parallel.state_shardings(train, other)),
               "one device": (jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[5]), model_state),
                              jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[5]), train))}
    for where, (model_sharding, train_sharding) in targets.items():
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), model_state)
        got_model = reader.restore_model(abstract, shardings=model_sharding)
        got_train = reader.restore_train(train, shardings=train_sharding)
        n = 0
        for got, want, sharding in [(got_model, model_state, model_sharding), (got_train, train, train_sharding)]:
            for a, b, s in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(sharding), strict=True):
                assert a.sharding == s, (where, a.sharding, s)
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
                n += 1
        print(f"{where}: {n} arrays restored bit-exactly")
        kernel = got_model["h"][0]["attn"]["c_attn"]["kernel"][...]
        moment = next(leaf for path, leaf in jax.tree_util.tree_flatten_with_path(got_train)[0]
                      if parallel.path_name(path).endswith("mu.h.0.mlp.c_fc.kernel"))
        if where == "one device":
            assert kernel.sharding.device_set == moment.sharding.device_set == {jax.devices()[5]}
        else:   # heads (and the Adam moments of the MLP) split over tensor, on the four devices only
            assert kernel.sharding.spec == P(None, None, "tensor") and moment.sharding.spec == P(None, "tensor")
            assert kernel.sharding.device_set == set(jax.devices()[:4])


def test_a_checkpoint_with_the_earlier_flat_c_attn_restores_into_the_per_head_layout(tmp_path):
    """Runs written before c_attn became (D, 3, D) stored it (and its Adam moments) as (D, 3D): they
    restore, reshaped, bit for bit, on one device and split by heads on a tensor mesh."""
    from jaxllm.training.checkpoint import Checkpointer
    _, state, _ = _state()
    model_state = nnx.merge_state(state.trainable, state.frozen)
    train = {"step": jnp.asarray(5, jnp.int32), "opt_state": jax.tree.map(lambda a: a + 1.0, state.opt_state)}

    def flat(path, x):   # the earlier layout
        return x.reshape(x.shape[0], -1) if parallel.path_name(path).endswith("c_attn.kernel") else \
            x.reshape(-1) if parallel.path_name(path).endswith("c_attn.bias") else x
    old_model = jax.tree_util.tree_map_with_path(flat, nnx.to_pure_dict(model_state))
    old_train = jax.tree_util.tree_map_with_path(flat, train)
    assert old_model["h"][0]["attn"]["c_attn"]["kernel"].shape == (32, 96)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(5, nnx.State(old_model), old_train, {})
    ckpt.close()

    reader = Checkpointer(tmp_path, create=False)
    mesh = parallel.make_mesh("tensor:4,data:2")
    for shardings in (None, mesh):
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), model_state)
        if shardings is None:
            got_model, got_train = reader.restore_model(abstract), reader.restore_train(train)
        else:
            got_model = reader.restore_model(abstract, shardings=parallel.state_shardings(model_state, mesh))
            got_train = reader.restore_train(train, shardings=parallel.state_shardings(train, mesh))
            assert got_model["h"][1]["attn"]["c_attn"]["kernel"][...].sharding.spec == P(None, None, "tensor")
        for got, want in ((got_model, model_state), (got_train, train)):
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
                assert a.shape == b.shape
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------------- sharded generation

def test_greedy_generation_with_weights_split_over_tensor_and_rows_over_data_matches_one_device():
    from jaxllm.sampling import generate, generate_chunks
    cfg = TINY.replace(block_size=32)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    # sharper logits than a fresh init's, so that greedy tokens vary along a row
    nnx.update(model, jax.tree.map(lambda a: a * 3.0, nnx.state(model, nnx.Param)))
    prompts = [[1, 2, 3, 4, 5], [9, 8], [30, 31, 32], [7]]   # ragged: left padding on the mesh too
    expected = np.asarray(generate(model, prompts, 20, temperature=0.0))
    expected_penalty = np.asarray(generate(model, prompts, 20, temperature=0.0, repetition_penalty=1.3))
    expected_chunks = np.concatenate(list(generate_chunks(model, prompts, 20, temperature=0.0, chunk_size=8)), 1)
    mesh = parallel.make_mesh("tensor:4,data:2")
    parallel.shard_model(model, mesh)
    kernel = model.h[0].attn.c_attn.kernel[...]
    assert kernel.sharding.spec == P(None, None, "tensor") and parallel.mesh_of(nnx.state(model)) is mesh
    got = np.asarray(generate(model, prompts, 20, temperature=0.0))
    print("one device:\n", expected[:, 5:], "\ntensor:4,data:2:\n", got[:, 5:])
    assert len({tuple(r) for r in expected[:, 5:].tolist()}) == 4 and len(set(expected[0, 5:])) > 3
    np.testing.assert_array_equal(got, expected)
    chunks = np.concatenate(list(generate_chunks(model, prompts, 20, temperature=0.0, chunk_size=8)), 1)
    np.testing.assert_array_equal(chunks, expected_chunks)
    # the seen-token matrix (B, V) of the repetition penalty splits its rows like the prompts
    np.testing.assert_array_equal(np.asarray(generate(model, prompts, 20, temperature=0.0, repetition_penalty=1.3)),
                                  expected_penalty)
    assert model.h[0].attn.c_attn.kernel[...].sharding.spec == P(None, None, "tensor")  # left as placed


def test_the_kv_cache_splits_rows_over_data_and_heads_over_tensor_and_decodes_like_one_device():
    """(B, H, hd, S) keys and (B, H, S, hd) values: on tensor:4,data:2 each device holds an eighth
    of the cache (its rows' share of the heads); the cached logits equal one device's."""
    cfg = TINY.replace(block_size=32)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 6)).astype(np.int32)
    graphdef, state = nnx.split(model)

    def prefill_and_step(state, tokens):
        m = nnx.merge(graphdef, state)
        logits, cache = m(tokens, cache=m.init_cache(tokens.shape[0], 16))
        step_logits, cache = m(tokens[:, -1:], cache=cache)
        return logits, step_logits, cache

    want = jax.jit(prefill_and_step)(state, tokens)
    mesh = parallel.make_mesh("tensor:4,data:2")
    sharded = parallel.place(state, parallel.state_shardings(state, mesh))
    with parallel.on_mesh(mesh):
        got = jax.jit(prefill_and_step)(sharded, parallel.shard_batch(tokens, mesh, 0))
    cache = got[2]
    for k, v in zip(cache.k, cache.v):
        assert k.shape == (4, cfg.n_head, cfg.head_dim, 16) and v.shape == (4, cfg.n_head, 16, cfg.head_dim)
        want_sharding = jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), "tensor"))
        assert k.sharding.is_equivalent_to(want_sharding, 4) and v.sharding.is_equivalent_to(want_sharding, 4)
        per_device = parallel.bytes_per_device(k)
        assert len(per_device) == 8 and max(per_device.values()) == k.nbytes // 8
    for a, b in zip(jax.tree.leaves(got[:2]), jax.tree.leaves(want[:2])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)


def test_tensor_parallel_step_needs_only_all_reduces_with_per_head_qkv():
    """c_attn is (D, 3, D), split by heads over tensor: every device holds whole heads of q, k and
    v, so attention runs locally and a tensor-parallel step needs only the all-reduces after
    c_proj (forward) and c_attn/c_fc (backward). With the flat (D, 3D) columns split as they were,
    the same step also all-gathered q|k|v (4 all-gathers for 2 layers)."""
    import collections
    import re
    cfg = GPTConfig(vocab_size=128, block_size=32, n_layer=2, n_head=8, n_embd=64)
    mesh = parallel.make_mesh("tensor:8")
    graphdef, state, optimizer = _state(cfg)
    params = parallel.state_shardings(state.trainable, mesh)
    sharding = TrainState(parallel.replicated(mesh), params, parallel.state_shardings(state.frozen, mesh),
                          parallel.opt_state_shardings(optimizer, state.opt_state, params, mesh))
    state = jax.device_put(state, sharding)
    step = make_train_step(graphdef, lm_loss_fn, optimizer, mesh=mesh, state_sharding=sharding)
    x = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 8, cfg.block_size + 1)).astype(np.int32)
    batch = parallel.shard_batch((x[..., :-1], x[..., 1:]), mesh, 1)
    with parallel.on_mesh(mesh):
        hlo = step.lower(state, batch, jax.random.key(0)).compile().as_text()
    ops = collections.Counter(re.findall(
        r"= \S+ (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)(?:-start)?\(", hlo))
    print("tensor:8 step collectives:", dict(ops))
    assert ops["all-reduce"] >= 2 * cfg.n_layer
    assert set(ops) == {"all-reduce"}


def test_embedding_lookup_on_an_fsdp_mesh_needs_no_involuntary_rematerialization(capfd):
    """Looking rows up in an FSDP-split table gives them split along the width; turning that into
    the batch's row split made XLA replicate the activations ("Involuntary full rematerialization"
    in its log, twice per step under data:2,fsdp:4). The tables are gathered whole first."""
    cfg = GPTConfig(vocab_size=72, block_size=24, n_layer=1, n_head=4, n_embd=32)   # shapes no other test compiles
    mesh = parallel.make_mesh("data:2,fsdp:4")
    graphdef, state, optimizer = _state(cfg)
    params = parallel.state_shardings(state.trainable, mesh)
    sharding = TrainState(parallel.replicated(mesh), params, parallel.state_shardings(state.frozen, mesh),
                          parallel.opt_state_shardings(optimizer, state.opt_state, params, mesh))
    step = make_train_step(graphdef, lm_loss_fn, optimizer, mesh=mesh, state_sharding=sharding)
    x = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 8, cfg.block_size + 1)).astype(np.int32)
    capfd.readouterr()
    with parallel.on_mesh(mesh):
        step.lower(jax.device_put(state, sharding), parallel.shard_batch((x[..., :-1], x[..., 1:]), mesh, 1),
                   jax.random.key(0)).compile()
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
