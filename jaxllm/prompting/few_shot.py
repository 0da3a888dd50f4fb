"""Few-shot learning: show the model worked examples in its prompt, then ask it the new case.

The prompt (``FewShotLearner.create_few_shot_prompt``) is exactly::

    {task}\\n\\n
    Example 1:\\nInput: {input}\\nOutput: {output}\\n\\n
    Example 2:\\n...                                  (one block per example, numbered from 1)
    Now solve:\\nInput: {query}\\nOutput:

and the prediction is what the model writes after the final "Output:", up to the first newline or
EOS, stripped of surrounding spaces. ``predict_batch`` runs all queries as ONE left-padded
``jaxllm.generate`` call (one compile for the batch's shape); each query may have its own examples
(e.g. chosen for it by ``jaxllm.prompting.selection``). ``predict_consistent`` samples several
answers for one query and takes the majority (self-consistency).

Generation stops at a newline (``generate_text``'s stop string): when the tokenizer writes "\\n" as one
token (a char tokenizer, GPT-2's BPE), that token ends a row as EOS does, so the batch stops as soon as
every row has answered; otherwise rows stop at EOS or max_new_tokens and the answer is cut afterwards.
"""

from __future__ import annotations

from typing import Sequence

import jax

from jaxllm.prompting.self_consistency import SelfConsistencyResult, self_consistency
from jaxllm.sampling import SamplingConfig, generate_text

Example = tuple[str, str]


def _pair(example, where: str) -> Example:
    """(input, output) from a 2-sequence of str or a dict with input/output keys."""
    if isinstance(example, dict):
        if set(example) >= {"input", "output"}:
            example = (example["input"], example["output"])
        else:
            raise ValueError(f"{where} is a dict without 'input' and 'output' keys (it has {sorted(example)}); "
                             f"give (input, output) pairs or {{'input': ..., 'output': ...}} dicts")
    if (isinstance(example, (str, bytes)) or not isinstance(example, Sequence) or len(example) != 2
            or not all(isinstance(x, str) for x in example)):
        raise ValueError(f"{where} is {example!r}, not an (input, output) pair of strings; give examples "
                         f"as [(input, output), ...]")
    return example[0], example[1]


def as_examples(examples, where: str = "examples") -> list[Example]:
    """Validate a list of (input, output) pairs (tuples, lists or {input, output} dicts)."""
    if isinstance(examples, (str, dict)) or not isinstance(examples, Sequence):
        raise ValueError(f"{where} must be a list of (input, output) pairs, got {type(examples).__name__}")
    return [_pair(ex, f"{where}[{i}]") for i, ex in enumerate(examples)]


def _is_pair(x) -> bool:
    return (isinstance(x, dict) or (isinstance(x, Sequence) and not isinstance(x, str) and len(x) == 2
                                    and all(isinstance(v, str) for v in x)))


def _answer(text: str) -> str:
    return text.split("\n", 1)[0].strip()


class FewShotLearner:
    """In-context learning with a jaxllm GPT and its tokenizer."""

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 32):
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens

    @staticmethod
    def create_few_shot_prompt(task: str, examples, query: str) -> str:
        if not isinstance(task, str) or not isinstance(query, str):
            raise ValueError(f"task and query must be strings, got {type(task).__name__} and {type(query).__name__}")
        blocks = "".join(f"Example {i}:\nInput: {x}\nOutput: {y}\n\n"
                         for i, (x, y) in enumerate(as_examples(examples), start=1))
        return f"{task}\n\n{blocks}Now solve:\nInput: {query}\nOutput:"

    def _max_new(self, max_new_tokens) -> int:
        return self.max_new_tokens if max_new_tokens is None else max_new_tokens

    def _generate(self, prompts: list[str], sampling: SamplingConfig | None, key, max_new_tokens,
                  strategy: dict) -> list[str]:
        if sampling is None:
            strategy.setdefault("temperature", 0.0)      # greedy unless asked otherwise
        texts = generate_text(self.model, self.tokenizer, prompts, self._max_new(max_new_tokens), sampling,
                              stop=["\n"], key=jax.random.key(0) if key is None else key, must_fit=True,
                              **strategy)
        return [t.strip() for t in texts]

    def predict(self, task: str, examples, query: str, sampling: SamplingConfig | None = None, *,
                key=None, max_new_tokens: int | None = None, **strategy) -> str:
        """The model's answer to `query` after the examples. Greedy unless a `sampling` config or
        strategy keywords (generate's: temperature, top_k, top_p, ...) say otherwise."""
        return self.predict_batch(task, examples, [query], sampling, key=key, max_new_tokens=max_new_tokens,
                                  **strategy)[0]

    def predict_batch(self, task: str, examples, queries: Sequence[str], sampling: SamplingConfig | None = None,
                      *, key=None, max_new_tokens: int | None = None, **strategy) -> list[str]:
        """Answers to every query in one batched generate call (greedy unless told otherwise, as
        `predict`). `examples` is one list of pairs shared by all queries, or one list per query
        (same length as `queries`)."""
        if isinstance(queries, str):
            raise ValueError("queries must be a list of strings; use predict() for one query")
        queries = list(queries)
        if not queries:
            return []
        per_query = (isinstance(examples, Sequence) and not isinstance(examples, str) and len(examples) > 0
                     and not _is_pair(examples[0]))
        if per_query and len(examples) != len(queries):
            raise ValueError(f"examples has {len(examples)} lists for {len(queries)} queries; give one list "
                             f"per query, or one list of (input, output) pairs for all")
        prompts = [self.create_few_shot_prompt(task, examples[i] if per_query else examples, q)
                   for i, q in enumerate(queries)]
        return self._generate(prompts, sampling, key, max_new_tokens, strategy)

    def predict_consistent(self, task: str, examples, query: str, n: int = 8,
                           sampling: SamplingConfig | None = None, *, key=None,
                           max_new_tokens: int | None = None, **strategy) -> SelfConsistencyResult:
        """Self-consistency: n sampled answers (temperature 0.7 unless given) and their majority."""
        prompt = self.create_few_shot_prompt(task, examples, query)
        return self_consistency(self.model, self.tokenizer, prompt, n, sampling,
                                extractor=lambda s: _answer(s) or None, max_new_tokens=self._max_new(max_new_tokens),
                                key=key, must_fit=True, **strategy)
