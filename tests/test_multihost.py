"""Several processes (jax.distributed on localhost): a mesh spanning two processes trains like one
process with the same devices, and writes a checkpoint that one process restores; `jaxllm pretrain`
launched as two processes (each building only its own rows of every batch) gives one process's
losses and evaluations, writes its run directory once, and resumes exactly; a coordinator that
cannot be reached is a clear error after the timeout, not a hang."""

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


# `jaxllm pretrain` itself across two processes: the settings both the two-process run and its
# one-process reference use (with train.mesh over 8 devices in both), on a tiny prepared corpus.
PRETRAIN = ["model.n_layer=2", "model.n_head=4", "model.n_embd=32", "model.block_size=16", "model.dropout=0.1",
            "train.batch_size=8", "train.mesh=data:2,fsdp:4", "train.eval_interval=2", "train.ckpt_interval=2",
            "train.log_interval=1", "train.progress=false", "train.peak_flops=1e11", "data.eval_batch_size=8",
            "optim.warmup_iters=2", "optim.lr_decay_iters=6", "sample.max_new_tokens=8"]


def _tiny_corpus(tmp_path):
    from jaxllm.data import prepare
    rng = np.random.default_rng(0)
    words = ["the", "king", "and", "queen", "of", "a", "castle", "rode", "to", "sea", "in", "night"]
    (tmp_path / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words, 8)) + "." for _ in range(150)))
    return prepare(str(tmp_path / "corpus.txt"), tmp_path / "data", tokenizer="char")


def _launch(argvs, port, timeout=240) -> list[str]:
    """Two processes of `jaxllm` (tests/multihost_worker.py cli), 4 CPU devices each, joined through
    the environment variables the CLI reads; their outputs, once both exit 0."""
    procs = []
    for i in range(2):
        env = _worker_env(4)
        # JAX_NUM_CPU_DEVICES, as DESIGN.md advises for CPU collectives (the flag the CLI's
        # setup_cpu adds then counts for nothing: jax's own setting wins)
        env["XLA_FLAGS"] = " ".join(f for f in env["XLA_FLAGS"].split()
                                    if not f.startswith("--xla_force_host_platform_device_count"))
        env.update(JAX_NUM_CPU_DEVICES="4", JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(i))
        procs.append(subprocess.Popen([sys.executable, str(HERE / "multihost_worker.py"), "cli", json.dumps(argvs)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    return outputs


def _params(run_dir, step):
    from jaxllm.runs import load_checkpoint
    return worker.flat_params(load_checkpoint(run_dir, step)[0])


@pytest.mark.skipif(len(jax.devices()) != 8, reason="tests/conftest.py forces 8 CPU devices")
def test_jaxllm_pretrain_across_two_processes_matches_one_process_writes_once_and_resumes_exactly(tmp_path):
    from jaxllm.configfile import load_config
    from jaxllm.data import TokenDataset
    from jaxllm.stages.pretrain import PretrainConfig, run_pretrain
    from jaxllm.tokenizer import load_tokenizer
    from jaxllm.training.checkpoint import Checkpointer
    from jaxllm.training.metrics import read_metrics

    ds = _tiny_corpus(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    common = PRETRAIN + [f"data.dataset_dir={ds}"]
    # 4 steps; then new processes resume to 6, naming only the run, the new length and no end sample
    # (the rest is the run's own settings)
    first = _launch([["pretrain", *common, f"train.out_dir={two}", "train.max_iters=4"]], _free_port())
    assert Checkpointer(two, create=False).all_steps() == [2, 4]
    then = _launch([["pretrain", "--resume", f"train.out_dir={two}", "train.max_iters=6", "sample.max_new_tokens=0"]],
                   _free_port())
    outputs = [a + b for a, b in zip(first, then)]
    # the reference: one process, the same 8-device mesh, 6 steps without a stop
    run_pretrain(load_config(PretrainConfig, None, common + [f"train.out_dir={one}", "train.max_iters=6"]))

    # each process built only its half of every batch (the sampler's rows), in both launches
    assert outputs[0].count("mesh data:2, fsdp:4, tensor:1 over 8 devices of 2 processes; each builds only its "
                            "own rows of the batch (process 0: 4 of 8)") == 2, outputs[0][-3000:]
    # only process 0 prints (the other's stdout is quiet), the first launch's sample among it
    assert "finished 6 steps" in outputs[0] and outputs[0].count("--- sample ---") == 1
    assert not any(s in outputs[1] for s in ("MFU is measured", "model:", "finished", "sample"))

    got, want = read_metrics(two), read_metrics(one)   # each line parses: no interleaved writes
    def curve(records, key):
        steps = [r["step"] for r in records if key in r]
        assert len(steps) == len(set(steps)), f"{key} logged twice at a step: {steps}"
        return {r["step"]: r[key] for r in records if key in r}
    print("two processes:", curve(got, "loss"), curve(got, "val_loss"))
    print("one process:  ", curve(want, "loss"), curve(want, "val_loss"))
    assert list(curve(got, "loss")) == [1, 2, 3, 4, 5, 6] and list(curve(got, "val_loss")) == [2, 4, 6]
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose(list(curve(got, key).values()), list(curve(want, key).values()), rtol=1e-5)

    # the run directory holds what one process writes: one TensorBoard file per launch, no leftovers
    assert sorted(p.name for p in two.iterdir()) == ["checkpoints", "metrics.jsonl", "tensorboard", "tokenizer"]
    assert len(list((two / "tensorboard").iterdir())) == 2
    assert load_tokenizer(two / "tokenizer").encode("the king") == TokenDataset(ds).tokenizer.encode("the king")
    assert Checkpointer(two, create=False).all_steps() == [2, 4, 6]
    # the checkpoints the two processes wrote together restore in this one process
    for step in (4, 6):
        a, b = _params(two, step), _params(one, step)
        assert set(a) == set(b)
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=f"{name} at step {step}")


@pytest.mark.skipif(len(jax.devices()) != 8, reason="tests/conftest.py forces 8 CPU devices")
def test_jaxllm_lora_across_two_processes_matches_one_process_and_writes_one_adapter(tmp_path):
    """A tuning stage across processes: `jaxllm lora` on a base run, 2 processes x 4 devices against
    one 8-device process: the same losses, one adapter folder (process 0 writes it, the others wait
    for it) that loads onto the base, and the LoRA checkpoints restore in one process."""
    from jaxllm.configfile import load_config
    from jaxllm.peft.files import load_adapter
    from jaxllm.runs import load_base
    from jaxllm.stages.finetune import FinetuneConfig, run_finetune
    from jaxllm.stages.pretrain import PretrainConfig, run_pretrain
    from jaxllm.training.metrics import read_metrics

    ds = _tiny_corpus(tmp_path)
    base = tmp_path / "base"
    run_pretrain(load_config(PretrainConfig, None, PRETRAIN + [f"data.dataset_dir={ds}", f"train.out_dir={base}",
                                                               "train.max_iters=4", "sample.max_new_tokens=0"]))
    # the tuning data prepared with the base's tokenizer: by process 0 alone, the other waiting for it
    lora = [f"init.path={base}", f"data.source={tmp_path / 'corpus.txt'}", f"data.dataset_dir={tmp_path / 'lora_data'}",
            "train.batch_size=8", "train.mesh=data:2,fsdp:4",
            "train.max_iters=4", "train.eval_interval=2", "train.ckpt_interval=2", "train.log_interval=1",
            "train.progress=false", "train.peak_flops=1e11", "data.eval_batch_size=8", "data.eval_batches=2",
            "optim.learning_rate=3e-2", "optim.warmup_iters=0", "optim.lr_decay_iters=4", "sample.max_new_tokens=0"]
    one, two = tmp_path / "one", tmp_path / "two"
    _launch([["lora", *lora, f"train.out_dir={two}"]], _free_port())
    reference = run_finetune(load_config(FinetuneConfig, None, lora + [f"train.out_dir={one}"]))

    got = {r["step"]: r["loss"] for r in read_metrics(two) if "loss" in r}
    want = {r["step"]: r["loss"] for r in read_metrics(one) if "loss" in r}
    print("two processes:", got, "\none process:  ", want)
    assert list(got) == [1, 2, 3, 4]
    np.testing.assert_allclose(list(got.values()), list(want.values()), rtol=1e-5)
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    model, _, _ = load_base(base)
    load_adapter(model, two / "adapter")
    a = worker.flat_params(model)
    model, _, _ = load_base(base)
    load_adapter(model, reference.adapter_dir)
    b = worker.flat_params(model)
    assert set(a) == set(b) and any("lora" in name for name in a)
    for name in a:
        # Adam at lr 3e-2 magnifies last-bit differences of the cross-process sums (~4e-6)
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.skipif(len(jax.devices()) != 8, reason="tests/conftest.py forces 8 CPU devices")
def test_jaxllm_sft_across_two_processes_matches_one_process_with_its_generated_evaluation(tmp_path):
    """SFT across processes: each builds its rows of the packed batches, and the exact-match
    evaluation generates on the mesh spanning both; losses and the evaluation equal one process's."""
    from jaxllm.alignment.sft import SFTConfig, run_sft
    from jaxllm.configfile import load_config
    from jaxllm.training.metrics import read_metrics

    sft = ["model.n_layer=2", "model.n_head=4", "model.n_embd=32", "model.block_size=64", "data.tasks=reverse",
           "data.n_train=200", "data.n_eval=16", "train.batch_size=8", "train.mesh=data:2,fsdp:4",
           "train.max_iters=4", "train.eval_interval=2", "train.ckpt_interval=2", "train.log_interval=1",
           "train.progress=false", "train.peak_flops=1e11", "optim.warmup_iters=0", "optim.learning_rate=3e-3",
           "eval.examples=16", "eval.batch_size=16"]
    one, two = tmp_path / "one", tmp_path / "two"
    outputs = _launch([["sft", *sft, f"train.out_dir={two}"]], _free_port())
    reference = run_sft(load_config(SFTConfig, None, sft + [f"train.out_dir={one}"]))
    got = {r["step"]: r["loss"] for r in read_metrics(two) if "loss" in r}
    want = {r["step"]: r["loss"] for r in read_metrics(one) if "loss" in r}
    print("two processes:", got, "\none process:  ", want, "\n", outputs[0][-1500:])
    assert list(got) == [1, 2, 3, 4]
    np.testing.assert_allclose(list(got.values()), list(want.values()), rtol=1e-5)
    # the evaluations at steps 2 and 4, exact match by generation included, are one process's
    evals = [{k: v for k, v in r.items() if k.startswith(("val_loss", "exact_match"))} for r in read_metrics(two)
             if "val_loss" in r]
    expected = [{k: v for k, v in r.items() if k.startswith(("val_loss", "exact_match"))} for r in read_metrics(one)
                if "val_loss" in r]
    assert len(evals) == 2 and all("exact_match/reverse" in e for e in evals)
    for e, x in zip(evals, expected):
        assert e.keys() == x.keys() and all(abs(e[k] - x[k]) <= 1e-5 * max(1.0, abs(x[k])) for k in e)
    assert reference.after["exact_match/reverse"] == evals[-1]["exact_match/reverse"]


@pytest.mark.skipif(len(jax.devices()) != 8, reason="tests/conftest.py forces 8 CPU devices")
def test_jaxllm_grpo_across_two_processes_samples_scores_and_trains_like_one_process(tmp_path):
    """Online RL across processes: rollouts sampled on the mesh spanning both (each process holds
    its rows of the completions, gathered for the reward functions), scored, trained and evaluated
    by greedy generation, with one 8-device process's numbers."""
    from jaxllm.alignment.grpo import GRPOConfig, run_grpo
    from jaxllm.cli import main
    from jaxllm.configfile import load_config
    from jaxllm.data.synthetic import make_splits
    from jaxllm.training.metrics import read_metrics

    quiet = ["train.eval_interval=0", "train.ckpt_interval=0", "train.log_interval=1", "train.progress=false",
             "train.tensorboard=false", "train.peak_flops=1e11"]
    assert main(["sft", f"train.out_dir={tmp_path}/sft", "data.tasks=add", "data.n_train=200", "data.n_eval=8",
                 "model.n_layer=1", "model.n_head=4", "model.n_embd=32", "model.block_size=24", "train.batch_size=8",
                 "train.max_iters=30", "optim.learning_rate=1e-2", "eval.examples=0", *quiet]) == 0
    train, held = make_splits(40, 8, tasks=("add",), format="compact")
    for name, records in (("train", train), ("eval", held)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    # a reward that varies within groups from the first step (exact match stays 0 for this model),
    # so that advantages, and the loss and its gradient, are not zero
    (tmp_path / "rewards.py").write_text("def ones(prompts, completions, **columns):\n"
                                         "    return [float(c.count('1')) for c in completions]\n")
    grpo = [f"init.path={tmp_path}/sft", f"data.train_file={tmp_path}/train.jsonl",
            f"grpo.reward_funcs=[{tmp_path}/rewards.py:ones]",
            f"data.eval_file={tmp_path}/eval.jsonl", *quiet, "train.batch_size=8", "data.eval_batch_size=8",
            "train.mesh=data:2,fsdp:4", "train.max_iters=2", "train.eval_interval=2", "rollout.max_new_tokens=5",
            "rollout.temperature=1.0", "grpo.num_generations=4", "peft.method=lora", "optim.learning_rate=1e-2"]
    one, two = tmp_path / "one", tmp_path / "two"
    _launch([["grpo", *grpo, f"train.out_dir={two}"]], _free_port())
    run_grpo(load_config(GRPOConfig, None, grpo + [f"train.out_dir={one}"]))
    keys = ("loss", "reward", "completions/mean_length", "entropy", "val_reward", "val_length")
    got, want = ([{k: r[k] for k in keys if k in r} for r in read_metrics(d)] for d in (two, one))
    print("two processes:", got, "\none process:  ", want)
    assert [list(r) for r in got] == [list(r) for r in want] and any("val_reward" in r for r in got)
    for a, b in zip(got, want):
        np.testing.assert_allclose(list(a.values()), list(b.values()), rtol=1e-5, atol=1e-6)
