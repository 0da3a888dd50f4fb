"""Retrieval over a knowledge base: dense (sentence embeddings), lexical (BM25) and their hybrid.

- ``chunk_text`` cuts a long document into overlapping word windows (a single huge "word", e.g. a
  document of one line without spaces, is cut by characters first).
- ``DenseIndex``: the documents' embeddings from a sentence encoder (``jaxllm.embeddings``); a query
  is a cosine top-k, one jitted matmul + ``lax.top_k``. ``save(dir)`` writes the embeddings, the
  texts and the encoder's identity atomically (a temporary directory renamed into place, so an
  existing index is replaced whole or not at all); ``DenseIndex.load(dir, encoder)`` refuses an
  index written by another encoder or by a newer format, saying which.
- ``BM25Retriever``: Okapi BM25 through the ``bm25s`` library.
- ``HybridRetriever``: reciprocal-rank fusion (Cormack et al., 2009) of both: a document's score is
  the sum over the retrievers of ``1 / (rrf_k + rank)``, rank counted from 1 in each retriever's
  top ``depth`` (a document outside a list adds nothing); ties go to the smaller document index.

Every retriever has ``retrieve(query, k) -> list[Hit]`` (best first) and ``texts``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

FORMAT_VERSION = 1


class RetrievalError(ValueError):
    """A knowledge base, query or index that cannot be used; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class Hit:
    index: int       # position of the document in the retriever's texts
    text: str
    score: float


def _documents(texts, what: str = "knowledge base") -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise RetrievalError(f"the {what} must be a list of texts, got {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise RetrievalError(f"the {what} is empty; give at least one document")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise RetrievalError(f"document {i} of the {what} is a {type(t).__name__}, not a str")
    return texts


def _query(query) -> str:
    if not isinstance(query, str) or not query.strip():
        raise RetrievalError(f"the question is empty ({query!r}); ask a question in words")
    return query


def _k(k, n: int) -> int:
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise RetrievalError(f"k must be an integer >= 1, got {k!r}")
    return min(int(k), n)


def chunk_text(text: str, max_words: int = 120, overlap: int = 30, max_chars: int = 1000) -> list[str]:
    """`text` as windows of at most `max_words` words, each starting `max_words - overlap` words after
    the last; words longer than `max_chars` characters are first cut into `max_chars` pieces."""
    if not 0 <= overlap < max_words:
        raise ValueError(f"overlap ({overlap}) must be >= 0 and smaller than max_words ({max_words})")
    words = []
    for w in text.split():
        words += [w[i:i + max_chars] for i in range(0, len(w), max_chars)]
    if len(words) <= max_words:
        return [" ".join(words)] if words else []
    step = max_words - overlap
    return [" ".join(words[i:i + max_words]) for i in range(0, len(words) - overlap, step)]


def chunk_documents(texts: Sequence[str], **kw) -> tuple[list[str], list[int]]:
    """(chunks, source document of each chunk) for a list of documents."""
    chunks, source = [], []
    for i, t in enumerate(_documents(texts)):
        for c in chunk_text(t, **kw):
            chunks.append(c)
            source.append(i)
    if not chunks:
        raise RetrievalError("every document of the knowledge base is empty or whitespace")
    return chunks, source


@functools.partial(jax.jit, static_argnames="k")
def _top_k(embeddings_ND, queries_QD, *, k: int):
    return jax.lax.top_k(queries_QD @ embeddings_ND.T, k)


class _Retriever:
    """What every retriever shares: `retrieve` is one query through its batched `search`."""

    texts: list[str]

    def search(self, queries: Sequence[str], k: int):
        raise NotImplementedError

    def retrieve(self, query: str, k: int = 3) -> list[Hit]:
        idx, scores = self.search([query], k)
        return [Hit(int(i), self.texts[int(i)], float(s)) for i, s in zip(idx[0], scores[0])]


class DenseIndex(_Retriever):
    """Cosine top-k over the documents' sentence embeddings."""

    def __init__(self, texts: Sequence[str], embeddings, encoder):
        self.texts = _documents(texts)
        self.embeddings = np.asarray(embeddings, np.float32)
        if self.embeddings.shape[0] != len(self.texts) or self.embeddings.ndim != 2:
            raise RetrievalError(f"embeddings {self.embeddings.shape} do not match {len(self.texts)} texts")
        self.encoder = encoder
        self._device = jnp.asarray(self.embeddings)

    @classmethod
    def build(cls, texts: Sequence[str], encoder) -> "DenseIndex":
        texts = _documents(texts)
        return cls(texts, encoder.encode(texts), encoder)

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices, scores), each (len(queries), k), best first."""
        q = self.encoder.encode([_query(x) for x in queries])
        scores, idx = _top_k(self._device, jnp.asarray(q, jnp.float32), k=_k(k, len(self.texts)))
        return np.asarray(idx), np.asarray(scores)

    def save(self, directory) -> Path:
        """Write the index to `directory` atomically (replacing an index already there)."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            np.save(tmp / "embeddings.npy", self.embeddings)
            (tmp / "texts.json").write_text(json.dumps(self.texts), encoding="utf-8")
            (tmp / "index.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "kind": "dense",
                                                        "documents": len(self.texts),
                                                        "encoder": self.encoder.identity()}, indent=2))
            old = None
            if directory.exists():
                old = directory.with_name(f".{directory.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(directory, old)
            os.replace(tmp, directory)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    @classmethod
    def load(cls, directory, encoder) -> "DenseIndex":
        directory = Path(directory)
        meta_file = directory / "index.json"
        if not meta_file.is_file():
            raise RetrievalError(f"{directory} holds no retrieval index (no index.json); build one with "
                                 f"DenseIndex.build(...).save(dir) or `jaxllm rag index`")
        meta = json.loads(meta_file.read_text())
        version = meta.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise RetrievalError(f"{directory}: index format {version!r} is newer than this jaxllm reads "
                                 f"({FORMAT_VERSION}); upgrade jaxllm or rebuild the index")
        theirs, ours = meta.get("encoder", {}), encoder.identity()
        differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        if differ:
            raise RetrievalError(
                f"{directory} was built with another encoder ({', '.join(f'{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here' for k in differ)}); "
                f"its vectors are not comparable with this encoder's: rebuild the index with it")
        texts = json.loads((directory / "texts.json").read_text(encoding="utf-8"))
        return cls(texts, np.load(directory / "embeddings.npy"), encoder)


@contextlib.contextmanager
def _bm25s_quiet():
    """bm25s sets its own logger to DEBUG when imported; while it works for us it logs warnings only."""
    logger = logging.getLogger("bm25s")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


class BM25Retriever(_Retriever):
    """Lexical retrieval: BM25 over lower-cased word tokens, English stopwords removed (bm25s).
    Documents left with no word (empty, or stopwords only) are kept and never match."""

    def __init__(self, texts: Sequence[str], *, k1: float = 1.5, b: float = 0.75):
        import bm25s

        self._bm25s = bm25s
        self.texts = _documents(texts)
        self._model = bm25s.BM25(k1=k1, b=b)
        with _bm25s_quiet():
            tokens = bm25s.tokenize(self.texts, stopwords="en", show_progress=False)
            self._empty = not tokens.vocab
            if not self._empty:
                self._model.index(tokens, show_progress=False)

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = [_query(q) for q in queries]
        k = _k(k, len(self.texts))
        if self._empty:   # no document has a word to match: every score is 0, in document order
            return np.tile(np.arange(k), (len(queries), 1)), np.zeros((len(queries), k), np.float32)
        with _bm25s_quiet():
            tokens = self._bm25s.tokenize(queries, stopwords="en", show_progress=False)
            idx, scores = self._model.retrieve(tokens, k=k, show_progress=False)
        return np.asarray(idx), np.asarray(scores)


def rrf_scores(rankings: Sequence[Sequence[int]], rrf_k: int = 60) -> dict[int, float]:
    """Reciprocal-rank fusion: document -> sum over rankings of 1 / (rrf_k + rank), rank from 1."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, doc in enumerate(ranking, start=1):
            fused[int(doc)] = fused.get(int(doc), 0.0) + 1.0 / (rrf_k + rank)
    return fused


class HybridRetriever(_Retriever):
    """Dense + BM25 by reciprocal-rank fusion of each one's top `depth`."""

    def __init__(self, dense: DenseIndex, lexical: BM25Retriever, *, rrf_k: int = 60, depth: int = 50):
        if dense.texts != lexical.texts:
            raise RetrievalError("the dense index and the BM25 retriever must hold the same documents")
        self.dense, self.lexical, self.rrf_k, self.depth = dense, lexical, rrf_k, depth
        self.texts = dense.texts

    def search(self, queries: Sequence[str], k: int) -> tuple[list[list[int]], list[list[float]]]:
        depth = max(self.depth, k)
        d_idx, _ = self.dense.search(queries, depth)
        l_idx, _ = self.lexical.search(queries, depth)
        out_idx, out_scores = [], []
        for a, b in zip(d_idx, l_idx):
            fused = rrf_scores([a, b], self.rrf_k)
            best = sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))[:_k(k, len(self.texts))]
            out_idx.append([d for d, _ in best])
            out_scores.append([s for _, s in best])
        return out_idx, out_scores
