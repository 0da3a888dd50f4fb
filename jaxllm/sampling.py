"""Generation from a GPT: prefill the prompt into a KV cache, then decode one token per step.

Prefill and the whole decode loop are ONE compiled function (`lax.while_loop`s over a fixed-size
KVCache and token buffer), recompiled only when the batch, the prompt width, `max_new_tokens`, the
set of strategies in use, top_k, the number of stop ids or custom processors change: temperature,
top_p, min_p, the repetition penalty and the stop/pad ids are arguments of the compiled loop, not
constants in it.

Semantics, chosen once and relied on by tests:
- Batched prompts of different lengths are left-padded; padding takes no position and no
  attention, so a row gets the tokens it would get alone.
- A prompt longer than `block_size` is cropped from the left (its last `block_size` tokens).
- When prompt + new tokens outgrow `block_size`, generation slides as nanoGPT does: each further
  token is predicted from the last `block_size` tokens at positions 0..block_size-1. GPT-2's
  learned positions move with the window, so no cached key stays valid: those steps recompute a
  full window (much slower per token). Keep prompt + max_new_tokens <= block_size + 1 to stay on
  the cached path.
- A row stops at `eos_id` or at any of `stop_ids` (e.g. the newline token, or the first token of
  "Observation:"): that token is written, then only `pad_id`. `generate_text` works in text:
  stop strings, the continuation cut before the first of them.
- Row b's sampling key at step i is fold_in(fold_in(key, i), b): steps, chunks (streaming) and
  batch size do not change the randomness of a given (step, row).
- `return_logprobs` gives log p(token) under the model's RAW distribution (softmax of the
  unprocessed logits: no temperature, truncation or penalty); positions after a row's EOS get 0.
  The RL stages score log-probs again at their sampling temperature (jaxllm.alignment.rollout).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm import parallel
from jaxllm.logits_processors import SamplingConfig, apply_processors, needs_seen, sample_with_strategy

__all__ = ["SamplingConfig", "cut_at_eos", "cut_at_stop", "cut_at_stop_strings", "decode_stream", "generate", "generate_chunks",
           "generate_text", "prepare_prompts", "sample_in_jit", "sample_with_strategy", "sampler_plan", "stream"]


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static settings of one compiled decode (hashable: a jit static argument). The dynamic ones
    travel in the decode state as `settings`: built-in processors, stop ids (eos first; -1: none), pad id."""

    max_new_tokens: int
    n_cached: int          # new tokens produced while every position fits the cache
    greedy: bool
    custom: tuple          # the caller's logits_processors, applied after the built-in ones
    vocab_size: int


def _plan(model, P: int, max_new_tokens: int, greedy: bool, custom) -> _Plan:
    block = model.config.block_size
    # Feeding the token at slot s needs position s <= block - 1; the prefill gives the first token.
    n_cached = min(max_new_tokens, block - P + 1)
    return _Plan(max_new_tokens, n_cached, bool(greedy), tuple(custom), model.config.vocab_size)


def _choose(plan: _Plan, logits_BV, st: dict):
    """Pick the token of step st["i"] for every row and write it, its logprob and EOS state."""
    B = logits_BV.shape[0]
    logits_BV = logits_BV.astype(jnp.float32)
    settings = st["settings"]
    processed_BV = apply_processors(settings["processors"] + plan.custom, logits_BV, st["seen"])
    if plan.greedy:
        tok_B = jnp.argmax(processed_BV, axis=-1).astype(jnp.int32)
    else:
        step_key = jax.random.fold_in(st["key"], st["i"])
        keys_B = jax.vmap(lambda b: jax.random.fold_in(step_key, b))(jnp.arange(B))
        tok_B = jax.vmap(jax.random.categorical)(keys_B, processed_BV).astype(jnp.int32)
    logp_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BV, axis=-1), tok_B[:, None], axis=-1)[:, 0]
    done_B = st["done"]
    tok_B = jnp.where(done_B, settings["pad"], tok_B)
    logp_B = jnp.where(done_B, 0.0, logp_B)
    P = st["buf"].shape[1] - plan.max_new_tokens
    st = dict(st, buf=jax.lax.dynamic_update_slice(st["buf"], tok_B[:, None], (0, P + st["i"])),
              logp=jax.lax.dynamic_update_slice(st["logp"], logp_B[:, None], (0, st["i"])),
              done=done_B | jnp.any(tok_B[:, None] == settings["stop"][None, :], axis=1), i=st["i"] + 1)
    if st["seen"] is not None:
        st["seen"] = st["seen"].at[jnp.arange(B), tok_B].set(True)
    return st


def _prefill(model, plan: _Plan, prompt_BP, real_BP, key, settings, seen_BV) -> dict:
    B, P = prompt_BP.shape
    cache = model.init_cache(B, P + max(plan.n_cached - 1, 0))
    h_BPD, cache = model.features(prompt_BP, attention_mask=real_BP, cache=cache)
    logits_BV = model.logits(h_BPD[:, -1:])[:, 0]  # left padding: the last column is real in every row
    st = dict(
        buf=jnp.full((B, P + plan.max_new_tokens), settings["pad"], jnp.int32).at[:, :P].set(prompt_BP),
        logp=jnp.zeros((B, plan.max_new_tokens), jnp.float32),
        done=jnp.zeros((B,), bool), i=jnp.zeros((), jnp.int32), key=key,
        pad_B=(P - jnp.sum(real_BP, axis=1)).astype(jnp.int32),
        seen=seen_BV,
        settings=settings, cache=cache)
    return _choose(plan, logits_BV, st)


def _cached_step(model, plan: _Plan, st: dict) -> dict:
    P = st["buf"].shape[1] - plan.max_new_tokens
    B = st["buf"].shape[0]
    last_B1 = jax.lax.dynamic_slice(st["buf"], (0, P + st["i"] - 1), (B, 1))
    h_B1D, cache = model.features(last_B1, cache=st["cache"])
    return _choose(plan, model.logits(h_B1D)[:, 0], dict(st, cache=cache))


def _sliding_step(model, plan: _Plan, st: dict) -> dict:
    """nanoGPT's window: the last block_size tokens of each row, at positions from 0."""
    W = model.config.block_size
    B, L = st["buf"].shape
    cur = L - plan.max_new_tokens + st["i"]          # tokens known; > W on this path
    window_BW = jax.lax.dynamic_slice(st["buf"], (0, cur - W), (B, W))
    real_BW = (cur - W + jnp.arange(W))[None, :] >= st["pad_B"][:, None]
    positions_BW = jnp.maximum(jnp.cumsum(real_BW, axis=1, dtype=jnp.int32) - 1, 0)
    h_BWD = model.features(window_BW, attention_mask=real_BW, positions=positions_BW)
    return _choose(plan, model.logits(h_BWD[:, -1:])[:, 0], st)


def _decode(model, plan: _Plan, st: dict, stop) -> dict:
    """Steps st["i"] .. stop-1 (fewer if every row has finished)."""
    def running(limit):
        return lambda s: (s["i"] < limit) & ~jnp.all(s["done"])

    st = jax.lax.while_loop(running(jnp.minimum(stop, plan.n_cached)),
                            functools.partial(_cached_step, model, plan), st)
    if plan.max_new_tokens > plan.n_cached:
        cache = st.pop("cache")
        st = jax.lax.while_loop(running(stop), functools.partial(_sliding_step, model, plan), st)
        st["cache"] = cache
    return st


@functools.partial(jax.jit, static_argnames=("graphdef", "plan"))
def _generate_jit(graphdef, state, prompt_BP, real_BP, key, settings, seen_BV, *, plan):
    model = nnx.merge(graphdef, state)
    st = _decode(model, plan, _prefill(model, plan, prompt_BP, real_BP, key, settings, seen_BV),
                 plan.max_new_tokens)
    return st["buf"], st["logp"]


def sampler_plan(config, prompt_width: int, max_new_tokens: int, sampling: SamplingConfig, *, eos_id: int,
                 pad_id: int):
    """(plan, settings) for `sample_in_jit`: the static plan of a decode, by a model of `config` (a
    GPTConfig), over (B, prompt_width) prompts
    and its dynamic settings. For callers that sample inside their own compiled program (RL rollouts)
    with weights passed as arguments; custom processors and the repetition penalty are not offered
    there."""
    if sampling.repetition_penalty != 1.0:
        raise ValueError("sample_in_jit does not track seen tokens: the repetition penalty is not offered here")
    n_cached = min(int(max_new_tokens), config.block_size - int(prompt_width) + 1)
    plan = _Plan(int(max_new_tokens), n_cached, sampling.greedy, (), config.vocab_size)
    settings = dict(processors=sampling.processors(), stop=_stop_array(eos_id, ()), pad=np.int32(pad_id))
    return plan, settings


def sample_in_jit(model, plan: _Plan, settings: dict, prompt_BP, real_BP, key):
    """Traceable: the new tokens (B, max_new_tokens) and their raw log-probs, exactly as `generate`
    draws them (same steps, same per-(step, row) keys), for use inside a caller's `jax.jit`."""
    st = _decode(model, plan, _prefill(model, plan, prompt_BP, real_BP, key, settings, None), plan.max_new_tokens)
    P = prompt_BP.shape[1]
    return st["buf"][:, P:], st["logp"]


# Streaming runs the same prefill and steps, in chunks; the non-streaming path above is untouched.
@functools.partial(jax.jit, static_argnames=("graphdef", "plan"))
def _prefill_jit(graphdef, state, prompt_BP, real_BP, key, settings, seen_BV, *, plan):
    return _prefill(nnx.merge(graphdef, state), plan, prompt_BP, real_BP, key, settings, seen_BV)


@functools.partial(jax.jit, static_argnames=("graphdef", "plan"), donate_argnames=("st",))
def _decode_jit(graphdef, state, st, stop, *, plan):
    return _decode(nnx.merge(graphdef, state), plan, st, stop)


def _is_ragged(prompt_ids) -> bool:
    return (isinstance(prompt_ids, (list, tuple)) and len(prompt_ids) > 0
            and all(isinstance(r, (list, tuple, np.ndarray)) for r in prompt_ids))


def prepare_prompts(prompt_ids, block_size: int | None, pad_id: int = 0, prompt_mask=None):
    """-> (tokens_BP, real_BP, squeeze): int32 and bool numpy arrays, left-padded, cropped from the
    left to `block_size` tokens (None: not cropped).

    `prompt_ids` is (P,), (B, P), or a list of int lists of any lengths (left-padded here).
    `prompt_mask` (B, P), 1 = real token, describes an already left-padded (B, P) array."""
    if _is_ragged(prompt_ids):
        if prompt_mask is not None:
            raise ValueError("prompt_mask is for a padded (B, P) array; a list of lists is padded here")
        rows = [np.asarray(r, np.int64).reshape(-1) for r in prompt_ids]
        if any(len(r) == 0 for r in rows):
            raise ValueError(f"prompt {[len(r) for r in rows].index(0)} is empty; give at least one "
                             f"token (e.g. a newline or EOS)")
        P = max(len(r) for r in rows)
        tokens = np.full((len(rows), P), pad_id, np.int64)
        real = np.zeros((len(rows), P), bool)
        for b, r in enumerate(rows):
            tokens[b, P - len(r):], real[b, P - len(r):] = r, True
        squeeze = False
    else:
        tokens = np.asarray(prompt_ids)
        if tokens.dtype == object or not (tokens.size == 0 or np.issubdtype(tokens.dtype, np.integer)):
            raise ValueError("prompt_ids must be int ids: (P,), (B, P) or a list of int lists")
        squeeze = tokens.ndim == 1
        tokens = tokens[None] if squeeze else tokens
        if tokens.ndim != 2:
            raise ValueError(f"prompt_ids must be (P,), (B, P) or a list of int lists, got shape {tokens.shape}")
        if tokens.shape[1] == 0:
            raise ValueError("the prompt is empty; give at least one token (e.g. a newline or EOS)")
        if prompt_mask is None:
            real = np.ones(tokens.shape, bool)
        else:
            real = np.asarray(prompt_mask).astype(bool).reshape(tokens.shape) \
                if np.size(prompt_mask) == tokens.size else None
            if real is None:
                raise ValueError(f"prompt_mask must have the prompt's shape {tokens.shape}")
            if not real[:, -1].all() or (np.diff(real.astype(np.int8), axis=1) < 0).any():
                raise ValueError("prompt_mask must describe left padding (each row: 0s, then 1s, "
                                 "ending with a real token); or pass a list of int lists and let "
                                 "generate pad them")
    if block_size is not None and tokens.shape[1] > block_size:  # the model sees at most block_size
        tokens, real = tokens[:, -block_size:], real[:, -block_size:]
    return tokens.astype(np.int32), real, squeeze


def cut_at_eos(ids, eos_id: int | None) -> list[int]:
    """The ids before the first `eos_id` (all of them if it is None or absent): after EOS a row
    holds only padding."""
    return cut_at_stop(ids, () if eos_id is None else (eos_id,))


def cut_at_stop(ids, stop_ids) -> list[int]:
    """The ids before the first of any of `stop_ids` (all of them if none occurs)."""
    ids = np.asarray(ids).reshape(-1).tolist()
    stops = set(int(s) for s in stop_ids)
    return next((ids[:i] for i, t in enumerate(ids) if t in stops), ids)


def _stop_array(eos_id, stop_ids) -> np.ndarray:
    """The ids that end a row (eos first), int32; [-1] (matches nothing) when there are none."""
    ids = ([] if eos_id is None else [int(eos_id)]) + [int(s) for s in stop_ids]
    return np.asarray(list(dict.fromkeys(ids)) or [-1], np.int32)


class _Prepared(NamedTuple):
    plan: _Plan
    settings: dict        # built-in processors, stop ids, pad id: arguments of the compiled loop
    tokens: np.ndarray    # (B, P) left-padded prompts, cropped to the block
    real: np.ndarray      # (B, P) bool
    seen: np.ndarray | None  # (B, V) tokens of the WHOLE prompt, for the repetition penalty
    squeeze: bool
    full: np.ndarray      # (B, P_full) the uncropped prompts


def _setup(model, prompt_ids, max_new_tokens, prompt_mask, sampling: SamplingConfig, eos_id, pad_id,
           logits_processors, stop_ids=()) -> _Prepared:
    cfg = model.config
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if isinstance(stop_ids, (int, np.integer)) or isinstance(stop_ids, str):
        raise ValueError(f"stop_ids must be a sequence of token ids, got {stop_ids!r}")
    stop_ids = tuple(stop_ids)
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id),
                        *((f"stop_ids[{i}]", s) for i, s in enumerate(stop_ids))):
        if value is not None and not 0 <= int(value) < cfg.vocab_size:
            raise ValueError(f"{name}={value} is outside the vocabulary [0, {cfg.vocab_size})")
    pad = int(pad_id if pad_id is not None else (eos_id if eos_id is not None else 0))
    processors = sampling.processors()
    for proc in logits_processors:
        try:
            hash(proc)
        except TypeError:
            raise ValueError(f"logits processor {proc!r} must be hashable (e.g. a frozen dataclass): "
                             f"it is a static setting of the compiled loop") from None
    full, real_full, squeeze = prepare_prompts(prompt_ids, None, pad, prompt_mask)
    if int(full.max(initial=0)) >= cfg.vocab_size or int(full.min(initial=0)) < 0:
        raise ValueError(f"prompt ids must be in [0, {cfg.vocab_size}); got {full.min()}..{full.max()}")
    seen = None
    if needs_seen(processors + tuple(logits_processors)):
        # as transformers does: every prompt token counts, also those cropped off to fit the block
        seen = np.zeros((full.shape[0], cfg.vocab_size), bool)
        rows, cols = np.nonzero(real_full)
        seen[rows, full[rows, cols]] = True
    tokens, real = full[:, -cfg.block_size:], real_full[:, -cfg.block_size:]  # crop from the left
    plan = _plan(model, tokens.shape[1], int(max_new_tokens), sampling.greedy, logits_processors)
    settings = dict(processors=processors, stop=_stop_array(eos_id, stop_ids), pad=np.int32(pad))
    return _Prepared(plan, settings, tokens, real, seen, squeeze, full)


def _rows_on_mesh(state, prep: _Prepared):
    """Prompts, their mask and seen tokens as device arrays, and the named mesh the weights are on
    (`jaxllm.parallel.shard_model`), if any: there the rows split over data x fsdp where they
    divide (replicated otherwise), and `parallel.on_mesh` keeps the activations' rows split so."""
    mesh = parallel.mesh_of(state)
    arrays = (prep.tokens, prep.real, prep.seen)
    if mesh is None:
        return jnp.asarray(prep.tokens), jnp.asarray(prep.real), prep.seen, None
    return (*parallel.shard_batch(arrays, mesh, 0), mesh)


def generate(model: nnx.Module, prompt_ids, max_new_tokens: int, sampling: SamplingConfig | None = None, *,
             eos_id: int | None = None, pad_id: int | None = None, key: jax.Array | None = None,
             return_logprobs: bool = False, prompt_mask=None, logits_processors=(), stop_ids=(), **strategy):
    """Continue prompts; returns ids (B, P + max_new_tokens), or (P + max_new_tokens,) for a 1-D prompt.

    `prompt_ids`: (P,), (B, P) (with `prompt_mask` if left-padded) or a list of int lists (left-padded
    here with `pad_id`). The output holds the whole prompt (uncropped, padded) then the new tokens.
    The strategy is a `SamplingConfig` and/or its fields as keywords (which win), as in
    transformers: temperature (0 = greedy), top_k (0 = off), top_p (1.0 = off), min_p (0 = off),
    repetition_penalty (1.0 = off; counts prompt and generated tokens, not padding); plus any
    hashable `logits_processors` `(logits_BV, seen_BV) -> logits_BV`, applied last (they are static
    settings of the compiled loop: a new one compiles it again).
    After a row emits `eos_id` or any of `stop_ids` it emits `pad_id` (default: eos_id, else 0); the
    loop stops when every row has. With `return_logprobs`, returns (ids, logprobs (B, max_new_tokens)): the raw
    model log-probability of each new token (0 after EOS).
    """
    prep = _setup(model, prompt_ids, max_new_tokens, prompt_mask, SamplingConfig.build(sampling, **strategy),
                  eos_id, pad_id, logits_processors, stop_ids)
    full = prep.full
    if prep.plan.max_new_tokens == 0:
        out, logp = full, np.zeros((full.shape[0], 0), np.float32)
    else:
        graphdef, state = nnx.split(model)
        tokens, real, seen, mesh = _rows_on_mesh(state, prep)
        with parallel.on_mesh(mesh):
            buf, logp = _generate_jit(graphdef, state, tokens, real, jax.random.key(0) if key is None else key,
                                      prep.settings, seen, plan=prep.plan)
        # in numpy: eager jnp ops would each compile a small program on first use
        out = np.concatenate([full, np.asarray(buf)[:, prep.tokens.shape[1]:]], axis=1)
        logp = np.asarray(logp)
    if prep.squeeze:
        out, logp = out[0], logp[0]
    out, logp = jnp.asarray(out), jnp.asarray(logp)
    return (out, logp) if return_logprobs else out


def generate_chunks(model: nnx.Module, prompt_ids, max_new_tokens: int, sampling: SamplingConfig | None = None,
                    *, chunk_size: int = 8, eos_id: int | None = None, pad_id: int | None = None,
                    key: jax.Array | None = None, prompt_mask=None, logits_processors=(), stop_ids=(),
                    **strategy):
    """Like `generate` (same arguments), but yields the new tokens as numpy (B, n) blocks,
    `chunk_size` steps per compiled call; the first block comes from the prefill alone. Stops
    after every row's EOS (or stop id)."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    prep = _setup(model, prompt_ids, max_new_tokens, prompt_mask, SamplingConfig.build(sampling, **strategy),
                  eos_id, pad_id, logits_processors, stop_ids)
    plan = prep.plan
    if plan.max_new_tokens == 0:
        return
    graphdef, state = nnx.split(model)
    P = prep.tokens.shape[1]
    tokens, real, seen, mesh = _rows_on_mesh(state, prep)
    with parallel.on_mesh(mesh):
        st = _prefill_jit(graphdef, state, tokens, real, jax.random.key(0) if key is None else key,
                          prep.settings, seen, plan=plan)
    emitted = 0
    while True:
        buf, i, done = np.asarray(st["buf"]), int(st["i"]), bool(np.asarray(st["done"]).all())
        yield buf[:, P + emitted:P + i]
        emitted = i
        if i >= plan.max_new_tokens or done:
            return
        with parallel.on_mesh(mesh):
            st = _decode_jit(graphdef, state, st, np.int32(min(i + chunk_size, plan.max_new_tokens)), plan=plan)


def decode_stream(tokenizer, id_chunks, context: int = 4):
    """Text pieces for a stream of token-id chunks, never ending a piece inside a character.

    After each chunk a window of the latest ids is decoded and its new tail is yielded, minus
    trailing U+FFFD: a byte-level BPE token can stop in the middle of a UTF-8 character, which
    decodes as a replacement character until a later token completes it. Once everything decoded
    so far is out, the window restarts `context` ids before the end (so tokenizers that decode a
    token differently at the start of a text, like SentencePiece's leading space, see a left
    neighbour), which keeps each decode short: the work is linear in the stream's length. The last
    piece carries whatever was held back. For tokenizers whose decoding is a concatenation of
    per-token text (char, byte-level BPE, tiktoken) the pieces join to tokenizer.decode(all ids)."""
    ids: list[int] = []
    start = 0       # the window is ids[start:]
    emitted = ""    # the part of decode(ids[start:]) already yielded
    for chunk in id_chunks:
        ids += np.asarray(chunk).reshape(-1).tolist()
        text = tokenizer.decode(ids[start:])
        stable = text.rstrip("\ufffd")
        if len(stable) > len(emitted) and stable.startswith(emitted):
            yield stable[len(emitted):]
            emitted = stable
        if emitted == text and len(ids) - start > 2 * context:
            start = len(ids) - context
            emitted = tokenizer.decode(ids[start:])
    text = tokenizer.decode(ids[start:])
    if len(text) > len(emitted):
        yield text[len(emitted):]


def stream(model: nnx.Module, tokenizer, prompt, max_new_tokens: int = 256,
           sampling: SamplingConfig | None = None, *, chunk_size: int = 8, stop_at_eos: bool = True,
           key: jax.Array | None = None, logits_processors=(), **strategy):
    """Yield the continuation of one prompt (text or ids) as text, as tokens arrive.

    Runs the compiled prefill once, then `chunk_size` decode steps per compiled call (the same
    steps as `generate`, so with the same key the text is generate's). Pieces never split a UTF-8
    character (see `decode_stream`). With `stop_at_eos`, tokenizer.eos_id ends the stream and is
    not yielded. The strategy (`sampling` and/or its fields as keywords) is generate's."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else np.asarray(prompt).reshape(-1).tolist()
    if not ids:
        raise ValueError("the prompt is empty; give at least one token (e.g. a newline or EOS)")
    eos_id = tokenizer.eos_id if stop_at_eos else None

    def until_eos():
        for block_1n in generate_chunks(model, [ids], max_new_tokens, sampling, chunk_size=chunk_size, key=key,
                                        eos_id=eos_id, logits_processors=logits_processors, **strategy):
            row = cut_at_eos(block_1n[0], eos_id)
            yield row
            if len(row) < block_1n.shape[1]:  # EOS was in this block
                return

    yield from decode_stream(tokenizer, until_eos())


def generate_text(model: nnx.Module, tokenizer, prompts, max_new_tokens: int,
                  sampling: SamplingConfig | None = None, *, stop: Sequence[str] = (), key: jax.Array | None = None,
                  must_fit: bool = False, logits_processors=(), **strategy) -> list[str]:
    """The continuations of text prompts (one string or a list, run as ONE batched `generate` call),
    as text, cut before the tokenizer's EOS and before the first of the `stop` strings (which are
    not included, as in OpenAI's API). A stop string that is one token also stops its row early
    (a `stop_ids` entry), so the batch ends as soon as every row has stopped; a longer one cuts the
    text afterwards. Returns one string per prompt (a list even for one prompt). Prompts are
    cropped from the left to the block as `generate` does, unless `must_fit`: then a prompt that
    with `max_new_tokens` exceeds the model's block_size is a ValueError naming it."""
    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a string or a non-empty list of strings")
    stop = [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop must be non-empty strings, got {stop!r}")
    eos = tokenizer.eos_id
    rows = [tokenizer.encode(p) or [eos if eos is not None else 0] for p in prompts]
    if must_fit:
        for i, r in enumerate(rows):
            check_fits(len(r), max_new_tokens, model.config.block_size, f"prompt {i}")
    stop_ids = []
    for s in stop:
        ids = tokenizer.encode(s)
        if len(ids) == 1 and tokenizer.decode(ids) == s:
            stop_ids.append(ids[0])
    pad = tokenizer.pad_id if getattr(tokenizer, "pad_id", None) is not None else eos
    out = np.asarray(generate(model, rows, max_new_tokens, sampling, eos_id=eos, pad_id=pad, key=key,
                              logits_processors=logits_processors, stop_ids=stop_ids, **strategy))
    width = max(len(r) for r in rows)
    texts = []
    for row in out[:, width:]:
        texts.append(cut_at_stop_strings(tokenizer.decode(cut_at_eos(row, eos)), stop))
    return texts


def check_fits(prompt_tokens: int, max_new_tokens: int, block_size: int, what: str = "the prompt") -> None:
    """A ValueError naming `what` when a prompt of `prompt_tokens` plus `max_new_tokens` exceeds
    the model's block (where `generate` would crop the prompt from the left)."""
    if prompt_tokens + max_new_tokens > block_size:
        raise ValueError(f"{what} is {prompt_tokens} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                         f"the model's block_size {block_size}: shorten the prompt or lower max_new_tokens")


def cut_at_stop_strings(text: str, stop: Sequence[str]) -> str:
    """`text` before the first occurrence of any of the `stop` strings (all of it if none occurs)."""
    ends = [text.find(s) for s in stop]
    return text[:min([e for e in ends if e >= 0], default=len(text))]
