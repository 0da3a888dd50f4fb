"""Interop at the edges: Hugging Face GPT-2 checkpoints in and out."""

from jaxllm.interop.hf import HFCheckpointError, checkpoint_to_hf, from_hf, to_hf

__all__ = ["HFCheckpointError", "checkpoint_to_hf", "from_hf", "to_hf"]
