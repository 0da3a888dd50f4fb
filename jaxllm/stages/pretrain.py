"""Pretraining: next-token loss on a token corpus, driven by the shared loop.

`PretrainConfig()` with no changes is nanoGPT's CPU recipe for character-level Shakespeare.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from jaxllm.config import GPTConfig
from jaxllm.configfile import to_dict
from jaxllm.model import GPT, count_params
from jaxllm.stages.corpus import LM_PAD, corpus_batches, load_or_prepare, make_val_evaluator, with_dataset_dir
from jaxllm.stages.sections import DataConfig, ModelSection, SampleConfig, resolve_model_config, sample_text
from jaxllm.training.loop import LoopConfig, TrainResult, train_loop
from jaxllm.training.optim import OptimConfig
from jaxllm.training.step import lm_loss_fn


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(
        learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, lr_decay_iters=2000, beta2=0.99))
    train: LoopConfig = dataclasses.field(default_factory=lambda: LoopConfig(
        out_dir="runs/shakespeare-char", batch_size=12, max_iters=2000, eval_interval=500,
        log_interval=10, ckpt_interval=500))
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)


@dataclasses.dataclass
class PretrainResult:
    train: TrainResult
    val_loss: float | None
    sample: str | None
    config: GPTConfig


def run_pretrain(config: PretrainConfig) -> PretrainResult:
    ds = load_or_prepare(config.data)
    config = with_dataset_dir(config, ds)
    cfg = resolve_model_config(config.model, ds.vocab_size)
    ds.check_block_size(cfg.block_size)
    loop = config.train
    model = GPT(cfg, rngs=nnx.Rngs(loop.seed))
    print(f"model: {count_params(model):,} parameters ({cfg.n_layer} layers, {cfg.n_head} heads, "
          f"{cfg.n_embd} wide, block {cfg.block_size}); data: {ds}")

    B, A, T = loop.batch_size, loop.grad_accum, cfg.block_size
    meta = {"kind": "pretrain", "model": cfg.to_dict(), "config": to_dict(config), "data": ds.meta}
    result = train_loop(
        model, lm_loss_fn, corpus_batches(ds, loop, T), optim=config.optim, loop=loop, meta=meta,
        make_eval=make_val_evaluator(ds, T, config.data.eval_batch_size, config.data.eval_batches),
        tokens_per_step=B * A * T, flops_per_token=cfg.flops_per_token(T), tokenizer=ds.tokenizer, pad_values=LM_PAD)
    val_loss = result.evals[max(result.evals)]["val_loss"] if result.evals else None
    return PretrainResult(result, val_loss, sample_text(result.model, ds.tokenizer, config.sample), cfg)
