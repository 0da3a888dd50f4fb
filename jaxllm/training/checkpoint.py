"""Orbax checkpoints of a run: model weights, optimizer state and the JSON needed to rebuild it.

Layout: RUN_DIR/checkpoints/<step>/{model, train, meta}. Orbax writes each step to a temporary
directory and renames it when complete, so an interrupted save never looks like a checkpoint.
"model" is the full parameter tree (trainable and frozen together), so a sampler restores it without
knowing which subset a stage trained; "train" is the step and optimizer state; "meta" is JSON: model
config, training config, data description.
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxllm.peft.common import PeftParam

# Orbax logs every save at INFO; our progress bar already says when a checkpoint is written.
logging.getLogger("absl").setLevel(logging.WARNING)

CHECKPOINT_SUBDIR = "checkpoints"


class Checkpointer:
    def __init__(self, run_dir: str | os.PathLike, keep: int = 3, create: bool = True):
        self.directory = pathlib.Path(run_dir).absolute() / CHECKPOINT_SUBDIR
        if not create and not self.directory.is_dir():
            raise FileNotFoundError(
                f"no checkpoints in {run_dir} (expected {self.directory}); pass the out_dir of a "
                "training run")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=create,
            # Synchronous: the train step donates its state buffers, and a background writer
            # must never read a buffer the next step is overwriting.
            enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("model", "train", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, model_state: nnx.State, train_state: dict[str, Any], meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            model=ocp.args.StandardSave(nnx.to_pure_dict(model_state)),
            train=ocp.args.StandardSave(train_state),
            meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()

    def read_meta(self, step: int | None = None) -> dict:
        step = self._resolve(step)
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore_model(self, model_state: nnx.State, step: int | None = None) -> nnx.State:
        """Weights of `step` (default: latest) into a state shaped like `model_state`."""
        step = self._resolve(step)
        pure = nnx.to_pure_dict(model_state)
        target = jax.tree.map(_restore_target, pure)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            model=ocp.args.StandardRestore(target)))["model"]
        nnx.replace_by_pure_dict(model_state, restored)
        return model_state

    def restore_train(self, train_state: dict[str, Any], step: int | None = None) -> dict[str, Any]:
        step = self._resolve(step)
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, train_state)
        return self.manager.restore(step, args=ocp.args.Composite(
            train=ocp.args.StandardRestore(target)))["train"]

    def _resolve(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        elif step not in self.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; available: {self.all_steps()}")
        return step

    def close(self) -> None:
        self.manager.close()


def _restore_target(x) -> jax.ShapeDtypeStruct:
    """Shape/dtype (and placement) to restore into. Abstract leaves, which carry no placement, go to
    one device: otherwise Orbax would rebuild the saving run's data-parallel mesh, which may not
    exist here and would make every device run the same inference."""
    s = ocp.utils.to_shape_dtype_struct(x)
    if getattr(s, "sharding", None) is None:
        s = jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    return s


def _peft_model(meta: dict, run_dir):
    from jaxllm.peft.files import apply_peft
    from jaxllm.config import GPTConfig
    from jaxllm.training.finetune import load_base, same_base_weights, weights_fingerprint

    base = meta["base"]
    try:
        model, cfg, _ = load_base(base["path"], base.get("step"))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{run_dir} holds only adapter weights; its base model {base['path']} "
                                f"is needed too ({e})") from None
    if cfg != GPTConfig.from_dict(meta["model"]):  # fields added since take their defaults
        raise ValueError(f"the base model at {base['path']} is not the one {run_dir} was trained on "
                         f"(its config changed); restore that base or retrain")
    if not same_base_weights(base, weights_fingerprint(model)):
        raise ValueError(f"the base model at {base['path']} is not the one {run_dir} was trained on "
                         f"(same config, other weights); restore that base or retrain")
    return apply_peft(model, meta["peft"], f"{run_dir} metadata")


def load_checkpoint(run_dir: str | os.PathLike, step: int | None = None):
    """(model, config, tokenizer or None, meta) from a training run's directory: needs nothing else."""
    from jaxllm.config import GPTConfig
    from jaxllm.model import GPT
    from jaxllm.tokenizer import load_tokenizer

    ckpt = Checkpointer(run_dir, create=False)
    try:
        meta = ckpt.read_meta(step)
        cfg = GPTConfig.from_dict(meta["model"])
        if meta.get("base"):  # only the PEFT weights were saved: base + fresh PEFT, then restore those
            model = _peft_model(meta, run_dir)
            nnx.update(model, ckpt.restore_model(nnx.state(model, PeftParam), step))
        else:
            model = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
            graphdef, abstract = nnx.split(model)
            model = nnx.merge(graphdef, ckpt.restore_model(abstract, step))
    finally:
        ckpt.close()
    tok_dir = pathlib.Path(run_dir) / "tokenizer"
    tokenizer = load_tokenizer(tok_dir) if tok_dir.is_dir() else None
    return model, cfg, tokenizer, meta
