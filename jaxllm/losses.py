"""Token-level cross-entropy with Hugging Face's conventions (ignore_index=-100)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


def _target_logps(logits_NV: jax.Array, targets_N: jax.Array,
                   ignore_index: int) -> tuple[jax.Array, jax.Array]:
    """(log p(target) per row, 0 where not counted; the counted mask), on 2-D logits: XLA's CPU
    backend runs the vocabulary reductions much faster on (N, V) than on (B, T, V)."""
    logits_NV = logits_NV.astype(jnp.float32)
    counted_N = targets_N != ignore_index
    safe_N = jnp.where(counted_N, targets_N, 0)
    target_logit_N = jnp.take_along_axis(logits_NV, safe_N[:, None], axis=-1)[:, 0]
    return jnp.where(counted_N, target_logit_N - jax.nn.logsumexp(logits_NV, axis=-1), 0.0), counted_N


def cross_entropy_sum(logits_BTV: jax.Array, targets_BT: jax.Array,
                      ignore_index: int = IGNORE_INDEX) -> tuple[jax.Array, jax.Array]:
    """(sum of per-token losses, number of counted tokens); targets already aligned with logits.

    Returning the sum and the count separately lets gradient accumulation normalise by the total
    token count of the whole batch rather than averaging micro-batch means.
    """
    V = logits_BTV.shape[-1]
    logp_N, counted_N = _target_logps(logits_BTV.reshape(-1, V), targets_BT.reshape(-1), ignore_index)
    return -jnp.sum(logp_N), jnp.sum(counted_N).astype(jnp.float32)


def label_logps(logits_BTV: jax.Array, labels_BT: jax.Array,
                ignore_index: int = IGNORE_INDEX) -> tuple[jax.Array, jax.Array]:
    """Per row: (sum of log p(labels[t + 1] | tokens <= t) over labelled positions, their count).

    The shift is done here (labels are the input ids, -100 where not a target), as in
    `next_token_loss`; this is a sequence's log-likelihood under the model (DPO, PPO)."""
    B, T, V = logits_BTV.shape
    logp_N, counted_N = _target_logps(logits_BTV[:, :-1].reshape(-1, V), labels_BT[:, 1:].reshape(-1), ignore_index)
    return (jnp.sum(logp_N.reshape(B, T - 1), axis=1),
            jnp.sum(counted_N.reshape(B, T - 1), axis=1).astype(jnp.float32))


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array,
                  ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """Mean cross-entropy over counted tokens; targets already aligned (nanoGPT's x/y batches)."""
    total, count = cross_entropy_sum(logits_BTV, targets_BT, ignore_index)
    return total / jnp.maximum(count, 1.0)


def next_token_loss(logits_BTV: jax.Array, labels_BT: jax.Array,
                    ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """Mean next-token loss with the shift done here: labels are the input ids (HF's convention).

    Position t's logits predict labels[t + 1]; -100 labels (prompt, padding) are not counted.
    """
    return cross_entropy(logits_BTV[:, :-1], labels_BT[:, 1:], ignore_index)
