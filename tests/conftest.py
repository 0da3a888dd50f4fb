"""Shared test setup: a per-session XLA compilation cache and a tiny pretraining recipe."""

import os
import shutil
import tempfile

import jax
import pytest

_CACHE_DIR = None


def pytest_configure(config):
    """The suite's time is almost all XLA compilation of tiny programs, so:
    - a persistent XLA cache, fresh for every session, turns the many identical recompiles (each
      run_pretrain re-jits its step) into cache hits; it must be set before the first compilation,
      hence here rather than in a fixture, and is exported so subprocesses share it;
    - LLVM's backend optimisation is turned off (unless XLA_FLAGS already sets it): it halves
      compile time, does not change float semantics (no fast-math), and tiny models gain nothing
      from optimised loops. Both are read when the backend starts, before any test runs.
    - 8 host CPU devices, so data-parallel code runs on a mesh in every training test (a batch of 4
      splits over 4 devices), as it does through the CLI on a multi-core machine;
    - deterministic GPU kernels (ignored on CPU): the embedding gradient is a scatter-add, which
      XLA:GPU otherwise sums in a racy order, so a resumed run would match only to ~1e-7."""
    global _CACHE_DIR
    for flag in ("--xla_backend_optimization_level=0", "--xla_force_host_platform_device_count=8",
                 "--xla_gpu_deterministic_ops=true"):
        if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    # The fp32 tolerances below assume fp32 matmuls; on GPUs XLA's default would use TF32 (~1e-4).
    jax.config.update("jax_default_matmul_precision", "highest")
    _CACHE_DIR = tempfile.mkdtemp(prefix="jaxllm-xla-cache-")
    jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


def pytest_unconfigure(config):
    if _CACHE_DIR is not None:
        shutil.rmtree(_CACHE_DIR, ignore_errors=True)


# About 7 KB of varied text with ~40 distinct characters.
CORPUS = "".join(
    f"line {i}: the {['quick', 'slow', 'lazy', 'brave'][i % 4]} brown fox number {i * 7 % 13} "
    f"jumps over {i % 5} dogs; {'ABCDEFG'[i % 7]}!\n"
    for i in range(120))


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_overrides(corpus_file):
    """overrides(root, *extra) -> `section.key=value` list for a 2-layer, 32-wide model trained for a
    few steps on `corpus_file`, every output inside `root`; `extra` items override these."""

    def overrides(root, *extra):
        return [
            f"data.source={corpus_file}", f"data.dataset_dir={root}/data", f"train.out_dir={root}/run",
            "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=16",
            "model.dropout=0.0",
            "optim.warmup_iters=2", "optim.lr_decay_iters=20",
            "train.batch_size=4", "train.max_iters=6", "train.eval_interval=0", "train.ckpt_interval=0",
            "train.log_interval=1", "train.progress=false", "train.tensorboard=false",
            "train.peak_flops=1e11",  # skip measuring the matmul peak
            "data.eval_batch_size=8", "data.eval_batches=2",
            "sample.max_new_tokens=8",
            *extra,
        ]
    return overrides
