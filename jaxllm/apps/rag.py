"""Retrieval-augmented generation: retrieve the documents a question needs, put them in the prompt,
let the model answer from them.

The prompt (``build_rag_prompt``) is exactly::

    Answer the question based on the context below.\\n
    \\n
    Context:\\n
    Document 1: {best document}\\n
    Document 2: {next}\\n
    ...
    \\n
    Question: {question}\\n
    Answer:

and the answer is what the model writes after "Answer:", up to the first newline (EOS), stripped.
When the prompt plus the answer's ``max_new_tokens`` do not fit the model's context, the
lowest-scored documents are dropped first, one at a time, until it fits; ``RAGAnswer.dropped``
counts them (and a warning says so). A question that does not fit even without documents is an
error.

``RAGSystem(llm, retriever, top_k=3)``: ``retriever`` is a retriever of ``jaxllm.apps.retrieval``
(``DenseIndex``, ``BM25Retriever``, ``HybridRetriever``: anything with ``search`` and ``texts``), or
one of the kinds "hybrid", "dense", "bm25": then ``answer_question(question, knowledge_base)``
builds that retriever over the knowledge base (chunked with overlap; kept for the next question
on the same knowledge base).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Sequence

from jaxllm.apps.llm import complete, token_budget
from jaxllm.apps.retrieval import (BM25Retriever, DenseIndex, Hit, HybridRetriever, RetrievalError, _documents,
                                   _query, chunk_documents)

INSTRUCTION = "Answer the question based on the context below."
KINDS = ("hybrid", "dense", "bm25")


def build_rag_prompt(question: str, documents: Sequence[str]) -> str:
    """The RAG prompt for `question` with `documents` (best first)."""
    context = "".join(f"Document {i}: {d}\n" for i, d in enumerate(documents, start=1))
    return f"{INSTRUCTION}\n\nContext:\n{context}\nQuestion: {question}\nAnswer:"


@dataclasses.dataclass
class RAGAnswer:
    answer: str
    documents: list[Hit]    # the documents in the prompt, best first
    dropped: int            # retrieved documents left out so that the prompt fits the model's context
    prompt: str


def build_retriever(kind: str, texts: Sequence[str] | None = None, encoder=None, *, dense: DenseIndex | None = None):
    """A retriever of `kind` ("hybrid", "dense" or "bm25") over `texts`, or over the texts of a
    `dense` index already built (e.g. loaded from disk), which it then reuses (the encoder:
    jaxllm's MiniLM unless given)."""
    if kind not in KINDS:
        raise ValueError(f"retriever kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
    texts = dense.texts if dense is not None else _documents(texts)
    if kind == "bm25":
        return BM25Retriever(texts)
    if dense is None:
        if encoder is None:
            from jaxllm.embeddings import SentenceEncoder
            encoder = SentenceEncoder.load()
        dense = DenseIndex.build(texts, encoder)
    return dense if kind == "dense" else HybridRetriever(dense, BM25Retriever(texts))


class RAGSystem:
    """Answer questions from a knowledge base with an LLM (see the module's docstring)."""

    def __init__(self, llm, retriever="hybrid", top_k: int = 3, *, max_new_tokens: int = 32, encoder=None,
                 chunk_words: int = 120, chunk_overlap: int = 30):
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
        if isinstance(retriever, str):
            if retriever not in KINDS:
                raise ValueError(f"retriever kind {retriever!r} is unknown; use one of {', '.join(KINDS)}, "
                                 f"or pass a retriever")
        elif not (hasattr(retriever, "search") and hasattr(retriever, "texts")):
            raise TypeError(f"retriever must be one of {', '.join(KINDS)} or a retriever with search() and "
                            f"texts (DenseIndex, BM25Retriever, HybridRetriever), got {type(retriever).__name__}")
        self.llm, self.retriever, self.top_k, self.max_new_tokens = llm, retriever, top_k, max_new_tokens
        self.encoder, self.chunking = encoder, dict(max_words=chunk_words, overlap=chunk_overlap)
        self._built: tuple[tuple[str, ...], object] | None = None

    def _retriever_for(self, knowledge_base):
        if not isinstance(self.retriever, str):
            if knowledge_base is not None and list(_documents(knowledge_base)) != list(self.retriever.texts):
                raise RetrievalError("this RAGSystem searches the retriever it was given; pass knowledge_base "
                                     "only when it was made with a retriever kind (e.g. RAGSystem(llm, 'hybrid'))")
            return self.retriever
        if knowledge_base is None:
            if self._built is None:
                raise RetrievalError("no knowledge base: pass answer_question(question, knowledge_base)")
            return self._built[1]
        key = tuple(_documents(knowledge_base))
        if self._built is None or self._built[0] != key:
            chunks, _ = chunk_documents(key, **self.chunking)
            self._built = (key, build_retriever(self.retriever, chunks, self.encoder))
        return self._built[1]

    def fit_prompt(self, question: str, hits: Sequence[Hit]) -> tuple[str, list[Hit], int]:
        """(prompt, documents kept, number dropped): the lowest-scored documents are dropped until
        the prompt and max_new_tokens fit the model's context."""
        hits = list(hits)
        budget = token_budget(self.llm)
        prompt = build_rag_prompt(question, [h.text for h in hits])
        if budget is None:
            return prompt, hits, 0
        count, size = budget
        kept = len(hits)
        while count(prompt) + self.max_new_tokens > size:
            if kept == 0:
                raise RetrievalError(f"the question alone makes a prompt of {count(prompt)} tokens; with "
                                     f"max_new_tokens={self.max_new_tokens} it does not fit the model's "
                                     f"context of {size} tokens: ask a shorter question")
            kept -= 1
            prompt = build_rag_prompt(question, [h.text for h in hits[:kept]])
        return prompt, hits[:kept], len(hits) - kept

    def answer_questions(self, questions: Sequence[str], knowledge_base: Sequence[str] | None = None
                         ) -> list[RAGAnswer]:
        """Answers to every question, retrieved as one batch and generated as one batch."""
        if isinstance(questions, str):
            raise ValueError("questions must be a list of strings; use answer_question() for one")
        questions = [_query(q) for q in questions]
        if not questions:
            return []
        retriever = self._retriever_for(knowledge_base)
        idx, scores = retriever.search(questions, self.top_k)
        fitted = [self.fit_prompt(q, [Hit(int(i), retriever.texts[int(i)], float(s)) for i, s in zip(ii, ss)])
                  for q, ii, ss in zip(questions, idx, scores)]
        dropped = sum(f[2] for f in fitted)
        if dropped:
            warnings.warn(f"RAG: {dropped} retrieved document(s) over {len(questions)} question(s) were dropped "
                          f"(lowest-scored first) to fit the model's context", stacklevel=2)
        texts = complete(self.llm, [f[0] for f in fitted], stop=("\n",), max_new_tokens=self.max_new_tokens)
        return [RAGAnswer(t.strip(), kept, n, prompt) for t, (prompt, kept, n) in zip(texts, fitted)]

    def answer_question(self, question: str, knowledge_base: Sequence[str] | None = None) -> RAGAnswer:
        return self.answer_questions([question], knowledge_base)[0]
