"""Corpus text in, token arrays on disk, batches out."""

from jaxllm.data.sources import load_text
from jaxllm.data.tokens import TokenDataset, prepare

__all__ = ["load_text", "prepare", "TokenDataset"]
