"""Properties of generation: KV cache, padding, strategies, EOS, streaming, self-consistency, CLI."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from jaxllm import sampling
from helpers import TINY, random_tokens, run_main
from jaxllm.config import GPTConfig
from jaxllm.logits_processors import (MinP, RepetitionPenalty, TopK, TopP, apply_processors, build_processors,
                                      sample_with_strategy)
from jaxllm.model import GPT
from jaxllm.prompting import extract_answer, majority_vote, self_consistency
from jaxllm.sampling import decode_stream, generate, stream
from jaxllm.tokenizer import build_tokenizer
from jaxllm.training.checkpoint import Checkpointer

ALPHA = 1e-3  # significance of the chi-square goodness-of-fit tests


@pytest.fixture(scope="module")
def model():
    return GPT(TINY, rngs=nnx.Rngs(0))


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


@functools.partial(jax.jit, static_argnums=0)
def _jit_cached(graphdef, state, tokens, attention_mask, cache):
    return nnx.merge(graphdef, state)(tokens, attention_mask=attention_mask, cache=cache)


def _full_logits_of_row(m, row):
    """Logits over one unpadded row by a plain forward (no cache), right-padded to block_size so
    that every call has one shape (causality makes the padding harmless)."""
    padded = np.zeros((1, m.config.block_size), np.int32)
    padded[0, :len(row)] = row
    return np.asarray(_jit_forward(*nnx.split(m), jnp.asarray(padded)))[0, :len(row)]


# --------------------------------------------------------------------------- KV cache


def _prefill_then_decode(m, tokens, mask, cache, n_prefill):
    """Logits of feeding tokens[:, :n_prefill] at once, then the rest one per step (one compiled
    program each, shared by the tests below: same shapes)."""
    graphdef, state = nnx.split(m)
    logits, cache = _jit_cached(graphdef, state, tokens[:, :n_prefill], mask[:, :n_prefill], cache)
    steps = [np.asarray(logits)]
    for t in range(n_prefill, tokens.shape[1]):
        logits, cache = _jit_cached(graphdef, state, tokens[:, t:t + 1], mask[:, t:t + 1], cache)
        steps.append(np.asarray(logits))
    return np.concatenate(steps, axis=1), cache


# the cache's two layouts: batch and heads merged (B*H, ...), the default, or a heads axis (B, H, ...)
# that a tensor-parallel mesh splits
@pytest.mark.parametrize("heads_axis", [False, True])
def test_cached_prefill_and_decode_logits_match_full_forward_at_every_step(model, heads_axis):
    # Row 1 is left-padded by 3: its positions must start at its first real token.
    tokens = random_tokens(0, (2, 14))
    mask = np.ones((2, 14), np.int32)
    mask[1, :3] = 0
    cache = model.init_cache(2, 14, heads_axis=heads_axis)
    assert cache.k[0].ndim == (4 if heads_axis else 3)
    cached, cache = _prefill_then_decode(model, tokens, mask, cache, 6)
    np.testing.assert_allclose(cached[0], _full_logits_of_row(model, tokens[0]), rtol=0, atol=1e-5)
    # logits at padding positions are meaningless either way
    np.testing.assert_allclose(cached[1, 3:], _full_logits_of_row(model, tokens[1, 3:]), rtol=0, atol=1e-5)
    assert int(cache.length) == 14 and cache.next_pos.tolist() == [14, 11]


@pytest.mark.parametrize("heads_axis", [False, True])
def test_prefix_kv_appended_to_the_cache_acts_as_earlier_context(model, heads_axis):
    # What prefix tuning will do: put per-layer K/V into the cache without feeding tokens. Here
    # the "prefix" is the K/V of the first 6 tokens, so the rest must see them as context.
    tokens = random_tokens(1, (2, 14))
    mask = np.ones((2, 14), np.int32)
    _, ctx = _prefill_then_decode(model, tokens[:, :6], mask, model.init_cache(2, 14, heads_axis=heads_axis), 6)
    H, hd = TINY.n_head, TINY.head_dim  # cache layouts: K (B*H or B, H, hd, S), V (B*H or B, H, S, hd)
    k = jnp.stack([k_NdS.reshape(2, H, hd, 14)[..., :6].transpose(0, 3, 1, 2) for k_NdS in ctx.k])
    v = jnp.stack([v_NSd.reshape(2, H, 14, hd)[:, :, :6].transpose(0, 2, 1, 3) for v_NSd in ctx.v])
    cache = model.init_cache(2, 14, heads_axis=heads_axis).append_kv(k, v)
    assert int(cache.length) == 6 and cache.next_pos.tolist() == [0, 0]  # prefixes take no position
    cache = dataclasses.replace(cache, next_pos=jnp.asarray([6, 6], jnp.int32))  # the text goes on at 6
    graphdef, state = nnx.split(model)
    steps = []
    for t in range(6, 14):
        logits, cache = _jit_cached(graphdef, state, tokens[:, t:t + 1], mask[:, t:t + 1], cache)
        steps.append(np.asarray(logits))
    for b in range(2):
        np.testing.assert_allclose(np.concatenate(steps, 1)[b], _full_logits_of_row(model, tokens[b])[6:],
                                   rtol=0, atol=1e-5)


# Several tests below share prompt shapes and strategy structure (values are arguments of the
# compiled loop), so that they share compiled programs: compilation is most of this file's time.


def test_greedy_generate_equals_argmax_of_full_forwards_and_logprobs_are_raw(model):
    prompt = random_tokens(2, (3, 4))
    out, logp = generate(model, prompt, 10, temperature=0.0, return_logprobs=True)
    out, logp = np.asarray(out), np.asarray(logp)
    for b in range(3):
        full = _full_logits_of_row(model, out[b, :-1])
        np.testing.assert_array_equal(out[b, 4:], full[3:].argmax(-1))
        raw = jax.nn.log_softmax(full[3:], axis=-1)
        np.testing.assert_allclose(logp[b], np.take_along_axis(raw, out[b, 4:, None], 1)[:, 0], atol=1e-5)


def test_sampled_tokens_lie_in_the_raw_top_k_and_logprobs_are_unprocessed(model):
    prompt = random_tokens(3, (3, 4))
    out, logp = generate(model, prompt, 10, temperature=1.7, top_k=3, key=jax.random.key(5),
                         return_logprobs=True)
    out, logp = np.asarray(out), np.asarray(logp)
    for b in range(3):
        full = _full_logits_of_row(model, out[b, :-1])[3:]
        top3 = np.argsort(-full, axis=-1)[:, :3]
        assert all(tok in top3[t] for t, tok in enumerate(out[b, 4:]))
        raw = np.asarray(jax.nn.log_softmax(full, axis=-1))
        np.testing.assert_allclose(logp[b], raw[np.arange(10), out[b, 4:]], atol=1e-5)


# --------------------------------------------------------------------------- batching and padding


def test_left_padded_batch_gives_each_row_the_tokens_it_gets_alone(model):
    # 14 new tokens: the first 10 come from the cache; then the 7-token row outgrows block 16 and
    # slides, while the 2-token row still fits: every row keeps its own window and positions.
    new_tokens = 14
    prompts = [random_tokens(10 + i, (n,)).tolist() for i, n in enumerate([2, 7])]
    kw = dict(temperature=0.0, repetition_penalty=1.3, pad_id=0)
    batch, logp = generate(model, prompts, new_tokens, return_logprobs=True, **kw)
    batch, logp = np.asarray(batch), np.asarray(logp)
    assert batch.shape == (2, 7 + new_tokens)
    for b, p in enumerate(prompts):
        alone, alone_logp = generate(model, p, new_tokens, return_logprobs=True, **kw)
        np.testing.assert_array_equal(batch[b, 7 - len(p):], np.asarray(alone))
        assert (batch[b, :7 - len(p)] == 0).all()
        np.testing.assert_allclose(logp[b], np.asarray(alone_logp), atol=1e-5)
    # The same batch given as a padded array and a mask.
    padded = batch[:, :7]
    mask = np.asarray([[0] * (7 - len(p)) + [1] * len(p) for p in prompts])
    again = generate(model, padded, new_tokens, prompt_mask=mask, **kw)
    np.testing.assert_array_equal(np.asarray(again), batch)


def test_prompt_over_block_size_is_cropped_from_the_left_and_kept_in_the_output(model):
    prompt = random_tokens(4, (TINY.block_size + 3,))
    out = np.asarray(generate(model, prompt, 4, temperature=0.0))
    cropped = np.asarray(generate(model, prompt[3:], 4, temperature=0.0))
    np.testing.assert_array_equal(out[:len(prompt)], prompt)
    np.testing.assert_array_equal(out[3:], cropped)


@pytest.mark.parametrize("kwargs,match", [
    ({"prompt_mask": [[1, 0, 1]]}, "left padding"), ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"),
    ({"min_p": -0.1}, "min_p"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"eos_id": 99}, "eos_id"), ({"max_new_tokens": -1}, "max_new_tokens")])
def test_bad_generate_arguments_raise_naming_the_argument(model, kwargs, match):
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(model, np.asarray([[1, 2, 3]], np.int32), **kwargs)


# --------------------------------------------------------------------------- strategies


LOGITS = np.log(np.asarray([0.30, 0.20, 0.15, 0.10, 0.08, 0.07, 0.05, 0.03, 0.015, 0.005], np.float32))


def _draw(strategy, n=20000, seed=0, **params):
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (n, LOGITS.size))
    return np.asarray(sample_with_strategy(logits, strategy, jax.random.key(seed), **params))


def _assert_frequencies_match(samples, kept, probs):
    """All samples in `kept`; counts fit probs renormalised over `kept` (chi-square at ALPHA)."""
    assert set(np.unique(samples)) <= set(kept), f"sampled outside {kept}: {set(np.unique(samples)) - set(kept)}"
    counts = np.bincount(samples, minlength=probs.size)[kept]
    probs = np.asarray(probs, np.float64)
    expected = probs[kept] / probs[kept].sum() * samples.size
    if len(kept) > 1:
        assert stats.chisquare(counts, expected).pvalue > ALPHA


def test_top_k_samples_only_the_k_most_likely_at_renormalised_frequencies():
    samples = _draw("top_k", top_k=4)
    _assert_frequencies_match(samples, [0, 1, 2, 3], np.exp(LOGITS))


def test_top_p_samples_only_the_smallest_set_with_mass_at_least_p():
    # cumulative mass 0.30, 0.50, 0.65, 0.75: the smallest set with mass >= 0.7 is tokens 0..3
    samples = _draw("top_p", top_p=0.7)
    _assert_frequencies_match(samples, [0, 1, 2, 3], np.exp(LOGITS))
    _assert_frequencies_match(_draw("top_p", top_p=0.25), [0], np.exp(LOGITS))  # 0.30 alone suffices


def test_temperature_rescales_logits_before_sampling():
    probs = np.exp(LOGITS / 0.5)
    _assert_frequencies_match(_draw("sample", temperature=0.5), list(range(10)), probs / probs.sum())


def test_min_p_drops_tokens_below_min_p_times_top_probability_by_hand():
    # top probability 0.30; min_p 0.3 -> floor 0.09: tokens with p >= 0.09 are 0..3
    out = np.asarray(MinP(0.3)(jnp.asarray(LOGITS)[None]))[0]
    np.testing.assert_array_equal(np.isfinite(out), [True] * 4 + [False] * 6)
    np.testing.assert_allclose(out[:4], LOGITS[:4])
    _assert_frequencies_match(_draw("min_p", min_p=0.3), [0, 1, 2, 3], np.exp(LOGITS))


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits_by_hand():
    logits = jnp.asarray([[2.0, -1.0, 0.5, -0.5, 0.0, 3.0]])
    seen = jnp.asarray([[True, True, False, False, True, False]])
    np.testing.assert_allclose(np.asarray(RepetitionPenalty(2.0)(logits, seen)),
                               [[1.0, -2.0, 0.5, -0.5, 0.0, 3.0]])
    # greedy with the penalty: 3.0 seen -> 1.5 < 2.0, so token 0 wins
    tok = sample_with_strategy(logits[0], "greedy", repetition_penalty=2.0, previous_tokens=[5, 5])
    assert int(tok) == 0


def test_generate_with_repetition_penalty_equals_a_hand_loop(model):
    # 7 + 14 tokens outgrow block 16: the last steps see nanoGPT's sliding window
    prompt = random_tokens(20, (7,)).tolist()
    out = np.asarray(generate(model, prompt, 14, temperature=0.0, repetition_penalty=1.8))
    ids = list(prompt)
    for _ in range(14):
        logits = _full_logits_of_row(model, ids[-TINY.block_size:])[-1]
        seen = np.isin(np.arange(TINY.vocab_size), ids)
        logits = np.where(seen, np.where(logits < 0, logits * 1.8, logits / 1.8), logits)
        ids.append(int(logits.argmax()))
    np.testing.assert_array_equal(out, ids)


def test_repetition_penalty_counts_prompt_tokens_cropped_off_to_fit_the_block(model):
    """As in transformers: every token of a prompt longer than block_size counts as seen, also those
    cropped off before the model sees the prompt. The cropped part holds the token the penalised
    greedy choice would otherwise be (the best token the window lacks)."""
    window = random_tokens(7, (TINY.block_size,)).tolist()
    logits = _full_logits_of_row(model, window)[-1]
    unseen = [t for t in range(TINY.vocab_size) if t not in window]
    favourite = max(unseen, key=lambda t: logits[t])
    prompt = [favourite] * 4 + window                     # the first 4 are cropped off
    out = np.asarray(generate(model, prompt, 1, temperature=0.0, repetition_penalty=50.0))
    seen = np.isin(np.arange(TINY.vocab_size), prompt)
    expected = np.where(seen, np.where(logits < 0, logits * 50.0, logits / 50.0), logits).argmax()
    assert out[-1] == expected != favourite


def test_processors_match_transformers_logits_processors():
    torch = pytest.importorskip("torch")
    hf = pytest.importorskip("transformers.generation.logits_process")
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(4, 50)).astype(np.float32) * 3
    input_ids = rng.integers(0, 50, size=(4, 7))
    hf_list = hf.LogitsProcessorList([
        hf.RepetitionPenaltyLogitsProcessor(1.4), hf.TemperatureLogitsWarper(0.7), hf.TopKLogitsWarper(20),
        hf.TopPLogitsWarper(0.8), hf.MinPLogitsWarper(0.05)])
    want = hf_list(torch.as_tensor(input_ids), torch.as_tensor(scores)).numpy()
    procs = build_processors(temperature=0.7, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.4)
    seen = np.zeros((4, 50), bool)
    np.put_along_axis(seen, input_ids, True, axis=1)
    got = np.asarray(apply_processors(procs, jnp.asarray(scores), jnp.asarray(seen)))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6)
    assert [type(p) for p in procs][2:4] == [TopK, TopP]


def test_temperature_towards_zero_equals_greedy_and_keys_decide_samples(model):
    prompt = random_tokens(2, (3, 4))
    greedy = np.asarray(generate(model, prompt, 10, temperature=0.0))
    cold = np.asarray(generate(model, prompt, 10, temperature=1e-4, top_k=3, key=jax.random.key(1)))
    np.testing.assert_array_equal(cold, greedy)  # (top_k never moves the argmax)
    prompt = random_tokens(30, (3, 4))
    a = np.asarray(generate(model, prompt, 10, temperature=1.7, top_k=3, key=jax.random.key(7)))
    b = np.asarray(generate(model, prompt, 10, temperature=1.7, top_k=3, key=jax.random.key(7)))
    c = np.asarray(generate(model, prompt, 10, temperature=1.7, top_k=3, key=jax.random.key(8)))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_new_strategy_values_reuse_the_compiled_decode_loop(model):
    prompt = random_tokens(30, (3, 4))
    generate(model, prompt, 10, temperature=1.7, top_k=3)
    compiled = sampling._generate_jit._cache_size()
    for kw in ({"temperature": 0.5}, {"temperature": 1.2, "eos_id": 3, "pad_id": 4}):
        generate(model, prompt, 10, top_k=3, key=jax.random.key(1), **kw)
    assert sampling._generate_jit._cache_size() == compiled


def test_eos_stops_a_row_and_pads_the_rest(model):
    prompt = random_tokens(2, (3, 4))
    free = np.asarray(generate(model, prompt, 10, temperature=0.0))
    eos = int(free[0, 6])  # row 0's third new token
    out, logp = generate(model, prompt, 10, temperature=0.0, eos_id=eos, pad_id=31, return_logprobs=True)
    out, logp = np.asarray(out), np.asarray(logp)
    for b in range(3):
        new = free[b, 4:].tolist()
        stop = new.index(eos) + 1 if eos in new else len(new)
        np.testing.assert_array_equal(out[b, 4:4 + stop], new[:stop])
        assert (out[b, 4 + stop:] == 31).all() and (logp[b, stop:] == 0).all() and (logp[b, :stop] < 0).all()
    assert (out[0, 7:] == 31).all()


def test_a_row_stops_at_the_first_of_eos_and_the_stop_ids(model):
    prompt = random_tokens(5, (3, 4))
    free = np.asarray(generate(model, prompt, 12, temperature=0.0))[:, 4:]
    eos, stops = int(free[0, 8]), (int(free[1, 3]), int(free[2, 5]))
    out = np.asarray(generate(model, prompt, 12, temperature=0.0, eos_id=eos, pad_id=31, stop_ids=stops))[:, 4:]
    for b in range(3):
        new = free[b].tolist()
        hit = [new.index(t) for t in (eos, *stops) if t in new]
        end = min(hit) + 1 if hit else len(new)
        np.testing.assert_array_equal(out[b, :end], new[:end])
        assert (out[b, end:] == 31).all()
        assert sampling.cut_at_stop(out[b], (eos, *stops)) == (new[:min(hit)] if hit else new)
    compiled = sampling._generate_jit._cache_size()   # other stop values: the same compiled loop
    generate(model, prompt, 12, temperature=0.0, eos_id=eos, pad_id=31, stop_ids=(stops[1], stops[0]))
    assert sampling._generate_jit._cache_size() == compiled
    with pytest.raises(ValueError, match=r"stop_ids\[0\]=99 is outside the vocabulary"):
        generate(model, prompt, 4, stop_ids=(99,))


def test_generate_text_cuts_before_the_first_stop_string_and_eos():
    tok = build_tokenizer("char", text="abcdefgh\n.:XY")
    m = GPT(dataclasses.replace(TINY, vocab_size=tok.vocab_size, block_size=32), rngs=nnx.Rngs(3))
    prompts = ["abc", "hgfe\nd"]
    raw = [tok.decode(r) for r in np.asarray(generate(m, [tok.encode(p) for p in prompts], 20, temperature=0.0))[:, 6:]]
    raw[0] = tok.decode(np.asarray(generate(m, tok.encode("abc"), 20, temperature=0.0))[3:])
    first = raw[0][3]                       # a one-token stop (stops the row) and a two-character one
    pair = raw[1][5:7]
    texts = sampling.generate_text(m, tok, prompts, 20, temperature=0.0, stop=[first, pair])
    for text, full in zip(texts, raw):
        cut = min([full.index(s) for s in (first, pair) if s in full] + [len(full)])
        assert text == full[:cut]
    assert sampling.generate_text(m, tok, "abc", 20, temperature=0.0) == [raw[0]]
    with pytest.raises(ValueError, match="prompt 0 is 3 tokens; with max_new_tokens=200 it exceeds"):
        sampling.generate_text(m, tok, "abc", 200, must_fit=True)


# --------------------------------------------------------------------------- streaming


MULTIBYTE = "naïve café — 日本語 🎉 ok"


@pytest.fixture(scope="module")
def byte_tok():
    return build_tokenizer("bpe", text=MULTIBYTE * 3, vocab_size=258)  # bytes only: characters split


def test_decode_stream_never_yields_half_a_utf8_character(byte_tok):
    ids = byte_tok.encode(MULTIBYTE)
    assert len(ids) > len(MULTIBYTE)  # multi-byte characters span several tokens
    pieces = list(decode_stream(byte_tok, [[i] for i in ids]))
    assert "".join(pieces) == MULTIBYTE
    assert all("\ufffd" not in p for p in pieces)


class _CountingTokenizer:
    """Wraps a tokenizer and records how many ids each decode call is given."""

    def __init__(self, tok):
        self.tok, self.decoded = tok, []

    def decode(self, ids):
        self.decoded.append(len(ids))
        return self.tok.decode(ids)


def test_decode_stream_work_is_linear_in_the_stream_length(byte_tok):
    text = MULTIBYTE * 60
    ids = byte_tok.encode(text)
    for chunk in (1, 3, 8):
        counting = _CountingTokenizer(byte_tok)
        pieces = list(decode_stream(counting, [ids[i:i + chunk] for i in range(0, len(ids), chunk)]))
        assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
        # every decode sees a short window (context ids, a few chunks until one ends on a character
        # boundary), never the whole stream of over 2000 ids
        assert len(ids) > 2000 and max(counting.decoded) < 50


def test_decode_stream_keeps_sentencepiece_style_leading_spaces():
    """A Metaspace tokenizer drops the space of a text's first word when decoding; the stream's
    window keeps left context, so words in the middle of the stream keep their space."""
    tokenizers = pytest.importorskip("tokenizers")
    from jaxllm.tokenizer import HFTokenizer
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    backend.decoder = tokenizers.decoders.Metaspace()
    corpus = ["the quick brown fox jumps over the lazy dog"] * 20
    backend.train_from_iterator(corpus, tokenizers.trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>"]))
    tok = HFTokenizer(backend=backend)
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 8)
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.decode(ids[1:]) != text[1:]  # decoding does depend on context
    pieces = list(decode_stream(tok, [[i] for i in ids]))
    assert "".join(pieces) == text


def test_streamed_text_joins_to_the_non_streaming_decode(byte_tok):
    m = GPT(GPTConfig(vocab_size=byte_tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32),
            rngs=nnx.Rngs(1))
    prompt = byte_tok.encode("café ")
    for chunk_size in (1, 5):
        pieces = list(stream(m, byte_tok, "café ", 20, chunk_size=chunk_size, temperature=1.0,
                             key=jax.random.key(3), stop_at_eos=False))
        ids = np.asarray(generate(m, prompt, 20, temperature=1.0, key=jax.random.key(3)))
        assert "".join(pieces) == byte_tok.decode(ids[len(prompt):])
        assert all(not p.endswith("\ufffd") for p in pieces[:-1])


# --------------------------------------------------------------------------- self-consistency


def test_extract_answer_takes_the_last_marker_else_the_last_number():
    assert extract_answer("Answer: 3. Wait, no. ANSWER:  42.\nbye") == "42"
    assert extract_answer("we get 1,234 then 5,678 apples") == "5678"
    assert extract_answer("no idea") is None


def test_majority_vote_on_a_constructed_case():
    answer, share, votes = majority_vote(["12", "7", "12", None, "12", "7"])
    assert answer == "12" and share == pytest.approx(3 / 6) and votes == {"12": 3, "7": 2}
    assert majority_vote(["a", "b"])[0] == "a" and majority_vote([None])[0] is None


def test_self_consistency_samples_n_in_one_batch_and_returns_their_majority(model):
    tok = build_tokenizer("char", text="".join(chr(65 + i) for i in range(TINY.vocab_size)))
    first = lambda text: text[:1] or None  # noqa: E731 -- the answer is the first generated character
    res = self_consistency(model, tok, "ABC", n=12, extractor=first, max_new_tokens=3, temperature=1.0,
                           key=jax.random.key(2))
    assert len(res.samples) == 12 and all(len(s) == 3 for s in res.samples)
    counts = {a: res.answers.count(a) for a in set(res.answers)}
    assert res.votes == counts and len(counts) > 1
    assert res.vote_share == max(counts.values()) / 12 and counts[res.answer] == max(counts.values())


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, corpus_file):
    """A run directory as training leaves it (checkpoint + tokenizer), saved without training."""
    run = tmp_path_factory.mktemp("sample_cli") / "run"
    tok = build_tokenizer("char", text=corpus_file.read_text(encoding="utf-8"))
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=32)
    ckpt = Checkpointer(run)
    ckpt.save(1, nnx.state(GPT(cfg, rngs=nnx.Rngs(3))), {"step": np.int32(1)}, {"model": cfg.to_dict()})
    ckpt.close()
    tok.save(run / "tokenizer")
    return run


def test_cli_stream_and_strategy_flags_print_the_same_sample(run_dir):
    flags = ["--ckpt", run_dir, "--prompt", "the lazy", "--max-new-tokens", 7, "--seed", 4,
             "--temperature", 0.9, "--top-k", 8, "--top-p", 0.9, "--min-p", 0.02, "--repetition-penalty", 1.2]
    rc, streamed, err = run_main(["sample", *flags, "--stream"])
    assert rc == 0, err
    rc, batch, err = run_main(["sample", *flags])
    assert rc == 0, err
    assert streamed == batch and streamed.startswith("the lazy") and len(streamed) == len("the lazy") + 7 + 1
    rc, out, err = run_main(["sample", *flags, "--num-samples", 3, "--stream"])
    assert rc == 0, err
    assert out.count("--- sample") == 3


def test_cli_rejects_a_bad_strategy_flag_naming_it(run_dir):
    rc, _, err = run_main(["sample", "--ckpt", run_dir, "--top-p", 1.5])
    assert rc == 2 and "--top-p" in err
