"""LoRA: a low-rank update B·A·scale added to chosen linear layers, in its own parameter tree.

Follows Hugging Face PEFT's definition: A is Kaiming-uniform with a=sqrt(5), i.e. U(±1/sqrt(fan_in)),
B is zero (a fresh LoRA changes nothing), scale = alpha/r (alpha/sqrt(r) with rsLoRA), dropout
on the LoRA input only.

Targets are layer names. Every `Linear` of the GPT is named by its state path (`h.0.attn.c_attn`,
`h.0.attn.c_proj`, `h.0.mlp.c_fc`, `h.0.mlp.c_proj`); the fused q/k/v projection also offers its
thirds as `h.0.attn.q`, `.k`, `.v`, so the seed's "LoRA on q and v" means exactly that. A target
is PEFT-style: a list of names, each matching a layer name exactly or as a dotted suffix
(["q", "v"], ["c_attn"], ["mlp.c_fc"]); a string, matched as a regular expression against the
whole name; or "all-linear" (every linear layer except the tied LM head).
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.model import Linear, dropout
from jaxllm.peft.common import LoraParam, PeftModule

QKV = ("q", "k", "v")   # the thirds of a fused c_attn, in its output order


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target: str | tuple[str, ...] = ("q", "v")
    rslora: bool = False      # scale alpha/sqrt(r) (rank-stabilised LoRA) instead of alpha/r

    def __post_init__(self):
        if isinstance(self.target, list):
            object.__setattr__(self, "target", tuple(self.target))
        if self.r <= 0:
            raise ValueError(f"peft.lora.r must be a positive rank, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"peft.lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target:
            raise ValueError("peft.lora.target is empty; name layers (e.g. ['q', 'v']) or use 'all-linear'")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


@dataclasses.dataclass(frozen=True)
class Part:
    """A slice [offset, offset+size) of a linear layer's output that one LoRA pair updates."""
    name: str        # the target name: the layer's own, or its q/k/v third
    offset: int
    size: int


class LoRA(PeftModule):
    """The update of one linear layer: one (A, B) pair per output part, stacked.

    a: (parts, in, r), b: (parts, r, part size), both `LoraParam`."""

    def __init__(self, d_in: int, parts: tuple[Part, ...], config: LoraConfig, *, key: jax.Array,
                 dtype, param_dtype):
        P, r, size = len(parts), config.r, parts[0].size
        bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform(a=sqrt(5)) on fan_in = d_in
        self.a = LoraParam(jax.random.uniform(key, (P, d_in, r), param_dtype, -bound, bound))
        self.b = LoraParam(jnp.zeros((P, r, size), param_dtype))
        self.parts, self.config, self.dtype = parts, config, dtype
        self.rate = config.dropout
        self.merged = False

    def __call__(self, x_ND: jax.Array, y_NO: jax.Array, dropout_key: jax.Array | None) -> jax.Array:
        if not self.enabled or self.merged:
            return y_NO
        P, d_in, r = self.a.shape
        x_ND = dropout(x_ND.reshape(-1, d_in), self.rate, dropout_key).astype(self.dtype)
        # all parts' A in one matmul: (N, in) @ (in, P*r)
        xa_NR = x_ND @ self.a[...].astype(self.dtype).transpose(1, 0, 2).reshape(d_in, P * r)
        b_PrS = self.b[...].astype(self.dtype)
        y = y_NO.reshape(x_ND.shape[0], -1)
        for p, part in enumerate(self.parts):
            d_NS = (xa_NR[:, p * r:(p + 1) * r] @ b_PrS[p]) * self.config.scale
            if part.size == y.shape[-1]:
                y = y + d_NS.astype(y.dtype)
            else:
                y = y.at[:, part.offset:part.offset + part.size].add(d_NS.astype(y.dtype))
        return y.reshape(y_NO.shape)

    def delta(self) -> jax.Array:
        """B·A·scale as a float32 (in, out-slices) update per part: (parts, in, size)."""
        a = self.a[...].astype(jnp.float32)
        b = self.b[...].astype(jnp.float32)
        return jnp.einsum("pir,prs->pis", a, b, precision=jax.lax.Precision.HIGHEST) * self.config.scale


def linear_layers(model: nnx.Module) -> dict[str, Linear]:
    """Every linear layer of the model by dotted name (the LM head is tied to wte: not a Linear)."""
    return {".".join(map(str, path)): m for path, m in nnx.iter_modules(model) if isinstance(m, Linear)}


def target_parts(model) -> dict[str, tuple[str, Part]]:
    """Every target name -> (its layer's name, the part of that layer's output it updates)."""
    out = {}
    for name, lin in linear_layers(model).items():
        out_features = lin.out_features   # c_attn's kernel is (in, 3, D): parts index its flat columns
        out[name] = (name, Part(name, 0, out_features))
        if name.endswith("attn.c_attn"):
            third = out_features // 3
            stem = name[: -len("c_attn")]
            for i, qkv in enumerate(QKV):
                out[stem + qkv] = (name, Part(stem + qkv, i * third, third))
    return out


def _matches(name: str, target) -> bool:
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def _summary(names) -> str:
    """h.0.attn.q, h.1.attn.q, ... -> h.{0..11}.attn.q (the list a bad target's error shows)."""
    forms = {}
    for n in names:
        m = re.match(r"h\.(\d+)\.(.*)", n)
        forms.setdefault(m.group(2) if m else n, []).append(int(m.group(1)) if m else None)
    return ", ".join(f"h.{{{min(v)}..{max(v)}}}.{k}" if v[0] is not None else k for k, v in forms.items())


def resolve_targets(model: nnx.Module, target) -> dict[str, tuple[Part, ...]]:
    """layer name -> the parts of it that LoRA updates. Errors list the names that exist."""
    candidates = target_parts(model)
    if target == "all-linear":
        chosen = {name for name, (layer, part) in candidates.items() if part.name == layer}
    else:
        if isinstance(target, str):
            try:
                re.compile(target)
            except re.error as e:
                raise ValueError(f"peft.lora.target {target!r} is not a valid regular expression ({e})") from None
        elif not isinstance(target, (list, tuple)) or not all(isinstance(t, str) for t in target):
            raise ValueError(f"peft.lora.target must be a regex string, 'all-linear' or a list of names, got {target!r}")
        chosen = {name for name in candidates if _matches(name, target)}
    if not chosen:
        raise ValueError(f"peft.lora.target {target!r} matches no linear layer. Available layers: "
                         f"{_summary(candidates)} (a list entry matches a name or its dotted suffix, "
                         f"e.g. ['q', 'v'] or ['c_attn']; a string is a regex on the whole name; "
                         f"or 'all-linear')")
    per_layer: dict[str, list[Part]] = {}
    for name in sorted(chosen, key=list(candidates).index):
        layer, part = candidates[name]
        per_layer.setdefault(layer, []).append(part)
    for layer, parts in per_layer.items():
        if len(parts) > 1 and any(p.name == layer for p in parts):
            raise ValueError(f"peft.lora.target {target!r} selects {layer} both whole and by its q/k/v "
                             f"thirds ({', '.join(p.name for p in parts)}); choose one")
    return {layer: tuple(parts) for layer, parts in per_layer.items()}


def add_lora(model: nnx.Module, config: LoraConfig = LoraConfig(), *, rngs: nnx.Rngs | None = None):
    """Give the chosen linear layers of `model` a fresh LoRA (in place); returns the model.

    The trainable subset is then `jaxllm.peft.LoraParam` (or `PeftParam` for every method)."""
    layers = linear_layers(model)
    targets = resolve_targets(model, config.target)
    already = [n for n in targets if layers[n].lora is not None]
    if already:
        raise ValueError(f"{already[0]} already has a LoRA; one LoRA per layer")
    rngs = rngs or nnx.Rngs(0)
    for layer, parts in targets.items():
        lin = layers[layer]
        d_in = lin.kernel.shape[0]
        smallest = min(d_in, parts[0].size)
        if config.r > smallest:
            raise ValueError(f"peft.lora.r={config.r} is larger than layer {layer} allows "
                             f"({d_in} in, {parts[0].size} out): choose r <= {smallest}")
        lin.lora = LoRA(d_in, parts, config, key=rngs.params(), dtype=lin.dtype,
                        param_dtype=lin.param_dtype)
    return model


def lora_layers(model: nnx.Module) -> dict[str, Linear]:
    return {n: lin for n, lin in linear_layers(model).items() if lin.lora is not None}


def _fold_delta(lin: Linear, sign: float) -> None:
    shape = lin.kernel.shape
    kernel = lin.kernel[...].astype(jnp.float32).reshape(shape[0], -1)
    for part, d in zip(lin.lora.parts, lin.lora.delta()):
        kernel = kernel.at[:, part.offset:part.offset + part.size].add(sign * d)
    lin.kernel[...] = kernel.reshape(shape).astype(lin.kernel.dtype)


def merge(model: nnx.Module, unload: bool = False):
    """Fold every LoRA into its base kernel (in float32): inference then costs what the base does.

    With `unload`, the LoRA modules are removed afterwards (PEFT's merge_and_unload), leaving a
    plain GPT that `jaxllm.to_hf` can export."""
    layers = lora_layers(model).values()
    if not all(lin.lora.enabled for lin in layers):  # checked first: a refused merge changes nothing
        raise ValueError("cannot merge a disabled LoRA; merge outside jaxllm.peft.disabled(...)")
    for lin in layers:
        if not lin.lora.merged:
            _fold_delta(lin, +1.0)
            lin.lora.merged = True
        if unload:
            lin.lora = None
    return model


def unmerge(model: nnx.Module):
    """Subtract what `merge` added: the base kernels return to their values (to float32 rounding)."""
    for lin in lora_layers(model).values():
        if lin.lora.merged:
            _fold_delta(lin, -1.0)
            lin.lora.merged = False
    return model
