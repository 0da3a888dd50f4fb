"""Reading Hugging Face weight files without executing anything they contain.

`open_weights(path)` returns {tensor name: loader}, where each loader reads one tensor as a numpy
array when called, so converting a large checkpoint holds one source tensor at a time next to the
model rather than the whole file.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Callable

import numpy as np

# In the order we prefer them when a directory holds more than one.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")

Loader = Callable[[], np.ndarray]


class HFCheckpointError(ValueError):
    """A Hugging Face checkpoint that jaxllm cannot (or will not) read; the message says why."""


def find_weights(directory: Path) -> Path:
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    raise HFCheckpointError(
        f"{directory} holds no weights: expected one of {', '.join(WEIGHT_FILES)}; point from_hf at a "
        f"directory written by save_pretrained (or by jaxllm.to_hf)")


def open_weights(path: Path) -> dict[str, Loader]:
    name = path.name
    if name.endswith(".index.json"):
        return _open_sharded(path)
    if name.endswith(".safetensors"):
        return _open_safetensors(path)
    if name.endswith((".bin", ".pt", ".pth")):
        return _open_torch_pickle(path)
    raise HFCheckpointError(
        f"{path}: unknown weight file type; expected .safetensors, .bin or a sharded *.index.json")


def _open_sharded(index_path: Path) -> dict[str, Loader]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise HFCheckpointError(f"{index_path} is not a shard index with a 'weight_map' ({e})") from e
    shards: dict[str, dict[str, Loader]] = {}
    loaders = {}
    for tensor, shard in weight_map.items():
        if shard not in shards:
            shard_path = index_path.parent / shard
            if not shard_path.is_file():
                raise HFCheckpointError(f"{index_path} lists shard {shard} for {tensor}, but {shard_path} is missing")
            shards[shard] = open_weights(shard_path)
        if tensor not in shards[shard]:
            raise HFCheckpointError(f"{index_path} says {tensor} is in {shard}, but that shard lacks it")
        loaders[tensor] = shards[shard][tensor]
    return loaders


def _open_safetensors(path: Path) -> dict[str, Loader]:
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), framework="numpy")
        names = list(handle.keys())
    except (SafetensorError, OSError) as e:
        raise HFCheckpointError(f"{path} is not a readable safetensors file ({e}); re-save it") from e

    def loader(name: str) -> Loader:
        def load() -> np.ndarray:
            # numpy has no bfloat16, so bf16 tensors are read through JAX (ml_dtypes) and widened.
            if handle.get_slice(name).get_dtype() == "BF16":
                with safe_open(str(path), framework="flax") as f:
                    return np.asarray(f.get_tensor(name), dtype=np.float32)
            return handle.get_tensor(name)
        return load

    return {name: loader(name) for name in names}


def _open_torch_pickle(path: Path) -> dict[str, Loader]:
    try:
        import torch
    except ImportError:
        raise HFCheckpointError(
            f"{path} is a PyTorch pickle and reading it needs torch, which is not installed; install the "
            f"optional extra (pip install -e '.[torch]') or convert the checkpoint to model.safetensors") from None
    try:
        # weights_only: only tensors and plain containers are unpickled, never arbitrary objects.
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HFCheckpointError(
            f"refusing to load {path}: unpickling it would run code stored in the file ({first_line}). "
            f"jaxllm reads only weights-only pickles; convert the checkpoint to safetensors with a tool "
            f"and in an environment you trust") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise HFCheckpointError(f"{path} is not a readable PyTorch checkpoint ({e})") from e
    if not isinstance(state, dict):
        raise HFCheckpointError(f"{path} holds a {type(state).__name__}, expected a state dict of tensors")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise HFCheckpointError(f"{path}: entry {bad[0]!r} is not a tensor; expected a flat state dict")

    def loader(t: "torch.Tensor") -> Loader:
        def load() -> np.ndarray:
            t_ = t.detach()
            return (t_.float() if t_.dtype == torch.bfloat16 else t_).numpy()
        return load

    return {name: loader(t) for name, t in state.items()}
