"""A language model as text in, text out: what RAG and the agent call.

``LLM(model, tokenizer)`` wraps a jaxllm GPT (or ``LLM.load(run_or_hf_dir)``): greedy unless given a
sampling strategy, continuations cut before EOS and before the first stop string
(``jaxllm.sampling.generate_text``), a batch of prompts in ONE generate call. It also says how many
tokens a text takes (``count_tokens``) and how many the model sees (``context_size``), which RAG
needs to fit its documents.

RAG and the agent also accept any plain callable ``llm(prompt) -> str`` (another library's model,
an API client, or a scripted fake in tests); its output is cut at the stop strings here, and it has
no context limit unless it also has ``count_tokens`` and ``context_size``.
"""

from __future__ import annotations

from typing import Sequence

import jax

from jaxllm.sampling import SamplingConfig, cut_at_stop_strings, generate_text


class LLM:
    """A jaxllm GPT and its tokenizer, called on text."""

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 64, sampling: SamplingConfig | None = None,
                 key: jax.Array | None = None, **strategy):
        if tokenizer is None:
            raise ValueError("LLM needs the model's tokenizer (a run without tokenizer/ cannot be used on text)")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if sampling is None:
            strategy.setdefault("temperature", 0.0)      # greedy unless asked otherwise
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.sampling = SamplingConfig.build(sampling, **strategy)
        self.key = jax.random.key(0) if key is None else key

    @classmethod
    def load(cls, path, step: int | None = None, **kw) -> "LLM":
        """The model and tokenizer of a jaxllm training run (pretrain, sft, lora, dpo, ...; a LoRA is
        folded into the weights) or of a Hugging Face GPT-2 directory."""
        from jaxllm.runs import load_base

        model, _, tokenizer = load_base(path, step)
        if tokenizer is None:
            raise FileNotFoundError(f"{path} has no tokenizer; a model without one cannot be used on text")
        return cls(model, tokenizer, **kw)

    @property
    def context_size(self) -> int:
        return int(self.model.config.block_size)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def generate_batch(self, prompts: Sequence[str], *, stop: Sequence[str] = (),
                       max_new_tokens: int | None = None) -> list[str]:
        prompts = list(prompts)
        if not prompts:
            return []
        return generate_text(self.model, self.tokenizer, prompts,
                             self.max_new_tokens if max_new_tokens is None else max_new_tokens, self.sampling,
                             stop=stop, key=self.key)

    def __call__(self, prompt: str, *, stop: Sequence[str] = (), max_new_tokens: int | None = None) -> str:
        return self.generate_batch([prompt], stop=stop, max_new_tokens=max_new_tokens)[0]


def complete(llm, prompts: Sequence[str], stop: Sequence[str] = (), max_new_tokens: int | None = None) -> list[str]:
    """The continuations of `prompts` by `llm` (an `LLM`, or any callable prompt -> str), each cut
    before its first stop string."""
    if hasattr(llm, "generate_batch"):
        return llm.generate_batch(prompts, stop=stop, max_new_tokens=max_new_tokens)
    if not callable(llm):
        raise TypeError(f"llm must be a jaxllm.apps.LLM or a callable prompt -> str, got {type(llm).__name__}")
    out = []
    for p in prompts:
        text = llm(p)
        if not isinstance(text, str):
            raise TypeError(f"llm returned {type(text).__name__}, not a str")
        out.append(cut_at_stop_strings(text, stop))
    return out


def token_budget(llm) -> tuple[callable, int] | None:
    """(count_tokens, context_size) when `llm` has both, else None (no limit known)."""
    count, size = getattr(llm, "count_tokens", None), getattr(llm, "context_size", None)
    return (count, int(size)) if callable(count) and size is not None else None
