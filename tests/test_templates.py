"""Prompt templates, instruction helpers, JSON extraction and chat rendering (jaxllm.prompting.templates)."""

import json

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers

from jaxllm.data.instruct import chat_spans, encode_spans, sft_char_tokenizer
from jaxllm.prompting import templates
from jaxllm.prompting.templates import (JSONExtractionError, PromptTemplate, TemplateError, add_constraints,
                                        add_output_format, add_role, apply_chat_template, build_prompt,
                                        extract_json, get_template, list_templates, register_template,
                                        render_template, try_extract_json)
from jaxllm.tokenizer import HFTokenizer, load_tokenizer


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, so tests that register templates leave the global one alone."""
    monkeypatch.setattr(templates, "_REGISTRY", dict(templates._REGISTRY))
    return templates._REGISTRY


# --------------------------------------------------------------------------- built-in templates


def test_builtin_templates_render_their_golden_strings():
    assert list_templates() == ["classification", "cot_reasoning", "qa", "summarization", "translation"]
    assert render_template("translation", source_lang="English", target_lang="French", text="Good morning.") == (
        "Translate the following text from English to French.\n\nText: Good morning.\nTranslation:")
    assert render_template("summarization", num_sentences=3, text="A long story.") == (
        "Summarize the following text in 3 sentences.\n\nText: A long story.\nSummary:")
    assert render_template("summarization", num_sentences=1, text="A long story.") == (
        "Summarize the following text in 1 sentence.\n\nText: A long story.\nSummary:")
    assert render_template("qa", context="Paris is the capital of France.", question="What is France's capital?") == (
        "Answer the question using only the context below.\n\nContext: Paris is the capital of France.\n\n"
        "Question: What is France's capital?\nAnswer:")
    assert render_template("cot_reasoning", question="What is 17 * 3?") == (
        "Question: What is 17 * 3?\nLet's think step by step:")


def test_classification_renders_pairs_and_dicts_and_zero_examples():
    examples = [("I loved it.", "Positive"), ["Awful service.", "Negative"],
                {"input": "It opens at nine.", "output": "Neutral"}]
    assert render_template("classification", examples=examples, text="Best day ever!") == (
        "Classify the sentiment of the text as Positive, Negative or Neutral.\n\n"
        "Text: I loved it.\nSentiment: Positive\n\n"
        "Text: Awful service.\nSentiment: Negative\n\n"
        "Text: It opens at nine.\nSentiment: Neutral\n\n"
        "Text: Best day ever!\nSentiment:")
    assert render_template("classification", examples=[], text="Fine.") == (
        "Classify the sentiment of the text as Positive, Negative or Neutral.\n\nText: Fine.\nSentiment:")


@pytest.mark.parametrize("examples, message", [
    ([("ok", "Positive"), ("meh", "Happy")], "examples\\[1\\]: label 'Happy' is not one of Positive, Negative, Neutral"),
    ([("only text",)], "examples\\[0\\] is .*not an \\(input, output\\) pair"),
    ([("a", "Positive"), ("b", "Negative", "extra")], "examples\\[1\\] is"),
    ([{"input": "no output"}], "examples\\[0\\] is a dict without 'input' and 'output'"),
    ([(3, "Positive")], "examples\\[0\\] is .*not an \\(input, output\\) pair of strings"),
    ("Text: x\nSentiment: Positive", "must be a list of \\(input, output\\) pairs, got str"),
])
def test_classification_bad_examples_name_the_template_field_and_example(examples, message):
    with pytest.raises(TemplateError, match=message) as err:
        render_template("classification", examples=examples, text="x")
    assert "template 'classification', field 'examples'" in str(err.value)


@pytest.mark.parametrize("n", [0, -2, 2.0, "3", True])
def test_summarization_needs_a_positive_int(n):
    with pytest.raises(TemplateError, match="template 'summarization', field 'num_sentences': expected a positive int"):
        render_template("summarization", num_sentences=n, text="x")


def test_missing_and_unknown_fields_name_the_template_the_fields_and_what_it_takes():
    with pytest.raises(TemplateError) as err:
        render_template("translation", source_lang="English", text="Hi")
    assert str(err.value) == ("template 'translation': missing field(s) target_lang; "
                              "it takes: source_lang, target_lang, text")
    with pytest.raises(TemplateError) as err:
        render_template("qa", context="c", question="q", answer="a", hint="h")
    assert str(err.value) == "template 'qa': unknown field(s) answer, hint; it takes: context, question"
    with pytest.raises(TemplateError) as err:
        render_template("cot_reasoning", q="typo")
    assert str(err.value) == ("template 'cot_reasoning': missing field(s) question; unknown field(s) q; "
                              "it takes: question")
    assert isinstance(err.value, ValueError)


# --------------------------------------------------------------------------- PromptTemplate and registry


def test_template_fields_formatters_and_literal_braces():
    t = PromptTemplate("greet", "{{literal}} Hello {name}, {name}! Items: {items}",
                       formatters={"items": lambda xs: ", ".join(xs)})
    assert t.fields == ("name", "items")
    assert t.render(name="Ada", items=["a", "b"]) == "{literal} Hello Ada, Ada! Items: a, b"
    assert PromptTemplate("plain", "no fields").render() == "no fields"
    # a field may be called "name" or "self": render's own parameters are positional-only
    assert PromptTemplate("n", "{name}/{self}").render(name="x", self="y") == "x/y"
    with pytest.raises(TypeError):
        t.formatters["name"] = str  # read-only


@pytest.mark.parametrize("text, formatters, message", [
    ("Hello {}", {}, "template 'bad': placeholder {} is not a plain field name"),
    ("Hello {0}", {}, "placeholder {0} is not a plain field name"),
    ("Hello {user.name}", {}, "placeholder {user.name} is not a plain field name"),
    ("Hello {name}", {"nmae": str},
     "template 'bad': formatters for nmae, which the template does not use; its fields: name"),
])
def test_malformed_templates_are_refused_when_built(text, formatters, message):
    with pytest.raises(TemplateError, match=message.replace("{", "\\{").replace("}", "\\}")):
        PromptTemplate("bad", text, formatters=formatters)


def test_register_get_overwrite(registry):
    mine = PromptTemplate("haiku", "Write a haiku about {topic}.", "A haiku.")
    assert register_template(mine) is mine
    assert get_template("haiku") is mine and "haiku" in list_templates()
    assert render_template("haiku", topic="autumn") == "Write a haiku about autumn."

    other = PromptTemplate("haiku", "A haiku on {topic}:")
    with pytest.raises(TemplateError, match="'haiku' is already registered; pass overwrite=True"):
        register_template(other)
    assert get_template("haiku") is mine
    register_template(other, overwrite=True)
    assert render_template("haiku", topic="rain") == "A haiku on rain:"

    with pytest.raises(TemplateError) as err:
        get_template("hiaku")
    assert str(err.value) == ("no template named 'hiaku'; registered templates: "
                              "classification, cot_reasoning, haiku, qa, summarization, translation")
    with pytest.raises(TypeError, match="takes a PromptTemplate, got str"):
        register_template("Write about {topic}")


# --------------------------------------------------------------------------- instructions


def test_build_prompt_golden_string():
    prompt = build_prompt("Extract the people named in the text.", role="a careful annotator",
                          constraints=["Use full names.", "Skip pronouns."],
                          output_format={"people": ["name"], "count": 0})
    assert prompt == (
        "You are a careful annotator.\n\n"
        "Extract the people named in the text.\n\n"
        "Constraints:\n- Use full names.\n- Skip pronouns.\n\n"
        "Respond with JSON only, in this format:\n"
        '{\n  "people": [\n    "name"\n  ],\n  "count": 0\n}')
    assert prompt == add_output_format(add_constraints(add_role("Extract the people named in the text.",
                                                                "a careful annotator"),
                                                       ["Use full names.", "Skip pronouns."]),
                                       {"people": ["name"], "count": 0})


def test_build_prompt_parts_are_optional():
    assert build_prompt("Say hi.") == "Say hi."
    assert build_prompt("Say hi.", constraints=[]) == "Say hi."
    assert build_prompt("Say hi.", output_format='{"greeting": str}') == (
        'Say hi.\n\nRespond with JSON only, in this format:\n{"greeting": str}')
    assert build_prompt("Say hi.", output_format=["a", "b"]).endswith('format:\n[\n  "a",\n  "b"\n]')


@pytest.mark.parametrize("kwargs, message", [
    ({"task": ""}, "task must be a non-empty string"),
    ({"task": "t", "role": ""}, "role must be a non-empty string"),
    ({"task": "t", "role": "  "}, "role must be a non-empty string"),
    ({"task": "t", "constraints": ["ok", ""]}, "constraint 1 must be a non-empty string"),
    ({"task": "t", "constraints": "Be brief."}, "constraints must be a list of strings, got the string"),
    ({"task": "t", "output_format": {}}, "output_format is empty"),
    ({"task": "t", "output_format": {"when": object()}}, "output_format must be JSON-serialisable"),
])
def test_build_prompt_errors(kwargs, message):
    with pytest.raises(TemplateError, match=message):
        build_prompt(**kwargs)


# --------------------------------------------------------------------------- JSON extraction


@pytest.mark.parametrize("text, expected", [
    ('Sure! Here it is: {"name": "Ada", "age": 36}. Anything else?', {"name": "Ada", "age": 36}),
    ('{"a": {"b": [1, {"c": null}]}, "d": true}', {"a": {"b": [1, {"c": None}]}, "d": True}),
    ('Result: {"code": "if (x) { y(); }", "ok": "}{"} done', {"code": "if (x) { y(); }", "ok": "}{"}),
    ("The primes are [2, 3, 5, 7].", [2, 3, 5, 7]),
    ('Note [see below] then {"x": 1}', {"x": 1}),        # '[see' is not JSON; the object after it is
    ('{bad: 1} but then {"good": 2}', {"good": 2}),
    ('```json\n{"k": "v"}\n```', {"k": "v"}),
])
def test_extract_json_finds_the_first_json_value(text, expected):
    assert extract_json(text) == expected
    assert try_extract_json(text) == (expected, None)


def test_extract_json_reasons_for_broken_output():
    value, reason = try_extract_json("I cannot answer that.")
    assert value is None and reason == "the output holds no JSON object"

    truncated = 'Here you go: {"name": "Ada", "age": 36'
    with pytest.raises(JSONExtractionError) as err:
        extract_json(truncated)
    assert err.value.reason == ("an object starts at character 13 but is not valid JSON: Expecting ',' "
                                "delimiter: character 38 — the answer may have been cut off; raise max_new_tokens")
    assert str(err.value).startswith("cannot extract JSON from the model output: an object starts")
    assert isinstance(err.value, ValueError)

    # cut off inside a string
    assert try_extract_json('{"name": "Ad')[1] == (
        "an object starts at character 0 but is not valid JSON: Unterminated string starting at: "
        "character 9 — the answer may have been cut off; raise max_new_tokens")
    # a cut-off object is not answered by an object nested inside it
    assert try_extract_json('{"person": {"name": "Ada"}, "age": ')[0] is None
    assert try_extract_json("[" * 100_000 + "1" + "]" * 100_000)[1] == (
        "an array starts at character 0 but is not valid JSON: nested too deeply to decode")
    # malformed but complete: no cut-off hint
    assert try_extract_json("Answer: {name: 'Ada'}")[1] == (
        "an object starts at character 8 but is not valid JSON: Expecting property name enclosed in "
        "double quotes: character 9")


# --------------------------------------------------------------------------- chat

CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2?"}]

CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_default_chat_is_the_sft_chat_format():
    assert apply_chat_template(CHAT) == (
        "<|system|>\nYou are terse.\n<|user|>\nHi!\n<|assistant|>\nHello.<|user|>\n2+2?\n<|assistant|>\n")
    assert apply_chat_template(CHAT, add_generation_prompt=False) == "".join(t for t, _ in chat_spans(CHAT))
    assert apply_chat_template(tuple(CHAT[:2])) == "<|system|>\nYou are terse.\n<|user|>\nHi!\n<|assistant|>\n"


def test_default_chat_puts_eos_where_sft_does():
    conversation = CHAT + [{"role": "assistant", "content": "4."}]
    tok = sft_char_tokenizer("".join(t for t, _ in chat_spans(conversation)))
    text = apply_chat_template(conversation, tok, add_generation_prompt=False)
    assert text == ("<|system|>\nYou are terse.\n<|user|>\nHi!\n<|assistant|>\nHello.\x03"
                    "<|user|>\n2+2?\n<|assistant|>\n4.\x03")
    # the very ids SFT trains on (a char tokenizer encodes text the same whole or in spans)
    assert tok.encode(text, allow_special=True) == encode_spans(chat_spans(conversation), tok, tok.eos_id)[0]


def _backend():
    vocab = {w: i for i, w in enumerate(["[UNK]", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "hello"])}
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return backend


def test_jinja_chat_template_matches_transformers():
    transformers = pytest.importorskip("transformers", reason="parity with transformers needs the torch extra")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=_backend(), bos_token="<s>", eos_token="</s>",
                                               unk_token="[UNK]")
    tok.chat_template = CHATML + "{% if not add_generation_prompt %}{{ eos_token }}{% endif %}"
    for add in (True, False):
        ours = apply_chat_template(CHAT, tok, add_generation_prompt=add)
        assert ours == tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=add)
    assert ours.startswith("<s><|im_start|>system\nYou are terse.<|im_end|>\n")
    assert ours.endswith("2+2?<|im_end|>\n</s>")


def test_explicit_chat_template_wins_and_hf_tokenizer_supplies_its_own():
    tok = HFTokenizer(backend=_backend(), eos_token="</s>", chat_template="{{ eos_token }}|{{ messages | length }}")
    assert tok.eos_token == "</s>"
    assert apply_chat_template(CHAT, tok) == "</s>|4"
    assert apply_chat_template(CHAT, tok, chat_template="{{ messages[-1].content }}") == "2+2?"
    assert apply_chat_template(CHAT, chat_template="[{{ bos_token }}{{ eos_token }}]") == "[]"


def test_chat_errors_name_the_message_role_and_valid_roles():
    with pytest.raises(TemplateError) as err:
        apply_chat_template([{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}])
    assert str(err.value) == "messages[1] has unknown role 'bot'; valid roles: system, user, assistant"
    with pytest.raises(TemplateError, match=r"messages\[0\] \(user\): content must be a string, got NoneType"):
        apply_chat_template([{"role": "user", "content": None}])
    with pytest.raises(TemplateError, match=r"messages\[0\] must be a dict with 'role' and 'content'"):
        apply_chat_template([{"content": "hi"}])
    with pytest.raises(TemplateError, match="messages must be a non-empty list"):
        apply_chat_template([])
    # checked before any template runs
    with pytest.raises(TemplateError, match="unknown role 'tool'"):
        apply_chat_template([{"role": "tool", "content": "{}"}], chat_template=CHATML)


def test_chat_template_raise_exception_and_syntax_errors():
    strict = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('conversations must start with the user') }}"
              "{% endif %}{{ messages[0]['content'] }}")
    assert apply_chat_template(CHAT[1:], chat_template=strict) == "Hi!"
    with pytest.raises(TemplateError, match="the chat template refused the conversation: conversations must start"):
        apply_chat_template(CHAT, chat_template=strict)
    with pytest.raises(TemplateError, match=r"not valid Jinja: .*\(template line 1\)"):
        apply_chat_template(CHAT, chat_template="{% for m in messages %}")
    with pytest.raises(TemplateError, match="chat_template must be a Jinja template string, got dict"):
        apply_chat_template(CHAT, chat_template={"default": CHATML})


@pytest.mark.parametrize("source", [
    "{{ messages.__class__.__mro__ }}",
    "{{ messages[0].__class__.__init__.__globals__ }}",
    "{{ messages.append({'role': 'user', 'content': 'injected'}) }}",   # the messages are read-only
    "{{ messages[0].update(role='system') }}",
])
def test_chat_templates_run_in_a_sandbox(source):
    with pytest.raises(TemplateError, match="the sandbox forbids") as err:
        apply_chat_template(CHAT, chat_template=source)
    assert type(err.value.__cause__).__name__ == "SecurityError"
    assert CHAT[0] == {"role": "system", "content": "You are terse."} and len(CHAT) == 4


# --------------------------------------------------------------------------- HFTokenizer.chat_template


def test_hf_tokenizer_chat_template_survives_save_and_load(tmp_path):
    tok = HFTokenizer(backend=_backend(), eos_token="</s>", chat_template=CHATML)
    tok.save(tmp_path / "tok")
    assert (tmp_path / "tok" / "chat_template.jinja").read_text(encoding="utf-8") == CHATML
    assert not [p for p in (tmp_path / "tok").iterdir() if p.name.endswith(".tmp")]
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.chat_template == CHATML
    assert apply_chat_template(CHAT, loaded) == apply_chat_template(CHAT, tok)
    assert HFTokenizer(tmp_path / "tok" / "tokenizer.json").chat_template == CHATML

    # saving a tokenizer without a template over that directory removes the stale one
    HFTokenizer(backend=_backend(), eos_token="</s>").save(tmp_path / "tok")
    assert load_tokenizer(tmp_path / "tok").chat_template is None
    assert not (tmp_path / "tok" / "chat_template.jinja").exists()


def test_hf_tokenizer_reads_the_template_from_a_transformers_directory(tmp_path):
    # older transformers kept the template in tokenizer_config.json, without jaxllm's "kind"
    (tmp_path / "tokenizer.json").write_text(_backend().to_str(), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "chat_template": CHATML}))
    loaded = load_tokenizer(tmp_path)
    assert (loaded.chat_template, loaded.eos_token) == (CHATML, "</s>")
    # several named templates: the "default" one
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "tools"}, {"name": "default", "template": CHATML}]}))
    assert load_tokenizer(tmp_path).chat_template == CHATML

    transformers = pytest.importorskip("transformers", reason="reading a save_pretrained folder needs transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=_backend(), bos_token="<s>", eos_token="</s>")
    hf.chat_template = CHATML
    hf.save_pretrained(tmp_path / "saved")
    loaded = load_tokenizer(tmp_path / "saved")
    assert (loaded.chat_template, loaded.eos_token) == (CHATML, "</s>")
    # our HFTokenizer has no bos_token: the only difference from transformers is the leading "<s>"
    assert "<s>" + apply_chat_template(CHAT, loaded) == hf.apply_chat_template(CHAT, tokenize=False,
                                                                                add_generation_prompt=True)
