"""GPT-2 in Flax NNX. The model only: no optimizer, loss or data code lives here.

The residual stream is kept 2-D, (B*T, D), between blocks: XLA's CPU backend runs a dense layer on
3-D activations much slower (forward + backward) than the same layer on a 2-D matrix (see
benchmarks/RESULTS.md), so we reshape to (B, T, H, hd) only inside attention.

Extension points for later stages:
- every linear layer is a `Linear` named like GPT-2's (`c_attn`, `c_proj`, `c_fc`) with an empty
  `lora` slot, each `Block` has empty `attn_adapter`/`mlp_adapter` slots and the GPT an empty
  `prefix` slot: `jaxllm.peft` fills them without moving any base weight's state path, so HF
  interop and checkpoints read a tuned model's base weights where they always were;
- `features()` returns the final hidden states, so scalar heads (reward, value) sit on top;
- attention takes explicit positions and a mask, so left-padded batches, packed segments, prefixes
  and a KV cache only change what is passed in;
- `KVCache` is a plain pytree of fixed size: prefill and decode write into it with
  `model(tokens, cache=cache)`, and `KVCache.append_kv` lets learned per-layer prefixes (prefix
  tuning) occupy slots that every later token attends to.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import GPTConfig
from jaxllm.parallel import constrain_heads, constrain_rows, splits_heads, whole

_INIT_STD = 0.02
_MASK_VALUE = -1e30  # finite, so a fully-masked row (a padding query) gives no NaN
_FEW_ROWS = 64       # up to this many rows the LM head takes its decode-friendly form
_HEAD_CHUNK = 1024   # vocabulary rows per block of the LM head with 2.._FEW_ROWS rows


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


def default_positions(attention_mask: jax.Array | None, T: int) -> jax.Array:
    """Positions when none are given: 0..T-1, except that with a (B, T) padding mask padding takes
    no position, so a left-padded row's tokens get the positions they have alone (as in cached
    generation; Hugging Face instead counts the padding unless position_ids are passed)."""
    if attention_mask is None or jnp.ndim(attention_mask) != 2:
        return jnp.arange(T)[None, :]
    return jnp.maximum(jnp.cumsum(jnp.asarray(attention_mask).astype(jnp.int32), axis=1) - 1, 0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer for a fixed number of slots, as a plain pytree.

    Shapes never change: a prefill writes T slots, each decode step writes one, so a decode loop
    compiles once. Slots are shared by the batch (row b's token t sits in slot `length + t` for
    every row); `valid` marks which slots a query may attend to (left padding is invalid), and
    `next_pos` keeps each row's next position, so a left-padded row counts positions from its
    first real token. Slots not tied to a position (learned prefixes) go in with `append_kv`.
    """

    k: tuple[jax.Array, ...]   # per layer (B*H, hd, S), or (B, H, hd, S) with heads_axis: see `init`
    v: tuple[jax.Array, ...]   # per layer (B*H, S, hd), or (B, H, S, hd)
    valid: jax.Array           # (B, S) bool
    length: jax.Array          # int32 scalar: slots [0, length) are written
    next_pos: jax.Array        # (B,) int32

    @classmethod
    def init(cls, cfg: GPTConfig, batch_size: int, max_len: int, heads_axis: bool | None = None) -> "KVCache":
        """An empty cache. For a model, prefer `model.init_cache(batch_size, max_len)`: with prefix
        tuning it also puts the learned prefix in front, which an empty cache would leave out.

        Keys are stored as (B*H, hd, S) and values as (B*H, S, hd), batch and heads merged: the
        layouts the two attention matmuls read. With `heads_axis` they are (B, H, hd, S) and
        (B, H, S, hd), so that a mesh can split the rows over data and the heads over tensor; by
        default only where that happens (traced on a named mesh with tensor > 1, see
        `parallel.splits_heads`), because XLA:CPU reads a 4-D cache through a copy of the whole
        cache every step (GPT-2, batch 8, 768 slots: 98 ms per decoded token instead of 34)."""
        if max_len <= 0 or batch_size <= 0:
            raise ValueError(f"KVCache needs batch_size > 0 and max_len > 0, got {batch_size}, {max_len}")
        B, S, H, hd = batch_size, max_len, cfg.n_head, cfg.head_dim
        heads_axis = splits_heads() if heads_axis is None else heads_axis
        lead = (B, H) if heads_axis else (B * H,)
        k = tuple(jnp.zeros((*lead, hd, S), cfg.compute_dtype) for _ in range(cfg.n_layer))
        v = tuple(jnp.zeros((*lead, S, hd), cfg.compute_dtype) for _ in range(cfg.n_layer))
        return cls(k=k, v=v, valid=jnp.zeros((B, S), bool),
                   length=jnp.zeros((), jnp.int32), next_pos=jnp.zeros((batch_size,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]

    def append_kv(self, k_LBnHd: jax.Array, v_LBnHd: jax.Array) -> "KVCache":
        """Write n slots of per-layer keys/values (n_layer, B or 1, n, H, hd) that every later query
        attends to, without advancing positions: the hook for prefix tuning's learned prefixes."""
        k_LBnHd, v_LBnHd = jnp.asarray(k_LBnHd), jnp.asarray(v_LBnHd)
        L, (B, S) = len(self.k), self.valid.shape
        k0 = self.k[0]   # (B*H, hd, S) or (B, H, hd, S)
        H, hd = (k0.shape[0] // B if k0.ndim == 3 else k0.shape[1]), k0.shape[-2]
        if k_LBnHd.ndim != 5 or k_LBnHd.shape != v_LBnHd.shape or k_LBnHd.shape[0] != L \
                or k_LBnHd.shape[1] not in (1, B) or k_LBnHd.shape[3:] != (H, hd):
            raise ValueError(f"append_kv needs k and v of shape (n_layer={L}, {B} or 1, n, {H}, {hd}), "
                             f"got {k_LBnHd.shape} and {v_LBnHd.shape}")
        n = k_LBnHd.shape[2]
        if n > S:
            raise ValueError(f"append_kv of {n} slots does not fit a cache of max_len {S}")

        def put(cache, new_BnHd, perm, at):
            new = jnp.broadcast_to(new_BnHd, (B, n, H, hd)).transpose(perm)
            new = new.reshape(cache.shape[:-2] + new.shape[2:])   # merges B and H for a 3-D cache
            at = (0,) * (cache.ndim - 2) + at
            return jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), at)

        start = self.length
        return dataclasses.replace(
            self, k=tuple(put(c, x, (0, 2, 3, 1), (0, start)) for c, x in zip(self.k, k_LBnHd)),
            v=tuple(put(c, x, (0, 2, 1, 3), (start, 0)) for c, x in zip(self.v, v_LBnHd)),
            valid=jax.lax.dynamic_update_slice(self.valid, jnp.ones((B, n), bool), (0, start)),
            length=start + n)


def _head_by_chunks(wte_VD: jax.Array, h_DR: jax.Array, chunk: int = _HEAD_CHUNK) -> jax.Array:
    """wte @ h for 2.._FEW_ROWS rows, one block of `chunk` vocabulary rows at a time. XLA:CPU's one
    dot over the whole vocabulary with a few columns runs far below its matmul speed, with or
    without YNNPACK; by blocks it does not (numbers in benchmarks/RESULTS.md, decoding section)."""
    V, R = wte_VD.shape[0], h_DR.shape[1]
    n = V // chunk
    if n < 2:
        return wte_VD @ h_DR

    def one(i, out_VR):
        block = jax.lax.dynamic_slice_in_dim(wte_VD, i * chunk, chunk, 0)
        return jax.lax.dynamic_update_slice_in_dim(out_VR, block @ h_DR, i * chunk, 0)

    out_VR = jax.lax.fori_loop(0, n, one, jnp.zeros((V, R), jnp.result_type(wte_VD, h_DR)))
    if V > n * chunk:
        out_VR = jax.lax.dynamic_update_slice_in_dim(out_VR, wte_VD[n * chunk:] @ h_DR, n * chunk, 0)
    return out_VR


def _recomputed(fn, module: nnx.Module, *args):
    """fn(module, *args), its activations recomputed in the backward pass (remat). A pure
    jax.checkpoint over the module's state: nnx.remat writes the state back into the module's
    Variables, which fails when some of them belong to an outer trace, as a PEFT train step's
    frozen base weights do."""
    graphdef, state = nnx.split(module)
    return jax.checkpoint(lambda st, *a: fn(nnx.merge(graphdef, st), *a))(state, *args)


def _scanned_blocks(fn, blocks, x_ND: jax.Array, mask, dropout_key: jax.Array | None,
                    remat: bool) -> jax.Array | None:
    """x_ND after `fn(block, x, mask, key)` of every block in turn, as one jax.lax.scan over the
    blocks' stacked states (GPTConfig.scan_layers); None when the blocks are not one program with
    different weights, and the caller runs its loop instead.

    What the loop computes, step for step: block i gets key fold_in(dropout_key, i), `remat`
    recomputes the body in the backward pass, and the rows are constrained after every block. The
    state is split out and stacked inside the traced program, so storage keeps its per-layer paths
    (h.0, h.1, ...) that HF interop, PEFT files, checkpoints and partition rules read; the price
    is a copy of the blocks' weights per call (and of their gradients back into per-layer arrays).
    A pure split + jax.lax.scan rather than nnx.scan, for the reason given in `_recomputed`.
    Blocks are pure functions of their state (no BatchStat or RNG state), so nothing is written
    back."""
    splits = [nnx.split(block) for block in blocks]
    graphdef, first = splits[0]
    leaves, treedef = jax.tree.flatten(first)
    avals = [(jnp.shape(a), jnp.result_type(a)) for a in leaves]
    for _, state in splits[1:]:  # stacking needs the same variables with the same shapes everywhere
        other, other_def = jax.tree.flatten(state)
        if other_def != treedef or [(jnp.shape(a), jnp.result_type(a)) for a in other] != avals:
            return None
    # LoRA records each layer's name in its static data, so equal graphdefs would be too strict a
    # test: blocks qualify when their traced programs are identical (operations, literals and
    # constants), which is exactly "the first block's graphdef computes each block".
    if any(g != graphdef for g, _ in splits[1:]):
        def program(g, state):
            traced = jax.make_jaxpr(lambda st, x, m, k: fn(nnx.merge(g, st), x, m, k))(
                state, x_ND, mask, _fold(dropout_key, 0))
            return str(traced.jaxpr), traced.consts

        text, consts = program(*splits[0])
        for g, state in splits[1:]:
            other_text, other_consts = program(g, state)
            if other_text != text or len(other_consts) != len(consts) or not all(
                    a is b or (not isinstance(a, jax.core.Tracer) and not isinstance(b, jax.core.Tracer)
                               and jnp.shape(a) == jnp.shape(b) and bool(jnp.all(a == b)))
                    for a, b in zip(consts, other_consts)):
                return None
    stacked = jax.tree.map(lambda *layers: jnp.stack(layers), *(state for _, state in splits))

    def one(state, x, m, key):
        return fn(nnx.merge(graphdef, state), x, m, key)

    # remat: recompute the whole block. Without it the body still saves only matmul outputs: a scan
    # stores every residual its backward reads as a stacked array, where the unrolled loop lets XLA
    # fuse elementwise work (GELU, LayerNorm, softmax) into the backward instead; saving them all
    # took 1.8x the loop's temporary memory and ~20% more CPU time per step, matmul outputs only
    # 0.8x and ~8% (measured on 6 layers, 384 wide, block 256, batch 8; benchmarks/compile_time.py
    # times the step as it is).
    # prevent_cse=False: the scan already keeps XLA from merging recomputation with the forward.
    one = jax.checkpoint(one, prevent_cse=False, policy=None if remat else jax.checkpoint_policies.dots_saveable)

    def body(x, layer):
        state, i = layer
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)  # = _fold(dropout_key, i)
        return constrain_rows(one(state, x, mask, key)), None

    x_ND, _ = jax.lax.scan(body, x_ND, (stacked, jnp.arange(len(splits))))
    return x_ND


class Linear(nnx.Linear):
    """`nnx.Linear` plus a slot for a low-rank update (filled by `jaxllm.peft.lora`), and an
    optional split output.

    The slot holds a module called as lora(x, y, dropout_key) -> y that adds its update to the
    base output y; the base kernel and bias keep their usual state paths.

    `out_split` stores the kernel as (in, *out_split) and the bias as out_split (their product is
    `out_features`), and the output comes out as (rows, *out_split): attention's fused projection is
    (D, 3, D), q|k|v by heads, so a tensor-parallel split of its last axis gives each device whole
    heads of q, k and v (a split of the flat 3*D columns would cut q, k and v apart). The values
    are the flat layout's, reshaped: the same initialisation, and HF's fused c_attn is a reshape
    away."""

    def __init__(self, in_features: int, out_features: int, *, out_split: tuple[int, ...] | None = None,
                 **kwargs):
        super().__init__(in_features, out_features, **kwargs)
        if out_split is not None:
            if math.prod(out_split) != out_features:
                raise ValueError(f"out_split {out_split} does not multiply to out_features={out_features}")
            self.kernel = nnx.Param(self.kernel[...].reshape(in_features, *out_split))
            if self.bias is not None:
                self.bias = nnx.Param(self.bias[...].reshape(out_split))
        self.lora = nnx.data(None)

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        x_, kernel, bias = self.promote_dtype((x, kernel, bias), dtype=self.dtype)
        split = kernel.shape[1:]
        if len(split) > 1 and not splits_heads():
            # as a plain (in, out) matmul: the 3-D kernel made XLA:CPU keep a copy of each c_attn
            # kernel for the backward pass (gpt2 data:8: +0.08 GiB; gpt2-xl +1.3 GiB)
            kernel = kernel.reshape(kernel.shape[0], -1)
            bias = None if bias is None else bias.reshape(-1)
        y = self.dot_general(x_, kernel, (((x_.ndim - 1,), (0,)), ((), ())), precision=self.precision)
        if bias is not None:
            y = y + bias   # (out) or out_split: broadcast over the leading axes
        y = y.reshape(*y.shape[:x_.ndim - 1], *split)
        return y if self.lora is None else self.lora(x, y, dropout_key)


class CausalSelfAttention(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        d = cfg.n_embd
        self.n_head, self.head_dim, self.dropout_rate = cfg.n_head, cfg.head_dim, cfg.dropout
        self.dtype = cfg.compute_dtype
        self.fused = cfg.fused_attention(jax.default_backend())
        common = dict(use_bias=cfg.bias, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
        self.c_attn = Linear(d, 3 * d, out_split=(3, d), kernel_init=nnx.initializers.normal(_INIT_STD),
                             **common)
        resid_std = _INIT_STD / math.sqrt(2 * cfg.n_layer)
        self.c_proj = Linear(d, d, kernel_init=nnx.initializers.normal(resid_std), **common)

    def __call__(self, x_ND: jax.Array, B: int, T: int, mask_BTT: jax.Array,
                 dropout_key: jax.Array | None = None, kv=None):
        """Without `kv`: keys are this call's T tokens, returns y (B*T, D). With
        `kv=(k_BHdS, v_BHSd, start, gate)`: this call's keys/values are written into the
        cache at slots [start, start+T), queries attend over all S slots (`mask_BTT` is then
        (B, T, S)), and it returns (y, (k_BHdS, v_BHSd)). `gate` is None, or (n, gate_H) for a gated
        prefix in slots [0, n) (see `_attention_probs`)."""
        H, hd = self.n_head, self.head_dim
        qkv = self.c_attn(x_ND, _fold(dropout_key, 2)).reshape(B, T, 3, H, hd)   # from (B*T, 3, D)
        q_BTHd, k_BTHd, v_BTHd = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if kv is not None:
            return self._attend_cached(q_BTHd, k_BTHd, v_BTHd, B, T, mask_BTT, dropout_key, kv)
        if mask_BTT is None and self.fused:  # plain causal: cuDNN's flash attention, never (T, T) in memory
            y_BTHd = jax.nn.dot_product_attention(q_BTHd, k_BTHd, v_BTHd, is_causal=True,
                                                  implementation="cudnn")
            return dropout(self.c_proj(y_BTHd.reshape(B * T, H * hd), _fold(dropout_key, 3)), self.dropout_rate,
                           _fold(dropout_key, 1))
        if mask_BTT is None:
            mask_BTT = make_attention_mask(None, T)
        scores_BHTT = jnp.einsum("bqhd,bkhd->bhqk", q_BTHd, k_BTHd) / math.sqrt(hd)
        scores_BHTT = jnp.where(mask_BTT[:, None], scores_BHTT.astype(jnp.float32), _MASK_VALUE)
        probs_BHTT = jax.nn.softmax(scores_BHTT, axis=-1).astype(self.dtype)
        probs_BHTT = dropout(probs_BHTT, self.dropout_rate, _fold(dropout_key, 0))
        y_BTHd = jnp.einsum("bhqk,bkhd->bqhd", probs_BHTT, v_BTHd)
        y_ND = self.c_proj(y_BTHd.reshape(B * T, H * hd), _fold(dropout_key, 3))
        return dropout(y_ND, self.dropout_rate, _fold(dropout_key, 1))

    def _attend_cached(self, q_BTHd, k_BTHd, v_BTHd, B, T, mask_BTS, dropout_key, kv):
        # The cache is stored in the layouts the two matmuls read (see KVCache.init): K as
        # (B*H, hd, S) or (B, H, hd, S), V as (B*H, S, hd) or (B, H, S, hd). Any other order of
        # the last two axes (or a transpose between cache and matmul) makes XLA:CPU copy or
        # transpose the whole cache every step; for the same reason the matmuls read the cache
        # after this call's slots are written into it.
        H, hd = self.n_head, self.head_dim
        k_cache, v_cache, start, gate = kv
        lead = k_cache.shape[:-2]                     # (B*H,) or (B, H)
        k_new = k_BTHd.transpose(0, 2, 3, 1).reshape(*lead, hd, T).astype(k_cache.dtype)
        v_new = v_BTHd.transpose(0, 2, 1, 3).reshape(*lead, T, hd).astype(v_cache.dtype)
        at = (0,) * len(lead)
        k_cache = constrain_heads(jax.lax.dynamic_update_slice(k_cache, k_new, (*at, 0, start)))
        v_cache = constrain_heads(jax.lax.dynamic_update_slice(v_cache, v_new, (*at, start, 0)))
        q_Td = q_BTHd.transpose(0, 2, 1, 3).reshape(*lead, T, hd)
        scores_TS = jnp.einsum("...td,...ds->...ts", q_Td, k_cache.astype(self.dtype)) / math.sqrt(hd)
        scores_BHTS = jnp.where(mask_BTS[:, None], scores_TS.reshape(B, H, T, -1).astype(jnp.float32), _MASK_VALUE)
        probs_BHTS = _attention_probs(scores_BHTS, gate).astype(self.dtype)
        probs_BHTS = dropout(probs_BHTS, self.dropout_rate, _fold(dropout_key, 0))
        y_Td = jnp.einsum("...ts,...sd->...td", probs_BHTS.reshape(*lead, T, -1), v_cache.astype(self.dtype))
        y_ND = self.c_proj(y_Td.reshape(B, H, T, hd).transpose(0, 2, 1, 3).reshape(B * T, H * hd),
                           _fold(dropout_key, 3))
        return dropout(y_ND, self.dropout_rate, _fold(dropout_key, 1)), (k_cache, v_cache)


def _attention_probs(scores_BHTS: jax.Array, gate) -> jax.Array:
    """Softmax over the slots; with a gated prefix `(n, gate_H)`, the first n slots (the prefix) get
    a softmax of their own scaled by a learned per-head gate, the rest the usual softmax. A gate of
    zero makes the prefix invisible, so a fresh gated prefix leaves the model unchanged (the
    zero-init attention of LLaMA-Adapter); one joint softmax could not, since any prefix key takes
    probability mass from the real tokens."""
    if gate is None:
        return jax.nn.softmax(scores_BHTS, axis=-1)
    n, gate_H = gate
    is_prefix_S = jnp.arange(scores_BHTS.shape[-1]) < n
    tokens = jax.nn.softmax(jnp.where(is_prefix_S, _MASK_VALUE, scores_BHTS), axis=-1)
    prefix = jax.nn.softmax(jnp.where(is_prefix_S, scores_BHTS, _MASK_VALUE), axis=-1)
    return tokens + gate_H.astype(jnp.float32)[None, :, None, None] * prefix


class MLP(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        d = cfg.n_embd
        self.dropout_rate = cfg.dropout
        self.approximate_gelu = cfg.activation == "gelu_tanh"
        common = dict(use_bias=cfg.bias, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
        self.c_fc = Linear(d, 4 * d, kernel_init=nnx.initializers.normal(_INIT_STD), **common)
        resid_std = _INIT_STD / math.sqrt(2 * cfg.n_layer)
        self.c_proj = Linear(4 * d, d, kernel_init=nnx.initializers.normal(resid_std), **common)

    def __call__(self, x_ND: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        h = jax.nn.gelu(self.c_fc(x_ND, _fold(dropout_key, 1)), approximate=self.approximate_gelu)
        return dropout(self.c_proj(h, _fold(dropout_key, 2)), self.dropout_rate, dropout_key)


def _layer_norm(cfg: GPTConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(cfg.n_embd, epsilon=cfg.layer_norm_eps, use_bias=cfg.bias,
                         dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)


class Block(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.ln_1 = _layer_norm(cfg, rngs)
        self.attn = CausalSelfAttention(cfg, rngs=rngs)
        self.ln_2 = _layer_norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs=rngs)
        # bottleneck adapters (jaxllm.peft.adapter): modules h -> h applied to each sublayer's output
        self.attn_adapter = nnx.data(None)
        self.mlp_adapter = nnx.data(None)

    def __call__(self, x_ND, B, T, mask_BTT, dropout_key=None, kv=None):
        a = self.attn(self.ln_1(x_ND), B, T, mask_BTT, _fold(dropout_key, 0), kv)
        a_ND, new_kv = (a, None) if kv is None else a
        if self.attn_adapter is not None:
            a_ND = self.attn_adapter(a_ND)
        x_ND = x_ND + a_ND
        m_ND = self.mlp(self.ln_2(x_ND), _fold(dropout_key, 1))
        if self.mlp_adapter is not None:
            m_ND = self.mlp_adapter(m_ND)
        x_ND = x_ND + m_ND
        return x_ND if kv is None else (x_ND, new_kv)


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
        # prefix tuning (jaxllm.peft.prefix): a module with `n_tokens`, `gated` and
        # kv(batch) -> (k, v) of shape (n_layer, B or 1, n_tokens, n_head, head_dim)
        self.prefix = nnx.data(None)

    def features(self, tokens_BT: jax.Array, *, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, dropout_key: jax.Array | None = None,
                 cache: KVCache | None = None):
        """Final hidden states (B, T, D) after `ln_f`: the input to the LM head or a scalar head.

        With `cache`, the T tokens are appended to it (keys attend to everything already cached),
        positions default to each row's `next_pos` counting only tokens where `attention_mask` is
        1, and the result is (hidden states, updated cache)."""
        cfg = self.config
        tokens_BT = jnp.asarray(tokens_BT)
        if tokens_BT.ndim != 2:
            raise ValueError(f"tokens must be int (B, T), got shape {tokens_BT.shape}")
        B, T = tokens_BT.shape
        if T > cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {cfg.block_size}; crop the input")
        if cache is not None:
            return self._features_cached(tokens_BT, attention_mask, positions, dropout_key, cache)
        if self._active_prefix() is not None:  # prefix slots in front: the cached path attends to them
            h_BTD, _ = self._features_cached(tokens_BT, attention_mask, positions, dropout_key,
                                             self.init_cache(B, T), remat=cfg.remat)
            return h_BTD
        if positions is None:
            positions = default_positions(attention_mask, T)
        # constrain_rows: on a named mesh only (train.mesh), the residual stream's rows split like the batch
        x_ND = constrain_rows(self._embed(tokens_BT, positions, dropout_key))
        # None means plain causal: attention may then use a fused kernel that builds no mask
        mask_BTT = None if attention_mask is None else make_attention_mask(attention_mask, T)
        if cfg.scan_layers:  # one traced block for all layers; blocks that differ (PEFT on some) loop below
            x_scanned = _scanned_blocks(lambda blk, x, m, k: blk(x, B, T, m, k), list(self.h), x_ND,
                                        mask_BTT, dropout_key, cfg.remat)
            if x_scanned is not None:
                return self.ln_f(x_scanned).reshape(B, T, cfg.n_embd)
        for i, block in enumerate(self.h):
            key = _fold(dropout_key, i)
            if cfg.remat:
                x_ND = _recomputed(lambda blk, x, m, k: blk(x, B, T, m, k), block, x_ND, mask_BTT, key)
            else:
                x_ND = block(x_ND, B, T, mask_BTT, key)
            x_ND = constrain_rows(x_ND)
        return self.ln_f(x_ND).reshape(B, T, cfg.n_embd)

    def _embed(self, tokens_BT, positions, dropout_key):
        """Token + position embeddings as the 2-D residual stream (B*T, D), with dropout."""
        cfg, (B, T) = self.config, tokens_BT.shape
        positions = jnp.broadcast_to(positions, (B, T))
        wte = whole(self.wte.embedding[...]).astype(cfg.compute_dtype)   # on a mesh: see parallel.whole
        wpe = whole(self.wpe.embedding[...]).astype(cfg.compute_dtype)
        x_ND = (jnp.take(wte, tokens_BT, axis=0) + jnp.take(wpe, positions, axis=0)).reshape(B * T, cfg.n_embd)
        return dropout(x_ND, cfg.dropout, _fold(dropout_key, cfg.n_layer))

    def _features_cached(self, tokens_BT, attention_mask, positions, dropout_key, cache: KVCache,
                         remat: bool = False):
        cfg = self.config
        B, T = tokens_BT.shape
        if cache.valid.shape[0] != B:
            raise ValueError(f"the cache holds {cache.valid.shape[0]} rows but tokens have {B}; "
                             f"make the cache with model.init_cache(batch_size={B}, ...) (it also holds a prefix)")
        if T > cache.max_len:
            raise ValueError(f"{T} tokens do not fit a cache of max_len {cache.max_len}")
        pair_BTT = None  # an explicit (B, T, T) mask among this call's tokens (packed segments)
        if attention_mask is None:
            real_BT = jnp.ones((B, T), bool)
        else:
            real_BT = jnp.asarray(attention_mask).astype(bool)
            if real_BT.ndim == 3 and real_BT.shape[0] == 1:  # one (T, T) mask for every row
                real_BT = jnp.broadcast_to(real_BT, (B, T, T))
            if real_BT.shape == (B, T, T):
                pair_BTT = real_BT
                real_BT = jnp.diagonal(pair_BTT, axis1=1, axis2=2)  # a real token sees itself
            elif real_BT.shape != (B, T):
                raise ValueError(f"with a cache, attention_mask must be (B, T) = {(B, T)} (1 = real "
                                 f"token, 0 = padding) or (B, T, T), got shape {real_BT.shape}")
        if positions is None:  # padding takes no position: a left-padded row starts at next_pos
            positions = cache.next_pos[:, None] + jnp.cumsum(real_BT, axis=1, dtype=jnp.int32) - 1
            positions = jnp.maximum(positions, 0)
        positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (B, T))
        x_ND = self._embed(tokens_BT, positions, dropout_key)
        start = cache.length
        valid_BS = jax.lax.dynamic_update_slice(cache.valid, real_BT, (0, start))
        # slot s holds the token fed (s - start)-th in this call; causal order is slot order
        slot_S = jnp.arange(cache.max_len)
        mask_BTS = valid_BS[:, None, :] & (slot_S[None, None, :] <= start + jnp.arange(T)[None, :, None])
        if pair_BTT is not None:  # earlier slots stay visible; this call's slots follow the pair mask
            seen_BTS = jnp.broadcast_to(slot_S < start, (B, T, cache.max_len))
            mask_BTS &= jax.lax.dynamic_update_slice(seen_BTS, pair_BTT, (0, 0, start))
        prefix = self._active_prefix()
        gated = prefix is not None and prefix.gated
        def run(blk, x, m, key, k_cache, v_cache, at, gate_value):  # arrays only: remat can trace it
            gate = (prefix.n_tokens, gate_value) if gated else None
            return blk(x, B, T, m, key, kv=(k_cache, v_cache, at, gate))

        ks, vs = [], []
        for i, block in enumerate(self.h):
            args = (block, x_ND, mask_BTS, _fold(dropout_key, i), cache.k[i], cache.v[i], start,
                    prefix.gate[...][i] if gated else None)
            # a prefix model's full forward (training) runs here: recompute each block there too
            x_ND, (k, v) = _recomputed(run, *args) if remat else run(*args)
            ks.append(k)
            vs.append(v)
        next_pos = jnp.maximum(cache.next_pos, jnp.max(jnp.where(real_BT, positions + 1, 0), axis=1))
        new_cache = KVCache(k=tuple(ks), v=tuple(vs), valid=valid_BS, length=start + T, next_pos=next_pos)
        return self.ln_f(x_ND).reshape(B, T, cfg.n_embd), new_cache

    def _active_prefix(self):
        prefix = self.prefix
        return prefix if prefix is not None and prefix.enabled else None

    def init_cache(self, batch_size: int, max_len: int, heads_axis: bool | None = None) -> KVCache:
        """A cache for `batch_size` rows and `max_len` token slots (prompt + generated). With an
        active prefix, its learned keys/values take n extra slots in front. `heads_axis`: see
        `KVCache.init`."""
        prefix = self._active_prefix()
        if prefix is None:
            return KVCache.init(self.config, batch_size, max_len, heads_axis)
        cache = KVCache.init(self.config, batch_size, max_len + prefix.n_tokens, heads_axis)
        return cache.append_kv(*prefix.kv(batch_size))

    def logits(self, h_BTD: jax.Array) -> jax.Array:
        """The LM head, tied to the token embedding."""
        B, T, D = h_BTD.shape
        wte = self.wte.embedding[...].astype(self.config.compute_dtype)
        if B * T <= _FEW_ROWS:
            # Decoding: as (V, D) @ (D, rows), XLA:CPU reads wte in place; h @ wte.T with few rows
            # becomes a vector-matrix product that first copies a transposed wte (154 MB for GPT-2).
            h_DR = h_BTD.reshape(B * T, D).T
            by_chunks = B * T > 1 and jax.default_backend() == "cpu"  # measured on CPU only
            logits_VR = _head_by_chunks(wte, h_DR) if by_chunks else wte @ h_DR
            return logits_VR.T.reshape(B, T, -1)
        return (h_BTD.reshape(B * T, D) @ wte.T).reshape(B, T, -1)

    def __call__(self, tokens_BT: jax.Array, *, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, dropout_key: jax.Array | None = None,
                 cache: KVCache | None = None):
        """int tokens (B, T) -> logits (B, T, vocab_size); with `cache`: (logits, updated cache)."""
        out = self.features(tokens_BT, attention_mask=attention_mask, positions=positions,
                            dropout_key=dropout_key, cache=cache)
        if cache is None:
            return self.logits(out)
        h_BTD, new_cache = out
        return self.logits(h_BTD), new_cache


def count_params(model: nnx.Module, filter=nnx.Param) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, filter)))
