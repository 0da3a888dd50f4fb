"""What every fine-tuning stage (LoRA on text, SFT, later reward/DPO) shares: where the base model
comes from and which parameter-efficient method, if any, is trained on top of it.

A base is a jaxllm training run (its out_dir) or a Hugging Face GPT-2 directory (config.json +
weights, with tokenizer files if it has them); `load_base` tells them apart and returns the model,
its config and its tokenizer. A run that trains only PEFT weights checkpoints only those, and its
metadata names the base, so `load_checkpoint` rebuilds the model from base + checkpoint.
"""

from __future__ import annotations

import dataclasses
import pathlib
import typing

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
        f"init={str(path)!r} is neither a jaxllm run directory (with checkpoints/) nor a Hugging Face "
        f"GPT-2 directory (with config.json); train one with `jaxllm pretrain` or export one with "
        f"`jaxllm export-hf` / save_pretrained")


def load_base(path, step: int | None = None):
    """(model, config, tokenizer or None) from a jaxllm run directory or an HF GPT-2 directory."""
    from jaxllm.interop import from_hf
    from jaxllm.tokenizer import CONFIG_NAME, HF_FILE_NAME, load_tokenizer
    from jaxllm.training.checkpoint import load_checkpoint

    if base_kind(path) == "run":
        model, cfg, tok, _ = load_checkpoint(path, step)
        return model, cfg, tok
    model, cfg = from_hf(path)
    p = pathlib.Path(path).expanduser()
    has_tokenizer = (p / CONFIG_NAME).is_file() or (p / HF_FILE_NAME).is_file()
    tok = load_tokenizer(p) if has_tokenizer else None
    return model, cfg, tok


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
