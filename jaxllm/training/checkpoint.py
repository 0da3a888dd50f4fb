"""Orbax checkpoints of a run: model weights, optimizer state and the JSON needed to rebuild it.
(Rebuilding a model from a run directory, a PEFT run's base included, is `jaxllm.runs`.)

Layout: RUN_DIR/checkpoints/<step>/{model, train, meta}. Orbax writes each step to a temporary
directory and renames it when complete, so an interrupted save never looks like a checkpoint. A step
past `keep` leaves the same way: renamed into checkpoints/.deleted/ first, deleted from there, so a
run killed while deleting one never leaves a listed step that does not restore.
"model" is the full parameter tree (trainable and frozen together), so a sampler restores it without
knowing which subset a stage trained; "train" is the step and optimizer state; "meta" is JSON: model
config, training config, data description.
"""

from __future__ import annotations

import os
import pathlib
import shutil
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxllm.parallel import path_name
from jaxllm.training.rundir import CHECKPOINTS as CHECKPOINT_SUBDIR


def _import_orbax():
    """orbax logs through absl while it is imported, and absl's first log calls logging.basicConfig():
    a handler on the user's root logger, after which every library's debug logger prints. Importing
    jaxllm must leave logging as it was: the handler orbax's import added is taken off again."""
    import logging

    root = logging.getLogger()
    before = list(root.handlers)
    import orbax.checkpoint as orbax_checkpoint
    for handler in [h for h in root.handlers if h not in before]:
        root.removeHandler(handler)
    return orbax_checkpoint


ocp = _import_orbax()

# Where Orbax moves a checkpoint past max_to_keep (its todelete_subdir: one rename), to be deleted
# from there. Not a step name, so never listed. (Deleted in place, a step killed halfway through its
# deletion stayed listed, complete by name, with files missing: "Truncated Zstd-compressed stream".)
DELETED = ".deleted"


class Checkpointer:
    def __init__(self, run_dir: str | os.PathLike, keep: int = 3, create: bool = True):
        self.directory = pathlib.Path(run_dir).absolute() / CHECKPOINT_SUBDIR
        if os.sep == "/" and "\\" in str(self.directory):
            # TensorStore, which writes the arrays, reads "\" as a folder separator: the arrays would
            # land in another folder and the checkpoint, complete in name, would never restore
            raise ValueError(f"the run directory {str(run_dir)!r} has a backslash in its path, where "
                             f"checkpoints cannot be written or read; choose a train.out_dir without one")
        if not create and not self.directory.is_dir():
            raise FileNotFoundError(
                f"no checkpoints in {run_dir} (expected {self.directory}); pass the out_dir of a "
                "training run")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=create,
            # Written in the background: `save` is given host copies (the loop's), never the
            # device buffers the next train step donates and overwrites.
            enable_async_checkpointing=True, todelete_subdir=DELETED)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "model": ocp.StandardCheckpointHandler(), "train": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler()})
        self._writer = create and jax.process_index() == 0   # with several processes, process 0 deletes
        self._purge()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, model_state: nnx.State, train_state: dict[str, Any], meta: dict) -> None:
        """Start writing checkpoint `step`; it appears (complete) once written, in the background.
        Pass host arrays or arrays no later computation donates; `close` or `wait` finishes it."""
        self._purge()
        self.manager.save(step, args=ocp.args.Composite(
            model=ocp.args.StandardSave(nnx.to_pure_dict(model_state)),
            train=ocp.args.StandardSave(train_state),
            meta=ocp.args.JsonSave(meta)))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def read_meta(self, step: int | None = None) -> dict:
        step = self._resolve(step)
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore_model(self, model_state: nnx.State, step: int | None = None, shardings=None) -> nnx.State:
        """Weights of `step` (default: latest) into a state shaped like `model_state`.

        Each array is restored where `shardings` (a tree of Shardings shaped like `model_state`, e.g.
        `jaxllm.parallel.state_shardings(model_state, mesh)`) says, whatever mesh wrote the
        checkpoint: Orbax reads each device's part of the array straight onto that device (every
        process its own, on a mesh spanning processes). Default: where `model_state`'s arrays are (an
        abstract leaf with no placement: one device)."""
        step = self._resolve(step)
        if shardings is not None:
            model_state = _placed_like(model_state, shardings)
        pure = nnx.to_pure_dict(model_state)
        target = jax.tree.map(_restore_target, pure)
        target, fix = _earlier_layouts(target, self._stored_shapes(step, "model"))
        restored = self.manager.restore(step, args=ocp.args.Composite(
            model=ocp.args.StandardRestore(target)))["model"]
        nnx.replace_by_pure_dict(model_state, fix(restored))
        return model_state

    def restore_train(self, train_state: dict[str, Any], step: int | None = None,
                      shardings=None) -> dict[str, Any]:
        """Step and optimizer state of `step` shaped like `train_state`, placed as `shardings`
        (shaped like `train_state`) says, or else where `train_state`'s arrays are."""
        step = self._resolve(step)
        if shardings is not None:
            train_state = _placed_like(train_state, shardings)
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, train_state)
        target, fix = _earlier_layouts(target, self._stored_shapes(step, "train"))
        return fix(self.manager.restore(step, args=ocp.args.Composite(
            train=ocp.args.StandardRestore(target)))["train"])

    def _stored_shapes(self, step: int, item: str) -> dict[str, tuple]:
        """Shape of every array of `item` as checkpoint `step` stores it, by dotted path."""
        tree = self.manager.item_metadata(step)[item]
        tree = getattr(tree, "tree", tree)
        return {path_name(path): tuple(leaf.shape) for path, leaf in
                jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
                if hasattr(leaf, "shape")}

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
        self.manager.wait_until_finished()
        self.manager.close()
        self._purge()

    def _purge(self) -> None:
        """Delete the checkpoints Orbax has moved out of the steps (a writer's job; entry by entry,
        as Orbax may be moving another one in)."""
        deleted = self.directory / DELETED
        if self._writer and deleted.is_dir():
            for path in deleted.iterdir():
                shutil.rmtree(path, ignore_errors=True)


# Arrays whose layout changed, by the suffix of their path: a checkpoint written before the change
# stores the old shape, read as it is and reshaped (same values, same order). c_attn went from
# (D, 3D) to (D, 3, D) so that tensor parallelism splits it by heads (jaxllm.model.Linear).
_RESHAPED = ("attn.c_attn.kernel", "attn.c_attn.bias")


def _earlier_layouts(target, stored: dict[str, tuple]):
    """(target, fix): `target` with each array stored in an earlier layout (`_RESHAPED`) asked for in
    its stored shape, and fix(restored) reshaping those back into the target's shape and placement."""
    changed = {}

    def ask(path, want):
        name = path_name(path)
        have = stored.get(name)
        if (have is None or have == tuple(want.shape) or not name.endswith(_RESHAPED)
                or int(np.prod(have)) != int(np.prod(want.shape))):
            return want
        changed[name] = want
        sharding = want.sharding
        if isinstance(sharding, jax.sharding.NamedSharding):   # the old shape: whole on each device
            sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        return jax.ShapeDtypeStruct(have, want.dtype, sharding=sharding)

    target = jax.tree_util.tree_map_with_path(ask, target)

    def fix(restored):
        if not changed:
            return restored
        def back(path, x):
            want = changed.get(path_name(path))
            if want is None:
                return x
            x = x.reshape(want.shape)
            return x if want.sharding is None else jax.device_put(x, want.sharding)
        return jax.tree_util.tree_map_with_path(back, restored)
    return target, fix


def _placed_like(tree, shardings):
    """Abstract arrays shaped like `tree`'s, placed by `shardings` (a tree of the same structure)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


def _restore_target(x) -> jax.ShapeDtypeStruct:
    """Shape/dtype (and placement) to restore into. Abstract leaves, which carry no placement, go to
    one device: otherwise Orbax would rebuild the saving run's data-parallel mesh, which may not
    exist here and would make every device run the same inference."""
    s = ocp.utils.to_shape_dtype_struct(x)
    if getattr(s, "sharding", None) is None:
        s = jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    return s
