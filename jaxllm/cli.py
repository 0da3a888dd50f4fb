"""`jaxllm <command>`: prepare | pretrain | lora | sft | reward | dpo | ppo | grpo | sample | export-hf | rag.

A training command runs as one process of a multi-process run when JAX_COORDINATOR_ADDRESS is set
(host:port of process 0, with JAX_NUM_PROCESSES and JAX_PROCESS_ID): it joins the others through
`jaxllm.parallel.initialize()` before JAX starts, train.mesh then spans every process's devices, and
only process 0 prints to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

# OSError: what the system says of a path given (too long a name, a file where a folder goes, ...)
USER_ERRORS = (ValueError, OSError, KeyError)
STAGES = ("pretrain", "lora", "sft", "reward", "dpo")   # commands that take a YAML file and key=value settings
# Commands that may span several processes; the others (sample, prepare, ...) run alone whatever the
# environment says: joining a run would wait for processes that never come.
TRAINING = (*STAGES, "ppo", "grpo")


def _cmd_prepare(args) -> None:
    from jaxllm.data import TokenDataset, prepare

    out = prepare(args.source, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                  val_fraction=args.val_fraction, text_key=args.text_key, data_dir=args.tfds_data_dir)
    print(TokenDataset(out))


def _stage_config(cls, args):
    """A stage's config: its defaults, then an optional YAML file, then key=value overrides."""
    from jaxllm.configfile import load_config

    config_path, overrides = None, []
    for item in args.settings:
        if "=" in item:
            overrides.append(item)
        elif config_path is None:
            config_path = item
        else:
            raise ValueError(f"unexpected argument {item!r}: give one YAML file, then key=value overrides")
    if args.resume:
        overrides.append("train.resume=true")
    config = load_config(cls, config_path, overrides)
    from jaxllm.runs import saved_settings

    saved = saved_settings(config.train.out_dir, args.command) if config.train.resume else None
    if saved is not None:  # resuming: the run's own settings, then whatever is given now
        # the run lives where it was found now, wherever it was started (a copied or moved run)
        saved["train"] = {**saved.get("train", {}), "out_dir": str(config.train.out_dir)}
        config = load_config(cls, config_path, overrides, base=saved)
    return config


def _print_run(out, train, val_loss, sample) -> None:
    print(f"\nfinished {train.step} steps in {train.train_seconds:.1f} s (compile {train.compile_seconds:.1f} s)")
    if val_loss is not None:
        print(f"val loss: {val_loss:.4f}")
    print(f"checkpoints: {out}/checkpoints   metrics: {out}/metrics.jsonl   tensorboard: {out}/tensorboard")
    if sample is not None:
        print("\n--- sample ---\n" + sample)


def _cmd_pretrain(args) -> None:
    from jaxllm.stages.pretrain import PretrainConfig, run_pretrain

    config = _stage_config(PretrainConfig, args)
    result = run_pretrain(config)
    _print_run(config.train.out_dir, result.train, result.val_loss, result.sample)


def _cmd_lora(args) -> None:
    from jaxllm.stages.finetune import FinetuneConfig, run_finetune

    config = _stage_config(FinetuneConfig, args)
    result = run_finetune(config)
    if result.val_loss_before is not None:
        print(f"\nval loss before tuning: {result.val_loss_before:.4f}")
    _print_run(config.train.out_dir, result.train, result.val_loss, result.sample)
    if result.adapter_dir is not None:
        print(f"adapter: {result.adapter_dir}  (jaxllm.peft.load_adapter"
              + ("; jaxllm.interop.load_peft; peft.PeftModel.from_pretrained" if config.peft.method == "lora"
                 else "") + ")")


def _cmd_sft(args) -> None:
    from jaxllm.alignment.sft import SFTConfig, run_sft

    config = _stage_config(SFTConfig, args)
    result = run_sft(config)
    _print_run(config.train.out_dir, result.train, result.after.get("val_loss"), None)
    for name, metrics in (("before", result.before), ("after", result.after)):
        if "exact_match" in metrics:
            tasks = ", ".join(f"{k.split('/', 1)[1]} {v:.1%}" for k, v in metrics.items() if k.startswith("exact_match/"))
            print(f"held-out exact match {name}: {metrics['exact_match']:.1%} ({tasks})")


def _run_pairs(args, config_cls, run) -> None:
    """`jaxllm reward` / `jaxllm dpo`: train, then the held-out pair metrics before and after."""
    config = _stage_config(config_cls, args)
    result = run(config)
    _print_run(config.train.out_dir, result.train, result.after.get("val_loss"), None)
    for when, metrics in (("before", result.before), ("after", result.after)):
        shown = {k: v for k, v in metrics.items() if k in ("val_loss", "accuracy", "margin", "rewards/accuracies",
                                                           "rewards/margins", "rewards/chosen", "rewards/rejected")}
        print(f"held-out pairs {when}: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))


def _cmd_reward(args) -> None:
    from jaxllm.alignment.reward import RewardConfig, run_reward
    _run_pairs(args, RewardConfig, run_reward)


def _cmd_dpo(args) -> None:
    from jaxllm.alignment.dpo import DPOConfig, run_dpo
    _run_pairs(args, DPOConfig, run_dpo)


def _run_online(args, config_cls, run) -> None:
    """`jaxllm ppo` / `jaxllm grpo`: train, then the held-out metrics (greedy answers) before and after."""
    config = _stage_config(config_cls, args)
    result = run(config)
    _print_run(config.train.out_dir, result.train, None, None)
    for when, metrics in (("before", result.before), ("after", result.after)):
        if metrics:
            print(f"held-out {when}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


def _cmd_ppo(args) -> None:
    from jaxllm.alignment.ppo import PPOConfig, run_ppo
    _run_online(args, PPOConfig, run_ppo)


def _cmd_grpo(args) -> None:
    from jaxllm.alignment.grpo import GRPOConfig, run_grpo
    _run_online(args, GRPOConfig, run_grpo)


def _cmd_sample(args) -> None:
    import jax
    import numpy as np
    from jaxllm.runs import load_checkpoint
    from jaxllm.sampling import SamplingConfig, cut_at_eos, generate, stream

    try:
        sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                  min_p=args.min_p, repetition_penalty=args.repetition_penalty)
    except ValueError as e:  # name the flag, not the Python argument
        name = str(e).split()[0]
        raise ValueError(f"--{name.replace('_', '-')}{str(e)[len(name):]}") from None
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not -2 ** 63 <= args.seed < 2 ** 63:   # what jax.random.key takes
        raise ValueError(f"--seed must be a 64-bit integer (from -2**63 to 2**63 - 1), got {args.seed}")
    model, _, tok, _ = load_checkpoint(args.ckpt, args.step)
    if tok is None:
        raise FileNotFoundError(f"{args.ckpt}/tokenizer is missing; the run directory is incomplete")
    try:
        prompt = tok.encode(args.prompt) or [tok.eos_id if tok.eos_id is not None else 0]
    except ValueError as e:  # a character the run's tokenizer does not have
        raise ValueError(f"--prompt {args.prompt!r} cannot be encoded: {e}") from None
    key = jax.random.key(args.seed)
    if args.stream:  # one sample at a time, each printed as its tokens arrive
        for i in range(args.num_samples):
            if args.num_samples > 1:
                print(f"--- sample {i} ---")
            print(tok.decode(prompt), end="", flush=True)
            # sample 0 uses the seed's key as is: the same text as without --stream
            key_i = key if i == 0 else jax.random.fold_in(key, i)
            for piece in stream(model, tok, prompt, args.max_new_tokens, sampling, key=key_i):
                print(piece, end="", flush=True)
            print()
        return
    # all samples in one batched call; each row draws its own randomness
    out = generate(model, np.asarray([prompt] * args.num_samples), args.max_new_tokens, sampling,
                   eos_id=tok.eos_id, key=key)
    for i, row in enumerate(np.asarray(out)):
        new = cut_at_eos(row[len(prompt):], tok.eos_id)  # the rest is padding
        if args.num_samples > 1:
            print(f"--- sample {i} ---")
        print(tok.decode(prompt + new))


def _cmd_export_hf(args) -> None:
    from jaxllm.runs import checkpoint_to_hf

    try:
        out = checkpoint_to_hf(args.ckpt, args.out, step=args.step, overwrite=args.overwrite)
    except FileExistsError as e:  # the library's advice names its keyword; here it is a flag
        raise FileExistsError(str(e).replace("pass overwrite=True", "pass --overwrite")) from None
    print(f"wrote {out}; load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")


def _rag_documents(paths) -> list[str]:
    """Documents from .txt/.md files (one document each), .jsonl files (one per line, its "text"
    field) and folders (their .txt/.md/.jsonl files, sorted)."""
    import json
    import pathlib

    docs = []
    for given in paths:
        path = pathlib.Path(given).expanduser()
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.suffix in (".txt", ".md", ".jsonl") and f.is_file())
            if not files:
                raise ValueError(f"--docs {given}: the folder holds no .txt, .md or .jsonl file")
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(f"--docs {given}: no such file or folder")
        for f in files:
            if f.suffix != ".jsonl":
                docs.append(f.read_text(encoding="utf-8"))
                continue
            for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{f}:{n}: not JSON ({e.msg}); write one {{\"text\": ...}} object per line") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"{f}:{n}: a line needs a \"text\" field holding the document")
                docs.append(record["text"])
    return docs


def _cmd_rag_index(args) -> None:
    import pathlib

    from jaxllm.apps.retrieval import DenseIndex, chunk_documents
    from jaxllm.embeddings import SentenceEncoder

    out = pathlib.Path(args.out).expanduser()
    if out.exists() and not (out / "index.json").is_file() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {args.out} exists and is not a retrieval index; choose a new or empty "
                              f"folder (an index there is replaced)")
    docs = _rag_documents(args.docs)
    chunks, _ = chunk_documents(docs, max_words=args.chunk_words, overlap=args.chunk_overlap)
    encoder = SentenceEncoder.load(args.encoder)
    DenseIndex.build(chunks, encoder).save(out)
    print(f"indexed {len(docs)} documents as {len(chunks)} chunks in {out} (encoder {encoder.identity()['name']})")


def _cmd_rag_ask(args) -> None:
    from jaxllm.apps import LLM, DenseIndex, RAGSystem, build_retriever
    from jaxllm.apps.retrieval import _query
    from jaxllm.embeddings import SentenceEncoder

    question = _query(args.question)
    retriever = build_retriever(args.retriever, dense=DenseIndex.load(args.index, SentenceEncoder.load(args.encoder)))
    if args.model is None:
        for i, hit in enumerate(retriever.retrieve(question, args.top_k), start=1):
            print(f"Document {i} (score {hit.score:.4f}): {hit.text}")
        return
    try:
        llm = LLM.load(args.model, args.step, max_new_tokens=args.max_new_tokens)
    except FileNotFoundError as e:
        raise FileNotFoundError(str(e).replace("init.path=", "--model ")) from None
    rag = RAGSystem(llm, retriever, top_k=args.top_k, max_new_tokens=args.max_new_tokens)
    result = rag.answer_question(question)
    print(f"Answer: {result.answer}")
    for i, hit in enumerate(result.documents, start=1):
        print(f"Document {i} (score {hit.score:.4f}): {hit.text}")
    if result.dropped:
        print(f"({result.dropped} retrieved document(s) dropped, lowest-scored first, to fit the model's "
              f"context of {llm.context_size} tokens)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxllm", description="GPT-style language models in JAX/Flax.")
    sub = p.add_subparsers(dest="command", required=True)

    pp = sub.add_parser("prepare", help="tokenize a corpus into a token dataset on disk")
    pp.add_argument("--source", default="shakespeare",
                    help="'shakespeare' (bundled), a text file, folder or glob, or tfds:NAME[/CONFIG][:SPLIT]")
    pp.add_argument("--out", default="data_cache/shakespeare-char", help="output directory")
    pp.add_argument("--tokenizer", default="char", help="char | bpe | gpt2 | path to tokenizer.json")
    pp.add_argument("--vocab-size", type=int, default=None, help="vocabulary size for --tokenizer bpe")
    pp.add_argument("--val-fraction", type=float, default=0.1)
    pp.add_argument("--text-key", default=None, help="TFDS feature holding the text")
    pp.add_argument("--tfds-data-dir", default=None)
    pp.set_defaults(func=_cmd_prepare)

    def stage(name: str, help: str, example: str, func) -> None:
        """A training stage's command: [CONFIG.yaml] [section.key=value ...] and --resume."""
        sp = sub.add_parser(name, help=help)
        sp.add_argument("settings", nargs="*", help="[CONFIG.yaml] [section.key=value ...]" + example)
        sp.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
        sp.set_defaults(func=func)

    stage("pretrain", "pretrain a GPT (no arguments: char-level Shakespeare on CPU)", "", _cmd_pretrain)
    stage("lora", "fine-tune LoRA / adapters / a prefix on a base model (no arguments: LoRA on the default "
                  "pretrain run)", ", e.g. init.path=RUN_OR_HF_DIR peft.method=lora peft.lora.r=8", _cmd_lora)
    stage("sft", "instruction tuning (no arguments: a small model on the synthetic tasks)",
          ", e.g. data.train_file=train.jsonl data.eval_file=eval.jsonl init.path=RUN", _cmd_sft)
    stage("reward", "train a reward model on preference pairs (init.path= an SFT run or HF dir)",
          ", e.g. init.path=runs/sft data.train_file=pairs.jsonl data.eval_file=held.jsonl", _cmd_reward)
    stage("dpo", "direct preference optimization (init.path= an SFT run or HF dir)",
          ", e.g. init.path=runs/sft data.train_file=pairs.jsonl data.eval_file=held.jsonl dpo.beta=0.1", _cmd_dpo)
    stage("ppo", "RLHF with PPO against a reward model (init.path= an SFT run or HF dir)",
          ", e.g. init.path=runs/sft ppo.reward_model=runs/rm data.train_file=prompts.jsonl", _cmd_ppo)
    stage("grpo", "GRPO with reward functions and/or a reward model (init.path= an SFT run or HF dir)",
          ", e.g. init.path=runs/sft data.train_file=prompts.jsonl grpo.reward_funcs=[exact_match]", _cmd_grpo)

    ps = sub.add_parser("sample", help="generate text from a training run's checkpoint")
    ps.add_argument("--ckpt", required=True, help="the run directory (train.out_dir)")
    ps.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ps.add_argument("--prompt", default="\n")
    ps.add_argument("--max-new-tokens", type=int, default=200)
    ps.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ps.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    ps.add_argument("--top-p", type=float, default=1.0, help="nucleus: smallest set with mass >= p (1 = off)")
    ps.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    ps.add_argument("--repetition-penalty", type=float, default=1.0, help="HF/CTRL penalty on seen tokens (1 = off)")
    ps.add_argument("--num-samples", type=int, default=1, help="samples, generated as one batch")
    ps.add_argument("--stream", action="store_true", help="print text as it is generated")
    ps.add_argument("--seed", type=int, default=0)
    ps.set_defaults(func=_cmd_sample)

    pe = sub.add_parser("export-hf", help="write a run's checkpoint as a Hugging Face GPT-2 directory")
    pe.add_argument("--ckpt", required=True, help="the run directory (train.out_dir)")
    pe.add_argument("--out", required=True, help="output directory (new or empty)")
    pe.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    pe.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    pe.set_defaults(func=_cmd_export_hf)

    pr = sub.add_parser("rag", help="retrieval-augmented generation: index documents, ask questions")
    rag = pr.add_subparsers(dest="rag_command", required=True)
    ri = rag.add_parser("index", help="chunk and embed documents into a retrieval index on disk")
    ri.add_argument("--docs", nargs="+", required=True, help=".txt/.md files, .jsonl files ({\"text\": ...} per line) "
                    "or folders of them")
    ri.add_argument("--out", required=True, help="index folder (written atomically; an index there is replaced)")
    ri.add_argument("--chunk-words", type=int, default=120, help="words per chunk")
    ri.add_argument("--chunk-overlap", type=int, default=30, help="words shared by neighbouring chunks")
    ri.add_argument("--encoder", default=None, help="sentence-transformers folder (default: all-MiniLM-L6-v2)")
    ri.set_defaults(func=_cmd_rag_index)
    ra = rag.add_parser("ask", help="answer a question from an index (without --model: show what is retrieved)")
    ra.add_argument("--index", required=True, help="a folder written by `jaxllm rag index`")
    ra.add_argument("--question", required=True)
    ra.add_argument("--model", default=None, help="a jaxllm run directory or a Hugging Face GPT-2 folder")
    ra.add_argument("--step", type=int, default=None, help="checkpoint step of a run (default: latest)")
    ra.add_argument("--retriever", choices=["hybrid", "dense", "bm25"], default="hybrid")
    ra.add_argument("--top-k", type=int, default=3, help="documents put in the prompt")
    ra.add_argument("--max-new-tokens", type=int, default=32)
    ra.add_argument("--encoder", default=None, help="the encoder the index was built with (default: all-MiniLM-L6-v2)")
    ra.set_defaults(func=_cmd_rag_ask)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # parse_known_args so `key=value` overrides may also follow options like --resume
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command not in STAGES or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.settings += extra
    from jaxllm import parallel
    from jaxllm.training.loop import NonFiniteLossError

    parallel.setup_cpu()  # one JAX device per core, before JAX starts (see jaxllm/parallel.py)
    quiet = False
    if args.command in TRAINING and os.environ.get("JAX_COORDINATOR_ADDRESS"):
        try:   # before any JAX computation, as jax.distributed requires
            parallel.initialize()
        except (ValueError, RuntimeError) as e:
            print(f"jaxllm {args.command}: error: {e}", file=sys.stderr)
            return 2
        # the processes report the same numbers: process 0 prints them (errors, on stderr, still
        # come from every process)
        quiet = not parallel.is_main_process()

    try:
        with contextlib.ExitStack() as stack:
            if quiet:
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
            args.func(args)
    except (*USER_ERRORS, NonFiniteLossError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"jaxllm {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if str(e) != "Could not determine home directory.":  # pathlib, on "~user/..." of an unknown user
            raise
        print(f"jaxllm {args.command}: error: a path given starts with ~user for a user unknown here "
              f"(Python: {e}); write that path in full", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
