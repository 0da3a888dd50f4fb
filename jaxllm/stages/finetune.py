"""Fine-tuning a base on a text corpus: `jaxllm lora` / `python train/lora.py`.

A base (a jaxllm run or a Hugging Face GPT-2 directory) gets LoRA, bottleneck adapters or a
prefix (peft.method; `full` trains every weight), and trains with the next-token loss on a text
corpus tokenized by the base's own tokenizer, through the same loop, metrics and checkpoints as
pretraining. A PEFT run ends with `out_dir/adapter` (jaxllm's adapter files, plus PEFT's for a LoRA).

With no arguments it tunes the default `jaxllm pretrain` run (runs/shakespeare-char) on the
bundled tiny-shakespeare with LoRA r=8 on q and v.
"""

from __future__ import annotations

import dataclasses
import pathlib

from jaxllm import parallel
from jaxllm.configfile import to_dict
from jaxllm.fileio import new_dir
from jaxllm.interop.peft_files import write_peft_files
from jaxllm.peft import PeftSection, apply_method, format_report, parameter_report
from jaxllm.peft.files import describe_peft, write_adapter_files
from jaxllm.runs import base_tokenizer_spec, check_resume, load_base, peft_run_meta
from jaxllm.stages.corpus import LM_PAD, corpus_batches, load_or_prepare, make_val_evaluator, with_dataset_dir
from jaxllm.stages.sections import DataConfig, InitConfig, SampleConfig, sample_text
from jaxllm.training.loop import LoopConfig, TrainResult, train_loop
from jaxllm.training.optim import OptimConfig
from jaxllm.training.rundir import ADAPTER
from jaxllm.training.step import evaluate_model, lm_loss_fn


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    init: InitConfig = dataclasses.field(default_factory=lambda: InitConfig(path="runs/shakespeare-char"))
    peft: PeftSection = dataclasses.field(default_factory=PeftSection)
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(eval_batches=20))
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(
        learning_rate=1e-3, min_lr=1e-4, warmup_iters=20, lr_decay_iters=300, weight_decay=0.0))
    train: LoopConfig = dataclasses.field(default_factory=lambda: LoopConfig(
        out_dir="runs/lora", batch_size=12, max_iters=300, eval_interval=100, log_interval=10,
        ckpt_interval=100))
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)


@dataclasses.dataclass
class FinetuneResult:
    train: TrainResult
    val_loss_before: float | None
    val_loss: float | None
    report: dict
    adapter_dir: pathlib.Path | None   # None for full fine-tuning
    sample: str | None


def save_adapter_dir(model, out_dir, base: str | None) -> pathlib.Path:
    """jaxllm's adapter files, plus Hugging Face PEFT's for a LoRA-only model, in one new directory."""
    desc = describe_peft(model)
    with new_dir(out_dir, overwrite=True) as tmp:
        write_adapter_files(model, tmp, base=base)
        if desc["lora"] and not desc["adapter"] and not desc["prefix"]:
            write_peft_files(model, tmp, base=base)
    return pathlib.Path(out_dir).absolute()


def run_finetune(config: FinetuneConfig) -> FinetuneResult:
    if not config.init.path:
        raise ValueError("init.path is required: the jaxllm run or HF GPT-2 directory to tune")
    model, cfg, base_tok = load_base(config.init.path, config.init.step, **config.init.compute())
    tok_spec = base_tokenizer_spec(config.data.tokenizer, config.init.path, base_tok)
    ds = load_or_prepare(config.data, tokenizer=tok_spec)
    config = with_dataset_dir(config, ds)
    if ds.vocab_size > cfg.vocab_size:
        raise ValueError(f"the dataset's tokenizer has {ds.vocab_size} ids but the base model only "
                         f"{cfg.vocab_size}; prepare the data with the base's tokenizer (leave data.tokenizer unset)")
    T = cfg.block_size
    ds.check_block_size(T)
    trainable = apply_method(model, config.peft)
    report = parameter_report(model, trainable)
    print(f"base: {config.init.path} ({cfg.n_layer} layers, {cfg.n_embd} wide); method: {config.peft.method}")
    print(format_report(report))

    loop, d = config.train, config.data
    make_eval = make_val_evaluator(ds, T, d.eval_batch_size, d.eval_batches)
    peft_meta = peft_run_meta(model, trainable, config.init)
    meta = {"kind": "lora", "model": cfg.to_dict(), "config": to_dict(config), "data": ds.meta, **peft_meta}
    before = evaluate_model(model, trainable, make_eval)["val_loss"]
    result = train_loop(model, lm_loss_fn, corpus_batches(ds, loop, T), optim=config.optim, loop=loop, meta=meta,
                        make_eval=make_eval, trainable=trainable, tokens_per_step=loop.batch_size * loop.grad_accum * T,
                        flops_per_token=cfg.flops_per_token(T), tokenizer=ds.tokenizer, pad_values=LM_PAD,
                        checkpoint_frozen=not peft_meta,
                        check_resume=lambda saved, where: check_resume(saved, meta, where))
    val = result.evals[max(result.evals)]["val_loss"] if result.evals else None
    adapter_dir = None
    if peft_meta:
        # absolute: new_dir expands a leading "~", which the run's checkpoints beside it do not
        adapter_dir = pathlib.Path(loop.out_dir).absolute() / ADAPTER
        if parallel.is_main_process():   # every process holds the whole model; one writes the run
            save_adapter_dir(result.model, adapter_dir, meta["base"]["path"])
        parallel.sync("jaxllm-adapter-written")   # no process reports a folder still being written
    return FinetuneResult(result, before, val, report, adapter_dir, sample_text(result.model, ds.tokenizer, config.sample))
