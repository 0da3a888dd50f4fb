"""Which parameter-efficient method a stage trains: the `peft` section of a stage's config.

`apply_method(model, section)` adds that method's modules to a model and returns the filter of
what trains: `nnx.Param` for full fine-tuning, `PeftParam` otherwise (the base stays frozen).
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from jaxllm.peft.adapter import AdapterConfig, add_adapters
from jaxllm.peft.common import PeftParam
from jaxllm.peft.lora import LoraConfig, add_lora
from jaxllm.peft.prefix import PrefixConfig, add_prefix

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
