"""What a run directory (train.out_dir) holds, and the two writes the loop makes outside Orbax.

    RUN_DIR/checkpoints/<step>/   Orbax checkpoints (jaxllm.training.checkpoint)
    RUN_DIR/tokenizer/            the tokenizer of the run's data, so the run samples on its own
    RUN_DIR/metrics.jsonl         one JSON record per log interval / eval
    RUN_DIR/tensorboard/          the same curves for TensorBoard
    RUN_DIR/adapter/              a PEFT run's adapter files, written at its end

Rebuilding a model from a run (a PEFT run's base included) is `jaxllm.runs`.
"""

from __future__ import annotations

import os
import pathlib
import shutil

from jaxllm.fileio import new_dir

CHECKPOINTS = "checkpoints"
TOKENIZER = "tokenizer"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
ADAPTER = "adapter"
# Checkpoints go first: a directory cleared halfway is never a resumable run with stale parts.
RUN_ENTRIES = (CHECKPOINTS, TOKENIZER, METRICS, TENSORBOARD, ADAPTER)


def clear_run_dir(out_dir: str | os.PathLike) -> None:
    """Delete everything a previous run left in `out_dir` (train.overwrite=true); other files stay."""
    root = pathlib.Path(out_dir)
    for name in RUN_ENTRIES:
        path = root / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def write_tokenizer(tokenizer, out_dir: str | os.PathLike) -> pathlib.Path:
    """Save `tokenizer` as RUN_DIR/tokenizer in one swap: a reader sees the old or the new one whole."""
    # absolute: new_dir expands a leading "~", which the checkpoints and metrics beside it do not
    target = pathlib.Path(out_dir).absolute() / TOKENIZER
    with new_dir(target, overwrite=True) as tmp:
        tokenizer.save(tmp)
    return target
