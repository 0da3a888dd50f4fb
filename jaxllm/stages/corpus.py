"""A stage's text corpus: the prepared token dataset (cached under data_cache/ unless a
dataset_dir is given), the training batches drawn from it and the validation loss over it."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from jaxllm.data import TokenDataset, prepare
from jaxllm.losses import IGNORE_INDEX
from jaxllm.data.sources import SHAKESPEARE, describe_source
from jaxllm.stages.sections import DataConfig
from jaxllm.training.loop import LoopConfig
from jaxllm.training.step import lm_loss_fn, make_eval_step, mask_rows

# What an unset data.* key means when a dataset has to be prepared.
PREPARE_DEFAULTS = {"source": SHAKESPEARE, "tokenizer": "char", "val_fraction": 0.1}
# Fill of the extra rows that let a batch use every device: (x, y) rows whose targets count for nothing.
LM_PAD = (0, IGNORE_INDEX)
_COMPARED = ("source", "tokenizer", "vocab_size", "val_fraction", "text_key")


def _requested(data: DataConfig, tokenizer: str | None) -> dict:
    """The dataset settings this config asks for explicitly (None: not asked)."""
    asked = {"source": None if data.source is None else describe_source(data.source),
             "tokenizer": tokenizer, "vocab_size": data.vocab_size, "val_fraction": data.val_fraction,
             "text_key": data.text_key}
    if asked["tokenizer"] not in (None, "bpe"):
        asked["vocab_size"] = None   # only a BPE trained here has a requested size
    return {k: v for k, v in asked.items() if v is not None}


def _recorded(meta: dict) -> dict:
    """The settings a dataset was prepared with (datasets from before they were recorded: what
    meta.json says of itself; a tokenizer given by path was recorded only by its kind then)."""
    if isinstance(meta.get("settings"), dict):
        return meta["settings"]
    return {"source": meta.get("source"), "tokenizer": meta.get("tokenizer"),
            "vocab_size": meta.get("vocab_size") if meta.get("tokenizer") == "bpe" else None,
            "val_fraction": meta.get("val_fraction"), "text_key": meta.get("text_key"), "_legacy": True}


def _differences(asked: dict, recorded: dict) -> list[str]:
    out = []
    for key in _COMPARED:
        if key not in asked:
            continue
        if key == "tokenizer" and recorded.get("_legacy") and asked[key] not in ("char", "bpe", "gpt2"):
            continue
        if asked[key] != recorded.get(key):
            out.append(f"data.{key}={recorded.get(key)!r} (asked: {asked[key]!r})")
    return out


def default_dataset_dir(source: str, tokenizer: str, vocab_size: int | None) -> pathlib.Path:
    parts = [source, tokenizer] + ([f"v{vocab_size}"] if tokenizer == "bpe" and vocab_size else [])
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in "-".join(map(str, parts)))
    return pathlib.Path("data_cache") / name.strip("_")


def load_or_prepare(data: DataConfig, tokenizer: str | None = None) -> TokenDataset:
    """The dataset `data` describes. `tokenizer` (default data.tokenizer) is what the stage asks for.

    An explicit data.dataset_dir that exists is used as it is, after checking that every data.* key
    that is set matches how it was prepared (an error names the keys that differ). The default
    cache directory is prepared again when its settings differ from the request.

    With several processes (jax.distributed), process 0 prepares a missing dataset alone and the
    others then find it: preparing into one directory at once, they would race for its name. (A
    process whose host does not share process 0's filesystem prepares its own copy after that.)"""
    import jax

    from jaxllm import parallel
    if jax.process_count() == 1:
        return _load_or_prepare(data, tokenizer)
    ds = error = None
    if parallel.is_main_process():
        try:
            ds = _load_or_prepare(data, tokenizer)
        except Exception as e:   # raised after the sync: the others, not left waiting, meet it too
            error = e
    parallel.sync("jaxllm-prepare-dataset")
    if error is not None:
        raise error
    return ds if ds is not None else _load_or_prepare(data, tokenizer)


def _load_or_prepare(data: DataConfig, tokenizer: str | None) -> TokenDataset:
    tokenizer = tokenizer if tokenizer is not None else data.tokenizer
    asked = _requested(data, tokenizer)
    full = {**PREPARE_DEFAULTS, **asked}
    if data.dataset_dir:
        path = pathlib.Path(data.dataset_dir).expanduser()
        if (path / "meta.json").is_file():
            ds = TokenDataset(path)
            diff = _differences(asked, _recorded(ds.meta))
            if diff:
                raise ValueError(
                    f"data.dataset_dir {path} was prepared with {', '.join(diff)}; choose another "
                    f"data.dataset_dir, delete it to prepare it again, or leave those keys unset to "
                    f"use the dataset as it is")
            return ds
    else:
        path = default_dataset_dir(full["source"], full["tokenizer"], full.get("vocab_size"))
        if (path / "meta.json").is_file():
            ds = TokenDataset(path)
            diff = _differences(full, _recorded(ds.meta))
            if not diff:
                return ds
            print(f"the cached dataset {path} was prepared with {', '.join(diff)}; preparing it again")
    print(f"preparing {full['source']!r} with the {full['tokenizer']!r} tokenizer into {path} ...")
    prepare(full["source"], path, tokenizer=full["tokenizer"], vocab_size=full.get("vocab_size"),
            val_fraction=full["val_fraction"], text_key=data.text_key, data_dir=data.tfds_data_dir)
    return TokenDataset(path)


def make_val_evaluator(ds: TokenDataset, block_size: int, batch_size: int, max_batches: int | None):
    """make_eval(graphdef, mesh) for the loop: the next-token loss over the val split's windows."""
    def make_eval(graphdef, mesh=None):
        eval_step = make_eval_step(graphdef, lm_loss_fn, mesh)

        def evaluate(state):
            total, count = 0.0, 0.0
            for x, y, mask in ds.eval_windows("val", block_size, batch_size, max_batches):
                s, c = eval_step(state, (x, mask_rows(y, mask)))
                total, count = total + s, count + c
            return {"val_loss": total / count}
        return evaluate
    return make_eval


def corpus_batches(ds: TokenDataset, loop: LoopConfig, T: int):
    """batch_fn(step, rows=None) for a next-token stage: a pure function of (seed, step) with the
    gradient-accumulation axis in front; `rows` (of the B rows of each micro-batch) builds only
    those, as the same rows of the whole batch (see jaxllm.training.loop.train_loop)."""
    B, A = loop.batch_size, loop.grad_accum

    def batch_fn(step, rows=None):
        # micro-batch a holds rows a*B .. a*B + B - 1 of the sampled B*A
        which = None if rows is None else np.arange(A * B).reshape(A, B)[:, rows].ravel()
        x, y = ds.sample_batch("train", loop.seed, step, B * A, T, rows=which)
        return x.reshape(A, -1, T), y.reshape(A, -1, T)

    return batch_fn


def with_dataset_dir(config, ds: TokenDataset):
    """`config` with data.dataset_dir set to the dataset's absolute path, as the run records it: a
    resumed run finds its data wherever it is started from."""
    return dataclasses.replace(config, data=dataclasses.replace(config.data, dataset_dir=str(ds.path.absolute())))
