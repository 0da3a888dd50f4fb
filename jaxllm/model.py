"""GPT-2 in Flax NNX. The model only: no optimizer, loss or data code lives here.

The residual stream is kept 2-D, (B*T, D), between blocks: XLA's CPU backend runs a dense layer on
3-D activations about 2x slower (forward + backward) than the same layer on a 2-D matrix, so we
reshape to (B, T, H, hd) only inside attention.

Extension points for later stages:
- every linear layer is an attribute named like GPT-2's (`c_attn`, `c_proj`, `c_fc`), so LoRA
  can wrap it by name;
- `features()` returns the final hidden states, so scalar heads (reward, value) sit on top;
- attention takes explicit positions and a mask, so left-padded batches, packed segments, prefixes
  and a KV cache only change what is passed in.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import GPTConfig

_INIT_STD = 0.02
_MASK_VALUE = -1e30  # finite, so a fully-masked row (a padding query) gives no NaN


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout driven by an explicit key (no key or rate 0: identity).

    Keys come from (seed, step) in the training loop, so a resumed run drops the same units.
    """
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _fold(key: jax.Array | None, i: int) -> jax.Array | None:
    return None if key is None else jax.random.fold_in(key, i)


def make_attention_mask(attention_mask: jax.Array | None, T: int) -> jax.Array:
    """Boolean (B or 1, T, T) mask: causal, combined with an optional key mask.

    `attention_mask` may be (B, T) with 1 for real tokens and 0 for padding (Hugging Face's
    convention), or an explicit (B, T, T) boolean mask (e.g. block-diagonal for packed sequences),
    which is still intersected with the causal mask.
    """
    causal = jnp.tril(jnp.ones((T, T), dtype=bool))[None]
    if attention_mask is None:
        return causal
    attention_mask = jnp.asarray(attention_mask)
    if attention_mask.ndim == 2:
        return causal & attention_mask.astype(bool)[:, None, :]
    if attention_mask.ndim == 3:
        return causal & attention_mask.astype(bool)
    raise ValueError(f"attention_mask must be (B, T) or (B, T, T), got shape {attention_mask.shape}")


class CausalSelfAttention(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        d = cfg.n_embd
        self.n_head, self.head_dim, self.dropout_rate = cfg.n_head, cfg.head_dim, cfg.dropout
        self.dtype = cfg.compute_dtype
        common = dict(use_bias=cfg.bias, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
        self.c_attn = nnx.Linear(d, 3 * d, kernel_init=nnx.initializers.normal(_INIT_STD), **common)
        resid_std = _INIT_STD / math.sqrt(2 * cfg.n_layer)
        self.c_proj = nnx.Linear(d, d, kernel_init=nnx.initializers.normal(resid_std), **common)

    def __call__(self, x_ND: jax.Array, B: int, T: int, mask_BTT: jax.Array,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        H, hd = self.n_head, self.head_dim
        qkv = self.c_attn(x_ND).reshape(B, T, 3, H, hd)
        q_BTHd, k_BTHd, v_BTHd = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scores_BHTT = jnp.einsum("bqhd,bkhd->bhqk", q_BTHd, k_BTHd) / math.sqrt(hd)
        scores_BHTT = jnp.where(mask_BTT[:, None], scores_BHTT.astype(jnp.float32), _MASK_VALUE)
        probs_BHTT = jax.nn.softmax(scores_BHTT, axis=-1).astype(self.dtype)
        probs_BHTT = dropout(probs_BHTT, self.dropout_rate, _fold(dropout_key, 0))
        y_BTHd = jnp.einsum("bhqk,bkhd->bqhd", probs_BHTT, v_BTHd)
        y_ND = self.c_proj(y_BTHd.reshape(B * T, H * hd))
        return dropout(y_ND, self.dropout_rate, _fold(dropout_key, 1))


class MLP(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        d = cfg.n_embd
        self.dropout_rate = cfg.dropout
        common = dict(use_bias=cfg.bias, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
        self.c_fc = nnx.Linear(d, 4 * d, kernel_init=nnx.initializers.normal(_INIT_STD), **common)
        resid_std = _INIT_STD / math.sqrt(2 * cfg.n_layer)
        self.c_proj = nnx.Linear(4 * d, d, kernel_init=nnx.initializers.normal(resid_std), **common)

    def __call__(self, x_ND: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        h = jax.nn.gelu(self.c_fc(x_ND), approximate=True)  # GPT-2 uses the tanh approximation
        return dropout(self.c_proj(h), self.dropout_rate, dropout_key)


def _layer_norm(cfg: GPTConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(cfg.n_embd, epsilon=cfg.layer_norm_eps, use_bias=cfg.bias,
                         dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)


class Block(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.ln_1 = _layer_norm(cfg, rngs)
        self.attn = CausalSelfAttention(cfg, rngs=rngs)
        self.ln_2 = _layer_norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x_ND, B, T, mask_BTT, dropout_key=None):
        x_ND = x_ND + self.attn(self.ln_1(x_ND), B, T, mask_BTT, _fold(dropout_key, 0))
        return x_ND + self.mlp(self.ln_2(x_ND), _fold(dropout_key, 1))


class GPT(nnx.Module):
    """GPT-2: token + learned position embeddings, pre-LN blocks, final LN, head tied to `wte`."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        emb = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs,
                   embedding_init=nnx.initializers.normal(_INIT_STD))
        self.wte = nnx.Embed(cfg.vocab_size, cfg.n_embd, **emb)
        self.wpe = nnx.Embed(cfg.block_size, cfg.n_embd, **emb)
        self.h = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layer)])
        self.ln_f = _layer_norm(cfg, rngs)

    def features(self, tokens_BT: jax.Array, *, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, dropout_key: jax.Array | None = None) -> jax.Array:
        """Final hidden states (B, T, D) after `ln_f`: the input to the LM head or a scalar head."""
        cfg = self.config
        tokens_BT = jnp.asarray(tokens_BT)
        if tokens_BT.ndim != 2:
            raise ValueError(f"tokens must be int (B, T), got shape {tokens_BT.shape}")
        B, T = tokens_BT.shape
        if T > cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {cfg.block_size}; crop the input")
        if positions is None:
            positions = jnp.arange(T)[None, :]
        positions = jnp.broadcast_to(positions, (B, T))
        x_ND = (self.wte(tokens_BT) + self.wpe(positions)).reshape(B * T, cfg.n_embd)
        x_ND = dropout(x_ND, cfg.dropout, _fold(dropout_key, cfg.n_layer))
        mask_BTT = make_attention_mask(attention_mask, T)
        for i, block in enumerate(self.h):
            key = _fold(dropout_key, i)
            if cfg.remat:
                x_ND = nnx.remat(lambda blk, x, m, k: blk(x, B, T, m, k))(block, x_ND, mask_BTT, key)
            else:
                x_ND = block(x_ND, B, T, mask_BTT, key)
        return self.ln_f(x_ND).reshape(B, T, cfg.n_embd)

    def logits(self, h_BTD: jax.Array) -> jax.Array:
        """The LM head, tied to the token embedding."""
        B, T, D = h_BTD.shape
        wte = self.wte.embedding[...].astype(self.config.compute_dtype)
        return (h_BTD.reshape(B * T, D) @ wte.T).reshape(B, T, -1)

    def __call__(self, tokens_BT: jax.Array, *, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, dropout_key: jax.Array | None = None) -> jax.Array:
        """int tokens (B, T) -> logits (B, T, vocab_size)."""
        return self.logits(self.features(tokens_BT, attention_mask=attention_mask,
                                         positions=positions, dropout_key=dropout_key))


def count_params(model: nnx.Module, filter=nnx.Param) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, filter)))
