"""Kill -9 soak of pretraining with --resume, and a fuzz of what the CLI reads (JSONL, YAML, key=value).

    python benchmarks/soak_resume.py            # 30 kills + 1,500 fuzzed inputs (~8 min on 2 cores)
    python benchmarks/soak_resume.py --quick    # 6 kills + 180 inputs (~1.5 min): checks the script
    python benchmarks/soak_resume.py --skip-fuzz --kills 40 --modes after,write   # aim every kill at Orbax

Part 1, the soak. A tiny model (2 layers x 32, block 32, dropout 0.1, batch 4) trains on the bundled
tiny-shakespeare (char level, prepared once) for `--steps` steps with a checkpoint every
`train.ckpt_interval` steps (3 kept) and a metrics record every step. An unbroken reference run goes
first. The soak run is `jaxllm pretrain ... --resume` started as a subprocess and killed with SIGKILL,
`--kills` times, then left to finish. Each kill is one of:
  startup  - a random moment in the first seconds (imports, compilation, restore, tokenizer write);
  train    - once the launch has trained past a random step, after a further random delay;
  write    - once an Orbax temporary directory (`<step>.orbax-checkpoint-tmp`, what Orbax 0.12.8
             writes before renaming it to `<step>`) appears, after 0-150 ms: a checkpoint write;
  after    - 0-60 ms after a checkpoint directory is renamed into place, where Orbax finalises it
             and deletes the oldest one (train.keep_ckpts; a kill halfway through that deletion
             used to leave a listed step that did not restore, see jaxllm.training.checkpoint).
After every kill (the process is dead, nothing changes on disk):
  - every step Orbax lists as complete must restore: its meta JSON, the model through
    jaxllm.runs.load_checkpoint, the train item (step counter + optimizer state) whose step must
    equal the directory's; anything that fails counts as an unreadable checkpoint;
  - "reached" is the last step this launch recorded in metrics.jsonl (one record per step,
    written and flushed after the step's loss came back from the device, so the step is done; records
    of earlier launches are told apart by their timestamps); lost = reached - latest complete
    checkpoint (the step the next launch resumes from), in steps;
  - the kill "landed during a checkpoint write" when an Orbax temporary directory that did not
    exist after the previous kill is left behind.
Checkpoints are written in the background from host copies, and Orbax starts a save only once the
previous one is complete, so the resume point is the newest checkpoint that finished writing. A kill
while checkpoint k is being written resumes from k - interval, and the loop may have trained up to
k + interval meanwhile (it then waits for k before it starts k + interval). The bound checked per
kill is therefore: lost <= ckpt_interval when no write was in flight, lost <= 2 x ckpt_interval when
one was. How long a write takes is measured on the reference run (Orbax temporary directories
polled every 2 ms): when writes take longer than an interval of training, nearly every kill lands
during one. With --sync-checkpoints (train.async_checkpoints=false) each save completes before
training goes on, and the bound is one interval for every kill.
At the end the soak run's final checkpoint must equal the reference's bit for bit: every array of
the model state and of the train item (optimizer moments, counts, step), np.array_equal, same
dtypes; its metrics.jsonl must hold each step's loss once, equal to the reference's.

Part 2, the fuzz, in-process (`jaxllm.cli.main(argv)`, stdout/stderr captured), each input in a fresh
working directory:
  jsonl     - `jaxllm sft` from scratch (BPE tokenizer of 300 ids, 1 layer x 16, 1 step) on a valid
              prompt/completion, Alpaca or chat file with one line mutated (in the train file or the
              eval file; data.on_error raise or skip);
  yaml      - `jaxllm pretrain CONFIG.yaml` with a mutated config (a tiny 1-step recipe on a small
              corpus): structural mutations (values of wrong type or range, unknown keys, sections
              as scalars, non-mapping documents) and textual ones (byte flips, truncation, indentation,
              YAML syntax, invalid UTF-8);
  overrides - `jaxllm pretrain | lora | sft` key=value overrides and `jaxllm sample` flags, keys and
              values mutated.
Outcomes: ok (exit 0), clear error (exit 2 with a `jaxllm <cmd>: error: ...` message, or argparse's
exit 2 with usage), traceback (any other exception out of main: a defect), timeout (a valid input
that runs longer than --case-timeout; not a defect), other. A clear error that does not name what is
wrong (JSONL: the file; YAML: the file or a config key; overrides: the key, flag or value) is also
counted as `unnamed`. Half-written, checked after every input, everywhere under its working
directory: (a) a temporary entry (`*.orbax-checkpoint-tmp*`, `.*.tmp-*`, `.*.old-*`, `*.tmp`);
(b) a checkpoint step Orbax lists that does not restore (meta + model); (c) after an error, a run
directory with a tokenizer/ or adapter/ but no complete checkpoint; (d) after exit 0, a training
command that left no complete checkpoint.

Huge values are not fed to settings whose valid huge values are legitimate but enormous requests
(model sizes, batch sizes, max_iters, sample lengths, example counts): there they would train or
allocate for hours, which is not a parsing defect. Every other setting gets them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import typing
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

# The subprocesses get the environment the user has: not the flags this process adds for itself.
CLEAN_ENV = dict(os.environ)
CLEAN_ENV["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])

ORBAX_TMP = ".orbax-checkpoint-tmp"
TEMP_NAME = re.compile(r"(\.orbax-checkpoint-tmp|^\..*\.tmp-|^\..*\.old-|\.tmp$)")


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "jaxllm.cli", *map(str, args)]


def _setup_jax(cache_dir: Path) -> None:
    """As the CLI does (one device per core), plus a persistent compilation cache, which turns the
    fuzz's many identical tiny compilations into cache hits. (Not --xla_backend_optimization_level=0:
    with it, XLA:CPU's all-reduce across the 2 devices here hung ~1 run in 2, and aborted the process
    after 60 s.)"""
    from jaxllm import parallel

    parallel.setup_cpu()
    import jax
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)   # Orbax's warnings about items not restored
    jax.config.update("jax_compilation_cache_dir", str(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# =========================================================================== part 1: the kill soak


def _metric_records(run: Path, since: float, tail: int | None = None) -> list[dict]:
    """Loss records of metrics.jsonl written at or after `since` (a line cut by a kill is skipped)."""
    path = run / "metrics.jsonl"
    try:
        with open(path, "rb") as f:
            if tail is not None:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - tail))
            data = f.read()
    except FileNotFoundError:
        return []
    out = []
    for line in data.split(b"\n"):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and "loss" in r and r.get("time", 0) >= since:
            out.append(r)
    return out


def _reached(run: Path, since: float, tail: int | None = None) -> int | None:
    recs = _metric_records(run, since, tail)
    return max(r["step"] for r in recs) if recs else None


def _orbax_tmp(run: Path) -> dict[str, tuple]:
    """Orbax temporary directories in run/checkpoints: name -> (inode, ctime). After a kill nothing
    changes, so (name, inode, ctime) tells a directory left by this kill from one left by an earlier
    kill (Orbax deletes and recreates the temporary directory of a step it writes again)."""
    out = {}
    try:
        for e in os.scandir(run / "checkpoints"):
            if ORBAX_TMP in e.name:
                try:
                    st = e.stat(follow_symlinks=False)
                    out[e.name] = (st.st_ino, st.st_ctime_ns)
                except FileNotFoundError:
                    pass
    except FileNotFoundError:
        pass
    return out


def _final_steps(run: Path) -> set[int]:
    try:
        return {int(n) for n in os.listdir(run / "checkpoints") if n.isdigit()}
    except FileNotFoundError:
        return set()


def _check_checkpoints(run: Path, kind: str = "pretrain") -> tuple[list[int], list[dict]]:
    """(complete steps, unreadable ones) of a run: every listed step must restore completely."""
    import orbax.checkpoint as ocp

    from jaxllm.runs import load_checkpoint
    from jaxllm.training.checkpoint import Checkpointer

    if not (run / "checkpoints").is_dir():
        return [], []
    ck = Checkpointer(run, create=False)
    bad = []
    try:
        steps = sorted(ck.all_steps())
        for s in steps:
            try:
                meta = ck.read_meta(s)
                if kind is not None and meta.get("kind") != kind:
                    raise ValueError(f"meta kind {meta.get('kind')!r}")
                if kind != "lora" or not meta.get("base"):
                    train = ck.manager.restore(s, args=ocp.args.Composite(train=ocp.args.StandardRestore()))["train"]
                    if int(train["step"]) != s:
                        raise ValueError(f"train state step {int(train['step'])} in directory {s}")
                load_checkpoint(run, s)
            except Exception as e:  # noqa: BLE001 - any failure is what is counted
                bad.append({"step": s, "error": f"{type(e).__name__}: {e}"[:400]})
    finally:
        ck.close()
    return steps, bad


def _flat_state(run: Path, step: int) -> dict[str, "np.ndarray"]:
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    from flax import nnx

    from jaxllm.runs import load_checkpoint
    from jaxllm.training.checkpoint import Checkpointer

    model, *_ = load_checkpoint(run, step)
    ck = Checkpointer(run, create=False)
    try:
        train = ck.manager.restore(step, args=ocp.args.Composite(train=ocp.args.StandardRestore()))["train"]
    finally:
        ck.close()
    out = {}
    for prefix, tree in (("model", nnx.to_pure_dict(nnx.state(model))), ("train", train)):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            out[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


def _kill_schedule(n: int, rng: random.Random, only: str | None = None) -> list[str]:
    if only:   # --modes: kills of these kinds only, in turn
        kinds = only.split(",")
        return [kinds[i % len(kinds)] for i in range(n)]
    base = max(1, n // 8)
    modes = ["startup"] * base + ["after"] * base
    rest = n - len(modes)
    modes += ["write"] * ((rest + 1) // 2) + ["train"] * (rest // 2)
    rng.shuffle(modes)
    return modes[:n]


def _wait(proc, cond, deadline: float, every: float):
    """Poll cond() until it returns a value; None if the process ended or the deadline passed."""
    while time.time() < deadline:
        if proc.poll() is not None:
            return None
        v = cond()
        if v:
            return v
        time.sleep(every)
    return None


def soak(args, work: Path, rng: random.Random) -> dict:
    t_all = time.time()
    N, I = args.steps, args.ckpt_interval
    data, ref, run = work / "data", work / "reference", work / "soak"
    p = subprocess.run(_cli("prepare", "--out", data), env=CLEAN_ENV, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"jaxllm prepare failed:\n{p.stderr[-3000:]}")
    settings = [
        f"data.dataset_dir={data}", "data.eval_batches=2", "data.eval_batch_size=16",
        "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "model.dropout=0.1",
        "optim.warmup_iters=20", f"optim.lr_decay_iters={N}",
        "train.batch_size=4", f"train.max_iters={N}", f"train.ckpt_interval={I}", "train.log_interval=1",
        f"train.eval_interval={max(I, N // 4)}", f"train.keep_ckpts={args.keep_ckpts}",
        "train.progress=false", "train.tensorboard=false", "train.peak_flops=1e11", "sample.max_new_tokens=0",
    ] + (["train.async_checkpoints=false"] if args.sync_checkpoints else [])
    print(f"[soak] reference run: {N} steps, checkpoint every {I}", flush=True)
    t0 = time.time()
    with open(work / "reference.log", "w") as log:
        proc = subprocess.Popen(_cli("pretrain", *settings, f"train.out_dir={ref}"), env=CLEAN_ENV,
                                stdout=log, stderr=subprocess.STDOUT)
        seen: dict[str, list[float]] = {}   # Orbax temporary directory -> [first, last] seen
        while proc.poll() is None:
            now = time.time()
            for name in _orbax_tmp(ref):    # one name per step in an unbroken run
                seen.setdefault(name, [now, now])[1] = now
            time.sleep(0.002)
    ref_seconds = time.time() - t0
    if proc.returncode:
        raise SystemExit(f"the reference run failed:\n{(work / 'reference.log').read_text()[-3000:]}")
    writes = sorted(last - first for first, last in seen.values())
    recs = _metric_records(ref, t0)
    startup = min(r["time"] for r in recs) - t0
    step_seconds = (max(r["time"] for r in recs) - min(r["time"] for r in recs)) / max(1, N - 1)
    write_median = writes[len(writes) // 2] if writes else None
    print(f"[soak] reference: {ref_seconds:.1f} s ({startup:.1f} s to the first step, "
          f"{step_seconds * 1e3:.1f} ms/step with checkpoints; {len(writes)} checkpoint writes seen, median "
          f"{(write_median or 0) * 1e3:.0f} ms)", flush=True)

    modes = _kill_schedule(args.kills, rng, args.modes)
    kills: list[dict] = []
    seen_tmp: set[tuple] = set()
    launches, failure = 0, None
    while True:
        start = max(_final_steps(run), default=0)
        log = open(work / f"launch{launches:02d}.log", "w")
        t_launch = time.time()
        proc = subprocess.Popen(_cli("pretrain", *settings, f"train.out_dir={run}", "--resume"),
                                stdout=log, stderr=subprocess.STDOUT, env=CLEAN_ENV)
        launches += 1
        if len(kills) >= args.kills:   # the last launch runs to the end
            rc = proc.wait(timeout=max(600, 5 * ref_seconds))
            log.close()
            if rc != 0:
                failure = f"final launch exited {rc}: " + (work / f"launch{launches - 1:02d}.log").read_text()[-2000:]
            break
        mode = modes[len(kills)]
        remaining = N - start
        span = max(1, int(1.6 * remaining / (args.kills - len(kills) + 1)))
        target = min(N - 1, start + rng.randint(1, span))
        deadline = t_launch + startup * 4 + 120
        trained = lambda: (r := _reached(run, t_launch, tail=4096)) is not None and r >= target  # noqa: E731
        landed = True
        if mode == "startup":
            time.sleep(rng.uniform(0.05, startup))
        elif mode == "train":
            landed = _wait(proc, trained, deadline, 0.02) is not None
            time.sleep(rng.uniform(0, I * step_seconds))
        elif mode == "write":
            landed = _wait(proc, trained, deadline, 0.02) is not None
            # (name, inode): a directory's ctime changes while it is written
            known = {(n, i[0]) for n, i in _orbax_tmp(run).items()}
            landed = landed and _wait(proc, lambda: {(n, i[0]) for n, i in _orbax_tmp(run).items()} - known,
                                      deadline, 0.002) is not None
            time.sleep(rng.choice([0.0, rng.uniform(0, 0.15)]))
        else:  # after: just past a checkpoint's rename, where Orbax finalises and deletes the oldest
            landed = _wait(proc, trained, deadline, 0.02) is not None
            before = _final_steps(run)
            landed = landed and _wait(proc, lambda: _final_steps(run) - before, deadline, 0.002) is not None
            time.sleep(rng.uniform(0, 0.06))
        if proc.poll() is not None:   # ended on its own before the kill
            log.close()
            text = (work / f"launch{launches - 1:02d}.log").read_text()
            if proc.returncode == 0:
                failure = f"the run finished after {len(kills)} kills (fewer than {args.kills}); raise --steps"
            else:
                failure = f"launch {launches - 1} exited {proc.returncode} on its own: {text[-2000:]}"
            break
        t_kill = time.time() - t_launch
        os.kill(proc.pid, signal.SIGKILL)
        rc = proc.wait()
        log.close()
        # --- the process is dead: what it left is what a resume finds
        tmp_now = {(n, *i) for n, i in _orbax_tmp(run).items()}
        fresh_tmp = tmp_now - seen_tmp
        seen_tmp |= tmp_now
        steps, bad = _check_checkpoints(run)
        latest = max(steps, default=0)
        reached = _reached(run, t_launch)
        reached = start if reached is None else reached
        lost = reached - latest
        in_flight = bool(fresh_tmp)
        # synchronous checkpoints: a save completes before the next step, so one interval at most
        within = lost <= I or (not args.sync_checkpoints and in_flight and lost <= 2 * I)
        kills.append({
            "mode": mode, "landed_as_aimed": bool(landed), "seconds_after_launch": round(t_kill, 3),
            "exit": rc, "resumed_from": start, "reached": reached, "latest_complete": latest,
            "lost_steps": lost, "write_in_flight": in_flight,
            "in_flight_dirs": sorted(n for n, *_ in fresh_tmp), "complete_steps": steps,
            "unreadable": bad, "regressed": latest < start, "within_bound": within,
        })
        print(f"[soak] kill {len(kills):2d} ({mode:7s}) at {t_kill:5.2f} s: reached {reached}, resumes from "
              f"{latest} (lost {lost}){' during a write' if in_flight else ''}"
              f"{'  UNREADABLE ' + str(bad) if bad else ''}", flush=True)

    result = {"kills": len(kills), "launches": launches, "failure": failure}
    if failure is None:
        import numpy as np

        a, b = _flat_state(ref, N), _flat_state(run, N)
        diff = sorted(k for k in a.keys() | b.keys()
                      if k not in a or k not in b or a[k].dtype != b[k].dtype or not np.array_equal(a[k], b[k]))
        ref_loss = {r["step"]: r["loss"] for r in _metric_records(ref, 0)}
        soak_recs = _metric_records(run, 0)
        soak_loss = {r["step"]: r["loss"] for r in soak_recs}
        final_steps, final_bad = _check_checkpoints(run)
        leftovers = sorted(str(p.relative_to(run)) for p in run.rglob("*") if TEMP_NAME.search(p.name))
        deleted = run / "checkpoints" / ".deleted"    # what Orbax moved out of the steps, to delete
        leftovers += sorted(str(p.relative_to(run)) for p in deleted.iterdir()) if deleted.is_dir() else []
        result.update({
            "bit_identical": not diff,
            "arrays_compared": len(a), "model_arrays": sum(k.startswith("model") for k in a),
            "train_arrays": sum(k.startswith("train") for k in a), "arrays_differing": diff[:10],
            "losses_identical": soak_loss == ref_loss and len(soak_recs) == len(soak_loss) == N,
            "final_checkpoints": final_steps, "final_unreadable": final_bad,
            "leftover_temp_entries": leftovers,
        })
    lost = [k["lost_steps"] for k in kills]
    result.update({
        "kills_by_mode": {m: sum(k["mode"] == m for k in kills) for m in ("startup", "train", "write", "after")},
        "kills_during_checkpoint_write": sum(k["write_in_flight"] for k in kills),
        "unreadable_checkpoints": sum(len(k["unreadable"]) for k in kills),
        "checkpoint_regressions": sum(k["regressed"] for k in kills),
        "lost_steps_max": max(lost, default=0),
        "lost_steps_mean": round(sum(lost) / len(lost), 2) if lost else 0.0,
        "kills_losing_more_than_one_interval": sum(x > I for x in lost),
        "kills_losing_more_than_one_interval_without_a_write_in_flight":
            sum(k["lost_steps"] > I and not k["write_in_flight"] for k in kills),
        "lost_within_bound": all(k["within_bound"] for k in kills),
        "lost_bound": ("lost <= ckpt_interval (train.async_checkpoints=false)" if args.sync_checkpoints else
                       "lost <= ckpt_interval with no checkpoint write in flight at the kill, "
                       "<= 2 x ckpt_interval with one"),
        "reference_checkpoint_writes_seen": len(writes),
        "reference_checkpoint_write_ms_median": round(write_median * 1e3, 1) if writes else None,
        "reference_checkpoint_write_ms_max": round(writes[-1] * 1e3, 1) if writes else None,
        "reference_seconds": round(ref_seconds, 1), "reference_startup_seconds": round(startup, 2),
        "reference_ms_per_step": round(step_seconds * 1e3, 2),
        "wall_seconds": round(time.time() - t_all, 1),
        "settings": {"steps": N, "ckpt_interval": I, "keep_ckpts": args.keep_ckpts, "log_interval": 1,
                     "async_checkpoints": not args.sync_checkpoints,
                     "model": "2 layers, 2 heads, 32 wide, block 32, dropout 0.1", "batch_size": 4,
                     "data": "tiny-shakespeare, char", "overrides": settings},
        "per_kill": kills,
    })
    return result


# =========================================================================== part 2: the CLI fuzz

CORPUS = "".join(
    f"line {i}: the {['quick', 'slow', 'lazy', 'brave'][i % 4]} brown fox number {i * 7 % 13} "
    f"jumps over {i % 5} dogs; {'ABCDEFG'[i % 7]}!\n" for i in range(120))

# Settings whose huge valid values are legitimate but enormous requests (see the docstring).
HEAVY = {"n_layer", "n_head", "n_embd", "block_size", "vocab_size", "batch_size", "grad_accum", "max_iters",
         "eval_batch_size", "eval_batches", "n_train", "n_eval", "n_digits", "max_new_tokens", "examples",
         "r", "num_virtual_tokens", "projection_hidden", "num_samples"}
PATH_KEYS = {"train.out_dir", "data.source", "data.dataset_dir", "data.tfds_data_dir", "init.path",
             "data.train_file", "data.eval_file", "data.tokenizer"}
WRITE_KEYS = {"train.out_dir", "data.dataset_dir"}   # settings a command writes to

# YAML text that is not a plain value: syntax errors, tags, anchors, flow collections, specials.
RAW_YAML = ["[", "]", "{", "}", "{a: 1", "[1, 2", "'unterminated", '"unterminated', "!!python/object:os.system",
            "!!python/object/apply:os.system ['true']", "!!binary AAAA", "!!set {a, b}", "!!omap [a: 1]",
            "&anchor 1", "*alias", "|", ">", "- 1", "a: b", "a: b: c", "%YAML 1.2", "@x", "`x", "? x", "#",
            "---", "...", "1e400", "-1e400", ".inf", "-.inf", ".nan", "0x10", "0o17", "0b101", "1_000",
            "2020-01-01", "2020-01-01 10:00:00", "12:30:00", "~", "null", "Null", "NULL", "yes", "no", "on",
            "off", "y", "n", "True", "FALSE", "=", "==", "a=b", "\\", "\"\\x\"", "'\\u'", "\"\\ud800\"", "\t",
            " ", "", "  x  ", "\u00e9t\u00e9", "\u202e", "\U0001f600", "x" * 300, "9" * 5000, "1" * 30,
            "-" + "9" * 30, "1.5", "-0", "+1", "1e3", "1E-3", "[1, [2, [3]]]", "{a: {b: {c: 1}}}", "[]", "{}",
            "!!int 3", "!!float 3", "!!str 3", "!!bool yes", "!!null ''", "!!int x", "!!float x", "!!timestamp x"]


def _key_types(cls, prefix: str = "") -> dict[str, typing.Any]:
    from jaxllm.configfile import _fields

    out = {}
    for name, tp in _fields(cls).items():
        if dataclasses.is_dataclass(tp):
            out.update(_key_types(tp, f"{prefix}{name}."))
        else:
            out[prefix + name] = tp
    return out


def _base_type(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType")) and len(args) == 1:
        return args[0]
    return tp


def _value_pool(key: str, tp, paths: dict[str, list[str]], rng: random.Random) -> str:
    """A mutated value for `key` (as YAML text)."""
    leaf = key.rsplit(".", 1)[-1]
    base = _base_type(tp)
    if key in PATH_KEYS and rng.random() < 0.7:
        return rng.choice(paths["write" if key in WRITE_KEYS else "read"])
    if rng.random() < 0.35:
        raw = rng.choice(RAW_YAML)
        if leaf in HEAVY and re.fullmatch(r"[-+]?(0x|0o|0b)?[\d_]+(\.\d*)?([eE][-+]?\d+)?", raw.strip() or "-"):
            try:
                if float(int(raw, 0) if raw.startswith(("0x", "0o", "0b")) else float(raw.replace("_", ""))) > 64:
                    raw = "-" + raw.lstrip("+-")
            except ValueError:
                pass
        return raw
    small = ["1", "2", "3", "7"]
    if base is bool:
        return rng.choice(["true", "false", "0", "1", "2", "-1", "maybe", "tru", "TRUE", "[true]", "{}", "''", "1.0"])
    if base is int:
        pool = small + ["0", "-1", "-7", "1.5", "0.5", "-0.0", "abc", "3abc", "''", "[1]", "{a: 1}", "true", "false",
                        "nan", "inf", "-inf", ".inf", "1e400", "-1e400", str(-10 ** 30), "-1e18"]
        if leaf not in HEAVY:
            pool += [str(10 ** 30), "1e18", str(2 ** 63), str(2 ** 64 + 1), "9" * 400]
        return rng.choice(pool)
    if base is float:
        return rng.choice(["0", "1", "0.5", "-1", "-0.5", "1e-9", "1e308", "-1e308", "1e400", "nan", "inf", "-inf",
                           ".nan", "abc", "''", "[0.1]", "{a: 1}", "true", "1e-400", str(10 ** 400), "0x10"])
    # strings (and free-form unions such as lora.target)
    return rng.choice(["''", "abc", "auto", "none", "null", "[q, v]", "[]", "{a: 1}", "1", "1.5", "true", "q",
                       "q,v", "'q,k,v,o'", "fc,proj", "[x, y]", "'\\x00'", "\"a\\x00b\"", "\"\\u0000\"",
                       "\"\\ud800\"", "x" * 300, "\U0001f600", "gpt2", "char", "bpe", "alpaca", "chat", "drop",
                       "skip", "raise", "float16", "bfloat16", "int8", "cudnn", "gelu", "relu", "pfeiffer",
                       "reverse", "add,sort", "add,,", "nope,add", "'add, map'"])


def _mutate_key(key: str, rng: random.Random) -> str:
    """A typo or structural change of a dotted key."""
    ops = [
        lambda k: k[:-1], lambda k: k + "x", lambda k: k.upper(), lambda k: k.replace(".", "_", 1),
        lambda k: k.replace(".", "..", 1), lambda k: "." + k, lambda k: k + ".", lambda k: " " + k + " ",
        lambda k: k.split(".")[-1], lambda k: "nosuch." + k, lambda k: k + ".sub", lambda k: k.split(".")[0],
        lambda k: k.replace("_", "-"), lambda k: "", lambda k: ".", lambda k: k.replace("a", "\u0430", 1),
        lambda k: k + "\x00", lambda k: "model." + k.split(".")[-1], lambda k: "train." + k.split(".")[-1],
        lambda k: k.split(".")[0] + ".__class__", lambda k: k.split(".")[0] + ".__dict__", lambda k: "__init__",
        lambda k: k.replace(".", " . "), lambda k: k + "=", lambda k: "-" + k, lambda k: k[:2] + k[3:],
    ]
    return rng.choice(ops)(key)


def _byte_mutations(data: bytes, rng: random.Random, specials: bytes) -> bytes:
    b = bytearray(data)
    op = rng.randrange(7)
    if not b:
        return bytes([rng.randrange(256)])
    i = rng.randrange(len(b))
    if op == 0:
        b[i] ^= 1 << rng.randrange(8)
    elif op == 1:
        b[i:i] = bytes([rng.choice(specials)]) * rng.choice([1, 1, 2, 5])
    elif op == 2:
        del b[i:i + rng.randint(1, 8)]
    elif op == 3:
        b = b[:i]
    elif op == 4:
        b[i:i] = rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80", b"\xf4\x90\x80\x80", b"\x00",
                             b"\xef\xbb\xbf", b"\r", b"\x1b[31m", b"\xe2\x80\xa8"])
    elif op == 5:
        b[i] = rng.randrange(256)
    else:
        j = rng.randrange(len(b))
        b[i], b[j] = b[j], b[i]
    return bytes(b)


# --------------------------------------------------------------------------- JSONL mutations

def _jsonl_records(fmt: str, n: int, offset: int = 0) -> list[dict]:
    out = []
    for i in range(offset, offset + n):
        q, a = f"what is {i} plus {i + 3}?", f"{2 * i + 3}"
        if fmt == "prompt_completion":
            out.append({"prompt": f"Question: {q}\nAnswer: ", "completion": a})
        elif fmt == "alpaca":
            out.append({"instruction": q, "input": "" if i % 2 else f"numbers {i}, {i + 3}", "output": a})
        else:
            out.append({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": q},
                                     {"role": "assistant", "content": a}]})
    return out


def _mutate_record(rec: dict, fmt: str, rng: random.Random):
    """A structurally mutated record (or any JSON value), or a raw line (bytes)."""
    rec = json.loads(json.dumps(rec))
    fields = list(rec)
    weird_values = [None, 1, -1, 0, 1.5, True, False, [], {}, [1, "a"], {"a": "b"}, "", " ", "\u0000",
                    "\ud800", "\udfff\ud800", "<|endoftext|>", "<|endoftext|>" * 20, "\U0001f600" * 50, "\u202e" * 5,
                    "a" * 20000, "\x1b[31mred", "\r\n", "\u2028x\u2029", "\ufeff", float("nan"), float("inf"),
                    [[[[[]]]]], {"content": "x"}, 10 ** 50, -(10 ** 50)]
    op = rng.randrange(12)
    if op == 0:   # a field of the wrong type or a strange value
        k = rng.choice(fields)
        rec[k] = rng.choice(weird_values)
    elif op == 1:  # a field missing
        del rec[rng.choice(fields)]
    elif op == 2:  # a field renamed
        k = rng.choice(fields)
        rec[rng.choice([k + "s", k.upper(), k[:-1], "", " " + k])] = rec.pop(k)
    elif op == 3:  # an unknown extra field (valid)
        rec[rng.choice(["extra", "id", "meta", "messages" if fmt != "chat" else "prompt"])] = rng.choice(weird_values)
    elif op == 4:  # not an object
        return rng.choice([{}, [], [rec], "text", 1, 1.5, None, True, [[]], {"": ""}])
    elif op == 5 and fmt == "chat":
        msgs = rec["messages"]
        sub = rng.randrange(7)
        if sub == 0:
            msgs[rng.randrange(len(msgs))]["role"] = rng.choice(["bot", "", "Assistant", None, 1, "system"])
        elif sub == 1:
            msgs[rng.randrange(len(msgs))]["content"] = rng.choice(weird_values)
        elif sub == 2:
            rec["messages"] = [m for m in msgs if m["role"] != "assistant"]
        elif sub == 3:
            rec["messages"] = rng.choice([[], {}, "hi", None, [None], ["x"], [[]]])
        elif sub == 4:
            del msgs[rng.randrange(len(msgs))][rng.choice(["role", "content"])]
        elif sub == 5:
            msgs.extend(msgs * rng.randint(1, 30))
        else:
            msgs[rng.randrange(len(msgs))] = rng.choice([None, 1, "x", [], {"role": "user"}])
    elif op == 6:  # huge / deep JSON, as raw text
        return rng.choice([
            b'{"prompt": ' + b"1" * 5000 + b', "completion": "x"}',
            b'{"prompt": "a", "completion": ' + b"[" * 100000 + b"]" * 100000 + b"}",
            b"[" * 200000,
            b'{"prompt": 1e400, "completion": "x"}',
            b'{"prompt": -1e999999, "completion": "x"}',
            b'{"prompt": NaN, "completion": Infinity}',
            b'{"prompt": "' + b"\\ud800" * 10 + b'", "completion": "x"}',
            b'{"prompt": "a" "completion": "x"}',
            b'{"prompt": "a", "completion": "x",}',
            b"{'prompt': 'a', 'completion': 'x'}",
            b'{"prompt": "a", "prompt": 5, "completion": "x"}',
            b'{"instruction": "a", "output": "b", "prompt": "c", "completion": "d"}',
            b'// comment\n{"prompt": "a", "completion": "b"}',
            b'{"prompt": "a\x00b", "completion": "x"}',
            b'{"prompt": "a\\u0000b", "completion": "x"}',
            b"\xef\xbb\xbf" + json.dumps(rec).encode(),
            b"\xff\xfe" + json.dumps(rec).encode("utf-16-le"),
            json.dumps(rec).encode() + b"\r",
            json.dumps(rec).encode() + b" garbage",
            json.dumps(rec).encode() * 2,
            b"null", b"", b"   ", b"\t", b"\x00", b"\x1a", b"{}", b"[]", b'"' + b"a" * 100000 + b'"',
        ])
    elif op == 7:  # nested junk in a field
        k = rng.choice(fields)
        v = "x"
        for _ in range(rng.choice([3, 50, 500])):
            v = rng.choice([[v], {"k": v}])
        rec[k] = v
    elif op == 8:  # an empty record / all-empty strings (valid or nothing to train)
        rec = {k: "" for k in fields} if fmt != "chat" else {"messages": [{"role": "assistant", "content": ""}]}
    elif op == 9:  # a record of the other formats
        rec = rng.choice(_jsonl_records(rng.choice(["alpaca", "prompt_completion", "chat"]), 1))
    elif op == 10:  # very long text (truncation at block_size)
        k = rng.choice([f for f in fields if isinstance(rec[f], str)] or fields)
        rec[k] = "word " * rng.choice([100, 5000])
    else:  # odd but valid unicode
        k = rng.choice([f for f in fields if isinstance(rec[f], str)] or fields)
        rec[k] = rng.choice(["\u00e9\u00e8", "\u4e2d\u6587", "\u0301" * 10, "\U0001f600", "\u200b", "\ufffd"])
    return rec


def _mutated_line(rec: dict, fmt: str, rng: random.Random) -> bytes:
    if rng.random() < 0.35:   # raw byte mutations of the serialized record
        line = json.dumps(rec, ensure_ascii=rng.random() < 0.5).encode()
        for _ in range(rng.choice([1, 1, 2, 4])):
            line = _byte_mutations(line, rng, b'{}[]":,\\ \n\t0123456789eE-+.')
        return line
    out = _mutate_record(rec, fmt, rng)
    if isinstance(out, bytes):
        return out
    try:
        return json.dumps(out, ensure_ascii=rng.random() < 0.5, allow_nan=True).encode("utf-8", "surrogatepass")
    except (ValueError, RecursionError):
        return b"{}"


# --------------------------------------------------------------------------- the harness


TRACE = None


class CaseTimeout(BaseException):
    pass


@dataclasses.dataclass
class Outcome:
    kind: str            # ok | error | argparse | traceback | timeout | other
    rc: typing.Any
    message: str         # the error message, or the exception
    where: str = ""      # for a traceback: the innermost jaxllm frames


def _invoke(argv: list[str], timeout: int) -> Outcome:
    from jaxllm.cli import main

    out, err = io.StringIO(), io.StringIO()

    def alarm(signum, frame):
        raise CaseTimeout()

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(timeout)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
        signal.alarm(0)
        text = err.getvalue()
        if rc == 0:
            return Outcome("ok", 0, "")
        cmd = argv[0] if argv else "?"
        msgs = [line for line in text.splitlines() if line.startswith(f"jaxllm {cmd}: error: ")]
        if rc == 2 and msgs and "Traceback (most recent call last)" not in text + out.getvalue():
            return Outcome("error", rc, text[text.index(msgs[-1]):].strip())
        return Outcome("other", rc, text[-500:])
    except SystemExit as e:
        signal.alarm(0)
        text = err.getvalue()
        if e.code == 2 and "usage:" in text:
            return Outcome("argparse", 2, text.strip().splitlines()[-1])
        return Outcome("other", e.code, text[-500:])
    except CaseTimeout:
        return Outcome("timeout", None, f"ran longer than {timeout} s")
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - an exception out of main is what is counted
        signal.alarm(0)
        frames = [f for f in traceback.extract_tb(e.__traceback__) if "jaxllm" in f.filename]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-3:]))
        return Outcome("traceback", None, f"{type(e).__name__}: {e}"[:500], where)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _half_written(root: Path, outcome: Outcome, trains: bool) -> list[str]:
    """What an input left half-written under its working directory (see the module docstring)."""
    problems = []
    run_dirs = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            if TEMP_NAME.search(name):
                problems.append(f"temporary entry {os.path.relpath(os.path.join(dirpath, name), root)}")
        names = set(dirnames) | set(filenames)
        if names & {"checkpoints", "tokenizer", "adapter"} and "meta.json" not in names:
            run_dirs.add(Path(dirpath))
    complete_any = False
    for run in sorted(run_dirs):
        try:
            steps, bad = _check_checkpoints(run, kind=None)
        except Exception as e:  # noqa: BLE001
            steps, bad = [], [{"step": None, "error": f"{type(e).__name__}: {e}"[:300]}]
        complete_any |= bool(steps)
        problems += [f"unreadable checkpoint {os.path.relpath(run, root)}/{b['step']}: {b['error']}" for b in bad]
        if outcome.kind != "ok" and not steps:
            left = [n for n in ("tokenizer", "adapter") if (run / n).exists()]
            if left:
                problems.append(f"{os.path.relpath(run, root)} holds {', '.join(left)} but no checkpoint")
    if outcome.kind == "ok" and trains and not complete_any:
        problems.append("exit 0 but no complete checkpoint")
    return problems


def _names_input(outcome: Outcome, kind: str, hints: list[str]) -> bool:
    msg = outcome.message
    if outcome.kind == "argparse":
        return True
    if any(h and h in msg for h in hints):
        return True
    if re.search(r"'[^']+'|\"[^\"]+\"|/\S", msg):   # quotes the value, or names a path
        return True
    if kind == "yaml":
        return bool(re.search(r"\b(model|data|optim|train|sample|init|peft|eval)\.\w+|config|GPTConfig\.\w+", msg))
    if kind == "overrides":
        return bool(re.search(r"\b(model|data|optim|train|sample|init|peft|eval)\.\w+|--[a-z-]+|override", msg))
    return False


class Tally:
    def __init__(self, kind: str):
        self.kind = kind
        self.counts = {k: 0 for k in ("inputs", "ok", "clear_errors", "argparse_errors", "tracebacks",
                                      "timeouts", "other", "half_written", "unnamed")}
        self.tracebacks: list[dict] = []
        self.unnamed: list[dict] = []
        self.half: list[dict] = []
        self.other: list[dict] = []
        self.signatures: dict[str, int] = {}
        self.seconds = 0.0

    def add(self, desc: str, outcome: Outcome, half: list[str], named: bool) -> None:
        c = self.counts
        c["inputs"] += 1
        key = {"ok": "ok", "error": "clear_errors", "argparse": "argparse_errors", "traceback": "tracebacks",
               "timeout": "timeouts"}.get(outcome.kind, "other")
        c[key] += 1
        if outcome.kind == "traceback":
            sig = outcome.message.split(":")[0] + " at " + outcome.where.split(" <- ")[0]
            self.signatures[sig] = self.signatures.get(sig, 0) + 1
            if len(self.tracebacks) < 8 and self.signatures[sig] <= 2:
                self.tracebacks.append({"input": desc[:600], "exception": outcome.message[:400], "at": outcome.where})
        if outcome.kind == "other" and len(self.other) < 5:
            self.other.append({"input": desc[:600], "rc": str(outcome.rc), "output": outcome.message[:400]})
        if half:
            c["half_written"] += 1
            if len(self.half) < 5:
                self.half.append({"input": desc[:600], "problems": half[:3], "outcome": outcome.kind})
        if outcome.kind == "error" and not named:
            c["unnamed"] += 1
            if len(self.unnamed) < 5:
                self.unnamed.append({"input": desc[:600], "message": outcome.message[:400]})

    def report(self) -> dict:
        return {**self.counts, "seconds": round(self.seconds, 1),
                "traceback_kinds": self.signatures, "first_tracebacks": self.tracebacks,
                "first_half_written": self.half, "first_unnamed_errors": self.unnamed, "first_other": self.other}


def _run_case(tally: Tally, root: Path, idx: int, argv: list[str], desc: str, hints: list[str], trains: bool,
              timeout: int) -> Outcome:
    case = root / f"case{idx:05d}"
    case.mkdir(parents=True)
    if TRACE is not None:   # --trace: each input before it runs (to find one that kills the process)
        TRACE.write(json.dumps({"idx": idx, "argv": argv, "desc": desc}) + "\n")
        TRACE.flush()
    cwd = os.getcwd()
    os.chdir(case)
    try:
        outcome = _invoke(argv, timeout)
        half = _half_written(case, outcome, trains) if outcome.kind != "timeout" else []
    finally:
        os.chdir(cwd)
    tally.add(desc, outcome, half, _names_input(outcome, tally.kind, hints))
    if TRACE is not None:
        TRACE.write(json.dumps({"idx": idx, "outcome": dataclasses.asdict(outcome), "half": half}) + "\n")
        TRACE.flush()
    shutil.rmtree(case, ignore_errors=True)
    return outcome


def fuzz(args, work: Path, rng: random.Random) -> dict:
    import yaml

    import jaxllm
    from jaxllm.alignment.sft import SFTConfig
    from jaxllm.stages.finetune import FinetuneConfig
    from jaxllm.stages.pretrain import PretrainConfig

    t_all = time.time()
    fz = work / "fuzz"
    shared, cases = fz / "shared", fz / "cases"
    shared.mkdir(parents=True)
    corpus = shared / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    tok_dir = shared / "bpe300"
    jaxllm.build_tokenizer("bpe", text=CORPUS * 3 + "".join(json.dumps(r) for f in ("alpaca", "chat")
                                                           for r in _jsonl_records(f, 20)),
                           vocab_size=300).save(tok_dir)
    a_file = shared / "a_file.txt"
    a_file.write_text("not a directory\n")
    empty_dir = shared / "empty_dir"
    empty_dir.mkdir()
    timeout = args.case_timeout

    # a tiny base run for `lora` and `sample`
    base_run = shared / "base_run"
    tiny = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16", "model.dropout=0.0"]
    quiet = ["train.progress=false", "train.tensorboard=false", "train.peak_flops=1e11"]
    cwd = os.getcwd()
    os.chdir(shared)
    try:
        out = _invoke(["pretrain", f"data.source={corpus}", f"data.dataset_dir={shared / 'base_data'}",
                       f"train.out_dir={base_run}", *tiny, "train.batch_size=2", "train.max_iters=2",
                       "train.eval_interval=0", "train.ckpt_interval=0", "train.log_interval=1",
                       "data.eval_batches=1", "data.eval_batch_size=4", "sample.max_new_tokens=0", *quiet], 300)
    finally:
        os.chdir(cwd)
    if out.kind != "ok":
        raise SystemExit(f"the fuzz's base run failed: {out}")
    no_tok_run = shared / "run_without_tokenizer"
    shutil.copytree(base_run, no_tok_run)
    shutil.rmtree(no_tok_run / "tokenizer")
    # Paths for path-valued settings, all inside the fuzz directory. Settings a command writes to
    # (train.out_dir, data.dataset_dir) only get paths inside the input's own working directory (or a
    # file, which must be refused), so no input can change what later inputs read.
    read_paths = ["''", "nonexistent", "nonexistent/deeper", str(a_file), str(empty_dir), str(shared / "base_data"),
                  str(base_run), str(no_tok_run), str(corpus), str(tok_dir), "./x", "x" * 300, "'a\\x00b'",
                  "\"a\\x00b\"", str(a_file) + "/below", "~nosuchuser/x", "'*.txt'", "'[a-z]'", "tfds:nosuch",
                  "tfds:nosuch/cfg:train", "gpt2", "bpe", "char", "'  '"]
    write_paths = ["''", ".", "nonexistent/deeper", "./x", "sub/dir", "x" * 300, "'a\\x00b'", str(a_file),
                   str(a_file) + "/below", "~nosuchuser/x", "'  '", "'*'", "run/checkpoints", "'run\\n'"]
    paths = {"read": read_paths, "write": write_paths}

    results = {}
    n = args.fuzz
    # ------------------------------------------------------------------ JSONL through `jaxllm sft`
    tally = Tally("jsonl")
    t0 = time.time()
    sft_common = [f"data.tokenizer={tok_dir}", *tiny[:3], "model.block_size=128", "train.max_iters=1",
                  "train.batch_size=2", "train.eval_interval=0", "train.ckpt_interval=0", "train.log_interval=1",
                  "eval.examples=0", "eval.batch_size=8", *quiet, "train.out_dir=run"]
    for i in range(n):
        fmt = rng.choice(["prompt_completion", "alpaca", "chat"])
        train_recs, eval_recs = _jsonl_records(fmt, 12), _jsonl_records(fmt, 4, offset=100)
        target = "eval" if rng.random() < 0.25 else "train"
        recs = eval_recs if target == "eval" else train_recs
        j = rng.randrange(len(recs))
        lines = [json.dumps(r).encode() for r in recs]
        lines[j] = _mutated_line(recs[j], fmt, rng)
        case_files = fz / "jsonl"
        case_files.mkdir(exist_ok=True)
        train_file, eval_file = case_files / f"train{i}.jsonl", case_files / f"eval{i}.jsonl"
        other = [json.dumps(r).encode() for r in (train_recs if target == "eval" else eval_recs)]
        (train_file if target == "train" else eval_file).write_bytes(b"\n".join(lines) + b"\n")
        (eval_file if target == "train" else train_file).write_bytes(b"\n".join(other) + b"\n")
        on_error = "skip" if rng.random() < 0.3 else "raise"
        argv = ["sft", f"data.train_file={train_file}", f"data.eval_file={eval_file}", f"data.on_error={on_error}",
                *sft_common]
        if rng.random() < 0.15:  # exact-match scoring of the held-out file too
            argv.append("eval.examples=4")
        desc = (f"{fmt} {target} file line {j + 1}: {lines[j][:300]!r} (on_error={on_error}"
                f"{', eval.examples=4' if 'eval.examples=4' in argv else ''})")
        mutated = train_file if target == "train" else eval_file
        _run_case(tally, cases, i, argv, desc, [str(mutated), mutated.name], True, timeout)
        if TRACE is None:
            train_file.unlink()
            eval_file.unlink()
    tally.seconds = time.time() - t0
    results["jsonl"] = tally.report()
    print(f"[fuzz] jsonl: {json.dumps(tally.counts)} in {tally.seconds:.0f} s", flush=True)

    # ------------------------------------------------------------------ YAML configs through `jaxllm pretrain`
    tally = Tally("yaml")
    t0 = time.time()
    base_cfg = {
        "train": {"max_iters": 1, "out_dir": "run", "batch_size": 2, "eval_interval": 0, "ckpt_interval": 0,
                  "log_interval": 1, "progress": False, "tensorboard": False, "peak_flops": 1.0e11},
        "model": {"preset": "cpu-small", "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16, "dropout": 0.0},
        "data": {"source": str(corpus), "tokenizer": "char", "eval_batch_size": 4, "eval_batches": 1},
        "optim": {"learning_rate": 1.0e-3, "warmup_iters": 1, "lr_decay_iters": 10},
        "sample": {"max_new_tokens": 0},
    }
    types = _key_types(PretrainConfig)

    def emit(cfg: dict, raw: dict[str, str] | None = None) -> str:
        raw = raw or {}
        lines = []
        for sec, body in cfg.items():
            if not isinstance(body, dict):
                lines.append(f"{sec}: {raw.get(sec, yaml.safe_dump(body, default_flow_style=True).strip())}")
                continue
            lines.append(f"{sec}:")
            for k, v in body.items():
                text = raw.get(f"{sec}.{k}")
                if text is None:
                    text = yaml.safe_dump(v, default_flow_style=True, width=10 ** 6).strip()
                    text = text[:-4].strip() if text.endswith("\n...") else text.removesuffix("...").strip()
                lines.append(f"  {k}: {text}")
        return "\n".join(lines) + "\n"

    valid_text = emit(base_cfg)
    for i in range(n):
        cfg = json.loads(json.dumps(base_cfg))
        op = rng.randrange(10)
        hints = []
        raw = {}
        if op <= 2:    # one or more values replaced
            for _ in range(rng.choice([1, 1, 1, 2, 3])):
                key = rng.choice(sorted(types))
                sec, leaf = key.split(".", 1)
                if "." in leaf:
                    continue
                cfg.setdefault(sec, {})[leaf] = None
                raw[key] = _value_pool(key, types[key], paths, rng)
                hints += [key, leaf]
            text = emit(cfg, raw)
        elif op == 3:  # an unknown or misspelt key
            key = rng.choice(sorted(types))
            bad = _mutate_key(key, rng).strip(" .") or "x"
            sec, _, leaf = bad.partition(".")
            if not leaf:
                cfg[bad] = 1
            else:
                cfg.setdefault(sec, {})
                if isinstance(cfg[sec], dict):
                    cfg[sec][leaf] = 1
                else:
                    cfg[sec] = {leaf: 1}
            hints += [bad, leaf or bad]
            text = emit(cfg)
        elif op == 4:  # a section that is not a mapping / a section removed / an unknown section
            sec = rng.choice(list(cfg) + ["peft", "init", "eval", "Train", "train.max_iters", "", "null"])
            choice = rng.randrange(3)
            if choice == 0 and sec in cfg:
                del cfg[sec]
            else:
                cfg[sec] = rng.choice([1, "x", [1, 2], None, [], "", True, {"": 1}])
            hints.append(sec)
            text = emit(cfg)
        elif op == 5:  # a document that is not a mapping of sections
            text = rng.choice(["- train\n- model\n", "42\n", "hello\n", "[1, 2]\n", "'str'\n", "--- 1\n--- 2\n",
                               "---\n" + valid_text + "---\n" + valid_text, "!!python/object:os.system\n",
                               "!!python/object/apply:os.system ['true']\n", "!!set {a, b}\n", "? [1]\n: x\n",
                               "{[1, 2]: x}\n", "train: &a {max_iters: *a}\n", "1: 2\n", "true: false\n",
                               "train:\n  max_iters: 1\n  max_iters: -1\n", "train:\n  - max_iters\n",
                               "\t" + valid_text, valid_text.replace("  ", "\t"), "%YAML 2.0\n---\n" + valid_text,
                               "%TAG ! tag:x,2000:\n---\n" + valid_text, "---\n...\n" + valid_text])
        elif op == 6:  # byte flips and insertions in the text
            data = valid_text.encode()
            for _ in range(rng.choice([1, 1, 2, 4, 8])):
                data = _byte_mutations(data, rng, b":-[]{}&*!|>%@`'\"#,?\t \n0123456789")
            text = data
        elif op == 7:  # truncated
            text = valid_text[:rng.randrange(len(valid_text))]
        elif op == 8:  # indentation / line order
            lines = valid_text.splitlines()
            k = rng.randrange(len(lines))
            sub = rng.randrange(4)
            if sub == 0:
                lines[k] = " " * rng.choice([1, 3, 4, 8]) + lines[k].lstrip()
            elif sub == 1:
                lines[k] = lines[k].lstrip()
            elif sub == 2:
                lines.insert(rng.randrange(len(lines)), lines[k])
            else:
                rng.shuffle(lines)
            text = "\n".join(lines) + "\n"
        else:          # encodings
            text = rng.choice([valid_text.encode("utf-16"), valid_text.encode("utf-32"), b"\xff\xfe\x00",
                               b"\xef\xbb\xbf" + valid_text.encode(), valid_text.encode().replace(b"cpu-small", b"cpu-\xffsmall"),
                               valid_text.encode().replace(b"\n", b"\r\n"), valid_text.encode().replace(b"\n", b"\r"),
                               b"\x00" * 10, os.urandom(64), valid_text.encode() + b"\x00",
                               valid_text.encode().replace(b"run", "r\u00fcn".encode("latin-1"))])
        path = fz / "yaml" / f"config{i}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        desc = f"{path.name}: {(text if isinstance(text, bytes) else text.encode('utf-8', 'replace'))[:500]!r}"
        if op == 7 or (op == 5 and not text.strip()):
            desc += " (plus train.max_iters=1: an empty document is all defaults)"
        argv = ["pretrain", str(path)] + (["train.max_iters=1", *tiny, *quiet] if op == 7 else [])
        _run_case(tally, cases, 100000 + i, argv, desc, [str(path), path.name, *hints], True, timeout)
        if TRACE is None:
            path.unlink()
    tally.seconds = time.time() - t0
    results["yaml"] = tally.report()
    print(f"[fuzz] yaml: {json.dumps(tally.counts)} in {tally.seconds:.0f} s", flush=True)

    # ------------------------------------------------------------------ key=value overrides and flags
    tally = Tally("overrides")
    t0 = time.time()
    good_train = fz / "ov_train.jsonl"
    good_eval = fz / "ov_eval.jsonl"
    good_train.write_text("".join(json.dumps(r) + "\n" for r in _jsonl_records("alpaca", 12)))
    good_eval.write_text("".join(json.dumps(r) + "\n" for r in _jsonl_records("alpaca", 4, 100)))
    stage_bases = {
        "pretrain": (PretrainConfig, [f"data.source={corpus}", *tiny, "train.batch_size=2", "train.max_iters=1",
                                      "train.eval_interval=0", "train.ckpt_interval=0", "train.log_interval=1",
                                      "data.eval_batches=1", "data.eval_batch_size=4", "sample.max_new_tokens=0",
                                      *quiet, "train.out_dir=run"]),
        "lora": (FinetuneConfig, [f"init.path={base_run}", f"data.source={corpus}", "train.batch_size=2",
                                  "train.max_iters=1", "train.eval_interval=0", "train.ckpt_interval=0",
                                  "train.log_interval=1", "data.eval_batches=1", "data.eval_batch_size=4",
                                  "sample.max_new_tokens=0", "peft.lora.r=2", *quiet, "train.out_dir=run"]),
        "sft": (SFTConfig, [f"data.train_file={good_train}", f"data.eval_file={good_eval}", *sft_common]),
    }
    sample_flags = {"--step": ["2", "0", "-1", "1", "99", "1e3", "abc", "", str(10 ** 30)],
                    "--prompt": ["", "the", "\x00", "\U0001f600", "zzz~~~", "\u00e9", "x" * 100, "-", "--step",
                                 "\x03", "<|endoftext|>", "\udcff", "a\udce9b"],
                    "--max-new-tokens": ["0", "1", "4", "16", "17", "40", "-1", "abc", "1.5", "", "nan"],
                    "--temperature": ["0", "0.8", "-1", "nan", "inf", "-inf", "1e308", "1e-320", "abc", "", "1e400"],
                    "--top-k": ["0", "1", "5", "-1", "1000", str(10 ** 30), "1.5", "x"],
                    "--top-p": ["0", "0.5", "1", "-0.1", "1.1", "nan", "inf", "x"],
                    "--min-p": ["0", "0.1", "1", "-1", "2", "nan", "x"],
                    "--repetition-penalty": ["1", "1.3", "0", "-1", "nan", "inf", "1e308", "x"],
                    "--num-samples": ["1", "2", "3", "0", "-5", "x", "1.5"],
                    "--seed": ["0", "1", "-1", str(2 ** 32), str(2 ** 63), str(10 ** 30), str(-10 ** 30), "x"],
                    "--ckpt": [str(base_run), str(no_tok_run), str(empty_dir), str(a_file), "nonexistent",
                               str(shared / "base_data"), "", "x" * 300, str(corpus)]}
    for i in range(n):
        cmd = rng.choice(["pretrain", "pretrain", "lora", "sft", "sample"])
        hints: list[str] = []
        if cmd == "sample":
            argv = ["sample", "--ckpt", str(base_run), "--max-new-tokens", "4", "--prompt", "the"]
            for _ in range(rng.choice([1, 1, 2, 3])):
                flag = rng.choice(list(sample_flags))
                sub = rng.random()
                if sub < 0.8:
                    value = rng.choice(sample_flags[flag])
                    argv += [flag, value] if rng.random() < 0.7 else [f"{flag}={value}"]
                    hints += [flag, value]
                elif sub < 0.9:
                    argv += [rng.choice(["--stream", "--nosuch", "-x", "--", "extra", "--temp", "--step"])]
                    hints.append(argv[-1])
                else:
                    argv += [_mutate_key("train.max_iters", rng) + "=1"]
            desc = "jaxllm " + " ".join(repr(a) if " " in a or not a else a for a in argv)
            _run_case(tally, cases, 200000 + i, argv, desc, hints, False, timeout)
            continue
        cls, base = stage_bases[cmd]
        types = _key_types(cls)
        extra = []
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            key = rng.choice(sorted(types))
            sub = rng.random()
            if sub < 0.55:      # a valid key, a mutated value
                value = _value_pool(key, types[key], paths, rng)
                extra.append(f"{key}={value}")
                hints += [key, key.rsplit(".", 1)[-1], value]
            elif sub < 0.8:     # a mutated key
                bad = _mutate_key(key, rng)
                extra.append(f"{bad}=1")
                hints += [bad, bad.strip(), bad.rsplit(".", 1)[-1].strip()]
            else:               # the shape of the argument itself
                extra.append(rng.choice([key, f"{key}", "=1", "=", f"{key}==1", f"{key}=1=2", f"{key} =1",
                                         f"{key}= 1", f"{key}=\n1", "--resume", "--resume=yes", "--nosuch",
                                         "-x", "--", "config.yaml", str(a_file), str(empty_dir), "-", "--help=x",
                                         key.split(".")[0] + "=1", key.split(".")[0] + "={}",
                                         key.split(".")[0] + "=[]", key.split(".")[0] + "=null"]))
                hints += [extra[-1], extra[-1].split("=")[0], key]
        argv = [cmd, *base, *extra]
        desc = f"jaxllm {cmd} <base> " + " ".join(repr(a) for a in extra)
        trains = cmd != "sample"
        _run_case(tally, cases, 200000 + i, argv, desc, hints, trains, timeout)
    tally.seconds = time.time() - t0
    results["overrides"] = tally.report()
    print(f"[fuzz] overrides: {json.dumps(tally.counts)} in {tally.seconds:.0f} s", flush=True)

    total = {k: sum(results[kind][k] for kind in ("jsonl", "yaml", "overrides"))
             for k in ("inputs", "ok", "clear_errors", "argparse_errors", "tracebacks", "timeouts", "other",
                       "half_written", "unnamed")}
    return {"total": total, **results, "case_timeout_s": timeout, "wall_seconds": round(time.time() - t_all, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="6 kills, 300 steps, 60 inputs of each kind (~2 min)")
    ap.add_argument("--kills", type=int, default=None, help="SIGKILLs of the soak run (default 30; quick 6)")
    ap.add_argument("--steps", type=int, default=None, help="steps of the runs (default 2000; quick 300)")
    ap.add_argument("--ckpt-interval", type=int, default=10)
    ap.add_argument("--keep-ckpts", type=int, default=3)
    ap.add_argument("--sync-checkpoints", action="store_true",
                    help="train.async_checkpoints=false: each save completes before training goes on")
    ap.add_argument("--modes", default=None, help="kill kinds to use, e.g. 'after' or 'write,after' "
                                                  "(default: a mix of startup, train, write, after)")
    ap.add_argument("--fuzz", type=int, default=None, help="inputs of each kind (default 500; quick 60)")
    ap.add_argument("--case-timeout", type=int, default=60, help="seconds one fuzz input may run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-soak", action="store_true")
    ap.add_argument("--skip-fuzz", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--trace", default=None, help="write each fuzz input to this file before running it")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/soak_resume[_quick].json)")
    args = ap.parse_args()
    args.kills = args.kills if args.kills is not None else (6 if args.quick else 30)
    args.steps = args.steps if args.steps is not None else (300 if args.quick else 2000)
    args.fuzz = args.fuzz if args.fuzz is not None else (60 if args.quick else 500)
    out_path = Path(args.out) if args.out else HERE / "results" / f"soak_resume{'_quick' if args.quick else ''}.json"

    global TRACE
    TRACE = open(args.trace, "w") if args.trace else None
    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="jaxllm_soak_"))
    _setup_jax(work / "xla_cache")
    rng = random.Random(args.seed)
    result = {"quick": args.quick, "seed": args.seed, "cpu_count": os.cpu_count()}
    try:
        if not args.skip_soak:
            result["soak"] = soak(args, work, rng)
        if not args.skip_fuzz:
            result["fuzz"] = fuzz(args, work, rng)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    s, f = result.get("soak", {}), result.get("fuzz", {}).get("total", {})
    result["passed"] = {
        "soak": (None if not s else s.get("failure") is None and s["kills"] >= (20 if not args.quick else 1)
                 and s["unreadable_checkpoints"] == 0 and s.get("bit_identical") is True
                 and s.get("losses_identical") is True and s["checkpoint_regressions"] == 0
                 and s["lost_within_bound"] and not s.get("leftover_temp_entries") and not s.get("final_unreadable")),
        "fuzz": None if not f else f["tracebacks"] == 0 and f["half_written"] == 0 and f["other"] == 0,
    }
    result["wall_seconds"] = round(time.time() - t0, 1)
    text = json.dumps(result, indent=2, default=str)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text + "\n")
    print(text)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
