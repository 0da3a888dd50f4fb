"""Model configuration: GPTConfig and the named presets."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# The MLP's GELU: GPT-2 uses the tanh approximation; nanoGPT's nn.GELU() and HF's "gelu" the exact erf form.
ACTIVATIONS = ("gelu_tanh", "gelu")


# Fields that change how the network is computed, not what it computes (same weights, same
# numbers): a run may resume with them changed, and `from_hf` takes them as overrides.
COMPUTE_OPTIONS = ("remat", "scan_layers")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"        # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of the weights (master copy when training)
    remat: bool = False           # recompute each block's activations in the backward pass
    scan_layers: bool = False     # run the blocks as one jax.lax.scan (compile time flat in depth); storage unchanged
    attention: str = "auto"       # auto | xla | cudnn: how unmasked causal attention is computed
    activation: str = "gelu_tanh"  # MLP nonlinearity: gelu_tanh (GPT-2) | gelu (exact erf, nanoGPT's nn.GELU)

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.layer_norm_eps < float("inf"):   # negative: the sqrt of a negative variance, NaN
            raise ValueError(f"GPTConfig.layer_norm_eps must be a finite number >= 0 (GPT-2: 1e-5), "
                             f"got {self.layer_norm_eps}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(
                    f"GPTConfig.{name}={getattr(self, name)!r} is not supported; use one of {sorted(_DTYPES)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"GPTConfig.activation={self.activation!r} is not supported; use one of {list(ACTIVATIONS)}")
        if self.attention not in ("auto", "xla", "cudnn"):
            raise ValueError(f"GPTConfig.attention={self.attention!r} is not supported; use auto, xla or cudnn")
        if self.attention == "cudnn" and (self.dropout > 0 or self.head_dim % 8 or self.head_dim > 128):
            raise ValueError(
                "GPTConfig.attention='cudnn' needs dropout=0 and a head size that is a multiple of 8 "
                f"and at most 128 (got dropout={self.dropout}, head size {self.head_dim}); use auto or xla")

    def fused_attention(self, backend: str) -> bool:
        """Whether unmasked causal attention runs as one fused cuDNN kernel (flash attention) on
        `backend`: asked for, or `auto` on a GPU in 16-bit compute where cuDNN supports the shape
        (faster than the einsum version there: benchmarks/RESULTS.md, GPU section)."""
        if self.attention != "auto":
            return self.attention == "cudnn"
        return (backend == "gpu" and self.dtype in ("bfloat16", "float16") and self.dropout == 0.0
                and self.head_dim % 8 == 0 and self.head_dim <= 128)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return _DTYPES[self.param_dtype]

    def replace(self, **changes) -> "GPTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPTConfig":
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s) {unknown}; valid fields: {sorted(valid)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; available presets: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def num_params(self, include_positions: bool = True) -> int:
        """Parameter count (tied LM head counted once)."""
        d, L = self.n_embd, self.n_layer
        per_ln = 2 * d if self.bias else d
        per_block = (
            2 * per_ln
            + d * 3 * d + (3 * d if self.bias else 0)      # c_attn
            + d * d + (d if self.bias else 0)              # attn c_proj
            + d * 4 * d + (4 * d if self.bias else 0)      # c_fc
            + 4 * d * d + (d if self.bias else 0)          # mlp c_proj
        )
        n = self.vocab_size * d + L * per_block + per_ln
        if include_positions:
            n += self.block_size * d
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6N for the weights plus attention scores.

        N excludes the position table (a lookup, not a matmul) but includes the tied LM head,
        which is a real (d x vocab) matmul every token.
        """
        T = seq_len or self.block_size
        n = self.num_params(include_positions=False)
        return 6.0 * n + 12.0 * self.n_layer * self.n_embd * T


PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50257),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024, vocab_size=50257),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024, vocab_size=50257),
    # nanoGPT's character-level Shakespeare model; vocab is set from the tokenizer.
    "shakespeare-char": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65,
                             dropout=0.2, bias=False),
    # nanoGPT's CPU recipe: small enough to train for a few minutes on a laptop.
    "cpu-small": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65,
                      dropout=0.0, bias=False),
}
