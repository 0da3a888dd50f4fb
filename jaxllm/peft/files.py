"""jaxllm's adapter files: only the trainable tree and the configs that rebuild it, no base weights.

    save_adapter(model, "out")      # out/adapter.json + out/adapter.safetensors
    load_adapter(model, "out")      # adds the same LoRA/adapters/prefix to a base model, fills them

Hugging Face PEFT's file format for LoRA is an interop concern: `jaxllm.interop.save_peft` /
`load_peft` write and read it (the `jaxllm lora` stage writes both formats into one directory).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import numpy as np
from flax import nnx

from jaxllm.fileio import new_dir
from jaxllm.peft.adapter import AdapterConfig, add_adapters
from jaxllm.peft.common import PeftModule, PeftParam, peft_modules, remove_peft
from jaxllm.peft.lora import LoRA, LoraConfig, add_lora
from jaxllm.peft.prefix import Prefix, PrefixConfig, add_prefix

CONFIG_FILE = "adapter.json"
WEIGHTS_FILE = "adapter.safetensors"
FORMAT = "jaxllm-adapter"
# the model fields an adapter's shapes depend on
_SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "bias")


class AdapterFileError(ValueError):
    """An adapter file that does not fit the model it is loaded onto; the message says how."""


def adapter_configs(model: nnx.Module) -> dict:
    """{"lora": [(LoraConfig, target names), ...], "adapter": AdapterConfig, "prefix": PrefixConfig}
    for what the model carries (absent keys: not used)."""
    out: dict = {}
    lora_groups: dict[LoraConfig, list[str]] = {}
    for _, m in peft_modules(model):
        if isinstance(m, LoRA):
            lora_groups.setdefault(m.config, []).extend(p.name for p in m.parts)
        elif isinstance(m, Prefix):
            out["prefix"] = m.config
        elif isinstance(m, PeftModule):
            out["adapter"] = m.config
    if lora_groups:
        out["lora"] = list(lora_groups.items())
    return out


def describe_peft(model: nnx.Module) -> dict:
    """JSON-able description of the model's LoRA/adapters/prefix, enough for `apply_peft` to rebuild
    them on the same base (it goes into adapter.json and into training checkpoints' metadata)."""
    configs = adapter_configs(model)
    if not configs:
        raise ValueError("the model has no LoRA, adapter or prefix; add one with jaxllm.peft first")
    if any(getattr(m, "merged", False) for _, m in peft_modules(model)):
        raise ValueError("LoRA is merged into the base weights; call jaxllm.peft.unmerge(model) first")
    return {"lora": [{"config": dataclasses.asdict(c), "targets": t} for c, t in configs.get("lora", [])],
            "adapter": dataclasses.asdict(configs["adapter"]) if "adapter" in configs else None,
            "prefix": dataclasses.asdict(configs["prefix"]) if "prefix" in configs else None}


def apply_peft(model: nnx.Module, desc: dict, where: str = "adapter description") -> nnx.Module:
    """Add the LoRA/adapters/prefix that `desc` (from `describe_peft`) describes, freshly initialised."""
    if peft_modules(model):
        raise ValueError("the model already carries LoRA/adapters/prefix; load an adapter onto a plain base model")
    for group in desc.get("lora") or []:
        add_lora(model, _config(LoraConfig, {**group["config"], "target": tuple(group["targets"])}, where))
    if desc.get("adapter"):
        add_adapters(model, _config(AdapterConfig, desc["adapter"], where))
    if desc.get("prefix"):
        add_prefix(model, _config(PrefixConfig, desc["prefix"], where))
    return model


def _state_dict(model) -> dict[str, np.ndarray]:
    return {".".join(map(str, path)): np.asarray(v[...])
            for path, v in nnx.to_flat_state(nnx.state(model, PeftParam))}


def write_adapter_files(model: nnx.Module, directory: Path, *, base: str | None = None) -> None:
    """adapter.json + adapter.safetensors for the model's LoRA/adapters/prefix, into `directory`
    (not atomic by itself: `save_adapter` writes them into a new directory swapped into place)."""
    from safetensors.numpy import save_file

    desc = describe_peft(model)
    meta = {"format": FORMAT, "version": 1, "base": base,
            "model": {k: getattr(model.config, k) for k in _SHAPE_FIELDS}, **desc}
    save_file(_state_dict(model), str(Path(directory) / WEIGHTS_FILE), metadata={"format": FORMAT})
    (Path(directory) / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def save_adapter(model: nnx.Module, out_dir, *, overwrite: bool = False, base: str | None = None) -> Path:
    """Write the model's LoRA/adapters/prefix (weights + configs) to `out_dir`, atomically.
    `base` notes where the base model came from (a path or name), for the reader."""
    with new_dir(out_dir, overwrite=overwrite) as tmp:
        write_adapter_files(model, tmp, base=base)
    return Path(out_dir).expanduser().absolute()


def _config(cls, fields: dict, where: str):
    try:
        return cls(**fields)
    except TypeError as e:
        raise AdapterFileError(f"{where}: {e}") from None


def load_adapter(model: nnx.Module, path) -> nnx.Module:
    """Add the LoRA/adapters/prefix saved in `path` (by `save_adapter`) to a model that has none,
    and load their weights (in place; returns the model)."""
    from safetensors.numpy import load_file

    path = Path(path).expanduser()
    if not (path / CONFIG_FILE).is_file():
        if (path / "adapter_config.json").is_file():
            raise AdapterFileError(f"{path} holds a Hugging Face PEFT adapter (adapter_config.json), not "
                                   f"jaxllm's {CONFIG_FILE}: read it with jaxllm.interop.load_peft(model, path)")
        raise FileNotFoundError(f"{path} holds no adapter: expected {CONFIG_FILE}, written by "
                                f"jaxllm.peft.save_adapter (for a PEFT directory use jaxllm.interop.load_peft)")
    where = str(path / CONFIG_FILE)
    try:
        meta = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{where} is not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise AdapterFileError(f"{where} is not a jaxllm adapter (format {meta.get('format')!r})")
    have = {k: getattr(model.config, k) for k in _SHAPE_FIELDS}
    saved = meta.get("model", {})
    diff = {k: (saved.get(k), have[k]) for k in _SHAPE_FIELDS if saved.get(k) != have[k]}
    if diff:
        raise AdapterFileError(
            f"{path} was trained for another model shape: "
            + ", ".join(f"{k} saved {a} vs model {b}" for k, (a, b) in diff.items())
            + "; load it onto the base model it was trained on")
    with all_or_nothing(model):
        apply_peft(model, meta, where)
        fill_peft_state(model, load_file(str(path / WEIGHTS_FILE)), str(path / WEIGHTS_FILE))
    return model


@contextlib.contextmanager
def all_or_nothing(model: nnx.Module):
    """Loading an adapter either completes or leaves the model as plain as it was."""
    if peft_modules(model):
        raise ValueError("the model already carries LoRA/adapters/prefix; load an adapter onto a plain base model")
    try:
        yield
    except BaseException:
        remove_peft(model)
        raise


def fill_peft_state(model: nnx.Module, tensors: dict[str, np.ndarray], source: str) -> None:
    """Write `tensors` (dotted path -> array) into the model's PEFT parameters; every parameter must
    be given with its exact shape, and nothing else."""
    state = nnx.state(model, PeftParam)
    flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}
    missing = sorted(set(flat) - set(tensors))
    extra = sorted(set(tensors) - set(flat))
    if missing or extra:
        raise AdapterFileError(f"{source} does not match the model's adapter: "
                               + (f"missing {missing[:3]} " if missing else "")
                               + (f"unexpected {extra[:3]}" if extra else ""))
    for name, var in flat.items():
        array = np.asarray(tensors[name])
        if array.shape != tuple(var.shape):
            raise AdapterFileError(f"{source}: tensor {name} has shape {array.shape}, expected {tuple(var.shape)}")
        var[...] = array.astype(var[...].dtype)
    nnx.update(model, state)
