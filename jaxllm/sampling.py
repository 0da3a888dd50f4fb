"""Sampling from a GPT: the whole decode loop is one compiled `lax.fori_loop`.

This version recomputes the forward pass over a fixed window of `block_size` tokens at each step
(no KV cache yet), so shapes never change and it compiles once per (batch, prompt length,
max_new_tokens) combination.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def _filter_logits(logits_BV: jax.Array, temperature: float, top_k: int) -> jax.Array:
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if top_k and top_k < logits_BV.shape[-1]:
        kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
    return logits_BV


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k"))
def _generate(graphdef, state, prompt_BP, key, *, max_new_tokens: int, temperature: float, top_k: int):
    model = nnx.merge(graphdef, state)
    block = model.config.block_size
    B, P = prompt_BP.shape
    total = max(P + max_new_tokens, block)
    buf_BL = jnp.zeros((B, total), prompt_BP.dtype).at[:, :P].set(prompt_BP)

    def body(i, carry):
        buf_BL, key = carry
        cur = P + i                               # tokens known so far
        start = jnp.maximum(cur - block, 0)       # crop from the left past block_size
        window_BT = jax.lax.dynamic_slice(buf_BL, (0, start), (B, block))
        logits_BTV = model(window_BT)              # causal: tokens right of cur do not matter
        last_BV = jax.lax.dynamic_index_in_dim(logits_BTV, cur - 1 - start, axis=1, keepdims=False)
        if temperature == 0.0:
            nxt_B = jnp.argmax(last_BV, axis=-1)
        else:
            key, sub = jax.random.split(key)
            nxt_B = jax.random.categorical(sub, _filter_logits(last_BV, temperature, top_k))
        buf_BL = jax.lax.dynamic_update_slice(buf_BL, nxt_B[:, None].astype(buf_BL.dtype), (0, cur))
        return buf_BL, key

    buf_BL, _ = jax.lax.fori_loop(0, max_new_tokens, body, (buf_BL, key))
    return buf_BL[:, :P + max_new_tokens]


def generate(model: nnx.Module, prompt_ids, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int = 0, key: jax.Array | None = None) -> jax.Array:
    """Prompt (B, P) or (P,) int ids -> (B, P + max_new_tokens); temperature 0 is greedy."""
    prompt = jnp.asarray(prompt_ids, jnp.int32)
    squeeze = prompt.ndim == 1
    if squeeze:
        prompt = prompt[None]
    if prompt.shape[1] == 0:
        raise ValueError("the prompt is empty; give at least one token (e.g. a newline or EOS)")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if key is None:
        key = jax.random.key(0)
    graphdef, state = nnx.split(model)
    out = _generate(graphdef, state, prompt, key, max_new_tokens=int(max_new_tokens),
                    temperature=float(temperature), top_k=int(top_k))
    return out[0] if squeeze else out
