"""Parameter-efficient fine-tuning on text: `jaxllm lora` / `python train/lora.py`.

A base (a jaxllm run or a Hugging Face GPT-2 directory) gets LoRA, bottleneck adapters or a
prefix (peft.method), and only those weights train, with the next-token loss on a text corpus
tokenized by the base's own tokenizer, through the same loop, metrics and checkpoints as
pretraining. The run ends with `out_dir/adapter` (jaxllm's adapter files, plus PEFT's for LoRA).

With no arguments it tunes the default `jaxllm pretrain` run (runs/shakespeare-char) on the
bundled tiny-shakespeare with LoRA r=8 on q and v.
"""

from __future__ import annotations

import dataclasses
import pathlib
import typing

from jaxllm.configfile import to_dict
from jaxllm.peft import format_report, parameter_report, save_adapter
from jaxllm.training.finetune import (PeftSection, apply_method, evaluate_model, load_base, peft_run_meta,
                                      tokenizer_spec)
from jaxllm.training.loop import LoopConfig, TrainResult, train_loop
from jaxllm.training.optim import OptimConfig
from jaxllm.training.pretrain import (SampleConfig, corpus_batches, load_or_prepare, make_val_evaluator,
                                      sample_text)
from jaxllm.training.step import lm_loss_fn

ADAPTER_SUBDIR = "adapter"


@dataclasses.dataclass(frozen=True)
class InitConfig:
    path: typing.Optional[str] = "runs/shakespeare-char"   # a jaxllm run dir or an HF GPT-2 dir
    step: typing.Optional[int] = None     # checkpoint step of a jaxllm run (default: latest)


@dataclasses.dataclass(frozen=True)
class TextDataConfig:
    source: str = "shakespeare"       # "shakespeare", a file/folder/glob, or "tfds:NAME[/CONFIG][:SPLIT]"
    tokenizer: typing.Optional[str] = None    # default: the base model's own tokenizer
    dataset_dir: typing.Optional[str] = None  # default: data_cache/<source>-<tokenizer>
    val_fraction: float = 0.1
    text_key: typing.Optional[str] = None
    tfds_data_dir: typing.Optional[str] = None
    eval_batch_size: int = 64
    eval_batches: typing.Optional[int] = 20


@dataclasses.dataclass(frozen=True)
class LoraRunConfig:
    init: InitConfig = dataclasses.field(default_factory=InitConfig)
    peft: PeftSection = dataclasses.field(default_factory=PeftSection)
    data: TextDataConfig = dataclasses.field(default_factory=TextDataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(
        learning_rate=1e-3, min_lr=1e-4, warmup_iters=20, lr_decay_iters=300, weight_decay=0.0))
    train: LoopConfig = dataclasses.field(default_factory=lambda: LoopConfig(
        out_dir="runs/lora", batch_size=12, max_iters=300, eval_interval=100, log_interval=10,
        ckpt_interval=100))
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)


@dataclasses.dataclass
class LoraRunResult:
    train: TrainResult
    val_loss_before: float | None
    val_loss: float | None
    report: dict
    adapter_dir: pathlib.Path
    sample: str | None


def run_lora(config: LoraRunConfig) -> LoraRunResult:
    from jaxllm.training.pretrain import DataConfig

    if not config.init.path:
        raise ValueError("init.path is required: the jaxllm run or HF GPT-2 directory to tune")
    model, cfg, base_tok = load_base(config.init.path, config.init.step)
    d = config.data
    tok_spec = tokenizer_spec(d.tokenizer, config.init.path, base_tok)
    data = DataConfig(source=d.source, tokenizer=tok_spec, dataset_dir=d.dataset_dir, val_fraction=d.val_fraction,
                      text_key=d.text_key, tfds_data_dir=d.tfds_data_dir, eval_batch_size=d.eval_batch_size,
                      eval_batches=d.eval_batches)
    ds = load_or_prepare(data)
    if ds.vocab_size > cfg.vocab_size:
        raise ValueError(f"the dataset's tokenizer has {ds.vocab_size} ids but the base model only "
                         f"{cfg.vocab_size}; prepare the data with the base's tokenizer (leave data.tokenizer unset)")
    T = cfg.block_size
    ds.check_block_size(T)
    trainable = apply_method(model, config.peft)
    report = parameter_report(model, trainable)
    print(f"base: {config.init.path} ({cfg.n_layer} layers, {cfg.n_embd} wide); method: {config.peft.method}")
    print(format_report(report))

    loop = config.train
    B, A = loop.batch_size, loop.grad_accum
    make_eval = make_val_evaluator(ds, T, d.eval_batch_size, d.eval_batches)
    batch_fn, save_tokenizer = corpus_batches(ds, loop, T)

    peft_meta = peft_run_meta(model, trainable, config.init)
    meta = {"kind": "lora", "model": cfg.to_dict(), "config": to_dict(config), "data": ds.meta, **peft_meta}
    before = evaluate_model(model, trainable, make_eval)["val_loss"]
    result = train_loop(model, lm_loss_fn, batch_fn, optim=config.optim, loop=loop, meta=meta,
                        make_eval=make_eval, trainable=trainable, tokens_per_step=B * A * T,
                        flops_per_token=cfg.flops_per_token(T), on_start=save_tokenizer,
                        checkpoint_frozen=not peft_meta)
    val = result.evals[max(result.evals)]["val_loss"] if result.evals else None
    adapter_dir = pathlib.Path(loop.out_dir) / ADAPTER_SUBDIR
    if peft_meta:
        save_adapter(result.model, adapter_dir, overwrite=True, base=meta["base"]["path"])

    return LoraRunResult(result, before, val, report, adapter_dir, sample_text(result.model, ds.tokenizer, config.sample))
