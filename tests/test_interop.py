"""Hugging Face GPT-2 interop and PyTorch parity: the same weights compute the same function, loss,
gradients, greedy text and training curve in jaxllm, transformers and the PyTorch baseline.

Models are tiny random GPT-2s built from a GPT2Config (no hub); every tensor, LayerNorm gains and
biases included, is perturbed off its initial value so a mixed-up mapping cannot hide.
"""

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="HF interop parity needs the torch extra: pip install -e '.[torch]'")
transformers = pytest.importorskip("transformers", reason="HF interop parity needs transformers (the torch extra)")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402
from safetensors.torch import save_file as save_torch_file  # noqa: E402

import jaxllm  # noqa: E402
from jaxllm.interop import HFCheckpointError, from_hf, to_hf  # noqa: E402
from jaxllm.runs import checkpoint_to_hf  # noqa: E402
from jaxllm.interop.hf import hf_tensor_specs, model_from_hf_state, model_to_hf_state  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks package
from benchmarks.torch_gpt import TorchGPT  # noqa: E402
from helpers import random_hf_arrays  # noqa: E402

V, T, D, L, H = 97, 32, 64, 2, 4
LOGIT_ATOL = 1e-4


def _hf_config(**kw):
    base = dict(vocab_size=V, n_positions=T, n_embd=D, n_layer=L, n_head=H, resid_pdrop=0.0,
                embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    return transformers.GPT2Config(**{**base, **kw})


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(_hf_config()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    hf_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(hf_dir):
    return from_hf(hf_dir)


@pytest.fixture(scope="module")
def tokens():
    return np.random.RandomState(0).randint(0, V, (3, 24))


@nnx.jit
def _logits(model, x):  # one compiled program instead of dozens of op-by-op ones
    return model(x)


def _hf_logits(model, x):
    with torch.no_grad():
        return model(torch.as_tensor(x)).logits.numpy()


def _jax_model(seed=0, **kw):
    """A random jaxllm GPT, built from numpy arrays (GPT's own init would compile dozens of tiny
    XLA programs): matrices ~N(0, 0.02), LayerNorm gains 1 +- 0.05, biases +- 0.05."""
    cfg = jaxllm.GPTConfig(**{**dict(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=D,
                                     dropout=0.0), **kw})
    arrays = random_hf_arrays(cfg, seed)
    if not cfg.bias:
        arrays = {n: a for n, a in arrays.items() if not hf_tensor_specs(cfg)[n].is_bias}
    return model_from_hf_state(arrays, cfg), cfg


# --------------------------------------------------------------------------- from_hf


def test_from_hf_maps_every_config_field(loaded):
    _, cfg = loaded
    assert (cfg.vocab_size, cfg.block_size, cfg.n_embd, cfg.n_layer, cfg.n_head) == (V, T, D, L, H)
    assert cfg.layer_norm_eps == 1e-5 and cfg.bias and cfg.dropout == 0.0


@pytest.mark.parametrize("preset, n_embd, n_layer, n_head", [
    ("gpt2", 768, 12, 12), ("gpt2-medium", 1024, 24, 16), ("gpt2-large", 1280, 36, 20), ("gpt2-xl", 1600, 48, 25)])
def test_every_gpt2_size_maps_to_its_preset_with_the_same_tensor_shapes(preset, n_embd, n_layer, n_head):
    from jaxllm.interop.hf import config_from_hf

    hf_cfg = transformers.GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head)  # HF's defaults otherwise
    cfg = config_from_hf(hf_cfg.to_dict(), dropout=0.0)
    assert cfg == jaxllm.GPTConfig.preset(preset)
    # Tensor shapes, on one layer (every layer is alike) and on the meta device: no memory, no time.
    hf_cfg.n_layer, cfg = 1, cfg.replace(n_layer=1)
    with torch.device("meta"):
        hf_shapes = {k: tuple(v.shape) for k, v in transformers.GPT2LMHeadModel(hf_cfg).state_dict().items()
                     if k != "lm_head.weight"}
    assert {n: s.shape for n, s in hf_tensor_specs(cfg).items()} == hf_shapes


def test_from_hf_logits_match_transformers_within_1e_4(loaded, hf_model, tokens):
    model, _ = loaded
    diff = np.abs(np.asarray(_logits(model, tokens)) - _hf_logits(hf_model, tokens)).max()
    assert diff < LOGIT_ATOL, diff


def test_loss_and_every_weight_gradient_match_transformers(loaded, hf_model, tokens):
    model, cfg = loaded
    hf_model.zero_grad()
    out = hf_model(torch.as_tensor(tokens), labels=torch.as_tensor(tokens))
    out.loss.backward()
    hf_grads = {n: p.grad.numpy() for n, p in hf_model.named_parameters()}

    graphdef, params = nnx.split(model)
    loss_fn = lambda p: jaxllm.next_token_loss(nnx.merge(graphdef, p)(tokens), jnp.asarray(tokens))  # noqa: E731
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    assert abs(float(loss) - out.loss.item()) < 1e-5
    flat = {path: v[...] for path, v in nnx.to_flat_state(grads)}
    specs = hf_tensor_specs(cfg)
    assert set(specs) == set(hf_grads)  # the tied head's gradient lives in wte in both
    for name, spec in specs.items():
        g_jax, g_hf = np.asarray(flat[spec.path]).reshape(spec.shape), hf_grads[name]  # c_attn: (D, 3, D)
        # fp32 summation order differs: each gradient agrees to 1e-5 of its own largest entry
        tol = 1e-8 + 1e-5 * np.abs(g_hf).max()
        assert np.abs(g_jax - g_hf).max() < tol, name


def test_greedy_generation_gives_identical_tokens(loaded, hf_model):
    model, _ = loaded
    prompt = np.array([[5, 17, 42, 3, 88]])
    with torch.no_grad():
        ref = hf_model.generate(torch.as_tensor(prompt), max_new_tokens=20, do_sample=False,
                                pad_token_id=0, eos_token_id=None).numpy()
    ours = np.asarray(jaxllm.generate(model, prompt, 20, temperature=0.0))
    assert ref.shape == ours.shape == (1, 25)
    np.testing.assert_array_equal(ours, ref)


def test_bare_names_and_weights_only_pytorch_bin_load(hf_model, tmp_path, tokens):
    bare = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items()}
    torch.save(bare, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(hf_model.config.to_json_string())
    model, _ = from_hf(tmp_path)
    assert np.abs(np.asarray(_logits(model, tokens)) - _hf_logits(hf_model, tokens)).max() < LOGIT_ATOL


def test_sharded_and_bfloat16_safetensors_load(hf_model, tmp_path, tokens):
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model, _ = from_hf(tmp_path / "sharded")
    assert np.abs(np.asarray(_logits(model, tokens)) - _hf_logits(hf_model, tokens)).max() < LOGIT_ATOL

    bf16 = {k: v.to(torch.bfloat16) for k, v in hf_model.state_dict().items()}
    (tmp_path / "bf16").mkdir()
    save_torch_file(bf16, tmp_path / "bf16" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "bf16" / "config.json").write_text(hf_model.config.to_json_string())
    model, _ = from_hf(tmp_path / "bf16")  # widened to the fp32 params exactly
    wte = np.asarray(model.wte.embedding[...])
    np.testing.assert_array_equal(wte, bf16["transformer.wte.weight"].float().numpy())


class _RunsCode:
    def __reduce__(self):  # unpickling would create this file if the loader executed it
        return (Path.touch, (Path(self.marker),))


def test_pickle_that_needs_code_execution_is_refused_unrun(hf_dir, tmp_path):
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    payload = _RunsCode()
    payload.marker = str(tmp_path / "pwned")
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"transformer.wte.weight": payload}, f, protocol=2)
    with pytest.raises(HFCheckpointError, match=r"refusing to load .*pytorch_model.bin.*run code"):
        from_hf(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_bin_without_torch_says_install_torch_or_convert(hf_dir, tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(HFCheckpointError, match=r"needs torch.*\[torch\].*safetensors"):
        from_hf(tmp_path)


def _copy_with(hf_dir, tmp_path, edit_tensors=None, edit_config=None):
    tensors = load_file(hf_dir / "model.safetensors")
    config = json.loads((hf_dir / "config.json").read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_wrong_shape_error_names_tensor_and_expected_shape(hf_dir, tmp_path):
    def shrink(t):
        t["transformer.h.1.mlp.c_fc.weight"] = t["transformer.h.1.mlp.c_fc.weight"][:, :100].copy()
    with pytest.raises(HFCheckpointError, match=r"h\.1\.mlp\.c_fc\.weight has shape \(64, 100\), expected \(64, 256\)"):
        from_hf(_copy_with(hf_dir, tmp_path, edit_tensors=shrink))


def test_missing_tensor_error_names_it_and_its_shape(hf_dir, tmp_path):
    with pytest.raises(HFCheckpointError, match=r"missing tensor transformer\.h\.0\.ln_2\.bias \(expected shape \(64,\)\)"):
        from_hf(_copy_with(hf_dir, tmp_path, edit_tensors=lambda t: t.pop("transformer.h.0.ln_2.bias")))


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(model_type="gpt_neo"), r"model_type is 'gpt_neo', not 'gpt2'"),
    (lambda c: c.update(architectures=["GPT2DoubleHeadsModel"]), r"architecture GPT2DoubleHeadsModel"),
    (lambda c: c.update(activation_function="relu"), r"activation_function 'relu'"),
    (lambda c: c.update(scale_attn_by_inverse_layer_idx=True), r"scale_attn_by_inverse_layer_idx"),
])
def test_unsupported_architecture_is_refused_with_the_reason(hf_dir, tmp_path, edit, message):
    with pytest.raises(HFCheckpointError, match=message):
        from_hf(_copy_with(hf_dir, tmp_path, edit_config=edit))


def test_untied_lm_head_is_refused(hf_dir, tmp_path):
    def untie(t):
        t["lm_head.weight"] = t["transformer.wte.weight"] + 1.0
    with pytest.raises(HFCheckpointError, match="lm_head.weight differs"):
        from_hf(_copy_with(hf_dir, tmp_path, edit_tensors=untie))


# --------------------------------------------------------------------------- to_hf


@pytest.mark.parametrize("bias, activation", [(True, "gelu_tanh"), (False, "gelu_tanh"), (True, "gelu")])
def test_to_hf_loads_in_automodel_with_same_logits_and_round_trips_exactly(tmp_path, tokens, bias, activation):
    """Also the exact-erf GELU (HF's activation_function "gelu", nanoGPT's nn.GELU). With these small
    weights the two GELUs give logits within 1e-4 of each other, so the exported name is checked too."""
    model, cfg = _jax_model(bias=bias, activation=activation)
    out = to_hf(model, cfg, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.config.activation_function == {"gelu_tanh": "gelu_new", "gelu": "gelu"}[activation]
    assert np.abs(_hf_logits(hf, tokens) - np.asarray(_logits(model, tokens))).max() < LOGIT_ATOL

    back, cfg_back = from_hf(out)
    assert cfg_back == cfg
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(back)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_to_hf_never_leaves_a_half_written_directory(tmp_path, monkeypatch):
    model, cfg = _jax_model()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep")
    with pytest.raises(FileExistsError, match="not empty.*overwrite=True"):
        to_hf(model, cfg, tmp_path / "busy")

    class Boom(jaxllm.tokenizer.CharTokenizer):
        def save(self, directory):
            raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        to_hf(model, cfg, tmp_path / "new", tokenizer=Boom(list("abc")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
    to_hf(model, cfg, tmp_path / "busy", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["config.json", "model.safetensors"]


def test_training_checkpoint_exports_with_its_tokenizer(tmp_path, tokens):
    from jaxllm.training.checkpoint import Checkpointer

    tok = jaxllm.build_tokenizer("bpe", text="the quick brown fox jumps over the lazy dog " * 50, vocab_size=300)
    model, cfg = _jax_model(vocab_size=300)
    run = tmp_path / "run"
    ckpt = Checkpointer(run)
    ckpt.save(7, nnx.state(model), {"step": np.int32(7)}, {"model": cfg.to_dict()})
    ckpt.close()
    tok.save(run / "tokenizer")

    out = checkpoint_to_hf(run, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert np.abs(_hf_logits(hf, tokens) - np.asarray(_logits(model, tokens))).max() < LOGIT_ATOL
    assert hf.config.eos_token_id == tok.eos_id
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "the lazy fox, naïve 🌍"
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    assert jaxllm.load_tokenizer(out).encode(text) == tok.encode(text)


# --------------------------------------------------------------------------- tokenizers

SAMPLE = "naïve café — 東京 🌍🚀 ∑x² \t\n  tabs\tand  spaces  \r\n<|endoftext|>after it's 12345 Hello, World!"


def test_jaxllm_bpe_tokenizer_json_encodes_identically_in_transformers(tmp_path):
    from jaxllm.data.sources import load_text

    text = load_text("shakespeare")[:100_000]
    tok = jaxllm.build_tokenizer("bpe", text=text, vocab_size=400)
    tok.save(tmp_path)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for s in (SAMPLE, text[:5000]):
        ids = tok.encode(s, allow_special=True)        # transformers reads special-token text as specials
        assert hf.encode(s, add_special_tokens=False) == ids
        assert hf.decode(ids) == tok.decode(ids) == s
        plain = tok.encode(s)                          # jaxllm's default: text stays text
        assert hf.encode(s, add_special_tokens=False, split_special_tokens=True) == plain
        assert tok.decode(plain) == s
    # and a transformers save_pretrained directory loads back in jaxllm with the same ids
    hf_saved = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"),
                                                    eos_token="<|endoftext|>", pad_token="<|pad|>")
    hf_saved.save_pretrained(tmp_path / "hf")
    back = jaxllm.load_tokenizer(tmp_path / "hf")
    assert back.encode(SAMPLE) == tok.encode(SAMPLE)
    assert (back.eos_id, back.pad_id) == (tok.eos_id, tok.pad_id)


def test_gpt2_tiktoken_ranks_match_transformers_conversion_of_the_same_file(tmp_path):
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from jaxllm.tokenizer import GPT2_PATTERN, GPT2RanksNotFoundError, find_gpt2_ranks

    try:
        ranks = find_gpt2_ranks()
    except GPT2RanksNotFoundError:
        pytest.skip("GPT-2 ranks not installed (pip install --no-deps openai-whisper)")
    ours = jaxllm.load_tokenizer("gpt2")
    hf_backend = TikTokenConverter(vocab_file=str(ranks), pattern=GPT2_PATTERN,
                                   extra_special_tokens=["<|endoftext|>"]).converted()
    assert hf_backend.encode(SAMPLE, add_special_tokens=False).ids == ours.encode(SAMPLE, allow_special=True)
    hf_backend.save(str(tmp_path / "tokenizer.json"))
    as_json = jaxllm.load_tokenizer(tmp_path / "tokenizer.json")  # jaxllm's tokenizer.json path
    assert as_json.encode(SAMPLE) == ours.encode(SAMPLE)            # the literal stays text in both
    assert as_json.encode(SAMPLE, allow_special=True) == ours.encode(SAMPLE, allow_special=True)
    assert as_json.eos_id == ours.eos_id == 50256


# --------------------------------------------------------------------------- PyTorch baseline


def test_torchgpt_shares_the_hf_name_mapping_with_jaxllm_and_transformers(hf_model, loaded, tokens):
    torch_model = TorchGPT.from_jaxllm(loaded[0]).eval()  # jaxllm -> TorchGPT through the mapping
    with torch.no_grad():
        logits, _ = torch_model(torch.as_tensor(tokens))
    assert np.abs(logits.numpy() - _hf_logits(hf_model, tokens)).max() < LOGIT_ATOL
    # transformers' own state dict (prefixed names, tied lm_head) loads into TorchGPT unchanged
    torch_model.load_state_from_numpy({k: v.numpy() for k, v in hf_model.state_dict().items()})
    back = torch_model.to_jaxllm()
    for a, b in zip(jax.tree.leaves(nnx.state(loaded[0])), jax.tree.leaves(nnx.state(back)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


TRAIN_STEPS, LOSS_ATOL, WEIGHT_ATOL = 20, 1e-4, 5e-4  # measured: 5e-7 and 4e-5


def test_adamw_training_curve_matches_pytorch_from_the_same_weights_and_batches():
    """jaxllm's real train step (make_train_step + make_optimizer) against TorchGPT with
    torch.optim.AdamW, clip_grad_norm_ and nanoGPT's schedule: 20 steps, same start, same batches."""
    from benchmarks.torch_reference import nanogpt_lr
    from jaxllm.training.optim import OptimConfig, lr_schedule, make_optimizer
    from jaxllm.training.step import init_train_state, lm_loss_fn, make_train_step

    oc = OptimConfig(learning_rate=3e-3, min_lr=3e-4, warmup_iters=5, lr_decay_iters=TRAIN_STEPS,
                     beta1=0.9, beta2=0.95, weight_decay=0.1, grad_clip=1.0)
    model, cfg = _jax_model(seed=1)
    torch_model = TorchGPT.from_jaxllm(model).train()
    torch_opt = torch_model.configure_optimizer(oc.weight_decay, oc.learning_rate, (oc.beta1, oc.beta2))

    rng = np.random.RandomState(0)
    stream = (np.arange(4000) * 7 + rng.randint(0, 3, 4000)) % V  # learnable, not trivial
    starts = rng.randint(0, len(stream) - T - 1, (TRAIN_STEPS, 4))
    xs = np.stack([[stream[s:s + T] for s in row] for row in starts])
    ys = np.stack([[stream[s + 1:s + T + 1] for s in row] for row in starts])

    optimizer = make_optimizer(oc)
    graphdef, state = init_train_state(model, optimizer)
    step = make_train_step(graphdef, lm_loss_fn, optimizer, lr_schedule(oc))
    jax_losses, grad_norms = [], []
    for i in range(TRAIN_STEPS):
        state, metrics = step(state, (xs[i][None], ys[i][None]), jax.random.key(0))
        jax_losses.append(float(metrics["loss"]))
        grad_norms.append(float(metrics["grad_norm"]))

    schedule = dict(learning_rate=oc.learning_rate, min_lr=oc.min_lr, warmup_iters=oc.warmup_iters,
                    lr_decay_iters=oc.lr_decay_iters)
    torch_losses = []
    for i in range(TRAIN_STEPS):
        for group in torch_opt.param_groups:
            group["lr"] = nanogpt_lr(i, schedule)
        _, loss = torch_model(torch.as_tensor(xs[i]), torch.as_tensor(ys[i]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(torch_model.parameters(), oc.grad_clip)
        torch_opt.step()
        torch_opt.zero_grad(set_to_none=True)
        torch_losses.append(loss.item())

    assert jax_losses[-1] < jax_losses[0] - 0.15  # it really trained
    assert max(grad_norms) > oc.grad_clip       # and clipping was exercised
    np.testing.assert_allclose(jax_losses, torch_losses, rtol=0, atol=LOSS_ATOL)
    final = model_to_hf_state(nnx.merge(graphdef, state.trainable, state.frozen))
    theirs = torch_model.state_as_numpy()
    weight_diff = max(np.abs(final[k] - theirs[k]).max() for k in theirs)
    assert weight_diff < WEIGHT_ATOL, weight_diff
