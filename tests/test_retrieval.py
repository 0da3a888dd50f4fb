"""Retrieval: dense top-k against brute force, the index on disk, BM25, reciprocal-rank fusion."""

import json

import numpy as np
import pytest

from jaxllm.apps import (BM25Retriever, DenseIndex, HybridRetriever, RetrievalError, chunk_documents, chunk_text,
                         rrf_scores)


class HashEncoder:
    """A deterministic stand-in encoder: a unit vector seeded by each text."""

    def __init__(self, name="hash", dim=16):
        self.name, self.dim = name, dim

    def encode(self, texts):
        out = []
        for t in texts:
            v = np.random.default_rng(abs(hash(t)) % (1 << 32)).normal(size=self.dim)
            out.append(v / np.linalg.norm(v))
        return np.asarray(out, np.float32)

    def identity(self):
        return {"name": self.name, "dim": self.dim}


DOCS = [f"document number {i} about topic{i} and theme {i % 7}" for i in range(60)]


def test_dense_top_k_equals_brute_force():
    enc = HashEncoder()
    index = DenseIndex.build(DOCS, enc)
    queries = ["first question", "another one", "document number 3 about topic3 and theme 3"]
    idx, scores = index.search(queries, 5)
    sims = enc.encode(queries) @ enc.encode(DOCS).T
    np.testing.assert_array_equal(idx, np.argsort(-sims, axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(scores, np.sort(sims, axis=1)[:, ::-1][:, :5], atol=1e-6)
    assert index.retrieve("document number 3 about topic3 and theme 3", 1)[0].index == 3     # itself, cosine 1
    assert len(index.retrieve("q", 100)) == len(DOCS)                               # k capped at the size


def test_index_round_trips_and_refuses_other_encoders(tmp_path):
    enc = HashEncoder()
    index = DenseIndex.build(DOCS, enc)
    index.save(tmp_path / "idx")
    back = DenseIndex.load(tmp_path / "idx", enc)
    assert back.texts == DOCS and np.array_equal(back.embeddings, index.embeddings)
    assert back.search(["a question"], 4)[0].tolist() == index.search(["a question"], 4)[0].tolist()
    # saving again replaces the whole index, leaving no temporary directories behind
    DenseIndex.build(DOCS[:3], enc).save(tmp_path / "idx")
    assert DenseIndex.load(tmp_path / "idx", enc).texts == DOCS[:3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
    with pytest.raises(RetrievalError, match="another encoder \\(dim: 16 there, 8 here\\).*rebuild"):
        DenseIndex.load(tmp_path / "idx", HashEncoder(dim=8))
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "idx" / "index.json").write_text(json.dumps(meta))
    with pytest.raises(RetrievalError, match="index format 99 is newer"):
        DenseIndex.load(tmp_path / "idx", enc)
    with pytest.raises(RetrievalError, match="no index.json"):
        DenseIndex.load(tmp_path / "nothing", enc)


def test_a_failed_save_keeps_the_old_index(tmp_path, monkeypatch):
    enc = HashEncoder()
    DenseIndex.build(DOCS, enc).save(tmp_path / "idx")

    class Broken(HashEncoder):
        def identity(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        DenseIndex(DOCS[:2], enc.encode(DOCS[:2]), Broken()).save(tmp_path / "idx")
    assert DenseIndex.load(tmp_path / "idx", enc).texts == DOCS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_bm25_finds_the_words():
    docs = ["The capital of Vorland is Kessa.", "Otters live near rivers.", "Kessa has a harbour."]
    bm25 = BM25Retriever(docs)
    hits = bm25.retrieve("What is the capital of Vorland?", 2)
    assert hits[0].index == 0 and hits[0].score > hits[1].score


def test_rrf_is_the_definition():
    fused = rrf_scores([[3, 1, 2], [1, 4]], rrf_k=60)
    assert fused == pytest.approx({3: 1 / 61, 1: 1 / 62 + 1 / 61, 2: 1 / 63, 4: 1 / 62})
    enc = HashEncoder()
    docs = DOCS[:10]
    hybrid = HybridRetriever(DenseIndex.build(docs, enc), BM25Retriever(docs), rrf_k=60, depth=10)
    q = "document number 4 about topic4 and theme 4"
    d_idx, _ = hybrid.dense.search([q], 10)
    l_idx, _ = hybrid.lexical.search([q], 10)
    expected = sorted(rrf_scores([d_idx[0], l_idx[0]]).items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    assert [(h.index, pytest.approx(h.score)) for h in hybrid.retrieve(q, 3)] == [(d, s) for d, s in expected]
    assert hybrid.retrieve(q, 1)[0].index == 4


def test_chunking():
    words = " ".join(f"w{i}" for i in range(250))
    chunks = chunk_text(words, max_words=100, overlap=20)
    assert [c.split()[0] for c in chunks] == ["w0", "w80", "w160"] and chunks[-1].split()[-1] == "w249"
    assert all(len(c.split()) <= 100 for c in chunks)
    one_line = "x" * 5000                       # one huge "word": cut by characters
    pieces = chunk_text(one_line, max_chars=1000, max_words=3, overlap=1)
    assert all(len(w) == 1000 for c in pieces for w in c.split()) and len(pieces) == 2   # 5 pieces of 1000
    chunks, source = chunk_documents(["short doc", words], max_words=100, overlap=20)
    assert source == [0, 1, 1, 1] and chunks[0] == "short doc"


@pytest.mark.parametrize("bad, match", [([], "knowledge base is empty"), ("one text", "must be a list"),
                                        (["ok", 3], "document 1 .* is a int")])
def test_bad_knowledge_base(bad, match):
    with pytest.raises(RetrievalError, match=match):
        DenseIndex.build(bad, HashEncoder())
    with pytest.raises(RetrievalError, match=match):
        BM25Retriever(bad)


def test_empty_question():
    index = DenseIndex.build(DOCS, HashEncoder())
    for q in ("", "   \n"):
        with pytest.raises(RetrievalError, match="the question is empty"):
            index.retrieve(q)
        with pytest.raises(RetrievalError, match="the question is empty"):
            BM25Retriever(DOCS).retrieve(q)
    with pytest.raises(RetrievalError, match="every document .* is empty"):
        chunk_documents(["", "  "])
