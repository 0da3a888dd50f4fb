"""Preference data (JSONL) -> pairs of token rows for reward modelling and DPO.

Two record formats, detected per file from the first record (or forced with ``format=``):

- ``preference`` (TRL's): ``{"prompt", "chosen", "rejected"}``. Either all text, the prompt followed
  directly by each response; or conversational: ``prompt`` a list of ``{role, content}`` messages
  rendered with the SFT chat template (jaxllm.data.instruct), and ``chosen`` / ``rejected`` each a
  list holding one assistant message.
- ``comparison``: ``{"prompt", "response_a", "response_b", "preference"}``, where ``preference`` is 0
  when response_a is the better one and 1 when response_b is.

Either may carry a numeric ``margin`` (TRL's reward-margin column; 0 when absent).

Each side is tokenized as SFT tokenizes (``encode_spans``): the prompt is not a target, the response
and the EOS appended to it are, so the same rows serve the reward model (read at the last real
token) and DPO (log-probs of the labelled tokens). Rules, each counted in ``PreferenceStats``:

- a missing or mistyped field, or an empty response, is an ``InstructDataError`` naming
  ``file:line`` and the field; with ``on_error="skip"`` the record is skipped and counted;
- chosen == rejected (the same text) teaches nothing: counted and dropped;
- a side longer than ``max_len`` keeps the end of its prompt (next to the response) and as much of
  the response as fits after at least one prompt token: counted as truncated.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import numpy as np

from jaxllm.data.instruct import (ASSISTANT_TAG, Spans, TokenizedExample, _FieldError, _text, chat_spans,
                                  encode_spans, jsonl_lines, numbered_records, parse_line, resolve_special_ids,
                                  skip_or_raise)
from jaxllm.data.packing import Rows, pad_examples
from jaxllm.losses import IGNORE_INDEX
from jaxllm.tokenizer import Tokenizer

FORMATS = ("preference", "comparison")


class PreferenceRows(NamedTuple):
    """Training rows of N pairs (a pytree): each side right-padded to the block, one example per row."""

    chosen: Rows
    rejected: Rows
    margin: np.ndarray      # (N,) float32


@dataclasses.dataclass
class PreferenceStats:
    """What reading a file did; nothing is dropped, cut or skipped without a count here."""

    source: str
    format: str | None = None
    lines: int = 0          # non-blank lines (records) seen
    blank: int = 0
    kept: int = 0           # pairs returned
    skipped: int = 0        # malformed records skipped (on_error="skip")
    reasons: list[str] = dataclasses.field(default_factory=list)
    identical: int = 0      # chosen == rejected: dropped
    truncated: int = 0      # pairs with a side cut to max_len
    special_text: int = 0   # records holding a special token's text (read as plain text)

    def summary(self) -> str:
        text = (f"{self.source}: {self.kept} pairs ({self.format}) from {self.lines} records; {self.skipped} "
                f"skipped as malformed, {self.identical} dropped as chosen == rejected, {self.truncated} "
                f"truncated, {self.blank} blank lines")
        if self.special_text:
            text += f"; {self.special_text} records hold special-token text, read as plain text"
        return text + "".join(f"\n  skipped {r}" for r in self.reasons)


@dataclasses.dataclass
class PreferenceDataset:
    chosen: list[TokenizedExample]
    rejected: list[TokenizedExample]
    margin: np.ndarray
    stats: PreferenceStats
    eos_id: int
    pad_id: int

    def __len__(self) -> int:
        return len(self.chosen)

    def rows(self, seq_len: int) -> PreferenceRows:
        return PreferenceRows(pad_examples(self.chosen, seq_len, self.pad_id),
                              pad_examples(self.rejected, seq_len, self.pad_id),
                              np.asarray(self.margin, np.float32))


def detect_format(record: dict) -> str | None:
    if "chosen" in record or "rejected" in record:
        return "preference"
    if "response_a" in record or "response_b" in record or "preference" in record:
        return "comparison"
    return None


def _prompt_spans(record: dict) -> Spans:
    if "prompt" not in record:
        raise _FieldError("prompt", "missing field")
    prompt = record["prompt"]
    if isinstance(prompt, list):   # conversational: the turns so far, then an assistant turn opens
        return [(text, False) for text, _ in chat_spans(prompt, "prompt", train_assistant=False)] + \
            [(ASSISTANT_TAG, False)]
    return [(_text(record, "prompt"), False)]


def _response(record: dict, field: str, conversational: bool) -> str:
    if field not in record:
        raise _FieldError(field, "missing field")
    value = record[field]
    if conversational:
        if not isinstance(value, list) or len(value) != 1 or not isinstance(value[0], dict):
            raise _FieldError(field, "expected a list holding one assistant message {role, content}")
        if value[0].get("role") != "assistant":
            raise _FieldError(f"{field}[0].role", f"expected 'assistant', got {value[0].get('role')!r}")
        try:
            text = _text(value[0], "content")
        except _FieldError as e:
            raise _FieldError(f"{field}[0].{e.field}", e.problem) from None
    else:
        text = _text(record, field)
    if not text:
        raise _FieldError(field, "empty response: nothing to prefer")
    return text


def _margin(record: dict) -> float:
    value = record.get("margin", 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _FieldError("margin", f"expected a finite number, got {value!r}")
    return float(value)


def pair_spans(record, format: str) -> tuple[Spans, Spans, float]:
    """(chosen spans, rejected spans, margin) of one record in ``format``."""
    if not isinstance(record, dict):
        raise _FieldError(None, f"expected a JSON object, got {type(record).__name__}")
    prompt = _prompt_spans(record)
    conversational = isinstance(record.get("prompt"), list)
    if format == "preference":
        chosen, rejected = (_response(record, f, conversational) for f in ("chosen", "rejected"))
    elif format == "comparison":
        a, b = (_response(record, f, conversational) for f in ("response_a", "response_b"))
        pref = record.get("preference")
        if "preference" not in record:
            raise _FieldError("preference", "missing field")
        if isinstance(pref, bool) or pref not in (0, 1):
            raise _FieldError("preference", f"expected 0 (response_a is better) or 1 (response_b is), got {pref!r}")
        chosen, rejected = (a, b) if pref == 0 else (b, a)
    else:
        raise ValueError(f"unknown format {format!r}; valid formats: auto, {', '.join(FORMATS)}")
    return prompt + [(chosen, True)], prompt + [(rejected, True)], _margin(record)


def _fit(ids: list[int], labels: list[int], max_len: int | None) -> tuple[list[int], list[int], bool]:
    """Cut one side to max_len: the end of the prompt and the start of the response (see module doc)."""
    if max_len is None or len(ids) <= max_len:
        return ids, labels, False
    n_prompt = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
    n_response = min(len(ids) - n_prompt, max_len - 1)
    keep_prompt = min(n_prompt, max_len - n_response)
    start = n_prompt - keep_prompt
    end = n_prompt + n_response
    return ids[start:end], labels[start:end], True


def tokenize_preferences(records: Iterable, tokenizer: Tokenizer, *, format: str = "auto",
                         max_len: int | None = None, on_error: str = "raise", eos_id: int | None = None,
                         pad_id: int | None = None, source: str = "<records>",
                         log: Callable[[str], None] | None = print) -> PreferenceDataset:
    """Records (dicts, or JSONL lines as str/bytes) -> PreferenceDataset; errors name source:line."""
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; valid formats: auto, {', '.join(FORMATS)}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if max_len is not None and max_len < 2:
        raise ValueError(f"max_len must be at least 2 (one prompt token and one response token), got {max_len}")
    eos, pad = resolve_special_ids(tokenizer, eos_id, pad_id)
    stats = PreferenceStats(source=source, format=None if format == "auto" else format)
    chosen_out: list[TokenizedExample] = []
    rejected_out: list[TokenizedExample] = []
    margins: list[float] = []
    for line, record in numbered_records(records, stats):
        try:
            record = parse_line(record)
            if stats.format is None and isinstance(record, dict):
                stats.format = detect_format(record)
                if stats.format is None:
                    raise _FieldError(None, f"cannot tell the format from keys {sorted(record)}; expected "
                                            f"prompt/chosen/rejected or prompt/response_a/response_b/preference")
            chosen, rejected, margin = pair_spans(record, stats.format or "preference")
            try:
                sides = [encode_spans(spans, tokenizer, eos) for spans in (chosen, rejected)]
            except ValueError as e:
                raise _FieldError(None, f"cannot tokenize: {e}") from None
        except _FieldError as e:
            skip_or_raise(e, stats, source, line, on_error)
            continue
        if chosen[-1][0] == rejected[-1][0]:
            stats.identical += 1
            continue
        stats.special_text += any(tokenizer.count_special(t) for t, _ in chosen + rejected[-1:])
        fitted = [_fit(ids, labels, max_len) for ids, labels in sides]
        stats.truncated += any(cut for _, _, cut in fitted)
        (c_ids, c_lab, _), (r_ids, r_lab, _) = fitted
        chosen_out.append(TokenizedExample(np.asarray(c_ids, np.int32), np.asarray(c_lab, np.int32), line))
        rejected_out.append(TokenizedExample(np.asarray(r_ids, np.int32), np.asarray(r_lab, np.int32), line))
        margins.append(margin)
    stats.kept = len(chosen_out)
    if log is not None and (stats.skipped or stats.identical or stats.truncated or stats.special_text):
        log(stats.summary())
    return PreferenceDataset(chosen_out, rejected_out, np.asarray(margins, np.float32), stats, eos, pad)


def load_preferences(path, tokenizer: Tokenizer, **kwargs) -> PreferenceDataset:
    """Read a preference JSONL file (see ``tokenize_preferences`` for the keyword arguments)."""
    path = Path(path)
    with path.open("rb") as f:
        return tokenize_preferences(jsonl_lines(f), tokenizer, source=str(path), **kwargs)
