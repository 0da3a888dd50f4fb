"""Decoding strategies as composable logits processors, with transformers.generate's semantics.

A processor is a callable `(logits_BV, seen_BV) -> logits_BV` on float32 logits; removed tokens
get -inf. `seen_BV` is a (B, V) bool of the tokens present in prompt + generated so far; it is only
tracked (and passed, else None) when some processor has `needs_seen = True`. The built-in ones are
pytrees whose float settings are leaves, so the compiled decode loop takes them as arguments: a new
temperature, top_p, min_p or penalty reuses the compiled loop; only top_k (a shape) is static.

`build_processors` returns them in Hugging Face's order: repetition penalty, then the warpers
temperature -> top-k -> top-p -> min-p. Off values: temperature 1, top_k 0, top_p 1.0, min_p 0,
repetition_penalty 1. Temperature 0 means greedy; the warpers never move the argmax, so greedy is
the argmax after the repetition penalty, as in transformers.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

STRATEGIES = ("greedy", "sample", "top_k", "top_p", "min_p")


def _processor(cls):
    return jax.tree_util.register_dataclass(dataclasses.dataclass(frozen=True)(cls))


@_processor
class RepetitionPenalty:
    """CTRL / HF: a seen token's logit is divided by `penalty` if positive, multiplied if negative."""

    penalty: float
    needs_seen = True

    def __call__(self, logits_BV, seen_BV):
        penalised = jnp.where(logits_BV < 0, logits_BV * self.penalty, logits_BV / self.penalty)
        return jnp.where(seen_BV, penalised, logits_BV)


@_processor
class Temperature:
    temperature: float

    def __call__(self, logits_BV, seen_BV=None):
        return logits_BV / self.temperature


@_processor
class TopK:
    """Keep the k largest logits (and any tied with the k-th, as HF's `<` comparison does)."""

    k: int = dataclasses.field(metadata=dict(static=True))  # lax.top_k needs it at trace time

    def __call__(self, logits_BV, seen_BV=None):
        if self.k >= logits_BV.shape[-1]:
            return logits_BV
        kth_B1 = jax.lax.top_k(logits_BV, self.k)[0][..., -1:]
        return jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)


@_processor
class TopP:
    """Nucleus: keep the smallest set of most likely tokens whose probability mass is >= p.

    As in HF: sort ascending, drop the prefix whose cumulative mass is <= 1 - p, always keep the
    top token. The kept set is every token at or above the smallest kept logit, which avoids a
    scatter back from sorted order (tokens tied at that logit are all kept)."""

    p: float

    def __call__(self, logits_BV, seen_BV=None):
        sorted_BV = jnp.sort(logits_BV, axis=-1)
        cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
        n_drop_B1 = jnp.sum(cum_BV <= 1.0 - self.p, axis=-1, keepdims=True)
        n_drop_B1 = jnp.minimum(n_drop_B1, logits_BV.shape[-1] - 1)
        threshold_B1 = jnp.take_along_axis(sorted_BV, n_drop_B1, axis=-1)
        return jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)


@_processor
class MinP:
    """Drop tokens whose probability is below `p` times the top token's probability."""

    p: float

    def __call__(self, logits_BV, seen_BV=None):
        probs_BV = jax.nn.softmax(logits_BV, axis=-1)
        floor_B1 = self.p * jnp.max(probs_BV, axis=-1, keepdims=True)
        return jnp.where(probs_BV < floor_B1, -jnp.inf, logits_BV)


def _check(name: str, value, ok: bool, want: str):
    if not ok:
        raise ValueError(f"{name} must be {want}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """A decoding strategy: the one set of settings `generate`, `stream`, `self_consistency` and the
    `sample` sections of the stages share. Off values: temperature 1, top_k 0, top_p 1.0, min_p 0,
    repetition_penalty 1.0; temperature 0 is greedy."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        validate_strategy(self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty)

    @classmethod
    def build(cls, sampling: "SamplingConfig | None" = None, **strategy) -> "SamplingConfig":
        """`sampling` (default: all off) with any of its fields replaced by keyword."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(strategy) - set(names))
        if unknown:
            raise TypeError(f"unknown sampling setting(s) {unknown}; valid: {', '.join(names)}")
        base = sampling if sampling is not None else cls()
        if not isinstance(base, SamplingConfig):
            raise TypeError(f"sampling must be a SamplingConfig, got {type(base).__name__}")
        return dataclasses.replace(base, **strategy) if strategy else base

    def strategy(self) -> dict:
        """The five settings as keywords (of SamplingConfig itself, not of a subclass)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(SamplingConfig)}

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def processors(self) -> tuple:
        """The processors for these settings, in HF's order, leaving out the ones that are off.

        With temperature 0 (greedy) only the repetition penalty is kept: the warpers cannot change
        the argmax."""
        procs = []
        if self.repetition_penalty != 1.0:
            procs.append(RepetitionPenalty(float(self.repetition_penalty)))
        if self.greedy:
            return tuple(procs)
        if self.temperature != 1.0:
            procs.append(Temperature(float(self.temperature)))
        if self.top_k > 0:
            procs.append(TopK(int(self.top_k)))
        if self.top_p < 1.0:
            procs.append(TopP(float(self.top_p)))
        if self.min_p > 0.0:
            procs.append(MinP(float(self.min_p)))
        return tuple(procs)


def validate_strategy(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0) -> None:
    _check("temperature", temperature, isinstance(temperature, (int, float)) and math.isfinite(temperature)
           and temperature >= 0, "a finite number >= 0 (0 = greedy)")
    _check("top_k", top_k, isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 0,
           "an integer >= 0 (0 = off)")
    _check("top_p", top_p, isinstance(top_p, (int, float)) and 0.0 <= top_p <= 1.0, "in [0, 1] (1.0 = off)")
    _check("min_p", min_p, isinstance(min_p, (int, float)) and 0.0 <= min_p <= 1.0, "in [0, 1] (0 = off)")
    _check("repetition_penalty", repetition_penalty, isinstance(repetition_penalty, (int, float))
           and math.isfinite(repetition_penalty) and repetition_penalty > 0, "a finite number > 0 (1.0 = off)")


def build_processors(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                     repetition_penalty: float = 1.0) -> tuple:
    """`SamplingConfig(...).processors()` for keyword settings."""
    return SamplingConfig(temperature, top_k, top_p, min_p, repetition_penalty).processors()


def needs_seen(processors) -> bool:
    return any(getattr(p, "needs_seen", False) for p in processors)


def apply_processors(processors, logits_BV: jax.Array, seen_BV: jax.Array | None = None) -> jax.Array:
    logits_BV = logits_BV.astype(jnp.float32)
    for proc in processors:
        logits_BV = proc(logits_BV, seen_BV)
    return logits_BV


def seen_from_tokens(tokens_BN: jax.Array, vocab_size: int, real_BN: jax.Array | None = None) -> jax.Array:
    """(B, V) bool: which ids occur in each row of `tokens_BN` (ignoring positions where real is 0)."""
    tokens_BN = jnp.asarray(tokens_BN, jnp.int32)
    B = tokens_BN.shape[0]
    real_BN = jnp.ones(tokens_BN.shape, bool) if real_BN is None else jnp.asarray(real_BN, bool)
    rows_BN = jnp.broadcast_to(jnp.arange(B)[:, None], tokens_BN.shape)
    return jnp.zeros((B, vocab_size), bool).at[rows_BN, tokens_BN].max(real_BN)


def sample_with_strategy(logits, strategy: str, key: jax.Array | None = None, *, temperature: float = 1.0,
                         top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                         repetition_penalty: float = 1.0, previous_tokens=None) -> jax.Array:
    """One decoding step: logits (V,) or (B, V) -> token id(s) () or (B,).

    `strategy` is "greedy", "sample" (plain/temperature sampling) or "top_k" / "top_p" / "min_p",
    each of which needs its parameter; other parameters given combine in HF's order.
    `repetition_penalty` needs `previous_tokens`, the (N,) or (B, N) ids already in the context."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    needed = {"top_k": ("top_k", top_k, 0), "top_p": ("top_p", top_p, 1.0), "min_p": ("min_p", min_p, 0.0)}
    if strategy in needed and needed[strategy][1] == needed[strategy][2]:
        name = needed[strategy][0]
        raise ValueError(f"strategy {strategy!r} needs {name}=... (it is off at {needed[strategy][2]})")
    if strategy == "greedy":
        temperature = 0.0
    elif temperature == 0:
        raise ValueError(f"strategy {strategy!r} samples: give temperature > 0, or use strategy 'greedy'")
    processors = SamplingConfig(temperature, top_k, top_p, min_p, repetition_penalty).processors()
    logits = jnp.asarray(logits)
    squeeze = logits.ndim == 1
    logits_BV = logits[None] if squeeze else logits
    if logits_BV.ndim != 2:
        raise ValueError(f"logits must be (V,) or (B, V), got shape {logits.shape}")
    seen_BV = None
    if needs_seen(processors):
        if previous_tokens is None:
            raise ValueError("repetition_penalty needs previous_tokens=(B, N) ids already in the context")
        prev = jnp.asarray(previous_tokens, jnp.int32)
        prev = prev[None] if prev.ndim == 1 else prev
        seen_BV = seen_from_tokens(prev, logits_BV.shape[-1])
    processed_BV = apply_processors(processors, logits_BV, seen_BV)
    if temperature == 0:
        out_B = jnp.argmax(processed_BV, axis=-1)
    else:
        if key is None:
            raise ValueError(f"strategy {strategy!r} samples: pass key=jax.random.key(...)")
        out_B = jax.random.categorical(key, processed_BV, axis=-1)
    return out_B[0] if squeeze else out_B
