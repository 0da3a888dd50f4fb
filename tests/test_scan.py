"""GPTConfig.scan_layers: the blocks run as one jax.lax.scan over their stacked weights and compute
what the Python loop computes (logits, gradients, dropout, remat, PEFT, a named mesh, training),
while the stored state keeps its per-layer paths. Blocks that differ fall back to the loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm import parallel
from jaxllm.config import GPTConfig
from jaxllm.configfile import load_config
from jaxllm.losses import cross_entropy_sum
from jaxllm.model import GPT
from jaxllm.peft import AdapterConfig, LoraConfig, PeftParam, add_adapters, add_lora
from jaxllm.runs import load_checkpoint
from jaxllm.stages.pretrain import PretrainConfig, run_pretrain
from jaxllm.training.step import split_model

CFG = GPTConfig(vocab_size=64, block_size=16, n_layer=3, n_head=2, n_embd=32)
B, T = 4, 16
TOL = 1e-6
_KEY = jax.random.key(3)   # the dropout key of the forward tests


def _tokens(seed=0):
    x = np.random.default_rng(seed).integers(0, CFG.vocab_size, (B, T + 1)).astype(np.int32)
    return jnp.asarray(x[:, :-1]), jnp.asarray(x[:, 1:])


def _build(cfg, peft=None):
    """A model for `cfg`; the same weights for every value of scan_layers and remat (they do not
    touch initialisation). PEFT weights start at random values: LoRA's B and an adapter's
    up-projection start at zero, which would leave half of them out of the gradients."""
    model = GPT(cfg, rngs=nnx.Rngs(0))
    if peft is not None:
        peft(model)
        state = nnx.state(model, PeftParam)
        leaves, treedef = jax.tree.flatten(state)
        keys = jax.random.split(jax.random.key(7), len(leaves))
        nnx.update(model, jax.tree.unflatten(
            treedef, [0.1 * jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves)]))
    return model


def _layer_scans(jaxpr, n_layer):
    """How many scans over n_layer steps the program holds, nested programs included."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == "scan" and eqn.params["length"] == n_layer
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    count += _layer_scans(inner, n_layer)
    return count


def _logits_and_grads(model, trainable=nnx.Param, key=None):
    """(logits, gradient of the summed loss w.r.t. the `trainable` variables, scans over the layers
    in the traced program), as the train step takes them: the rest of the state is a separate
    argument of the compiled function, outside the differentiation."""
    x, y = _tokens()
    graphdef, params, frozen = split_model(model, trainable)

    def loss(params, frozen):
        logits = nnx.merge(graphdef, params, frozen)(x, dropout_key=key)
        return cross_entropy_sum(logits, y)[0], logits

    traced = jax.jit(jax.value_and_grad(loss, has_aux=True)).trace(params, frozen)
    (_, logits), grads = traced.lower().compile()(params, frozen)
    grads = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}
    return np.asarray(logits), grads, _layer_scans(traced.jaxpr.jaxpr, model.config.n_layer)


_LOOP = {}


def _loop_reference(dropout: bool):
    """The loop's results on the plain model, with or without dropout (computed once each)."""
    if dropout not in _LOOP:
        _LOOP[dropout] = _logits_and_grads(_build(CFG.replace(dropout=0.1)), key=_KEY if dropout else None)
    return _LOOP[dropout]


def _assert_same(name, got, want):
    (logits_s, grads_s, _), (logits_l, grads_l, _) = got, want
    d_logits = float(np.max(np.abs(logits_s - logits_l)))
    assert grads_s.keys() == grads_l.keys() and grads_s
    d_grads = max(float(np.max(np.abs(grads_s[k] - grads_l[k]))) for k in grads_l)
    g_scale = max(float(np.max(np.abs(g))) for g in grads_l.values())
    print(f"{name}: max |logits scan - loop| {d_logits:.2e} (logits up to {np.abs(logits_l).max():.2f}); "
          f"max |grad scan - loop| {d_grads:.2e} over {len(grads_l)} arrays (grads up to {g_scale:.2f})")
    assert d_logits <= TOL and d_grads <= TOL * max(1.0, g_scale)


@pytest.mark.parametrize("case", ["plain", "dropout", "remat", "dropout+remat"])
def test_scanned_blocks_give_the_loops_logits_and_gradients(case):
    """The reference is the loop without remat: remat must not change a number either. Dropout 0.1
    in every case; "plain" passes no key, "dropout" the same key to both (block i: fold_in(key, i))."""
    dropout = "dropout" in case
    loop = _loop_reference(dropout)
    scan = _logits_and_grads(_build(CFG.replace(dropout=0.1, scan_layers=True, remat="remat" in case)),
                             key=_KEY if dropout else None)
    assert loop[2] == 0 and scan[2] >= 1   # the scan is really taken (forward and its transpose)
    _assert_same(case, scan, loop)
    if dropout:  # dropout really acts: the key changes the logits
        assert np.abs(_loop_reference(False)[0] - loop[0]).max() > 1e-2


def _remat_policies(jaxpr):
    """The policy of every jax.checkpoint (remat) in the program, nested programs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("remat2", "checkpoint"):
            found.append(eqn.params["policy"])
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _remat_policies(inner)
    return found


@pytest.mark.parametrize("remat", [False, True])
def test_scan_body_saves_matmul_outputs_or_with_remat_nothing(remat):
    """remat=True recomputes the whole body in the backward pass, as the loop's remat does; without
    it the body keeps only matmul outputs, so the elementwise work is recomputed, not stored per layer
    (what XLA's fusion gives the unrolled loop)."""
    graphdef, state = nnx.split(_build(CFG.replace(scan_layers=True, remat=remat)))
    x, _ = _tokens()
    policies = _remat_policies(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(x))(state).jaxpr)
    assert policies == ([None] if remat else [jax.checkpoint_policies.dots_saveable])


def test_lora_and_adapters_on_every_layer_scan_and_give_the_loops_peft_gradients():
    """The PEFT train step's view: only PeftParam is differentiated, the frozen base comes in as a
    separate argument. LoRA's graphdefs differ by layer (each records its layer's name), so this
    also proves that blocks with one program but different static data are scanned."""
    def peft(model):
        add_lora(model, LoraConfig(r=4, target="all-linear", dropout=0.1), rngs=nnx.Rngs(1))
        add_adapters(model, AdapterConfig(reduction_factor=4), rngs=nnx.Rngs(1))

    cfg = CFG.replace(dropout=0.1)
    key = jax.random.key(5)   # LoRA's dropout on its input draws from the layer's key too
    loop = _logits_and_grads(_build(cfg, peft), PeftParam, key)
    scan = _logits_and_grads(_build(cfg.replace(scan_layers=True), peft), PeftParam, key)
    assert loop[2] == 0 and scan[2] >= 1
    names = scan[1].keys()
    assert all(".lora." in k or "adapter" in k for k in names)
    assert {k.split(".")[1] for k in names} == {str(i) for i in range(CFG.n_layer)}
    assert any(".lora." in k for k in names) and any("adapter" in k for k in names)
    _assert_same("lora + adapters", scan, loop)


def _lora_on_h1(model):
    add_lora(model, LoraConfig(r=4, target=r"h\.1\.attn\.c_attn"), rngs=nnx.Rngs(1))


def _lora_off_on_h1(model):
    add_lora(model, LoraConfig(r=4, target="all-linear"), rngs=nnx.Rngs(1))
    model.h[1].attn.c_attn.lora.enabled = False


@pytest.mark.parametrize("peft", [_lora_on_h1, _lora_off_on_h1], ids=["lora on h.1 only", "lora off on h.1"])
def test_blocks_that_differ_fall_back_to_the_loop_and_still_match(peft):
    """LoRA on one layer only: the blocks' variables differ. LoRA on every layer but switched off on
    one: the same variables, but that block computes something else, which the comparison of the
    traced programs must catch (stacking it would apply LoRA there)."""
    loop = _logits_and_grads(_build(CFG, peft))
    scan = _logits_and_grads(_build(CFG.replace(scan_layers=True), peft))
    assert scan[2] == 0   # no scan over the layers
    _assert_same(peft.__name__, scan, loop)
    if peft is _lora_off_on_h1:   # the switched-off LoRA really matters: on, the logits differ
        def everywhere(model):
            add_lora(model, LoraConfig(r=4, target="all-linear"), rngs=nnx.Rngs(1))
        assert np.abs(_logits_and_grads(_build(CFG, everywhere))[0] - loop[0]).max() > 1e-3


def test_scan_keeps_the_stored_state_paths():
    """Storage is the loop's: HF interop, PEFT files, checkpoints and partition rules read h.0, h.1, ..."""
    paths = lambda m: [p for p, _ in nnx.to_flat_state(nnx.state(m))]
    assert paths(_build(CFG.replace(scan_layers=True))) == paths(_build(CFG))
    assert ("h", 2, "mlp", "c_fc", "kernel") in paths(_build(CFG.replace(scan_layers=True)))


def test_scanned_forward_on_a_named_mesh_equals_one_device():
    assert len(jax.devices()) == 8, "tests/conftest.py forces 8 CPU devices"
    cfg = CFG.replace(scan_layers=True)
    x, _ = _tokens()
    one = np.asarray(jax.jit(lambda m: m(x))(_build(cfg)))
    mesh = parallel.make_mesh("fsdp:4,tensor:2")
    model = parallel.shard_model(_build(cfg), mesh)
    kernel = model.h[0].mlp.c_fc.kernel[...]
    assert not kernel.sharding.is_fully_replicated   # the weights really are split

    @jax.jit
    def forward(model, x):
        with parallel.on_mesh(mesh):   # as the train step traces: constrain_rows sees the mesh
            return model(x)

    text = str(jax.make_jaxpr(lambda m, x: forward(m, x))(model, x))
    assert "scan" in text
    split = np.asarray(forward(model, parallel.shard_batch(x, mesh, 0)))
    print(f"fsdp:4,tensor:2 scanned forward: max |logits - one device| {np.abs(split - one).max():.2e}")
    np.testing.assert_allclose(split, one, rtol=0, atol=TOL)


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_overrides):
    """Two tiny pretraining runs with dropout on one corpus: the loop on one device, and the scan
    on train.mesh (FSDP and tensor parallel: the stacked weights are split too)."""
    root = tmp_path_factory.mktemp("scan")
    data = f"data.dataset_dir={root}/data"

    def pretrain(name, *extra):
        overrides = tiny_overrides(root / name, "model.n_layer=3", "model.dropout=0.1", "train.max_iters=3",
                                   "sample.max_new_tokens=0", data, *extra)
        return run_pretrain(load_config(PretrainConfig, None, overrides))

    return root, pretrain("loop", "train.devices=1"), pretrain("scan", "model.scan_layers=true",
                                                               "train.mesh=fsdp:4,tensor:2")


def test_training_with_scan_layers_gives_the_loops_losses_and_weights(runs):
    _, loop, scan = runs
    assert not loop.config.scan_layers and scan.config.scan_layers   # model.scan_layers=true reached it
    want = [loop.train.losses[i] for i in sorted(loop.train.losses)]
    got = [scan.train.losses[i] for i in sorted(scan.train.losses)]
    print(f"scan on fsdp:4,tensor:2: losses {got} vs loop on one device {want}; "
          f"val {scan.val_loss} vs {loop.val_loss}")
    assert len(got) == 3
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(scan.val_loss, loop.val_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(nnx.state(scan.train.model, nnx.Param)),
                    jax.tree.leaves(nnx.state(loop.train.model, nnx.Param)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_a_scan_run_checkpoint_loads_with_its_setting_and_as_a_loop_model(runs):
    """The checkpoint of a scan run is an ordinary one: it restores (scan_layers kept in the config)
    and the same weights give the same logits with the loop."""
    root, _, _ = runs
    model, cfg, _, meta = load_checkpoint(root / "scan" / "run")
    assert cfg.scan_layers and meta["model"]["scan_layers"] is True
    loop_model = GPT(cfg.replace(scan_layers=False), rngs=nnx.Rngs(0))
    nnx.update(loop_model, nnx.state(model))
    x = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    scanned, looped = np.asarray(jax.jit(lambda m: m(x))(model)), np.asarray(jax.jit(lambda m: m(x))(loop_model))
    print(f"checkpoint: max |scan - loop logits| {np.abs(scanned - looped).max():.2e}")
    assert np.isfinite(scanned).all()
    np.testing.assert_allclose(scanned, looped, rtol=0, atol=TOL)
    # a run's metadata written before the field existed reads as the loop
    old = {k: v for k, v in meta["model"].items() if k != "scan_layers"}
    assert GPTConfig.from_dict(old).scan_layers is False
