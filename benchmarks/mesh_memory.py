"""Memory per device of a GPT-2 train step under data, FSDP and tensor parallelism (train.mesh),
on 8 forced CPU devices, from the compiled step alone (nothing runs, no weights are made).

For each layout and preset: the compiled step's `memory_analysis()` (XLA's buffer assignment for
one device's program: arguments, outputs, temporaries; donated state aliases its outputs) and the
bytes of parameters + AdamW state one device holds (each array's shard shape under the partition
rules). Peak per device is estimated as arguments + outputs - aliased + temporaries.

Layouts: data:8 (each device holds everything), fsdp:8 (params, grads and moments split 8 ways),
and tensor parallelism: GPT-2's 12 heads do not split over 8, so tensor:4,data:2 stands in for
tensor:8 (gpt2-xl's 25 heads split over neither 4 nor 8: it has no tensor layout here).
Batch: 8 sequences of the preset's block (1024) in one micro-batch, fp32, no recomputation.

--largest: also each layout's largest preset whose step fits `--budget-gib` (24) per device,
compiling presets in order of size until one does not fit (gpt2-xl's compile takes minutes).
Prints JSON and writes benchmarks/results/mesh_memory.json.

    python benchmarks/mesh_memory.py                 # gpt2 under the three layouts
    python benchmarks/mesh_memory.py --largest       # + the largest preset within 24 GiB per layout
"""

from __future__ import annotations

import os

# 8 CPU devices, set before JAX starts. LLVM's optimisation of the generated code does not change
# XLA's buffer assignment (what memory_analysis reports), and takes most of the compile time.
_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
os.environ["XLA_FLAGS"] = " ".join(_flags + ["--xla_force_host_platform_device_count=8"]
                                   + ([] if "xla_backend_optimization_level" in " ".join(_flags)
                                      else ["--xla_backend_optimization_level=0"]))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxllm import parallel  # noqa: E402
from jaxllm.config import GPTConfig  # noqa: E402
from jaxllm.model import GPT  # noqa: E402
from jaxllm.training.optim import OptimConfig, lr_schedule, make_optimizer  # noqa: E402
from jaxllm.training.step import TrainState, abstract_train_state, lm_loss_fn, make_train_step  # noqa: E402

LAYOUTS = {"data:8": "data:8", "fsdp:8": "fsdp:8", "tensor:4,data:2 (for tensor:8)": "tensor:4,data:2"}
BY_SIZE = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
GIB = 2 ** 30


def measure(preset: str, spec: str, batch: int) -> dict:
    cfg = GPTConfig.preset(preset)
    mesh = parallel.make_mesh(spec)
    try:
        parallel.check_model_split(cfg, mesh, spec)
        parallel.check_batch_size(batch, mesh, spec)
    except ValueError as err:
        return {"preset": preset, "mesh": spec, "skipped": str(err)}
    optim = OptimConfig()
    optimizer = make_optimizer(optim)
    graphdef, state = abstract_train_state(lambda: GPT(cfg, rngs=nnx.Rngs(0)), optimizer)
    params = parallel.state_shardings(state.trainable, mesh)
    sharding = TrainState(parallel.replicated(mesh), params, parallel.state_shardings(state.frozen, mesh),
                          parallel.opt_state_shardings(optimizer, state.opt_state, params, mesh))
    placed = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, sharding)
    state_bytes = sum(int(np.prod(s.shard_shape(a.shape))) * a.dtype.itemsize
                      for a, s in zip(jax.tree.leaves(state), jax.tree.leaves(sharding)))
    total_bytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(state))
    rows = parallel.batch_sharding(mesh, 1)
    x = jax.ShapeDtypeStruct((1, batch, cfg.block_size), jnp.int32, sharding=rows)
    step = make_train_step(graphdef, lm_loss_fn, optimizer, lr_schedule(optim), mesh, state_sharding=sharding)
    t0 = time.perf_counter()
    compiled = step.lower(placed, (x, x), jax.random.key(0)).compile()
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return {"preset": preset, "mesh": spec, "params": cfg.num_params(), "batch": batch, "block": cfg.block_size,
            "params_and_adam_total_gib": total_bytes / GIB,
            "params_and_adam_per_device_gib": state_bytes / GIB,
            "argument_gib": m.argument_size_in_bytes / GIB, "output_gib": m.output_size_in_bytes / GIB,
            "alias_gib": m.alias_size_in_bytes / GIB, "temp_gib": m.temp_size_in_bytes / GIB,
            "peak_per_device_gib": peak / GIB, "compile_s": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--presets", default="gpt2", help="comma-separated presets to measure under every layout")
    ap.add_argument("--largest", action="store_true", help="also find each layout's largest preset within the budget")
    ap.add_argument("--budget-gib", type=float, default=24.0)
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "mesh_memory.json"))
    args = ap.parse_args()
    assert len(jax.devices()) == 8, jax.devices()
    runs = []
    for preset in args.presets.split(","):
        for name, spec in LAYOUTS.items():
            r = measure(preset, spec, args.batch)
            print(json.dumps(r), flush=True)
            runs.append(r)
    largest = {}
    if args.largest:
        for name, spec in LAYOUTS.items():
            largest[name] = None
            for preset in BY_SIZE:
                r = next((x for x in runs if x["preset"] == preset and x["mesh"] == spec), None) or measure(preset, spec, args.batch)
                if r not in runs:
                    print(json.dumps(r), flush=True)
                    runs.append(r)
                if "skipped" in r:
                    continue
                if r["peak_per_device_gib"] > args.budget_gib:
                    break
                largest[name] = preset
    out = {"devices": "8 forced CPU devices (XLA_FLAGS)", "jax": jax.__version__, "budget_gib": args.budget_gib,
           "peak_formula": "argument + output - alias + temp (memory_analysis of the compiled step, one device)",
           "runs": runs, "largest_within_budget": largest}
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
