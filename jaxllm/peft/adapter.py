"""Bottleneck adapters: a small residual MLP on a sublayer's output, h + up(act(down(h))).

Placement "houlsby" (Houlsby et al., 2019) puts one after the attention and one after the MLP of
every block; "pfeiffer" (Pfeiffer et al., 2020) only after the MLP. The bottleneck width is
n_embd // reduction_factor. The up-projection starts at zero, so a fresh adapter is the identity.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.model import Block
from jaxllm.peft.common import AdapterParam, PeftModule

_ACTIVATIONS = {"relu": jax.nn.relu, "gelu": lambda x: jax.nn.gelu(x, approximate=True),
                "swish": jax.nn.swish, "tanh": jnp.tanh}
PLACEMENTS = {"houlsby": ("attn_adapter", "mlp_adapter"), "pfeiffer": ("mlp_adapter",)}


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    reduction_factor: int = 16
    placement: str = "houlsby"   # houlsby | pfeiffer
    activation: str = "relu"     # relu | gelu | swish | tanh
    init_std: float = 0.02       # of the down-projection; the up-projection starts at zero

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"peft.adapter.placement must be one of {sorted(PLACEMENTS)}, got {self.placement!r}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"peft.adapter.activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}")
        if self.reduction_factor <= 0:
            raise ValueError(f"peft.adapter.reduction_factor must be positive, got {self.reduction_factor}")


class Adapter(PeftModule):
    def __init__(self, d: int, config: AdapterConfig, *, key: jax.Array, dtype, param_dtype):
        m = d // config.reduction_factor
        if m < 1:
            raise ValueError(f"peft.adapter.reduction_factor={config.reduction_factor} leaves no bottleneck "
                             f"for width {d}; choose a factor <= {d}")
        self.down = AdapterParam(config.init_std * jax.random.normal(key, (d, m), param_dtype))
        self.down_bias = AdapterParam(jnp.zeros((m,), param_dtype))
        self.up = AdapterParam(jnp.zeros((m, d), param_dtype))
        self.up_bias = AdapterParam(jnp.zeros((d,), param_dtype))
        self.config, self.dtype = config, dtype

    def __call__(self, h_ND: jax.Array) -> jax.Array:
        if not self.enabled:
            return h_ND
        act = _ACTIVATIONS[self.config.activation]
        z = act(h_ND @ self.down[...].astype(self.dtype) + self.down_bias[...].astype(self.dtype))
        return h_ND + (z @ self.up[...].astype(self.dtype) + self.up_bias[...].astype(self.dtype)).astype(h_ND.dtype)


def add_adapters(model: nnx.Module, config: AdapterConfig = AdapterConfig(), *,
                 rngs: nnx.Rngs | None = None):
    """Insert bottleneck adapters into every block of `model` (in place); returns the model."""
    rngs = rngs or nnx.Rngs(0)
    cfg = model.config
    blocks = [m for _, m in nnx.iter_modules(model) if isinstance(m, Block)]
    if any(b.attn_adapter is not None or b.mlp_adapter is not None for b in blocks):
        raise ValueError("the model already has adapters; add them once")
    for block in blocks:
        for slot in PLACEMENTS[config.placement]:
            setattr(block, slot, Adapter(cfg.n_embd, config, key=rngs.params(),
                                         dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype))
    return model
