"""Prefix tuning (Li & Liang, 2021): n learned key/value vectors per layer that every token attends to.

The prefix takes n slots in front of the KV cache (`GPT.init_cache` puts them there), so training,
padded batches, packed segments and generation all see it through the same cached attention; real
tokens keep positions 0, 1, ... (the prefix has none). As in Hugging Face PEFT, the prefix is
either a free (n, n_layer*2*n_embd) table or, with `projection`, an embedding passed through an MLP
(Linear, tanh, Linear) that steadies training; only the MLP's output is needed at inference.

A plain prefix shares one softmax with the real tokens, so no prefix leaves a model unchanged
(any key takes probability mass from the tokens). `gated=True` gives the prefix its own softmax,
scaled by a per-layer, per-head gate that starts at zero (LLaMA-Adapter's zero-init attention):
a fresh gated prefix is then exactly the identity.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.peft.common import PeftModule, PrefixParam


@dataclasses.dataclass(frozen=True)
class PrefixConfig:
    num_virtual_tokens: int = 20
    projection: bool = False      # PEFT's prefix_projection: reparameterise through an MLP
    projection_hidden: int = 512  # PEFT's encoder_hidden_size
    gated: bool = False           # own softmax for the prefix, behind a zero-initialised gate
    init_std: float = 1.0         # of the prefix table / embedding (PEFT: nn.Embedding's N(0, 1))

    def __post_init__(self):
        if self.num_virtual_tokens <= 0:
            raise ValueError(f"peft.prefix.num_virtual_tokens must be positive, got {self.num_virtual_tokens}")
        if self.projection and self.projection_hidden <= 0:
            raise ValueError(f"peft.prefix.projection_hidden must be positive, got {self.projection_hidden}")


def _torch_linear_init(key, n_in, n_out, dtype):
    """PyTorch's nn.Linear default (what PEFT's MLP gets): U(±1/sqrt(n_in)) for weight and bias."""
    bound = 1.0 / math.sqrt(n_in)
    kw, kb = jax.random.split(key)
    return (jax.random.uniform(kw, (n_in, n_out), dtype, -bound, bound),
            jax.random.uniform(kb, (n_out,), dtype, -bound, bound))


class Prefix(PeftModule):
    def __init__(self, cfg, config: PrefixConfig, *, rngs: nnx.Rngs):
        n, L, D = config.num_virtual_tokens, cfg.n_layer, cfg.n_embd
        dt = cfg.weight_dtype
        self.config, self.n_tokens, self.gated = config, n, config.gated
        self.shape = (L, cfg.n_head, cfg.head_dim)
        self.dtype = cfg.compute_dtype
        if config.projection:
            Hd = config.projection_hidden
            self.embedding = PrefixParam(config.init_std * jax.random.normal(rngs.params(), (n, D), dt))
            w1, b1 = _torch_linear_init(rngs.params(), D, Hd, dt)
            w2, b2 = _torch_linear_init(rngs.params(), Hd, L * 2 * D, dt)
            self.w1, self.b1, self.w2, self.b2 = (PrefixParam(x) for x in (w1, b1, w2, b2))
        else:
            self.table = PrefixParam(config.init_std * jax.random.normal(rngs.params(), (n, L * 2 * D), dt))
        if config.gated:
            self.gate = PrefixParam(jnp.zeros((L, cfg.n_head), dt))

    def values(self) -> jax.Array:
        """The prefix as (n, n_layer * 2 * n_embd): the table, or the MLP applied to the embedding."""
        if not self.config.projection:
            return self.table[...]
        h = jnp.tanh(self.embedding[...] @ self.w1[...] + self.b1[...])
        return h @ self.w2[...] + self.b2[...]

    def kv(self, batch_size: int):
        """Keys and values (n_layer, 1, n, n_head, head_dim) for `KVCache.append_kv` (shared by rows)."""
        L, H, hd = self.shape
        kv = self.values().astype(self.dtype).reshape(self.n_tokens, L, 2, H, hd)
        kv = kv.transpose(1, 2, 0, 3, 4)[:, :, None]   # (L, 2, 1, n, H, hd)
        return kv[:, 0], kv[:, 1]


def add_prefix(model: nnx.Module, config: PrefixConfig = PrefixConfig(), *, rngs: nnx.Rngs | None = None):
    """Give `model` a learned prefix (in place); returns the model."""
    if model.prefix is not None:
        raise ValueError("the model already has a prefix; add it once")
    model.prefix = Prefix(model.config, config, rngs=rngs or nnx.Rngs(0))
    return model
