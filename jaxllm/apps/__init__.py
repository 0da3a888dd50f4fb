"""Applications on a model: retrieval (dense, BM25, hybrid), retrieval-augmented generation, and a
tool-using ReAct agent with a safe calculator and a search tool."""

from jaxllm.apps.agent import AgentResult, AgentStep, Calculator, LLMAgent, Search, Tool, ToolError, parse_step
from jaxllm.apps.llm import LLM
from jaxllm.apps.rag import RAGAnswer, RAGSystem, build_rag_prompt, build_retriever
from jaxllm.apps.retrieval import (BM25Retriever, DenseIndex, Hit, HybridRetriever, RetrievalError, chunk_documents,
                                   chunk_text, rrf_scores)

__all__ = ["AgentResult", "AgentStep", "BM25Retriever", "Calculator", "DenseIndex", "Hit", "HybridRetriever", "LLM",
           "LLMAgent", "RAGAnswer", "RAGSystem", "RetrievalError", "Search", "Tool", "ToolError", "build_rag_prompt",
           "build_retriever", "chunk_documents", "chunk_text", "parse_step", "rrf_scores"]
