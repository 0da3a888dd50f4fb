"""jaxllm's modules import one way: no cycles (deferred imports included) and no import from a lower
floor to a higher one (config < model < peft < interop < training < runs < stages < cli)."""

import ast
import pathlib

import jaxllm

PACKAGE = pathlib.Path(jaxllm.__file__).parent

# Floors from the bottom; a module may import its own floor and the ones below it.
FLOORS = [
    {"config", "configfile", "fileio", "losses", "tokenizer", "logits_processors", "parallel"},
    {"model", "heads", "data", "sampling", "embeddings"},
    {"peft"},
    {"interop"},
    {"training"},
    {"runs"},
    {"stages", "alignment", "prompting", "apps"},
    {"cli"},
]


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
    """module -> the jaxllm modules it imports anywhere in its body (deferred imports too)."""
    edges = {m: set() for m in modules}
    for m, f in modules.items():
        is_pkg = f.name == "__init__.py"
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = m.split(".") if is_pkg else m.split(".")[:-1]
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != m and t != "jaxllm" and not m.startswith(t + "."):
                    edges[m].add(t)
    return edges


def _floor(module: str) -> int | None:
    room = module.split(".")[1] if module.count(".") else None
    for i, rooms in enumerate(FLOORS):
        if room in rooms:
            return i
    return None


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_package_import_graph_has_no_cycle():
    edges = _imports(_modules())
    assert sum(map(len, edges.values())) > 50   # the graph was read
    assert _cycles(edges) == []


def test_a_cycle_is_found_when_there_is_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_has_a_floor_and_imports_only_its_own_floor_or_below():
    modules = _modules()
    unplaced = [m for m in modules if m != "jaxllm" and _floor(m) is None]
    assert unplaced == []
    upward = sorted(f"{m} -> {t}" for m, targets in _imports(modules).items() if m != "jaxllm"
                    for t in targets if t != "jaxllm" and _floor(t) > _floor(m))
    assert upward == []


def test_nothing_in_peft_imports_interop():
    edges = _imports(_modules())
    assert not [(m, t) for m, ts in edges.items() if m.startswith("jaxllm.peft")
                for t in ts if t.startswith("jaxllm.interop")]
