"""RAG (prompt layout, drop-lowest-first), the ReAct agent with a scripted model, the calculator,
and the `jaxllm rag` commands."""

import json
import re

import pytest
from flax import nnx

from helpers import run_main
from jaxllm.apps import (LLM, BM25Retriever, Calculator, Hit, LLMAgent, RAGSystem, RetrievalError, Search, Tool,
                         ToolError, build_rag_prompt)
from jaxllm.config import GPTConfig
from jaxllm.interop import to_hf
from jaxllm.model import GPT
from jaxllm.sampling import generate_text
from jaxllm.tokenizer import build_tokenizer

DOCS = ["The capital of Vorland is Kessa.", "The currency of Vorland is the drel.",
        "The capital of Astra is Miro.", "Bread is baked from flour and water."]


# ----------------------------------------------------------------------------- RAG

def test_rag_prompt_layout_is_exactly_the_documented_one():
    assert build_rag_prompt("Where?", ["first doc", "second doc"]) == (
        "Answer the question based on the context below.\n\nContext:\nDocument 1: first doc\n"
        "Document 2: second doc\n\nQuestion: Where?\nAnswer:")
    assert build_rag_prompt("Where?", []) == \
        "Answer the question based on the context below.\n\nContext:\n\nQuestion: Where?\nAnswer:"


class WordLLM:
    """A scripted model: answers with the first word after "is" in Document 1, counts words as tokens."""

    def __init__(self, context_size):
        self.context_size, self.prompts = context_size, []

    def count_tokens(self, text):
        return len(text.split())

    def __call__(self, prompt):
        self.prompts.append(prompt)
        doc1 = [line for line in prompt.splitlines() if line.startswith("Document 1:")]
        return (" " + doc1[0].split(" is ")[1].split()[-1].rstrip(".") if doc1 else " unknown") + "\nmore"


def test_rag_answers_from_the_retrieved_documents_best_first():
    llm = WordLLM(10_000)
    rag = RAGSystem(llm, "bm25", top_k=3, max_new_tokens=4)
    result = rag.answer_question("What is the capital of Astra?", DOCS)
    assert result.answer == "Miro" and result.dropped == 0
    assert result.documents[0].text == DOCS[2]
    scores = [h.score for h in result.documents]
    assert scores == sorted(scores, reverse=True)
    assert llm.prompts[-1] == build_rag_prompt("What is the capital of Astra?", [h.text for h in result.documents])
    with pytest.raises(RetrievalError, match="question is empty"):
        rag.answer_question("   ", DOCS)
    with pytest.raises(RetrievalError, match="knowledge base is empty"):
        RAGSystem(llm, "bm25").answer_question("What?", [])


def test_documents_that_do_not_fit_are_dropped_lowest_scored_first_and_counted():
    question = "What is the capital of Vorland?"
    hits = [Hit(i, DOCS[i], s) for i, s in ((0, 3.0), (1, 2.0), (3, 1.0))]
    sizes = [len(build_rag_prompt(question, [h.text for h in hits[:n]]).split()) for n in range(4)]
    for keep in range(4):
        llm = WordLLM(sizes[keep] + 4)          # room for exactly `keep` documents and 4 new tokens
        prompt, kept, dropped = RAGSystem(llm, "bm25", top_k=3, max_new_tokens=4).fit_prompt(question, hits)
        assert kept == hits[:keep] and dropped == 3 - keep
        assert prompt == build_rag_prompt(question, [h.text for h in hits[:keep]])
    with pytest.raises(RetrievalError, match="does not fit the model's context"):
        RAGSystem(WordLLM(sizes[0] + 3), "bm25", max_new_tokens=4).fit_prompt(question, hits)
    rag = RAGSystem(WordLLM(sizes[1] + 4), BM25Retriever(DOCS), top_k=3, max_new_tokens=4)
    with pytest.warns(UserWarning, match="2 retrieved document"):
        result = rag.answer_question(question)
    assert result.dropped == 2 and result.answer == "Kessa"


def test_a_given_retriever_refuses_another_knowledge_base():
    rag = RAGSystem(WordLLM(1000), BM25Retriever(DOCS))
    assert rag.answer_question("capital of Vorland?", DOCS).answer == "Kessa"
    with pytest.raises(RetrievalError, match="pass knowledge_base only when"):
        rag.answer_question("capital of Vorland?", DOCS[:2])


# ----------------------------------------------------------------------------- calculator

@pytest.mark.parametrize("expr,value", [("48213 * 5921", "285469173"), ("2 ** 10", "1024"), ("7 / 2", "3.5"),
                                        ("6/3", "2"), ("-(3 + 4) * 2", "-14"), ("2 ** -2", "0.25"),
                                        ("((1+2)*(3+4))**2", "441"), (" 10 - 2.5 = ", "7.5")])
def test_calculator_evaluates_arithmetic(expr, value):
    assert Calculator().run(expr) == value


@pytest.mark.parametrize("expr,match", [
    ("x + 1", "a name is not allowed"), ("__import__('os').system('true')", "a function call is not allowed"),
    ("(1).__class__", "attribute access is not allowed"), ("abs(-1)", "a function call"),
    ("[1, 2][0]", "a subscript"), ("2 ** 1000", "exponent 1000 is above the limit"),
    ("99 ** 99", "more than 100 digits"), ("10 ** 60 * 10 ** 60", "more than 100 digits"), ("1 / 0", "division by zero"),
    ("True + 1", "not a number"), ("'a' * 3", "not a number"), ("1 if 2 else 3", "IfExp syntax"),
    ("3 % 2", "the operator Mod"), ("lambda: 1", "Lambda syntax"), ("1 +", "is not arithmetic"), ("", "empty"),
    ("1+" * 200 + "1", "at most 256"),
])
def test_calculator_refuses_everything_but_numbers_and_five_operators(expr, match, monkeypatch):
    ran = []
    monkeypatch.setattr("builtins.eval", lambda *a: ran.append(a))
    with pytest.raises(ToolError, match=match):
        Calculator().run(expr)
    assert not ran


# ----------------------------------------------------------------------------- agent

class Scripted:
    """A fake model that answers each call with the next scripted text and records the prompts."""

    def __init__(self, *outputs):
        self.outputs, self.prompts = list(outputs), []

    def __call__(self, prompt):
        self.prompts.append(prompt)
        return self.outputs.pop(0)


def test_agent_finishes_in_one_step():
    llm = Scripted(" It is known.\nFinal Answer: 42\n")
    result = LLMAgent(llm, [Calculator()]).run("What is six times seven?")
    assert (result.answer, result.stop_reason, len(result.steps)) == ("42", "final_answer", 1)
    assert llm.prompts[0].endswith("Question: What is six times seven?\nThought:")
    assert "calculator: evaluates arithmetic" in llm.prompts[0] and "one of [calculator]" in llm.prompts[0]


def test_agent_calls_a_tool_and_sees_its_observation():
    llm = Scripted(" I multiply.\nAction: calculator\nAction Input: 12 * 34\nObservation: 999 (made up)",
                   " Done.\nFinal Answer: 408")
    result = LLMAgent(llm, [Calculator()]).run("What is 12 * 34?")
    assert result.answer == "408" and result.stop_reason == "final_answer"
    step = result.steps[0]
    assert (step.thought, step.action, step.action_input, step.observation) == \
        ("I multiply.", "calculator", "12 * 34", "408")
    # the model's own "Observation:" is cut off; the tool's result is what it sees next
    assert llm.prompts[1] == llm.prompts[0] + (" I multiply.\nAction: calculator\nAction Input: 12 * 34\n"
                                               "Observation: 408\nThought:")


def test_unknown_tools_malformed_output_failing_tools_and_non_text_become_observations():
    def boom(text):
        raise RuntimeError("disk on fire")

    tools = [Calculator(), Tool("boom", "always fails", boom), Tool("number", "returns an int", lambda t: 7)]
    llm = Scripted("\nAction: browser\nAction Input: x", " no idea what to write",
                   "\nAction: boom\nAction Input: x", "\nAction: number\nAction Input: x",
                   "\nAction: calculator\nAction Input: os.system('ls')", "\nFinal Answer: gave up")
    result = LLMAgent(llm, tools).run("Do things.", max_steps=6)
    obs = [s.observation for s in result.steps[:-1]]
    assert obs[0] == "Error: unknown tool 'browser'; the tools are: calculator, boom, number"
    assert obs[1].startswith("Invalid format")
    assert obs[2] == "Error: boom failed: RuntimeError: disk on fire"
    assert obs[3] == "Error: number returned a int, not text"
    assert obs[4].startswith("Error: calculator failed: ToolError: a function call is not allowed")
    assert result.answer == "gave up" and all(f"Observation: {o}\nThought:" in result.transcript for o in obs)


def test_agent_stops_after_max_steps_with_its_trace():
    llm = Scripted(*["\nAction: calculator\nAction Input: 1 + 1"] * 3)
    result = LLMAgent(llm, [Calculator()]).run("Loop.", max_steps=3)
    assert (result.answer, result.stop_reason, len(result.steps)) == (None, "max_steps", 3)
    assert [s.observation for s in result.steps] == ["2", "2", "2"] and not llm.outputs


def test_agent_bad_setup_is_refused():
    with pytest.raises(ValueError, match="two tools are named 'calculator'"):
        LLMAgent(Scripted(), [Calculator(), Calculator()])
    with pytest.raises(ValueError, match="one-word name"):
        LLMAgent(Scripted(), [Tool("web search", "x", str)])
    with pytest.raises(ValueError, match="task 0 is empty"):
        LLMAgent(Scripted(), [Calculator()]).run("  ")


def test_search_tool_returns_the_top_texts():
    out = Search(BM25Retriever(DOCS), k=2).run("capital of Astra")
    assert out.startswith("[1] The capital of Astra is Miro.") and "[2] " in out


# ----------------------------------------------------------------------------- a real model

@pytest.fixture(scope="module")
def tiny_llm_dir(tmp_path_factory):
    text = " ".join(DOCS) + " Answer the question based on the context below. Context: Document 1: Question: Answer:"
    tok = build_tokenizer("bpe", text=text * 4, vocab_size=300)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=2, n_embd=32), rngs=nnx.Rngs(0))
    out = tmp_path_factory.mktemp("llm") / "hf"
    to_hf(model, None, out, tokenizer=tok)
    return out, model, tok


def test_llm_is_generate_text_greedy_and_knows_its_context(tiny_llm_dir):
    path, model, tok = tiny_llm_dir
    llm = LLM.load(path, max_new_tokens=6)
    prompts = ["The capital of", "Bread is"]
    assert llm.generate_batch(prompts, stop=["."]) == generate_text(model, tok, prompts, 6, temperature=0.0,
                                                                    stop=["."])
    assert llm.context_size == 128 and llm.count_tokens("Bread is") == len(tok.encode("Bread is"))


def test_rag_commands_index_then_ask(tiny_llm_dir, tmp_path):
    (tmp_path / "kb").mkdir()
    (tmp_path / "kb" / "a.txt").write_text(DOCS[0], encoding="utf-8")
    (tmp_path / "kb" / "more.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in DOCS[1:]) + "\n")
    rc, out, err = run_main(["rag", "index", "--docs", tmp_path / "kb", "--out", tmp_path / "index"])
    assert rc == 0, err
    assert "indexed 4 documents as 4 chunks" in out
    rc, out, err = run_main(["rag", "ask", "--index", tmp_path / "index", "--question", "What is Astra's capital?"])
    assert rc == 0, err
    assert out.splitlines()[0].startswith("Document 1 (score") and "The capital of Astra is Miro." in out
    rc, out, err = run_main(["rag", "ask", "--index", tmp_path / "index", "--question", "What is Astra's capital?",
                             "--model", tiny_llm_dir[0], "--max-new-tokens", "4"])
    assert rc == 0, err
    assert out.startswith("Answer: ") and "Document 1 (score" in out
    shown = sum(line.startswith("Document ") for line in out.splitlines())
    dropped = int(re.search(r"\((\d+) retrieved document", out).group(1)) if "dropped" in out else 0
    assert shown + dropped == 3 and shown >= 1      # a 128-token model: what did not fit is reported
    # bad input: an empty question, a folder that is not an index, a malformed JSONL line
    rc, _, err = run_main(["rag", "ask", "--index", tmp_path / "index", "--question", " "])
    assert rc == 2 and "question is empty" in err
    rc, _, err = run_main(["rag", "ask", "--index", tmp_path / "kb", "--question", "x"])
    assert rc == 2 and "holds no retrieval index" in err
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    rc, _, err = run_main(["rag", "index", "--docs", tmp_path / "bad.jsonl", "--out", tmp_path / "index"])
    assert rc == 2 and "bad.jsonl:2" in err and '"text" field' in err
    rc, _, err = run_main(["rag", "index", "--docs", tmp_path / "kb", "--out", tmp_path / "kb"])
    assert rc == 2 and "is not a retrieval index" in err
    assert (tmp_path / "index" / "index.json").is_file()     # the failed runs left the index intact
