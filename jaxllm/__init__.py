"""jaxllm: GPT-style language models in JAX/Flax NNX, from tokenization to alignment.

Importing jaxllm changes nothing in the process: no environment variables, no JAX settings. The
`jaxllm` command sets up the CPU (one JAX device per core, measured XLA flags); from Python, call
`jaxllm.parallel.setup_cpu()` before the first JAX operation to get the same."""

from jaxllm.config import PRESETS, GPTConfig
from jaxllm.data import TokenDataset, load_text, prepare
from jaxllm.interop import from_hf, to_hf
from jaxllm.logits_processors import SamplingConfig
from jaxllm.losses import cross_entropy, next_token_loss
from jaxllm.model import GPT, KVCache, count_params
from jaxllm.runs import checkpoint_to_hf, load_base, load_checkpoint
from jaxllm.sampling import generate, sample_with_strategy, stream
from jaxllm.tokenizer import build_tokenizer, load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "GPT", "GPTConfig", "KVCache", "PRESETS", "SamplingConfig", "TokenDataset", "build_tokenizer",
    "checkpoint_to_hf", "count_params", "cross_entropy", "from_hf", "generate", "load_base", "load_checkpoint",
    "load_text", "load_tokenizer", "next_token_loss", "prepare", "sample_with_strategy", "stream", "to_hf",
]
