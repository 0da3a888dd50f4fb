"""Supervised fine-tuning (SFT): `jaxllm sft` / `python train/sft.py`.

Instruction data (JSONL in Alpaca, prompt/completion or chat format; see jaxllm.data.instruct) or
the built-in synthetic tasks (jaxllm.data.synthetic) become rows of tokens with labels only on
responses (+ EOS), packed several examples per row by default. The loss is next-token
cross-entropy on those labels, with attention block-diagonal between packed examples and
positions restarting in each. Full fine-tuning, or LoRA / adapters / prefix via `peft.method`,
from scratch (`init.path` unset), from a jaxllm run or from a Hugging Face GPT-2 directory.
Held-out exact-match accuracy (greedy generation) is measured before, during and after training.

With no arguments: a small model from scratch on the four synthetic tasks, on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import typing

import numpy as np
from flax import nnx

from jaxllm import parallel
from jaxllm.alignment.pairs import rows_batch_fn
from jaxllm.configfile import to_dict
from jaxllm.data.instruct import example_spans, load_instruct, tokenize_records
from jaxllm.data.packing import Rows, model_inputs
from jaxllm.data.synthetic import TASKS, TaskSettings, exact_match, make_splits, task_tokenizer
from jaxllm.losses import IGNORE_INDEX, cross_entropy_sum
from jaxllm.model import GPT, count_params
from jaxllm.peft import PeftSection, apply_method, format_report, parameter_report
from jaxllm.runs import check_resume, load_base, peft_run_meta
from jaxllm.stages.sections import InitConfig, ModelSection, resolve_model_config
from jaxllm.tokenizer import load_tokenizer
from jaxllm.training.loop import LoopConfig, TrainResult, train_loop
from jaxllm.training.optim import OptimConfig
from jaxllm.training.step import evaluate_model, make_eval_step


@dataclasses.dataclass(frozen=True)
class SFTDataConfig:
    train_file: typing.Optional[str] = None   # JSONL; unset: the built-in synthetic tasks
    eval_file: typing.Optional[str] = None    # JSONL of held-out examples (needed with train_file)
    format: str = "auto"                      # auto | alpaca | prompt_completion | chat
    tokenizer: typing.Optional[str] = None    # default: the base's, or the task tokenizer from scratch
    packing: bool = True
    truncation: str = "keep_start"            # keep_start | drop (examples longer than block_size)
    on_error: str = "raise"                   # raise | skip (malformed JSONL lines, counted)
    eos_id: typing.Optional[int] = None
    pad_id: typing.Optional[int] = None
    # the synthetic tasks (when train_file is unset)
    tasks: str = ",".join(TASKS)              # comma-separated subset of add,reverse,sort,map
    task_format: str = "compact"              # compact ("add 12+5=" -> "17") | alpaca | prompt_completion | chat
    n_train: int = 20000                      # examples per task (at most: map has ~3,500)
    n_eval: int = 100                         # held-out examples per task
    task_seed: int = 0
    n_digits: int = 3                         # addition operands up to this many digits
    reverse_sum: bool = True                  # sums written least-significant digit first
    pad_operands: bool = True                 # operands zero-padded to n_digits: "add 007+120="


@dataclasses.dataclass(frozen=True)
class SFTEvalConfig:
    examples: int = 400        # held-out examples scored by exact match (0: loss only)
    batch_size: int = 100      # prompts generated together

    def __post_init__(self):
        if self.examples < 0:
            raise ValueError(f"eval.examples must be >= 0 (0: the loss only), got {self.examples}")
        if self.batch_size <= 0:
            raise ValueError(f"eval.batch_size must be positive, got {self.batch_size}")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    init: InitConfig = dataclasses.field(default_factory=InitConfig)
    model: ModelSection = dataclasses.field(default_factory=lambda: ModelSection(
        preset="cpu-small", block_size=128, dropout=0.0))     # from scratch only
    peft: PeftSection = dataclasses.field(default_factory=lambda: PeftSection(method="full"))
    data: SFTDataConfig = dataclasses.field(default_factory=SFTDataConfig)
    eval: SFTEvalConfig = dataclasses.field(default_factory=SFTEvalConfig)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(
        learning_rate=2e-3, min_lr=2e-4, warmup_iters=100, lr_decay_iters=1500, beta2=0.99))
    train: LoopConfig = dataclasses.field(default_factory=lambda: LoopConfig(
        out_dir="runs/sft", batch_size=32, max_iters=1500, eval_interval=500, log_interval=20,
        ckpt_interval=500))


@dataclasses.dataclass
class SFTResult:
    train: TrainResult
    before: dict          # eval metrics of the model as it started
    after: dict           # eval metrics at the end
    rows_fill: float      # share of row tokens that are real (not padding)
    config: typing.Any    # GPTConfig


def sft_loss_fn(model, batch: Rows, key):
    """Next-token loss on response labels; packed segments see only themselves."""
    logits_BTV = model(batch.tokens, dropout_key=key, **model_inputs(batch))
    return cross_entropy_sum(logits_BTV[:, :-1], batch.labels[:, 1:])


def _records(config: SFTConfig):
    d = config.data
    if d.train_file is None:
        tasks = tuple(t.strip() for t in d.tasks.split(",") if t.strip())
        settings = TaskSettings(n_digits=d.n_digits, reverse_sum=d.reverse_sum, pad_operands=d.pad_operands)
        train, held = make_splits(d.n_train, d.n_eval, tasks=tasks, seed=d.task_seed,
                                   format=d.task_format, settings=settings, train_at_most=True)
        return train, held, "synthetic tasks " + ",".join(tasks)
    if d.eval_file is None:
        raise ValueError("data.eval_file is needed with data.train_file: held-out examples to score")
    return None, None, d.train_file


def _model_and_tokenizer(config: SFTConfig):
    d, init = config.data, config.init
    if init.path:
        model, cfg, base_tok = load_base(init.path, init.step, **init.compute())
        tok = load_tokenizer(d.tokenizer) if d.tokenizer else base_tok
        if tok is None:
            raise ValueError(f"the base {init.path} has no tokenizer; set data.tokenizer")
        return model, cfg, tok
    if config.peft.method != "full":
        raise ValueError(f"peft.method={config.peft.method} tunes a pretrained base: set init.path "
                         f"(a jaxllm run or an HF GPT-2 directory), or use peft.method=full from scratch")
    if d.tokenizer:
        tok = load_tokenizer(d.tokenizer)
    elif d.train_file is None:
        tok = task_tokenizer()
    else:
        raise ValueError("training from scratch on data.train_file needs data.tokenizer (e.g. gpt2, "
                         "or a tokenizer.json / saved tokenizer directory)")
    cfg = resolve_model_config(config.model, tok.vocab_size)
    return GPT(cfg, rngs=nnx.Rngs(config.train.seed)), cfg, tok


def _evaluator(val_rows: Rows, held_records, tok, ds_ids, fmt: str, config: SFTConfig):
    batch = config.eval.batch_size
    n_val = val_rows.tokens.shape[0]
    scored = list(held_records[:config.eval.examples]) if config.eval.examples else []

    def make_eval(graphdef, mesh=None):
        eval_step = make_eval_step(graphdef, sft_loss_fn, mesh)

        def evaluate(state):
            total = count = 0.0
            for s in range(0, n_val, batch):
                idx = np.arange(s, s + batch) % n_val    # fixed shape: the last batch wraps ...
                rows = Rows(*(a[idx] for a in val_rows))
                keep = np.arange(s, s + batch) < n_val   # ... and its repeats are not counted
                rows = rows._replace(labels=np.where(keep[:, None], rows.labels, -100))
                t, c = eval_step(state, rows)
                total, count = total + t, count + c   # summed on device: no host sync per batch
            out = {"val_loss": float(total) / max(float(count), 1.0)}
            if scored:
                # generation on one device, whatever the training mesh (spanning processes too)
                model = nnx.merge(graphdef, *parallel.on_one_device((state.trainable, state.frozen)))
                report = exact_match(model, tok, scored, format=fmt, batch_size=batch, eos_id=ds_ids[0],
                                     pad_id=ds_ids[1])
                out["exact_match"] = report.accuracy
                out.update({f"exact_match/{t}": a for t, a in report.per_task.items()})
            return out
        return evaluate
    return make_eval


def run_sft(config: SFTConfig) -> SFTResult:
    d, loop = config.data, config.train
    model, cfg, tok = _model_and_tokenizer(config)
    T = cfg.block_size
    train_records, held_records, source = _records(config)
    common = dict(format=d.format, max_len=T, truncation=d.truncation, on_error=d.on_error,
                  eos_id=d.eos_id, pad_id=d.pad_id)
    if train_records is None:
        train_ds = load_instruct(d.train_file, tok, **common)
        val_ds = load_instruct(d.eval_file, tok, **common)
        held_records = _scorable_records(d.eval_file, val_ds.stats.format)
    else:
        train_ds = tokenize_records(train_records, tok, source="train split", **common)
        val_ds = tokenize_records(held_records, tok, source="held-out split", **common)
    if not train_ds.examples or not val_ds.examples:
        raise ValueError(f"no usable examples in {source}: {train_ds.stats.summary()}")
    if max(tok.vocab_size, train_ds.eos_id + 1, train_ds.pad_id + 1) > cfg.vocab_size:
        raise ValueError(f"the tokenizer needs {tok.vocab_size} ids but the model has {cfg.vocab_size}")
    train_rows = train_ds.rows(T, packing=d.packing)
    val_rows = val_ds.rows(T, packing=False)
    fill = float((train_rows.segment_ids > 0).mean())
    trainable = apply_method(model, config.peft)
    report = parameter_report(model, trainable)
    print(f"sft on {source}: {len(train_ds.examples):,} train examples in {train_rows.tokens.shape[0]:,} rows "
          f"of {T} ({'packed' if d.packing else 'padded'}, {fill:.0%} real tokens); "
          f"{len(val_ds.examples):,} held out")
    print(f"model: {count_params(model):,} parameters; method: {config.peft.method}; {format_report(report)}")

    peft_meta = peft_run_meta(model, trainable, config.init)
    meta = {"kind": "sft", "model": cfg.to_dict(), "config": to_dict(config),
            "data": {"source": source, "eos_id": train_ds.eos_id, "pad_id": train_ds.pad_id}, **peft_meta}
    make_eval = _evaluator(val_rows, held_records, tok, (train_ds.eos_id, train_ds.pad_id),
                           val_ds.stats.format or "auto", config)
    before = evaluate_model(model, trainable, make_eval)
    print("before: " + _describe(before))
    result = train_loop(model, sft_loss_fn, rows_batch_fn(train_rows, loop.seed, loop.batch_size, loop.grad_accum),
                        optim=config.optim, loop=loop, meta=meta, make_eval=make_eval, trainable=trainable,
                        tokens_per_step=loop.batch_size * loop.grad_accum * T,
                        flops_per_token=cfg.flops_per_token(T), tokenizer=tok, checkpoint_frozen=not peft_meta,
                        check_resume=lambda saved, where: check_resume(saved, meta, where),
                        pad_values=Rows(train_ds.pad_id, IGNORE_INDEX, 0, 0))
    after = result.evals[max(result.evals)] if result.evals else {}
    print("after:  " + _describe(after))
    return SFTResult(result, before, after, fill, cfg)


def _describe(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def _scorable_records(path, format: str) -> list[dict]:
    """The held-out file's records that exact match can score (tokenizing already reported the rest)."""
    out = []
    with open(path, "rb") as f:
        for i, line in enumerate(f, start=1):
            try:
                record = json.loads(line.decode("utf-8"))
                example_spans(record, format, source=str(path), line=i)
            except (ValueError, RecursionError):  # not UTF-8, not JSON, InstructDataError
                continue
            out.append(record)
    return out
