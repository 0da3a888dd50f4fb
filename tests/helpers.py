"""Shared by several test files: the tiny model config, random token ids, the in-process CLI runner."""

import contextlib
import io

import numpy as np

from jaxllm.cli import main
from jaxllm.config import GPTConfig

TINY = GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32)


def random_tokens(seed, shape, vocab=TINY.vocab_size):
    return np.asarray(np.random.default_rng(seed).integers(0, vocab, size=shape), np.int32)


def random_hf_arrays(cfg, seed=0):
    """HF-named float32 weights for `cfg` (load with model_from_hf_state; building from numpy avoids
    compiling GPT's own init): matrices ~N(0, 0.02), LayerNorm gains 1 +- 0.05, biases +- 0.05."""
    from jaxllm.interop.hf import hf_tensor_specs

    rng = np.random.RandomState(seed)
    arrays = {}
    for name, spec in hf_tensor_specs(cfg).items():
        noise = rng.standard_normal(spec.shape).astype(np.float32)
        gain = name.endswith(".weight") and len(spec.shape) == 1
        arrays[name] = 1.0 + 0.05 * noise if gain else (0.05 if spec.is_bias else 0.02) * noise
    return arrays


def run_main(argv):
    """(exit code, stdout, stderr) of `jaxllm *argv`."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()
