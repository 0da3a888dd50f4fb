"""Online RL on a task whose true reward is known: addition, where the reward is "the answer is right".

1. A starting policy: `jaxllm sft` on 3-digit addition from scratch, stopped early (step 200 of a
   600-step schedule), the same as benchmarks/preference_tasks.py (~38% held-out exact match).
2. GRPO with the exact-match reward function: held-out greedy exact match (target >= 90%).
3. A reward model trained on the starting policy's own samples (pairs labelled by correctness),
   on an 8-layer SFT trunk (a 4-layer trunk tops out near 74% pair accuracy, RESULTS.md), then PPO
   against it: held-out exact match (target: up >= 25 points) and the KL to the reference.
4. A reward-vs-KL frontier: PPO at several KL coefficients and DPO (on pairs from the same starting
   policy) at several betas; the x axis is KL(policy || reference) summed over the greedy answer's
   tokens, averaged over the held-out prompts; the y axis the true reward (held-out exact match).
   JSON + PNG.
5. Time split of an RL step (rollout, scoring, update) and rollout tokens/s of jaxllm's compiled
   sampler against Hugging Face `generate` (PyTorch, 2 threads, in a child process) on the same
   weights: the policy at the rollout shape, and a random GPT-2 124M at a chat-like shape.

Each run's wall time is reported (target <= 15 min each on 2 cores). Writes
benchmarks/results/rl_tasks.json and rl_frontier.png.

    python benchmarks/rl_tasks.py                     # ~45 min on 2 cores
    python benchmarks/rl_tasks.py --only grpo,speed   # parts (sft and pairs are built as needed)
    python benchmarks/rl_tasks.py --quick             # a smoke check, not the targets
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

TARGETS = {"grpo_exact_match": 0.90, "ppo_gain_points": 25.0, "rollout_speedup_vs_hf": 2.0, "minutes": 15.0}
GRPO_SETTINGS = ["grpo.num_generations=8", "train.batch_size=256", "rollout.temperature=1.0", "rollout.max_new_tokens=6",
                 "optim.learning_rate=3e-4", "optim.min_lr=3e-5", "optim.warmup_iters=0"]
PPO_SETTINGS = ["train.batch_size=64", "rollout.num_mini_batches=4", "rollout.epochs=4", "rollout.temperature=0.7",
                "rollout.max_new_tokens=6", "optim.learning_rate=1e-4", "optim.min_lr=1e-5", "optim.warmup_iters=0"]
PPO_KL = [1.0, 3.0, 0.2]          # the first is the headline run
DPO_BETAS = [0.5, 2.0, 8.0]
COMMON = ["train.progress=false", "train.overwrite=true", "train.tensorboard=false", "train.ckpt_interval=0",
          "train.log_interval=10", "data.eval_batch_size=100"]


def _load(cls, overrides):
    from jaxllm.configfile import load_config
    return load_config(cls, None, overrides)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _time_split(result) -> dict:
    """Mean seconds per step of rollout, scoring and the update (the rest of the step's wall time),
    compile-dominated first step left out."""
    import numpy as np
    h = result.history[1:]
    steps = len(h)
    rollout = float(np.mean([x["time/rollout"] for x in h]))
    scoring = float(np.mean([x["time/scoring"] for x in h]))
    per_step = (result.train.train_seconds - result.train.compile_seconds) / max(steps, 1)
    return {"rollout_s": rollout, "scoring_s": scoring, "update_s": max(per_step - rollout - scoring, 0.0),
            "step_s": per_step, "compile_s": result.train.compile_seconds}


def hf_worker(directory: str, cases: str) -> None:
    """Child process: HF generate (sampling, no EOS stop) on the saved models, best of 3 per case."""
    import numpy as np
    import torch
    import transformers

    torch.set_num_threads(2)
    out = {"torch": torch.__version__, "transformers": transformers.__version__}
    for case in json.loads(cases):
        model = transformers.GPT2LMHeadModel.from_pretrained(case["dir"]).eval()
        ids = torch.as_tensor(np.load(case["prompts"]), dtype=torch.long)
        mask = torch.ones_like(ids)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            with torch.inference_mode():
                model.generate(ids, attention_mask=mask, do_sample=True, temperature=case["temperature"], top_k=0,
                               max_new_tokens=case["new"], min_new_tokens=case["new"], pad_token_id=0, use_cache=True)
            times.append(time.perf_counter() - t)
        out[case["name"]] = {"seconds": min(times), "tokens_per_s": ids.shape[0] * case["new"] / min(times)}
    with open(os.path.join(directory, "hf_rollout.json"), "w") as f:
        json.dump(out, f)


def rollout_speed(policy, root: pathlib.Path, prompts_BP, new_tokens: int, temperature: float) -> dict:
    """Sampled tokens/s, jaxllm.generate (the rollouts' compiled sampler) against HF generate, same
    weights, same shapes, no EOS stop; for the policy and a random GPT-2 124M."""
    import jax
    import numpy as np
    import transformers

    from jaxllm.config import GPTConfig
    from jaxllm.interop.hf import from_hf, to_hf
    from jaxllm.sampling import generate

    cases, models = [], {}
    to_hf(policy, policy.config, root / "hf_policy", overwrite=True)
    models["policy"] = (policy, prompts_BP)
    cfg = GPTConfig.preset("gpt2")
    hf_cfg = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                                     n_layer=cfg.n_layer, n_head=cfg.n_head)
    transformers.GPT2LMHeadModel(hf_cfg).save_pretrained(root / "hf_gpt2")
    gpt2, _ = from_hf(root / "hf_gpt2")
    models["gpt2_124m"] = (gpt2, np.random.default_rng(0).integers(0, cfg.vocab_size, (16, 32)).astype(np.int32))
    shapes = {"policy": new_tokens, "gpt2_124m": 32}
    for name, (model, prompts) in models.items():
        np.save(root / f"prompts_{name}.npy", prompts)
        cases.append({"name": name, "dir": str(root / ("hf_policy" if name == "policy" else "hf_gpt2")),
                      "prompts": str(root / f"prompts_{name}.npy"), "new": shapes[name], "temperature": temperature})
    subprocess.run([sys.executable, __file__, "--hf-worker", str(root), json.dumps(cases)], check=True)
    hf = json.loads((root / "hf_rollout.json").read_text())
    out = {"torch": hf["torch"], "transformers": hf["transformers"]}
    for name, (model, prompts) in models.items():
        new = shapes[name]

        def run(seed):
            return np.asarray(generate(model, prompts, new, temperature=temperature, key=jax.random.key(seed)))
        t0 = time.perf_counter()
        run(0)
        first = time.perf_counter() - t0
        times = []
        for seed in range(1, 4):
            t = time.perf_counter()
            run(seed)
            times.append(time.perf_counter() - t)
        tok_s = prompts.shape[0] * new / min(times)
        out[name] = {"shape": {"batch": int(prompts.shape[0]), "prompt": int(prompts.shape[1]), "new_tokens": new},
                     "jaxllm_tokens_per_s": tok_s, "jaxllm_compile_s": first - min(times),
                     "hf_tokens_per_s": hf[name]["tokens_per_s"], "speedup": tok_s / hf[name]["tokens_per_s"]}
        print(f"[speed {name}] jaxllm {tok_s:,.0f} tok/s, HF {hf[name]['tokens_per_s']:,.0f} tok/s", flush=True)
    return out


def plot_frontier(points: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for method, marker in (("ppo", "o"), ("dpo", "s")):
        pts = sorted(points[method], key=lambda p: p["kl"])
        ax.plot([p["kl"] for p in pts], [100 * p["exact_match"] for p in pts], marker=marker, label=method.upper())
        for p in pts:
            ax.annotate(p["label"], (p["kl"], 100 * p["exact_match"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
    ax.axhline(100 * points["start"], color="gray", linestyle=":", label="starting policy")
    ax.set_xlabel("KL(policy || reference), nats per answer (held-out, greedy answers)")
    ax.set_ylabel("held-out exact match (%)")
    ax.set_title("Reward vs KL on addition (true reward: correctness)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default="grpo,reward,ppo,frontier,speed")
    p.add_argument("--grpo-steps", type=int, default=1500)
    p.add_argument("--ppo-steps", type=int, default=500)
    p.add_argument("--reward-steps", type=int, default=3000)
    p.add_argument("--out", default=str(HERE / "results" / "rl_tasks.json"))
    p.add_argument("--keep", default=None, help="directory to keep the runs in (reused: sft, pairs, reward model)")
    p.add_argument("--hf-worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.hf_worker:
        hf_worker(*args.hf_worker)
        return

    from jaxllm.parallel import setup_cpu
    setup_cpu()

    from preference_tasks import SFT_SETTINGS, _exact_match, _kl_to_reference

    from jaxllm.alignment.dpo import DPOConfig, run_dpo
    from jaxllm.alignment.grpo import GRPOConfig, run_grpo
    from jaxllm.alignment.ppo import PPOConfig, run_ppo
    from jaxllm.alignment.reward import RewardConfig, run_reward
    from jaxllm.alignment.sft import SFTConfig, run_sft
    from jaxllm.data.synthetic import TaskSettings, make_splits, sample_preference_pairs
    from jaxllm.runs import load_checkpoint

    only = set(args.only.split(","))
    steps = {"grpo": 60 if args.quick else args.grpo_steps, "ppo": 40 if args.quick else args.ppo_steps,
             "reward": 100 if args.quick else args.reward_steps, "deep_sft": 60 if args.quick else 600,
             "dpo": 60 if args.quick else 600}
    out_path = pathlib.Path(args.out)
    out: dict = json.loads(out_path.read_text()) if out_path.is_file() and only != set(p.get_default("only").split(",")) \
        else {}
    out.update({"benchmark": "rl_tasks", "date": time.strftime("%Y-%m-%d"), "quick": args.quick, "targets": TARGETS})
    with tempfile.TemporaryDirectory(prefix="jaxllm-rl-") as tmp:
        root = pathlib.Path(args.keep) if args.keep else pathlib.Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        if not (root / "sft" / "checkpoints").is_dir():
            t0 = time.perf_counter()
            sft = run_sft(_load(SFTConfig, [f"train.out_dir={root}/sft", "train.overwrite=true", "train.max_iters=200",
                                            *SFT_SETTINGS]))
            out["sft"] = {"held_out_exact_match": sft.after["exact_match"], "steps": 200,
                          "wall_s": time.perf_counter() - t0}
        policy, _, tok, meta = load_checkpoint(root / "sft")
        eos, pad = meta["data"]["eos_id"], meta["data"]["pad_id"]
        train_records, held = make_splits(20000, 300, tasks=("add",), seed=0, format="compact",
                                          settings=TaskSettings(reverse_sum=True, pad_operands=True),
                                          train_at_most=True)
        _write_jsonl(root / "prompts_train.jsonl", train_records)
        _write_jsonl(root / "prompts_eval.jsonl", held)
        base_em = _exact_match(policy, tok, held, eos, pad)
        out["held_out_exact_match_before"] = base_em
        print(f"[start] held-out exact match {base_em:.1%}", flush=True)
        prompts = [f"init.path={root}/sft", f"data.train_file={root}/prompts_train.jsonl",
                   f"data.eval_file={root}/prompts_eval.jsonl", *COMMON]

        def measured(name, res, wall, extra=None):
            em = _exact_match(res.train.model, tok, held, eos, pad)
            kl = _kl_to_reference(res.train.model, policy, tok, held, eos, pad)
            out[name] = {"held_out_exact_match_before": base_em, "held_out_exact_match": em,
                         "gain_points": 100 * (em - base_em), "kl_to_reference": kl, "wall_s": wall,
                         "evals": {str(k): v for k, v in res.train.evals.items()}, **(extra or {})}
            if hasattr(res, "history"):
                out[name]["time_split"] = _time_split(res)
                out[name]["last_rollout"] = {k: v for k, v in res.history[-1].items() if not k.startswith("time/")}
            print(f"[{name}] exact match {base_em:.1%} -> {em:.1%}, KL {kl:.3f}, {wall:.0f} s", flush=True)
            return out[name]

        if "grpo" in only:
            t0 = time.perf_counter()
            n = steps["grpo"]
            res = run_grpo(_load(GRPOConfig, [*prompts, f"train.out_dir={root}/grpo", f"train.max_iters={n}",
                                              f"optim.lr_decay_iters={n}", f"train.eval_interval={max(n // 5, 1)}",
                                              *GRPO_SETTINGS]))
            measured("grpo", res, time.perf_counter() - t0, {"settings": GRPO_SETTINGS, "steps": n})

        need_pairs = only & {"reward", "ppo", "frontier"}
        if need_pairs and not (root / "pairs_reward_train.jsonl").is_file():
            t0 = time.perf_counter()
            stats = {}
            for name, records, seed, per_prompt in (("dpo_train", train_records[:10000], 1, 1),
                                                    ("reward_train", train_records, 3, 3), ("eval", held, 2, 1)):
                pairs, st = sample_preference_pairs(policy, tok, records, samples=8, pairs_per_prompt=per_prompt,
                                                    eos_id=eos, pad_id=pad, seed=seed)
                _write_jsonl(root / f"pairs_{name}.jsonl", pairs)
                stats[name] = vars(st)
            out["pairs"] = {**stats, "wall_s": time.perf_counter() - t0}
        pair_stage = [f"data.eval_file={root}/pairs_eval.jsonl", *COMMON, "train.eval_interval=0",
                      "data.eval_batch_size=32"]

        if "reward" in only or ("ppo" in only or "frontier" in only) and not (root / "rm" / "checkpoints").is_dir():
            t0 = time.perf_counter()
            deep = run_sft(_load(SFTConfig, [f"train.out_dir={root}/sft-deep", "train.overwrite=true",
                                             f"train.max_iters={steps['deep_sft']}", "model.n_layer=8", *SFT_SETTINGS]))
            out["deep_sft"] = {"layers": 8, "held_out_exact_match": deep.after["exact_match"],
                               "wall_s": time.perf_counter() - t0}
            t0 = time.perf_counter()
            n = steps["reward"]
            rm = run_reward(_load(RewardConfig, [*pair_stage, f"init.path={root}/sft-deep", f"train.out_dir={root}/rm",
                                                 f"data.train_file={root}/pairs_reward_train.jsonl",
                                                 f"train.max_iters={n}", f"optim.lr_decay_iters={n}",
                                                 "train.batch_size=32", "optim.learning_rate=3e-4",
                                                 "optim.min_lr=3e-5", "optim.warmup_iters=50"]))
            out["reward_model"] = {"trunk_layers": 8, "held_out_pair_accuracy": rm.after["accuracy"], "steps": n,
                                   "wall_s": time.perf_counter() - t0}
            print(f"[reward] held-out pair accuracy {rm.after['accuracy']:.1%}", flush=True)

        frontier = {"start": base_em, "ppo": [], "dpo": []}
        kls = PPO_KL if "frontier" in only else PPO_KL[:1] if "ppo" in only else []
        for kl_coef in kls:
            t0 = time.perf_counter()
            n = steps["ppo"]
            settings = [*PPO_SETTINGS, f"ppo.kl_coef={kl_coef}"]
            res = run_ppo(_load(PPOConfig, [*prompts, f"train.out_dir={root}/ppo-{kl_coef}",
                                            f"ppo.reward_model={root}/rm", f"train.max_iters={n}",
                                            f"optim.lr_decay_iters={n}", f"train.eval_interval={max(n // 4, 1)}",
                                            *settings]))
            r = measured(f"ppo_kl{kl_coef}", res, time.perf_counter() - t0, {"settings": settings, "steps": n})
            frontier["ppo"].append({"label": f"kl_coef {kl_coef}", "kl": r["kl_to_reference"],
                                    "exact_match": r["held_out_exact_match"]})
        if "frontier" in only:
            for beta in DPO_BETAS:
                t0 = time.perf_counter()
                n = steps["dpo"]
                settings = [f"dpo.beta={beta}", "optim.learning_rate=2e-4"]
                res = run_dpo(_load(DPOConfig, [*pair_stage, f"init.path={root}/sft",
                                                f"data.train_file={root}/pairs_dpo_train.jsonl",
                                                f"train.out_dir={root}/dpo-{beta}", f"train.max_iters={n}",
                                                f"optim.lr_decay_iters={n}", "train.batch_size=32", "optim.min_lr=1e-6",
                                                "optim.warmup_iters=10", *settings]))
                r = measured(f"dpo_beta{beta}", res, time.perf_counter() - t0, {"settings": settings, "steps": n})
                frontier["dpo"].append({"label": f"beta {beta}", "kl": r["kl_to_reference"],
                                        "exact_match": r["held_out_exact_match"]})
            out["frontier"] = frontier
            plot_frontier(frontier, out_path.with_name("rl_frontier.png"))

        if "speed" in only:
            import numpy as np
            from jaxllm.data.prompts import load_prompts
            ps = load_prompts(root / "prompts_train.jsonl", tok, eos_id=eos, pad_id=pad, max_prompt_len=26, log=None)
            rows = np.random.default_rng(0).integers(0, len(ps), 256)
            out["rollout_speed"] = rollout_speed(policy, root, ps.tokens[rows], 6, 1.0)

    ppo_key = f"ppo_kl{PPO_KL[0]}"
    met = {}
    if "grpo" in out:
        met["grpo_exact_match"] = out["grpo"]["held_out_exact_match"] >= TARGETS["grpo_exact_match"]
    if ppo_key in out:
        met["ppo_gain"] = out[ppo_key]["gain_points"] >= TARGETS["ppo_gain_points"]
    if "rollout_speed" in out:
        met["rollout_speedup"] = all(v["speedup"] >= TARGETS["rollout_speedup_vs_hf"]
                                     for k, v in out["rollout_speed"].items() if isinstance(v, dict))
    walls = [v["wall_s"] for k, v in out.items() if isinstance(v, dict) and "wall_s" in v]
    met["wall_times"] = all(w <= 60 * TARGETS["minutes"] for w in walls)
    out["met"] = met
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(out["met"], indent=2))


if __name__ == "__main__":
    main()
