"""In-context learning you can measure: accuracy against the number of shots, on mappings the model
has never seen, through `jaxllm.prompting.FewShotLearner`.

A pretrained GPT-2 is not at hand offline, so a small GPT (3 layers, 128 wide) is trained from scratch
here on episodes that each show a FRESH random mapping from symbols (a-z, 0-9) to four colour labels,
written in FewShotLearner's exact prompt layout::

    Give each symbol its colour.

    Example 1:
    Input: q
    Output: blue

    ...
    Now solve:
    Input: 7
    Output: red

A training episode draws 2-8 symbols and a label for each (uniformly, independently: the mapping is
arbitrary, so nothing about a symbol's label can be memorised), then 0-8 examples drawn with
replacement from those pairs (repeats are what can be learnt from) and a query from them. The only
way to beat chance is to read the mapping off the prompt.

Training is `jaxllm sft` on the episodes as prompt/completion records (prompt: the task line; the
loss covers everything after it), without packing, so every episode starts at position 0. The
tokenizer is word-level (`symbol_tokenizer`): the task line, each "Example i:\nInput: ", each symbol
together with the "\nOutput:" after it, each " label" and "\n" are one token each, so an 8-shot
prompt is 45 tokens and reading a label off the prompt is the plain induction pattern (find the
earlier occurrence of the current token, copy what followed it). With a byte-level BPE trained on
the same episodes (symbol and label 4 tokens apart, ~120 tokens a prompt) the same model stayed at
41-46% at k = 8 within the time budget (RESULTS.md).

Evaluation (held out: new mappings drawn with another seed): for each of N episodes, 8 new pairs; the
query is one of them; the k shots are k of the 8 pairs drawn without replacement. The query's own pair
is among the shots with probability k/8, so a perfect in-context learner scores k/8 + (1 - k/8)/4:
25% at k = 0 (chance), 100% at k = 8.

Selection: the pool is a new 32-pair mapping; 4 shots are chosen for each query either at random or
by `ExampleSelector.select(..., "semantic")` (cosine nearest inputs under the MiniLM sentence encoder,
the pool embedded once). The nearest example is the query's own symbol, so semantic selection carries
the answer while random selection carries it with probability 4/32.

    python benchmarks/icl_curve.py            # train (~10 min on 2 cores) + evaluate; JSON + PNG
    python benchmarks/icl_curve.py --quick    # a short smoke run: not the targets
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

TASK = "Give each symbol its colour."
LABELS = ("red", "blue", "gold", "pink")
SYMBOLS = tuple("abcdefghijklmnopqrstuvwxyz0123456789")   # one character each: one token
SHOTS = (0, 1, 2, 4, 8)
TARGETS = {"acc_at_8": 0.90, "minutes": 15.0}


def episode(rng, m: int | None = None, k: int | None = None, with_replacement: bool = True):
    """(examples, query, answer, pairs) of one fresh mapping of m symbols to labels (m: 2-8 at random)."""
    m = int(rng.integers(2, 9)) if m is None else m
    symbols = rng.choice(len(SYMBOLS), m, replace=False)
    pairs = [(SYMBOLS[i], LABELS[rng.integers(len(LABELS))]) for i in symbols]
    k = int(rng.integers(0, 9)) if k is None else k
    picks = rng.integers(0, m, k) if with_replacement else rng.choice(m, k, replace=False)
    query = pairs[rng.integers(m)]
    return [pairs[i] for i in picks], query[0], query[1], pairs


def symbol_tokenizer():
    """A word-level tokenizer for the episodes: the task line, each "Example i:\nInput: ", each
    symbol together with the "\nOutput:" after it, each " label", and "\n" are one token each."""
    import tokenizers as tk

    from jaxllm.tokenizer import HFTokenizer

    pieces = ([TASK, "\n", "Now solve:\nInput: "] + [f"Example {i}:\nInput: " for i in range(1, 9)]
              + [f"{s}\nOutput:" for s in SYMBOLS] + [f" {label}" for label in LABELS])
    vocab = {t: i for i, t in enumerate(["[UNK]", "<|endoftext|>", "<|pad|>"] + pieces)}
    backend = tk.Tokenizer(tk.models.WordLevel(vocab, unk_token="[UNK]"))
    pattern = "|".join([r"Example \d+:\nInput: ", r"[a-z0-9]\nOutput:", r" [a-z]+", r"\n", r"Now solve:\nInput: ",
                        re.escape(TASK)])
    backend.pre_tokenizer = tk.pre_tokenizers.Split(tk.Regex(pattern), behavior="isolated")
    backend.decoder = tk.decoders.Fuse()
    backend.add_special_tokens(["<|endoftext|>", "<|pad|>"])
    return HFTokenizer(backend=backend, eos_token="<|endoftext|>", pad_token="<|pad|>")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--episodes", type=int, default=500, help="held-out episodes per k")
    ap.add_argument("--out", default=str(HERE / "results" / "icl_curve.json"))
    ap.add_argument("--work", default=None, help="where the corpus and the run go (default: a temp dir)")
    ap.add_argument("--eval-only", action="store_true", help="evaluate the run a previous call left in --work")
    args = ap.parse_args()
    iters = args.iters or (300 if args.quick else 10000)
    n_eval = 50 if args.quick else args.episodes

    from jaxllm.parallel import setup_cpu
    setup_cpu()
    from jaxllm.configfile import load_config
    from jaxllm.prompting import ExampleSelector, FewShotLearner
    from jaxllm.runs import load_checkpoint

    work = pathlib.Path(args.work or tempfile.mkdtemp(prefix="icl_curve_"))
    work.mkdir(parents=True, exist_ok=True)
    trained = work / "train.json"
    if not args.eval_only:
        from jaxllm.alignment.sft import SFTConfig, run_sft

        header = TASK + "\n\n"
        for name, n, seed in (("train", 60000, 0), ("eval", 200, 3)):
            rng = np.random.default_rng(seed)
            with open(work / f"{name}.jsonl", "w") as f:
                for _ in range(n):
                    examples, query, answer, _ = episode(rng)
                    prompt = FewShotLearner.create_few_shot_prompt(TASK, examples, query)
                    f.write(json.dumps({"prompt": header, "completion": prompt[len(header):] + " " + answer}) + "\n")
        symbol_tokenizer().save(work / "tokenizer")
        overrides = [f"data.train_file={work / 'train.jsonl'}", f"data.eval_file={work / 'eval.jsonl'}",
                     f"data.tokenizer={work / 'tokenizer'}", "data.packing=false", "eval.examples=0",
                     "model.n_layer=3", "model.n_head=4", "model.n_embd=128",
                     "model.block_size=64", "model.dropout=0.0", f"train.out_dir={work / 'run'}",
                     "train.batch_size=32", f"train.max_iters={iters}", f"train.eval_interval={iters}",
                     "train.ckpt_interval=1000", "train.overwrite=true", "optim.learning_rate=2e-3",
                     "optim.min_lr=1e-4", "optim.warmup_iters=100", f"optim.lr_decay_iters={iters}",
                     "train.progress=false", "train.log_interval=50"]
        t0 = time.perf_counter()
        result = run_sft(load_config(SFTConfig, None, overrides))
        trained.write_text(json.dumps({"iters": iters, "wall_s": time.perf_counter() - t0,
                                       "val_loss": result.after.get("val_loss")}))
    train = json.loads(trained.read_text())
    model, _, tokenizer, _ = load_checkpoint(work / "run")
    learner = FewShotLearner(model, tokenizer, max_new_tokens=3)   # " pink", "\n"

    # the shots curve: new mappings (seed 1), shots without replacement
    rng = np.random.default_rng(1)
    curve = {}
    t0 = time.perf_counter()
    for k in SHOTS:
        eps = [episode(rng, m=8, k=k, with_replacement=False) for _ in range(n_eval)]
        preds = learner.predict_batch(TASK, [e[0] for e in eps], [e[1] for e in eps])
        acc = float(np.mean([p == e[2] for p, e in zip(preds, eps)]))
        ideal = k / 8 + (1 - k / 8) / len(LABELS)
        curve[k] = {"accuracy": round(acc, 4), "perfect_learner": round(ideal, 4),
                    "valid_label": round(float(np.mean([p in LABELS for p in preds])), 4)}
        print(f"k={k}: accuracy {acc:.1%} (a perfect in-context learner: {ideal:.1%})")

    # example selection: a 32-pair pool per mapping, 4 shots chosen at random or by similarity
    from jaxllm.embeddings import SentenceEncoder
    encoder = SentenceEncoder.load()
    rng = np.random.default_rng(2)
    n_maps, per_map = (5, 10) if args.quick else (20, 25)
    hits = {"random": [], "semantic": []}
    for _ in range(n_maps):
        _, _, _, pool = episode(rng, m=32, k=0)
        selector = ExampleSelector(pool, encoder)      # the pool is embedded once for all its queries
        queries = [pool[i] for i in rng.choice(32, per_map, replace=False)]
        for method in hits:
            shots = [selector.select(q, 4, method, seed=int(rng.integers(1 << 30))) for q, _ in queries]
            preds = learner.predict_batch(TASK, shots, [q for q, _ in queries])
            hits[method] += [p == a for p, (_, a) in zip(preds, queries)]
    selection = {m: round(float(np.mean(h)), 4) for m, h in hits.items()}
    eval_wall = time.perf_counter() - t0
    print(f"selection (4 shots from a 32-pair pool): {selection}")

    out = {
        "model": {"n_layer": 3, "n_head": 4, "n_embd": 128, "block_size": 64, "tokenizer": "word-level (symbol_tokenizer)"},
        "train_iters": train["iters"], "train_wall_s": round(train["wall_s"], 1), "final_val_loss": train["val_loss"],
        "eval_episodes_per_k": n_eval, "labels": list(LABELS), "chance": 1 / len(LABELS),
        "shots": {str(k): v for k, v in curve.items()},
        "selection_4_of_32": {"episodes": len(hits["random"]), **selection},
        "eval_wall_s": round(eval_wall, 1),
        "targets": TARGETS,
        "met": {"rises_with_k": all(curve[a]["accuracy"] < curve[b]["accuracy"] for a, b in zip(SHOTS, SHOTS[1:])),
                "acc_at_8": curve[8]["accuracy"] >= TARGETS["acc_at_8"],
                "k0_at_chance": abs(curve[0]["accuracy"] - 1 / len(LABELS)) < 0.08,
                "semantic_beats_random": selection["semantic"] > selection["random"],
                "minutes": train["wall_s"] / 60 <= TARGETS["minutes"]},
    }
    print(json.dumps(out, indent=2))
    dest = pathlib.Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[bench]')")
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(SHOTS, [curve[k]["accuracy"] for k in SHOTS], "o-", label="jaxllm GPT (3 layers, 128 wide)")
    ax.plot(SHOTS, [curve[k]["perfect_learner"] for k in SHOTS], "--", color="grey", label="perfect in-context learner")
    ax.axhline(1 / len(LABELS), color="grey", lw=0.8, ls=":", label="chance")
    ax.set_xlabel("shots k")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("In-context learning of new symbol->colour mappings")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dest.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
