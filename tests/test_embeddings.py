"""The Flax MiniLM sentence encoder: parity with sentence-transformers, batching, truncation, errors."""

import json
import logging
import shutil

import numpy as np
import pytest

from jaxllm.embeddings import ENV_VAR, REQUIRED_FILES, SentenceEncoder, length_buckets, resolve_encoder_path

TEXTS = [
    "The capital of Vorland is Kessa.",
    "A quick brown fox jumps over the lazy dog near the river bank.",
    "Hello",
    "",
    "Ünïcödé, punctuation!? and numbers 12,345.67 — mixed CASE text.",
    "how do I reset my password",
    "Which city is Vorland's capital?",
    " ".join(["word"] * 300),          # 302 tokens with [CLS]/[SEP]: truncated to 256
]


@pytest.fixture(scope="module")
def model_dir():
    return resolve_encoder_path()


@pytest.fixture(scope="module")
def encoder(model_dir):
    return SentenceEncoder.load(model_dir)


def test_parity_with_sentence_transformers(encoder, model_dir):
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(model_dir), device="cpu").encode(TEXTS, batch_size=4)
    ours = encoder.encode(TEXTS)
    assert ours.dtype == np.float32 and ours.shape == (len(TEXTS), 384)
    assert np.abs(ours - reference).max() <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)


def test_batched_equals_one_by_one_and_keeps_order(encoder):
    together = encoder.encode(TEXTS, batch_size=3)   # length-sorted batches, a padded last batch
    alone = np.concatenate([encoder.encode([t]) for t in TEXTS])
    assert np.abs(together - alone).max() <= 1e-5
    # the order is the caller's: each row is nearest to its own text's vector
    assert (np.argmax(together @ alone.T, axis=1) == np.arange(len(TEXTS))).all()


def test_similar_sentences_are_nearer(encoder):
    a, b, c = encoder.encode(["The capital of Vorland is Kessa.", "Which city is the capital of Vorland?",
                              "I like to bake bread on Sundays."])
    assert a @ b > a @ c + 0.2


def test_truncation_is_counted(encoder, caplog):
    with caplog.at_level(logging.WARNING, logger="jaxllm.embeddings"):
        encoder.encode(TEXTS)
    assert encoder.last_truncated == 1
    assert "1 of 8 texts are longer than the encoder's 256 tokens" in caplog.text
    # a truncated text embeds as its first 256 tokens do
    long = " ".join(["word"] * 300)
    first = " ".join(["word"] * 254)
    assert np.abs(encoder.encode([long]) - encoder.encode([first])).max() <= 1e-6
    encoder.encode(["short"])
    assert encoder.last_truncated == 0


def test_length_buckets():
    b = length_buckets(256)
    assert b[:9] == [16, 20, 24, 28, 32, 40, 48, 56, 64] and b[-1] == 256 and len(b) == 17
    assert all(hi <= lo * 1.25 for lo, hi in zip(b, b[1:]))      # at most 25% padding per row
    assert length_buckets(40) == [16, 20, 24, 28, 32, 40]


def test_bad_texts(encoder):
    with pytest.raises(TypeError, match="list of texts"):
        encoder.encode("one string")
    with pytest.raises(TypeError, match="text 1 is a int"):
        encoder.encode(["ok", 3])


@pytest.fixture
def copy_dir(model_dir, tmp_path):
    """A copy of the model directory (the weights linked, not copied)."""
    dst = tmp_path / "enc"
    shutil.copytree(model_dir, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    (dst / "model.safetensors").symlink_to(model_dir / "model.safetensors")
    return dst


@pytest.mark.parametrize("missing", REQUIRED_FILES)
def test_missing_file_is_named(copy_dir, missing):
    (copy_dir / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing.replace("/", ".")) as e:
        SentenceEncoder.load(copy_dir)
    assert str(copy_dir) in str(e.value) and "path=" in str(e.value)


def test_path_from_environment(copy_dir, monkeypatch, encoder):
    monkeypatch.setenv(ENV_VAR, str(copy_dir))
    assert resolve_encoder_path() == copy_dir
    (copy_dir / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=ENV_VAR):
        resolve_encoder_path()


def test_unsupported_pooling_is_refused(copy_dir):
    cfg = copy_dir / "1_Pooling" / "config.json"
    pooling = json.loads(cfg.read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_max_tokens=True)
    cfg.write_text(json.dumps(pooling))
    with pytest.raises(ValueError, match="pooling_mode_max_tokens.*not supported"):
        SentenceEncoder.load(copy_dir)


def test_cls_pooling_and_no_normalize(copy_dir, encoder):
    cfg = copy_dir / "1_Pooling" / "config.json"
    pooling = json.loads(cfg.read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    cfg.write_text(json.dumps(pooling))
    modules = json.loads((copy_dir / "modules.json").read_text())
    (copy_dir / "modules.json").write_text(json.dumps([m for m in modules if not m["type"].endswith("Normalize")]))
    cls = SentenceEncoder.load(copy_dir)
    out = cls.encode(TEXTS[:2])
    assert cls.pooling == "cls" and not cls.normalize
    assert np.abs(np.linalg.norm(out, axis=1) - 1).min() > 1e-3      # not unit vectors
    assert np.abs(out / np.linalg.norm(out, axis=1, keepdims=True) - encoder.encode(TEXTS[:2])).max() > 1e-3


def test_broken_weights_are_named(copy_dir):
    (copy_dir / "model.safetensors").unlink()
    (copy_dir / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors cannot be read"):
        SentenceEncoder.load(copy_dir)


def test_identity_names_the_weights(encoder):
    ident = encoder.identity()
    assert ident["dim"] == 384 and ident["max_seq_length"] == 256 and ident["pooling"] == "mean"
    assert len(ident["weights_sha256"]) == 64
