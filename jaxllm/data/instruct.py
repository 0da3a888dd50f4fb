"""Instruction data (JSONL) -> token ids and labels for supervised fine-tuning (SFT).

Three record formats, detected per file from the first record (or forced with ``format=``):

- ``alpaca``: ``{"instruction": str, "input": str (optional, may be null), "output": str}``.
  Prompt (no "### Input" section when input is empty), then the response ``output``::

      ### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}\\n\\n### Response:\\n{output}<EOS>

- ``prompt_completion``: ``{"prompt": str, "completion": str}``: ``{prompt}{completion}<EOS>``.
- ``chat``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` with
  at least one assistant message. The chat template: every message opens with a role tag line;
  system and user contents end with a newline, assistant contents end with EOS::

      <|system|>\\n{system}\\n<|user|>\\n{user}\\n<|assistant|>\\n{reply}<EOS><|user|>\\n...

  Only assistant contents and their EOS are trained on. To generate a reply, feed the
  conversation up to and including ``<|assistant|>\\n`` and stop at EOS.

An example is a list of ``(text, trainable)`` spans. Each span is tokenized on its own and the ids
concatenated, so the loss mask comes from span boundaries, never from searching the template
in the token stream. EOS is appended after every trainable span and is itself a target: the model
learns to stop.

Label convention (Hugging Face's): labels are aligned with the ids, ``labels[i] = ids[i]`` on
response tokens and EOS, ``IGNORE_INDEX`` (-100) on prompt tokens and padding; the loss shifts
(``jaxllm.losses.next_token_loss``: logits at t predict labels[t + 1]).

Special ids (``resolve_special_ids``): EOS is ``eos_id=`` if given, else the tokenizer's. A char
tokenizer built from a corpus has no specials, so ``sft_char_tokenizer`` adds two control characters
that ``CharTokenizer`` recognises,
``"\\x03"`` (ETX) as EOS and ``"\\x00"`` (NUL) as PAD; they survive ``save``/``load_tokenizer`` as
ordinary characters and are found again by character. PAD is ``pad_id=`` if given, else the
tokenizer's pad id if it differs from EOS, else id 0 (id 1 when EOS is 0). Padding is masked out of
attention and loss, so its value does not change training; it is kept distinct from EOS so that
"padding" and "end of response" can never be confused when reading rows or generated ids.

Errors name ``file:line`` (1-based) and the field. ``on_error="raise"`` raises
``InstructDataError`` (a ValueError); ``on_error="skip"`` drops the line and counts it. Blank
lines are allowed (and counted): JSONL files often end with one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import numpy as np

from jaxllm.losses import IGNORE_INDEX
from jaxllm.tokenizer import CHAR_EOS, CHAR_PAD, CharTokenizer, Tokenizer

FORMATS = ("alpaca", "prompt_completion", "chat")
ROLES = ("system", "user", "assistant")
TRUNCATIONS = ("keep_start", "drop")
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
ASSISTANT_TAG = "<|assistant|>\n"     # opens an assistant turn of the chat template
MAX_REASONS = 5                      # skip reasons kept in the stats (the count is always exact)

Spans = list[tuple[str, bool]]


class InstructDataError(ValueError):
    """A malformed record: ``source:line: field 'f': what is wrong``."""

    def __init__(self, source: str, line: int, field: str | None, problem: str):
        self.source, self.line, self.field, self.problem = source, line, field, problem
        where = f"field {field!r}: " if field else ""
        super().__init__(f"{source}:{line}: {where}{problem}")


class _FieldError(Exception):
    """Raised while reading one record; turned into InstructDataError once file:line are known."""

    def __init__(self, field: str | None, problem: str):
        super().__init__(problem)
        self.field, self.problem = field, problem


# --------------------------------------------------------------------------- special ids


def sft_char_tokenizer(text: str) -> CharTokenizer:
    """Char tokenizer over ``text``'s characters plus PAD (``\\x00``, id 0) and EOS (``\\x03``, id 1),
    which CharTokenizer recognises as its specials."""
    return CharTokenizer(sorted(set(text) | {CHAR_EOS, CHAR_PAD}))


def resolve_special_ids(tokenizer: Tokenizer, eos_id: int | None = None,
                        pad_id: int | None = None) -> tuple[int, int]:
    """(eos_id, pad_id) for SFT, by the rule in the module docstring; pad is never EOS."""
    eos = eos_id if eos_id is not None else tokenizer.eos_id
    if eos is None:
        raise ValueError(
            f"{tokenizer!r} has no EOS token, and SFT appends EOS after every response so the model "
            f"learns to stop: pass eos_id= (data.eos_id=ID for jaxllm sft), or build a char tokenizer with sft_char_tokenizer(text), "
            f"which reserves {CHAR_EOS!r} as EOS and {CHAR_PAD!r} as PAD")
    if pad_id is None:
        pad = tokenizer.pad_id
        pad_id = pad if pad is not None and pad != eos else (1 if eos == 0 else 0)
    elif pad_id == eos:
        raise ValueError(f"pad_id={pad_id} is the EOS id; padding must differ from EOS (EOS is a trained "
                         f"target, padding is not); pass another pad_id or leave it None")
    for name, value in (("eos_id", eos), ("pad_id", pad_id)):
        if not 0 <= int(value) < tokenizer.vocab_size:
            raise ValueError(f"{name}={value} is outside the vocabulary [0, {tokenizer.vocab_size})")
    return int(eos), int(pad_id)


# --------------------------------------------------------------------------- records -> spans


def _text(record: dict, field: str, optional: bool = False) -> str:
    if field not in record:
        if optional:
            return ""
        raise _FieldError(field, "missing field")
    value = record[field]
    if optional and value is None:
        return ""
    if not isinstance(value, str):
        raise _FieldError(field, f"expected a string, got {type(value).__name__} {str(value)[:40]!r}")
    return value


def detect_format(record: dict) -> str | None:
    """The format a record's keys say it has (see module docstring), None if they say none."""
    if "messages" in record:
        return "chat"
    if "instruction" in record or "output" in record:
        return "alpaca"
    if "prompt" in record or "completion" in record:
        return "prompt_completion"
    return None


def _format_of(record: dict) -> str:
    fmt = detect_format(record)
    if fmt is None:
        raise _FieldError(None, f"cannot tell the format from keys {sorted(record)}; expected "
                                f"instruction/output (alpaca), prompt/completion, or messages (chat)")
    return fmt


def chat_spans(messages, field: str = "messages", train_assistant: bool = True) -> Spans:
    """The chat template's spans of a list of {role, content} messages; assistant contents are
    trainable when `train_assistant` (a preference prompt's earlier turns are context only)."""
    if not isinstance(messages, list) or not messages:
        raise _FieldError(field, f"expected a non-empty list of {{role, content}} objects, "
                                 f"got {type(messages).__name__}")
    spans: Spans = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise _FieldError(f"{field}[{i}]", f"expected an object, got {type(msg).__name__}")
        try:
            role, content = _text(msg, "role"), _text(msg, "content")
        except _FieldError as e:
            raise _FieldError(f"{field}[{i}].{e.field}", e.problem) from None
        if role not in ROLES:
            raise _FieldError(f"{field}[{i}].role", f"unknown role {role!r}; valid roles: {', '.join(ROLES)}")
        if role == "assistant":
            spans += [(ASSISTANT_TAG, False), (content, train_assistant)]
        else:
            spans.append((f"<|{role}|>\n{content}\n", False))
    return spans


def _chat_spans(record: dict) -> Spans:
    if "messages" not in record:
        raise _FieldError("messages", "missing field")
    spans = chat_spans(record["messages"])
    if not any(trainable for _, trainable in spans):
        raise _FieldError("messages", "no assistant message: nothing to train on")
    return spans


def _record_spans(record, format: str) -> Spans:
    """The (text, trainable) spans of one record in ``format``; adjacent prompt spans are merged
    (they are all template text, and one piece tokenizes as it would at inference)."""
    if not isinstance(record, dict):
        raise _FieldError(None, f"expected a JSON object, got {type(record).__name__}")
    if format == "alpaca":
        instruction, inp, output = _text(record, "instruction"), _text(record, "input", True), _text(record, "output")
        prompt = (ALPACA_PROMPT if inp else ALPACA_PROMPT_NO_INPUT).format(instruction=instruction, input=inp)
        spans = [(prompt, False), (output, True)]
    elif format == "prompt_completion":
        spans = [(_text(record, "prompt"), False), (_text(record, "completion"), True)]
    elif format == "chat":
        spans = _chat_spans(record)
    else:
        raise ValueError(f"unknown format {format!r}; valid formats: auto, {', '.join(FORMATS)}")
    merged: Spans = []
    for text, trainable in spans:
        if merged and not trainable and not merged[-1][1]:
            merged[-1] = (merged[-1][0] + text, False)
        else:
            merged.append((text, trainable))
    return merged


def example_spans(record, format: str = "auto", *, source: str = "<records>", line: int = 0) -> Spans:
    """The (text, trainable) spans of one record, its format detected when "auto"; a malformed
    record raises InstructDataError naming ``source:line``."""
    try:
        if format == "auto":
            format = _format_of(record) if isinstance(record, dict) else "alpaca"
        return _record_spans(record, format)
    except _FieldError as e:
        raise InstructDataError(source, line, e.field, e.problem) from None


def generation_split(spans: Spans) -> tuple[Spans, str]:
    """(prompt spans, target text): everything before the last trainable span, and that span.
    Encoding the prompt spans with ``encode_spans`` gives exactly the ids the model saw in training."""
    last = max(i for i, (_, trainable) in enumerate(spans) if trainable)
    return spans[:last], spans[last][0]


# --------------------------------------------------------------------------- spans -> ids


def encode_spans(spans: Spans, tokenizer: Tokenizer, eos_id: int) -> tuple[list[int], list[int]]:
    """(ids, labels): each span tokenized alone; EOS after every trainable span; labels -100 on
    prompt spans and equal to the ids on trainable spans and their EOS. Span text never produces a
    special token (a literal <|endoftext|> is text): EOS comes only from the template."""
    ids: list[int] = []
    labels: list[int] = []
    for text, trainable in spans:
        piece = tokenizer.encode(text) if text else []
        ids += piece
        labels += piece if trainable else [IGNORE_INDEX] * len(piece)
        if trainable:
            ids.append(eos_id)
            labels.append(eos_id)
    return ids, labels


class TokenizedExample(NamedTuple):
    ids: np.ndarray     # (L,) int32
    labels: np.ndarray  # (L,) int32, aligned with ids (the loss shifts)
    line: int           # 1-based line (record index) it came from


@dataclasses.dataclass
class InstructStats:
    """What reading a file did; nothing is dropped, cut or skipped without a count here."""

    source: str
    format: str | None = None
    lines: int = 0          # non-blank lines (records) seen
    blank: int = 0          # blank lines, ignored
    kept: int = 0           # examples returned
    skipped: int = 0        # malformed records skipped (on_error="skip")
    reasons: list[str] = dataclasses.field(default_factory=list)  # the first MAX_REASONS skips
    truncated: int = 0      # cut to max_len (truncation="keep_start")
    dropped: int = 0        # too long (truncation="drop"), or no target left after truncation
    special_text: int = 0   # records whose text holds a special token's text (read as plain text)

    def summary(self) -> str:
        text = (f"{self.source}: {self.kept} examples ({self.format}) from {self.lines} records; "
                f"{self.skipped} skipped as malformed, {self.truncated} truncated, {self.dropped} "
                f"dropped as too long, {self.blank} blank lines")
        if self.special_text:
            text += (f"; {self.special_text} records hold special-token text (e.g. <|endoftext|>), "
                     f"read as plain text, never as the special token")
        return text + "".join(f"\n  skipped {r}" for r in self.reasons)


@dataclasses.dataclass
class InstructDataset:
    examples: list[TokenizedExample]
    stats: InstructStats
    eos_id: int
    pad_id: int

    def rows(self, seq_len: int, packing: bool = True, strategy: str = "first_fit"):
        """Training rows (tokens, labels, segment_ids, positions), see jaxllm.data.packing."""
        from jaxllm.data.packing import make_rows

        return make_rows(self.examples, seq_len, self.pad_id, packing=packing, strategy=strategy)


def _truncate(ids: list[int], labels: list[int], max_len: int | None, truncation: str):
    """-> (ids, labels, "kept" | "truncated" | "dropped") by the stated rule."""
    if max_len is None or len(ids) <= max_len:
        return ids, labels, "kept"
    if truncation == "drop":
        return ids, labels, "dropped"
    # keep_start: the start of the prompt and as much of the response as fits (the cut response
    # loses its EOS). Labels at position 0 are never a target (the loss shifts), so an example
    # whose first max_len tokens hold no other target teaches nothing: dropped, and counted.
    ids, labels = ids[:max_len], labels[:max_len]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return ids, labels, "dropped"
    return ids, labels, "truncated"


def decode_line(record):
    """A JSONL line as text: UTF-8 bytes decoded (a line that is not UTF-8 comes back as its
    UnicodeDecodeError, to be reported by ``parse_line`` under its line number); others as given."""
    if isinstance(record, bytes):
        try:
            return record.decode("utf-8")
        except UnicodeDecodeError as e:
            return e
    return record


def is_blank(record) -> bool:
    return isinstance(record, str) and not record.strip()


def parse_line(record):
    """A decoded JSONL line (see ``decode_line``) -> its JSON value; a dict passes through. Raises
    _FieldError for a line that is not UTF-8 or not JSON."""
    if isinstance(record, UnicodeDecodeError):
        e = record
        raise _FieldError(None, f"not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start} "
                                f"of the line: {e.reason}); save the file as UTF-8")
    if isinstance(record, str):
        try:
            return json.loads(record)
        except (ValueError, RecursionError) as e:  # also: too deeply nested, a 5,000-digit number
            raise _FieldError(None, f"invalid JSON ({e})") from None
    return record


def skip_or_raise(problem: _FieldError, stats, source: str, line: int, on_error: str) -> None:
    """A malformed record: raise it as an InstructDataError naming source:line and the field, or
    (on_error="skip") count it in ``stats.skipped`` and keep its reason (the first few)."""
    err = InstructDataError(source, line, problem.field, problem.problem)
    if on_error == "raise":
        raise err from None
    stats.skipped += 1
    if len(stats.reasons) < MAX_REASONS:
        stats.reasons.append(str(err))


def numbered_records(records, stats):
    """(1-based line, decoded record) of each non-blank record; counts blank lines and records seen
    in ``stats.blank`` and ``stats.lines``."""
    for line, record in enumerate(records, start=1):
        record = decode_line(record)
        if is_blank(record):
            stats.blank += 1
            continue
        stats.lines += 1
        yield line, record


def jsonl_lines(f):
    """The lines of a JSONL file opened in binary mode. Iterating a binary file splits at b"\\n" only
    (str.splitlines would also split at U+2028 inside a JSON string), so line numbers match an
    editor's; each line is decoded on its own, so a line that is not UTF-8 is a malformed record
    like any other (file:line, or skipped)."""
    return (line.rstrip(b"\r\n") for line in f)


def tokenize_records(records: Iterable, tokenizer: Tokenizer, *, format: str = "auto",
                     max_len: int | None = None, truncation: str = "keep_start", on_error: str = "raise",
                     eos_id: int | None = None, pad_id: int | None = None, source: str = "<records>",
                     log: Callable[[str], None] | None = print) -> InstructDataset:
    """Records -> InstructDataset. A record is a dict, or a JSONL line (str, or UTF-8 bytes) parsed
    here; its 1-based index is the line number in messages. ``log`` gets the stats summary whenever
    anything was skipped, truncated or dropped (None: silent; the counts are in ``.stats`` either way)."""
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; valid formats: auto, {', '.join(FORMATS)}")
    if truncation not in TRUNCATIONS:
        raise ValueError(f"unknown truncation {truncation!r}; valid rules: {', '.join(TRUNCATIONS)}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if max_len is not None and max_len < 2:
        raise ValueError(f"max_len must be at least 2 (one input and one target), got {max_len}")
    eos, pad = resolve_special_ids(tokenizer, eos_id, pad_id)
    stats = InstructStats(source=source, format=None if format == "auto" else format)
    examples: list[TokenizedExample] = []
    for line, record in numbered_records(records, stats):
        try:
            record = parse_line(record)
            if stats.format is None and isinstance(record, dict):
                stats.format = _format_of(record)  # the first record fixes the file's format
            spans = _record_spans(record, stats.format or "alpaca")
            try:
                ids, labels = encode_spans(spans, tokenizer, eos)
            except ValueError as e:
                raise _FieldError(None, f"cannot tokenize: {e}") from None
            special = any(tokenizer.count_special(text) for text, _ in spans)
        except _FieldError as e:
            skip_or_raise(e, stats, source, line, on_error)
            continue
        ids, labels, fate = _truncate(ids, labels, max_len, truncation)
        if fate == "dropped":
            stats.dropped += 1
            continue
        stats.truncated += fate == "truncated"
        stats.special_text += special
        examples.append(TokenizedExample(np.asarray(ids, np.int32), np.asarray(labels, np.int32), line))
    stats.kept = len(examples)
    if log is not None and (stats.skipped or stats.truncated or stats.dropped or stats.special_text):
        log(stats.summary())
    return InstructDataset(examples, stats, eos, pad)


def load_instruct(path, tokenizer: Tokenizer, **kwargs) -> InstructDataset:
    """Read a JSONL instruction file (see ``tokenize_records`` for the keyword arguments)."""
    path = Path(path)
    with path.open("rb") as f:
        return tokenize_records(jsonl_lines(f), tokenizer, source=str(path), **kwargs)
