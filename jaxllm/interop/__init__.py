"""Interop at the edges: Hugging Face GPT-2 checkpoints and PEFT LoRA adapter files, in and out."""

from jaxllm.interop.hf import HFCheckpointError, from_hf, to_hf
from jaxllm.interop.peft_files import PeftFileError, load_peft, save_peft

__all__ = ["HFCheckpointError", "PeftFileError", "from_hf", "load_peft", "save_peft", "to_hf"]
