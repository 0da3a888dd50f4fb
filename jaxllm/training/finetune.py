"""What every fine-tuning stage (LoRA on text, SFT, later reward/DPO) shares: where the base model
comes from and which parameter-efficient method, if any, is trained on top of it.

A base is a jaxllm training run (its out_dir) or a Hugging Face GPT-2 directory (config.json +
weights, with tokenizer files if it has them); `load_base` tells them apart and returns the model,
its config and its tokenizer. A run that trains only PEFT weights checkpoints only those, and its
metadata names the base, so `load_checkpoint` rebuilds the model from base + checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import typing

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.peft import AdapterConfig, LoraConfig, PeftParam, PrefixConfig, add_adapters, add_lora, add_prefix

METHODS = ("full", "lora", "adapter", "prefix")


@dataclasses.dataclass(frozen=True)
class PeftSection:
    method: str = "lora"     # full | lora | adapter | prefix
    seed: int = 0            # initialises the new weights
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    adapter: AdapterConfig = dataclasses.field(default_factory=AdapterConfig)
    prefix: PrefixConfig = dataclasses.field(default_factory=PrefixConfig)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"peft.method must be one of {', '.join(METHODS)}, got {self.method!r}")


def apply_method(model: nnx.Module, section: PeftSection):
    """Add the section's PEFT modules to `model` (in place); returns the trainable filter."""
    rngs = nnx.Rngs(section.seed)
    if section.method == "full":
        return nnx.Param
    if section.method == "lora":
        add_lora(model, section.lora, rngs=rngs)
    elif section.method == "adapter":
        add_adapters(model, section.adapter, rngs=rngs)
    else:
        add_prefix(model, section.prefix, rngs=rngs)
    return PeftParam


def base_kind(path) -> str:
    """"run" (a jaxllm training run) or "hf" (a Hugging Face GPT-2 directory); errors say what is expected."""
    p = pathlib.Path(path).expanduser()
    if (p / "checkpoints").is_dir():
        return "run"
    if (p / "config.json").is_file():
        return "hf"
    raise FileNotFoundError(
        f"init.path={str(path)!r} is neither a jaxllm run directory (with checkpoints/) nor a Hugging Face "
        f"GPT-2 directory (with config.json); train one with `jaxllm pretrain` or export one with "
        f"`jaxllm export-hf` / save_pretrained")


def load_base(path, step: int | None = None):
    """(model, config, tokenizer or None) from a jaxllm run directory or an HF GPT-2 directory."""
    from jaxllm.interop import from_hf
    from jaxllm.tokenizer import CONFIG_NAME, HF_FILE_NAME, load_tokenizer
    from jaxllm.training.checkpoint import load_checkpoint

    if base_kind(path) == "run":
        model, cfg, tok, _ = load_checkpoint(path, step)
        _flatten_peft(model, path)
        return model, cfg, tok
    model, cfg = from_hf(path)
    p = pathlib.Path(path).expanduser()
    has_tokenizer = (p / CONFIG_NAME).is_file() or (p / HF_FILE_NAME).is_file()
    tok = load_tokenizer(p) if has_tokenizer else None
    return model, cfg, tok


def _flatten_peft(model, path) -> None:
    """A tuned run used as a base: its LoRA is folded into the weights (the new run's base is then a
    plain GPT); adapters and prefixes cannot be folded, so such a run is refused as a base."""
    from jaxllm.peft import LoRA, merge, peft_modules

    other = sorted({type(m).__name__ for _, m in peft_modules(model) if not isinstance(m, LoRA)})
    if other:
        raise ValueError(f"init.path={path} carries {', '.join(other)} modules, which cannot be folded "
                         f"into a plain base; tune from that run's own base instead")
    merge(model, unload=True)


def base_meta(path, step: int | None) -> dict:
    """Where a PEFT run's frozen base comes from, with a jaxllm run's step fixed now: a base run that
    trains on later must not move an adapter onto other weights."""
    from jaxllm.training.checkpoint import Checkpointer

    kind = base_kind(path)
    if kind == "run" and step is None:
        ckpt = Checkpointer(path, create=False)
        try:
            step = ckpt.latest_step()
        finally:
            ckpt.close()
    return {"path": str(pathlib.Path(path).expanduser().absolute()), "step": step, "kind": kind}


@jax.jit
def _sums(leaves):
    return jnp.stack([jnp.stack([jnp.sum(x, dtype=jnp.float32), jnp.sum(jnp.square(x.astype(jnp.float32)))])
                      for x in leaves])


def weights_fingerprint(model) -> list[float]:
    """The sum and the sum of squares of each base weight (PEFT weights left out), in state order:
    a few numbers that tell whether a base model's files still hold the weights a PEFT run was
    trained on. Compare with `same_base_weights`."""
    leaves = jax.tree.leaves(nnx.state(model, nnx.All(nnx.Param, nnx.Not(PeftParam))))
    return [float(v) for v in jax.device_get(_sums(leaves)).reshape(-1)]


def same_base_weights(recorded_base: dict, fingerprint, rtol: float = 1e-4) -> bool:
    """Whether `fingerprint` matches the one in `recorded_base` (a meta["base"]), within a tolerance
    (summation order may differ between devices). True where either is missing: runs recorded
    before fingerprints existed."""
    recorded = recorded_base.get("fingerprint")
    if recorded is None or fingerprint is None:
        return True
    return len(recorded) == len(fingerprint) and all(
        math.isclose(x, y, rel_tol=rtol, abs_tol=1e-3) for x, y in zip(recorded, fingerprint))


def peft_run_meta(model, trainable, init) -> dict:
    """The metadata a run that trains only PEFT weights adds (its base, with a fingerprint of the
    base weights, and its PEFT modules), so its checkpoints can hold those weights alone; {} for
    full fine-tuning."""
    from jaxllm.peft.files import describe_peft

    if trainable is nnx.Param:
        return {}
    base = {**base_meta(init.path, init.step), "fingerprint": weights_fingerprint(model)}
    return {"base": base, "peft": describe_peft(model)}


def tokenizer_spec(data_tokenizer: typing.Optional[str], base_path, base_tok) -> str:
    """The tokenizer a fine-tuning dataset is prepared with: the one given, else the base's own."""
    if data_tokenizer:
        return data_tokenizer
    p = pathlib.Path(base_path).expanduser()
    if base_kind(p) == "run" and (p / "tokenizer").is_dir():
        return str(p / "tokenizer")
    if base_tok is not None:
        return str(p)
    raise ValueError(f"the base {p} has no tokenizer; set data.tokenizer (e.g. gpt2 or a tokenizer.json)")


def evaluate_model(model, trainable, make_eval) -> dict:
    """Run a stage's evaluator on a model outside the loop (the "before tuning" numbers)."""
    from jaxllm.training.step import TrainState, split_model

    graphdef, train_vars, frozen = split_model(model, trainable)
    metrics = make_eval(graphdef, None)(TrainState(None, train_vars, frozen, None))
    return {k: float(v) for k, v in metrics.items()}
