"""Prompt templates, instruction helpers, JSON extraction from model output, and chat rendering.

- ``PromptTemplate``: a named ``str.format`` template whose fields are read from its text; a field
  may have a formatter that turns a structured value (a count, a list of examples) into text.
  ``render`` refuses missing and unknown fields by name. A registry holds templates by name; five
  built-ins (``BUILTIN_TEMPLATES``) are registered at import.
- ``build_prompt`` composes an instruction from a task, a role, constraints and a JSON output format.
- ``extract_json`` finds the first JSON value in a model's answer, and says why when there is none.
- ``apply_chat_template`` renders a conversation with a Jinja chat template (a tokenizer's, as
  transformers does) or, without one, with the chat format jaxllm's SFT trains on.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import string
import types
from typing import Any, Callable, Mapping, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from jaxllm.data.instruct import ASSISTANT_TAG, ROLES, chat_spans
from jaxllm.prompting.few_shot import as_examples
from jaxllm.tokenizer import Tokenizer


class TemplateError(ValueError):
    """A template, its fields or a chat conversation is not usable; the message names which and how
    to fix it."""


# --------------------------------------------------------------------------- PromptTemplate


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """A named prompt with ``{field}`` placeholders (``str.format`` syntax; ``{{`` and ``}}`` are
    literal braces). ``formatters`` maps a field to a function that turns its value into text; it
    raises ValueError or TypeError for a bad value, reported naming the template and the field."""

    name: str
    template: str
    description: str = ""
    formatters: Mapping[str, Callable[[Any], str]] = dataclasses.field(default_factory=dict)
    fields: tuple[str, ...] = dataclasses.field(init=False)  # in order of first appearance

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise TemplateError(f"a template's name must be a non-empty string, got {self.name!r}")
        fields: list[str] = []
        for _, field, _, _ in string.Formatter().parse(self.template):
            if field is None:          # literal text after the last placeholder
                continue
            if not field.isidentifier():
                raise TemplateError(
                    f"template {self.name!r}: placeholder {{{field}}} is not a plain field name; write "
                    f"{{name}} (no positional {{}}, no attribute or index access) and pass name= to render")
            if field not in fields:
                fields.append(field)
        unused = sorted(set(self.formatters) - set(fields))
        if unused:
            raise TemplateError(f"template {self.name!r}: formatters for {', '.join(unused)}, which the "
                                f"template does not use; its fields: {', '.join(fields) or '(none)'}")
        object.__setattr__(self, "fields", tuple(fields))
        # read-only, so a registered template cannot be changed behind the registry's back
        object.__setattr__(self, "formatters", types.MappingProxyType(dict(self.formatters)))

    def render(self, /, **values) -> str:
        """The prompt with every field filled in; exactly the template's fields must be given."""
        missing = [f for f in self.fields if f not in values]
        unknown = [f for f in values if f not in self.fields]
        if missing or unknown:
            problems = ([f"missing field(s) {', '.join(missing)}"] if missing else []) + \
                       ([f"unknown field(s) {', '.join(unknown)}"] if unknown else [])
            raise TemplateError(f"template {self.name!r}: {'; '.join(problems)}; it takes: "
                                f"{', '.join(self.fields) or '(no fields)'}")
        for field, formatter in self.formatters.items():
            try:
                values[field] = formatter(values[field])
            except (ValueError, TypeError) as e:
                raise TemplateError(f"template {self.name!r}, field {field!r}: {e}") from e
        return self.template.format(**values)


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, PromptTemplate] = {}


def register_template(template: PromptTemplate, overwrite: bool = False) -> PromptTemplate:
    """Add ``template`` to the registry under its name (returned, for chaining)."""
    if not isinstance(template, PromptTemplate):
        raise TypeError(f"register_template takes a PromptTemplate, got {type(template).__name__}")
    if template.name in _REGISTRY and not overwrite:
        raise TemplateError(f"a template named {template.name!r} is already registered; pass overwrite=True "
                            f"to replace it, or give the new template another name")
    _REGISTRY[template.name] = template
    return template


def get_template(name: str) -> PromptTemplate:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise TemplateError(f"no template named {name!r}; registered templates: "
                            f"{', '.join(list_templates()) or '(none)'}") from None


def list_templates() -> list[str]:
    """The registered templates' names, sorted."""
    return sorted(_REGISTRY)


def render_template(name: str, /, **values) -> str:
    """``get_template(name).render(**values)``."""
    return get_template(name).render(**values)


# --------------------------------------------------------------------------- built-ins

SENTIMENT_LABELS = ("Positive", "Negative", "Neutral")


def _sentence_count(n) -> str:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"expected a positive int (how many sentences), got {n!r}")
    return "1 sentence" if n == 1 else f"{n} sentences"


def _sentiment_examples(examples) -> str:
    """Few-shot examples as text: each an (input, label) pair, or {"input": ..., "output": ...}."""
    shots = []
    for i, (text, label) in enumerate(as_examples(examples)):
        if label not in SENTIMENT_LABELS:
            raise ValueError(f"examples[{i}]: label {label!r} is not one of {', '.join(SENTIMENT_LABELS)}")
        shots.append(f"Text: {text}\nSentiment: {label}\n\n")
    return "".join(shots)


BUILTIN_TEMPLATES = (
    PromptTemplate(
        "translation",
        "Translate the following text from {source_lang} to {target_lang}.\n\nText: {text}\nTranslation:",
        "Zero-shot translation; the model continues after 'Translation:'."),
    PromptTemplate(
        # {num_sentences} renders with its noun: "1 sentence", "3 sentences"
        "summarization",
        "Summarize the following text in {num_sentences}.\n\nText: {text}\nSummary:",
        "Summary of a given length (num_sentences: a positive int).",
        formatters={"num_sentences": _sentence_count}),
    PromptTemplate(
        "classification",
        "Classify the sentiment of the text as Positive, Negative or Neutral.\n\n{examples}Text: {text}\nSentiment:",
        "Few-shot sentiment classification; examples: a list (possibly empty) of (text, label) pairs or "
        "{input, output} dicts, labels Positive, Negative or Neutral.",
        formatters={"examples": _sentiment_examples}),
    PromptTemplate(
        "qa",
        "Answer the question using only the context below.\n\nContext: {context}\n\nQuestion: {question}\nAnswer:",
        "Extractive / grounded question answering over a given context."),
    PromptTemplate(
        "cot_reasoning",
        "Question: {question}\nLet's think step by step:",
        "Zero-shot chain of thought (Kojima et al., 2022)."),
)

for _template in BUILTIN_TEMPLATES:
    register_template(_template)
del _template


# --------------------------------------------------------------------------- instructions


def _non_empty(value, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise TemplateError(f"{what} must be a non-empty string, got {value!r}")
    return value


def add_role(prompt: str, role: str) -> str:
    """"You are {role}.\\n\\n" + prompt (role e.g. "a careful translator")."""
    return f"You are {_non_empty(role, 'role')}.\n\n{prompt}"


def add_constraints(prompt: str, constraints: Sequence[str]) -> str:
    """The prompt, then a "Constraints:" list with one "- " line per constraint (none: unchanged)."""
    if isinstance(constraints, str):
        raise TemplateError(f"constraints must be a list of strings, got the string {constraints!r}; "
                            f"wrap it in a list: [{constraints!r}]")
    constraints = [_non_empty(c, f"constraint {i}") for i, c in enumerate(constraints)]
    if not constraints:
        return prompt
    return prompt + "\n\nConstraints:\n" + "\n".join(f"- {c}" for c in constraints)


def add_output_format(prompt: str, example: dict | list | str) -> str:
    """The prompt, then an instruction to answer with JSON shaped like ``example`` (a dict or list,
    shown indented; a string is inserted as given, e.g. a JSON schema you wrote out)."""
    if isinstance(example, str):
        text = _non_empty(example, "output_format")
    else:
        if not example:
            raise TemplateError(f"output_format is empty ({example!r}); give an example of the JSON to "
                                f"answer with, e.g. {{'answer': '...', 'confidence': 0.9}}, or None")
        try:
            text = json.dumps(example, indent=2, ensure_ascii=False)  # the model reads "é", not "\\u00e9"
        except TypeError as e:
            raise TemplateError(f"output_format must be JSON-serialisable: {e}") from None
    return prompt + "\n\nRespond with JSON only, in this format:\n" + text


def build_prompt(task: str, *, role: str | None = None, constraints: Sequence[str] = (),
                 output_format: dict | list | str | None = None) -> str:
    """An instruction prompt, in this order (each part only when given)::

        You are {role}.

        {task}

        Constraints:
        - {constraint}
        ...

        Respond with JSON only, in this format:
        {output_format as indented JSON}
    """
    prompt = _non_empty(task, "task")
    if role is not None:
        prompt = add_role(prompt, role)
    prompt = add_constraints(prompt, constraints)
    if output_format is not None:
        prompt = add_output_format(prompt, output_format)
    return prompt


# --------------------------------------------------------------------------- JSON in model output


class JSONExtractionError(ValueError):
    """No JSON value could be read from a model's output; ``reason`` says why."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"cannot extract JSON from the model output: {reason}")


_JSON_START = re.compile(r"[{\[]")


def try_extract_json(text: str) -> tuple[dict | list | None, str | None]:
    """(value, None) for the first JSON object or array in ``text``, else (None, reason).

    Every '{' and '[' is tried in order and the first that decodes wins, so prose before and after
    the JSON is ignored (and an array is taken only when no object starts before it). A candidate
    that runs into the end of the text (the answer was cut off) or nests too deeply ends the search:
    later '{'s are inside it, and a nested object is not the answer. The reason describes that
    candidate, else the first one, the one the model most likely meant."""
    if not isinstance(text, str):
        raise TypeError(f"extract_json reads a model's output text, got {type(text).__name__}")
    decoder = json.JSONDecoder()
    reason = None
    for match in _JSON_START.finditer(text):
        start = match.start()
        try:
            return decoder.raw_decode(text, start)[0], None
        except json.JSONDecodeError as e:
            failure = f"{e.msg}: character {e.pos}"
            # The decoder stopped at the end of the text, or in a string that never closes: the
            # usual sign of generation stopping at max_new_tokens.
            stop = e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string")
            if stop:
                failure += " — the answer may have been cut off; raise max_new_tokens"
        except RecursionError:
            failure, stop = "nested too deeply to decode", True
        if reason is None or stop:
            kind = "an object" if match.group() == "{" else "an array"
            reason = f"{kind} starts at character {start} but is not valid JSON: {failure}"
        if stop:
            break
    return None, reason or "the output holds no JSON object"


def extract_json(text: str) -> dict | list:
    """The first JSON object or array in a model's output (see ``try_extract_json``); raises
    JSONExtractionError with the reason when there is none."""
    value, reason = try_extract_json(text)
    if reason is not None:
        raise JSONExtractionError(reason)
    return value


# --------------------------------------------------------------------------- chat


def _check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TemplateError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got "
                            f"{messages!r:.80}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise TemplateError(f"messages[{i}] must be a dict with 'role' and 'content', got {message!r:.80}")
        if message["role"] not in ROLES:
            raise TemplateError(f"messages[{i}] has unknown role {message['role']!r}; valid roles: {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise TemplateError(f"messages[{i}] ({message['role']}): content must be a string, got "
                                f"{type(message['content']).__name__}")


def _special_text(tokenizer, name: str) -> str:
    """The text of the tokenizer's BOS / EOS token ("bos_token" / "eos_token"), "" without one: the
    attribute of that name (transformers tokenizers, HFTokenizer), else for EOS a jaxllm
    tokenizer's eos_id decoded (a char tokenizer's "\\x03", GPT-2's "<|endoftext|>")."""
    token = getattr(tokenizer, name, None)
    if isinstance(token, str):
        return token
    if name == "eos_token" and isinstance(tokenizer, Tokenizer) and tokenizer.eos_id is not None:
        return tokenizer.decode([tokenizer.eos_id])
    return ""


def _raise_exception(message):
    raise TemplateError(f"the chat template refused the conversation: {message}")


@functools.lru_cache(maxsize=16)
def _compile_chat_template(source: str):
    # As transformers renders chat templates: sandboxed (no attribute access to Python internals,
    # no mutation of the messages), and block tags swallow their own line break and indentation.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"the chat template is not valid Jinja: {e.message} (template line {e.lineno})") from None


def apply_chat_template(messages: Sequence[Mapping[str, str]], tokenizer=None, *,
                        add_generation_prompt: bool = True, chat_template: str | None = None) -> str:
    """A conversation as prompt text.

    ``messages``: ``{"role": "system" | "user" | "assistant", "content": str}`` dicts. The template
    is ``chat_template`` if given, else ``tokenizer.chat_template`` (a transformers tokenizer's, or
    ``HFTokenizer``'s), else jaxllm's default below.

    A Jinja template is rendered in a sandbox as transformers renders it, with the variables
    ``messages``, ``add_generation_prompt``, ``bos_token`` and ``eos_token`` (the tokenizer's, "" without
    one) and a ``raise_exception(message)`` function, which raises TemplateError.

    The default is the chat format jaxllm's SFT trains on (``jaxllm.data.instruct``)::

        <|system|>\\n{system}\\n<|user|>\\n{user}\\n<|assistant|>\\n{reply}<EOS>

    with the tokenizer's EOS text after each assistant reply (none without a tokenizer) and, when
    ``add_generation_prompt``, ``<|assistant|>\\n`` at the end for the model to answer after.

    The EOS in the returned text is text: encode it with ``encode(text, allow_special=True)`` so it
    becomes the EOS id. SFT tokenizes each span of the template on its own; for ids exactly as in
    training, encode ``chat_spans(messages)`` with ``jaxllm.data.instruct.encode_spans``.
    """
    _check_messages(messages)
    if chat_template is None:
        chat_template = getattr(tokenizer, "chat_template", None)
    if chat_template is None:
        eos = _special_text(tokenizer, "eos_token")
        # assistant replies are chat_spans' trainable spans, the ones SFT follows with EOS
        text = "".join(span + eos if is_reply else span for span, is_reply in chat_spans(list(messages)))
        return text + ASSISTANT_TAG if add_generation_prompt else text
    if not isinstance(chat_template, str):
        raise TemplateError(f"chat_template must be a Jinja template string, got {type(chat_template).__name__}")
    try:
        return _compile_chat_template(chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=_special_text(tokenizer, "bos_token"), eos_token=_special_text(tokenizer, "eos_token"))
    except jinja2.exceptions.SecurityError as e:
        raise TemplateError(f"the chat template tried an operation the sandbox forbids ({e}); a chat "
                            f"template may only read the messages and the variables it is given") from e
    except jinja2.TemplateError as e:
        raise TemplateError(f"the chat template failed to render: {e}") from e
