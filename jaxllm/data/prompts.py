"""Prompts for online RL (PPO, GRPO): JSONL records -> left-padded prompt ids, with each record's
other fields kept for reward functions.

A record is TRL's prompt-only format, ``{"prompt": str, ...}``, or any instruction format of
``jaxllm.data.instruct`` (alpaca, prompt/completion, chat). The prompt is what SFT trained the model
to answer: the spans before the last response, tokenized exactly as in SFT (a chat whose last
message is not the assistant's gets the assistant tag appended). A record's response, when it has
one, becomes the column ``target`` (the answer an exact-match reward compares with); every other
field of the record is a column too, passed to reward functions by name as TRL passes dataset
columns.

The response needs room in the model's block: a prompt longer than ``max_prompt_len`` tokens is
truncated from the left (``long_prompts="truncate"``: its last tokens kept, as generation crops) or
left out (``"skip"``), and counted either way. Malformed lines raise ``InstructDataError`` naming
``file:line`` and the field, or are skipped and counted (``on_error="skip"``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jaxllm.data.instruct import (MAX_REASONS, _FieldError, _format_of, _record_spans,
                                  encode_spans, generation_split, jsonl_lines, numbered_records,
                                  parse_line, skip_or_raise)
from jaxllm.tokenizer import Tokenizer

LONG_PROMPTS = ("truncate", "skip")
# the response field of each format: missing in a prompt-only record
_RESPONSE = {"alpaca": "output", "prompt_completion": "completion"}


@dataclasses.dataclass
class PromptStats:
    source: str
    lines: int = 0          # non-blank records seen
    blank: int = 0
    kept: int = 0
    skipped: int = 0        # malformed (on_error="skip")
    reasons: list[str] = dataclasses.field(default_factory=list)
    truncated: int = 0      # longer than max_prompt_len, cut from the left
    too_long: int = 0       # longer than max_prompt_len, left out (long_prompts="skip")

    def summary(self) -> str:
        return (f"{self.source}: {self.kept} prompts from {self.lines} records; {self.skipped} skipped as "
                f"malformed, {self.truncated} truncated and {self.too_long} left out as longer than the room "
                f"left for the response, {self.blank} blank lines"
                + "".join(f"\n  skipped {r}" for r in self.reasons[:MAX_REASONS]))


@dataclasses.dataclass
class PromptSet:
    tokens: np.ndarray        # (N, P) int32, left-padded with pad_id
    real: np.ndarray          # (N, P) bool
    texts: list[str]          # each prompt as text (before any truncation)
    columns: list[dict]       # each record's other fields, plus "target" when it has a response
    stats: PromptStats

    def __len__(self) -> int:
        return self.tokens.shape[0]


def prompt_spans(record: dict):
    """(prompt spans, target text or None) of one parsed record."""
    if not isinstance(record, dict):
        raise _FieldError(None, f"expected a JSON object, got {type(record).__name__}")
    fmt = _format_of(record)
    if fmt == "chat":
        messages = record["messages"]
        if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
                and messages[-1].get("role") != "assistant":
            spans = _record_spans({"messages": messages + [{"role": "assistant", "content": ""}]}, "chat")
            return spans[:-1], None   # ends with the assistant tag: the model answers next
    elif _RESPONSE[fmt] not in record:
        spans = _record_spans({**record, _RESPONSE[fmt]: ""}, fmt)
        return spans[:-1], None
    return generation_split(_record_spans(record, fmt))


def tokenize_prompts(records, tokenizer: Tokenizer, *, eos_id: int, pad_id: int, max_prompt_len: int,
                     long_prompts: str = "truncate", on_error: str = "raise", source: str = "<records>",
                     log=print) -> PromptSet:
    if long_prompts not in LONG_PROMPTS:
        raise ValueError(f"long_prompts must be one of {', '.join(LONG_PROMPTS)}, got {long_prompts!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if max_prompt_len < 1:
        raise ValueError(f"no room for a prompt: max_prompt_len={max_prompt_len}; lower rollout.max_new_tokens "
                         f"or use a model with a longer block")
    stats = PromptStats(source)
    rows, texts, columns = [], [], []
    for line, record in numbered_records(records, stats):
        try:
            record = parse_line(record)
            spans, target = prompt_spans(record)
            try:
                ids = encode_spans(spans, tokenizer, eos_id)[0]
            except ValueError as e:
                raise _FieldError(None, f"cannot tokenize: {e}") from None
            if not ids:
                raise _FieldError("prompt", "the prompt is empty")
        except _FieldError as e:
            skip_or_raise(e, stats, source, line, on_error)
            continue
        if len(ids) > max_prompt_len:
            if long_prompts == "skip":
                stats.too_long += 1
                continue
            ids = ids[-max_prompt_len:]
            stats.truncated += 1
        rows.append(ids)
        texts.append("".join(t for t, _ in spans))
        cols = {k: v for k, v in record.items() if k not in ("prompt", "messages", "instruction", "input")}
        if target is not None:
            cols["target"] = target
        columns.append(cols)
    stats.kept = len(rows)
    if not rows:
        raise ValueError(f"no usable prompts in {source}: {stats.summary()}")
    P = max(len(r) for r in rows)
    tokens = np.full((len(rows), P), pad_id, np.int32)
    real = np.zeros((len(rows), P), bool)
    for i, r in enumerate(rows):
        tokens[i, P - len(r):], real[i, P - len(r):] = r, True
    if log is not None and (stats.skipped or stats.truncated or stats.too_long):
        log(stats.summary())
    return PromptSet(tokens, real, texts, columns, stats)


def load_prompts(path, tokenizer: Tokenizer, **kwargs) -> PromptSet:
    """Read a JSONL prompt file (see ``tokenize_prompts`` for the keyword arguments)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    with path.open("rb") as f:
        return tokenize_prompts(jsonl_lines(f), tokenizer, source=str(path), **kwargs)
