"""Parameter-efficient fine-tuning: LoRA, bottleneck adapters and prefix tuning as separate
parameter trees (train with `trainable=jaxllm.peft.PeftParam`), plus jaxllm's adapter files.
Hugging Face PEFT's file format lives with the other interop: `jaxllm.interop.save_peft / load_peft`."""

from jaxllm.peft.adapter import Adapter, AdapterConfig, add_adapters
from jaxllm.peft.common import (AdapterParam, LoraParam, PeftParam, PrefixParam, disabled,
                                format_report, parameter_report, peft_modules)
from jaxllm.peft.files import AdapterFileError, load_adapter, save_adapter
from jaxllm.peft.lora import LoRA, LoraConfig, add_lora, linear_layers, lora_layers, merge, unmerge
from jaxllm.peft.method import METHODS, PeftSection, apply_method
from jaxllm.peft.prefix import Prefix, PrefixConfig, add_prefix

__all__ = ["Adapter", "AdapterConfig", "AdapterFileError", "AdapterParam", "LoRA", "LoraConfig", "LoraParam",
           "METHODS", "PeftParam", "PeftSection", "Prefix", "PrefixConfig", "PrefixParam", "add_adapters",
           "add_lora", "add_prefix", "apply_method", "disabled", "format_report", "linear_layers",
           "load_adapter", "lora_layers", "merge", "parameter_report", "peft_modules", "save_adapter",
           "unmerge"]
