"""Data parallelism: a 1-D device mesh, replicated train state, batches split along their rows.

The same code serves several GPUs and a plain CPU. On CPU, XLA's intra-op threading keeps a
second core only partly busy on small models; presenting every core as its own device
(`setup_cpu()`, before JAX starts) and splitting each batch across them keeps all cores busy
(measured in benchmarks/RESULTS.md). Nothing here runs on import: the CLI calls `setup_cpu()`,
and library users call it themselves if they want it.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"

# Turning XLA:CPU's experimental YNNPACK fusions off made training and decoding faster on the CPUs
# measured (benchmarks/RESULTS.md). XLA aborts on flags it does not know, so the flag is only set
# on the jaxlib versions it was measured with.
_CPU_SPEED_FLAGS = {"0.10.2": ("--xla_cpu_experimental_ynn_fusion_type=",)}


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # private API moved: assume started, change nothing
        return True


def cpu_core_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def setup_cpu(devices: int | None = None, speed_flags: bool = True) -> bool:
    """Expose `devices` CPU devices (default: one per core) and, with `speed_flags`, the measured
    XLA:CPU speed flags, by adding to the XLA_FLAGS environment variable.

    Call before the first JAX computation; XLA reads its flags once, when the backend starts.
    Settings already in XLA_FLAGS win. Returns False (and changes nothing) if JAX has started."""
    if _backend_started():
        return False
    flags = os.environ.get("XLA_FLAGS", "").split()
    if not any(f.startswith("--xla_force_host_platform_device_count") for f in flags):
        flags.append(f"--xla_force_host_platform_device_count={devices or cpu_core_count()}")
    os.environ["XLA_FLAGS"] = " ".join(flags)
    return set_speed_flags() if speed_flags else True


def set_speed_flags() -> bool:
    """Add the measured XLA:CPU speed flags to XLA_FLAGS, unless JAX has started or the user set
    them. Returns False (and changes nothing) if JAX has started."""
    if _backend_started():
        return False
    flags = os.environ.get("XLA_FLAGS", "").split()
    import jaxlib
    for flag in _CPU_SPEED_FLAGS.get(jaxlib.__version__, ()):
        if not any(f.split("=")[0] == flag.split("=")[0] for f in flags):
            flags.append(flag)
    if flags:
        os.environ["XLA_FLAGS"] = " ".join(flags)
    return True


# Data parallelism on CPU devices repeats the optimizer update on every device and all-reduces the
# gradients through memory: worth it for small models, not for large ones (benchmarks/RESULTS.md,
# "Training step against PyTorch"). So the automatic choice on CPU keeps one device above this many
# trained parameters.
CPU_DATA_PARALLEL_MAX_PARAMS = 30_000_000


def data_mesh(batch_size: int, devices: int = 0, trainable_params: int | None = None,
              can_pad: bool = False) -> Mesh | None:
    """A mesh over the devices that share `batch_size` rows, or None for one device.

    devices=0 (automatic) uses every local device, up to one per row, when the caller can pad the
    batch to a multiple of the device count with rows that weigh nothing (`can_pad`, see
    `pad_rows`); otherwise the largest count that divides the batch. On CPU it keeps one device
    when more than CPU_DATA_PARALLEL_MAX_PARAMS parameters are trained. A positive count is used
    as given (and must divide the batch unless `can_pad`).
    """
    available = jax.local_devices()
    if devices < 0:
        raise ValueError(f"train.devices must be >= 0 (0 = automatic), got {devices}")
    if devices > len(available):
        raise ValueError(
            f"train.devices={devices} but JAX sees {len(available)} {available[0].platform} device(s); "
            "on CPU, run through the jaxllm CLI (which exposes one device per core) or call "
            "jaxllm.parallel.setup_cpu() before using JAX")
    if devices == 0:
        if can_pad:
            devices = min(len(available), batch_size)
        else:
            devices = max(n for n in range(1, len(available) + 1) if batch_size % n == 0)
        if (available[0].platform == "cpu" and trainable_params is not None
                and trainable_params > CPU_DATA_PARALLEL_MAX_PARAMS):
            devices = 1
    elif batch_size % devices and not can_pad:
        raise ValueError(f"train.batch_size={batch_size} does not split evenly over "
                         f"train.devices={devices}; choose a batch size divisible by it")
    if devices == 1:
        return None
    return Mesh(np.array(available[:devices]), (DATA_AXIS,))


def padded_rows(batch_size: int, mesh: Mesh | None) -> int:
    """Rows a batch of `batch_size` takes on `mesh`: the next multiple of its device count."""
    n = 1 if mesh is None else mesh.size
    return -(-batch_size // n) * n


def pad_rows(batch, rows: int, fill, axis: int = 0):
    """`batch` with `axis` grown to `rows` by rows filled with `fill` (a pytree of scalars shaped
    like `batch`): the fill values are chosen by the stage so that those rows weigh nothing in its
    loss (e.g. labels of -100)."""
    def pad(leaf, value):
        leaf = np.asarray(leaf)
        extra = rows - leaf.shape[axis]
        if extra <= 0:
            return leaf
        shape = list(leaf.shape)
        shape[axis] = extra
        return np.concatenate([leaf, np.full(shape, value, leaf.dtype)], axis=axis)
    return jax.tree.map(pad, batch, fill)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(batch, mesh: Mesh, batch_axis: int):
    """Place a batch on the mesh: leaves whose `batch_axis` splits evenly are split along it,
    others (per-batch scalars, flags) are replicated."""
    rows = NamedSharding(mesh, PartitionSpec(*([None] * batch_axis), DATA_AXIS))
    rep = replicated(mesh)

    def place(leaf):
        shape = np.shape(leaf)
        split = len(shape) > batch_axis and shape[batch_axis] % mesh.size == 0
        return jax.device_put(leaf, rows if split else rep)

    return jax.tree.map(place, batch)
