"""Several processes (jax.distributed on localhost): a mesh spanning two processes trains like one
process with the same devices, and writes a checkpoint that one process restores; a coordinator
that cannot be reached is a clear error after the timeout, not a hang."""

import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxllm import parallel

HERE = pathlib.Path(__file__).parent
spec = importlib.util.spec_from_file_location("multihost_worker", HERE / "multihost_worker.py")
worker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(worker)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _worker_env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.skipif(len(jax.devices()) != 8, reason="tests/conftest.py forces 8 CPU devices")
def test_two_processes_train_like_one_process_with_their_devices_and_one_process_restores(tmp_path):
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(HERE / "multihost_worker.py"), str(port), str(i), str(tmp_path)],
                              env=_worker_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    reports = []
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
        reports.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    assert [(r["process"], r["processes"], r["devices"], r["local_devices"]) for r in reports] == [(0, 2, 8, 4), (1, 2, 8, 4)]
    # only process 0 logs
    assert "MFU is measured" in outputs[0] and "MFU is measured" not in outputs[1]

    reference = worker.train_tiny(tmp_path / "one", mesh="data:2,fsdp:4")
    expected = [reference.losses[i] for i in range(3)]
    print(f"two processes: {reports[0]['losses']}, one process with 8 devices: {expected}")
    for r in reports:
        np.testing.assert_allclose(r["losses"], expected, rtol=1e-5)
    want = worker.flat_params(reference.model)
    got = [dict(np.load(tmp_path / f"weights_{i}.npz")) for i in range(2)]
    assert set(got[0]) == set(want)
    for name in want:
        np.testing.assert_array_equal(got[0][name], got[1][name])   # both processes hold the same model
        np.testing.assert_allclose(got[0][name], want[name], rtol=1e-5, atol=1e-6)

    # the checkpoint both processes wrote together restores in this one process, equal bit for bit
    from flax import nnx
    from jaxllm.config import GPTConfig
    from jaxllm.model import GPT
    from jaxllm.training.checkpoint import Checkpointer
    ckpt = Checkpointer(tmp_path / "run", create=False)
    assert ckpt.all_steps() == [3]
    model = GPT(GPTConfig(**worker.CONFIG), rngs=nnx.Rngs(1))
    nnx.update(model, ckpt.restore_model(nnx.state(model)))
    restored = worker.flat_params(model)
    for name in want:
        np.testing.assert_array_equal(restored[name], got[0][name])
    assert int(ckpt.restore_train({"step": jax.numpy.zeros((), jax.numpy.int32), "opt_state": reference_opt_state(reference)})["step"]) == 3


def reference_opt_state(result):
    """An optimizer state shaped like the run's (its values are not used: a restore target)."""
    from flax import nnx
    from jaxllm.training.optim import OptimConfig, make_optimizer
    return make_optimizer(OptimConfig(warmup_iters=1, lr_decay_iters=10)).init(nnx.state(result.model, nnx.Param))


def test_an_unreachable_coordinator_is_an_error_after_the_timeout_naming_the_address_and_fix(tmp_path):
    port = _free_port()
    code = ("from jaxllm import parallel\n"
            f"parallel.initialize('localhost:{port}', num_processes=2, process_id=1, timeout_s=3)\n")
    out = subprocess.run([sys.executable, "-c", code], env=_worker_env(1), capture_output=True, text=True, timeout=120)
    print(out.stderr[-2000:])
    assert out.returncode != 0
    assert f"process 1 of 2 waited 3 s for the coordinator (process 0) to answer at localhost:{port}" in out.stderr
    assert "Start every process (process 0 first)" in out.stderr


def test_bad_process_settings_are_refused_naming_them(monkeypatch):
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match=r"JAX_NUM_PROCESSES='two' is not an integer"):
        parallel.initialize("localhost:1234", process_id=0)
    with pytest.raises(ValueError, match=r"process_id \(JAX_PROCESS_ID\) is 2 but there are 2 processes"):
        parallel.initialize("localhost:1234", num_processes=2, process_id=2)
