"""Data parallelism: a 1-D device mesh, replicated train state, batches split along their rows;
and (`train.mesh`) a named (data, fsdp, tensor) mesh whose partition rules split the train state,
over the devices of one process or (after `initialize()`) of several.

The same code serves several GPUs and a plain CPU. On CPU, XLA's intra-op threading keeps a
second core only partly busy on small models; presenting every core as its own device
(`setup_cpu()`, before JAX starts) and splitting each batch across them keeps all cores busy
(measured in benchmarks/RESULTS.md). Nothing here runs on import: the CLI calls `setup_cpu()`,
and library users call it themselves if they want it.
"""

from __future__ import annotations

import functools
import math
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
    n = batch_devices(mesh)
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


def shard_batch(batch, mesh: Mesh, batch_axis: int, global_rows: int | None = None):
    """Place a batch on the mesh: leaves whose `batch_axis` splits evenly over the batch's devices
    (see `batch_sharding`) are split along it, others (per-batch scalars, flags) are replicated.

    On a mesh spanning processes every process passes either the same whole global batch (a pure
    function of (seed, step)), of which only its own rows are sent to its devices (`process_rows`),
    or, with `global_rows` (the row count of the whole batch), only its own rows: those that
    `process_batch_rows(mesh, global_rows)` names, in that order. Then a leaf whose `batch_axis`
    has that many rows is split, the others are replicated (and must be equal in every process)."""
    rows = batch_sharding(mesh, batch_axis)
    rep = replicated(mesh)
    n = batch_devices(mesh)
    multi = jax.process_count() > 1
    local = None if global_rows is None else row_count(process_batch_rows(mesh, global_rows), global_rows)

    def place(leaf):
        shape = np.shape(leaf)
        if local is not None:
            if len(shape) > batch_axis and shape[batch_axis] == local:
                global_shape = shape[:batch_axis] + (global_rows,) + shape[batch_axis + 1:]
                return jax.make_array_from_process_local_data(rows, np.asarray(leaf), global_shape)
            return process_rows(leaf, rep, None)
        split = len(shape) > batch_axis and shape[batch_axis] % n == 0
        if multi:
            return process_rows(leaf, rows if split else rep, batch_axis if split else None)
        return jax.device_put(leaf, rows if split else rep)

    return jax.tree.map(place, batch)


def process_rows(global_leaf, sharding: NamedSharding, batch_axis: int | None) -> jax.Array:
    """The global array of `global_leaf` (host data, the same in every process) under `sharding`,
    built from this process's rows alone (`jax.make_array_from_process_local_data`); batch_axis
    None: the leaf is replicated, every process gives all of it."""
    leaf = np.asarray(global_leaf)
    if batch_axis is not None:
        mine = _rows_of_devices(sharding, leaf.shape, batch_axis, sharding.addressable_devices)
        leaf = leaf[(slice(None),) * batch_axis + (mine,)]
    return jax.make_array_from_process_local_data(sharding, leaf, np.shape(global_leaf))


# ------------------------------------------------------------------ named mesh: data, FSDP, tensor
#
# `train.mesh` names how many devices each kind of parallelism takes, e.g. "data:2,fsdp:2,tensor:2".
# Parameters are placed by GSPMD (NamedSharding) from one table: each parameter's logical axes
# (by its state path) and one rule per logical axis naming the mesh axis it splits over. XLA then
# inserts the collectives: the all-gathers of FSDP weights, the reduce-scatters of their gradients
# and the all-reduces of tensor-parallel matmuls.

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")   # a batch's rows split over both: FSDP is data parallelism too

# logical axis -> mesh axis (or axes, or None: not split)
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "vocab": None,      # GPT-2's 50257 rows divide nothing
    "embed": "fsdp",    # ZeRO-3: weights, gradients and optimizer state split along the model width
    "heads": "tensor",  # Megatron: whole heads of q, k and v (c_attn is (D, 3, D)), c_proj's input rows
    "mlp": "tensor",    # the MLP's hidden dimension
}

# Logical axes of each parameter by the suffix of its state path; anything not listed (layer norms,
# the biases of outputs in the residual stream, adapters, prefixes, scalar heads) is replicated.
LOGICAL_AXES: dict[str, tuple[str | None, ...]] = {
    "wte.embedding": ("vocab", "embed"),
    "wpe.embedding": (None, "embed"),
    "attn.c_attn.kernel": ("embed", None, "heads"),   # (D, 3, D): q|k|v, each split by heads
    "attn.c_attn.bias": (None, "heads"),
    "attn.c_proj.kernel": ("heads", "embed"),
    "mlp.c_fc.kernel": ("embed", "mlp"),
    "mlp.c_fc.bias": ("mlp",),
    "mlp.c_proj.kernel": ("mlp", "embed"),
}

_MESH_HELP = ("train.mesh takes axis:size pairs over data, fsdp and tensor, e.g. 'data:2,fsdp:2,tensor:2' "
              "or 'fsdp:-1' (-1: the remaining devices)")


def parse_mesh(spec: str, devices: int | None = None) -> dict[str, int]:
    """"data:2,fsdp:2,tensor:2" -> {"data": 2, "fsdp": 2, "tensor": 2} over `devices` devices
    (default: every device of every process). One size may be -1: the devices left over."""
    n = len(jax.devices()) if devices is None else devices
    sizes: dict[str, int] = {}
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        axis, sep, size = (p.strip() for p in item.partition(":"))
        if not sep:
            raise ValueError(f"train.mesh={spec!r}: {item!r} has no size; {_MESH_HELP}")
        if axis not in MESH_AXES:
            raise ValueError(f"train.mesh={spec!r}: unknown axis {axis!r}; {_MESH_HELP}")
        if axis in sizes:
            raise ValueError(f"train.mesh={spec!r}: axis {axis!r} is given twice; name each axis once")
        try:
            value = int(size)
        except ValueError:
            value = 0
        if value < 1 and value != -1:
            raise ValueError(f"train.mesh={spec!r}: bad size {size!r} for {axis}; "
                             f"sizes are positive integers, or -1 for the remaining devices")
        sizes[axis] = value
    if not sizes:
        raise ValueError(f"train.mesh={spec!r} names no axis; {_MESH_HELP}")
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"train.mesh={spec!r}: only one axis may be -1, got {', '.join(free)}; "
                         f"give the others explicit sizes")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if n % fixed:
            raise ValueError(f"train.mesh={spec!r}: the other axes take {fixed} devices, which does not "
                             f"divide the {n} devices, so -1 has no size; choose sizes whose product divides {n}")
        sizes[free[0]] = n // fixed
    elif fixed != n:
        raise ValueError(f"train.mesh={spec!r}: the axis sizes multiply to {fixed} but there are {n} "
                         f"devices; choose sizes whose product is {n}, or make one of them -1")
    return {a: sizes.get(a, 1) for a in MESH_AXES}


def make_mesh(spec: str, devices=None) -> Mesh:
    """The (data, fsdp, tensor) mesh that `spec` describes (axes not named have size 1), over
    `devices` (default: jax.devices(), every process's devices). Tensor is the last, fastest-varying
    axis: its collectives are the most frequent and go to the nearest devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec, len(devices))
    return Mesh(np.array(devices).reshape([sizes[a] for a in MESH_AXES]), MESH_AXES)


def is_named_mesh(mesh: Mesh | None) -> bool:
    return mesh is not None and tuple(mesh.axis_names) == MESH_AXES


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes a batch's rows split over: data (x fsdp on a named mesh)."""
    return BATCH_AXES if is_named_mesh(mesh) else (DATA_AXIS,)


def batch_devices(mesh: Mesh | None) -> int:
    """Into how many parts a batch's rows split on `mesh`."""
    return 1 if mesh is None else math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
    """Rows (axis `batch_axis`) split over data x fsdp (over data on a `data_mesh`), the rest of
    each array whole."""
    axes = batch_axes(mesh)
    return NamedSharding(mesh, PartitionSpec(*([None] * batch_axis), axes[0] if len(axes) == 1 else axes))


def check_batch_size(batch_size: int, mesh: Mesh, spec: str = "") -> None:
    n = batch_devices(mesh)
    if batch_size % n:
        data, fsdp = mesh.shape["data"], mesh.shape["fsdp"]
        raise ValueError(f"train.batch_size={batch_size} does not split over data x fsdp = {data} x {fsdp} "
                         f"= {n} devices of train.mesh={spec or dict(mesh.shape)!r}; choose a batch size "
                         f"divisible by {n}, or fewer data/fsdp devices")


def check_model_split(config, mesh: Mesh, spec: str = "") -> None:
    """Refuse, naming the setting, a GPT whose heads, width or MLP do not split over `mesh`."""
    t, f = mesh.shape["tensor"], mesh.shape["fsdp"]
    where = f"train.mesh={spec or dict(mesh.shape)!r}"
    if config.n_head % t:
        raise ValueError(f"n_head={config.n_head} does not split over tensor:{t} ({where}); choose a "
                         f"tensor size that divides the number of heads")
    if config.n_embd % f:
        raise ValueError(f"n_embd={config.n_embd} does not split over fsdp:{f} ({where}); choose an "
                         f"fsdp size that divides the model width")


def path_name(path) -> str:
    """A key path as a dotted state path ("h.0.attn.c_attn.kernel"), a Variable's `.value` dropped."""
    parts = []
    for k in path:
        part = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        parts.append(str(part))
    if parts and parts[-1] == "value":
        parts.pop()
    return ".".join(parts)


def _matches(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def logical_axes(name: str, ndim: int) -> tuple[str | None, ...]:
    """The logical axes of the parameter at state path `name` (all None: replicated). LoRA's
    factors (parts, in, r) and (parts, r, out) follow their base kernel's in and (last) out axes."""
    for suffix, axes in LOGICAL_AXES.items():
        if _matches(name, suffix) and len(axes) == ndim:
            return axes
        base = suffix[: -len(".kernel")] if suffix.endswith(".kernel") else None
        if base and ndim == 3:
            if _matches(name, base + ".lora.a"):
                return (None, axes[0], None)
            if _matches(name, base + ".lora.b"):
                return (None, None, axes[-1])
    return (None,) * ndim


def partition_spec(name: str, shape, mesh: Mesh, rules=None) -> PartitionSpec:
    """The PartitionSpec of a parameter at state path `name`; a dimension that a rule splits but
    that does not divide its mesh axes is an error naming the parameter."""
    rules = RULES if rules is None else rules
    spec = []
    for dim, (size, logical) in enumerate(zip(shape, logical_axes(name, len(shape)))):
        axes = rules.get(logical) if logical is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)   # size-1 axes split nothing
        parts = math.prod(mesh.shape[a] for a in axes)
        if size % parts:
            over = ",".join(f"{a}:{mesh.shape[a]}" for a in axes)
            raise ValueError(f"parameter {name} (shape {tuple(shape)}): dimension {dim} ({logical}, size "
                             f"{size}) does not split over {over} (train.mesh); choose mesh sizes that "
                             f"divide {size}")
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def state_shardings(tree, mesh: Mesh, rules=None):
    """A NamedSharding for every array of `tree` (an nnx.State, a TrainState, an optimizer state:
    any pytree whose key paths end in a parameter's state path), by LOGICAL_AXES and `rules`.
    Optimizer moments sit under their parameter's path, so they split like it; scalars (step,
    counts) and unknown arrays are replicated."""
    def one(path, leaf):
        shape = np.shape(leaf)
        if not shape:
            return replicated(mesh)
        return NamedSharding(mesh, partition_spec(path_name(path), shape, mesh, rules))
    return jax.tree_util.tree_map_with_path(one, tree)


def opt_state_shardings(optimizer, opt_state, param_shardings, mesh: Mesh):
    """The optimizer state's shardings from its parameters' (optax.tree_map_params): every copy of
    the parameter tree in it (Adam's mu and nu) splits like the parameters, the rest is replicated."""
    import optax
    return optax.tree_map_params(optimizer, lambda _, s: s, opt_state, param_shardings,
                                 transform_non_params=lambda _: replicated(mesh))


def bytes_per_device(tree) -> dict:
    """Bytes of `tree`'s arrays held by each device (from their addressable shards)."""
    out: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def on_mesh(mesh: Mesh | None):
    """A context in which `constrain_rows` sees `mesh` (a named mesh; anything else: no effect).
    Used around the tracing of a step: allowed inside jax.jit, as it sets only the abstract mesh."""
    import contextlib
    if not is_named_mesh(mesh):
        return contextlib.nullcontext()
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def _traced_mesh():
    """The named mesh the computation being traced runs on (set by `on_mesh`), or None: what the
    activation hints below and `splits_heads` read."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or tuple(mesh.axis_names) != MESH_AXES else mesh


def constrain_rows(x: jax.Array) -> jax.Array:
    """The activation hint of a named mesh: keep `x`'s rows (axis 0) split over data x fsdp like
    the batch's. Without it, XLA split the residual stream along the FSDP-split model width and
    resharded it around every layer (fsdp:8 on a 2-layer 256-wide GPT: 55 all-gathers and 16
    all-to-alls per step instead of 11 and 2, 1.7x the temporary memory). Outside `on_mesh`, or
    when the rows do not split, `x` is returned unchanged: a model off a mesh runs as before."""
    mesh = _traced_mesh()
    if mesh is None:
        return x
    n = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if n == 1 or x.shape[0] % n:
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(BATCH_AXES))


def whole(x: jax.Array) -> jax.Array:
    """`x` gathered whole onto every device of a named mesh (no effect off one). For the embedding
    tables before a lookup: gathering a row of an FSDP-split table gives the row split along the
    width, which XLA then cannot turn into the batch's row split except by replicating the looked-up
    activations ("Involuntary full rematerialization"); the whole table is gathered for the tied LM
    head anyway."""
    mesh = _traced_mesh()
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec())


def splits_heads() -> bool:
    """Whether the computation being traced runs on a named mesh that splits heads (tensor > 1):
    there the KV cache keeps a heads axis (`jaxllm.model.KVCache.init`)."""
    mesh = _traced_mesh()
    return mesh is not None and mesh.shape["tensor"] > 1


def constrain_heads(x: jax.Array) -> jax.Array:
    """The KV cache's hint on a named mesh: (B, H, ...) with rows split over data x fsdp and heads
    over tensor, as c_attn's per-head split computes them, so each device keeps only its rows'
    share of the heads in its cache. Off a mesh, for a cache without a heads axis (3-D), or where
    a split does not divide: unchanged."""
    mesh = _traced_mesh()
    if x.ndim != 4 or mesh is None:
        return x
    rows = math.prod(mesh.shape[a] for a in BATCH_AXES)
    heads = mesh.shape["tensor"]
    spec = (BATCH_AXES if rows > 1 and x.shape[0] % rows == 0 else None,
            "tensor" if heads > 1 and x.shape[1] % heads == 0 else None)
    if spec == (None, None):
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


def shard_model(model, mesh: Mesh, rules=None):
    """Place an nnx model's state on `mesh` by the partition rules (in place; returns `model`), e.g.
    to decode with `jaxllm.generate` over tensor-parallel weights: GSPMD then splits the matmuls and
    `generate` splits the prompt rows over data x fsdp. The KV cache, (B, H, ...), splits its rows
    over data x fsdp and its heads over tensor (`constrain_heads`)."""
    from flax import nnx
    state = nnx.state(model)
    nnx.update(model, place(state, state_shardings(state, mesh, rules)))
    return model


def mesh_of(tree) -> Mesh | None:
    """The named (data, fsdp, tensor) mesh that `tree`'s arrays are placed on, or None."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and is_named_mesh(sharding.mesh):
            return sharding.mesh
    return None


def place(tree, shardings):
    """jax.device_put(tree, shardings), also onto a mesh spanning processes: there an array held
    whole by this process (every process holds the same, e.g. a model built from one seed) goes
    through host memory, each process placing only its own devices' parts."""
    if jax.process_count() > 1:
        def host(x):
            return np.asarray(x) if isinstance(x, jax.Array) and x.is_fully_addressable else x
        tree = jax.tree.map(host, tree)
    return jax.device_put(tree, shardings)


# ------------------------------------------------------------------ several processes (multi-host)

def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids=None, timeout_s: int = 300) -> tuple[int, int]:
    """Join this process to a multi-process JAX run (`jax.distributed.initialize`); returns
    (process_index, process_count). Call it first, before any JAX computation, in every process;
    then `jax.devices()` lists every process's devices and `train.mesh` spans them all.

    The settings come from the arguments, else from JAX_COORDINATOR_ADDRESS ("host:port" of process
    0, which also runs the coordinator), JAX_NUM_PROCESSES and JAX_PROCESS_ID (jax itself reads only
    the first), else from a cluster JAX detects (SLURM, Open MPI, Cloud TPU, Kubernetes). A second
    call is a no-op.

    Timeouts: a process other than 0 first waits up to `timeout_s` seconds for the coordinator's
    port to accept a connection, and past it raises a RuntimeError naming the address and the fix.
    Once connected, jax waits as long (its `initialization_timeout`) for every process to register;
    jaxlib then does not raise but ends the process (a fatal "DEADLINE_EXCEEDED ... RegisterTask"
    log), so a missing process stops the others after `timeout_s`, never hangs them."""
    if jax.distributed.is_initialized():
        return jax.process_index(), jax.process_count()
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = _env_int("JAX_NUM_PROCESSES", num_processes)
    process_id = _env_int("JAX_PROCESS_ID", process_id)
    if num_processes is not None and not 1 <= num_processes:
        raise ValueError(f"num_processes (JAX_NUM_PROCESSES) must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id (JAX_PROCESS_ID) is {process_id} but there are {num_processes} "
                         f"processes: give each process an id in 0..{num_processes - 1}")
    if coordinator_address and process_id not in (None, 0):
        _wait_for_coordinator(coordinator_address, process_id, num_processes, timeout_s)
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   local_device_ids=local_device_ids, initialization_timeout=int(timeout_s))
    except ValueError as err:   # nothing said where the coordinator is
        raise ValueError(f"{err}: pass coordinator_address/num_processes/process_id to "
                         f"jaxllm.parallel.initialize, or set JAX_COORDINATOR_ADDRESS (host:port of process 0), "
                         f"JAX_NUM_PROCESSES and JAX_PROCESS_ID in every process") from err
    except Exception as err:   # jaxlib raises XlaRuntimeError (DEADLINE_EXCEEDED) after the timeout
        who = (f"process {process_id} of {num_processes}" if process_id is not None else "this process")
        waited = ("for the other processes to join" if process_id == 0 else
                  "for the coordinator (process 0) to answer")
        raise RuntimeError(
            f"jax.distributed could not start: {who} waited {timeout_s} s {waited} at "
            f"{coordinator_address or '(address from the cluster)'}. Start every process (process 0 "
            f"first) with the same coordinator address and process count, check that process 0's host "
            f"and port are reachable from here, or raise timeout_s. ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''})") from err
    return jax.process_index(), jax.process_count()


def _wait_for_coordinator(address: str, process_id, num_processes, timeout_s: float) -> None:
    """Return once `address` ("host:port") accepts a TCP connection; RuntimeError after `timeout_s`.
    (Checked here because jaxlib ends the process, instead of raising, when it cannot connect.)"""
    import socket
    import time
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"coordinator address {address!r} (JAX_COORDINATOR_ADDRESS) must be host:port, "
                         f"e.g. 'localhost:12355' or '10.0.0.1:12355'")
    host = host.strip("[]")   # [::1]:port
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"jax.distributed could not start: process {process_id} of {num_processes} waited "
                    f"{timeout_s} s for the coordinator (process 0) to answer at {address} ({err}). Start "
                    f"every process (process 0 first) with the same coordinator address and process count, "
                    f"check that process 0's host and port are reachable from here, or raise timeout_s.") from None
        time.sleep(0.25)


def _env_int(name: str, value: int | None) -> int | None:
    if value is not None:
        return int(value)
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None


def is_main_process() -> bool:
    """True in the process that writes logs, metrics and the run directory (process 0)."""
    return jax.process_index() == 0


def gather_to_host(tree):
    """Every array of `tree` whole, as numpy, in every process (an all-gather across processes for
    arrays split over several; a plain copy for arrays this process holds whole)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)


def on_one_device(tree):
    """`tree`'s arrays whole on this process's first device, from wherever they are: a mesh of this
    process's devices, or one spanning processes (then gathered through host memory first, in every
    process: a collective). For work that should not run once per device, e.g. generating text."""
    if jax.process_count() > 1 and any(isinstance(x, jax.Array) and not x.is_fully_addressable
                                       for x in jax.tree.leaves(tree)):
        tree = gather_to_host(tree)
    return jax.device_put(tree, jax.local_devices()[0])


def sync(name: str) -> None:
    """Wait until every process reaches this point (no-op in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------ each process builds its own rows

@functools.lru_cache(maxsize=32)   # asked at every step (shard_batch): the same answer for a run
def process_batch_rows(mesh: Mesh, global_rows: int, batch_axis: int = 0):
    """The rows of a `global_rows`-row batch that this process's devices hold on `mesh` (rows split
    over data x fsdp, see `batch_sharding`): a slice when they are one run of rows (the usual case:
    jax.devices() lists each process's devices together), else a sorted index array. A batch
    function given them builds only these rows, in this order; `shard_batch(..., global_rows=)`
    then assembles the global batch (`jax.make_array_from_process_local_data` expects a process's
    blocks of rows concatenated in order). One process: every row, slice(0, global_rows)."""
    sharding = batch_sharding(mesh, batch_axis)
    shape = (1,) * batch_axis + (global_rows,)
    return _rows_of_devices(sharding, shape, batch_axis, sharding.addressable_devices)


def _rows_of_devices(sharding: NamedSharding, shape, batch_axis: int, devices):
    """The rows along `batch_axis` of an array of `shape` under `sharding` that `devices` hold,
    as in `process_batch_rows`. Devices that hold the same rows (tensor replicas) count once."""
    index_map = sharding.devices_indices_map(tuple(shape))
    size = shape[batch_axis]
    blocks = sorted({index_map[d][batch_axis].indices(size)[:2] for d in devices})
    if not blocks:
        raise ValueError(f"none of the devices {list(devices)} is on the mesh of {sharding}")
    if all(a[1] == b[0] for a, b in zip(blocks, blocks[1:])):
        return slice(blocks[0][0], blocks[-1][1])
    return np.concatenate([np.arange(start, stop) for start, stop in blocks])


def row_count(rows, global_rows: int) -> int:
    """How many rows `rows` (a slice or an index array of a `global_rows`-row batch) selects."""
    return len(range(*rows.indices(global_rows))) if isinstance(rows, slice) else len(rows)
