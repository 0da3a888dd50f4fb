"""A plain PyTorch GPT-2 (nanoGPT-style): the PyTorch baseline for jaxllm's benchmarks and parity tests.

Weights exchange with jaxllm through `state_as_numpy` / `load_state_from_numpy` (or `from_jaxllm` /
`to_jaxllm`), in HF GPT-2 names and HF's Conv1D orientation (in, out) -- the transpose of
nn.Linear's (out, in). The name table is jaxllm's own (jaxllm.interop.hf.hf_tensor_specs), so jaxllm,
this model and transformers' GPT2LMHeadModel all agree on one mapping.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from jaxllm.interop import hf


@dataclass
class TorchGPTConfig:
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = True
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_tanh"   # or "gelu" (exact erf), as jaxllm's GPTConfig.activation


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TorchGPTConfig):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: TorchGPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)
        self.approximate = {"gelu_tanh": "tanh", "gelu": "none"}[cfg.activation]

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):
    def __init__(self, cfg: TorchGPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TorchGPT(nn.Module):
    def __init__(self, cfg: TorchGPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2 scales the projections that write into the residual stream by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        assert T <= self.config.block_size, f"sequence length {T} > block_size {self.config.block_size}"
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:  # targets are already shifted: targets[:, t] is the token after idx[:, t]
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-100)
        return logits, loss

    def configure_optimizer(self, weight_decay, lr, betas):
        # Decay matrices and embeddings; never biases or LayerNorm gains (nanoGPT's dim >= 2 rule).
        params = [p for p in self.parameters() if p.requires_grad]  # parameters() dedups the tied head
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=False)

    # --- weight exchange: HF GPT-2 names and orientation, from jaxllm's one mapping table ---

    def jaxllm_config(self):
        """The jaxllm GPTConfig that computes the same function as this model."""
        from jaxllm.config import GPTConfig

        c = self.config
        return GPTConfig(vocab_size=c.vocab_size, block_size=c.block_size, n_layer=c.n_layer,
                         n_head=c.n_head, n_embd=c.n_embd, dropout=c.dropout, bias=c.bias,
                         layer_norm_eps=c.layer_norm_eps, activation=c.activation)

    def _hf_named_tensors(self):
        """(hf_name, tensor, is_conv1d) for every stored tensor; the tied lm_head is omitted.

        Parameter names are HF GPT-2's by construction; this checks them against the canonical
        table (jaxllm.interop.hf.hf_tensor_specs) so the two can never drift apart.
        """
        specs = hf.hf_tensor_specs(self.jaxllm_config())
        out = []
        for name, p in self.named_parameters():  # named_parameters skips the tied lm_head.weight
            spec = specs.get(name)
            if spec is None:
                raise RuntimeError(f"TorchGPT parameter {name} has no entry in jaxllm's HF mapping")
            conv1d = hf.is_conv1d_weight(name)
            shape = tuple(p.shape[::-1]) if conv1d else tuple(p.shape)
            if shape != spec.shape:
                raise RuntimeError(f"TorchGPT {name} is {shape} in HF orientation, the mapping says {spec.shape}")
            out.append((name, p, conv1d))
        return out

    def state_as_numpy(self) -> dict:
        return {name: (p.detach().T if conv1d else p.detach()).cpu().numpy().copy()
                for name, p, conv1d in self._hf_named_tensors()}

    @torch.no_grad()
    def load_state_from_numpy(self, arrays: dict) -> None:
        """Load HF-named arrays (`transformer.`-prefixed or bare), e.g. from jaxllm's model_to_hf_state."""
        arrays = {hf.canonical_hf_name(n): a for n, a in arrays.items() if not hf.is_ignorable(n)}
        expected = self._hf_named_tensors()
        names = {n for n, _, _ in expected}
        missing = [n for n in names if n not in arrays]
        # A bias-free model accepts the all-zero biases jaxllm writes for HF (same function).
        unexpected = {n for n in set(arrays) - names - {"lm_head.weight"}
                      if not (not self.config.bias and n.endswith(".bias") and not np.any(arrays[n]))}
        if missing or unexpected:
            raise KeyError(f"missing={sorted(missing)} unexpected={sorted(unexpected)}")
        for name, p, conv1d in expected:
            t = torch.tensor(np.asarray(arrays[name]), dtype=p.dtype)  # a copy: sources may be read-only
            t = t.T if conv1d else t
            if t.shape != p.shape:
                raise ValueError(f"{name}: got {tuple(t.shape)}, expected {tuple(p.shape)}")
            p.copy_(t)

    @classmethod
    def from_jaxllm(cls, model) -> "TorchGPT":
        """A TorchGPT holding a jaxllm GPT's weights (dropout and dtype settings carried over)."""
        c = model.config
        torch_model = cls(TorchGPTConfig(vocab_size=c.vocab_size, block_size=c.block_size, n_layer=c.n_layer,
                                         n_head=c.n_head, n_embd=c.n_embd, dropout=c.dropout, bias=c.bias,
                                         layer_norm_eps=c.layer_norm_eps, activation=c.activation))
        torch_model.load_state_from_numpy(hf.model_to_hf_state(model))
        return torch_model

    def to_jaxllm(self):
        """A jaxllm GPT with this model's current weights."""
        return hf.model_from_hf_state(self.state_as_numpy(), self.jaxllm_config(), source="TorchGPT")
