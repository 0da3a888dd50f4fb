"""Synthetic instruction tasks with exact answers, and an exact-match evaluator.

Tasks (``TASKS``), each an instruction, an input and the one correct output:

- ``add``: ``"123+45"`` -> ``"168"``; operands of 1..``n_digits`` digits. With ``reverse_sum``
  the sum is written least-significant digit first (``"861"``), the order in which a
  left-to-right model can compute carries; with ``pad_operands`` the operands are zero-padded to
  ``n_digits`` (``"123+045"``), so digits of equal weight sit at fixed offsets.
- ``reverse``: a random lowercase word of 2..``max_word_len`` letters -> the word reversed.
- ``sort``: 2..``max_items`` digits or lowercase letters, comma-separated -> sorted ascending.
- ``map``: 1..``max_words`` words of ``DICTIONARY`` -> each word looked up (English -> French).

Records come in every instruction format (``alpaca``, ``prompt_completion``, ``chat``) and in
``compact``: a prompt/completion pair with no template, ``"add 123+45="`` -> ``"168"``.

``make_splits`` draws train and held-out examples from a seed. Which split a prompt belongs to is
a hash of (seed, task, input), so the splits are disjoint by construction and a held-out prompt
stays held out however many examples are asked for. Records are Alpaca dicts (or prompt/completion
or chat dicts) with an extra ``"task"`` key, ready for ``jaxllm.data.instruct.tokenize_records``.
``task_tokenizer`` builds a char tokenizer covering every task, template and EOS/PAD.
"""

from __future__ import annotations

import dataclasses
import hashlib
import string
from typing import Callable, Sequence

import jax
import numpy as np

from jaxllm.data.instruct import (ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, encode_spans,
                                  example_spans, generation_split, resolve_special_ids, sft_char_tokenizer)
from jaxllm.sampling import SamplingConfig, cut_at_eos, generate
from jaxllm.tokenizer import CharTokenizer, Tokenizer

TASKS = ("add", "reverse", "sort", "map")
# "compact" is prompt/completion without a template ("reverse abc=" -> "cba"): about 6x fewer
# tokens per example than Alpaca's template, which is what a CPU-sized run can afford
RECORD_FORMATS = ("alpaca", "prompt_completion", "chat", "compact")
INSTRUCTIONS = {
    "add": "Add the numbers.",
    "reverse": "Reverse the word.",
    "sort": "Sort the items.",
    "map": "Translate the words.",
}
DICTIONARY = {
    "cat": "chat", "dog": "chien", "red": "rouge", "blue": "bleu", "sun": "soleil", "moon": "lune",
    "water": "eau", "house": "maison", "tree": "arbre", "bird": "oiseau", "fish": "poisson",
    "bread": "pain", "milk": "lait", "book": "livre", "one": "un", "two": "deux",
}
_WORDS = sorted(DICTIONARY)


@dataclasses.dataclass(frozen=True)
class TaskSettings:
    n_digits: int = 3          # add: operands have 1..n_digits digits
    reverse_sum: bool = False  # add: the sum least-significant digit first
    pad_operands: bool = False  # add: operands zero-padded to n_digits ("007+120"), digits aligned
    max_word_len: int = 6      # reverse: words of 2..max_word_len letters
    max_items: int = 5         # sort: 2..max_items items
    max_words: int = 3         # map: 1..max_words words


def _pick(rng: np.random.Generator, pool: str, n: int) -> list[str]:
    """n items of `pool` with replacement: the draws of rng.choice(list(pool), n), without its
    per-call overhead (a third of make_splits' time)."""
    return [pool[i] for i in rng.integers(0, len(pool), n)]


def _task_input_output(task: str, rng: np.random.Generator, s: TaskSettings) -> tuple[str, str]:
    if task == "add":
        a, b = (int(rng.integers(0, 10 ** int(rng.integers(1, s.n_digits + 1)))) for _ in range(2))
        total = str(a + b)
        width = s.n_digits if s.pad_operands else 0
        return f"{a:0{width}d}+{b:0{width}d}", total[::-1] if s.reverse_sum else total
    if task == "reverse":
        word = "".join(_pick(rng, string.ascii_lowercase, int(rng.integers(2, s.max_word_len + 1))))
        return word, word[::-1]
    if task == "sort":
        pool = string.digits if rng.random() < 0.5 else string.ascii_lowercase
        items = _pick(rng, pool, int(rng.integers(2, s.max_items + 1)))
        return ",".join(items), ",".join(sorted(items))
    if task == "map":
        words = [_WORDS[i] for i in rng.integers(0, len(_WORDS), int(rng.integers(1, s.max_words + 1)))]
        return " ".join(words), " ".join(DICTIONARY[w] for w in words)
    raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")


def _record(task: str, inp: str, out: str, format: str) -> dict:
    instruction = INSTRUCTIONS[task]
    if format == "alpaca":
        return {"instruction": instruction, "input": inp, "output": out, "task": task}
    if format == "prompt_completion":
        return {"prompt": ALPACA_PROMPT.format(instruction=instruction, input=inp), "completion": out, "task": task}
    if format == "chat":
        return {"messages": [{"role": "user", "content": f"{instruction}\n{inp}"},
                             {"role": "assistant", "content": out}], "task": task}
    if format == "compact":  # a prompt/completion record with no template: "add 12+5=" -> "17"
        return {"prompt": f"{task} {inp}=", "completion": out, "task": task}
    raise ValueError(f"unknown format {format!r}; valid: {', '.join(RECORD_FORMATS)}")


def _held_out(seed: int, task: str, inp: str, eval_fraction: float) -> bool:
    """A stable hash (Python's hash() is salted per process) decides the split of a prompt."""
    digest = hashlib.blake2b(f"{seed}|{task}|{inp}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < eval_fraction


_EXHAUSTED = 5000  # draws without a new input after which a task's space counts as used up


def make_splits(n_train: int, n_eval: int, *, tasks: Sequence[str] = TASKS, seed: int = 0,
                format: str = "alpaca", eval_fraction: float = 0.2,
                settings: TaskSettings = TaskSettings(),
                train_at_most: bool = False) -> tuple[list[dict], list[dict]]:
    """(train, held_out): ``n_train`` and ``n_eval`` distinct examples PER TASK, shuffled across
    tasks, no input in both. Deterministic in (arguments, seed). ``eval_fraction`` is the share of
    each task's input space reserved for held-out examples. With ``train_at_most``, a task whose
    input space holds fewer than ``n_train`` train examples gives all it has (``map`` has a few
    thousand) instead of an error; the held-out count is always exact."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    train: list[dict] = []
    held_out: list[dict] = []
    for t, task in enumerate(tasks):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
        rng = np.random.default_rng([seed, t])  # per task: one task's counts do not move another's
        seen: set[str] = set()
        want = {True: n_eval, False: n_train}
        got: dict[bool, list[dict]] = {True: [], False: []}
        budget = 1000 + 50 * (n_train + n_eval) / min(eval_fraction, 1 - eval_fraction)
        misses = 0  # draws in a row that found nothing new: the input space is exhausted
        while (len(got[True]) < n_eval or len(got[False]) < n_train) and budget > 0 and misses < _EXHAUSTED:
            budget -= 1
            inp, out = _task_input_output(task, rng, settings)
            split = _held_out(seed, task, inp, eval_fraction)
            misses += 1
            if inp not in seen and len(got[split]) < want[split]:
                seen.add(inp)
                got[split].append(_record(task, inp, out, format))
                misses = 0
        if len(got[True]) < n_eval or (len(got[False]) < n_train and not (train_at_most and got[False])):
            raise ValueError(f"task {task!r} gave only {len(got[False])} train / {len(got[True])} held-out "
                             f"distinct examples of the {n_train} / {n_eval} asked; widen its settings")
        train += got[False]
        held_out += got[True]
    # one shuffle stream per split: the held-out order does not depend on n_train either
    order = [np.random.default_rng([seed, len(TASKS), split]).permutation(n) for split, n in
             enumerate((len(train), len(held_out)))]
    return [train[i] for i in order[0]], [held_out[i] for i in order[1]]


def task_tokenizer(extra: str = "") -> CharTokenizer:
    """A char tokenizer for every task in every format (templates, instructions, inputs, outputs)
    and the characters of ``extra``, plus PAD (id 0) and EOS (id 1)."""
    text = (extra + ALPACA_PROMPT + ALPACA_PROMPT_NO_INPUT + "<|system|><|user|><|assistant|>\n"
            + "".join(INSTRUCTIONS.values()) + "".join(TASKS) + string.ascii_lowercase + string.digits + ",+= "
            + "".join(DICTIONARY) + "".join(DICTIONARY.values()))
    return sft_char_tokenizer(text)


# --------------------------------------------------------------------------- evaluation


@dataclasses.dataclass
class ExactMatchReport:
    accuracy: float                # over all examples
    per_task: dict[str, float]     # task -> accuracy ("all" for records without a "task" key)
    counts: dict[str, int]         # task -> number of examples
    predictions: list[str]         # decoded outputs, EOS and what follows removed

    def __str__(self) -> str:
        tasks = ", ".join(f"{t} {a:.3f} (n={self.counts[t]})" for t, a in sorted(self.per_task.items()))
        return f"exact match {self.accuracy:.3f}: {tasks}"


GenerateFn = Callable[[list[list[int]], int], list[list[int]]]


def greedy_generate_fn(model, eos_id: int, pad_id: int, batch_size: int = 32, sampling=None,
                       key=None) -> GenerateFn:
    """(prompts, max_new_tokens) -> new ids per prompt through ``jaxllm.sampling.generate``: greedy,
    or with ``sampling`` (a SamplingConfig) and ``key`` (batch i draws with fold_in(key, i)).

    All prompts are left-padded to one width and every batch has ``batch_size`` rows (the last is
    filled with copies), so the decode loop compiles once; padding takes no position or attention,
    so a row's tokens are what it would get alone."""
    sampling = sampling if sampling is not None else SamplingConfig(temperature=0.0)
    key = key if key is not None else jax.random.key(0)

    def run(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        B, P = min(batch_size, len(prompts)), max(len(p) for p in prompts)
        new_ids: list[list[int]] = []
        for start in range(0, len(prompts), B):
            chunk = prompts[start:start + B]
            rows = chunk + [chunk[-1]] * (B - len(chunk))
            tokens_BP = np.full((B, P), pad_id, np.int32)
            real_BP = np.zeros((B, P), bool)
            for b, p in enumerate(rows):
                tokens_BP[b, P - len(p):], real_BP[b, P - len(p):] = p, True
            out = generate(model, tokens_BP, max_new_tokens, sampling, eos_id=eos_id, pad_id=pad_id,
                           prompt_mask=real_BP, key=jax.random.fold_in(key, start))
            new_ids += np.asarray(out)[:len(chunk), P:].tolist()
        return new_ids

    return run


def _prompts_and_targets(records: Sequence[dict], tokenizer: Tokenizer, eos: int, format: str,
                         source: str) -> tuple[list[list[int]], list[str], list[str]]:
    """(prompt ids, target texts, prompt texts) of each record: the spans before its last response
    (the same ids as in training, see ``instruct.generation_split``) and that response."""
    prompts, targets, texts = [], [], []
    for i, ex in enumerate(records, start=1):
        prompt_spans, target = generation_split(example_spans(ex, format, source=source, line=i))
        prompts.append(encode_spans(prompt_spans, tokenizer, eos)[0])
        targets.append(target)
        texts.append("".join(t for t, _ in prompt_spans))
    return prompts, targets, texts


def _answer_room(tokenizer: Tokenizer, targets: Sequence[str]) -> int:
    """New tokens enough for the longest target and its EOS."""
    return max(len(tokenizer.encode(t)) for t in targets) + 1


def exact_match(model, tokenizer: Tokenizer, examples: Sequence[dict], *, format: str = "auto",
                batch_size: int = 32, max_new_tokens: int | None = None, eos_id: int | None = None,
                pad_id: int | None = None, generate_fn: GenerateFn | None = None) -> ExactMatchReport:
    """Greedy generation from each example's prompt (the same ids as in training: the spans before
    its last response, see ``instruct.generation_split``), cut at EOS, decoded and compared with the
    response text exactly. ``max_new_tokens`` defaults to the longest target + 1 (its EOS).
    ``generate_fn`` replaces the model (then ``model`` may be None): a stub or an oracle."""
    if not examples:
        raise ValueError("exact_match needs at least one example")
    eos, pad = resolve_special_ids(tokenizer, eos_id, pad_id)
    prompts, targets, _ = _prompts_and_targets(examples, tokenizer, eos, format, "<examples>")
    tasks = [ex.get("task", "all") for ex in examples]
    if max_new_tokens is None:
        max_new_tokens = _answer_room(tokenizer, targets)
    run = generate_fn or greedy_generate_fn(model, eos, pad, batch_size)
    predictions = [tokenizer.decode(cut_at_eos(ids, eos)) for ids in run(prompts, max_new_tokens)]
    if len(predictions) != len(examples):
        raise ValueError(f"generate_fn returned {len(predictions)} outputs for {len(examples)} prompts")
    hits = [p == t for p, t in zip(predictions, targets)]
    counts = {t: tasks.count(t) for t in dict.fromkeys(tasks)}
    per_task = {t: sum(h for h, tt in zip(hits, tasks) if tt == t) / n for t, n in counts.items()}
    return ExactMatchReport(sum(hits) / len(hits), per_task, counts, predictions)


# --------------------------------------------------------------------------- preference pairs


@dataclasses.dataclass
class PairStats:
    prompts: int = 0          # prompts sampled
    samples: int = 0          # completions drawn (the greedy one included)
    correct: int = 0          # completions equal to the exact answer
    greedy_correct: int = 0   # prompts whose greedy answer is correct
    pairs: int = 0            # pairs made
    all_correct: int = 0      # prompts left out: no incorrect answer
    none_correct: int = 0     # prompts left out: no correct answer


def sample_preference_pairs(model, tokenizer: Tokenizer, records: Sequence[dict], *, samples: int = 8,
                            temperature: float = 1.0, pairs_per_prompt: int = 1, include_greedy: bool = True,
                            format: str = "auto", batch_size: int = 64, eos_id: int | None = None,
                            pad_id: int | None = None, seed: int = 0,
                            max_new_tokens: int | None = None) -> tuple[list[dict], PairStats]:
    """Preference pairs from a policy's own answers, labelled by the tasks' exact answers.

    For each record's prompt the policy answers greedily (`include_greedy`) and `samples` times at
    `temperature`; distinct correct answers (decoded text equal to the record's response) are
    chosen and distinct incorrect ones rejected, the greedy answer first: it is the one the policy
    gives when asked, so it is the mistake a preference should fix. Up to `pairs_per_prompt` pairs
    per prompt, each answer used once. An answer that is empty or holds a special token (a sampled
    PAD) is no text to prefer against and is left out. Prompts whose answers are all correct or all
    incorrect give no pair (counted). Pairs are TRL preference records {"prompt", "chosen",
    "rejected", "task"}, the prompt as the model saw it, for ``jaxllm.data.preference``."""
    if samples < 1 or (samples < 2 and not include_greedy):
        raise ValueError(f"need at least two answers per prompt to pair a correct with an incorrect one, got "
                         f"samples={samples}, include_greedy={include_greedy}")
    eos, pad = resolve_special_ids(tokenizer, eos_id, pad_id)
    prompts, targets, texts = _prompts_and_targets(records, tokenizer, eos, format, "<records>")
    if max_new_tokens is None:
        max_new_tokens = _answer_room(tokenizer, targets)

    def decode(ids):
        return tokenizer.decode(cut_at_eos(ids, eos))
    drawn = greedy_generate_fn(model, eos, pad, batch_size, SamplingConfig(temperature=temperature),
                               jax.random.key(seed))([p for p in prompts for _ in range(samples)], max_new_tokens)
    greedy = greedy_generate_fn(model, eos, pad, batch_size)(prompts, max_new_tokens) if include_greedy else None
    stats, pairs = PairStats(prompts=len(prompts)), []
    for i, (ex, target) in enumerate(zip(records, targets)):
        answers = [decode(ids) for ids in drawn[i * samples:(i + 1) * samples]]
        if greedy is not None:
            answers.insert(0, decode(greedy[i]))
            stats.greedy_correct += answers[0] == target
        stats.samples += len(answers)
        stats.correct += sum(a == target for a in answers)
        good = list(dict.fromkeys(a for a in answers if a == target))
        bad = list(dict.fromkeys(a for a in answers if a != target and a and not tokenizer.count_special(a)))
        if not bad:
            stats.all_correct += 1
        elif not good:
            stats.none_correct += 1
        else:
            for k in range(min(pairs_per_prompt, len(bad))):
                pairs.append({"prompt": texts[i], "chosen": good[k % len(good)], "rejected": bad[k],
                              "task": ex.get("task", "all")})
    stats.pairs = len(pairs)
    return pairs, stats
