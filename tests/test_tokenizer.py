"""Properties of the four tokenizer kinds behind one interface."""

import json

import numpy as np
import pytest

from jaxllm import tokenizer as tokmod
from jaxllm.data.sources import load_text
from jaxllm.tokenizer import (
    BPETokenizer,
    CharTokenizer,
    GPT2RanksNotFoundError,
    GPT2Tokenizer,
    HFTokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
)

UNICODE_SAMPLE = "naïve café — 東京 🌍🚀 ∑x² \t\n  tabs\tand  spaces  \r\n<|endoftext|>after"


@pytest.fixture(scope="module")
def shakespeare():
    return load_text("shakespeare")


@pytest.fixture(scope="module")
def bpe(shakespeare):
    return BPETokenizer.train(shakespeare[:200_000], vocab_size=400)


def gpt2_ranks_or_skip():
    try:
        return tokmod.find_gpt2_ranks()
    except GPT2RanksNotFoundError:
        pytest.skip("GPT-2 ranks not installed (pip install --no-deps openai-whisper)")


def gpt2_or_skip() -> GPT2Tokenizer:
    return GPT2Tokenizer(gpt2_ranks_or_skip())


def make_tokenizer(kind, shakespeare, bpe, tmp_path) -> Tokenizer:
    if kind == "char":
        return CharTokenizer.from_text(shakespeare)
    if kind == "bpe":
        return bpe
    if kind == "hf":
        bpe.save(tmp_path / "src")
        return HFTokenizer(tmp_path / "src" / "tokenizer.json")
    return gpt2_or_skip()


# --------------------------------------------------------------------------- char


def test_char_vocab_of_tiny_shakespeare_is_its_65_sorted_characters(shakespeare):
    tok = CharTokenizer.from_text(shakespeare)
    assert tok.vocab_size == 65
    assert tok.chars == sorted(set(shakespeare))
    assert (tok.eos_id, tok.pad_id) == (None, None)
    # nanoGPT's shakespeare_char ids: "\n"=0, " "=1, "F"=18, "i"=47.
    assert tok.encode("\n F i") == [0, 1, 18, 1, 47]


def test_char_round_trip_is_exact_on_the_corpus(shakespeare):
    tok = CharTokenizer.from_text(shakespeare)
    ids = tok.encode(shakespeare[:5000])
    assert tok.decode(ids) == shakespeare[:5000]
    assert tok.decode(np.array(ids, dtype=np.uint16)) == shakespeare[:5000]


def test_char_unknown_character_error_names_it_and_says_rebuild():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match="rebuild the tokenizer") as err:
        tok.encode("abz")
    assert "'z'" in str(err.value)


# --------------------------------------------------------------------------- bpe / hf


def test_bpe_round_trips_any_unicode_exactly(bpe):
    for text in (UNICODE_SAMPLE, "", " leading space", "trailing  ", "\x00\x7f\u200b"):
        assert bpe.decode(bpe.encode(text)) == text


def test_bpe_honours_vocab_size_and_has_distinct_eos_and_pad(bpe):
    assert bpe.vocab_size == 400
    assert max(bpe.encode(UNICODE_SAMPLE)) < 400
    assert bpe.eos_id is not None and bpe.pad_id is not None and bpe.eos_id != bpe.pad_id
    assert bpe.encode("<|endoftext|>", allow_special=True) == [bpe.eos_id]
    assert bpe.eos_id not in bpe.encode("<|endoftext|>")   # user text is text unless asked
    assert bpe.encode("<|pad|>", allow_special=True) == [bpe.pad_id]


def test_bpe_compresses_english_better_than_bytes(bpe, shakespeare):
    sample = shakespeare[-20_000:]
    assert len(bpe.encode(sample)) < 0.7 * len(sample.encode("utf-8"))


def test_bpe_on_a_small_corpus_says_when_it_gives_fewer_tokens_than_asked(capsys):
    tok = BPETokenizer.train("abab abab cdcd " * 20, vocab_size=1000)
    assert 258 < tok.vocab_size < 1000
    assert f"the corpus gave {tok.vocab_size:,} tokens, fewer than the 1,000 asked for" in capsys.readouterr().out


def test_bpe_vocab_smaller_than_the_byte_alphabet_is_refused():
    with pytest.raises(ValueError, match="at least 258"):
        BPETokenizer.train("hello", vocab_size=100)


def test_hf_tokenizer_guesses_eos_and_pad_by_common_names(tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "[SEP]": 2, "hello": 3, "world": 4}
    backend = Backend(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))

    tok = HFTokenizer(tmp_path / "tokenizer.json")
    assert (tok.kind, tok.vocab_size, tok.eos_id, tok.pad_id) == ("hf", 5, 2, 0)
    assert tok.encode("hello world") == [3, 4]
    assert HFTokenizer(tmp_path / "tokenizer.json", eos_token="world").eos_id == 4
    with pytest.raises(ValueError, match="'<nope>'"):
        HFTokenizer(tmp_path / "tokenizer.json", eos_token="<nope>")


# --------------------------------------------------------------------------- gpt2


def test_gpt2_matches_known_gpt2_ids_and_allows_endoftext():
    tok = gpt2_or_skip()
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (50257, 50256, None)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("a<|endoftext|>b", allow_special=True) == [64, 50256, 65]
    assert 50256 not in tok.encode("a<|endoftext|>b")      # user text is text unless asked
    assert tok.decode(tok.encode(UNICODE_SAMPLE)) == UNICODE_SAMPLE


def test_gpt2_ranks_found_through_env_var(monkeypatch, tmp_path):
    ranks = gpt2_ranks_or_skip()
    copy = tmp_path / "r50k.tiktoken"
    copy.write_bytes(ranks.read_bytes())
    monkeypatch.setenv("JAXLLM_GPT2_RANKS", str(copy))
    assert GPT2Tokenizer().ranks_path == copy


def test_gpt2_missing_ranks_error_says_how_to_get_them(monkeypatch, tmp_path):
    missing = tmp_path / "no_such.tiktoken"
    monkeypatch.setenv("JAXLLM_GPT2_RANKS", str(missing))
    with pytest.raises(FileNotFoundError) as err:
        GPT2Tokenizer()
    assert isinstance(err.value, GPT2RanksNotFoundError)
    message = str(err.value)
    assert str(missing) in message and "pip install --no-deps openai-whisper" in message and "JAXLLM_GPT2_RANKS" in message

    # Nothing anywhere: no env var, no whisper package.
    monkeypatch.delenv("JAXLLM_GPT2_RANKS")
    monkeypatch.setattr(tokmod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(GPT2RanksNotFoundError, match="openai-whisper"):
        GPT2Tokenizer()


# --------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("kind", ["char", "bpe", "hf", "gpt2"])
def test_save_then_load_gives_the_same_tokenizer(kind, shakespeare, bpe, tmp_path):
    tok = make_tokenizer(kind, shakespeare, bpe, tmp_path)
    tok.save(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert config["kind"] == kind
    assert not [p for p in (tmp_path / "saved").iterdir() if p.name.endswith(".tmp")]

    loaded = load_tokenizer(tmp_path / "saved")
    assert type(loaded) is type(tok)
    text = shakespeare[:2000] if kind == "char" else UNICODE_SAMPLE + shakespeare[:2000]
    assert loaded.encode(text) == tok.encode(text)
    assert (loaded.vocab_size, loaded.eos_id, loaded.pad_id) == (tok.vocab_size, tok.eos_id, tok.pad_id)


def test_load_tokenizer_accepts_a_tokenizer_json_path_and_gpt2(bpe, tmp_path):
    bpe.save(tmp_path)
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert loaded.kind == "hf" and loaded.encode(UNICODE_SAMPLE) == bpe.encode(UNICODE_SAMPLE)
    assert (loaded.eos_id, loaded.pad_id) == (bpe.eos_id, bpe.pad_id)

def test_load_tokenizer_gpt2_by_name():
    gpt2_ranks_or_skip()
    assert load_tokenizer("gpt2").kind == "gpt2"


def test_load_tokenizer_errors_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_dir") as err:
        load_tokenizer(tmp_path / "no_such_dir")
    assert "Tokenizer.save()" in str(err.value)
    with pytest.raises(FileNotFoundError, match="neither"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"kind": "sentencepiece"}')
    with pytest.raises(ValueError, match="unknown tokenizer kind 'sentencepiece'.*char, bpe, gpt2, hf"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="built from a corpus"):
        load_tokenizer("char")


def test_build_tokenizer_builds_each_kind_and_lists_valid_kinds(tmp_path, bpe):
    assert build_tokenizer("char", text="hello").vocab_size == 4
    assert build_tokenizer("bpe", text="hello world " * 50, vocab_size=300).kind == "bpe"
    bpe.save(tmp_path)
    assert build_tokenizer("hf", path=tmp_path / "tokenizer.json").kind == "hf"
    with pytest.raises(ValueError, match="char, bpe, gpt2, hf"):
        build_tokenizer("wordpiece")
