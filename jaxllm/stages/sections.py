"""Config sections several stages share: where a model comes from (`model` from scratch, `init`
from a base), the text corpus (`data`), and the end-of-run sample (`sample`)."""

from __future__ import annotations

import dataclasses
import typing

import jax
import numpy as np

from jaxllm.config import COMPUTE_OPTIONS, GPTConfig
from jaxllm.logits_processors import SamplingConfig
from jaxllm.sampling import generate

# The model section: a preset name plus any GPTConfig field to override (None keeps the preset's).
ModelSection = dataclasses.make_dataclass(
    "ModelSection",
    [("preset", str, "cpu-small")]
    + [(f.name, typing.Optional[f.type], None) for f in dataclasses.fields(GPTConfig)],
    frozen=True, namespace={"__module__": __name__})


def resolve_model_config(section, data_vocab_size: int) -> GPTConfig:
    """The GPTConfig a `model` section asks for, its vocabulary taken from the data unless set."""
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


@dataclasses.dataclass(frozen=True)
class InitConfig:
    """The base a fine-tuning stage starts from (see jaxllm.runs)."""

    path: typing.Optional[str] = None     # a jaxllm run dir or an HF GPT-2 dir
    step: typing.Optional[int] = None     # checkpoint step of a jaxllm run (default: latest)
    # how the base is computed while tuning (unset: as the base has it): recompute each block in the
    # backward pass, run the blocks as one scan. Neither changes the weights or the numbers.
    remat: typing.Optional[bool] = None
    scan_layers: typing.Optional[bool] = None

    def compute(self) -> dict:
        """The compute options that are set, for `jaxllm.runs.load_base`."""
        return {k: getattr(self, k) for k in COMPUTE_OPTIONS if getattr(self, k) is not None}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """A token corpus: a prepared dataset directory, or a text source prepared (and cached) on first
    use. Unset fields mean "as the dataset in dataset_dir has it" when it exists, else the defaults
    noted; a field that is set must match a dataset that already exists."""

    source: typing.Optional[str] = None       # "shakespeare" (default), a file/folder/glob, "tfds:NAME[/CONFIG][:SPLIT]"
    tokenizer: typing.Optional[str] = None    # char | bpe | gpt2 | a tokenizer path (default: char; fine-tuning: the base's)
    vocab_size: typing.Optional[int] = None   # for tokenizer=bpe
    dataset_dir: typing.Optional[str] = None  # default: data_cache/<source>-<tokenizer>[-v<vocab_size>]
    val_fraction: typing.Optional[float] = None   # default 0.1
    text_key: typing.Optional[str] = None     # TFDS feature holding the text
    tfds_data_dir: typing.Optional[str] = None
    eval_batch_size: int = 64
    eval_batches: typing.Optional[int] = None  # None: the whole val split

    def __post_init__(self):
        if self.eval_batch_size <= 0:
            raise ValueError(f"data.eval_batch_size must be positive, got {self.eval_batch_size}")
        if self.eval_batches is not None and self.eval_batches <= 0:
            raise ValueError(f"data.eval_batches must be positive, or null for the whole val split, "
                             f"got {self.eval_batches}")


@dataclasses.dataclass(frozen=True)
class SampleConfig(SamplingConfig):
    """The sample a training command prints at its end: a prompt and a decoding strategy."""

    temperature: float = 0.8
    prompt: str = "\n"
    max_new_tokens: int = 200      # 0: no sample
    seed: int = 0


def sample_text(model, tok, sample: SampleConfig) -> str | None:
    """The end-of-run sample (None when sample.max_new_tokens is 0). A prompt the tokenizer cannot
    encode (e.g. a character the corpus lacks) is reported and replaced by one token: a finished
    run always reports its result."""
    if sample.max_new_tokens <= 0:
        return None
    try:
        prompt = tok.encode(sample.prompt)
    except ValueError as e:
        print(f"sample.prompt {sample.prompt!r} cannot be encoded ({e}); sampling from one token instead")
        prompt = []
    prompt = prompt or [tok.eos_id if tok.eos_id is not None else 0]
    ids = generate(model, np.asarray(prompt), sample.max_new_tokens, sample, key=jax.random.key(sample.seed))
    return tok.decode(np.asarray(ids))
