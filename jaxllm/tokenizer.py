"""Text <-> token ids behind one interface.

Four kinds share it:

- ``char``: one id per character of a corpus (nanoGPT's shakespeare_char).
- ``bpe``:  a byte-level BPE trained here with HF ``tokenizers``.
- ``gpt2``: GPT-2's own BPE through ``tiktoken``, ranks read from a local file.
- ``hf``:   any HF ``tokenizer.json``.

Every tokenizer has ``kind``, ``encode``, ``decode``, ``vocab_size``, ``eos_id``,
``pad_id``, ``special_tokens`` and ``save(directory)``; ``load_tokenizer`` reads back what ``save``
wrote. Nothing here touches the network.

Text never produces a special token unless asked: ``encode(text)`` reads a literal
``<|endoftext|>`` in user text as ordinary characters; ``encode(text, allow_special=True)`` maps it
to the special id (how a pretraining corpus marks document boundaries). ``count_special(text)``
counts such literals, so callers can report them. A char vocabulary's specials are control
characters with no other encoding, so text holding one is refused unless asked.
"""

from __future__ import annotations

import abc
import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

CONFIG_NAME = "tokenizer_config.json"
CHAR_EOS, CHAR_PAD = "\x03", "\x00"  # a char vocabulary's EOS (ETX) and PAD (NUL), when it has them
HF_FILE_NAME = "tokenizer.json"
CHAT_TEMPLATE_NAME = "chat_template.jinja"  # an HF tokenizer's chat template, as transformers saves it
KINDS = ("char", "bpe", "gpt2", "hf")

GPT2_RANKS_ENV = "JAXLLM_GPT2_RANKS"
GPT2_EOS = "<|endoftext|>"
GPT2_EOS_ID = 50256
# GPT-2's pre-tokenizer regex: contractions, letter runs, digit runs, other symbols,
# whitespace; a leading space stays glued to the word after it.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Names that mean "end of text" / "padding" in common tokenizer.json files, in the
# order we prefer them when the caller does not say which one to use.
EOS_GUESSES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[SEP]")
PAD_GUESSES = ("<|pad|>", "<pad>", "[PAD]")


def _atomic_write_text(path: Path, text: str) -> None:
    """Write next to the target then rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_unicode(text: str) -> None:
    """A ValueError naming the first lone surrogate (a str Python holds but Unicode text cannot,
    e.g. JSON's unpaired "\\ud800"), if `text` has one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the text holds a lone surrogate {text[e.start]!r} at position {e.start}, which "
                         f"is not Unicode text; write the character itself (or a surrogate pair)") from None


def _as_id_list(ids) -> list[int]:
    return np.asarray(ids, dtype=np.int64).reshape(-1).tolist()


class Tokenizer(abc.ABC):
    """The interface every kind implements."""

    kind: str

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int | None:
        return None

    @property
    def pad_id(self) -> int | None:
        return None

    @property
    def special_tokens(self) -> dict[str, int]:
        """The text of each special token and its id."""
        return {}

    @abc.abstractmethod
    def encode(self, text: str, allow_special: bool = False) -> list[int]: ...

    def count_special(self, text: str) -> int:
        """How many special tokens' texts occur in `text`."""
        return sum(text.count(t) for t in self.special_tokens if t)

    @abc.abstractmethod
    def decode(self, ids) -> str: ...

    def _config(self) -> dict:
        """What load_tokenizer needs besides any files _save_files writes."""
        return {}

    def _save_files(self, directory: Path) -> None:
        pass

    def save(self, directory) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._save_files(directory)
        # The config goes last: its presence says the directory is complete.
        config = {"kind": self.kind, **self._config()}
        _atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2, ensure_ascii=False))
        return directory

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos_id={self.eos_id}, pad_id={self.pad_id})"


# --------------------------------------------------------------------------- char


class CharTokenizer(Tokenizer):
    kind = "char"

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise ValueError("CharTokenizer needs a list of distinct single characters")
        self.chars = chars
        self._stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        # Sorted so the same corpus always gives the same ids (as nanoGPT does).
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    # Two ASCII control characters serve as specials when a vocabulary holds them (instruction
    # tuning reserves them, see jaxllm.data.instruct.sft_char_tokenizer): ETX, "end of text", is
    # EOS and NUL is padding. They are ordinary characters of the saved vocabulary, so a reloaded
    # tokenizer finds them again.
    @property
    def eos_id(self) -> int | None:
        return self._stoi.get(CHAR_EOS)

    @property
    def pad_id(self) -> int | None:
        return self._stoi.get(CHAR_PAD)

    @property
    def special_tokens(self) -> dict[str, int]:
        return {c: self._stoi[c] for c in (CHAR_EOS, CHAR_PAD) if c in self._stoi}

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        stoi = self._stoi
        if not allow_special:
            for c, i in self.special_tokens.items():
                if c in text:
                    raise ValueError(
                        f"the text holds {c!r} (U+{ord(c):04X}, first at position {text.index(c)}), which this "
                        f"char tokenizer reserves as {'EOS' if c == CHAR_EOS else 'padding'} (id {i}); remove it "
                        f"from the text")
        try:
            return [stoi[c] for c in text]
        except KeyError as e:
            char = e.args[0]
            raise ValueError(
                f"character {char!r} (U+{ord(char):04X}, first at position {text.index(char)}) is not "
                f"in this char tokenizer's vocabulary of {self.vocab_size} characters; rebuild the "
                f"tokenizer on a corpus that contains it (e.g. run prepare again on that text)"
            ) from None

    def decode(self, ids) -> str:
        ids = _as_id_list(ids)
        bad = [i for i in ids if not 0 <= i < len(self.chars)]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside this char vocabulary [0, {len(self.chars)})")
        return "".join(self.chars[i] for i in ids)

    def _config(self) -> dict:
        return {"chars": "".join(self.chars)}


# --------------------------------------------------------------------------- HF tokenizers


def _tokenizers():
    import tokenizers

    return tokenizers


def _read_chat_template(directory: Path) -> str | None:
    """The chat template stored in a tokenizer directory: ``chat_template.jinja`` (what transformers
    and ``HFTokenizer.save`` write), else the "chat_template" key of ``tokenizer_config.json`` (older
    transformers saves; a list of named templates gives the one named "default"), else None."""
    if (directory / CHAT_TEMPLATE_NAME).is_file():
        return (directory / CHAT_TEMPLATE_NAME).read_text(encoding="utf-8")
    try:
        config = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # no config, or not JSON: load_tokenizer reports a bad config itself
        return None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):
        template = next((t.get("template") for t in template
                         if isinstance(t, dict) and t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


class HFTokenizer(Tokenizer):
    """Any HF ``tokenizer.json``; ids are the raw text's (no [CLS]/[SEP] added).

    ``chat_template``: an optional Jinja chat template (as in transformers), used by
    ``jaxllm.prompting.apply_chat_template``. Read from the tokenizer.json's folder when not given
    (see ``_read_chat_template``) and saved as ``chat_template.jinja``."""

    kind = "hf"

    def __init__(self, path=None, eos_token: str | None = None, pad_token: str | None = None, *, backend=None,
                 chat_template: str | None = None):
        if backend is None:
            path = Path(path)
            if path.is_dir():
                path = path / HF_FILE_NAME
            if not path.is_file():
                raise FileNotFoundError(
                    f"no tokenizer.json at {path}; pass the path of an HF tokenizer.json file "
                    f"(or a folder that holds one)"
                )
            try:
                backend = _tokenizers().Tokenizer.from_file(str(path))
            except Exception as e:  # noqa: BLE001 - the library raises a bare Exception on a bad file
                raise ValueError(f"{path} is not a Hugging Face tokenizer.json ({e}); pass an HF "
                                 f"tokenizer.json, a directory written by Tokenizer.save(), or gpt2") from None
            if chat_template is None:
                chat_template = _read_chat_template(path.parent)
        self.backend = backend
        self.chat_template = chat_template
        self.eos_token = eos_token if eos_token is not None else self._guess(EOS_GUESSES)
        self.pad_token = pad_token if pad_token is not None else self._guess(PAD_GUESSES)
        self._eos_id = self._lookup(self.eos_token, "eos_token")
        self._pad_id = self._lookup(self.pad_token, "pad_token")

    def _guess(self, names: Iterable[str]) -> str | None:
        return next((name for name in names if self.backend.token_to_id(name) is not None), None)

    def _lookup(self, token: str | None, what: str) -> int | None:
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{what} {token!r} is not in this tokenizer's vocabulary")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @property
    def pad_id(self) -> int | None:
        return self._pad_id

    @property
    def special_tokens(self) -> dict[str, int]:
        return {t.content: i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        # encode_special_tokens=True reads a special token's text like any other text
        previous = self.backend.encode_special_tokens
        self.backend.encode_special_tokens = not allow_special
        try:
            return self.backend.encode(text, add_special_tokens=False).ids
        except TypeError:  # the backend's answer to a str it cannot pass to Rust
            if isinstance(text, str):
                _check_unicode(text)
            raise
        finally:
            self.backend.encode_special_tokens = previous

    def decode(self, ids) -> str:
        # Special tokens are kept so that decode(encode(text)) == text for byte-level models.
        return self.backend.decode(_as_id_list(ids), skip_special_tokens=False)

    def _config(self) -> dict:
        return {"eos_token": self.eos_token, "pad_token": self.pad_token}

    def _save_files(self, directory: Path) -> None:
        _atomic_write_text(directory / HF_FILE_NAME, self.backend.to_str(pretty=True))
        if self.chat_template is not None:
            _atomic_write_text(directory / CHAT_TEMPLATE_NAME, self.chat_template)
        else:  # a template left by an earlier save would be read back as this tokenizer's
            (directory / CHAT_TEMPLATE_NAME).unlink(missing_ok=True)


class BPETokenizer(HFTokenizer):
    """Byte-level BPE trained on our own corpus: any unicode text round-trips exactly."""

    kind = "bpe"

    @classmethod
    def train(
        cls,
        texts: str | Iterable[str],
        vocab_size: int,
        special_tokens: Sequence[str] = ("<|endoftext|>", "<|pad|>"),
        min_frequency: int = 2,
    ) -> "BPETokenizer":
        tk = _tokenizers()
        special_tokens = list(special_tokens)
        smallest = 256 + len(special_tokens)
        if vocab_size is None or vocab_size < smallest:
            raise ValueError(
                f"bpe vocab_size must be at least {smallest} (256 byte tokens + "
                f"{len(special_tokens)} special tokens), got {vocab_size}"
            )
        if isinstance(texts, str):
            texts = [texts]
        backend = tk.Tokenizer(tk.models.BPE())
        # No prefix space: decode(encode(text)) must give back text unchanged.
        backend.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=special_tokens,
            # All 256 bytes are in the vocabulary even if the corpus lacks some,
            # so no text is ever out of vocabulary.
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        if backend.get_vocab_size() < vocab_size:
            print(f"bpe: the corpus gave {backend.get_vocab_size():,} tokens, fewer than the {vocab_size:,} "
                  f"asked for (no pair occurs {min_frequency}+ times beyond that); using "
                  f"{backend.get_vocab_size():,}")
        eos = special_tokens[0] if len(special_tokens) > 0 else None
        pad = special_tokens[1] if len(special_tokens) > 1 else None
        return cls(backend=backend, eos_token=eos, pad_token=pad)


# --------------------------------------------------------------------------- GPT-2 (tiktoken)


class GPT2RanksNotFoundError(FileNotFoundError):
    pass


def find_gpt2_ranks(ranks_path=None) -> Path:
    """The GPT-2 BPE ranks file: explicit path, then $JAXLLM_GPT2_RANKS, then openai-whisper's copy."""
    how_to_get = (
        f"install the package that ships it with `pip install --no-deps openai-whisper` "
        f"(--no-deps: its declared dependencies pull a CUDA torch), or set {GPT2_RANKS_ENV} "
        f"to a local gpt2.tiktoken / r50k_base.tiktoken file"
    )
    for origin, value in (("ranks_path", ranks_path), (GPT2_RANKS_ENV, os.environ.get(GPT2_RANKS_ENV))):
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise GPT2RanksNotFoundError(f"GPT-2 BPE ranks file {path} (from {origin}) does not exist; {how_to_get}")
            return path
    # find_spec only locates the package: importing whisper would import torch.
    spec = importlib.util.find_spec("whisper")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "assets" / "gpt2.tiktoken"
        if path.is_file():
            return path
    raise GPT2RanksNotFoundError(f"GPT-2 BPE ranks file not found; {how_to_get}")


class GPT2Tokenizer(Tokenizer):
    kind = "gpt2"

    def __init__(self, ranks_path=None):
        import tiktoken
        import tiktoken.load

        self.ranks_path = find_gpt2_ranks(ranks_path)
        ranks = tiktoken.load.load_tiktoken_bpe(str(self.ranks_path))
        if len(ranks) != GPT2_EOS_ID:
            raise ValueError(
                f"{self.ranks_path} has {len(ranks)} BPE ranks, GPT-2 has {GPT2_EOS_ID}; "
                f"point {GPT2_RANKS_ENV} at GPT-2's gpt2.tiktoken"
            )
        self.encoding = tiktoken.Encoding(
            name="gpt2",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={GPT2_EOS: GPT2_EOS_ID},
        )

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    @property
    def eos_id(self) -> int:
        return GPT2_EOS_ID

    @property
    def special_tokens(self) -> dict[str, int]:
        return {GPT2_EOS: GPT2_EOS_ID}

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        if allow_special:
            return self.encoding.encode(text, allowed_special={GPT2_EOS})
        return self.encoding.encode(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids) -> str:
        return self.encoding.decode(_as_id_list(ids))

    # The ranks are found again from the environment on load, so the config is just the kind.


# --------------------------------------------------------------------------- loading


def _hf_special(token) -> str | None:
    """transformers writes a special token as its text or as {"content": text, ...}."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _from_config(directory: Path) -> Tokenizer:
    config_path = directory / CONFIG_NAME
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if isinstance(config, dict) and "kind" not in config and (directory / HF_FILE_NAME).is_file():
            # A transformers save_pretrained directory: same file name, HF's own fields, no "kind".
            return HFTokenizer(directory / HF_FILE_NAME, eos_token=_hf_special(config.get("eos_token")),
                               pad_token=_hf_special(config.get("pad_token")))
        kind = config["kind"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{config_path} is not a tokenizer config ({e}); save the tokenizer again") from e
    if kind == "char":
        return CharTokenizer(config["chars"])
    if kind in ("bpe", "hf"):
        cls = BPETokenizer if kind == "bpe" else HFTokenizer
        tok_file = directory / HF_FILE_NAME
        if not tok_file.is_file():
            raise FileNotFoundError(f"{config_path} says kind {kind!r} but {tok_file} is missing; save the tokenizer again")
        return cls(tok_file, eos_token=config.get("eos_token"), pad_token=config.get("pad_token"))
    if kind == "gpt2":
        return GPT2Tokenizer()
    raise ValueError(f"{config_path} has unknown tokenizer kind {kind!r}; valid kinds: {', '.join(KINDS)}")


def load_tokenizer(spec) -> Tokenizer:
    """A Tokenizer from: a Tokenizer (returned as is), "gpt2", a directory written by
    ``Tokenizer.save``, an HF ``tokenizer.json`` file, or a folder holding one."""
    if isinstance(spec, Tokenizer):
        return spec
    if isinstance(spec, str) and spec == "gpt2":
        return GPT2Tokenizer()
    if isinstance(spec, str) and spec in ("char", "bpe"):
        raise ValueError(
            f"a {spec} tokenizer is built from a corpus, not loaded by name: use "
            f"build_tokenizer({spec!r}, text=...) or prepare(..., tokenizer={spec!r})"
        )
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / CONFIG_NAME).is_file():
            return _from_config(path)
        if (path / HF_FILE_NAME).is_file():
            return HFTokenizer(path / HF_FILE_NAME)
        raise FileNotFoundError(
            f"{path} holds neither {CONFIG_NAME} nor {HF_FILE_NAME}; point at a directory written by "
            f"Tokenizer.save() (e.g. a prepared dataset's tokenizer/ folder) or at an HF tokenizer.json"
        )
    if path.is_file():
        return HFTokenizer(path)
    raise FileNotFoundError(
        f"tokenizer {str(spec)!r} not found: expected \"gpt2\", a directory written by Tokenizer.save(), "
        f"or the path of an HF tokenizer.json"
    )


_PROBE = "Hello, world! The quick brown fox: 12,345 jumps.\n\tnaïve café 東京 <|endoftext|>"


def tokenizer_differences(a: Tokenizer, b: Tokenizer) -> list[str]:
    """How two tokenizers differ ([] when they encode alike): kind, sizes, special ids, and the ids
    of a probe text that exercises words, digits, whitespace, non-ASCII and a special token's text."""
    out = [f"{name} {x!r} vs {y!r}" for name, x, y in (
        ("kind", a.kind, b.kind), ("vocab_size", a.vocab_size, b.vocab_size), ("eos_id", a.eos_id, b.eos_id),
        ("pad_id", a.pad_id, b.pad_id)) if x != y]
    if not out:
        def ids(tok):
            try:
                return tok.encode(_PROBE)
            except ValueError:   # a char vocabulary without some of the probe's characters
                return tok.encode("".join(c for c in _PROBE if c in getattr(tok, "_stoi", {})))
        if ids(a) != ids(b):
            out.append("the same text encodes to other ids")
    return out


def build_tokenizer(kind: str, text: str | None = None, vocab_size: int | None = None, path=None) -> Tokenizer:
    """Build ("char", "bpe": from ``text``) or open ("gpt2", "hf": from ``path``) a tokenizer."""
    if kind == "char":
        if text is None:
            raise ValueError("a char tokenizer is built from a corpus: pass text=")
        return CharTokenizer.from_text(text)
    if kind == "bpe":
        if text is None or vocab_size is None:
            raise ValueError("a bpe tokenizer is trained on a corpus: pass text= and vocab_size=")
        return BPETokenizer.train(text, vocab_size)
    if kind == "gpt2":
        return GPT2Tokenizer(path)
    if kind == "hf":
        if path is None:
            raise ValueError("an hf tokenizer is read from a tokenizer.json: pass path=")
        return HFTokenizer(path)
    raise ValueError(f"unknown tokenizer kind {kind!r}; valid kinds: {', '.join(KINDS)}")
