"""The one training loop: every stage (pretraining, SFT, reward, DPO, ...) runs through `train_loop`.

A stage hands it a model, a loss, a batch function of the step number and an evaluator; the loop
owns the jitted step, progress bar, metrics, periodic eval, checkpoints, the NaN stop and resume.
Batches and dropout keys are pure functions of (seed, step), so a resumed run repeats exactly the
steps an uninterrupted run would have taken.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from typing import Any, Callable

import jax
from flax import nnx
from tqdm.auto import tqdm

from jaxllm import parallel
from jaxllm.model import count_params
from jaxllm.training.checkpoint import Checkpointer
from jaxllm.training.metrics import MetricsWriter
from jaxllm.training.optim import OptimConfig, lr_schedule, make_optimizer
from jaxllm.training.perf import measure_matmul_peak, mfu
from jaxllm.training.step import TrainState, init_train_state, make_train_step


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    out_dir: str = "runs/default"
    batch_size: int = 12            # sequences per micro-batch
    grad_accum: int = 1             # micro-batches per optimizer step
    devices: int = 0                # data-parallel devices; 0: as many as split batch_size evenly
                                    # (on CPU one above parallel.CPU_DATA_PARALLEL_MAX_PARAMS trained)
    max_iters: int = 2000
    eval_interval: int = 250        # 0: evaluate only at the end
    log_interval: int = 10
    ckpt_interval: int = 500        # 0: checkpoint only at the end
    keep_ckpts: int = 3
    seed: int = 1337
    resume: bool = False            # continue from the latest checkpoint in out_dir, if any
    overwrite: bool = False         # delete existing checkpoints in out_dir instead of refusing
    peak_flops: float | None = None  # for MFU; None measures an fp32 matmul on this device
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "max_iters", "log_interval", "keep_ckpts"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be positive, got {getattr(self, name)}")


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


def train_loop(model: nnx.Module, loss_fn, batch_fn: Callable[[int], Any], *,
               optim: OptimConfig, loop: LoopConfig, meta: dict,
               make_eval: Callable[[Any], Callable[[TrainState], dict]] | None = None,
               trainable=nnx.Param, tokens_per_step: int, flops_per_token: float,
               on_start: Callable[[], None] | None = None, checkpoint_frozen: bool = True) -> TrainResult:
    """Train `model` (updated in place and returned) for loop.max_iters optimizer steps.

    If the run stops early (KeyboardInterrupt, NonFiniteLossError), `model` still holds the
    latest weights in memory (a non-finite step is never applied) before the error propagates.

    batch_fn(step) returns the batch for that step with a leading (grad_accum,) axis.
    make_eval(graphdef, mesh) returns evaluate(state) -> {"val_loss": ...}; `mesh` is the
    data-parallel mesh the state lives on (None on one device).
    on_start() runs once the run directory is known good (e.g. to save the tokenizer there).
    With checkpoint_frozen=False, checkpoints hold only the `trainable` weights (LoRA, adapters):
    the frozen base is rebuilt from where `meta["base"]` says it came from.
    """
    optimizer = make_optimizer(optim)
    mesh = parallel.data_mesh(loop.batch_size, loop.devices, trainable_params=count_params(model, trainable))
    ckpt = _prepare_run_dir(loop)
    start = 0
    if loop.resume and ckpt.latest_step() is not None:
        start = ckpt.latest_step()
        _check_resume_compatible(ckpt.read_meta(start), meta, ckpt.directory)
        # nnx.state() returns a copy: the restored weights must be written back into the model.
        saved = nnx.state(model) if checkpoint_frozen else nnx.state(model, trainable)
        nnx.update(model, jax.device_put(ckpt.restore_model(saved, start)))
    elif loop.resume:
        print(f"train.resume: {ckpt.directory} holds no checkpoint yet; starting from step 0")
    graphdef, state = init_train_state(model, optimizer, trainable)
    if start:
        restored = ckpt.restore_train({"step": state.step, "opt_state": state.opt_state}, start)
        restored = jax.device_put(restored)  # uncommitted like a fresh state: no recompilation
        state = state._replace(step=restored["step"], opt_state=restored["opt_state"])
    if mesh is not None:  # placed once; the step's outputs keep this placement
        state = jax.device_put(state, parallel.replicated(mesh))
    if on_start is not None:
        on_start()

    step_fn = make_train_step(graphdef, loss_fn, optimizer, lr_schedule(optim), mesh)
    evaluate = make_eval(graphdef, mesh) if make_eval is not None else None
    peak = loop.peak_flops or measure_matmul_peak()
    writer = MetricsWriter(loop.out_dir, tensorboard=loop.tensorboard,
                           resume_step=start if loop.resume else None)
    base_key = jax.random.key(loop.seed)

    losses: dict[int, float] = {}
    evals: dict[int, dict[str, float]] = {}
    pending: list[tuple[int, dict]] = []   # dispatched steps whose metrics are not yet read
    window = {"steps": 0, "seconds": 0.0}
    last_eval = "-"
    bar = tqdm(total=loop.max_iters, initial=start, disable=not loop.progress, desc="train",
               dynamic_ncols=True)
    loop_start = time.perf_counter()
    compile_seconds = eval_seconds = checkpoint_seconds = 0.0
    tick = time.perf_counter()

    def drain(keep_last: int = 0) -> None:
        """Read metrics of finished steps; stop on the first non-finite loss."""
        while len(pending) > keep_last:
            s, m = pending.pop(0)
            m = jax.device_get(m)
            if not bool(m["finite"]):
                good = ckpt.latest_step()
                raise NonFiniteLossError(
                    f"loss is {float(m['loss'])} (grad norm {float(m['grad_norm'])}) at step {s}; "
                    f"training stopped. The last good checkpoint "
                    f"{'is step ' + str(good) if good is not None else 'does not exist yet'} in "
                    f"{ckpt.directory} and is untouched. Lower optim.learning_rate, keep "
                    f"optim.grad_clip on, or use float32 compute, then resume.")
            losses[s] = float(m["loss"])
            if (s + 1) % loop.log_interval == 0 or s + 1 == loop.max_iters:
                tokens_per_s = tokens_per_step * window["steps"] / max(window["seconds"], 1e-9)
                record = {"loss": losses[s], "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
                          "tokens_per_s": tokens_per_s, "mfu": mfu(flops_per_token, tokens_per_s, peak)}
                writer.write(s + 1, record)
                bar.set_postfix(loss=f"{losses[s]:.4f}", val=last_eval, tok_s=f"{tokens_per_s:,.0f}",
                                mfu=f"{record['mfu']:.1%}", refresh=False)
                window["steps"], window["seconds"] = 0, 0.0

    try:
        for it in range(start, loop.max_iters):
            batch = batch_fn(it) if mesh is None else parallel.shard_batch(batch_fn(it), mesh, 1)
            state, metrics = step_fn(state, batch, base_key)
            pending.append((it, metrics))
            drain(keep_last=1)  # one step stays in flight so the host never waits idle
            now = time.perf_counter()
            if it == start:
                jax.block_until_ready(metrics)
                now = time.perf_counter()
                compile_seconds = now - tick  # first step: compilation dominates; not a throughput sample
            else:
                window["steps"] += 1
                window["seconds"] += now - tick
            bar.update(1)
            done = it + 1
            is_last = done == loop.max_iters
            if evaluate is not None and (is_last or (loop.eval_interval and done % loop.eval_interval == 0)):
                drain()
                t_eval = time.perf_counter()
                result = {k: float(v) for k, v in evaluate(state).items()}
                evals[done] = result
                writer.write(done, result)
                last_eval = f"{next(iter(result.values())):.4f}"
                bar.set_postfix(loss=f"{losses[it]:.4f}", val=last_eval, refresh=True)
                eval_seconds += time.perf_counter() - t_eval
            if is_last or (loop.ckpt_interval and done % loop.ckpt_interval == 0):
                drain()  # never checkpoint a state whose loss we have not checked
                t_ckpt = time.perf_counter()
                model_state = (nnx.merge_state(state.trainable, state.frozen) if checkpoint_frozen
                               else state.trainable)
                ckpt.save(done, model_state, {"step": state.step, "opt_state": state.opt_state}, meta)
                checkpoint_seconds += time.perf_counter() - t_ckpt
            tick = time.perf_counter()
        drain()
    finally:  # one place releases the bar, the metric files and the checkpoint manager
        bar.close()
        writer.close()
        ckpt.close()
        # Also when stopped (Ctrl-C, a non-finite loss): the step donates the buffers the model
        # was built on, so the model is usable again only once it holds the latest state.
        _write_back(model, state, mesh)
    train_seconds = time.perf_counter() - loop_start - eval_seconds - checkpoint_seconds
    return TrainResult(model, loop.max_iters, losses, evals, train_seconds, compile_seconds,
                       eval_seconds, checkpoint_seconds)


def _write_back(model: nnx.Module, state: TrainState, mesh) -> None:
    """Put the latest weights into `model`, on one device (so that later inference does not run
    once per device). Skipped if a step failed after taking the state's buffers."""
    trainable, frozen = state.trainable, state.frozen
    if any(getattr(leaf, "is_deleted", lambda: False)() for leaf in jax.tree.leaves((trainable, frozen))):
        return
    if mesh is not None:
        trainable, frozen = jax.device_put((trainable, frozen), jax.local_devices()[0])
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
        shutil.rmtree(ckpt.directory)
        ckpt = Checkpointer(loop.out_dir, keep=loop.keep_ckpts)
    return ckpt


def _model_config(meta: dict):
    """meta["model"] as a GPTConfig, so that a field added since (with its default) compares equal."""
    from jaxllm.config import GPTConfig

    return GPTConfig.from_dict(meta["model"]) if meta.get("model") is not None else None


def _check_resume_compatible(saved: dict, current: dict, where) -> None:
    if _model_config(saved) != _model_config(current):
        raise ValueError(
            f"cannot resume from {where}: its model config {saved.get('model')} differs from the "
            f"requested {current.get('model')}; use the same model settings or another out_dir")
    for key, what in (("peft", "peft.* settings"), ("base", "base model (init.path / init.step)")):
        was, now = saved.get(key), json.loads(json.dumps(current.get(key)))  # as the JSON meta holds it
        recorded_base = fingerprint = None
        if key == "base" and was and now:  # the weights' fingerprint: compared last, with a tolerance
            recorded_base, fingerprint = was, now.get("fingerprint")
            was, now = ({k: v for k, v in b.items() if k != "fingerprint"} for b in (was, now))
        if was != now:
            raise ValueError(
                f"cannot resume from {where}: its {what} {was} differ from the requested "
                f"{now}; resume with the same settings or choose another train.out_dir")
        if recorded_base is not None:
            from jaxllm.training.finetune import same_base_weights

            if not same_base_weights(recorded_base, fingerprint):
                raise ValueError(f"cannot resume from {where}: the base model at {now['path']} now holds "
                                 f"other weights than the run was trained on; restore that base or "
                                 f"choose another train.out_dir")

