"""Retrieval, RAG and the tool-using agent on tasks whose answers are known (issue 17).

Three parts, each its own timed run (``--part retrieval|rag|agent|all``):

1. Retrieval. A synthetic knowledge base of invented facts: 250 invented countries x 5 relations
   (capital, currency, longest river, highest mountain, national animal) = 1,250 one-sentence
   documents ("The capital of Vorland is Kessa."), each value an invented word. Every fact has
   three question paraphrases that share the country's name with its document but not the
   sentence ("Which city is the seat of government of Vorland?"). Recall@1 and @3 of dense
   (jaxllm's MiniLM), BM25 (bm25s) and hybrid (reciprocal-rank fusion) retrieval over one
   paraphrase of every fact.
2. RAG. 80% of the facts train, 20% are held out (a country's other facts may be in training, the
   held-out fact itself never is). A 3-layer GPT is fine-tuned from scratch with ``jaxllm sft`` on
   RAG prompts (``build_rag_prompt`` over the hybrid top-3, the right document put in when the
   retriever missed it, document order shuffled so that position says nothing) -> " {value}", for
   the training facts' questions and for 30,000 episodes of NEW facts (a country and relation of
   the base with a random value, beside 0-2 documents about the same relation or country): trained on
   the 3,000 fact questions alone, the model memorised them and reached 43.6% on held-out facts;
   the episodes leave reading the context as the only way to answer. On held-out questions: exact
   match through ``RAGSystem(LLM, hybrid, top_k=3)`` against the same model closed-book (the same
   prompt with no documents).
3. Agent. 4- to 6-digit multiplication. One GPT is fine-tuned with ``jaxllm sft`` on ReAct steps in
   ``LLMAgent``'s exact prompt (step 1: thought, "Action: calculator", "Action Input: a * b",
   "Observation:"; step 2, after the calculator's observation: "Final Answer: {product}"); another
   model of the same size, steps and data on "Question: What is a * b?\\nAnswer: {product}" (both 4
   layers, 128 wide, batch 32, 2,000 steps). Held-out exact match through
   ``LLMAgent(LLM, [Calculator()])`` against the direct model. (3 layers, batch 16, 4,000 steps:
   60.2%; the misses of both are wrong copies of the product from the observation.)

The tokenizer is word-level over each part's corpus (``corpus_tokenizer``: a word with its leading
space, each digit, each punctuation mark and newline one token), so a copied name or digit is one
token. Each part prints its JSON and writes benchmarks/results/apps_tasks.json.

    python benchmarks/apps_tasks.py                 # all three (~25 min on 2 cores)
    python benchmarks/apps_tasks.py --part rag
    python benchmarks/apps_tasks.py --quick         # a smoke run: not the targets
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

TARGETS = {"hybrid_recall_at_3": 0.95, "rag_exact_match": 0.90, "agent_exact_match": 0.95, "minutes_per_part": 15.0}

RELATIONS = {
    "capital": ("The capital of {e} is {v}.",
                ["What is the capital city of {e}?", "Which city is the seat of government of {e}?",
                 "Where does the government of {e} sit?"]),
    "currency": ("The currency of {e} is the {v}.",
                 ["What money is used in {e}?", "Which currency do people in {e} pay with?",
                  "What do shoppers in {e} pay in?"]),
    "river": ("The longest river in {e} is the {v}.",
              ["Which river is the longest in {e}?", "What is the name of the longest river of {e}?",
               "Which river runs the farthest through {e}?"]),
    "mountain": ("The highest mountain in {e} is Mount {v}.",
                 ["What is the tallest peak in {e}?", "Which mountain rises highest in {e}?",
                  "Name the highest summit of {e}."]),
    "animal": ("The national animal of {e} is the {v}.",
               ["Which animal is the national symbol of {e}?", "What creature represents {e}?",
                "What is the emblem animal of {e}?"]),
}
ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "st", "th"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
CODAS = ["", "n", "r", "l", "s", "th", "nd", "rk"]


def invented_words(rng, n: int, syllables=(2, 3), taken=()) -> list[str]:
    out, seen = [], set(taken)
    while len(out) < n:
        w = "".join(ONSETS[rng.integers(len(ONSETS))] + VOWELS[rng.integers(len(VOWELS))]
                    for _ in range(int(rng.integers(syllables[0], syllables[1] + 1))))
        w = (w + CODAS[rng.integers(len(CODAS))]).capitalize()
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def knowledge_base(seed: int = 0, n_entities: int = 250, n_values: int = 120):
    """(facts, documents): facts are dicts entity, relation, value, doc (its index), questions."""
    rng = np.random.default_rng(seed)
    entities = invented_words(rng, n_entities, (2, 3))
    values = {r: invented_words(rng, n_values, (2, 2), taken=entities) for r in RELATIONS}
    facts, docs = [], []
    for e in entities:
        for r, (template, questions) in RELATIONS.items():
            v = values[r][rng.integers(n_values)]
            v = v.lower() if r in ("currency", "animal") else v
            facts.append({"entity": e, "relation": r, "value": v, "doc": len(docs),
                          "questions": [q.format(e=e) for q in questions]})
            docs.append(template.format(e=e, v=v))
    return facts, docs


def corpus_tokenizer(texts, directory):
    """A word-level tokenizer over `texts`: " word", "word", each digit (with its leading space),
    each punctuation mark, "\\n" and " " one token each; saved to `directory`."""
    import tokenizers as tk

    from jaxllm.tokenizer import HFTokenizer

    pattern = r" ?[A-Za-z]+| ?\d|\n| ?[^\sA-Za-z\d]| "
    pre = tk.pre_tokenizers.Split(tk.Regex(pattern), behavior="isolated")
    pieces = {f"{space}{d}" for d in "0123456789" for space in ("", " ")}
    for t in texts:
        pieces.update(p for p, _ in pre.pre_tokenize_str(t))
    vocab = {t: i for i, t in enumerate(["[UNK]", "<|endoftext|>", "<|pad|>"] + sorted(pieces))}
    backend = tk.Tokenizer(tk.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre
    backend.decoder = tk.decoders.Fuse()
    backend.add_special_tokens(["<|endoftext|>", "<|pad|>"])
    tok = HFTokenizer(backend=backend, eos_token="<|endoftext|>", pad_token="<|pad|>")
    tok.save(directory)
    return tok


def sft(work: pathlib.Path, name: str, records, held, iters: int, block: int, n_layer: int = 4,
        lr: float = 2e-3, batch: int = 32, n_head: int = 4) -> dict:
    from jaxllm.alignment.sft import SFTConfig, run_sft
    from jaxllm.configfile import load_config

    for split, rows in (("train", records), ("eval", held)):
        with open(work / f"{name}_{split}.jsonl", "w") as f:
            for p, c in rows:
                f.write(json.dumps({"prompt": p, "completion": c}) + "\n")
    overrides = [f"data.train_file={work / f'{name}_train.jsonl'}", f"data.eval_file={work / f'{name}_eval.jsonl'}",
                 f"data.tokenizer={work / 'tokenizer'}", "data.packing=false", "eval.examples=0",
                 f"model.n_layer={n_layer}", f"model.n_head={n_head}", "model.n_embd=128", f"model.block_size={block}",
                 "model.dropout=0.0", f"train.out_dir={work / name}", f"train.batch_size={batch}",
                 f"train.max_iters={iters}", f"train.eval_interval={iters}", f"train.ckpt_interval={iters}",
                 "train.overwrite=true", f"optim.learning_rate={lr}", "optim.min_lr=1e-4", "optim.warmup_iters=100",
                 f"optim.lr_decay_iters={iters}", "train.progress=false", "train.log_interval=100"]
    t0 = time.perf_counter()
    result = run_sft(load_config(SFTConfig, None, overrides))
    return {"iters": iters, "wall_s": round(time.perf_counter() - t0, 1), "val_loss": result.after.get("val_loss"),
            "examples": len(records)}


# ----------------------------------------------------------------------------- parts

def retrieval_part(args, facts, docs, encoder) -> tuple[dict, object]:
    from jaxllm.apps import BM25Retriever, DenseIndex, HybridRetriever

    t0 = time.perf_counter()
    dense = DenseIndex.build(docs, encoder)
    bm25 = BM25Retriever(docs)
    hybrid = HybridRetriever(dense, bm25)
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(5)
    questions = [f["questions"][rng.integers(3)] for f in facts]
    gold = np.asarray([f["doc"] for f in facts])
    out = {"documents": len(docs), "questions": len(questions), "index_build_s": round(build_s, 1)}
    for name, r in (("dense", dense), ("bm25", bm25), ("hybrid", hybrid)):
        t0 = time.perf_counter()
        idx, _ = r.search(questions, 3)
        idx = np.asarray(idx)
        out[name] = {"recall_at_1": round(float(np.mean(idx[:, 0] == gold)), 4),
                     "recall_at_3": round(float(np.mean((idx == gold[:, None]).any(1))), 4),
                     "search_s": round(time.perf_counter() - t0, 2)}
        print(f"{name}: {out[name]}", flush=True)
    return out, hybrid


def rag_part(args, facts, docs, hybrid, work) -> dict:
    from jaxllm.apps import LLM, RAGSystem, build_rag_prompt
    from jaxllm.runs import load_checkpoint

    t_part = time.perf_counter()
    rng = np.random.default_rng(7)
    order = rng.permutation(len(facts))
    n_test = len(facts) // 5
    test, train = [facts[i] for i in order[:n_test]], [facts[i] for i in order[n_test:]]
    qs = [q for f in train for q in f["questions"]]
    answers = [f["value"] for f in train for _ in f["questions"]]
    golds = [f["doc"] for f in train for _ in f["questions"]]
    idx, _ = hybrid.search(qs, 3)
    records = []
    for q, a, g, top in zip(qs, answers, golds, idx):
        top = list(top)
        if g not in top:
            top[-1] = g
        rng.shuffle(top)
        records.append((build_rag_prompt(q, [docs[i] for i in top]), " " + a))
    n_fact_questions = len(records)
    # Episodes of new facts: a country and relation from the knowledge base with a value drawn at
    # random, among documents about the same country or the same relation (values random too). The
    # value of an episode cannot be known from any earlier one: only reading the context answers it.
    entities = sorted({f["entity"] for f in facts})
    values = {r: sorted({f["value"] for f in facts if f["relation"] == r}) for r in RELATIONS}
    relations = list(RELATIONS)
    for _ in range(args.rag_episodes):
        e = entities[rng.integers(len(entities))]
        r = relations[rng.integers(len(relations))]
        others = [x for x in relations if x != r]
        # 1 to 3 documents: with one, the answer is to copy; then to choose. Distractors: the same
        # country with another relation, or the same relation of another country, half and half
        # (mostly 3 documents, 2 in 3 distractors of another country: 58.4% held out, slower to learn)
        n_docs = int(rng.integers(1, 4))
        picks = [(e, r)] + [(e, others[rng.integers(len(others))]) if rng.random() < 0.5
                            else (entities[rng.integers(len(entities))], r) for _ in range(n_docs - 1)]
        texts, answer = [], None
        for pe, pr in picks:
            v = values[pr][rng.integers(len(values[pr]))]
            texts.append(RELATIONS[pr][0].format(e=pe, v=v))
            answer = v if answer is None else answer
        rng.shuffle(texts)
        q = RELATIONS[r][1][rng.integers(3)].format(e=e)
        records.append((build_rag_prompt(q, texts), " " + answer))
    order = rng.permutation(len(records))
    records = [records[i] for i in order]
    held = records[:200]
    corpus = docs + [q for f in facts for q in f["questions"]] + [build_rag_prompt("x", ["y"])]
    corpus_tokenizer(corpus, work / "tokenizer")
    train_info = sft(work, "rag", records, held, args.rag_iters, block=80, n_layer=3)
    model, _, tok, _ = load_checkpoint(work / "rag")
    llm = LLM(model, tok, max_new_tokens=4)
    rag = RAGSystem(llm, hybrid, top_k=3, max_new_tokens=4)
    qs = [f["questions"][rng.integers(3)] for f in test]
    t0 = time.perf_counter()
    got = rag.answer_questions(qs)
    closed = llm.generate_batch([build_rag_prompt(q, []) for q in qs], stop=("\n",))
    eval_s = time.perf_counter() - t0
    truth = [f["value"] for f in test]
    em = float(np.mean([g.answer == t for g, t in zip(got, truth)]))
    em_closed = float(np.mean([c.strip() == t for c, t in zip(closed, truth)]))
    retrieved = float(np.mean([f["doc"] in [h.index for h in g.documents] for f, g in zip(test, got)]))
    out = {"model": "3 layers, 128 wide, block 80, from scratch", "train": train_info,
           "train_fact_questions": n_fact_questions, "train_new_fact_episodes": args.rag_episodes,
           "held_out_facts": len(test), "exact_match_with_retrieval": round(em, 4),
           "exact_match_closed_book": round(em_closed, 4), "gold_document_retrieved": round(retrieved, 4),
           "dropped_documents": sum(g.dropped for g in got), "eval_s": round(eval_s, 1),
           "examples": [{"question": q, "answer": g.answer, "truth": t} for q, g, t in list(zip(qs, got, truth))[:5]],
           "wall_s": round(time.perf_counter() - t_part, 1)}
    print(json.dumps({k: v for k, v in out.items() if k != "examples"}), flush=True)
    return out


def multiplication(rng, n):
    lo = 10 ** (rng.integers(4, 7, (n, 2)) - 1)
    a = rng.integers(lo[:, 0], lo[:, 0] * 10)
    b = rng.integers(lo[:, 1], lo[:, 1] * 10)
    return [(int(x), int(y)) for x, y in zip(a, b)]


def agent_part(args, work) -> dict:
    from jaxllm.apps import LLM, Calculator, LLMAgent
    from jaxllm.runs import load_checkpoint

    calc = Calculator()
    agent = LLMAgent(None, [calc])
    rng = np.random.default_rng(11)
    train = multiplication(rng, args.agent_problems)
    test = multiplication(np.random.default_rng(12), args.agent_eval)
    seen = set(train)
    test = [t for t in test if t not in seen]

    def question(a, b):
        return f"What is {a} * {b}?"

    def records(problems):
        react, direct = [], []
        for a, b in problems:
            p1 = agent.prompt(question(a, b))
            step1 = f" I need to multiply {a} by {b}.\nAction: calculator\nAction Input: {a} * {b}\n"
            react.append((p1, step1 + "Observation:"))
            p2 = p1 + step1 + f"Observation: {calc.run(f'{a} * {b}')}\nThought:"
            react.append((p2, f" I know the final answer.\nFinal Answer: {a * b}"))
            direct.append((f"Question: {question(a, b)}\nAnswer:", f" {a * b}"))
        return react, direct

    react, direct = records(train)
    react_held, direct_held = records(test[:100])
    corpus = [p + c for p, c in react[:2]] + [p + c for p, c in direct[:1]] + [" " + "".join(map(str, range(10)))]
    corpus_tokenizer(corpus + ["0123456789"], work / "tokenizer")
    out = {"train_problems": len(train), "eval_problems": len(test)}
    t0 = time.perf_counter()
    out["react_train"] = sft(work, "react", react, react_held, args.agent_iters, block=256)
    model, _, tok, _ = load_checkpoint(work / "react")
    agent = LLMAgent(LLM(model, tok, max_new_tokens=48), [calc], max_new_tokens=48)
    t1 = time.perf_counter()
    results = agent.run_batch([question(a, b) for a, b in test], max_steps=3)
    out["agent_eval_s"] = round(time.perf_counter() - t1, 1)
    em = float(np.mean([r.answer == str(a * b) for r, (a, b) in zip(results, test)]))
    out["agent_exact_match"] = round(em, 4)
    out["agent_stop_reasons"] = {k: sum(r.stop_reason == k for r in results) for k in
                                 ("final_answer", "max_steps", "context_full")}
    out["agent_used_calculator"] = round(float(np.mean([any(s.action == "calculator" for s in r.steps)
                                                        for r in results])), 4)
    out["agent_wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"agent: exact match {em:.1%}", flush=True)

    t0 = time.perf_counter()
    out["direct_train"] = sft(work, "direct", direct, direct_held, args.agent_iters, block=48)
    model, _, tok, _ = load_checkpoint(work / "direct")
    llm = LLM(model, tok, max_new_tokens=16)
    answers = llm.generate_batch([f"Question: {question(a, b)}\nAnswer:" for a, b in test], stop=("\n",))
    digits = [sum(x == y for x, y in zip(g.strip(), str(a * b))) / len(str(a * b)) for g, (a, b) in zip(answers, test)]
    out["direct_exact_match"] = round(float(np.mean([g.strip() == str(a * b) for g, (a, b) in zip(answers, test)])), 4)
    out["direct_digit_accuracy"] = round(float(np.mean(digits)), 4)
    out["direct_wall_s"] = round(time.perf_counter() - t0, 1)
    out["example_trace"] = results[0].transcript[len(agent.prompt(question(*test[0]))) - len("Thought:"):]
    print(json.dumps({k: v for k, v in out.items() if k != "example_trace"}), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["retrieval", "rag", "agent", "all"], default="all")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rag-iters", type=int, default=None)
    ap.add_argument("--agent-iters", type=int, default=None)
    ap.add_argument("--rag-episodes", type=int, default=30000, help="RAG training episodes of new random facts")
    ap.add_argument("--agent-problems", type=int, default=20000)
    ap.add_argument("--agent-eval", type=int, default=400)
    ap.add_argument("--out", default=str(HERE / "results" / "apps_tasks.json"))
    ap.add_argument("--work", default=None, help="where corpora and runs go (default: a temp dir)")
    args = ap.parse_args()
    args.rag_iters = args.rag_iters or (200 if args.quick else 8000)
    args.agent_iters = args.agent_iters or (200 if args.quick else 2000)
    if args.quick:
        args.agent_problems, args.agent_eval, args.rag_episodes = 2000, 50, 2000

    from jaxllm.parallel import setup_cpu
    setup_cpu()
    work = pathlib.Path(args.work or tempfile.mkdtemp(prefix="apps_tasks_"))
    dest = pathlib.Path(args.out)
    result = json.loads(dest.read_text()) if dest.exists() else {}
    result["targets"] = TARGETS
    parts = ["retrieval", "rag", "agent"] if args.part == "all" else [args.part]
    if {"retrieval", "rag"} & set(parts):
        from jaxllm.embeddings import SentenceEncoder
        facts, docs = knowledge_base()
        t0 = time.perf_counter()
        result["retrieval"], hybrid = retrieval_part(args, facts, docs, SentenceEncoder.load())
        result["retrieval"]["wall_s"] = round(time.perf_counter() - t0, 1)
        if "rag" in parts:
            (work / "rag_work").mkdir(parents=True, exist_ok=True)
            result["rag"] = rag_part(args, facts, docs, hybrid, work / "rag_work")
    if "agent" in parts:
        (work / "agent_work").mkdir(parents=True, exist_ok=True)
        result["agent"] = agent_part(args, work / "agent_work")
    result["quick"] = args.quick
    met = {}
    if "retrieval" in result:
        met["hybrid_recall_at_3"] = result["retrieval"]["hybrid"]["recall_at_3"] >= TARGETS["hybrid_recall_at_3"]
    if "rag" in result:
        met["rag_exact_match"] = result["rag"]["exact_match_with_retrieval"] >= TARGETS["rag_exact_match"]
        met["rag_minutes"] = result["rag"]["wall_s"] / 60 <= TARGETS["minutes_per_part"]
    if "agent" in result:
        a = result["agent"]
        met["agent_exact_match"] = a["agent_exact_match"] >= TARGETS["agent_exact_match"]
        met["agent_beats_direct"] = a["agent_exact_match"] > a["direct_exact_match"]
        met["agent_minutes"] = a["agent_wall_s"] / 60 <= TARGETS["minutes_per_part"]
    result["met"] = met
    print(json.dumps(met, indent=2))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(dest)


if __name__ == "__main__":
    main()
