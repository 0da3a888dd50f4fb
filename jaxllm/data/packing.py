"""Tokenized examples -> fixed-length training rows, packed or one example per row.

Both paths return the same ``Rows`` (all int32, shape (N, T)):

- ``tokens``: the ids, ``pad_id`` after the last segment;
- ``labels``: aligned with the tokens (the loss shifts: logits at t predict labels[t + 1]),
  -100 on prompt tokens, padding, and the FIRST token of every segment;
- ``segment_ids``: 1..k for the k examples of a row, 0 on padding;
- ``positions``: restarting at 0 at each segment's first token (0 on padding).

Why the first label of each segment is masked: with the shift, the last token of segment s
predicts labels[t + 1], the first token of segment s + 1, which belongs to another example and
is attended to by nothing of segment s. Masking it makes a packed row's loss the sum of the
losses its examples would have alone (where position 0 is never a target), so
``jaxllm.losses.next_token_loss`` / ``cross_entropy_sum`` on the shifted labels need no change.

The model is called with ``attention_mask=segment_attention_mask(segment_ids)`` (block-diagonal
and causal: a token sees only earlier tokens of its own segment) and ``positions=positions``;
``model_inputs(rows)`` builds both. A padding query attends to nothing; the model's finite mask
value keeps that row NaN-free, and its labels are -100.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.losses import IGNORE_INDEX

STRATEGIES = ("first_fit", "sequential")


class Rows(NamedTuple):
    """Training rows; a NamedTuple, so also a JAX pytree."""

    tokens: np.ndarray       # (N, T) int32
    labels: np.ndarray       # (N, T) int32, -100 = not a target
    segment_ids: np.ndarray  # (N, T) int32, 0 = padding, 1..k = the row's examples
    positions: np.ndarray    # (N, T) int32

    @property
    def fill(self) -> float:
        """Fraction of slots that hold a real token (1.0 = no padding)."""
        return float(np.mean(self.segment_ids > 0)) if self.segment_ids.size else 0.0


def _ids_labels(example) -> tuple[np.ndarray, np.ndarray]:
    """An example is (ids, labels, ...) or has .ids/.labels (e.g. instruct.TokenizedExample)."""
    ids, labels = (example.ids, example.labels) if hasattr(example, "ids") else (example[0], example[1])
    ids, labels = np.asarray(ids, np.int32).reshape(-1), np.asarray(labels, np.int32).reshape(-1)
    if ids.shape != labels.shape or ids.size == 0:
        raise ValueError(f"an example needs ids and labels of the same non-zero length, got "
                         f"{ids.shape} and {labels.shape}")
    return ids, labels


def _check_lengths(lengths: Sequence[int], seq_len: int) -> None:
    too_long = [i for i, n in enumerate(lengths) if n > seq_len]
    if too_long:
        i = too_long[0]
        raise ValueError(f"{len(too_long)} examples are longer than seq_len={seq_len} (the first: example "
                         f"{i}, {lengths[i]} tokens); tokenize with max_len={seq_len} to truncate or drop them")


def _assign(lengths: Sequence[int], seq_len: int, strategy: str) -> list[list[int]]:
    """Example indices per row, in input order within a row.

    sequential: fill the current row, open a new one when the next example does not fit.
    first_fit: each example goes to the first row (oldest first) with room, else a new row;
    denser than sequential when lengths vary, O(examples x rows)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown packing strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    rows: list[list[int]] = []
    room: list[int] = []
    shortest = min(lengths, default=0)
    open_rows: list[int] = []  # rows (oldest first) that could still take the shortest example
    for i, n in enumerate(lengths):
        if strategy == "sequential":
            r = len(rows) - 1 if rows and room[-1] >= n else None
        else:  # scanning only open rows keeps first-fit fast: full rows are never candidates
            r = next((r for r in open_rows if room[r] >= n), None)
        if r is None:
            rows.append([])
            room.append(seq_len)
            r = len(rows) - 1
            open_rows.append(r)
        rows[r].append(i)
        room[r] -= n
        if room[r] < shortest and r in open_rows:
            open_rows.remove(r)
    return rows


def _fill(pairs, assignment: list[list[int]], seq_len: int, pad_id: int) -> Rows:
    N, T = len(assignment), seq_len
    tokens_NT = np.full((N, T), pad_id, np.int32)
    labels_NT = np.full((N, T), IGNORE_INDEX, np.int32)
    segment_ids_NT = np.zeros((N, T), np.int32)
    positions_NT = np.zeros((N, T), np.int32)
    for row, members in enumerate(assignment):
        start = 0
        for seg, i in enumerate(members, start=1):
            ids, labels = pairs[i]
            end = start + len(ids)
            tokens_NT[row, start:end] = ids
            labels_NT[row, start:end] = labels
            labels_NT[row, start] = IGNORE_INDEX  # no prediction across a segment boundary
            segment_ids_NT[row, start:end] = seg
            positions_NT[row, start:end] = np.arange(len(ids))
            start = end
    return Rows(tokens_NT, labels_NT, segment_ids_NT, positions_NT)


def pack_examples(examples, seq_len: int, pad_id: int, *, strategy: str = "first_fit") -> Rows:
    """Several examples per row of ``seq_len`` tokens (see module docstring). Every example must
    fit a row: truncate or drop long ones when tokenizing (``max_len=seq_len``)."""
    pairs = [_ids_labels(ex) for ex in examples]
    lengths = [len(ids) for ids, _ in pairs]
    _check_lengths(lengths, seq_len)
    return _fill(pairs, _assign(lengths, seq_len, strategy), seq_len, pad_id)


def pad_examples(examples, seq_len: int, pad_id: int) -> Rows:
    """One example per row, right-padded to ``seq_len``: the unpacked twin of ``pack_examples``."""
    pairs = [_ids_labels(ex) for ex in examples]
    _check_lengths([len(ids) for ids, _ in pairs], seq_len)
    return _fill(pairs, [[i] for i in range(len(pairs))], seq_len, pad_id)


def make_rows(examples, seq_len: int, pad_id: int, *, packing: bool = True,
              strategy: str = "first_fit") -> Rows:
    """``pack_examples`` or ``pad_examples``: a trainer switches packing with one flag."""
    if packing:
        return pack_examples(examples, seq_len, pad_id, strategy=strategy)
    return pad_examples(examples, seq_len, pad_id)


def segment_attention_mask(segment_ids_NT) -> jax.Array:
    """Boolean (N, T, T): query t may attend key s iff s <= t, both in the same segment, and the
    key is not padding. Built from (N, T) ids inside the step, so no (N, T, T) array is stored."""
    seg_NT = jnp.asarray(segment_ids_NT)
    T = seg_NT.shape[-1]
    same_NTT = seg_NT[:, :, None] == seg_NT[:, None, :]
    causal_TT = jnp.tril(jnp.ones((T, T), bool))
    return same_NTT & (seg_NT[:, None, :] != 0) & causal_TT[None]


def model_inputs(rows: Rows) -> dict:
    """Keyword arguments for ``GPT.__call__`` / ``features`` on these rows."""
    return dict(attention_mask=segment_attention_mask(rows.segment_ids), positions=jnp.asarray(rows.positions))
