"""Properties of the GPT model, its config, the losses and the sampler."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import TINY, random_tokens
from jaxllm.config import PRESETS, GPTConfig
from jaxllm.losses import cross_entropy, cross_entropy_sum, next_token_loss
from jaxllm.model import GPT, MLP, count_params
from jaxllm.sampling import generate



@pytest.fixture(scope="module")
def model():
    return GPT(TINY, rngs=nnx.Rngs(0))


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(graphdef, state, tokens, attention_mask, positions, dropout_key):
    return nnx.merge(graphdef, state)(tokens, attention_mask=attention_mask, positions=positions,
                                      dropout_key=dropout_key)


def fwd(m, tokens, *, attention_mask=None, positions=None, dropout_key=None):
    """m(tokens, ...) as numpy, compiled once per shape (eager NNX compiles op by op: slow on CPU)."""
    graphdef, state = nnx.split(m)
    return np.asarray(_jit_forward(graphdef, state, jnp.asarray(tokens), attention_mask, positions,
                                   dropout_key), np.float32)


# --------------------------------------------------------------------------- forward pass


def test_changing_token_t_leaves_earlier_logits_unchanged_and_changes_position_t(model):
    x = random_tokens(0, (2, TINY.block_size))
    t = 7
    x2 = x.copy()
    x2[:, t] = (x[:, t] + 5) % TINY.vocab_size
    a, b = fwd(model, x), fwd(model, x2)
    assert a.shape == (2, TINY.block_size, TINY.vocab_size)
    np.testing.assert_allclose(b[:, :t], a[:, :t], rtol=0, atol=1e-6)
    assert np.abs(b[:, t] - a[:, t]).max() > 1e-3
    assert np.abs(b[:, t + 1:] - a[:, t + 1:]).max() > 1e-3


def test_left_padded_row_with_positions_from_zero_matches_unpadded_row(model):
    T, pad = TINY.block_size, 6
    real = random_tokens(1, (T - pad,))
    full = random_tokens(2, (T,))  # a second row with no padding, to check rows do not interact
    tokens = np.stack([np.concatenate([np.full(pad, 5, np.int32), real]), full])
    mask = np.stack([np.r_[np.zeros(pad), np.ones(T - pad)], np.ones(T)]).astype(np.int32)
    positions = np.stack([np.r_[np.zeros(pad), np.arange(T - pad)], np.arange(T)]).astype(np.int32)
    out = fwd(model, tokens, attention_mask=mask, positions=positions)
    alone = fwd(model, real[None])[0]
    np.testing.assert_allclose(out[0, pad:], alone, rtol=0, atol=1e-5)
    np.testing.assert_allclose(out[1], fwd(model, tokens)[1], rtol=0, atol=1e-5)
    assert np.isfinite(out[0, :pad]).all()  # padding queries attend to nothing, yet give no NaN
    # Without the key mask the padding leaks into the real tokens: the check above is not vacuous.
    leaky = fwd(model, tokens, attention_mask=np.ones_like(mask), positions=positions)
    assert np.abs(leaky[0, pad:] - alone).max() > 1e-3
    # Without explicit positions, a (B, T) mask gives padding no position: the same logits.
    np.testing.assert_allclose(fwd(model, tokens, attention_mask=mask)[0, pad:], alone, rtol=0, atol=1e-5)


def test_sequence_longer_than_block_size_is_rejected(model):
    with pytest.raises(ValueError, match="block_size 16"):
        model(random_tokens(0, (1, 17)))


def test_dropout_key_gives_reproducible_masks_that_change_with_the_key():
    m = GPT(TINY.replace(dropout=0.5), rngs=nnx.Rngs(0))
    x = random_tokens(3, (2, TINY.block_size))
    k1 = fwd(m, x, dropout_key=jax.random.key(1))
    np.testing.assert_array_equal(k1, fwd(m, x, dropout_key=jax.random.key(1)))
    assert np.abs(k1 - fwd(m, x, dropout_key=jax.random.key(2))).max() > 1e-3


def test_bf16_compute_keeps_float32_params_and_logits_close_to_fp32(model):
    bf16 = GPT(TINY.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))  # same init as `model`
    dtypes = {p.dtype for p in jax.tree.leaves(nnx.state(bf16, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.float32)}
    x = random_tokens(4, (2, TINY.block_size))
    graphdef, state = nnx.split(bf16)
    lo_raw = _jit_forward(graphdef, state, jnp.asarray(x), None, None, None)
    assert lo_raw.dtype == jnp.bfloat16
    lo, hi = np.asarray(lo_raw, np.float32), fwd(model, x)
    assert np.isfinite(lo).all()
    err = np.abs(lo - hi).max()
    assert 0 < err < 0.05 * np.abs(hi).max(), err


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_lm_head_with_few_rows_by_vocabulary_chunks_equals_the_plain_product(rows):
    # a vocabulary of 2 full 1024-row chunks plus a remainder: every branch of the chunked head
    cfg = TINY.replace(vocab_size=2 * 1024 + 77)
    m = GPT(cfg, rngs=nnx.Rngs(3))
    h = jax.random.normal(jax.random.key(1), (1, rows, cfg.n_embd))
    wte = np.asarray(m.wte.embedding[...], np.float64)
    expect = np.asarray(h, np.float64)[0] @ wte.T
    got = np.asarray(jax.jit(lambda g, s, h: nnx.merge(g, s).logits(h))(*nnx.split(m), h))[0]
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)


@functools.partial(jax.jit, static_argnums=0)
def _loss_and_grads(graphdef, params, x):
    return jax.value_and_grad(lambda p: next_token_loss(nnx.merge(graphdef, p)(x), x))(params)


def test_remat_gives_same_loss_and_grads_as_plain_backward(model):
    x = jnp.asarray(random_tokens(5, (2, TINY.block_size)))
    remat = GPT(TINY.replace(remat=True), rngs=nnx.Rngs(0))  # same init as `model`
    l0, g0 = _loss_and_grads(*nnx.split(model), x)
    l1, g1 = _loss_and_grads(*nnx.split(remat), x)
    def jaxpr(m):
        return str(jax.make_jaxpr(_loss_and_grads.__wrapped__, static_argnums=0)(*nnx.split(m), x))
    has_remat = lambda text: "remat" in text or "checkpoint" in text
    assert has_remat(jaxpr(remat)) and not has_remat(jaxpr(model))  # the option is really wired in
    np.testing.assert_allclose(float(l1), float(l0), rtol=0, atol=1e-5)
    flat0, flat1 = jax.tree.leaves(g0), jax.tree.leaves(g1)
    assert len(flat0) == len(flat1) > 0
    for a, b in zip(flat0, flat1):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- config


def test_fused_attention_is_chosen_only_where_cudnn_supports_it():
    bf16 = GPTConfig.preset("gpt2", dtype="bfloat16")
    assert bf16.fused_attention("gpu")
    assert not bf16.fused_attention("cpu")
    assert not GPTConfig.preset("gpt2").fused_attention("gpu")             # fp32: cuDNN has no kernel
    assert not bf16.replace(dropout=0.1).fused_attention("gpu")            # no attention dropout there
    assert not bf16.replace(attention="xla").fused_attention("gpu")
    assert GPTConfig.preset("gpt2", attention="cudnn").fused_attention("cpu")  # asked for: used
    with pytest.raises(ValueError, match="attention='cudnn' needs dropout=0"):
        GPTConfig.preset("gpt2", attention="cudnn", dropout=0.1)
    with pytest.raises(ValueError, match="GPTConfig.attention='flash' is not supported"):
        GPTConfig.preset("gpt2", attention="flash")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_attention_matches_einsum_attention_on_gpu():
    cfg = GPTConfig(vocab_size=64, block_size=64, n_layer=2, n_head=4, n_embd=128, dtype="bfloat16")
    tokens = jax.random.randint(jax.random.key(1), (2, 64), 0, 64)
    fused = GPT(cfg.replace(attention="cudnn"), rngs=nnx.Rngs(0))
    plain = GPT(cfg.replace(attention="xla"), rngs=nnx.Rngs(0))
    a, b = np.asarray(fused(tokens), np.float32), np.asarray(plain(tokens), np.float32)
    np.testing.assert_allclose(a, b, atol=3e-2)  # bf16 compute: both round differently


_GELUS = {  # float64 references
    "gelu": np.vectorize(lambda v: 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0)))),
    "gelu_tanh": lambda v: 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3))),
}


@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu"])
def test_mlp_nonlinearity_is_the_configured_gelu(activation):
    """The MLP computes c_proj(gelu(c_fc(x))) with GPT-2's tanh form or the exact erf form, checked
    against a float64 formula on inputs where the two forms differ by far more than the tolerance."""
    d = 8
    mlp = MLP(GPTConfig(vocab_size=16, block_size=4, n_layer=1, n_head=1, n_embd=d, bias=False,
                        activation=activation), rngs=nnx.Rngs(0))
    mlp.c_fc.kernel[...] = jnp.eye(d, 4 * d) * 3.0   # pre-activations 3x, in [-6, 6]
    mlp.c_proj.kernel[...] = jnp.eye(4 * d, d)       # read the first d activations back
    x = np.linspace(-2.0, 2.0, 4 * d).reshape(4, d)
    got = np.asarray(mlp(jnp.asarray(x, jnp.float32)), np.float64)
    np.testing.assert_allclose(got, _GELUS[activation](3.0 * x), atol=2e-6)
    other = "gelu" if activation == "gelu_tanh" else "gelu_tanh"
    assert np.abs(got - _GELUS[other](3.0 * x)).max() > 1e-4   # the check above tells the two apart


def test_gpt2_preset_has_124_439_808_params_counted_and_built():
    cfg = GPTConfig.preset("gpt2")
    assert cfg.num_params() == 124_439_808
    abstract = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))  # shapes only, no allocation
    assert count_params(abstract) == 124_439_808


@pytest.mark.parametrize("bias", [True, False])
def test_num_params_formula_equals_count_of_built_model(bias):
    cfg = TINY.replace(bias=bias)
    m = GPT(cfg, rngs=nnx.Rngs(0))
    assert count_params(m) == cfg.num_params()
    assert cfg.num_params(include_positions=False) == cfg.num_params() - cfg.block_size * cfg.n_embd


def test_unknown_preset_error_lists_available_presets():
    with pytest.raises(ValueError, match="gpt3") as e:
        GPTConfig.preset("gpt3")
    for name in PRESETS:
        assert name in str(e.value)


def test_preset_overrides_replace_preset_fields():
    cfg = GPTConfig.preset("cpu-small", n_layer=2, vocab_size=50)
    assert (cfg.n_layer, cfg.vocab_size, cfg.n_embd, cfg.block_size) == (2, 50, 128, 64)


def test_config_rejects_n_embd_not_divisible_by_n_head():
    with pytest.raises(ValueError, match=r"n_embd \(30\).*n_head \(4\)"):
        GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=4, n_embd=30)


@pytest.mark.parametrize("field,value", [("n_layer", 0), ("vocab_size", -1), ("block_size", 2.5),
                                         ("dropout", 1.0), ("dtype", "float64"),
                                         ("activation", "relu")])
def test_config_rejects_invalid_field_naming_it(field, value):
    with pytest.raises(ValueError, match=field):
        TINY.replace(**{field: value})


def test_config_dict_round_trip_and_unknown_field_error():
    assert GPTConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(ValueError, match="n_layers"):
        GPTConfig.from_dict({**TINY.to_dict(), "n_layers": 3})


# --------------------------------------------------------------------------- losses


def _np_log_softmax(logits):
    z = logits - logits.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_loss_sum(logits, targets, ignore=-100):
    logp = _np_log_softmax(logits.astype(np.float64))
    total, count = 0.0, 0
    for idx in np.ndindex(targets.shape):
        if targets[idx] != ignore:
            total -= logp[idx][targets[idx]]
            count += 1
    return total, count


@pytest.fixture()
def logits_and_targets():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, size=(3, 5))
    targets[0, 1] = targets[2, 4] = -100
    targets[1, :] = -100  # a fully ignored row
    return logits, targets


def test_cross_entropy_sum_equals_numpy_sum_and_count_skipping_ignore_index(logits_and_targets):
    logits, targets = logits_and_targets
    total, count = cross_entropy_sum(jnp.asarray(logits), jnp.asarray(targets))
    want_total, want_count = _np_loss_sum(logits, targets)
    assert want_count == 8 and float(count) == 8
    np.testing.assert_allclose(float(total), want_total, rtol=1e-5)


def test_cross_entropy_equals_numpy_mean_over_countedrandom_tokens(logits_and_targets):
    logits, targets = logits_and_targets
    want_total, want_count = _np_loss_sum(logits, targets)
    got = float(cross_entropy(jnp.asarray(logits), jnp.asarray(targets)))
    np.testing.assert_allclose(got, want_total / want_count, rtol=1e-5)
    # A different ignore_index counts the -100 positions as errors: the argument is honoured.
    other = np.where(targets == -100, 3, targets)
    t2, c2 = _np_loss_sum(logits, other)
    got2 = float(cross_entropy(jnp.asarray(logits), jnp.asarray(other), ignore_index=-1))
    np.testing.assert_allclose(got2, t2 / c2, rtol=1e-5)


def test_cross_entropy_of_fully_ignored_batch_is_zero_not_nan():
    logits = jnp.ones((1, 3, 5))
    assert float(cross_entropy(logits, jnp.full((1, 3), -100))) == 0.0


def test_next_token_loss_shifts_labels_by_one_and_skips_ignored(logits_and_targets):
    logits, labels = logits_and_targets
    want_total, want_count = _np_loss_sum(logits[:, :-1], labels[:, 1:])
    got = float(next_token_loss(jnp.asarray(logits), jnp.asarray(labels)))
    np.testing.assert_allclose(got, want_total / want_count, rtol=1e-5)
    unshifted = float(cross_entropy(jnp.asarray(logits), jnp.asarray(labels)))
    assert abs(got - unshifted) > 1e-2


# --------------------------------------------------------------------------- sampling


def _argmax_loop(m, prompt, n, block):
    """Greedy decoding by full forwards: each step runs the model over the last `block` tokens
    (right-padded to block length, which causality -- tested above -- makes harmless)."""
    ids = list(prompt)
    for _ in range(n):
        window = ids[-block:]
        padded = np.zeros((1, block), np.int32)
        padded[0, :len(window)] = window
        ids.append(int(np.argmax(fwd(m, padded)[0, len(window) - 1])))
    return np.asarray(ids)


def test_temperature_zero_is_greedy_argmax_over_full_forwards(model):
    prompt = random_tokens(6, (5,))
    out = np.asarray(generate(model, prompt, 8, temperature=0.0))
    np.testing.assert_array_equal(out, _argmax_loop(model, prompt, 8, TINY.block_size))
    again = np.asarray(generate(model, prompt, 8, temperature=0.0, key=jax.random.key(9)))
    np.testing.assert_array_equal(again, out)


def test_prompt_longer_than_block_size_is_cropped_from_the_left(model):
    prompt = random_tokens(7, (TINY.block_size + 5,))
    out = np.asarray(generate(model, prompt, 6, temperature=0.0))
    assert out.shape == (TINY.block_size + 11,)
    np.testing.assert_array_equal(out[:len(prompt)], prompt)
    np.testing.assert_array_equal(out, _argmax_loop(model, prompt, 6, TINY.block_size))


def test_same_key_gives_same_sample_and_other_key_differs(model):
    prompt = random_tokens(8, (2, 4))
    a = np.asarray(generate(model, prompt, 16, temperature=1.0, key=jax.random.key(1)))
    b = np.asarray(generate(model, prompt, 16, temperature=1.0, key=jax.random.key(1)))
    c = np.asarray(generate(model, prompt, 16, temperature=1.0, key=jax.random.key(2)))
    assert a.shape == (2, 20)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:, :4], prompt)
    assert (a != c).any()


def test_top_k_1_equals_greedy(model):
    prompt = random_tokens(6, (5,))
    greedy = np.asarray(generate(model, prompt, 8, temperature=0.0))
    top1 = np.asarray(generate(model, prompt, 8, temperature=1.5, top_k=1, key=jax.random.key(3)))
    np.testing.assert_array_equal(top1, greedy)


@pytest.mark.parametrize("prompt,kwargs,match", [([], {}, "empty"), ([1, 2], {"temperature": -1.0}, "temperature")])
def test_generate_rejects_bad_arguments_with_clear_error(model, prompt, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(model, np.asarray(prompt, np.int32), 3, **kwargs)
