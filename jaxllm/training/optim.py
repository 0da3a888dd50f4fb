"""AdamW with GPT-style weight decay, warmup + cosine schedule, and global-norm clipping."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 6e-4
    min_lr: float = 6e-5            # floor of the cosine decay
    warmup_iters: int = 100
    lr_decay_iters: int = 5000      # step at which the cosine reaches min_lr
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0          # 0 disables clipping

    def __post_init__(self):
        for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip"):
            if not 0.0 <= getattr(self, name) < float("inf"):
                raise ValueError(f"optim.{name} must be a finite number >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("warmup_iters", "lr_decay_iters"):
            if getattr(self, name) < 0:
                raise ValueError(f"optim.{name} must be >= 0, got {getattr(self, name)}")


def lr_schedule(c: OptimConfig):
    """nanoGPT's schedule: linear warmup to lr at `warmup_iters`, cosine to `min_lr`, then flat.

    Step 0 already gets lr / (warmup + 1), so the first update is not wasted.
    """
    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        # float constants: a Python int beyond int32 (lr_decay_iters=10**10) cannot enter jit as one
        warmup, span = float(c.warmup_iters), float(max(c.lr_decay_iters - c.warmup_iters, 1))
        warm = c.learning_rate * (step + 1) / (warmup + 1)
        ratio = jnp.clip((step - warmup) / span, 0.0, 1.0)
        cosine = c.min_lr + 0.5 * (1.0 + jnp.cos(jnp.pi * ratio)) * (c.learning_rate - c.min_lr)
        return jnp.where(step < warmup, warm, cosine)
    return schedule


# Weight decay follows what a parameter is, the same in every stage: weight matrices decay
# (kernels, embeddings, LoRA's A and B, adapter projections, prefix tables and their projection
# matrices); biases, LayerNorm scales and gates never do. A decayed zero-initialised gate would be
# pulled back to "off" at every step, and decaying a bias or a norm scale only shifts the function.
NO_DECAY = frozenset({"bias", "scale", "gate", "down_bias", "up_bias", "b1", "b2"})


def _name(path) -> str:
    """The parameter's own name: the last mapping key of its path in an nnx.State (or a dict)."""
    keys = [getattr(k, "key", None) for k in path if hasattr(k, "key")]
    return str(keys[-1]) if keys else ""


def decay_mask(params):
    """True where a parameter decays (see NO_DECAY), by its name, whatever its shape."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _name(path) not in NO_DECAY, params)


def make_optimizer(c: OptimConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(lr_schedule(c), b1=c.beta1, b2=c.beta2, weight_decay=c.weight_decay,
                        mask=decay_mask)
    if c.grad_clip and c.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(c.grad_clip), adamw)
    return adamw
