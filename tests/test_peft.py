"""Parameter-efficient fine-tuning: LoRA, bottleneck adapters and prefix tuning compute what their
definitions say, train only their own weights, merge/disable/save/load without touching the base
model, and LoRA files cross to and from Hugging Face PEFT with the same logits.

The base is TINY with every weight (LayerNorm gains and biases included) moved off its initial
value, built from numpy so that no test pays for GPT's op-by-op init. The numbers are checked
against `_reference_logits`, a float64 numpy GPT-2 that reads the model's weights and applies
LoRA, adapters and prefixes from their papers' formulas, not through jaxllm's code.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import TINY, random_hf_arrays, random_tokens

import jaxllm
from jaxllm.interop.hf import model_from_hf_state
from jaxllm.interop import PeftFileError, load_peft, save_peft
from jaxllm.peft import (AdapterConfig, AdapterFileError, LoraConfig, PeftParam,
                         PrefixConfig, add_adapters, add_lora, add_prefix, disabled, format_report,
                         load_adapter, lora_layers, merge, parameter_report, peft_modules,
                         save_adapter, unmerge)
from jaxllm.training.optim import OptimConfig, make_optimizer
from jaxllm.training.step import init_train_state, lm_loss_fn, make_train_step

X = random_tokens(0, (2, 8))
EXACT = dict(rtol=0, atol=1e-6)      # "unchanged": identical up to float32 reassociation
REF = dict(rtol=0, atol=1e-5)        # float32 model vs float64 reference


# --------------------------------------------------------------------------- models and references


@functools.lru_cache(maxsize=None)
def _base_split(cfg, seed):
    return nnx.split(model_from_hf_state(random_hf_arrays(cfg, seed), cfg))


def base_model(cfg=TINY, seed=0):
    """A fresh copy of the perturbed base (its own Variables: editing it leaves the others alone)."""
    return nnx.merge(*_base_split(cfg, seed), copy=True)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


def logits(model, tokens=X):
    return np.asarray(_forward(*nnx.split(model), jnp.asarray(tokens)))


def randomize(model, seed, std=0.1):
    """Every PEFT weight drawn from N(0, std^2): LoRA B, adapter up-projections, prefix gates all non-zero."""
    state = nnx.state(model, PeftParam)
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(state):
        var[...] = jnp.asarray(std * rng.standard_normal(var.shape), var[...].dtype)
    nnx.update(model, state)
    return model


def peft_arrays(model):
    return {".".join(map(str, p)): np.array(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, PeftParam))}


def base_arrays(model):
    return {".".join(map(str, p)): np.array(v[...])
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Not(PeftParam)))}


def _np(var):
    return np.asarray(var[...], np.float64)


def _expected_scale(config):
    return config.alpha / (math.sqrt(config.r) if config.rslora else config.r)


def _ref_linear(lin, x):
    """x @ W + b, plus x @ A @ B * scale on each LoRA part's slice of the output."""
    y = x @ _np(lin.kernel).reshape(x.shape[-1], -1) + _np(lin.bias).reshape(-1)  # c_attn's (D, 3, D) as (D, 3D)
    lora = lin.lora
    if lora is not None and lora.enabled and not lora.merged:
        a, b = _np(lora.a), _np(lora.b)
        for p, part in enumerate(lora.parts):
            y[:, part.offset:part.offset + part.size] += x @ a[p] @ b[p] * _expected_scale(lora.config)
    return y


def _ref_adapter(adapter, h):
    if adapter is None or not adapter.enabled:
        return h
    act = {"relu": lambda z: np.maximum(z, 0), "tanh": np.tanh}[adapter.config.activation]
    return h + act(h @ _np(adapter.down) + _np(adapter.down_bias)) @ _np(adapter.up) + _np(adapter.up_bias)


def _ln(x, ln, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * _np(ln.scale) + _np(ln.bias)


def _softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _ref_prefix_kv(model):
    """(n, L, 2, H, hd) as PEFT lays out past_key_values: per layer i, key then value (2i, 2i+1)."""
    prefix, cfg = model.prefix, model.config
    if prefix.config.projection:
        hidden = np.tanh(_np(prefix.embedding) @ _np(prefix.w1) + _np(prefix.b1))
        table = hidden @ _np(prefix.w2) + _np(prefix.b2)
    else:
        table = _np(prefix.table)
    return table.reshape(prefix.config.num_virtual_tokens, cfg.n_layer, 2, cfg.n_head, cfg.head_dim)


def _reference_logits(model, tokens=X):
    """float64 GPT-2 with LoRA, adapters and a prefix (one joint softmax over prefix + tokens, or,
    gated, a token softmax plus gate * a prefix softmax)."""
    cfg = model.config
    H, hd, D, eps = cfg.n_head, cfg.head_dim, cfg.n_embd, cfg.layer_norm_eps
    wte, wpe = _np(model.wte.embedding), _np(model.wpe.embedding)
    prefix = model.prefix if model.prefix is not None and model.prefix.enabled else None
    prefix_kv = _ref_prefix_kv(model) if prefix is not None else None
    out = []
    for row in np.asarray(tokens):
        T = len(row)
        causal = np.tril(np.ones((T, T), bool))
        x = wte[row] + wpe[:T]
        for i, block in enumerate(model.h):
            qkv = _ref_linear(block.attn.c_attn, _ln(x, block.ln_1, eps)).reshape(T, 3, H, hd)
            q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
            scores = np.where(causal, np.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd), -np.inf)
            if prefix is None:
                y = np.einsum("hqk,khd->qhd", _softmax(scores), v)
            else:
                kp, vp = prefix_kv[:, i, 0], prefix_kv[:, i, 1]
                prefix_scores = np.einsum("qhd,nhd->hqn", q, kp) / math.sqrt(hd)
                if prefix.config.gated:
                    gate_H = _np(prefix.gate)[i]
                    y = (np.einsum("hqk,khd->qhd", _softmax(scores), v)
                         + np.einsum("hqn,nhd->qhd", gate_H[:, None, None] * _softmax(prefix_scores), vp))
                else:
                    joint = _softmax(np.concatenate([prefix_scores, scores], -1))
                    n = kp.shape[0]
                    y = np.einsum("hqn,nhd->qhd", joint[..., :n], vp) + np.einsum("hqk,khd->qhd", joint[..., n:], v)
            a = _ref_adapter(block.attn_adapter, _ref_linear(block.attn.c_proj, y.reshape(T, D)))
            x = x + a
            m = _ref_linear(block.mlp.c_proj, _gelu(_ref_linear(block.mlp.c_fc, _ln(x, block.ln_2, eps))))
            x = x + _ref_adapter(block.mlp_adapter, m)
        out.append(_ln(x, model.ln_f, eps) @ wte.T)
    return np.stack(out)


def with_method(method, model=None):
    """The base model with one PEFT method (or a combination) added, freshly initialised."""
    model = model or base_model()
    if "lora" in method:
        add_lora(model, LoraConfig(r=4, alpha=8, target=("q", "v")))
    if "houlsby" in method or "adapters" in method:
        add_adapters(model, AdapterConfig(reduction_factor=4))
    if "pfeiffer" in method:
        add_adapters(model, AdapterConfig(reduction_factor=4, placement="pfeiffer", activation="tanh"))
    if "gated_prefix" in method:
        add_prefix(model, PrefixConfig(num_virtual_tokens=3, gated=True))
    elif "prefix_projection" in method:
        add_prefix(model, PrefixConfig(num_virtual_tokens=3, projection=True, projection_hidden=16))
    elif "prefix" in method:
        add_prefix(model, PrefixConfig(num_virtual_tokens=3))
    return model


def test_reference_matches_the_base_model():
    """The reference itself is right, so agreeing with it below means something."""
    np.testing.assert_allclose(logits(base_model()), _reference_logits(base_model()), **REF)


# --------------------------------------------------------------------------- 1. fresh methods, prefixes


@pytest.mark.parametrize("method", ["lora", "houlsby", "pfeiffer", "gated_prefix"])
def test_fresh_lora_adapters_and_gated_prefix_leave_logits_unchanged(method):
    model = with_method(method)
    assert peft_modules(model)
    np.testing.assert_allclose(logits(model), logits(base_model()), **EXACT)


@pytest.mark.parametrize("method", ["prefix", "prefix_projection", "gated_prefix"])
def test_prefix_logits_match_the_reference_softmax_over_prefix_and_tokens(method):
    """Ungated: one softmax over the prefix keys and the tokens (so a fresh prefix changes the
    model); gated with an open gate: the token softmax plus gate * the prefix's own softmax."""
    model = with_method(method)
    if method == "gated_prefix":
        randomize(model, 1, std=0.5)
    got = logits(model)
    assert np.abs(got - logits(base_model())).max() > 1e-3
    np.testing.assert_allclose(got, _reference_logits(model), **REF)


@functools.partial(jax.jit, static_argnums=0)
def _forward_cached(graphdef, state, tokens, cache):
    return nnx.merge(graphdef, state)(tokens, cache=cache)


@functools.partial(jax.jit, static_argnums=0)
def _prefix_loss_and_grads(graphdef, params, rest, x):
    return jax.value_and_grad(lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(x) ** 2))(params)


@pytest.mark.parametrize("gated", [False, True])
def test_prefix_model_with_remat_recomputes_and_gives_the_same_loss_and_grads(gated):
    """remat=True reaches the path a prefix model trains through (it attends to cached prefix slots)."""
    def build(remat):
        model = base_model(TINY.replace(remat=remat))
        add_prefix(model, PrefixConfig(num_virtual_tokens=3, gated=gated), rngs=nnx.Rngs(1))
        if gated:  # a fresh gate is zero, which would hide the prefix from the gradients
            model.prefix.gate[...] = jnp.full(model.prefix.gate[...].shape, 0.5)
        return model

    x = jnp.asarray(random_tokens(0, (2, 8)))
    results = []
    for remat in (False, True):
        graphdef, params, rest = nnx.split(build(remat), PeftParam, ...)
        text = str(jax.make_jaxpr(_prefix_loss_and_grads.__wrapped__, static_argnums=0)(graphdef, params, rest, x))
        assert ("remat" in text or "checkpoint" in text) == remat
        results.append(_prefix_loss_and_grads(graphdef, params, rest, x))
    (l0, g0), (l1, g1) = results
    np.testing.assert_allclose(float(l1), float(l0), rtol=0, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-6)
    assert max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g0)) > 0


def test_cached_decoding_with_prefix_matches_the_full_forward_at_every_step():
    model = randomize(with_method("prefix"), 2, std=0.5)
    graphdef, state = nnx.split(model)
    cache = model.init_cache(2, 8)
    assert int(cache.length) == 3 and cache.max_len == 3 + 8   # the prefix in front of 8 token slots
    step_logits, cache = _forward_cached(graphdef, state, jnp.asarray(X[:, :3]), cache)
    steps = [np.asarray(step_logits)]
    for t in range(3, 8):
        step_logits, cache = _forward_cached(graphdef, state, jnp.asarray(X[:, t:t + 1]), cache)
        steps.append(np.asarray(step_logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), logits(model), **REF)


def test_prefix_with_left_padding_gives_each_row_its_unpadded_logits():
    """Padding takes no slot a real token sees and no position: the prefix stays in front of the
    first real token of a left-padded row."""
    model = randomize(with_method("prefix"), 2, std=0.5)
    padded = np.concatenate([np.zeros((2, 3), np.int32), X[:, :5]], axis=1)
    mask = np.concatenate([np.zeros((2, 3), np.int32), np.ones((2, 5), np.int32)], axis=1)
    got = np.asarray(nnx.jit(lambda m, t, a: m(t, attention_mask=a))(model, padded, mask))
    np.testing.assert_allclose(got[:, 3:], _reference_logits(model, X[:, :5]), **REF)


def test_prefix_model_takes_one_shared_pair_mask_like_the_plain_model():
    model = randomize(with_method("prefix"), 2, std=0.5)
    causal = np.tril(np.ones((8, 8), bool))[None]
    got = np.asarray(nnx.jit(lambda m, t, a: m(t, attention_mask=a))(model, X, causal))
    np.testing.assert_allclose(got, logits(model, X), **EXACT)


def test_generate_with_prefix_continues_with_the_full_forwards_greedy_tokens():
    model = randomize(with_method("prefix"), 2, std=0.5)
    ids = np.asarray(jaxllm.generate(model, X[:, :4], 4, temperature=0.0))
    assert ids.shape == (2, 8) and np.array_equal(ids[:, :4], X[:, :4])
    # greedy and causal: token t+1 is the argmax of the full forward's logits at t
    np.testing.assert_array_equal(ids[:, 4:], logits(model, ids)[:, 3:7].argmax(-1))


# --------------------------------------------------------------------------- 2. training


# Per kind of PEFT leaf: does step 1 change it? Zero-initialised leaves (LoRA B, adapter
# up-projections, the prefix gate) get a gradient at once; the others only through them, so theirs
# is exactly zero on step 1 and Adam (no weight decay) leaves them exactly as they were.
_CHANGES_ON_STEP_ONE = {"lora.b": True, "lora.a": False,
                        "adapter.up": True, "adapter.up_bias": True, "adapter.down": False, "adapter.down_bias": False,
                        "prefix.gate": True, "prefix.table": False}


def _kind(path):
    """h.0.attn_adapter.up -> adapter.up; h.0.attn.c_attn.lora.a -> lora.a; prefix.table -> prefix.table."""
    parts = path.split(".")
    owner = "adapter" if parts[-2].endswith("adapter") else parts[-2]
    return f"{owner}.{parts[-1]}"


@pytest.mark.parametrize("method", ["lora+adapters", "lora+adapters+gated_prefix"])
def test_peft_train_step_with_remat_matches_the_plain_backward(method):
    """remat=True in a PEFT train step (frozen base weights outside the gradient): two steps give
    the same loss and PEFT weights as without remat. Both forward paths: plain and through a prefix."""
    optimizer = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_iters=0, weight_decay=0.0))
    tokens = random_tokens(2, (2, 9))
    batch = (jnp.asarray(tokens[None, :, :-1]), jnp.asarray(tokens[None, :, 1:]))
    runs = []
    for remat in (False, True):
        graphdef, state = nnx.split(with_method(method, base_model(TINY.replace(remat=remat))))
        model = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))  # the step donates: own buffers
        if "gated_prefix" in method:  # a zero gate would keep the prefix out of the gradients
            model.prefix.gate[...] = jnp.full(model.prefix.gate[...].shape, 0.5)
        graphdef, state = init_train_state(model, optimizer, trainable=PeftParam)
        step = make_train_step(graphdef, lm_loss_fn, optimizer)
        losses = []
        for _ in range(2):
            state, metrics = step(state, batch, jax.random.key(0))
            losses.append(float(metrics["loss"]))
        runs.append((losses, peft_arrays(nnx.merge(graphdef, state.trainable, state.frozen, copy=True))))
    (l0, p0), (l1, p1) = runs
    np.testing.assert_allclose(l1, l0, rtol=0, atol=1e-6)
    assert p0.keys() == p1.keys() and p0
    for name in p0:
        np.testing.assert_allclose(p1[name], p0[name], rtol=0, atol=1e-6, err_msg=name)


def test_training_updates_only_peft_weights_and_base_stays_bit_identical():
    """LoRA, houlsby adapters and a gated prefix in one model, trained with trainable=PeftParam."""
    # the step donates its state: give it buffers of its own, not the cached base model's
    graphdef, state = nnx.split(with_method("lora+adapters+gated_prefix"))
    model = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
    base_before, peft_before = base_arrays(model), peft_arrays(model)
    assert {_kind(n) for n in peft_before} == set(_CHANGES_ON_STEP_ONE)
    n_trainable = parameter_report(model)["trainable"]
    optimizer = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_iters=0, weight_decay=0.0))
    graphdef, state = init_train_state(model, optimizer, trainable=PeftParam)

    # the optimizer and the gradients see the PEFT tree only: frozen weights get no gradient buffer
    train_vars = [v for _, v in nnx.to_flat_state(state.trainable)]
    assert train_vars and all(isinstance(v, PeftParam) for v in train_vars)
    assert not any(isinstance(v, PeftParam) for _, v in nnx.to_flat_state(state.frozen))
    assert sum(v.size for v in jax.tree.leaves(state.trainable)) == n_trainable
    assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0) == 2 * n_trainable  # Adam mu, nu

    step = make_train_step(graphdef, lm_loss_fn, optimizer)
    tokens = random_tokens(1, (2, 9))
    batch = (jnp.asarray(tokens[None, :, :-1]), jnp.asarray(tokens[None, :, 1:]))  # (accum=1, B, T)

    def trained(state):
        return peft_arrays(nnx.merge(graphdef, state.trainable, state.frozen, copy=True))

    state, metrics = step(state, batch, jax.random.key(0))
    assert bool(metrics["finite"])
    after_one = trained(state)
    for name, before in peft_before.items():
        changed = not np.array_equal(after_one[name], before)
        assert changed == _CHANGES_ON_STEP_ONE[_kind(name)], (name, changed)

    state, _ = step(state, batch, jax.random.key(0))
    after_two = trained(state)
    for name, before in peft_before.items():
        assert not np.array_equal(after_two[name], before), f"{name} unchanged after two steps"

    tuned = nnx.merge(graphdef, state.trainable, state.frozen, copy=True)
    base_after = base_arrays(tuned)
    assert base_after.keys() == base_before.keys()
    for name, before in base_before.items():
        assert np.array_equal(base_after[name], before), f"base weight {name} moved"
    assert np.abs(_reference_logits(tuned) - _reference_logits(base_model())).max() > 1e-4   # it learned


# --------------------------------------------------------------------------- 3. merge, unmerge, disable


def test_merged_lora_equals_unmerged_and_unmerge_restores_the_base_kernels():
    model = base_model()
    add_lora(model, LoraConfig(r=4, alpha=8, target="all-linear"))
    randomize(model, 3)
    kernels = {n: np.array(lin.kernel[...]) for n, lin in lora_layers(model).items()}
    unmerged = logits(model)
    assert np.abs(unmerged - logits(base_model())).max() > 1e-3

    merge(model)
    assert all(not np.array_equal(lin.kernel[...], kernels[n]) for n, lin in lora_layers(model).items())
    np.testing.assert_allclose(logits(model), unmerged, **REF)
    with pytest.raises(ValueError, match="unmerge"):
        with disabled(model):
            pass

    unmerge(model)
    for name, lin in lora_layers(model).items():
        np.testing.assert_allclose(lin.kernel[...], kernels[name], rtol=0, atol=1e-7)
    np.testing.assert_allclose(logits(model), unmerged, **EXACT)
    with disabled(model):
        np.testing.assert_allclose(logits(model), logits(base_model()), **EXACT)


def _everything(seed=4):
    return randomize(with_method("lora+houlsby+prefix"), seed)


def test_disabled_model_computes_the_base_model_and_restores_on_exit():
    model = _everything()
    adapted = logits(model)
    np.testing.assert_allclose(adapted, _reference_logits(model), **REF)
    with disabled(model) as same:
        assert same is model
        np.testing.assert_allclose(logits(model), logits(base_model()), **EXACT)
    np.testing.assert_array_equal(logits(model), adapted)


def test_disabled_inside_one_jitted_function_gives_base_and_adapted_logits():
    """The DPO reference pattern: one compiled program traces the model with and without adapters."""
    model = _everything()

    @functools.partial(jax.jit, static_argnums=0)
    def both(graphdef, state, tokens):
        m = nnx.merge(graphdef, state)
        with disabled(m):
            reference = m(tokens)
        return reference, m(tokens)

    reference, adapted = both(*nnx.split(model), jnp.asarray(X))
    np.testing.assert_allclose(reference, logits(base_model()), **EXACT)
    np.testing.assert_allclose(adapted, logits(model), **EXACT)
    assert all(m.enabled for _, m in peft_modules(model))


def test_merge_and_unload_leaves_a_plain_gpt_that_exports_to_hf(tmp_path):
    model = base_model()
    add_lora(model, LoraConfig(r=4, alpha=8, target=("q", "v", "mlp.c_fc")))
    randomize(model, 5)
    adapted = logits(model)
    merge(model, unload=True)
    assert not peft_modules(model) and not lora_layers(model)
    jaxllm.to_hf(model, None, tmp_path / "hf")
    reloaded, cfg = jaxllm.from_hf(tmp_path / "hf")
    assert cfg == TINY
    np.testing.assert_allclose(logits(reloaded), adapted, **REF)


@pytest.mark.parametrize("method", ["lora", "houlsby", "prefix"])
def test_to_hf_refuses_a_model_with_live_peft_modules_and_says_how_to_export(tmp_path, method):
    model = with_method(method)
    with pytest.raises(ValueError, match=r"merge\(model, unload=True\).*save_adapter"):
        jaxllm.to_hf(model, None, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# --------------------------------------------------------------------------- 4. LoRA init and scale

WIDE = jaxllm.GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=4, n_embd=256)


def test_lora_a_is_uniform_within_one_over_sqrt_fan_in_and_b_is_zero():
    """A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (Kaiming-uniform, a=sqrt(5)): each layer's 16,384
    (or more) entries stay inside the bound, reach within 0.5% of it, have mean within 4 standard
    errors of 0, variance within 4% of bound^2/3 (~5 standard errors), and pass a Kolmogorov-Smirnov
    test against the uniform at the 1% level (D < 1.628/sqrt(n), the asymptotic critical value;
    fixed seed). B is exactly zero."""
    model = base_model(WIDE)
    add_lora(model, LoraConfig(r=64, alpha=16, target="all-linear"), rngs=nnx.Rngs(7))
    fan_in = {"h.0.attn.c_attn": 256, "h.0.attn.c_proj": 256, "h.0.mlp.c_fc": 256, "h.0.mlp.c_proj": 1024}
    layers = lora_layers(model)
    assert set(layers) == set(fan_in)
    firsts = []
    for name, lin in layers.items():
        a = np.asarray(lin.lora.a[...], np.float64).ravel()
        bound = 1 / math.sqrt(fan_in[name])
        assert a.size == fan_in[name] * 64
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.995 * bound, name
        assert abs(a.mean()) < 4 * bound / math.sqrt(3 * a.size), name
        assert abs(a.var() / (bound ** 2 / 3) - 1) < 0.04, name
        cdf = (np.sort(a) + bound) / (2 * bound)
        ks_d = max(np.max(np.arange(1, a.size + 1) / a.size - cdf), np.max(cdf - np.arange(a.size) / a.size))
        assert ks_d < 1.628 / math.sqrt(a.size), (name, ks_d)
        assert not np.any(np.asarray(lin.lora.b[...])), name
        firsts.append(a[:4096])
    # each layer draws its own A
    assert abs(np.corrcoef(firsts)[np.triu_indices(len(firsts), 1)]).max() < 0.1


@pytest.mark.parametrize("rslora, scale", [(False, 8 / 16), (True, 8 / 4)])
def test_lora_scale_is_alpha_over_r_or_sqrt_r_and_the_update_is_x_a_b_scale(rslora, scale):
    config = LoraConfig(r=16, alpha=8, target=r"h\.0\.mlp\.c_fc", rslora=rslora)
    assert config.scale == pytest.approx(scale)
    model = randomize(add_lora(base_model(), config), 6)
    assert set(lora_layers(model)) == {"h.0.mlp.c_fc"}
    got = logits(model)
    assert np.abs(got - logits(base_model())).max() > 1e-3
    np.testing.assert_allclose(got, _reference_logits(model), **REF)   # base + x @ A @ B * scale there

    # the same layer, called alone: output minus base output is x @ A @ B * scale
    lin = model.h[0].mlp.c_fc
    x = np.random.default_rng(0).standard_normal((5, TINY.n_embd)).astype(np.float32)
    with disabled(model):
        base_out = np.asarray(lin(jnp.asarray(x)), np.float64)
    a, b = _np(lin.lora.a)[0], _np(lin.lora.b)[0]
    np.testing.assert_allclose(np.asarray(lin(jnp.asarray(x))) - base_out, x @ a @ b * scale, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- 5. targets


def test_q_v_targets_update_only_the_q_and_v_thirds_of_c_attn():
    model = randomize(add_lora(base_model(), LoraConfig(r=4, alpha=8, target=["q", "v"])), 7)
    layers = lora_layers(model)
    assert set(layers) == {"h.0.attn.c_attn", "h.1.attn.c_attn"}
    assert [p.name for p in layers["h.1.attn.c_attn"].lora.parts] == ["h.1.attn.q", "h.1.attn.v"]
    lin, D = layers["h.0.attn.c_attn"], TINY.n_embd
    x = jnp.asarray(np.random.default_rng(1).standard_normal((6, D)), jnp.float32)
    with disabled(model):
        base_out = np.asarray(lin(x)).reshape(6, 3 * D)   # (rows, 3, D): q|k|v
    out = np.asarray(lin(x)).reshape(6, 3 * D)
    np.testing.assert_array_equal(out[:, D:2 * D], base_out[:, D:2 * D])          # k untouched
    a, b, xs = _np(lin.lora.a), _np(lin.lora.b), np.asarray(x, np.float64)
    for p, third in enumerate([slice(0, D), slice(2 * D, 3 * D)]):                 # q, v
        np.testing.assert_allclose(out[:, third] - base_out[:, third], xs @ a[p] @ b[p] * 2.0, rtol=0, atol=1e-5)


def test_all_linear_covers_the_four_linear_layers_of_every_block():
    model = add_lora(base_model(), LoraConfig(r=2, target="all-linear"))
    expected = {f"h.{i}.{n}" for i in range(TINY.n_layer)
                for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    layers = lora_layers(model)
    assert set(layers) == expected
    for name, lin in layers.items():
        (part,) = lin.lora.parts
        assert (part.name, part.offset, part.size) == (name, 0, lin.out_features)


def test_string_target_is_a_regex_on_the_whole_name_and_list_entries_match_dotted_suffixes():
    assert set(lora_layers(add_lora(base_model(), LoraConfig(r=2, target=r"h\.1\.mlp\.c_(fc|proj)")))) == \
        {"h.1.mlp.c_fc", "h.1.mlp.c_proj"}
    assert set(lora_layers(add_lora(base_model(), LoraConfig(r=2, target=["c_proj"])))) == \
        {"h.0.attn.c_proj", "h.0.mlp.c_proj", "h.1.attn.c_proj", "h.1.mlp.c_proj"}
    assert set(lora_layers(add_lora(base_model(), LoraConfig(r=2, target=["1.attn.k"])))) == {"h.1.attn.c_attn"}
    with pytest.raises(ValueError, match="matches no linear layer"):
        add_lora(base_model(), LoraConfig(r=2, target="c_fc"))   # a regex must match the whole name


@pytest.mark.parametrize("config, message", [
    (LoraConfig(r=2, target=["query"]),
     r"matches no linear layer\. Available layers: h\.\{0\.\.1\}\.attn\.c_attn, h\.\{0\.\.1\}\.attn\.q"),
    (LoraConfig(r=2, target="h.(0"), "not a valid regular expression"),
    (LoraConfig(r=2, target=["c_attn", "q"]), r"selects h\.0\.attn\.c_attn both whole and by its q/k/v thirds"),
    (LoraConfig(r=64, target=["mlp.c_fc"]), r"lora\.r=64 is larger than layer h\.0\.mlp\.c_fc allows .*r <= 32"),
], ids=["no-match", "bad-regex", "whole-and-third", "rank-too-large"])
def test_bad_lora_targets_fail_with_a_message_that_says_what_exists(config, message):
    model = base_model()
    with pytest.raises(ValueError, match=message):
        add_lora(model, config)
    assert not lora_layers(model)


def test_adding_lora_twice_to_a_layer_is_refused():
    model = add_lora(base_model(), LoraConfig(r=2, target=["q"]))
    with pytest.raises(ValueError, match=r"h\.0\.attn\.c_attn already has a LoRA"):
        add_lora(model, LoraConfig(r=2, target=["v"]))
    add_lora(model, LoraConfig(r=2, target=["mlp.c_fc"]))   # other layers are still free
    assert set(lora_layers(model)) == {"h.0.attn.c_attn", "h.1.attn.c_attn", "h.0.mlp.c_fc", "h.1.mlp.c_fc"}


# --------------------------------------------------------------------------- 6. adapter files


@pytest.mark.parametrize("method", ["lora", "adapters", "prefix_projection", "lora+adapters"])
def test_adapter_file_round_trip_reproduces_logits_exactly_and_holds_only_peft_weights(tmp_path, method):
    from safetensors.numpy import load_file

    model = randomize(with_method(method), 8)
    saved = save_adapter(model, tmp_path / "adapter", base="tiny")
    assert sorted(p.name for p in saved.iterdir()) == ["adapter.json", "adapter.safetensors"]

    tensors = load_file(str(saved / "adapter.safetensors"))
    assert sum(t.size for t in tensors.values()) == parameter_report(model)["trainable"]
    assert tensors.keys() == peft_arrays(model).keys()

    loaded = load_adapter(base_model(), saved)
    for name, array in peft_arrays(model).items():
        np.testing.assert_array_equal(peft_arrays(loaded)[name], array)
    np.testing.assert_array_equal(logits(loaded), logits(model))


@pytest.mark.parametrize("field, other", [("n_embd", 64), ("n_layer", 3)])
def test_adapter_loaded_onto_another_model_shape_names_the_mismatch(tmp_path, field, other):
    save_adapter(randomize(with_method("lora"), 9), tmp_path / "adapter")
    model = base_model(TINY.replace(**{field: other}))
    with pytest.raises(AdapterFileError, match=rf"{field} saved {getattr(TINY, field)} vs model {other}"):
        load_adapter(model, tmp_path / "adapter")
    assert not peft_modules(model)


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_adapter_file_missing_a_tensor_is_refused_and_leaves_the_model_plain(tmp_path, method):
    """A failed load must not leave half an adapter behind: a fresh prefix alone changes logits."""
    from safetensors.numpy import load_file, save_file

    saved = save_adapter(randomize(with_method(method), 9), tmp_path / "adapter")
    tensors = load_file(str(saved / "adapter.safetensors"))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, str(saved / "adapter.safetensors"))
    model = base_model()
    with pytest.raises(AdapterFileError, match=rf"missing \['{dropped}'\]"):
        load_adapter(model, saved)
    assert not peft_modules(model)
    np.testing.assert_array_equal(logits(model), logits(base_model()))


def test_adapter_is_not_loaded_onto_a_model_that_already_has_lora(tmp_path):
    save_adapter(with_method("lora"), tmp_path / "adapter")
    model = add_lora(base_model(), LoraConfig(r=2, target=["mlp.c_fc"]))
    with pytest.raises(ValueError, match="already carries"):
        load_adapter(model, tmp_path / "adapter")
    assert len(peft_modules(model)) == TINY.n_layer   # nothing was added


def test_saving_a_merged_lora_is_refused(tmp_path):
    model = merge(randomize(with_method("lora"), 10))
    with pytest.raises(ValueError, match="unmerge"):
        save_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_saving_over_a_non_empty_directory_needs_overwrite_and_leaves_it_untouched(tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "notes.txt").write_text("keep me", encoding="utf-8")
    model = with_method("lora")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_adapter(model, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text(encoding="utf-8") == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]   # no temporary directory left
    save_adapter(model, out, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "adapter.json").is_file()


# --------------------------------------------------------------------------- 7. Hugging Face PEFT format


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(torch, transformers, peft, the base model exported with to_hf)."""
    torch = pytest.importorskip("torch", reason="PEFT interop needs the torch extra: pip install -e '.[torch]'")
    transformers = pytest.importorskip("transformers", reason="PEFT interop needs transformers (the torch extra)")
    hf_peft = pytest.importorskip("peft", reason="PEFT interop needs the peft package: pip install peft")
    base_dir = jaxllm.to_hf(base_model(), None, tmp_path_factory.mktemp("hf") / "base")
    return torch, transformers, hf_peft, base_dir


def _hf_logits(hf, model):
    torch = hf[0]
    with torch.no_grad():
        return model(torch.as_tensor(X, dtype=torch.long)).logits.numpy()


def _hf_base(hf):
    return hf[1].AutoModelForCausalLM.from_pretrained(hf[3]).eval()


@pytest.mark.parametrize("configs", [
    [LoraConfig(r=4, alpha=8, target=("q", "v", "mlp.c_fc"))],
    [LoraConfig(r=4, alpha=8, target="all-linear", rslora=True)],
    [LoraConfig(r=4, alpha=8, target=("q", "v")), LoraConfig(r=2, alpha=3, target=("mlp.c_proj",))],
], ids=["q-v-c_fc", "all-linear-rslora", "two-ranks-and-scales"])
def test_jaxllm_lora_loads_in_peft_with_the_same_logits_and_comes_back_exactly(hf, tmp_path, configs):
    model = base_model()
    for config in configs:
        add_lora(model, config)
    randomize(model, 11)
    expected = logits(model)
    saved = save_peft(model, tmp_path / "adapter")
    assert sorted(p.name for p in saved.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    np.testing.assert_allclose(_hf_logits(hf, _hf_base(hf)), logits(base_model()), rtol=0, atol=1e-4)

    peft_model = hf[2].PeftModel.from_pretrained(_hf_base(hf), str(saved)).eval()
    np.testing.assert_allclose(_hf_logits(hf, peft_model), expected, rtol=0, atol=1e-4)

    loaded = load_peft(base_model(), saved)
    assert {n: [p.name for p in lin.lora.parts] for n, lin in lora_layers(loaded).items()} == \
        {n: [p.name for p in lin.lora.parts] for n, lin in lora_layers(model).items()}
    for name, array in peft_arrays(model).items():
        np.testing.assert_array_equal(peft_arrays(loaded)[name], array)
    np.testing.assert_allclose(logits(loaded), expected, **EXACT)
    # jaxllm's own reader names the reader a PEFT directory needs
    with pytest.raises(AdapterFileError, match="jaxllm.interop.load_peft"):
        load_adapter(base_model(), saved)


def test_lora_made_by_peft_loads_into_jaxllm_with_the_same_logits(hf, tmp_path):
    torch, _, hf_peft, _ = hf
    torch.manual_seed(0)
    peft_model = hf_peft.get_peft_model(_hf_base(hf), hf_peft.LoraConfig(
        target_modules=["c_attn", "c_proj"], r=4, lora_alpha=8, init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "peft")
    expected = _hf_logits(hf, peft_model.eval())

    model = load_peft(base_model(), tmp_path / "peft")
    assert set(lora_layers(model)) == {f"h.{i}.{n}" for i in range(TINY.n_layer)
                                       for n in ("attn.c_attn", "attn.c_proj", "mlp.c_proj")}
    assert all(lin.lora.config.scale == 2.0 for lin in lora_layers(model).values())
    assert np.abs(expected - logits(base_model())).max() > 1e-3
    np.testing.assert_allclose(logits(model), expected, rtol=0, atol=1e-4)


def test_peft_dora_adapter_is_refused_with_a_clear_error(hf, tmp_path):
    _, _, hf_peft, _ = hf
    peft_model = hf_peft.get_peft_model(_hf_base(hf), hf_peft.LoraConfig(
        target_modules=["c_attn"], r=4, lora_alpha=8, use_dora=True))
    peft_model.save_pretrained(tmp_path / "dora")
    model = base_model()
    with pytest.raises(PeftFileError, match="use_dora=True is not supported"):
        load_peft(model, tmp_path / "dora")
    assert not peft_modules(model)


# --------------------------------------------------------------------------- 8. parameter report


def test_parameter_report_counts_the_base_plus_exactly_the_q_v_lora_weights():
    model = add_lora(base_model(), LoraConfig(r=4, target=("q", "v")))
    # per layer, q and v each get A (n_embd x r) and B (r x n_embd)
    lora = TINY.n_layer * 2 * (TINY.n_embd * 4 + 4 * TINY.n_embd)
    assert lora == 1024
    report = parameter_report(model)
    assert report["trainable"] == lora
    assert report["total"] == jaxllm.count_params(base_model()) + lora
    assert report["trainable_percent"] == pytest.approx(100 * lora / report["total"])
    assert "Trainable params: 1,024" in format_report(report)
