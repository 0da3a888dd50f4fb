"""Applications on a model: retrieval (dense, BM25, hybrid) for retrieval-augmented generation."""

from jaxllm.apps.retrieval import (BM25Retriever, DenseIndex, Hit, HybridRetriever, RetrievalError, chunk_documents,
                                   chunk_text, rrf_scores)

__all__ = ["BM25Retriever", "DenseIndex", "Hit", "HybridRetriever", "RetrievalError", "chunk_documents",
           "chunk_text", "rrf_scores"]
