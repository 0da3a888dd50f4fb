"""LoRA in Hugging Face PEFT's adapter files, for HF's GPT-2 (`GPT2LMHeadModel`).

PEFT stores, per adapted module, `base_model.model.<module>.lora_A.weight` (r, in) and
`.lora_B.weight` (out, r) in adapter_model.safetensors, and adapter_config.json with r, lora_alpha,
use_rslora, target_modules and per-module rank/alpha overrides. jaxllm's layer names are GPT-2's
(`h.0.attn.c_attn`, ...), under GPT2LMHeadModel's `transformer.`.

GPT-2 fuses q, k and v into one `c_attn`. A jaxllm LoRA on some of its thirds (the seed's q and v)
is written as one exact LoRA on `c_attn` of rank parts x r: A stacks the parts' A, B is block
diagonal (zeros feed the thirds without LoRA), and the module's alpha is set so PEFT's scale equals
jaxllm's. The parts are also recorded in the safetensors metadata, so jaxllm reads them back as
they were, as long as the off-diagonal blocks are still zero (else as one fused LoRA: still exact).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
from flax import nnx

from jaxllm.fileio import new_dir
from jaxllm.interop.hf import HF_PREFIX
from jaxllm.peft.files import AdapterFileError, all_or_nothing, fill_peft_state
from jaxllm.peft.lora import LoraConfig, add_lora, linear_layers, lora_layers, target_parts

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
_KEY_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?:transformer\.)?(.+)\.lora_([AB])\.weight$")
_META_KEY = "jaxllm_lora"
# PEFT options whose non-default values change what the adapter computes and jaxllm does not do
_UNSUPPORTED = {"use_dora": False, "bias": "none", "modules_to_save": None, "layers_to_transform": None,
                "layer_replication": None, "trainable_token_indices": None}


class PeftFileError(AdapterFileError):
    """A PEFT adapter that jaxllm cannot load onto this model; the message says why."""


def _fused(lin) -> tuple[np.ndarray, np.ndarray]:
    """(A (R, in), B (out, R)) of one layer's LoRA as a single PEFT LoRA of rank R = parts x r."""
    lora = lin.lora
    a = np.asarray(lora.a[...], np.float32)          # (P, in, r)
    b = np.asarray(lora.b[...], np.float32)          # (P, r, size)
    P, d_in, r = a.shape
    # contiguous: safetensors writes an array's buffer as is, whatever its strides
    A = np.ascontiguousarray(a.transpose(0, 2, 1).reshape(P * r, d_in))
    B = np.zeros((lin.out_features, P * r), np.float32)
    for p, part in enumerate(lora.parts):
        B[part.offset:part.offset + part.size, p * r:(p + 1) * r] = b[p].T
    return A, B


def write_peft_files(model: nnx.Module, out: Path, *, base: str | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors for the model's LoRA, into directory `out`."""
    from safetensors.numpy import save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA to export; add one with jaxllm.peft.add_lora")
    configs = {lin.lora.config for lin in layers.values()}
    dropouts = {c.dropout for c in configs}
    rslora = {c.rslora for c in configs}
    if len(dropouts) > 1 or len(rslora) > 1:
        raise ValueError("PEFT's format has one lora_dropout and one use_rslora per adapter; "
                         "this model's LoRA layers differ in them")
    use_rslora = rslora.pop()
    tensors, ranks, alphas, parts = {}, {}, {}, {}
    for name, lin in layers.items():
        A, B = _fused(lin)
        R, scale = A.shape[0], lin.lora.config.scale
        module = HF_PREFIX + name
        tensors[f"{_KEY_PREFIX}{module}.lora_A.weight"] = A
        tensors[f"{_KEY_PREFIX}{module}.lora_B.weight"] = B
        ranks[module] = R
        alphas[module] = scale * (math.sqrt(R) if use_rslora else R)   # PEFT's scale = alpha/R
        parts[name] = {"config": dataclasses.asdict(lin.lora.config), "parts": [p.name for p in lin.lora.parts]}
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    a0 = max(set(alphas.values()), key=list(alphas.values()).count)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": r0, "lora_alpha": a0, "use_rslora": use_rslora, "lora_dropout": dropouts.pop(),
        "target_modules": sorted(ranks), "fan_in_fan_out": True, "bias": "none",
        "rank_pattern": {m: r for m, r in ranks.items() if r != r0},
        "alpha_pattern": {m: a for m, a in alphas.items() if a != a0},
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }
    save_file(tensors, str(out / PEFT_WEIGHTS_FILE),
              metadata={"format": "pt", _META_KEY: json.dumps(parts)})
    (out / PEFT_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def save_peft(model: nnx.Module, out_dir, *, base: str | None = None, overwrite: bool = False) -> Path:
    """Write only PEFT's two files for the model's LoRA (atomically), for peft.PeftModel.from_pretrained."""
    with new_dir(out_dir, overwrite=overwrite) as tmp:
        write_peft_files(model, tmp, base=base)
    return Path(out_dir).expanduser().absolute()


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module name or its dotted suffix (regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_peft(model: nnx.Module, path) -> nnx.Module:
    """Add the LoRA in a PEFT adapter directory (for HF GPT-2) to a plain jaxllm GPT and load it."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    cfg_file, weights = path / PEFT_CONFIG_FILE, path / PEFT_WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing; a PEFT adapter directory holds {PEFT_CONFIG_FILE} "
                                f"and {PEFT_WEIGHTS_FILE}")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise PeftFileError(f"cannot read {cfg_file} ({e})") from None
    if config.get("peft_type") != "LORA":
        raise PeftFileError(f"{cfg_file}: peft_type is {config.get('peft_type')!r}; jaxllm reads LORA adapters")
    for key, default in _UNSUPPORTED.items():
        if config.get(key, default) not in (default, [], {}):
            raise PeftFileError(f"{cfg_file}: {key}={config[key]!r} is not supported by jaxllm (it reads plain LoRA)")
    with safe_open(str(weights), framework="numpy") as f:
        meta = json.loads((f.metadata() or {}).get(_META_KEY, "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise PeftFileError(f"{weights}: tensor {key} is not a LoRA weight of a GPT-2 module")
        pairs.setdefault(m.group(1), {})[m.group(2)] = value
    layers = linear_layers(model)
    values, groups = {}, {}
    for name, ab in sorted(pairs.items()):
        if name not in layers:
            raise PeftFileError(f"{weights}: module {name} does not exist in this model "
                                f"({model.config.n_layer} layers); load the adapter onto the model it was trained for")
        if set(ab) != {"A", "B"}:
            raise PeftFileError(f"{weights}: module {name} has lora_{'A' if 'A' in ab else 'B'} but not its pair")
        A, B = ab["A"].astype(np.float32), ab["B"].astype(np.float32)
        d_in, d_out = layers[name].in_features, layers[name].out_features
        R = A.shape[0]
        if A.shape != (R, d_in) or B.shape != (d_out, R):
            raise PeftFileError(f"{weights}: module {name} has lora_A {A.shape} and lora_B {B.shape}, "
                                   f"expected ({R}, {d_in}) and ({d_out}, {R})")
        module = HF_PREFIX + name
        r_file = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
        if r_file != R:
            raise PeftFileError(f"{cfg_file}: module {name} has rank {r_file} in the config but {R} in {weights}")
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
        rslora = bool(config.get("use_rslora", False))
        scale = alpha / (math.sqrt(R) if rslora else R)
        split = meta.get(name)
        saved = split and LoraConfig(**{**split["config"], "target": tuple(split["parts"])})
        # read back as jaxllm's parts only if PEFT would compute the same: same scale, B block-diagonal
        if saved and math.isclose(saved.scale, scale, rel_tol=1e-6) and _block_diagonal(
                A, B, model, split["parts"]):
            config_l, a, b = saved, *_split(A, B, model, split["parts"])
        else:  # one LoRA over the whole layer with PEFT's own rank and scale
            r_alpha = scale * (math.sqrt(R) if rslora else R)
            config_l = LoraConfig(r=R, alpha=r_alpha, dropout=config.get("lora_dropout", 0.0),
                                  target=(name,), rslora=rslora)
            a, b = A.T[None], B.T[None]
        groups.setdefault(dataclasses.replace(config_l, target=("-",)), []).extend(config_l.target)
        values[f"{name}.lora.a"], values[f"{name}.lora.b"] = a, b
    with all_or_nothing(model):
        for config_l, targets in groups.items():
            try:
                add_lora(model, dataclasses.replace(config_l, target=tuple(targets)))
            except ValueError as e:
                raise PeftFileError(f"{weights}: {e}") from None
        fill_peft_state(model, values, str(weights))
    return model


def _parts(model, part_names) -> list[tuple[int, int]]:
    """(offset, size) in the layer's output of each named part (a q/k/v third, or the whole layer)."""
    parts = target_parts(model)
    return [(parts[n][1].offset, parts[n][1].size) for n in part_names]


def _block_diagonal(A, B, model, part_names) -> bool:
    """Is B zero outside the parts' blocks (as jaxllm wrote it), so splitting it loses nothing?"""
    P = len(part_names)
    if A.shape[0] % P:
        return False
    r = A.shape[0] // P
    keep = np.zeros(B.shape, bool)
    for p, (off, size) in enumerate(_parts(model, part_names)):
        keep[off:off + size, p * r:(p + 1) * r] = True
    return not np.any(B[~keep])


def _split(A, B, model, part_names):
    P = len(part_names)
    r = A.shape[0] // P
    a = np.stack([A[p * r:(p + 1) * r].T for p in range(P)])                       # (P, in, r)
    b = np.stack([B[off:off + size, p * r:(p + 1) * r].T
                  for p, (off, size) in enumerate(_parts(model, part_names))])      # (P, r, size)
    return a, b
