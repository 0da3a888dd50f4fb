"""jaxllm: GPT-style language models in JAX/Flax NNX, from tokenization to alignment."""

from jaxllm import parallel as _parallel

_parallel.set_speed_flags()  # XLA:CPU flags measured faster here; XLA_FLAGS set by the user win

from jaxllm.config import PRESETS, GPTConfig
from jaxllm.data import TokenDataset, load_text, prepare
from jaxllm.interop import checkpoint_to_hf, from_hf, to_hf
from jaxllm.losses import cross_entropy, next_token_loss
from jaxllm.model import GPT, KVCache, count_params
from jaxllm.sampling import generate, sample_with_strategy, stream
from jaxllm.tokenizer import build_tokenizer, load_tokenizer
from jaxllm.training.checkpoint import load_checkpoint

__version__ = "0.1.0"

__all__ = [
    "GPT", "GPTConfig", "KVCache", "PRESETS", "TokenDataset", "build_tokenizer", "checkpoint_to_hf",
    "count_params", "cross_entropy", "from_hf", "generate", "load_checkpoint", "load_text",
    "load_tokenizer", "next_token_loss", "prepare", "sample_with_strategy", "stream", "to_hf",
]
