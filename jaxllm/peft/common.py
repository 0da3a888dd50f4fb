"""What every parameter-efficient method shares: its own variable types, the on/off switch and the
parameter report.

Each method (LoRA, bottleneck adapters, prefix tuning) keeps its weights in a subclass of
`PeftParam`, so the train step's trainable filter is just `PeftParam` (or one method's type): the
optimizer, gradients and adapter files see those weights only, and the base model is frozen by
construction, not by convention. They are still `nnx.Param`s, so a model's total count includes
them, as PEFT's report does.
"""

from __future__ import annotations

import contextlib

from flax import nnx

from jaxllm.model import count_params


class PeftParam(nnx.Param):
    """Weights added by a parameter-efficient method (the trainable subset)."""


class LoraParam(PeftParam):
    pass


class AdapterParam(PeftParam):
    pass


class PrefixParam(PeftParam):
    pass


class PeftModule(nnx.Module):
    """Base of the modules jaxllm.peft adds to a GPT. `enabled` is plain Python state: flipping it
    changes the traced program (a jitted function sees the flag when it traces), never a weight."""

    enabled: bool = True


def peft_modules(model: nnx.Module) -> list[tuple[tuple, PeftModule]]:
    return [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, PeftModule)]


def remove_peft(model: nnx.Module) -> nnx.Module:
    """Take every LoRA, adapter and prefix off the model (merged LoRA stays folded in the kernels)."""
    for path, _ in peft_modules(model):
        parent = model
        for part in path[:-1]:
            parent = parent[part] if isinstance(part, int) else getattr(parent, part)
        setattr(parent, path[-1], None)
    return model


@contextlib.contextmanager
def disabled(model: nnx.Module):
    """Run the base model alone inside the block: every LoRA, adapter and prefix is skipped.

    This is the reference model for DPO/PPO without a second copy of the weights; it works inside
    a jitted loss too (trace `model(x)` once inside the block and once outside). A merged LoRA is
    part of the base kernel, so disabling it is refused: unmerge first."""
    modules = [m for _, m in peft_modules(model)]
    merged = [m for m in modules if getattr(m, "merged", False)]
    if merged:
        raise ValueError("cannot disable adapters while LoRA is merged into the base weights; "
                         "call jaxllm.peft.unmerge(model) first")
    before = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m, was in zip(modules, before):
            m.enabled = was


def parameter_report(model: nnx.Module, trainable=PeftParam) -> dict:
    """Total and trainable parameter counts, as the seed and PEFT's print_trainable_parameters report."""
    total = count_params(model, nnx.Param)
    train = count_params(model, trainable)
    return {"total": total, "trainable": train, "trainable_percent": 100.0 * train / max(total, 1)}


def format_report(report: dict) -> str:
    return (f"Total params: {report['total']:,} | Trainable params: {report['trainable']:,} "
            f"({report['trainable_percent']:.4f}%)")
