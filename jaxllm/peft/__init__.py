"""Parameter-efficient fine-tuning: LoRA, bottleneck adapters and prefix tuning as separate
parameter trees (train with `trainable=jaxllm.peft.PeftParam`), plus adapter files."""

from jaxllm.peft.adapter import Adapter, AdapterConfig, add_adapters
from jaxllm.peft.common import (AdapterParam, LoraParam, PeftParam, PrefixParam, disabled,
                                format_report, parameter_report, peft_modules)
from jaxllm.peft.lora import LoRA, LoraConfig, add_lora, linear_layers, lora_layers, merge, unmerge
from jaxllm.peft.prefix import Prefix, PrefixConfig, add_prefix
from jaxllm.peft.files import AdapterFileError, load_adapter, save_adapter
from jaxllm.interop.peft import PeftFileError, load_peft, save_peft  # noqa: E402 (after the methods)

__all__ = ["Adapter", "AdapterConfig", "AdapterFileError", "PeftFileError", "load_adapter", "load_peft",
           "save_adapter", "save_peft", "AdapterParam", "LoRA", "LoraConfig", "LoraParam", "PeftParam",
           "Prefix", "PrefixConfig", "PrefixParam", "add_adapters", "add_lora", "add_prefix", "disabled",
           "format_report", "linear_layers", "lora_layers", "merge", "parameter_report", "peft_modules",
           "unmerge"]
