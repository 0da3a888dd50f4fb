"""Self-consistency (Wang et al., 2022): sample several reasoning paths, answer by majority vote.

All n samples come from ONE batched `generate` call (the prompt repeated n times; each row draws
its own randomness), so the cost is one prefill and one decode loop of batch n.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Callable, Sequence

import jax
import numpy as np

from jaxllm.sampling import SamplingConfig, check_fits, cut_at_eos, generate

_ANSWER_MARKER = re.compile(r"answer\s*:", re.IGNORECASE)
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str) -> str | None:
    """The text after the last "answer:" (case-insensitive) up to the end of that line, else the
    last number in the text (thousands separators removed), else None.

    Normalised so that equal answers vote together: surrounding whitespace and a trailing period
    are stripped."""
    marks = list(_ANSWER_MARKER.finditer(text))
    if marks:
        answer = text[marks[-1].end():].strip().split("\n", 1)[0].strip().rstrip(".").strip()
        if answer:
            return answer
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1].replace(",", "")
    return None


def majority_vote(answers: Sequence[str | None]) -> tuple[str | None, float, dict[str, int]]:
    """(majority answer, its share of ALL samples, vote counts). None answers do not vote but count
    in the share's denominator; ties go to the answer seen first."""
    votes = collections.Counter(a for a in answers if a is not None)
    if not votes:
        return None, 0.0, {}
    answer, count = votes.most_common(1)[0]  # Counter keeps first-seen order among equal counts
    return answer, count / len(answers), dict(votes)


@dataclasses.dataclass
class SelfConsistencyResult:
    answer: str | None           # the majority answer (None if no sample had one)
    vote_share: float            # votes for `answer` / number of samples
    votes: dict[str, int]        # every extracted answer and its count
    samples: list[str]           # the n generated continuations (prompt excluded, cut at EOS)
    answers: list[str | None]    # what the extractor found in each sample


def self_consistency(model, tokenizer, prompt: str, n: int = 8, sampling: SamplingConfig | None = None, *,
                     extractor: Callable[[str], str | None] = extract_answer, max_new_tokens: int = 128,
                     stop_at_eos: bool = True, key: jax.Array | None = None, must_fit: bool = False,
                     **strategy) -> SelfConsistencyResult:
    """Sample `n` continuations of `prompt` in one batched call and vote on their extracted answers.

    `extractor(text) -> answer or None` defaults to `extract_answer`. The strategy is generate's
    (`sampling` and/or its fields as keywords), with temperature 0.7 unless given. Sampling must be
    random: temperature 0 would give n identical samples. With `must_fit`, a prompt that with
    `max_new_tokens` exceeds the model's block_size is a ValueError (else it is cropped from the left)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if sampling is None:
        strategy.setdefault("temperature", 0.7)
    sampling = SamplingConfig.build(sampling, **strategy)
    if sampling.greedy:
        raise ValueError("self-consistency needs sampling: give temperature > 0 (0 gives n identical answers)")
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt is empty; give the question as text")
    if must_fit:
        check_fits(len(ids), max_new_tokens, model.config.block_size)
    eos_id = tokenizer.eos_id if stop_at_eos else None
    out = generate(model, np.asarray([ids] * n), max_new_tokens, sampling, eos_id=eos_id,
                   key=jax.random.key(0) if key is None else key)
    samples = []
    for row in np.asarray(out)[:, len(ids):]:
        samples.append(tokenizer.decode(cut_at_eos(row, eos_id)))
    answers = [extractor(s) for s in samples]
    answer, share, votes = majority_vote(answers)
    return SelfConsistencyResult(answer, share, votes, samples, answers)
