"""A tokenized corpus on disk and the batches drawn from it.

``prepare`` turns a text source into ``out_dir/{train.bin, val.bin, meta.json, tokenizer/}``;
``TokenDataset`` memory-maps it. A training batch is a pure function of (seed, step), so a
resumed run sees the same batches without any saved iterator state.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import uuid
from functools import cached_property
from pathlib import Path
from typing import Iterator

import numpy as np

from jaxllm.data.sources import Source, describe_source, load_text
from jaxllm.fileio import replace_dir
from jaxllm.tokenizer import BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer

META_NAME = "meta.json"
SPLITS = ("train", "val")
DATASET_ENTRIES = {"train.bin", "val.bin", META_NAME, "tokenizer"}
# Mixed into the sampler's seed so train and val batches at the same step are unrelated.
_SPLIT_CODE = {"train": 0, "val": 1}


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _resolve_tokenizer(tokenizer, text: str, vocab_size: int | None) -> Tokenizer:
    if tokenizer == "char":
        return CharTokenizer.from_text(text)
    if tokenizer == "bpe":
        if vocab_size is None:
            raise ValueError("tokenizer='bpe' is trained on the corpus: pass vocab_size=")
        return BPETokenizer.train(text, vocab_size)
    return load_tokenizer(tokenizer)


def prepare_settings(source: Source, tokenizer, vocab_size: int | None, val_fraction: float,
                     text_key: str | None) -> dict:
    """The request a dataset is prepared from, as `prepare` records it in meta.json["settings"]."""
    return {"source": describe_source(source),
            "tokenizer": tokenizer if isinstance(tokenizer, str) else getattr(tokenizer, "kind", str(tokenizer)),
            "vocab_size": vocab_size if tokenizer == "bpe" else None,
            "val_fraction": val_fraction, "text_key": text_key}


def prepare(
    source: Source,
    out_dir,
    tokenizer="char",
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    text_key: str | None = None,
    data_dir=None,
) -> Path:
    """Tokenize a text source into out_dir and return out_dir.

    ``tokenizer`` is "char" or "bpe" (built from this corpus), a Tokenizer, or anything
    ``load_tokenizer`` accepts ("gpt2", a saved tokenizer directory, a tokenizer.json).
    The first (1 - val_fraction) of the token stream is train, the rest val.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be strictly between 0 and 1, got {val_fraction}")
    out_dir = Path(os.path.abspath(out_dir))  # absolute: "." must still have a name for its siblings
    if out_dir.is_file():
        raise FileExistsError(f"{out_dir} is a file; prepare needs a directory path")
    if out_dir.is_dir():
        strangers = sorted(p.name for p in out_dir.iterdir() if p.name not in DATASET_ENTRIES)
        if strangers:
            raise FileExistsError(
                f"{out_dir} exists and holds files that are not a jaxllm dataset ({', '.join(strangers[:5])}); "
                f"choose another out_dir, prepare would replace the whole directory"
            )

    text = load_text(source, text_key=text_key, data_dir=data_dir)
    tok = _resolve_tokenizer(tokenizer, text, vocab_size)
    # a corpus's literal special tokens (e.g. <|endoftext|> between documents) are its boundaries
    ids = np.asarray(tok.encode(text, allow_special=True), dtype=np.int64)
    n_special = tok.count_special(text)
    if n_special:
        print(f"{describe_source(source)}: {n_special:,} special-token texts "
              f"({', '.join(tok.special_tokens)}) read as special tokens")
    n_vocab = max(tok.vocab_size, int(ids.max()) + 1 if ids.size else 0)
    dtype = token_dtype(n_vocab)

    n_train = int(len(ids) * (1.0 - val_fraction))
    splits = {"train": ids[:n_train], "val": ids[n_train:]}
    for name, tokens in splits.items():
        if len(tokens) < 2:
            raise ValueError(
                f"text source {describe_source(source)!r} gives {len(ids)} tokens, so the {name} split has "
                f"only {len(tokens)} (at least 2 are needed for one next-token pair); use more text "
                f"or a different val_fraction"
            )

    meta = {
        "format": "jaxllm.tokens.v1",
        "dtype": dtype.name,
        "vocab_size": int(n_vocab),
        "train_tokens": int(len(splits["train"])),
        "val_tokens": int(len(splits["val"])),
        "val_fraction": val_fraction,
        "source": describe_source(source),
        "text_key": text_key,
        "corpus_chars": len(text),
        "tokenizer": tok.kind,
        "eos_id": tok.eos_id,
        "special_tokens_in_text": n_special,
        "pad_id": tok.pad_id,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # what was asked for, so a cached dataset is reused only for the same request
        "settings": prepare_settings(source, tokenizer, vocab_size, val_fraction, text_key),
    }

    # Everything is written into a hidden sibling and renamed at the end, so out_dir is
    # either the old complete dataset, absent, or the new complete one: never half of one.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp_dir.mkdir()
    try:
        for name, tokens in splits.items():
            tokens.astype(dtype).tofile(tmp_dir / f"{name}.bin")
        tok.save(tmp_dir / "tokenizer")
        (tmp_dir / META_NAME).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        replace_dir(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


class TokenDataset:
    """A prepared token corpus, memory-mapped read-only."""

    def __init__(self, out_dir):
        self.path = Path(out_dir)
        meta_path = self.path / META_NAME
        if not meta_path.is_file():
            state = "does not exist" if not self.path.exists() else f"has no {META_NAME} (not prepared, or preparation did not finish)"
            raise FileNotFoundError(
                f"token dataset {self.path} {state}; run `jaxllm prepare` (jaxllm.data.prepare) to create it"
            )
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        dtype = np.dtype(self.meta["dtype"])
        self._splits = {}
        for name in SPLITS:
            bin_path = self.path / f"{name}.bin"
            expected = int(self.meta[f"{name}_tokens"])
            size = bin_path.stat().st_size if bin_path.is_file() else -1
            if size != expected * dtype.itemsize:
                raise ValueError(
                    f"{bin_path} should hold {expected} {dtype.name} tokens ({expected * dtype.itemsize} bytes) "
                    f"but {'is missing' if size < 0 else f'has {size} bytes'}; run `jaxllm prepare` again"
                )
            self._splits[name] = np.memmap(bin_path, dtype=dtype, mode="r")

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def train(self) -> np.memmap:
        return self._splits["train"]

    @property
    def val(self) -> np.memmap:
        return self._splits["val"]

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.path / "tokenizer")

    def split(self, name: str) -> np.memmap:
        if name not in self._splits:
            raise ValueError(f"unknown split {name!r}; splits are {', '.join(SPLITS)}")
        return self._splits[name]

    def _check_split(self, name: str, block_size: int) -> np.memmap:
        tokens = self.split(name)
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if len(tokens) < block_size + 1:
            raise ValueError(
                f"the {name} split of {self.path} has {len(tokens)} tokens, fewer than block_size + 1 = "
                f"{block_size + 1} needed for one window; use a smaller block_size or more data"
            )
        return tokens

    def check_block_size(self, block_size: int) -> None:
        for name in SPLITS:
            self._check_split(name, block_size)

    def sample_batch(self, split: str, seed: int, step: int, batch_size: int, block_size: int,
                     rows=None) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) int32 of shape (batch_size, block_size), y = x shifted by one token.

        A pure function of (seed, step): windows start uniformly in [0, len - block_size - 1].
        `rows` (a slice or an integer index array into the batch_size rows) builds only those rows,
        equal to the same rows of the whole batch: each process of a multi-process run reads just
        the windows its devices train on.
        """
        tokens = self._check_split(split, block_size)
        rng = np.random.default_rng([seed, step, _SPLIT_CODE[split]])
        # every start is drawn, whatever `rows` keeps, so that row i is the same in every process
        starts = rng.integers(0, len(tokens) - block_size, size=batch_size)
        if rows is not None:
            starts = starts[rows]
        # One gather of block_size + 1 tokens per row; the memmap reads only those pages.
        windows = tokens[starts[:, None] + np.arange(block_size + 1)].astype(np.int32)
        return np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])

    def num_eval_windows(self, split: str, block_size: int) -> int:
        return (len(self._check_split(split, block_size)) - 1) // block_size

    def eval_windows(
        self, split: str, block_size: int, batch_size: int, max_batches: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(x, y, mask) batches over non-overlapping full windows of the split, in order.

        Window i is x = tokens[i*T:(i+1)*T], y = tokens[i*T+1:(i+1)*T+1]. The last batch is
        padded with zero rows, mask (batch_size,) False, so a jitted eval sees one shape.
        """
        tokens = self._check_split(split, block_size)
        n_windows = (len(tokens) - 1) // block_size
        offsets = np.arange(block_size + 1)
        for batch_index, first in enumerate(range(0, n_windows, batch_size)):
            if max_batches is not None and batch_index >= max_batches:
                return
            rows = min(batch_size, n_windows - first)
            windows = np.zeros((batch_size, block_size + 1), dtype=np.int32)
            starts = (first + np.arange(rows)) * block_size
            windows[:rows] = tokens[starts[:, None] + offsets]
            mask = np.arange(batch_size) < rows
            yield np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:]), mask

    def __repr__(self) -> str:
        return (
            f"TokenDataset({str(self.path)!r}, vocab_size={self.vocab_size}, "
            f"train={len(self.train)}, val={len(self.val)}, tokenizer={self.meta.get('tokenizer')!r})"
        )
