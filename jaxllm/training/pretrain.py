"""Pretraining: next-token loss on a token corpus, driven by the shared loop.

`PretrainConfig()` with no changes is nanoGPT's CPU recipe for character-level Shakespeare.
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import typing

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.config import GPTConfig
from jaxllm.configfile import to_dict
from jaxllm.data import TokenDataset, prepare
from jaxllm.data.sources import describe_source
from jaxllm.model import GPT, count_params
from jaxllm.sampling import generate
from jaxllm.training.loop import LoopConfig, TrainResult, train_loop
from jaxllm.training.optim import OptimConfig
from jaxllm.training.step import lm_loss_fn, make_eval_step, mask_rows

# The model section: a preset name plus any GPTConfig field to override (None keeps the preset's).
ModelSection = dataclasses.make_dataclass(
    "ModelSection",
    [("preset", str, "cpu-small")]
    + [(f.name, typing.Optional[f.type], None) for f in dataclasses.fields(GPTConfig)],
    frozen=True, namespace={"__module__": __name__})


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "shakespeare"       # "shakespeare", a file/folder/glob, or "tfds:NAME[/CONFIG][:SPLIT]"
    tokenizer: str = "char"           # char | bpe | gpt2 | path to tokenizer.json or a saved tokenizer
    vocab_size: typing.Optional[int] = None   # for tokenizer=bpe
    dataset_dir: typing.Optional[str] = None  # default: data_cache/<source>-<tokenizer>
    val_fraction: float = 0.1
    text_key: typing.Optional[str] = None     # TFDS feature holding the text
    tfds_data_dir: typing.Optional[str] = None
    eval_batch_size: int = 64
    eval_batches: typing.Optional[int] = None  # None: the whole val split


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    prompt: str = "\n"
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 0
    seed: int = 0


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


def default_dataset_dir(data: DataConfig) -> pathlib.Path:
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{data.source}-{data.tokenizer}")
    return pathlib.Path("data_cache") / name.strip("_")


def load_or_prepare(data: DataConfig) -> TokenDataset:
    path = pathlib.Path(data.dataset_dir) if data.dataset_dir else default_dataset_dir(data)
    if (path / "meta.json").is_file():
        ds = TokenDataset(path)
        if ds.meta.get("source") != describe_source(data.source):
            raise ValueError(
                f"data.dataset_dir {path} was prepared from {ds.meta.get('source')!r}, not from "
                f"data.source={data.source!r}; choose another data.dataset_dir or delete that one")
        return ds
    print(f"preparing {data.source!r} with the {data.tokenizer!r} tokenizer into {path} ...")
    prepare(data.source, path, tokenizer=data.tokenizer, vocab_size=data.vocab_size,
            val_fraction=data.val_fraction, text_key=data.text_key, data_dir=data.tfds_data_dir)
    return TokenDataset(path)


def resolve_model_config(section, data_vocab_size: int) -> GPTConfig:
    overrides = {k: v for k, v in dataclasses.asdict(section).items() if k != "preset" and v is not None}
    explicit_vocab = overrides.pop("vocab_size", None)
    cfg = GPTConfig.preset(section.preset, **overrides)
    if explicit_vocab is None:
        return cfg.replace(vocab_size=data_vocab_size)
    if explicit_vocab < data_vocab_size:
        raise ValueError(
            f"model.vocab_size={explicit_vocab} is smaller than the tokenizer's vocabulary "
            f"({data_vocab_size}); remove model.vocab_size to take it from the data, or raise it")
    return cfg.replace(vocab_size=explicit_vocab)


def make_val_evaluator(ds: TokenDataset, block_size: int, batch_size: int, max_batches: int | None):
    def make_eval(graphdef, mesh=None):
        eval_step = make_eval_step(graphdef, lm_loss_fn, mesh)

        def evaluate(state):
            total, count = 0.0, 0.0
            for x, y, mask in ds.eval_windows("val", block_size, batch_size, max_batches):
                s, c = eval_step(state, (x, mask_rows(y, mask)))
                total, count = total + s, count + c
            return {"val_loss": total / count}
        return evaluate
    return make_eval


def corpus_batches(ds: TokenDataset, loop: LoopConfig, T: int):
    """(batch_fn, save_tokenizer) for a next-token stage on a token corpus: batch_fn(step) is a pure
    function of (seed, step) with the accumulation axis in front; save_tokenizer copies the
    dataset's tokenizer into the run directory, so the run can be sampled from on its own."""
    B, A = loop.batch_size, loop.grad_accum

    def batch_fn(step):
        x, y = ds.sample_batch("train", loop.seed, step, B * A, T)
        return x.reshape(A, B, T), y.reshape(A, B, T)

    def save_tokenizer():
        dst = pathlib.Path(loop.out_dir) / "tokenizer"
        if not dst.exists():
            shutil.copytree(ds.path / "tokenizer", dst)

    return batch_fn, save_tokenizer


def sample_text(model, tok, sample: SampleConfig) -> str | None:
    """The end-of-run sample a training command prints (None when sample.max_new_tokens is 0)."""
    if sample.max_new_tokens <= 0:
        return None
    prompt = tok.encode(sample.prompt) or [tok.eos_id or 0]
    ids = generate(model, np.asarray(prompt), sample.max_new_tokens, temperature=sample.temperature,
                   top_k=sample.top_k, key=jax.random.key(sample.seed))
    return tok.decode(np.asarray(ids))


def run_pretrain(config: PretrainConfig) -> PretrainResult:
    ds = load_or_prepare(config.data)
    cfg = resolve_model_config(config.model, ds.vocab_size)
    ds.check_block_size(cfg.block_size)
    loop = config.train
    model = GPT(cfg, rngs=nnx.Rngs(loop.seed))
    print(f"model: {count_params(model):,} parameters ({cfg.n_layer} layers, {cfg.n_head} heads, "
          f"{cfg.n_embd} wide, block {cfg.block_size}); data: {ds}")

    B, A, T = loop.batch_size, loop.grad_accum, cfg.block_size
    batch_fn, save_tokenizer = corpus_batches(ds, loop, T)
    meta = {"kind": "pretrain", "model": cfg.to_dict(), "config": to_dict(config), "data": ds.meta}
    result = train_loop(
        model, lm_loss_fn, batch_fn, optim=config.optim, loop=loop, meta=meta,
        make_eval=make_val_evaluator(ds, T, config.data.eval_batch_size, config.data.eval_batches),
        tokens_per_step=B * A * T, flops_per_token=cfg.flops_per_token(T), on_start=save_tokenizer)
    val_loss = result.evals[max(result.evals)]["val_loss"] if result.evals else None

    text = sample_text(result.model, ds.tokenizer, config.sample)
    return PretrainResult(result, val_loss, text, cfg)
