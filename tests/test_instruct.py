"""Properties of the SFT data layer: instruction records -> ids/labels, packing, synthetic tasks."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from jaxllm.data.instruct import (ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, MAX_REASONS, InstructDataError,
                                  load_instruct, resolve_special_ids,
                                  sft_char_tokenizer, tokenize_records)
from jaxllm.data.packing import (make_rows, model_inputs, pack_examples, pad_examples,
                                 segment_attention_mask)
from jaxllm.data.synthetic import (DICTIONARY, TASKS, TaskSettings, exact_match, make_splits,
                                   task_tokenizer)
from jaxllm.losses import IGNORE_INDEX, cross_entropy_sum
from jaxllm.model import GPT
from jaxllm.sampling import cut_at_eos
from jaxllm.tokenizer import BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer
from helpers import TINY

TOK = task_tokenizer(extra="=")
EOS, PAD = TOK.eos_id, TOK.pad_id


def enc(text):
    return TOK.encode(text)


def write_jsonl(path, lines):
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return path


# --------------------------------------------------------------------------- labels


@pytest.mark.parametrize("record, prompt, response", [
    ({"instruction": "Sort the items.", "input": "c,a", "output": "a,c"},
     ALPACA_PROMPT.format(instruction="Sort the items.", input="c,a"), "a,c"),
    ({"instruction": "Sort the items.", "input": "", "output": "a"},
     ALPACA_PROMPT_NO_INPUT.format(instruction="Sort the items."), "a"),
    ({"instruction": "Sort the items.", "output": "a"},  # input missing = empty
     ALPACA_PROMPT_NO_INPUT.format(instruction="Sort the items."), "a"),
    ({"prompt": "12+3=", "completion": "15"}, "12+3=", "15"),
    ({"prompt": "", "completion": "15"}, "", "15"),
])
def test_labels_are_ignored_on_prompt_and_equal_ids_on_response_and_eos(record, prompt, response):
    ex = tokenize_records([record], TOK).examples[0]
    P, R = len(enc(prompt)), len(enc(response))
    assert ex.ids.tolist() == enc(prompt) + enc(response) + [EOS]
    assert ex.labels.tolist() == [IGNORE_INDEX] * P + enc(response) + [EOS]
    assert int((ex.labels != IGNORE_INDEX).sum()) == R + 1


def test_chat_trains_on_every_assistant_turn_and_its_eos_only():
    record = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "un"}, {"role": "user", "content": "two"},
                           {"role": "assistant", "content": "deux"}]}
    ex = tokenize_records([record], TOK).examples[0]
    expected = (enc("<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n") + enc("un") + [EOS]
                + enc("<|user|>\ntwo\n<|assistant|>\n") + enc("deux") + [EOS])
    assert ex.ids.tolist() == expected
    trained = ex.labels != IGNORE_INDEX
    assert np.array_equal(ex.labels[trained], ex.ids[trained])
    assert TOK.decode(ex.ids[trained]) == "un\x03deux\x03"  # the two replies, each with EOS
    assert int(trained.sum()) == 2 + 1 + 4 + 1


def test_spans_are_tokenized_separately_with_bpe():
    bpe = BPETokenizer.train(["### Response:\nabcabc abc " * 20], vocab_size=300)
    record = {"prompt": "### Response:\nab", "completion": "cabc"}
    ex = tokenize_records([record], bpe).examples[0]
    assert ex.ids.tolist() == bpe.encode(record["prompt"]) + bpe.encode("cabc") + [bpe.eos_id]
    assert ex.labels.tolist() == [IGNORE_INDEX] * len(bpe.encode(record["prompt"])) + bpe.encode("cabc") + [bpe.eos_id]


# --------------------------------------------------------------------------- pad and EOS


class _EosZero(Tokenizer):
    kind = "test"
    vocab_size = 10
    eos_id = 0  # and no pad id
    encode = decode = None


def test_pad_id_is_never_eos():
    assert (EOS, PAD) == (1, 0) and resolve_special_ids(TOK) == (1, 0)
    bpe = BPETokenizer.train(["hello world " * 10], vocab_size=270)
    assert resolve_special_ids(bpe) == (bpe.eos_id, bpe.pad_id) and bpe.eos_id != bpe.pad_id
    assert resolve_special_ids(_EosZero()) == (0, 1)           # fallback pad skips the EOS id
    assert resolve_special_ids(bpe, pad_id=5) == (bpe.eos_id, 5)
    with pytest.raises(ValueError, match="padding must differ from EOS"):
        resolve_special_ids(bpe, pad_id=bpe.eos_id)
    with pytest.raises(ValueError, match="sft_char_tokenizer"):
        resolve_special_ids(CharTokenizer.from_text("abc"))


def _gpt2_or_skip():
    from jaxllm.tokenizer import GPT2RanksNotFoundError, GPT2Tokenizer
    try:
        return GPT2Tokenizer()
    except GPT2RanksNotFoundError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("kind", ["bpe", "gpt2"])
def test_special_token_text_in_a_response_stays_text_and_is_counted(kind):
    """A literal <|endoftext|> inside user text must not become an EOS label mid-answer."""
    tok = BPETokenizer.train(["the end, or not really " * 30], vocab_size=300) if kind == "bpe" else _gpt2_or_skip()
    eos = tok.eos_id
    record = {"prompt": "Q: say it\n", "completion": "the end <|endoftext|> not really"}
    ds = tokenize_records([record, {"prompt": "Q\n", "completion": "plain"}], tok, log=None)
    ex = ds.examples[0]
    assert list(ex.ids).count(eos) == 1 and ex.ids[-1] == eos          # only the appended EOS
    assert [int(x) for x in ex.labels].count(eos) == 1
    assert tok.decode(ex.ids[:-1]).endswith("the end <|endoftext|> not really")
    assert ds.stats.special_text == 1 and "special-token text" in ds.stats.summary()
    # asked for, the text becomes the special token (how a pretraining corpus marks documents)
    assert tok.encode("<|endoftext|>", allow_special=True) == [eos]
    assert eos not in tok.encode("<|endoftext|>") and tok.count_special("a<|endoftext|>b<|endoftext|>") == 2


def test_char_special_character_in_a_record_is_a_named_error_or_a_counted_skip(tmp_path):
    tok = sft_char_tokenizer("abc xyz:\n")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "a:", "completion": "b\x03c"}) + "\n"
                    + json.dumps({"prompt": "a:", "completion": "bc"}) + "\n", encoding="utf-8")
    with pytest.raises(InstructDataError, match=r"d.jsonl:1: .*reserves as EOS"):
        load_instruct(path, tok)
    ds = load_instruct(path, tok, on_error="skip", log=None)
    assert ds.stats.skipped == 1 and len(ds.examples) == 1


def test_char_specials_survive_save_and_load(tmp_path):
    loaded = load_tokenizer(TOK.save(tmp_path / "tok"))
    assert type(loaded) is CharTokenizer and (loaded.eos_id, loaded.pad_id) == (EOS, PAD)
    assert resolve_special_ids(loaded) == (EOS, PAD)


def test_padding_has_pad_token_segment_zero_and_ignored_label():
    ds = tokenize_records([{"prompt": "1+1=", "completion": "2"}, {"prompt": "12+1=", "completion": "13"}], TOK)
    for rows in (ds.rows(16, packing=False), ds.rows(16, packing=True)):
        pad = rows.segment_ids == 0
        assert pad.sum() > 0
        assert (rows.tokens[pad] == PAD).all() and (rows.labels[pad] == IGNORE_INDEX).all()
        assert not (rows.tokens[pad] == EOS).any()


# --------------------------------------------------------------------------- malformed lines

GOOD = {"instruction": "Sort the items.", "input": "b,a", "output": "a,b"}


@pytest.mark.parametrize("bad, field, problem", [
    ('{"instruction": "x", "output": ', None, "invalid JSON"),
    ('[1, 2]', None, "expected a JSON object"),
    ({"instruction": "x"}, "output", "missing field"),
    ({"instruction": "x", "output": 5}, "output", "expected a string, got int"),
    ({"instruction": "x", "input": ["a"], "output": "y"}, "input", "expected a string, got list"),
    ({"prompt": "x", "completion": "y"}, "instruction", "missing field"),  # not this file's format
    ({"instruction": "x", "output": "\u00e9"}, None, "cannot tokenize"),   # char not in vocabulary
])
def test_malformed_alpaca_line_names_file_line_and_field(tmp_path, bad, field, problem):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "", bad, GOOD])
    with pytest.raises(InstructDataError, match=problem) as info:
        load_instruct(path, TOK)
    err = info.value
    assert isinstance(err, ValueError) and (err.line, err.field) == (3, field)
    assert str(err).startswith(f"{path}:3: " + (f"field {field!r}: " if field else ""))
    logged = []
    ds = load_instruct(path, TOK, on_error="skip", log=logged.append)
    assert (ds.stats.kept, ds.stats.skipped, ds.stats.blank, ds.stats.lines) == (2, 1, 1, 3)
    assert [ex.line for ex in ds.examples] == [1, 4]
    assert ds.stats.reasons == [str(err)] and len(logged) == 1 and "1 skipped" in logged[0]


@pytest.mark.parametrize("bad, field", [
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}, "messages[1].role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"content": "a"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "a"}]}, "messages"),  # no assistant turn
])
def test_malformed_chat_line_names_the_message_field(tmp_path, bad, field):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [good, bad])
    with pytest.raises(InstructDataError) as info:
        load_instruct(path, TOK)
    assert (info.value.line, info.value.field) == (2, field)
    assert str(info.value).startswith(f"{path}:2: field {field!r}: ")
    assert load_instruct(path, TOK, on_error="skip", log=None).stats.skipped == 1


def test_skip_counts_every_bad_line_and_keeps_the_first_reasons(tmp_path):
    lines = [GOOD if i % 3 == 0 else "not json" for i in range(30)]  # 20 bad lines
    ds = load_instruct(write_jsonl(tmp_path / "d.jsonl", lines), TOK, on_error="skip", log=None)
    assert (ds.stats.kept, ds.stats.skipped, len(ds.stats.reasons)) == (10, 20, MAX_REASONS)
    assert ds.stats.reasons[0].endswith(":2: invalid JSON (Expecting value: line 1 column 1 (char 0))")


def test_unknown_keys_and_forced_format_are_errors(tmp_path):
    with pytest.raises(InstructDataError, match=r":1: cannot tell the format"):
        tokenize_records([{"question": "q"}], TOK)
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    with pytest.raises(InstructDataError, match=r"d.jsonl:1: field 'prompt': missing field"):
        load_instruct(path, TOK, format="prompt_completion")


def test_blank_lines_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(("\r\n" + json.dumps(GOOD) + "\r\n   \r\n" + json.dumps(GOOD) + "\r\n").encode())
    ds = load_instruct(path, TOK)
    assert (ds.stats.kept, ds.stats.blank, [e.line for e in ds.examples]) == (2, 2, [2, 4])


# --------------------------------------------------------------------------- truncation


def test_keep_start_keeps_prompt_start_and_fitting_response_and_counts():
    records = [{"prompt": "1234567890", "completion": "abcdefghij"},   # 21 tokens: cut to 15
               {"prompt": "12345", "completion": "ab"},                # 8 tokens: untouched
               {"prompt": "123456789012345", "completion": "ab"},      # no target fits: dropped
               {"prompt": "1234567890", "completion": "abcd"}]         # exactly 15: untouched
    logged = []
    ds = tokenize_records(records, TOK, max_len=15, log=logged.append)
    full = tokenize_records(records, TOK).examples
    assert (ds.stats.truncated, ds.stats.dropped, ds.stats.kept) == (1, 1, 3)
    assert [e.line for e in ds.examples] == [1, 2, 4]
    cut = ds.examples[0]
    assert cut.ids.tolist() == full[0].ids[:15].tolist() and cut.labels.tolist() == full[0].labels[:15].tolist()
    assert TOK.decode(cut.ids[cut.labels != IGNORE_INDEX]) == "abcde"  # the response start, no EOS
    assert ds.examples[1].ids.tolist() == full[1].ids.tolist()
    assert len(ds.examples[2].ids) == 15 and ds.examples[2].ids.tolist() == full[3].ids.tolist()
    assert "1 truncated, 1 dropped" in logged[0]


def test_drop_removes_only_overlong_examples_and_counts():
    records = [{"prompt": "1" * n, "completion": "ab"} for n in (5, 13, 12, 20)]  # lengths 8, 16, 15, 23
    ds = tokenize_records(records, TOK, max_len=15, truncation="drop", log=None)
    assert (ds.stats.dropped, ds.stats.truncated) == (2, 0)
    assert [len(e.ids) for e in ds.examples] == [8, 15]
    with pytest.raises(ValueError, match="longer than seq_len=10"):
        pack_examples(ds.examples, 10, PAD)


# --------------------------------------------------------------------------- packing


def _examples(lengths, seed=0, vocab=TINY.vocab_size):
    """Random (ids, labels) examples; some have no prompt, so their first token is a target."""
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = rng.integers(2, vocab, n).astype(np.int32)
        labels = ids.copy()
        labels[:(0 if i % 3 == 0 else int(rng.integers(1, n)))] = IGNORE_INDEX
        out.append((ids, labels))
    return out


def test_first_fit_and_sequential_assign_rows_as_stated():
    exs = _examples([6, 8, 3, 2])
    seq, ff = pack_examples(exs, 10, PAD, strategy="sequential"), pack_examples(exs, 10, PAD)
    assert seq.segment_ids.max(axis=1).tolist() == [1, 1, 2] and ff.segment_ids.max(axis=1).tolist() == [2, 2]
    # first fit: row 0 = examples 0 and 2, row 1 = examples 1 and 3
    assert ff.tokens[0, :9].tolist() == exs[0][0].tolist() + exs[2][0].tolist()
    assert ff.tokens[1].tolist() == exs[1][0].tolist() + exs[3][0].tolist()
    assert ff.fill == 19 / 20 and seq.fill == 19 / 30


@pytest.mark.parametrize("packing", [True, False])
def test_positions_restart_and_no_label_crosses_a_segment_boundary(packing):
    exs = _examples([5, 9, 3, 7, 2, 16, 4, 11], seed=1)
    rows = make_rows(exs, 16, PAD, packing=packing)
    segments = []
    for n in range(rows.tokens.shape[0]):
        for s in range(1, rows.segment_ids[n].max() + 1):
            at = np.flatnonzero(rows.segment_ids[n] == s)
            assert at.tolist() == list(range(at[0], at[0] + len(at)))      # contiguous
            assert rows.positions[n, at].tolist() == list(range(len(at)))  # restart at 0
            assert rows.labels[n, at[0]] == IGNORE_INDEX                    # first label masked
            segments.append((rows.tokens[n, at].tolist(), rows.labels[n, at[1:]].tolist()))
    # every example appears once, its labels intact after the first token
    assert sorted(segments) == sorted((ids.tolist(), labels[1:].tolist()) for ids, labels in exs)
    # a counted target labels[t + 1] is always predicted from the same segment's token t
    target = rows.labels[:, 1:] != IGNORE_INDEX
    assert (rows.segment_ids[:, :-1][target] == rows.segment_ids[:, 1:][target]).all()
    assert (rows.segment_ids[:, 1:][target] > 0).all()


def test_segment_mask_is_block_diagonal_and_causal():
    rows = pack_examples(_examples([5, 9, 3, 7, 2, 4], seed=2), 16, PAD)
    mask = np.asarray(segment_attention_mask(rows.segment_ids))
    seg = rows.segment_ids
    N, T = seg.shape
    expected = np.array([[[seg[n, q] == seg[n, k] != 0 and k <= q for k in range(T)] for q in range(T)]
                         for n in range(N)])
    assert mask.shape == (N, T, T) and mask.dtype == bool and np.array_equal(mask, expected)


@jax.jit
def _loss_sum_count(graphdef, state, tokens, labels, attention_mask=None, positions=None):
    model = nnx.merge(graphdef, state)
    logits = model(tokens, attention_mask=attention_mask, positions=positions)
    return cross_entropy_sum(logits[:, :-1], labels[:, 1:])


def test_packed_loss_equals_unpacked_loss_on_tiny_gpt():
    graphdef, state = nnx.split(GPT(TINY, rngs=nnx.Rngs(0)))
    exs = _examples([5, 9, 3, 7, 2, 16, 4, 11, 6, 8], seed=3)
    packed, unpacked = pack_examples(exs, 16, PAD), pad_examples(exs, 16, PAD)
    assert packed.tokens.shape[0] < unpacked.tokens.shape[0] == len(exs)
    ps, pc = map(float, _loss_sum_count(graphdef, state, packed.tokens, packed.labels, **model_inputs(packed)))
    us, uc = map(float, _loss_sum_count(graphdef, state, unpacked.tokens, unpacked.labels, **model_inputs(unpacked)))
    assert pc == uc == sum(int((labels[1:] != IGNORE_INDEX).sum()) for _, labels in exs)
    assert abs(ps / pc - us / uc) < 1e-5
    # and both equal the plain causal model's loss with no mask, no positions and no masked first
    # label (right padding changes nothing before it: causal; labels[0] is never a target)
    plain_tokens = np.stack([np.pad(ids, (0, 16 - len(ids)), constant_values=PAD) for ids, _ in exs])
    plain_labels = np.stack([np.pad(lab, (0, 16 - len(lab)), constant_values=IGNORE_INDEX) for _, lab in exs])
    s, c = map(float, _loss_sum_count(graphdef, state, plain_tokens, plain_labels))
    assert c == pc and abs(s / c - ps / pc) < 1e-5


# --------------------------------------------------------------------------- synthetic tasks


def _check_answer(ex, reverse_sum=False):
    task, inp, out = ex["task"], ex["input"], ex["output"]
    if task == "add":
        a, b = map(int, inp.split("+"))
        return int(out[::-1] if reverse_sum else out) == a + b
    if task == "reverse":
        return out == inp[::-1]
    if task == "sort":
        return out.split(",") == sorted(inp.split(","))
    return out.split() == [DICTIONARY[w] for w in inp.split()]


def test_synthetic_splits_are_disjoint_correct_and_deterministic():
    train, held = make_splits(60, 15, seed=7)
    assert len(train) == 60 * len(TASKS) and len(held) == 15 * len(TASKS)
    train_keys, held_keys = {(e["task"], e["input"]) for e in train}, {(e["task"], e["input"]) for e in held}
    assert len(train_keys) == len(train) and len(held_keys) == len(held) and not train_keys & held_keys
    assert all(_check_answer(e) for e in train + held)
    assert make_splits(60, 15, seed=7) == (train, held)
    assert make_splits(60, 15, seed=8)[1] != held
    assert make_splits(90, 15, seed=7)[1] == held  # held-out set does not move with n_train
    rev_train, _ = make_splits(20, 5, seed=7, tasks=("add",), settings=TaskSettings(reverse_sum=True))
    assert all(_check_answer(e, reverse_sum=True) for e in rev_train)
    with pytest.raises(ValueError, match="distinct examples"):
        make_splits(100, 10, tasks=("map",), settings=TaskSettings(max_words=1))  # only 16 inputs


@pytest.mark.parametrize("fmt", ["alpaca", "prompt_completion", "chat"])
def test_synthetic_records_tokenize_in_every_format(fmt):
    train, _ = make_splits(10, 2, seed=0, format=fmt)
    ds = tokenize_records(train, TOK)
    assert ds.stats.format == fmt and ds.stats.kept == len(train) and ds.stats.skipped == 0
    assert sft_char_tokenizer("ab").chars[:2] == ["\x00", "\x03"]
    assert (TOK.pad_id, TOK.eos_id) == (0, 1)


def _oracle(examples, wrong=()):
    """generate_fn answering every example right (after EOS: junk), except indices in `wrong`."""
    def run(prompts, max_new_tokens):
        assert len(prompts) == len(examples)
        return [enc(e["output"] + ("#" if i in wrong else "")) + [EOS] + enc("99")
                for i, e in enumerate(examples)]
    return run


def test_exact_match_scores_an_oracle_and_a_known_fraction():
    _, held = make_splits(1, 6, seed=3)
    report = exact_match(None, TOK, held, generate_fn=_oracle(held))
    assert report.accuracy == 1.0 and report.per_task == {t: 1.0 for t in TASKS}
    assert report.predictions == [e["output"] for e in held]
    wrong = {i for i, e in enumerate(held) if e["task"] == "add" or i % 4 == 0}
    report = exact_match(None, TOK, held, generate_fn=_oracle(held, wrong))
    assert report.accuracy == pytest.approx(1 - len(wrong) / len(held))
    assert report.per_task["add"] == 0.0
    for t in ("reverse", "sort", "map"):
        idx = [i for i, e in enumerate(held) if e["task"] == t]
        assert report.per_task[t] == pytest.approx(sum(i not in wrong for i in idx) / len(idx))
    assert report.counts == {t: 6 for t in TASKS}
    with pytest.raises(InstructDataError, match=r"<examples>:2: field 'output': missing field"):
        exact_match(None, TOK, [held[0], {"instruction": "x"}], generate_fn=_oracle(held))


def test_exact_match_with_a_gpt_reproduces_its_greedy_outputs():
    """Targets are a tiny random GPT's own greedy continuations, computed without cache or padding;
    two of five are then corrupted, so batched left-padded generation must score exactly 3/5."""
    cfg = TINY.replace(vocab_size=TOK.vocab_size, block_size=24)
    graphdef, state = nnx.split(GPT(cfg, rngs=nnx.Rngs(1)))
    # weights of std 1 (not 0.02): the greedy output then depends on the whole prompt, so attending
    # to padding or misplacing positions would change it
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state))))
    state = jax.tree_util.tree_map_with_path(
        lambda path, x: jax.random.normal(next(keys), x.shape) if "kernel" in str(path) or "embedding" in str(path)
        else x, state)
    model = nnx.merge(graphdef, state)
    forward = jax.jit(lambda tokens: model(tokens))
    prompts = ["1+2=", "34+567=", "9=", "12+3=", "98765+4="]
    K = 6
    records = []
    for i, p in enumerate(prompts):
        ids = enc(p)
        for _ in range(K):  # right-padded full forward: causal, so the padding changes nothing
            row = np.full((1, cfg.block_size), PAD, np.int32)
            row[0, :len(ids)] = ids
            ids.append(int(np.argmax(np.asarray(forward(row))[0, len(ids) - 1])))
        target = TOK.decode(cut_at_eos(ids[len(enc(p)):], EOS))
        records.append({"prompt": p, "completion": target + ("#" if i % 2 else ""), "task": "own"})
    report = exact_match(model, TOK, records, batch_size=2, max_new_tokens=K)
    assert report.per_task == {"own": pytest.approx(3 / 5)}
    assert report.predictions[::2] == [r["completion"] for r in records[::2]]
