"""Hugging Face GPT-2 checkpoints <-> jaxllm, and the one jaxllm<->HF tensor mapping.

`hf_tensor_specs(cfg)` is the canonical table: every tensor a GPT-2 checkpoint stores, its HF name
(with the `transformer.` prefix GPT2LMHeadModel uses), its jaxllm state path and its shape. HF's
`Conv1D` stores weights as (in, out), the orientation of an NNX `Linear` kernel, so nothing is
transposed between HF and jaxllm; PyTorch's `nn.Linear` holds the transpose, which
`is_conv1d_weight` tells a PyTorch model (benchmarks/torch_gpt.py) to apply.

    model, cfg = from_hf("gpt2_dir")                # config.json + model.safetensors / pytorch_model.bin
    to_hf(model, cfg, "out_dir", tokenizer=tok)     # loads with transformers.AutoModelForCausalLM

(A training run is exported by `jaxllm.runs.checkpoint_to_hf`, which rebuilds the run's model first.)
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.config import COMPUTE_OPTIONS, GPTConfig
from jaxllm.fileio import new_dir
from jaxllm.interop.hf_files import HFCheckpointError, find_weights, open_weights
from jaxllm.model import GPT
from jaxllm.peft.common import peft_modules

HF_PREFIX = "transformer."
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Causal-mask buffers older transformers versions saved next to the weights; they hold no parameters.
_IGNORED = re.compile(r"(^|\.)attn\.(bias|masked_bias)$")
# HF activation_function -> GPTConfig.activation. gelu_new and gelu_pytorch_tanh are both GPT-2's tanh
# approximation; "gelu" is the exact erf form.
_HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
_ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
# Fields of GPTConfig that do not change which tensors exist or what they compute.
_OVERRIDABLE = ("dropout", "dtype", "param_dtype", *COMPUTE_OPTIONS)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    hf_name: str                  # e.g. "transformer.h.0.attn.c_attn.weight"
    path: tuple                   # jaxllm state path, e.g. ("h", 0, "attn", "c_attn", "kernel")
    shape: tuple[int, ...]
    is_bias: bool                 # absent from a jaxllm model built with bias=False
    jax_shape: tuple[int, ...] | None = None   # the jaxllm array's shape where it differs (a reshape)

    @property
    def model_shape(self) -> tuple[int, ...]:
        return self.shape if self.jax_shape is None else self.jax_shape


def hf_tensor_specs(cfg: GPTConfig) -> dict[str, TensorSpec]:
    """Every tensor of a GPT-2 checkpoint for `cfg`, keyed by HF name, in HF's order."""
    V, D, T = cfg.vocab_size, cfg.n_embd, cfg.block_size
    specs = [TensorSpec(HF_PREFIX + "wte.weight", ("wte", "embedding"), (V, D), False),
             TensorSpec(HF_PREFIX + "wpe.weight", ("wpe", "embedding"), (T, D), False)]
    block = (("ln_1", ("ln_1",), D, D), ("attn.c_attn", ("attn", "c_attn"), D, 3 * D),
             ("attn.c_proj", ("attn", "c_proj"), D, D), ("ln_2", ("ln_2",), D, D),
             ("mlp.c_fc", ("mlp", "c_fc"), D, 4 * D), ("mlp.c_proj", ("mlp", "c_proj"), 4 * D, D))
    for i in range(cfg.n_layer):
        for hf_module, path, n_in, n_out in block:
            name, jpath = f"{HF_PREFIX}h.{i}.{hf_module}", ("h", i, *path)
            if hf_module.startswith("ln"):
                specs.append(TensorSpec(name + ".weight", jpath + ("scale",), (D,), False))
            elif hf_module == "attn.c_attn":   # jaxllm keeps q|k|v as (D, 3, D): see model.Linear
                specs.append(TensorSpec(name + ".weight", jpath + ("kernel",), (n_in, n_out), False, (D, 3, D)))
                specs.append(TensorSpec(name + ".bias", jpath + ("bias",), (n_out,), True, (3, D)))
                continue
            else:
                specs.append(TensorSpec(name + ".weight", jpath + ("kernel",), (n_in, n_out), False))
            specs.append(TensorSpec(name + ".bias", jpath + ("bias",), (n_out,), True))
    specs += [TensorSpec(HF_PREFIX + "ln_f.weight", ("ln_f", "scale"), (D,), False),
              TensorSpec(HF_PREFIX + "ln_f.bias", ("ln_f", "bias"), (D,), True)]
    return {s.hf_name: s for s in specs}


def is_conv1d_weight(hf_name: str) -> bool:
    """True for HF Conv1D weights: stored (in, out), the transpose of a torch nn.Linear weight."""
    return hf_name.endswith(".weight") and re.search(r"\.(c_attn|c_proj|c_fc)\.weight$", hf_name) is not None


def canonical_hf_name(name: str) -> str:
    """Checkpoints saved from GPT2Model carry bare names (`h.0.ln_1.weight`); GPT2LMHeadModel's carry
    `transformer.`. Both map to the prefixed form."""
    return name if name.startswith(HF_PREFIX) or name.startswith("lm_head.") else HF_PREFIX + name


def is_ignorable(hf_name: str) -> bool:
    return _IGNORED.search(hf_name) is not None


# --------------------------------------------------------------------------- configs


def config_from_hf(hf: Mapping, where: str = CONFIG_FILE, **overrides) -> GPTConfig:
    """GPTConfig for an HF GPT-2 config.json dict; anything that is not plain GPT-2 is refused."""
    def refuse(what: str) -> HFCheckpointError:
        return HFCheckpointError(f"{where}: {what}; from_hf loads GPT-2 checkpoints (GPT2LMHeadModel) only")

    if hf.get("model_type") != "gpt2":
        raise refuse(f"model_type is {hf.get('model_type')!r}, not 'gpt2'")
    unknown_arch = [a for a in hf.get("architectures") or [] if a not in _ARCHITECTURES]
    if unknown_arch:
        raise refuse(f"architecture {unknown_arch[0]} is not supported (supported: {', '.join(_ARCHITECTURES)})")
    act = hf.get("activation_function", "gelu_new")
    if act not in _HF_ACTIVATIONS:
        raise refuse(f"activation_function {act!r} is not a GELU jaxllm has (supported: {', '.join(_HF_ACTIVATIONS)})")
    n_embd = hf.get("n_embd", 768)
    if hf.get("n_inner") not in (None, 4 * n_embd):
        raise refuse(f"n_inner={hf['n_inner']} is not 4 * n_embd = {4 * n_embd}")
    for key, plain in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                       ("add_cross_attention", False)):
        if hf.get(key, plain) != plain:
            raise refuse(f"{key}={hf[key]} changes the network (GPT-2 has {plain})")
    bad = sorted(set(overrides) - set(_OVERRIDABLE))
    if bad:
        raise ValueError(f"from_hf cannot override {bad}: the checkpoint fixes them; allowed: {list(_OVERRIDABLE)}")
    fields = dict(vocab_size=hf.get("vocab_size", 50257), block_size=hf.get("n_positions", 1024),
                  n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=n_embd,
                  layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                  activation=_HF_ACTIVATIONS[act],
                  # jaxllm has one dropout rate; HF's residual dropout is the one fine-tuning feels most.
                  dropout=float(hf.get("resid_pdrop", 0.1)),
                  # to_hf marks bias-free models; their (zero) biases are then dropped on the way back.
                  bias=bool(hf.get("jaxllm_bias", True)))
    try:
        return GPTConfig(**{**fields, **overrides})
    except ValueError as e:
        raise HFCheckpointError(f"{where}: {e}") from e


def config_to_hf(cfg: GPTConfig, eos_id: int | None = None) -> dict:
    if eos_id is None and cfg.vocab_size == 50257:
        eos_id = 50256  # GPT-2's <|endoftext|>
    hf = {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        "activation_function": "gelu_new" if cfg.activation == "gelu_tanh" else "gelu",
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": True,
        "use_cache": True, "bos_token_id": eos_id, "eos_token_id": eos_id, "dtype": "float32",
    }
    if not cfg.bias:
        hf["jaxllm_bias"] = False
    return hf


# --------------------------------------------------------------------------- tensors


def model_to_hf_state(model: GPT) -> dict[str, np.ndarray]:
    """HF-named float32 arrays of a jaxllm GPT; a bias-free model gets zero biases, which compute
    the same function (HF's GPT-2 always has biases)."""
    cfg = model.config
    flat = {path: var[...] for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    out = {}
    for name, spec in hf_tensor_specs(cfg).items():
        value = flat.get(spec.path)
        if value is None and spec.is_bias and not cfg.bias:
            value = np.zeros(spec.shape, np.float32)
        out[name] = np.asarray(value, dtype=np.float32).reshape(spec.shape)
    return out


def model_from_hf_state(tensors: Mapping[str, object], cfg: GPTConfig, source: str = "checkpoint") -> GPT:
    """A GPT for `cfg` from HF-named tensors (arrays, or zero-argument loaders of arrays).

    Names may be `transformer.`-prefixed or bare; mask buffers are ignored; a stored `lm_head.weight`
    must equal `wte` (jaxllm ties them). Missing, unexpected or misshapen tensors are errors that name
    the tensor and the shape it should have.
    """
    by_name: dict[str, object] = {}
    for raw, value in tensors.items():
        if is_ignorable(raw):
            continue
        name = canonical_hf_name(raw)
        if name in by_name:
            raise HFCheckpointError(f"{source}: tensor {name} appears twice (as {raw!r} and with the other prefix)")
        by_name[name] = value
    specs = hf_tensor_specs(cfg)
    wanted = [s for s in specs.values() if cfg.bias or not s.is_bias]
    missing = [s for s in wanted if s.hf_name not in by_name]
    if missing:
        s = missing[0]
        raise HFCheckpointError(
            f"{source} is missing tensor {s.hf_name} (expected shape {s.shape})"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            + "; is the checkpoint complete and its config.json the one it was saved with?")
    unexpected = sorted(set(by_name) - set(specs) - {"lm_head.weight"})
    if unexpected:
        raise HFCheckpointError(f"{source} has tensor(s) a GPT-2 does not: {unexpected[:5]}"
                                + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""))

    def read(name: str, shape: tuple) -> np.ndarray:
        value = by_name[name]
        array = np.asarray(value() if callable(value) else value)
        if array.shape != tuple(shape):
            raise HFCheckpointError(
                f"{source}: tensor {name} has shape {array.shape}, expected {tuple(shape)} for {cfg}")
        if not np.issubdtype(array.dtype, np.floating):
            raise HFCheckpointError(f"{source}: tensor {name} has dtype {array.dtype}, expected a float type")
        return array

    model = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    values = {}
    for spec in wanted:
        values[spec.path] = jnp.asarray(read(spec.hf_name, spec.shape).reshape(spec.model_shape),
                                        dtype=cfg.weight_dtype)
    if "lm_head.weight" in by_name:
        head = read("lm_head.weight", specs[HF_PREFIX + "wte.weight"].shape)
        if not np.array_equal(head.astype(np.float32), np.asarray(values[("wte", "embedding")], np.float32)):
            raise HFCheckpointError(
                f"{source}: lm_head.weight differs from transformer.wte.weight; jaxllm's GPT ties the "
                f"LM head to the token embedding, so an untied head cannot be loaded")
    flat = nnx.to_flat_state(state)
    # The mapping table and the model disagreeing is a bug here, not in the checkpoint.
    leftover = [p for p, _ in flat if p not in values]
    if leftover:
        raise RuntimeError(f"jaxllm model state {leftover[0]} has no HF counterpart in hf_tensor_specs")
    misshapen = [p for p, v in flat if tuple(v.shape) != values[p].shape]
    if misshapen:
        raise RuntimeError(f"hf_tensor_specs gives {misshapen[0]} a shape the jaxllm model does not have")
    state = nnx.from_flat_state([(p, v.replace(values[p])) for p, v in flat])
    return nnx.merge(graphdef, state)


# --------------------------------------------------------------------------- directories


def _resolve(path) -> tuple[Path, Path]:
    """(config.json, weights file) for a checkpoint directory or a weights file beside a config.json."""
    path = Path(path).expanduser()
    if path.is_dir():
        directory, weights = path, None
    elif path.is_file():
        directory, weights = path.parent, (None if path.name == CONFIG_FILE else path)
    else:
        raise FileNotFoundError(f"{path} does not exist; pass an HF GPT-2 directory (config.json + weights)")
    config = directory / CONFIG_FILE
    if not config.is_file():
        raise HFCheckpointError(f"{directory} has no {CONFIG_FILE}; from_hf needs the checkpoint's config")
    return config, weights or find_weights(directory)


def from_hf(path, **overrides) -> tuple[GPT, GPTConfig]:
    """(model, cfg) from an HF GPT-2 checkpoint: a directory with config.json and model.safetensors
    (or a shard index, or pytorch_model.bin, read weights-only), or one of those files.

    `overrides` may set dropout, dtype, param_dtype, remat or scan_layers; the rest comes from config.json.
    """
    config_path, weights_path = _resolve(path)
    try:
        hf = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise HFCheckpointError(f"{config_path} is not valid JSON ({e})") from e
    cfg = config_from_hf(hf, str(config_path), **overrides)
    tensors = open_weights(weights_path)
    if not cfg.bias:
        # Written by to_hf from a bias-free model. If training elsewhere has since moved a bias off
        # zero, keep the biases rather than drop what they learned.
        biases = [n for n in tensors if canonical_hf_name(n).endswith(".bias") and not is_ignorable(n)]
        if any(np.any(np.asarray(tensors[n]()) != 0) for n in biases):
            cfg = cfg.replace(bias=True)
    if hf.get("tie_word_embeddings", True) is False and not any(n.startswith("lm_head.") for n in tensors):
        raise HFCheckpointError(f"{config_path} says the LM head is untied, but {weights_path} has no "
                                f"lm_head.weight; jaxllm's GPT ties the head to wte")
    return model_from_hf_state(tensors, cfg, source=str(weights_path)), cfg


def check_plain_gpt(model: GPT) -> None:
    """A GPT-2 checkpoint holds no LoRA, adapter or prefix: refuse a tuned model that would lose them."""
    live = [".".join(map(str, p)) for p, m in peft_modules(model) if m.enabled and not getattr(m, "merged", False)]
    if live:
        raise ValueError(
            f"the model carries parameter-efficient modules ({live[0]}{' and more' if len(live) > 1 else ''}) "
            "that a GPT-2 checkpoint cannot hold: fold LoRA in with jaxllm.peft.merge(model, unload=True), "
            "or save them separately with jaxllm.peft.save_adapter / save_peft")


def to_hf(model: GPT, cfg: GPTConfig | None, out_dir, *, tokenizer=None, overwrite: bool = False) -> Path:
    """Write `out_dir` with config.json + model.safetensors (float32) that transformers'
    AutoModelForCausalLM loads; with `tokenizer`, its files too (a bpe / tokenizer.json one loads in
    AutoTokenizer). The directory is built under a temporary name and renamed when complete."""
    from safetensors.numpy import save_file

    cfg = cfg or model.config
    if cfg != model.config:
        raise ValueError(f"cfg does not match the model's own config:\n  cfg   {cfg}\n  model {model.config}")
    check_plain_gpt(model)
    eos_id = None
    if tokenizer is not None:
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {cfg.vocab_size}")
        eos_id = tokenizer.eos_id
    with new_dir(out_dir, overwrite=overwrite) as tmp:
        save_file(model_to_hf_state(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config_to_hf(cfg, eos_id), indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(out_dir).expanduser().absolute()
