"""A tool-using agent in the ReAct style (Yao et al., 2022): the model thinks, picks a tool, reads
what it returns, and repeats until it can give the final answer.

The prompt (``LLMAgent.prompt``) lists the tools and the format, then the question::

    Answer the question. You can use these tools:
    calculator: ...
    search: ...

    Use this format:
    Thought: what to do next
    Action: the tool to use, one of [calculator, search]
    Action Input: the input to the tool
    Observation: what the tool returned
    ... (Thought, Action, Action Input and Observation may repeat)
    Thought: I know the final answer
    Final Answer: the answer

    Question: {task}
    Thought:

Each step the model continues the transcript until it writes "Observation:" (the stop string); the
agent reads its "Action:" and "Action Input:" lines, runs the tool and appends
"Observation: {result}\\nThought:". A tool that raises, a tool that returns something other than a
string, an unknown tool and output in neither form become observations the model sees (so it can
correct itself); "Final Answer:" ends the run. After ``max_steps`` model calls, or when the
transcript no longer fits the model's context, the run stops; the result carries the whole trace
and the reason.

Built-in tools (``Calculator``, ``Search``) never run code, touch files or reach the network: the
calculator walks the parsed ``ast`` of the input and evaluates numbers and + - * / ** and
parentheses only, with limits on the exponent and on the size of every result.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import operator
import re
from typing import Callable, Sequence

from jaxllm.apps.llm import complete, token_budget

STOP = ("Observation:",)
FINAL = "Final Answer:"


class ToolError(ValueError):
    """A tool refused its input; the message says why (the agent shows it to the model)."""


@dataclasses.dataclass(frozen=True)
class Tool:
    """A tool the agent can call: `run(text) -> str`."""

    name: str
    description: str
    func: Callable[[str], str]

    def run(self, text: str) -> str:
        return self.func(text)


# ----------------------------------------------------------------------------- calculator

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_SYMBOL = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**"}


class Calculator:
    """Arithmetic on numbers with + - * / ** and parentheses, evaluated from the parsed `ast`.

    Refused (a ToolError naming what): names, attribute access, calls, subscripts, any other
    operator or syntax; an exponent above `max_exponent` in absolute value; a result (at any step)
    with more than `max_digits` digits; division by zero; input over `max_chars` characters."""

    name = "calculator"
    description = "evaluates arithmetic with numbers, + - * / ** and parentheses, e.g. 12 * (3 + 4)"

    def __init__(self, *, max_exponent: int = 100, max_digits: int = 100, max_chars: int = 256):
        self.max_exponent, self.max_digits, self.max_chars = max_exponent, max_digits, max_chars

    def run(self, text: str) -> str:
        return self.format(self.evaluate(text))

    @staticmethod
    def format(value) -> str:
        if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return str(value) if isinstance(value, int) else format(value, ".12g")

    def evaluate(self, text: str):
        if not isinstance(text, str):
            raise ToolError(f"the calculator takes text, got {type(text).__name__}")
        text = text.strip().rstrip("=").strip().replace("×", "*").replace("÷", "/").replace("^", "**")
        if not text:
            raise ToolError("the expression is empty; write arithmetic such as 12 * (3 + 4)")
        if len(text) > self.max_chars:
            raise ToolError(f"the expression is {len(text)} characters; at most {self.max_chars} are evaluated")
        try:
            tree = ast.parse(text, mode="eval")
        except SyntaxError as e:
            raise ToolError(f"{text!r} is not arithmetic ({e.msg}); write numbers, + - * / ** and parentheses") \
                from None
        return self._eval(tree.body)

    def _check(self, value):
        if isinstance(value, float) and not math.isfinite(value):
            raise ToolError("the result is not a finite number")
        if abs(value) >= 10 ** self.max_digits:
            raise ToolError(f"a result has more than {self.max_digits} digits; the calculator refuses it")
        return value

    def _eval(self, node):
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise ToolError(f"{node.value!r} is not a number; only numbers are allowed")
            return self._check(node.value)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](self._eval(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = self._eval(node.left), self._eval(node.right)
            if isinstance(node.op, ast.Pow):
                if abs(right) > self.max_exponent:
                    raise ToolError(f"the exponent {right} is above the limit of {self.max_exponent}")
                if abs(left) > 1 and right > 0 and right * math.log10(abs(left)) > self.max_digits:
                    raise ToolError(f"{left} ** {right} has more than {self.max_digits} digits; the calculator "
                                    f"refuses it")
                if left == 0 and right < 0:
                    raise ToolError("0 cannot be raised to a negative power")
            if isinstance(node.op, ast.Div) and right == 0:
                raise ToolError("division by zero")
            try:
                value = _BINARY[type(node.op)](left, right)
            except OverflowError:
                raise ToolError(f"the result of {_SYMBOL[type(node.op)]} overflows") from None
            if isinstance(value, complex):
                raise ToolError("the result is not a real number (a negative number to a fractional power)")
            return self._check(value)
        what = {ast.Name: "a name", ast.Attribute: "attribute access", ast.Call: "a function call",
                ast.Subscript: "a subscript"}.get(type(node))
        if what is None:
            op = getattr(node, "op", None)
            what = f"the operator {type(op).__name__}" if op is not None else f"{type(node).__name__} syntax"
        raise ToolError(f"{what} is not allowed; the calculator takes only numbers, + - * / ** and parentheses")


class Search:
    """Search a knowledge base through a retriever (jaxllm.apps.retrieval): the top `k` texts."""

    name = "search"
    description = "searches the knowledge base and returns the most relevant passages"

    def __init__(self, retriever, k: int = 3):
        if not hasattr(retriever, "retrieve"):
            raise TypeError(f"Search needs a retriever with retrieve(query, k), got {type(retriever).__name__}")
        self.retriever, self.k = retriever, k

    def run(self, text: str) -> str:
        hits = self.retriever.retrieve(text, self.k)
        return " ".join(f"[{i}] {h.text}" for i, h in enumerate(hits, start=1)) or "no results"


# ----------------------------------------------------------------------------- the agent

@dataclasses.dataclass
class AgentStep:
    output: str                     # what the model wrote this step (cut before "Observation:")
    thought: str | None = None
    action: str | None = None
    action_input: str | None = None
    observation: str | None = None  # what the agent answered (tool result or an error message)


@dataclasses.dataclass
class AgentResult:
    answer: str | None              # the final answer; None when the run stopped without one
    stop_reason: str                # "final_answer", "max_steps" or "context_full"
    steps: list[AgentStep]
    transcript: str                 # the prompt and everything written after it


_FIELD = re.compile(r"^\s*(Thought|Action Input|Action|Final Answer)\s*:[ \t]*(.*)$", re.MULTILINE)


def parse_step(output: str) -> AgentStep:
    """The thought, action and action input (or final answer, as action None) of one model output.
    The first line is the thought (the prompt ends with "Thought:")."""
    step = AgentStep(output)
    first, _, _ = output.partition("\n")
    if not _FIELD.match(first):
        step.thought = first.strip() or None
    for m in _FIELD.finditer(output):
        field, value = m.group(1), m.group(2).strip()
        if field == "Thought" and step.thought is None:
            step.thought = value
        elif field == "Action" and step.action is None:
            step.action = value
        elif field == "Action Input" and step.action_input is None:
            step.action_input = value
    return step


def final_answer(output: str) -> str | None:
    at = output.find(FINAL)
    return None if at < 0 else output[at + len(FINAL):].strip().split("\n", 1)[0].strip()


class LLMAgent:
    """Runs tasks with an LLM and tools (see the module's docstring)."""

    def __init__(self, llm, tools: Sequence, *, max_new_tokens: int = 64):
        self.llm, self.max_new_tokens = llm, max_new_tokens
        self.tools: dict[str, object] = {}
        for i, tool in enumerate(tools):
            name = getattr(tool, "name", None)
            if not (isinstance(name, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", name)):
                raise ValueError(f"tools[{i}] has name {name!r}; a tool needs a one-word name (letters, digits, _ -)")
            if not isinstance(getattr(tool, "description", None), str) or not callable(getattr(tool, "run", None)):
                raise ValueError(f"tool {name!r} needs a description (str) and run(text) -> str")
            if name in self.tools:
                raise ValueError(f"two tools are named {name!r}; tool names must be unique")
            self.tools[name] = tool
        if not self.tools:
            raise ValueError("the agent needs at least one tool")

    def prompt(self, task: str) -> str:
        tools = "".join(f"{n}: {t.description}\n" for n, t in self.tools.items())
        return ("Answer the question. You can use these tools:\n" + tools +
                "\nUse this format:\nThought: what to do next\n"
                f"Action: the tool to use, one of [{', '.join(self.tools)}]\n"
                "Action Input: the input to the tool\nObservation: what the tool returned\n"
                "... (Thought, Action, Action Input and Observation may repeat)\n"
                "Thought: I know the final answer\nFinal Answer: the answer\n\n"
                f"Question: {task}\nThought:")

    def observe(self, step: AgentStep) -> str:
        """What the agent answers to a step that has no final answer."""
        if step.action is None or step.action_input is None:
            return ("Invalid format: write \"Action: <tool>\" and \"Action Input: <input>\", or "
                    "\"Final Answer: <answer>\"")
        tool = self.tools.get(step.action)
        if tool is None:
            return f"Error: unknown tool {step.action!r}; the tools are: {', '.join(self.tools)}"
        try:
            result = tool.run(step.action_input)
        except Exception as e:  # a tool's failure is something the model should see, not a crash
            return f"Error: {step.action} failed: {type(e).__name__}: {e}"
        if not isinstance(result, str):
            return f"Error: {step.action} returned a {type(result).__name__}, not text"
        return result

    def run(self, task: str, max_steps: int = 5) -> AgentResult:
        return self.run_batch([task], max_steps)[0]

    def run_batch(self, tasks: Sequence[str], max_steps: int = 5) -> list[AgentResult]:
        """Run every task; each step is ONE batched model call over the tasks still running."""
        if isinstance(tasks, str):
            raise ValueError("tasks must be a list of strings; use run() for one task")
        if not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps must be an integer >= 1, got {max_steps!r}")
        for i, t in enumerate(tasks):
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"task {i} is empty ({t!r}); give the question as text")
        results = [AgentResult(None, "max_steps", [], self.prompt(t)) for t in tasks]
        budget = token_budget(self.llm)
        running = list(range(len(tasks)))
        for _ in range(max_steps):
            if budget is not None:
                count, size = budget
                full = [i for i in running if count(results[i].transcript) + self.max_new_tokens > size]
                for i in full:
                    results[i].stop_reason = "context_full"
                running = [i for i in running if i not in full]
            if not running:
                break
            outputs = complete(self.llm, [results[i].transcript for i in running], stop=STOP,
                               max_new_tokens=self.max_new_tokens)
            still = []
            for i, out in zip(running, outputs):
                res = results[i]
                answer = final_answer(out)
                step = parse_step(out.split(FINAL, 1)[0] if answer is not None else out)
                res.steps.append(step)
                if answer is not None:
                    res.transcript += out
                    res.answer, res.stop_reason = answer, "final_answer"
                    continue
                step.observation = self.observe(step)
                res.transcript += out.rstrip("\n") + f"\nObservation: {step.observation}\nThought:"
                still.append(i)
            running = still
        return results
