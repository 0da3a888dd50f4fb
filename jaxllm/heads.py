"""Scalar heads on a GPT trunk: the reward model of RLHF and PPO's value head.

`RewardModel` is a GPT (`trunk`, whose LM head goes unused) plus `head`, a (D, 1) projection
without bias initialised N(0, 0.02) as transformers' GPT2ForSequenceClassification initialises its
`score`. A row's reward is the head applied to the final hidden state of its LAST REAL token, the
rightmost position the attention mask keeps, so left and right padding give the same reward.

The head's weights are their own variable type, `HeadParam`: trained with the whole trunk
(`nnx.Param`), or with a LoRA on the trunk (`nnx.Any(PeftParam, HeadParam)`), never forgotten by a
filter that selects PEFT weights alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import GPTConfig
from jaxllm.model import GPT

_INIT_STD = 0.02


class HeadParam(nnx.Param):
    """Weights of a scalar head (reward, value)."""


def last_real_index(mask_BT: jax.Array) -> jax.Array:
    """(B,) index of the rightmost position where the (B, T) mask is on (left or right padding)."""
    mask_BT = jnp.asarray(mask_BT).astype(bool)
    T = mask_BT.shape[1]
    return (T - 1 - jnp.argmax(mask_BT[:, ::-1], axis=1)).astype(jnp.int32)


class ScalarHead(nnx.Module):
    def __init__(self, d: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.kernel = HeadParam(_INIT_STD * jax.random.normal(rngs.params(), (d, 1), param_dtype))

    def __call__(self, h_BD: jax.Array) -> jax.Array:
        return (h_BD.astype(jnp.float32) @ self.kernel[...].astype(jnp.float32))[:, 0]


class RewardModel(nnx.Module):
    """GPT trunk + scalar head read at each row's last real token: rewards (B,) in float32."""

    def __init__(self, cfg: GPTConfig | None = None, *, rngs: nnx.Rngs, trunk: GPT | None = None):
        if trunk is None:
            if cfg is None:
                raise ValueError("RewardModel needs a GPTConfig or a trunk (a GPT)")
            trunk = GPT(cfg, rngs=rngs)
        elif cfg is not None and cfg != trunk.config:
            raise ValueError("cfg does not match the trunk's own config")
        self.trunk = trunk
        self.config = trunk.config
        self.head = ScalarHead(self.config.n_embd, rngs=rngs, param_dtype=self.config.weight_dtype)

    def __call__(self, tokens_BT: jax.Array, *, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, dropout_key: jax.Array | None = None,
                 last_index: jax.Array | None = None) -> jax.Array:
        """Rewards (B,). `attention_mask` (B, T) (1 = real token) tells the last real token; with a
        (B, T, T) mask (packed or segment masks) give `last_index` (B,) explicitly."""
        h_BTD = self.trunk.features(tokens_BT, attention_mask=attention_mask, positions=positions,
                                    dropout_key=dropout_key)
        B, T, _ = h_BTD.shape
        if last_index is None:
            if attention_mask is not None and jnp.ndim(attention_mask) == 3:
                raise ValueError("with a (B, T, T) attention mask, pass last_index: the last real token of each row")
            last_index = (jnp.full((B,), T - 1, jnp.int32) if attention_mask is None
                          else last_real_index(attention_mask))
        h_BD = jnp.take_along_axis(h_BTD, jnp.asarray(last_index)[:, None, None], axis=1)[:, 0]
        return self.head(h_BD)


class PolicyWithValue(nnx.Module):
    """PPO's model: the policy (a GPT, `trunk`) and a value head on its final hidden states, as the
    value head shares the policy's trunk in TRL's AutoModelForCausalLMWithValueHead. The head is a
    `HeadParam` tree of its own: it trains beside a LoRA, and a PPO run's policy is the trunk alone
    (`jaxllm.runs.load_checkpoint` returns it)."""

    def __init__(self, trunk: GPT, *, rngs: nnx.Rngs):
        self.trunk = trunk
        self.config = trunk.config
        self.head = ScalarHead(self.config.n_embd, rngs=rngs, param_dtype=self.config.weight_dtype)

    def values(self, h_BTD: jax.Array) -> jax.Array:
        """(B, T) values read from hidden states (B, T, D)."""
        B, T, D = h_BTD.shape
        return self.head(h_BTD.reshape(B * T, D)).reshape(B, T)
