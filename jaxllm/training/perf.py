"""Hardware peak and model FLOPs utilisation (MFU).

The peak MFU is reported against is the device's published dense peak for the compute dtype where
jaxllm knows the chip (GPUs and TPUs), else a square matmul measured through XLA in the compute
dtype (CPUs, where vendor peaks are far from what XLA reaches). `peak_flops` says which it used.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

# Dense (no sparsity) peak FLOP/s per chip from the vendors' datasheets, by compute dtype. float32
# on NVIDIA tensor-core GPUs is TF32, which XLA uses for float32 dots at default precision. The
# first device_kind substring that matches wins, so more specific names come first.
PUBLISHED_PEAKS = (
    ("H100 PCIe", {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12}),
    ("H100", {"bfloat16": 989e12, "float16": 989e12, "float32": 495e12}),
    ("H200", {"bfloat16": 989e12, "float16": 989e12, "float32": 495e12}),
    ("B200", {"bfloat16": 2250e12, "float16": 2250e12, "float32": 1100e12}),
    ("A100", {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12}),
    ("L4", {"bfloat16": 121e12, "float16": 121e12, "float32": 60e12}),
    ("V100", {"float16": 125e12, "float32": 15.7e12}),
    ("TPU v6 lite", {"bfloat16": 918e12}),
    ("TPU v5 lite", {"bfloat16": 197e12}),
    ("TPU v5p", {"bfloat16": 459e12}),
    ("TPU v5", {"bfloat16": 459e12}),
    ("TPU v4", {"bfloat16": 275e12}),
)


def published_peak(device_kind: str, dtype: str) -> float | None:
    for name, peaks in PUBLISHED_PEAKS:
        if name.lower() in device_kind.lower():
            return peaks.get(dtype)
    return None


@functools.lru_cache(maxsize=None)
def measure_matmul_peak(n: int = 1024, dtype: str = "float32", seconds: float = 0.5) -> float:
    """FLOP/s of an n x n matmul in `dtype` through XLA on the default device."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or reps < 3:
        f(a).block_until_ready()
        reps += 1
    return 2.0 * n ** 3 * reps / (time.perf_counter() - start)


def peak_flops(dtype: str = "float32", device=None) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from) for computing in `dtype` on `device` (default: the first)."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "") or ""
    published = published_peak(kind, dtype) if device.platform != "cpu" else None
    if published is not None:
        return published, f"published {dtype} peak of {kind}"
    measured = measure_matmul_peak(dtype=dtype)
    return measured, f"measured {dtype} 1024x1024 matmul on {kind or device.platform}"


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float) -> float:
    return flops_per_token * tokens_per_s / peak_flops
