"""Runs and bases: rebuilding a model from a training run's directory or a Hugging Face directory.

A *base* is what a fine-tuning stage starts from: a jaxllm run directory (its latest or a given
checkpoint step) or a Hugging Face GPT-2 directory (config.json + weights, with tokenizer files if
it has them). `load_base` tells them apart and returns the model, its config and its tokenizer.

A run that trains only PEFT weights (LoRA, adapters, prefix) checkpoints only those. Its metadata
(`peft_run_meta`) names the base, pins a base run to the step it was tuned from, and records a
fingerprint of the base weights, so `load_checkpoint` rebuilds base + PEFT, and a base whose files
now hold other weights is refused rather than silently used. What a run directory holds is listed
in `jaxllm.training.rundir`.
"""

from __future__ import annotations

import json
import math
import os
import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import COMPUTE_OPTIONS, GPTConfig
from jaxllm.heads import HeadParam, PolicyWithValue, RewardModel
from jaxllm.interop.hf import from_hf, to_hf
from jaxllm.model import GPT
from jaxllm.peft import LoRA, PeftParam, merge, peft_modules
from jaxllm.peft.files import apply_peft, describe_peft
from jaxllm.tokenizer import CONFIG_NAME, HF_FILE_NAME, load_tokenizer
from jaxllm.training.checkpoint import Checkpointer
from jaxllm.training.rundir import CHECKPOINTS, TOKENIZER


# --------------------------------------------------------------------------- runs


def load_checkpoint(run_dir: str | os.PathLike, step: int | None = None):
    """(model, config, tokenizer or None, meta) from a training run's directory: needs nothing else
    (a PEFT run also needs its base, where its metadata says it is). The model is a GPT, or for a
    reward-model run (meta["head"] == "reward") a `jaxllm.heads.RewardModel`; a PPO run's (head
    "value") is its policy, the GPT without the value head."""
    ckpt = Checkpointer(run_dir, create=False)
    try:
        meta = ckpt.read_meta(step)
        cfg = GPTConfig.from_dict(meta["model"])
        if meta.get("base"):  # only the tuned weights were saved: base + fresh PEFT (+ head), then those
            model = with_head(_peft_model(meta, run_dir), meta.get("head"))
            nnx.update(model, ckpt.restore_model(nnx.state(model, nnx.Any(PeftParam, HeadParam)), step))
        else:
            model = nnx.eval_shape(lambda: with_head(GPT(cfg, rngs=nnx.Rngs(0)), meta.get("head")))
            graphdef, abstract = nnx.split(model)
            model = nnx.merge(graphdef, ckpt.restore_model(abstract, step))
    finally:
        ckpt.close()
    tok_dir = pathlib.Path(run_dir) / TOKENIZER
    tokenizer = load_tokenizer(tok_dir) if tok_dir.is_dir() else None
    if meta.get("head") == "value":
        model = model.trunk
    return model, cfg, tokenizer, meta


def with_head(gpt: GPT, head: str | None):
    """The model a run trains around its GPT: the GPT itself, or a RewardModel / PolicyWithValue
    with a fresh head."""
    if head is None:
        return gpt
    if head == "reward":
        return RewardModel(trunk=gpt, rngs=nnx.Rngs(0))
    if head == "value":
        return PolicyWithValue(gpt, rngs=nnx.Rngs(0))
    raise ValueError(f"unknown model head {head!r} in the run's metadata; this jaxllm knows 'reward' and 'value'")


def _peft_model(meta: dict, run_dir):
    base = meta["base"]
    try:
        model, cfg, _ = load_base(base["path"], base.get("step"))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{run_dir} holds only adapter weights; its base model {base['path']} "
                                f"is needed too ({e})") from None
    if cfg != GPTConfig.from_dict(meta["model"]):  # fields added since take their defaults
        raise ValueError(f"the base model at {base['path']} is not the one {run_dir} was trained on "
                         f"(its config changed); restore that base or retrain")
    if not same_base_weights(base, weights_fingerprint(model)):
        raise ValueError(f"the base model at {base['path']} is not the one {run_dir} was trained on "
                         f"(same config, other weights); restore that base or retrain")
    return apply_peft(model, meta["peft"], f"{run_dir} metadata")


def checkpoint_to_hf(run_dir, out_dir, *, step: int | None = None, overwrite: bool = False) -> pathlib.Path:
    """Export a jaxllm training run's checkpoint (latest, or `step`) with its tokenizer to an HF directory."""
    model, cfg, tokenizer, _ = load_checkpoint(run_dir, step)
    merge(model, unload=True)  # a LoRA run exports as one plain GPT-2; adapters/prefix are refused
    return to_hf(model, cfg, out_dir, tokenizer=tokenizer, overwrite=overwrite)


def saved_settings(out_dir, kind: str) -> dict | None:
    """The settings the run in `out_dir` was started with (its latest checkpoint's), if it is a run
    of the stage `kind` (another stage's run is refused later, by the resume checks)."""
    if not (pathlib.Path(out_dir) / CHECKPOINTS).is_dir():
        return None
    ckpt = Checkpointer(out_dir, create=False)
    try:
        meta = ckpt.read_meta() if ckpt.latest_step() is not None else {}
    finally:
        ckpt.close()
    if meta.get("kind") != kind or not isinstance(meta.get("config"), dict):
        return None
    saved = dict(meta["config"])
    if meta.get("base"):  # a PEFT run: the base it was pinned to (absolute path, fixed step)
        saved["init"] = {**saved.get("init", {}), "path": meta["base"]["path"], "step": meta["base"]["step"]}
    return saved


def check_resume(saved: dict, current: dict, where) -> None:
    """Refuse to resume a PEFT run onto other PEFT settings or another base (the model config is
    the loop's own check). The base weights' fingerprint is compared last, with a tolerance."""
    for key, what in (("peft", "peft.* settings"), ("base", "base model (init.path / init.step)")):
        was, now = saved.get(key), json.loads(json.dumps(current.get(key)))  # as the JSON meta holds it
        recorded_base = fingerprint = None
        if key == "base" and was and now:
            recorded_base, fingerprint = was, now.get("fingerprint")
            was, now = ({k: v for k, v in b.items() if k != "fingerprint"} for b in (was, now))
        if was != now:
            raise ValueError(
                f"cannot resume from {where}: its {what} {was} differ from the requested "
                f"{now}; resume with the same settings or choose another train.out_dir")
        if recorded_base is not None and not same_base_weights(recorded_base, fingerprint):
            raise ValueError(f"cannot resume from {where}: the base model at {now['path']} now holds "
                             f"other weights than the run was trained on; restore that base or "
                             f"choose another train.out_dir")


# --------------------------------------------------------------------------- bases


def base_kind(path) -> str:
    """"run" (a jaxllm training run) or "hf" (a Hugging Face GPT-2 directory); errors say what is expected."""
    p = pathlib.Path(path).expanduser()
    if (p / CHECKPOINTS).is_dir():
        return "run"
    if (p / "config.json").is_file():
        return "hf"
    raise FileNotFoundError(
        f"init.path={str(path)!r} is neither a jaxllm run directory (with checkpoints/) nor a Hugging Face "
        f"GPT-2 directory (with config.json); train one with `jaxllm pretrain` or export one with "
        f"`jaxllm export-hf` / save_pretrained")


def load_base(path, step: int | None = None, **compute):
    """(model, config, tokenizer or None) from a jaxllm run directory or an HF GPT-2 directory.
    `compute` sets how the model is computed (`jaxllm.config.COMPUTE_OPTIONS`: remat, scan_layers),
    e.g. remat=True to fine-tune a base whose activations do not fit."""
    bad = sorted(set(compute) - set(COMPUTE_OPTIONS))
    if bad:
        raise ValueError(f"load_base takes only compute options {list(COMPUTE_OPTIONS)}, not {bad}")
    if base_kind(path) == "run":
        model, cfg, tok, _ = load_checkpoint(path, step)
        _flatten_peft(model, path)
    else:
        model, cfg = from_hf(path)
        p = pathlib.Path(path).expanduser()
        has_tokenizer = (p / CONFIG_NAME).is_file() or (p / HF_FILE_NAME).is_file()
        tok = load_tokenizer(p) if has_tokenizer else None
    if compute:
        cfg = cfg.replace(**compute)
        model.config = cfg
    return model, cfg, tok


def _flatten_peft(model, path) -> None:
    """A tuned run used as a base: its LoRA is folded into the weights (the new run's base is then a
    plain GPT); adapters and prefixes cannot be folded, so such a run is refused as a base."""
    other = sorted({type(m).__name__ for _, m in peft_modules(model) if not isinstance(m, LoRA)})
    if other:
        raise ValueError(f"init.path={path} carries {', '.join(other)} modules, which cannot be folded "
                         f"into a plain base; tune from that run's own base instead")
    merge(model, unload=True)


def base_meta(path, step: int | None) -> dict:
    """Where a PEFT run's frozen base comes from, with a jaxllm run's step fixed now: a base run that
    trains on later must not move an adapter onto other weights."""
    kind = base_kind(path)
    if kind == "run" and step is None:
        ckpt = Checkpointer(path, create=False)
        try:
            step = ckpt.latest_step()
        finally:
            ckpt.close()
    return {"path": str(pathlib.Path(path).expanduser().absolute()), "step": step, "kind": kind}


@jax.jit
def _sums(leaves):
    return jnp.stack([jnp.stack([jnp.sum(x, dtype=jnp.float32), jnp.sum(jnp.square(x.astype(jnp.float32)))])
                      for x in leaves])


def weights_fingerprint(model) -> list[float]:
    """The sum and the sum of squares of each base weight (PEFT weights and heads left out), in state order:
    a few numbers that tell whether a base model's files still hold the weights a PEFT run was
    trained on. Compare with `same_base_weights`."""
    leaves = jax.tree.leaves(nnx.state(model, nnx.All(nnx.Param, nnx.Not(PeftParam), nnx.Not(HeadParam))))
    return [float(v) for v in jax.device_get(_sums(leaves)).reshape(-1)]


def same_base_weights(recorded_base: dict, fingerprint, rtol: float = 1e-4) -> bool:
    """Whether `fingerprint` matches the one in `recorded_base` (a meta["base"]), within a tolerance
    (summation order may differ between devices). True where either is missing: runs recorded
    before fingerprints existed."""
    recorded = recorded_base.get("fingerprint")
    if recorded is None or fingerprint is None:
        return True
    return len(recorded) == len(fingerprint) and all(
        math.isclose(x, y, rel_tol=rtol, abs_tol=1e-3) for x, y in zip(recorded, fingerprint))


def peft_run_meta(model, trainable, init) -> dict:
    """The metadata a run that trains only PEFT weights adds (its base, with a fingerprint of the
    base weights, and its PEFT modules), so its checkpoints can hold those weights alone; {} for
    full fine-tuning. `init` is the stage's init section (path, step)."""
    if trainable is nnx.Param:
        return {}
    base = {**base_meta(init.path, init.step), "fingerprint": weights_fingerprint(model)}
    return {"base": base, "peft": describe_peft(model)}


def base_tokenizer_spec(data_tokenizer: str | None, base_path, base_tok) -> str:
    """The tokenizer a fine-tuning dataset is prepared with: the one given, else the base's own."""
    if data_tokenizer:
        return data_tokenizer
    p = pathlib.Path(base_path).expanduser()
    if base_kind(p) == "run" and (p / TOKENIZER).is_dir():
        return str(p / TOKENIZER)
    if base_tok is not None:
        return str(p)
    raise ValueError(f"the base {p} has no tokenizer; set data.tokenizer (e.g. gpt2 or a tokenizer.json)")
