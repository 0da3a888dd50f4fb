"""The one training loop: every stage (pretraining, SFT, reward, DPO, ...) runs through `train_loop`.

A stage hands it a model, a loss, a batch function of the step number and an evaluator; the loop
owns the jitted step, progress bar, metrics, periodic eval, checkpoints, the NaN stop and resume.
Batches and dropout keys are pure functions of (seed, step), so a resumed run repeats exactly the
steps an uninterrupted run would have taken.

The host never waits for a step to read its metrics: steps are dispatched back to back (at most
`MAX_IN_FLIGHT` queued), the next batch is built on a background thread while the device works,
and metrics are fetched in one transfer at each log, eval or checkpoint boundary, where the NaN
guard (computed inside the step) is checked. Checkpoints copy the state to host memory (the next
step reuses the donated device buffers) and Orbax writes the copy in the background.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import inspect
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxllm import parallel
from jaxllm.config import COMPUTE_OPTIONS, GPTConfig
from jaxllm.model import count_params
from jaxllm.training.checkpoint import Checkpointer
from jaxllm.training.metrics import MetricsWriter
from jaxllm.training.optim import OptimConfig, lr_schedule, make_optimizer
from jaxllm.training.perf import mfu, peak_flops
from jaxllm.training.rundir import TOKENIZER, clear_run_dir, write_tokenizer
from jaxllm.training.step import TrainState, init_train_state, make_train_step

# Steps dispatched ahead of the device: enough that the device never waits for the host, few
# enough that queued batches do not pile up in device memory.
MAX_IN_FLIGHT = 3


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    out_dir: str = "runs/default"
    batch_size: int = 12            # sequences per micro-batch
    grad_accum: int = 1             # micro-batches per optimizer step
    devices: int = 0                # data-parallel devices; 0: automatic (see jaxllm.parallel.data_mesh)
    mesh: str = ""                  # a named mesh instead, e.g. "data:2,fsdp:2,tensor:2" (one size may
                                    # be -1): the state split by jaxllm.parallel's partition rules;
                                    # "": data parallelism as `devices` says
    max_iters: int = 2000
    eval_interval: int = 250        # 0: evaluate only at the end
    log_interval: int = 10
    ckpt_interval: int = 500        # 0: checkpoint only at the end
    keep_ckpts: int = 3
    seed: int = 1337
    resume: bool = False            # continue from the latest checkpoint in out_dir, if any
    overwrite: bool = False         # delete what a previous run left in out_dir instead of refusing
    async_checkpoints: bool = True  # write checkpoints in the background (a kill during a write then
                                    # resumes from the one before); false: each save completes first
    peak_flops: float | None = None  # for MFU; None: the device's published peak, else measured
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "max_iters", "log_interval", "keep_ckpts"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.mesh and self.devices:
            raise ValueError(f"train.mesh={self.mesh!r} and train.devices={self.devices} are both set; "
                             "train.mesh names every device's use: leave train.devices at 0")


_STEP_METRICS = ("loss", "lr", "grad_norm", "tokens", "finite")   # what every step reports


class NonFiniteLossError(RuntimeError):
    pass


@dataclasses.dataclass
class TrainResult:
    model: nnx.Module
    step: int
    losses: dict[int, float]                 # step -> train loss of that step
    evals: dict[int, dict[str, float]]       # step -> eval metrics
    train_seconds: float                     # wall time of the steps, compile included, eval/ckpt not
    compile_seconds: float
    eval_seconds: float
    checkpoint_seconds: float
    peak_flops: float = 0.0                  # what MFU was measured against ...
    peak_source: str = ""                    # ... and where that number comes from


def train_loop(model: nnx.Module, loss_fn, batch_fn: Callable[[int], Any], *,
               optim: OptimConfig, loop: LoopConfig, meta: dict,
               make_eval: Callable[[Any], Callable[[TrainState], dict]] | None = None,
               trainable=nnx.Param, tokens_per_step: int, flops_per_token: float,
               tokenizer=None, checkpoint_frozen: bool = True,
               check_resume: Callable[[dict, Any], None] | None = None,
               pad_values=None, constants=None, online=None) -> TrainResult:
    """Train `model` (updated in place and returned) for loop.max_iters optimizer steps.

    If the run stops early (KeyboardInterrupt, NonFiniteLossError), `model` still holds the
    latest weights in memory (a non-finite update is never applied) before the error propagates.

    batch_fn(step) returns the batch for that step with a leading (grad_accum,) axis and rows on
    axis 1. A batch function that also takes `rows` (batch_fn(step, rows=...), a slice or an index
    array into the loop.batch_size rows, from `parallel.process_batch_rows`) is asked, when the run
    spans several processes, for only the rows this process's devices hold, which must equal those
    rows of the whole batch; one without it builds the whole batch in every process.
    `pad_values` (a pytree of scalars shaped like a batch) fills extra rows that weigh
    nothing in `loss_fn`; with it, data parallelism may use every device whatever the batch size.
    make_eval(graphdef, mesh) returns evaluate(state) -> {"val_loss": ...}; `mesh` is the
    mesh the state lives on (None on one device): data-parallel, or with `loop.mesh` the named
    (data, fsdp, tensor) mesh, where batch rows split over data x fsdp (`parallel.shard_batch`).
    `tokenizer` is saved into the run directory, so the run can be sampled from on its own.
    With checkpoint_frozen=False, checkpoints hold only the `trainable` weights (LoRA, adapters):
    the frozen base is rebuilt from where `meta["base"]` says it came from.
    check_resume(saved_meta, where) may refuse to resume a run (the model config is checked here).
    `constants` (arrays neither trained nor checkpointed, e.g. a frozen reference model's weights)
    reach the loss as its fourth argument (see jaxllm.training.step), and make_eval as
    make_eval(graphdef, mesh, constants=...), placed on the mesh once for both. Metrics the loss returns
    besides its sum are logged with the loss.

    `online` (instead of `batch_fn`, which is then None) makes batches from the current weights, as
    RL rollouts do: an object with bind(graphdef, mesh), called once before the first step;
    online(step, state) -> (batch, host metrics), called on this thread before each step, the batch
    with a leading (updates,) axis before (accum, rows, ...): a step applies that many optimizer
    updates; state_dict() -> a JSON-able dict stored in each checkpoint's metadata, and
    load_state_dict(d) to resume from it (e.g. an adaptive KL coefficient).
    """
    optimizer = make_optimizer(optim)
    main = parallel.is_main_process()   # several processes (parallel.initialize): process 0 logs and writes
    log = print if main else (lambda *args, **kwargs: None)
    if jax.process_count() > 1 and not loop.mesh:
        raise ValueError(f"this run has {jax.process_count()} processes (jax.distributed) but no train.mesh: "
                         f"set train.mesh (e.g. 'data:-1' or 'fsdp:-1') so that one model spans every "
                         f"process's devices")
    if loop.mesh:
        mesh = parallel.make_mesh(loop.mesh)
        parallel.check_batch_size(loop.batch_size, mesh, loop.mesh)
        if isinstance(getattr(model, "config", None), GPTConfig):
            parallel.check_model_split(model.config, mesh, loop.mesh)
    else:
        mesh = parallel.data_mesh(loop.batch_size, loop.devices, trainable_params=count_params(model, trainable),
                                  can_pad=pad_values is not None)
    rows = parallel.padded_rows(loop.batch_size, mesh)
    # Several processes: a batch function that takes `rows` builds only this process's rows of the
    # global batch (one process keeps building it whole, as it always has); one that does not
    # builds it whole in every process, of which each keeps its own rows.
    my_rows = (parallel.process_batch_rows(mesh, rows) if jax.process_count() > 1 and rows == loop.batch_size
               and batch_fn is not None and takes_rows(batch_fn) else None)
    ckpt = _prepare_run_dir(loop)
    start = 0
    if loop.resume and ckpt.latest_step() is not None:
        start = ckpt.latest_step()
        saved_meta = ckpt.read_meta(start)
        _check_model_config(saved_meta, meta, ckpt.directory)
        if check_resume is not None:
            check_resume(saved_meta, ckpt.directory)
        # nnx.state() returns a copy: the restored weights must be written back into the model.
        saved = nnx.state(model) if checkpoint_frozen else nnx.state(model, trainable)
        if loop.mesh:  # each device reads its own part, whatever mesh wrote it: no whole copy on one device
            nnx.update(model, ckpt.restore_model(saved, start, shardings=parallel.state_shardings(saved, mesh)))
        else:
            nnx.update(model, jax.device_put(ckpt.restore_model(saved, start)))
    elif loop.resume:
        log(f"train.resume: {ckpt.directory} holds no checkpoint yet; starting from step 0")
    graphdef, state = init_train_state(model, optimizer, trainable)
    state_sharding = None
    if loop.mesh:  # split by the partition rules; the optimizer moments like their parameters
        trainable_sharding = parallel.state_shardings(state.trainable, mesh)
        state_sharding = TrainState(
            parallel.replicated(mesh), trainable_sharding, parallel.state_shardings(state.frozen, mesh),
            parallel.opt_state_shardings(optimizer, state.opt_state, trainable_sharding, mesh))
    if start:
        saved_train = {"step": state.step, "opt_state": state.opt_state}
        if state_sharding is not None:
            restored = ckpt.restore_train(saved_train, start, shardings={
                "step": state_sharding.step, "opt_state": state_sharding.opt_state})
        else:
            restored = jax.device_put(ckpt.restore_train(saved_train, start))  # uncommitted like a fresh state
        state = state._replace(step=restored["step"], opt_state=restored["opt_state"])
    if loop.mesh:
        state = parallel.place(state, state_sharding)
        if constants is not None:
            constants = parallel.place(constants, parallel.replicated(mesh))
        log(f"mesh {', '.join(f'{a}:{n}' for a, n in mesh.shape.items())} over {mesh.size} devices"
            + (f" of {jax.process_count()} processes" if jax.process_count() > 1 else "")
            + ("" if my_rows is None else f"; each builds only its own rows of the batch (process 0: "
               f"{parallel.row_count(my_rows, rows)} of {rows})"))
    elif mesh is not None:  # placed once; the step's outputs keep this placement
        state = jax.device_put(state, parallel.replicated(mesh))
        if constants is not None:
            constants = jax.device_put(constants, parallel.replicated(mesh))
        print(f"data parallel over {mesh.size} devices"
              + (f" (batch {loop.batch_size} padded to {rows} rows)" if rows != loop.batch_size else ""))
    # The tokenizer is written just before this launch's first checkpoint, so a run stopped before
    # any checkpoint (an error, a NaN at step 0) leaves nothing that looks like a run behind.
    tokenizer_pending = tokenizer is not None and (start == 0 or not (ckpt.directory.parent / TOKENIZER).is_dir())

    step_fn = make_train_step(graphdef, loss_fn, optimizer, lr_schedule(optim), mesh, updates=online is not None,
                              state_sharding=state_sharding)
    if online is not None:
        online.bind(graphdef, mesh)
        if start:
            online.load_state_dict(saved_meta.get("online", {}))
    evaluate = None
    if make_eval is not None:   # given the constants placed above: no second copy on the devices
        evaluate = make_eval(graphdef, mesh) if constants is None else make_eval(graphdef, mesh, constants=constants)
    compute_dtype = getattr(getattr(model, "config", None), "dtype", "float32")
    peak, peak_source = (loop.peak_flops, "train.peak_flops") if loop.peak_flops else peak_flops(compute_dtype)
    writer = (MetricsWriter(loop.out_dir, tensorboard=loop.tensorboard, resume_step=start if loop.resume else None)
              if main else _NoMetrics())
    base_key = jax.random.key(loop.seed)

    def make_batch(it):
        if online is not None:
            batch, host_metrics = online(it, state)
            return (batch if mesh is None else parallel.shard_batch(batch, mesh, 2)), host_metrics
        if my_rows is not None:
            return parallel.shard_batch(_check_rows(batch_fn(it, rows=my_rows), my_rows, rows), mesh, 1,
                                        global_rows=rows)
        batch = batch_fn(it)
        if rows != loop.batch_size:
            batch = parallel.pad_rows(batch, rows, pad_values, axis=1)
        return batch if mesh is None else parallel.shard_batch(batch, mesh, 1)

    losses: dict[int, float] = {}
    evals: dict[int, dict[str, float]] = {}
    pending: list[tuple[int, dict]] = []   # dispatched steps whose metrics are not yet read
    window = {"steps": 0, "start": time.perf_counter()}   # throughput since the last log
    last_eval = "-"
    bar = tqdm(total=loop.max_iters, initial=start, disable=not (loop.progress and main), desc="train",
               dynamic_ncols=True)
    log(f"MFU is measured against {peak / 1e12:.3g} TFLOP/s ({peak_source})")
    loop_start = time.perf_counter()
    compile_seconds = eval_seconds = checkpoint_seconds = 0.0
    prefetch = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="jaxllm-batch")

    def drain() -> None:
        """Read the metrics of every dispatched step (one transfer); stop on a non-finite loss."""
        nonlocal pending
        if not pending:
            return
        fetched = jax.device_get([m for _, m in pending])
        done_steps = [s for s, _ in pending]
        pending = []
        for s, m in zip(done_steps, fetched):
            if not bool(m["finite"]):
                good = ckpt.latest_step()
                raise NonFiniteLossError(
                    f"loss is {float(m['loss'])} (grad norm {float(m['grad_norm'])}) at step {s}; "
                    f"training stopped (that update was not applied). The last good checkpoint "
                    f"{'is step ' + str(good) if good is not None else 'does not exist yet'} in "
                    f"{ckpt.directory} and is untouched. Lower optim.learning_rate, keep "
                    f"optim.grad_clip on, or use float32 compute, then resume.")
            losses[s] = float(m["loss"])
        s, m = done_steps[-1], fetched[-1]
        if (s + 1) % loop.log_interval == 0 or s + 1 == loop.max_iters:
            now = time.perf_counter()
            tokens_per_s = tokens_per_step * window["steps"] / max(now - window["start"], 1e-9)
            record = {"loss": losses[s], "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
                      "tokens_per_s": tokens_per_s, "mfu": mfu(flops_per_token, tokens_per_s, peak),
                      **{k: float(v) for k, v in m.items() if k not in _STEP_METRICS}}
            writer.write(s + 1, record)
            bar.set_postfix(loss=f"{losses[s]:.4f}", val=last_eval, tok_s=f"{tokens_per_s:,.0f}",
                            mfu=f"{record['mfu']:.1%}", refresh=False)
            window["steps"], window["start"] = 0, now

    try:
        next_batch = prefetch.submit(make_batch, start) if start < loop.max_iters and online is None else None
        for it in range(start, loop.max_iters):
            host_metrics = {}
            if online is not None:   # from the latest weights: built here, after the last step
                batch, host_metrics = make_batch(it)
            else:
                batch = next_batch.result()
                if it + 1 < loop.max_iters:  # built while this step runs
                    next_batch = prefetch.submit(make_batch, it + 1)
            with _interrupt_after_binding():  # Ctrl-C here must not lose the donated state
                state, metrics = step_fn(state, batch, base_key, constants)
            metrics = {**metrics, **host_metrics}
            pending.append((it, metrics))
            if it == start:  # compilation dominates the first step: not a throughput sample
                jax.block_until_ready(metrics)
                compile_seconds = time.perf_counter() - loop_start
                window["start"] = time.perf_counter()
            else:
                window["steps"] += 1
            if len(pending) > MAX_IN_FLIGHT:  # a wait, not a transfer: bounds the queue
                jax.block_until_ready(pending[-MAX_IN_FLIGHT - 1][1])
            bar.update(1)
            done = it + 1
            is_last = done == loop.max_iters
            do_eval = evaluate is not None and (is_last or (loop.eval_interval and done % loop.eval_interval == 0))
            do_ckpt = is_last or (loop.ckpt_interval and done % loop.ckpt_interval == 0)
            if do_eval or do_ckpt or done % loop.log_interval == 0:
                drain()  # also: never evaluate or checkpoint a state whose loss we have not checked
            paused = time.perf_counter()
            if do_eval:
                result = {k: float(v) for k, v in evaluate(state).items()}
                evals[done] = result
                writer.write(done, result)
                last_eval = f"{next(iter(result.values())):.4f}"
                bar.set_postfix(loss=f"{losses[it]:.4f}", val=last_eval, refresh=True)
                eval_seconds += time.perf_counter() - paused
            if do_ckpt:
                t_ckpt = time.perf_counter()
                if tokenizer_pending and main:
                    write_tokenizer(tokenizer, loop.out_dir)
                    tokenizer_pending = False
                model_state = (nnx.merge_state(state.trainable, state.frozen) if checkpoint_frozen
                               else state.trainable)
                ckpt.save(done, _checkpoint_copy(model_state),
                          _checkpoint_copy({"step": state.step, "opt_state": state.opt_state}),
                          meta if online is None else {**meta, "online": online.state_dict()})
                if not loop.async_checkpoints:
                    ckpt.wait()
                checkpoint_seconds += time.perf_counter() - t_ckpt
            window["start"] += time.perf_counter() - paused   # eval and checkpoints are not throughput
        drain()
    finally:  # one place releases the bar, the batch thread, the metric files and the checkpoints
        prefetch.shutdown(wait=True, cancel_futures=True)
        bar.close()
        writer.close()
        ckpt.close()  # waits for a checkpoint still being written
        # Also when stopped (Ctrl-C, a non-finite loss): the step donates the buffers the model
        # was built on, so the model is usable again only once it holds the latest state.
        _write_back(model, state, mesh)
    train_seconds = time.perf_counter() - loop_start - eval_seconds - checkpoint_seconds
    return TrainResult(model, loop.max_iters, losses, evals, train_seconds, compile_seconds,
                       eval_seconds, checkpoint_seconds, peak, peak_source)


def takes_rows(batch_fn) -> bool:
    """Whether batch_fn(step, rows=...) can build part of a batch (see `train_loop`)."""
    try:
        params = inspect.signature(batch_fn).parameters
    except (TypeError, ValueError):   # a builtin or C callable: no signature to read
        return False
    return "rows" in params   # named: a **kwargs that ignores it would hand back whole batches


def _check_rows(batch, rows, global_rows: int):
    """`batch`, once seen to hold the rows asked of its batch function on axis 1."""
    want = parallel.row_count(rows, global_rows)
    got = [np.shape(leaf)[1] if np.ndim(leaf) > 1 else None for leaf in jax.tree.leaves(batch)]
    if want not in got:
        raise ValueError(f"batch_fn(step, rows={rows}) returned batches with {got} rows on axis 1, not "
                         f"the {want} rows asked for (of {global_rows}); a batch function that takes `rows` "
                         f"must build just those rows of the whole batch")
    return batch


def _host_copy(tree):
    """A host-memory copy of every array: the next step overwrites the donated device buffers while
    the background writer still reads this copy (on CPU, np.asarray alone may alias them)."""
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _checkpoint_copy(tree):
    """What a checkpoint is written from: a host copy (`_host_copy`); with several processes, where
    no process holds the whole of a split array, a copy on the devices, split like the state, of
    which Orbax writes each process's parts (collectively)."""
    if jax.process_count() > 1:
        return jax.tree.map(lambda x: jnp.copy(x) if isinstance(x, jax.Array) else x, tree)
    return _host_copy(tree)


class _NoMetrics:
    """The metrics writer of processes other than 0: they compute the same numbers, one writes them."""

    def write(self, step, values) -> None:
        pass

    def close(self) -> None:
        pass


@contextlib.contextmanager
def _interrupt_after_binding():
    """Hold a Ctrl-C (SIGINT) that arrives inside the block and raise it once the block is done.
    The train step donates the state: between the call and binding its result, an interrupt would
    leave nothing holding the weights."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield   # not ours to manage (a custom handler, or off the main thread)
        return
    received = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def _write_back(model: nnx.Module, state: TrainState, mesh) -> None:
    """Put the latest weights into `model`, on one device (so that later inference does not run
    once per device). Skipped if a step failed after taking the state's buffers."""
    trainable, frozen = state.trainable, state.frozen
    if any(getattr(leaf, "is_deleted", lambda: False)() for leaf in jax.tree.leaves((trainable, frozen))):
        return
    if mesh is not None or jax.process_count() > 1:   # across processes every process gathers it all
        trainable, frozen = parallel.on_one_device((trainable, frozen))
    nnx.update(model, trainable, frozen)


def _prepare_run_dir(loop: LoopConfig) -> Checkpointer:
    ckpt = Checkpointer(loop.out_dir, keep=loop.keep_ckpts)
    existing = ckpt.latest_step()
    if existing is not None and not loop.resume:
        if not loop.overwrite:
            raise FileExistsError(
                f"{loop.out_dir} already holds checkpoints (latest step {existing}). Pass "
                "train.resume=true to continue that run, train.overwrite=true to replace it, or "
                "choose another train.out_dir.")
        ckpt.close()
        if parallel.is_main_process():
            clear_run_dir(loop.out_dir)   # checkpoints, tokenizer, metrics, TensorBoard files, adapter
        parallel.sync("jaxllm-clear-run-dir")
        ckpt = Checkpointer(loop.out_dir, keep=loop.keep_ckpts)
    return ckpt


def _check_model_config(saved: dict, current: dict, where) -> None:
    """Resume only onto the same model; meta["model"] is compared as a GPTConfig, so that a field
    added since (with its default) compares equal. How it is computed (COMPUTE_OPTIONS: remat,
    scan_layers) may change: e.g. turning remat on to resume a run that ran out of memory."""
    def as_config(meta):
        if meta.get("model") is None:
            return None
        cfg = GPTConfig.from_dict(meta["model"])
        return dataclasses.replace(cfg, **{f: getattr(GPTConfig, f) for f in COMPUTE_OPTIONS})
    if as_config(saved) != as_config(current):
        raise ValueError(
            f"cannot resume from {where}: its model config {saved.get('model')} differs from the "
            f"requested {current.get('model')}; use the same model settings or another out_dir")
