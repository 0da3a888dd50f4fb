"""Hardware peak and model FLOPs utilisation (MFU)."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp


@functools.lru_cache(maxsize=None)
def measure_matmul_peak(n: int = 1024, dtype: str = "float32", seconds: float = 0.5) -> float:
    """FLOP/s of a square matmul through XLA on the default device: the practical peak MFU is
    measured against (vendor peaks are far from what XLA reaches on a CPU)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or reps < 3:
        f(a).block_until_ready()
        reps += 1
    return 2.0 * n ** 3 * reps / (time.perf_counter() - start)


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float) -> float:
    return flops_per_token * tokens_per_s / peak_flops
