"""Shared by several test files: the tiny model config, random token ids, the in-process CLI runner."""

import contextlib
import io

import numpy as np

from jaxllm.cli import main
from jaxllm.config import GPTConfig

TINY = GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32)


def random_tokens(seed, shape, vocab=TINY.vocab_size):
    return np.asarray(np.random.default_rng(seed).integers(0, vocab, size=shape), np.int32)


def run_main(argv):
    """(exit code, stdout, stderr) of `jaxllm *argv`."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()
