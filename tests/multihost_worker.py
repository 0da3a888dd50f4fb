"""One process of tests/test_multihost.py (not a test itself): joins a two-process JAX run on
localhost, trains a tiny GPT for three steps on a mesh over both processes' devices, and prints
its losses; `train_tiny` is also the one-process reference.

`multihost_worker.py cli ARGVS_JSON` instead runs `jaxllm` (jaxllm.cli.main) once per argument list
in ARGVS_JSON, as a user's launcher would: the process joins the run through the JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID environment variables that the CLI reads."""

import json
import sys

import numpy as np

CONFIG = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)
BATCH = 8


def train_tiny(out_dir, mesh: str = "data:2,fsdp:4", steps: int = 3):
    from flax import nnx

    from jaxllm.config import GPTConfig
    from jaxllm.model import GPT
    from jaxllm.training.loop import LoopConfig, train_loop
    from jaxllm.training.optim import OptimConfig
    from jaxllm.training.step import lm_loss_fn

    cfg = GPTConfig(**CONFIG)
    model = GPT(cfg, rngs=nnx.Rngs(0))

    def batch_fn(step):   # the same global batch in every process, from (seed, step) alone
        x = np.random.default_rng([7, step]).integers(0, cfg.vocab_size, (1, BATCH, cfg.block_size + 1))
        return x[..., :-1].astype(np.int32), x[..., 1:].astype(np.int32)

    return train_loop(model, lm_loss_fn, batch_fn, optim=OptimConfig(warmup_iters=1, lr_decay_iters=10),
                      loop=LoopConfig(out_dir=str(out_dir), mesh=mesh, batch_size=BATCH, max_iters=steps,
                                      eval_interval=0, ckpt_interval=0, log_interval=1, progress=False,
                                      tensorboard=False, peak_flops=1e11),
                      meta={"model": cfg.to_dict()}, tokens_per_step=BATCH * cfg.block_size, flops_per_token=1.0)


def flat_params(model) -> dict:
    import jax
    from flax import nnx
    from jaxllm.parallel import path_name
    return {path_name(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]}


def run_cli(argvs) -> int:
    from jaxllm.cli import main
    for argv in argvs:
        rc = main(argv)
        if rc:
            return rc
    return 0


if __name__ == "__main__" and sys.argv[1] == "cli":
    sys.exit(run_cli(json.loads(sys.argv[2])))
elif __name__ == "__main__":
    port, process_id, out_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    from jaxllm import parallel
    parallel.initialize(f"localhost:{port}", 2, process_id, timeout_s=60)
    import jax
    result = train_tiny(f"{out_dir}/run")
    np.savez(f"{out_dir}/weights_{process_id}.npz", **flat_params(result.model))
    print("RESULT " + json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                                  "devices": len(jax.devices()), "local_devices": len(jax.local_devices()),
                                  "losses": [result.losses[i] for i in range(3)]}), flush=True)
