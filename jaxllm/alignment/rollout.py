"""What PPO and GRPO share: prompts, rollouts from the compiled sampler inside the training loop,
log-probs scored with the processing used to sample, reward functions, the update layout and the
held-out evaluation.

Each step of an RL run (`RolloutBatches`, the training loop's `online` batches):

1. draws its prompts with a generator seeded by (seed, step) and samples completions with jaxllm's
   KV-cache sampler inside one jitted function that takes the policy's weights as ARGUMENTS (compiled
   once per run, never per rollout; the weights are never constants of the program); the sampling
   key is fold_in(key(seed), step), so a resumed run draws exactly the rollouts it would have;
2. scores them (the method's `score`: log-probs, reference, rewards, advantages), timed apart;
3. lays the rows out as (updates, accum, micro_batch) for `epochs` passes over `num_mini_batches`
   shuffled minibatches: one optimizer update per minibatch.

A completion's real tokens are those up to and including its first EOS; after it the sampler
writes PAD (never EOS), and those positions weigh nothing anywhere. Log-probs of completion tokens
are always taken from logits / temperature, the one processing the sampler applies (other warpers
are not offered for RL: a truncated distribution gives -inf log-probs once the policy moves).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import pathlib
import time
import typing
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm import parallel, peft
from jaxllm.alignment.pairs import base_and_tokenizer
from jaxllm.configfile import to_dict
from jaxllm.data.instruct import resolve_special_ids
from jaxllm.data.prompts import LONG_PROMPTS, PromptSet, load_prompts
from jaxllm.heads import HeadParam, PolicyWithValue
from jaxllm.logits_processors import SamplingConfig
from jaxllm.model import count_params
from jaxllm.peft import PeftParam, apply_method, format_report, parameter_report
from jaxllm.runs import check_resume, peft_run_meta
from jaxllm.sampling import cut_at_eos, sample_in_jit, sampler_plan
from jaxllm.training.loop import TrainResult, train_loop
from jaxllm.training.step import evaluate_model


@dataclasses.dataclass(frozen=True)
class PromptDataConfig:
    train_file: typing.Optional[str] = None   # JSONL prompts: {"prompt": ...} or an SFT format (see data.prompts)
    eval_file: typing.Optional[str] = None    # JSONL held-out prompts (greedy answers scored after each eval)
    tokenizer: typing.Optional[str] = None    # default: the base's own
    on_error: str = "raise"                   # raise | skip (malformed lines, counted)
    long_prompts: str = "truncate"            # truncate | skip: prompts with no room left for the response
    eos_id: typing.Optional[int] = None
    pad_id: typing.Optional[int] = None
    eval_batch_size: int = 64

    def __post_init__(self):
        if self.long_prompts not in LONG_PROMPTS:
            raise ValueError(f"data.long_prompts must be one of {', '.join(LONG_PROMPTS)}, got {self.long_prompts!r}")
        if self.eval_batch_size <= 0:
            raise ValueError(f"data.eval_batch_size must be positive, got {self.eval_batch_size}")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    max_new_tokens: int = 32        # the response length (TRL: response_length / max_completion_length)
    temperature: float = 0.7        # > 0; log-probs are scored at the same temperature
    epochs: int = 1                 # passes over each rollout batch (PPO: num_ppo_epochs; GRPO: num_iterations)
    num_mini_batches: int = 1       # optimizer updates per pass; rows per rollout = this x batch x accum

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"rollout.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"rollout.temperature must be a finite number > 0 (RL samples), got {self.temperature}")
        for name in ("epochs", "num_mini_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"rollout.{name} must be >= 1, got {getattr(self, name)}")


def load_prompt_sets(d: PromptDataConfig, tok, block_size: int, max_new_tokens: int, stage: str):
    """(train prompts, eval prompts or None, eos, pad): prompts with room for max_new_tokens."""
    if not d.train_file:
        raise ValueError(f"data.train_file is required: a JSONL file of prompts for `jaxllm {stage}`")
    eos, pad = resolve_special_ids(tok, d.eos_id, d.pad_id)
    common = dict(eos_id=eos, pad_id=pad, max_prompt_len=block_size - max_new_tokens,
                  long_prompts=d.long_prompts, on_error=d.on_error)
    train = load_prompts(d.train_file, tok, **common)
    held = load_prompts(d.eval_file, tok, **common) if d.eval_file else None
    return train, held, eos, pad


def policy_of(model):
    """The GPT that samples: the model itself, or a PolicyWithValue's trunk."""
    return model.trunk if isinstance(model, PolicyWithValue) else model


# --------------------------------------------------------------------------- traced pieces


def completion_mask(completion_BR, eos: int):
    """(mask (B, R): the tokens up to and including the first EOS, has_eos (B,)), in numpy (host side)."""
    is_eos = np.asarray(completion_BR) == eos
    before = np.cumsum(is_eos, axis=1) - is_eos           # EOS seen strictly before each position
    return before == 0, is_eos.any(axis=1)


def full_sequence(prompt_BP, real_BP, completion_BR, mask_BR):
    """(tokens (B, P+R), attention mask (B, P+R)): the prompt's real tokens and the completion's."""
    return (np.concatenate([prompt_BP, completion_BR], axis=1), np.concatenate([real_BP, mask_BR], axis=1))


def completion_features(gpt, tokens_BT, attn_BT, P: int, dropout_key=None):
    """(B, R, D) hidden states that predict the completion tokens (positions P-1 .. T-2)."""
    return gpt.features(tokens_BT, attention_mask=attn_BT, dropout_key=dropout_key)[:, P - 1:-1]


def token_logps(gpt, h_BRD, completion_BR, temperature: float):
    """(log-probs (B, R) of the completion tokens, entropies (B, R)) under logits / temperature."""
    logp_BRV = jax.nn.log_softmax(gpt.logits(h_BRD).astype(jnp.float32) / temperature, axis=-1)
    logps = jnp.take_along_axis(logp_BRV, completion_BR[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_BRV) * logp_BRV, axis=-1)
    return logps, entropy


def policy_logps(gpt, batch, P: int, temperature: float, dropout_key=None):
    """(logps, entropy, hidden states) of a batch's completions under `gpt`."""
    h = completion_features(gpt, batch["tokens"], batch["attn"], P, dropout_key)
    return (*token_logps(gpt, h, batch["completion"], temperature), h)


# --------------------------------------------------------------------------- reward functions


def exact_match(prompts, completions, target=None, answer=None, **_):
    """1.0 where the completion is the record's answer (column "answer", else its response "target")."""
    want = answer if answer is not None else target
    if want is None:
        raise ValueError("exact_match needs an 'answer' or a response ('target') in every prompt record")
    return [float(c == w) for c, w in zip(completions, want)]


BUILTIN_REWARDS = {"exact_match": exact_match}


def load_reward_function(spec):
    """A reward function from a callable, a built-in name (exact_match), "module:function" or
    "path/to/file.py:function"."""
    if callable(spec):
        return spec
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"reward function {spec!r}: give a built-in ({', '.join(BUILTIN_REWARDS)}), "
                         f"'module:function' or 'file.py:function'")
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py"):
        path = pathlib.Path(where)
        if not path.is_file():
            raise FileNotFoundError(f"reward function {spec!r}: {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: {where} has no function {name!r}")
    return fn


def reward_name(fn) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def call_reward(fn, prompts: list[str], completions: list[str], columns: list[dict]) -> np.ndarray:
    """(N,) float32 rewards from fn(prompts, completions, **columns) (TRL's signature: each column a
    list over the samples). A function that raises, returns the wrong count, or gives a value that
    is not a finite number is an error naming the function and the sample."""
    name = reward_name(fn)
    keys = sorted({k for c in columns for k in c})
    kwargs = {k: [c.get(k) for c in columns] for k in keys}
    try:
        out = fn(prompts, completions, **kwargs)
    except Exception as e:
        raise RuntimeError(f"reward function {name!r} raised {type(e).__name__}: {e}") from e
    try:
        out = list(out)
    except TypeError:
        raise TypeError(f"reward function {name!r} returned {type(out).__name__}; it must return one number "
                        f"per completion (a list of {len(completions)})") from None
    if len(out) != len(completions):
        raise ValueError(f"reward function {name!r} returned {len(out)} rewards for {len(completions)} completions")
    for i, v in enumerate(out):
        ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)
        if not ok:
            raise ValueError(f"reward function {name!r} returned {v!r} for sample {i} (prompt {prompts[i]!r}, "
                             f"completion {completions[i]!r}); each reward must be a finite number")
    return np.asarray(out, np.float32)


# --------------------------------------------------------------------------- the rollouts


class RolloutBatches:
    """The loop's `online` batches: sample, score (the method's `score`), lay out for the updates.

    Subclasses give `score(state, batch, step) -> (fields, metrics)`: the per-row arrays the loss
    reads besides tokens/attn/completion/mask, and rollout metrics; `state_dict`/`load_state_dict`
    if they keep state between rollouts."""

    def __init__(self, prompts: PromptSet, tokenizer, config, *, rollout: RolloutConfig, accum: int,
                 micro: int, group: int, eos: int, pad: int, seed: int):
        rows = rollout.num_mini_batches * micro * accum
        if rows % group:
            raise ValueError(f"rows per rollout ({rows} = rollout.num_mini_batches x train.batch_size x "
                             f"train.grad_accum) must be a multiple of the samples per prompt ({group})")
        self.prompts, self.tok, self.cfg = prompts, tokenizer, rollout
        self.rows, self.accum, self.micro, self.group = rows, accum, micro, group
        self.eos, self.pad, self.seed = eos, pad, seed
        self.P = prompts.tokens.shape[1]
        self.config = config                # the policy's GPTConfig
        self.history: list[dict] = []      # per step: times and rollout metrics (benchmarks read it)

    # the loop's protocol
    def bind(self, graphdef, mesh) -> None:
        self.graphdef, self.mesh = graphdef, mesh
        plan, self.settings = sampler_plan(self.config, self.P, self.cfg.max_new_tokens,
                                           SamplingConfig(temperature=self.cfg.temperature),
                                           eos_id=self.eos, pad_id=self.pad)

        @jax.jit
        def sample(trainable, frozen, settings, prompt_BP, real_BP, key):
            model = nnx.merge(graphdef, trainable, frozen)
            return sample_in_jit(policy_of(model), plan, settings, prompt_BP, real_BP, key)[0]
        self._sample = sample

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, d: dict) -> None:
        pass

    def _place(self, x):
        return x if self.mesh is None else parallel.shard_batch(x, self.mesh, 0)

    def _constant(self, tree):
        """Frozen weights (reference, reward model) placed beside the state: replicated on the mesh."""
        return tree if self.mesh is None or tree is None else parallel.place(tree, parallel.replicated(self.mesh))

    def __call__(self, step: int, state):
        jax.block_until_ready(state.trainable)   # the last update: not rollout time
        t0 = time.perf_counter()
        n_prompts = self.rows // self.group
        idx = np.random.default_rng([self.seed, step]).integers(0, len(self.prompts), n_prompts)
        idx = np.repeat(idx, self.group)                       # a group's samples are consecutive
        prompt, real = self.prompts.tokens[idx], self.prompts.real[idx]
        key = jax.random.fold_in(jax.random.key(self.seed), step)
        # gather_to_host: on a mesh spanning processes each holds only its rows of the output
        completion = parallel.gather_to_host(self._sample(state.trainable, state.frozen, self.settings,
                                                          self._place(prompt), self._place(real), key))
        t1 = time.perf_counter()
        mask, has_eos = completion_mask(completion, self.eos)
        tokens, attn = full_sequence(prompt, real, completion, mask)
        batch = {"tokens": tokens, "attn": attn, "completion": completion, "mask": mask}
        fields, metrics = self.score(state, batch, dict(step=step, idx=idx, has_eos=has_eos))
        batch.update(fields)
        t2 = time.perf_counter()
        lengths = mask.sum(axis=1)
        truncated = int((~has_eos).sum())
        if truncated == self.rows:
            warnings.warn(f"step {step}: all {self.rows} completions reached rollout.max_new_tokens="
                          f"{self.cfg.max_new_tokens} without EOS: their rewards are those of cut-off answers "
                          f"(and in GRPO equal within each group: zero advantage, zero gradient). Raise "
                          f"rollout.max_new_tokens.", RuntimeWarning, stacklevel=2)
        metrics = {**metrics, "completions/mean_length": float(lengths.mean()),
                   "completions/clipped_ratio": truncated / self.rows,
                   "time/rollout": t1 - t0, "time/scoring": t2 - t1}
        self.history.append({"step": step, **metrics})
        return self._layout(batch, step), metrics

    def _layout(self, batch: dict, step: int) -> dict:
        """Rows -> (epochs x num_mini_batches, accum, micro, ...): each pass a fresh shuffle."""
        rng = np.random.default_rng([self.seed, step, 1])
        order = np.concatenate([rng.permutation(self.rows) for _ in range(self.cfg.epochs)])
        order = order.reshape(-1, self.accum, self.micro)
        return {k: np.asarray(v)[order] for k, v in batch.items()}

    def decode(self, completion) -> list[str]:
        return [self.tok.decode(cut_at_eos(row, self.eos)) for row in np.asarray(completion)]


# --------------------------------------------------------------------------- held-out evaluation


def greedy_completions(graphdef, config, prompts: PromptSet, max_new_tokens: int, batch_size: int, eos: int,
                       pad: int):
    """run(trainable, frozen) -> greedy completions (N, R) of every held-out prompt, in fixed-shape
    batches (one compile)."""
    plan, settings = sampler_plan(config, prompts.tokens.shape[1], max_new_tokens,
                                  SamplingConfig(temperature=0.0), eos_id=eos, pad_id=pad)

    @jax.jit
    def fn(trainable, frozen, prompt_BP, real_BP):
        model = nnx.merge(graphdef, trainable, frozen)
        return sample_in_jit(policy_of(model), plan, settings, prompt_BP, real_BP, jax.random.key(0))[0]

    def run(trainable, frozen):
        n = len(prompts)
        out = []
        for s in range(0, n, batch_size):
            idx = np.arange(s, s + batch_size) % n
            out.append(parallel.gather_to_host(fn(trainable, frozen, prompts.tokens[idx], prompts.real[idx])))
        return np.concatenate(out)[:n]
    return run


def reward_evaluator(prompts: PromptSet, tokenizer, config, reward_fns, weights, max_new_tokens: int,
                     batch_size: int, eos: int, pad: int, extra=None):
    """make_eval for the loop: greedy answers to the held-out prompts, scored by each reward function
    (val_rewards/<name>) and their weighted sum (val_reward); `extra(state, completions)` may add
    more (PPO's reward-model score)."""
    def make_eval(graphdef, mesh=None):
        run = greedy_completions(graphdef, config, prompts, max_new_tokens, batch_size, eos, pad)

        def evaluate(state):
            completion = run(state.trainable, state.frozen)
            texts = [tokenizer.decode(cut_at_eos(r, eos)) for r in completion]
            out = {}
            total = np.zeros(len(texts), np.float32)
            for fn, w in zip(reward_fns, weights):
                r = call_reward(fn, prompts.texts, texts, prompts.columns)
                out[f"val_rewards/{reward_name(fn)}"] = float(r.mean())
                total += w * r
            if reward_fns:
                out = {"val_reward": float(total.mean()), **out}
            if extra is not None:
                out = {**extra(state, completion), **out}
            out["val_length"] = float(completion_mask(completion, eos)[0].sum(axis=1).mean())
            return out
        return evaluate
    return make_eval



# --------------------------------------------------------------------------- the driver both share


@dataclasses.dataclass
class RLResult:
    train: TrainResult
    before: dict           # held-out metrics (greedy answers) of the starting policy
    after: dict
    reference: typing.Any  # "adapter_off", (graphdef, state) of the frozen copy, or None
    history: list          # per step: rollout metrics and times (PPO: the KL coefficient used)


def start_policy(config, stage: str, value_head: bool = False, need_reference: bool = True):
    """(model, gpt, cfg, tokenizer, trainable, reference): the policy a stage trains (with PPO's value
    head), its PEFT method applied, and its reference: "adapter_off" (the same weights with the
    adapters switched off: no copy) or, for full fine-tuning, (graphdef, state) of a frozen copy;
    None when not needed."""
    gpt, cfg, tok = base_and_tokenizer(config.init, config.data.tokenizer, stage)
    trainable = apply_method(gpt, config.peft)
    full = trainable is nnx.Param
    reference = None if not need_reference else "adapter_off" if not full else \
        (nnx.graphdef(gpt), jax.tree.map(jnp.copy, nnx.state(gpt)))   # own buffers: the step donates the model's
    model = gpt
    if value_head:
        model = PolicyWithValue(gpt, rngs=nnx.Rngs(config.peft.seed))
        trainable = nnx.Param if full else nnx.Any(PeftParam, HeadParam)
    print(f"{stage}: {count_params(model):,} parameters; method: {config.peft.method}; "
          f"{format_report(parameter_report(model, trainable))}; "
          f"reference: {'none' if reference is None else 'the base with adapters off' if reference == 'adapter_off' else 'a frozen copy'}")
    return model, gpt, cfg, tok, trainable, reference


def reference_logps(model, reference, batch, P: int, temperature: float):
    """The reference policy's log-probs of a batch's completions (no gradient)."""
    gpt = policy_of(model)
    if reference == "adapter_off":
        with peft.disabled(gpt):
            logps = policy_logps(gpt, batch, P, temperature)[0]
    else:
        logps = policy_logps(reference, batch, P, temperature)[0]
    return jax.lax.stop_gradient(logps)


def train_online(kind: str, config, model, trainable, loss_fn, cfg, tok, online: RolloutBatches, make_eval,
                 meta_extra: dict | None = None):
    """The part of `jaxllm ppo` and `jaxllm grpo` after their model, loss and rollouts are set:
    the run's metadata, the held-out metrics before, the one training loop, the metrics after.
    Returns an RLResult."""
    loop = config.train
    # optim.warmup_iters / lr_decay_iters count rollout steps, as train.max_iters does; the optimizer
    # counts updates, rollout.epochs x rollout.num_mini_batches of them per step
    per_step = online.cfg.epochs * online.cfg.num_mini_batches
    optim = dataclasses.replace(config.optim, warmup_iters=config.optim.warmup_iters * per_step,
                                lr_decay_iters=config.optim.lr_decay_iters * per_step)
    peft_meta = peft_run_meta(model, trainable, config.init)
    meta = {"kind": kind, **(meta_extra or {}), "model": cfg.to_dict(), "config": to_dict(config),
            "data": {"train": config.data.train_file, "eval": config.data.eval_file, "eos_id": online.eos,
                     "pad_id": online.pad}, **peft_meta}
    before = evaluate_model(model, trainable, make_eval) if make_eval is not None else {}
    if before:
        print("before: " + ", ".join(f"{k} {v:.4f}" for k, v in before.items()))
    T = online.P + online.cfg.max_new_tokens
    result = train_loop(model, loss_fn, None, optim=optim, loop=loop, meta=meta, make_eval=make_eval,
                        trainable=trainable, tokens_per_step=online.rows * T * online.cfg.epochs,
                        flops_per_token=cfg.flops_per_token(T), tokenizer=tok, checkpoint_frozen=not peft_meta,
                        check_resume=lambda saved, where: check_resume(saved, meta, where), online=online)
    after = result.evals[max(result.evals)] if result.evals else {}
    if after:
        print("after:  " + ", ".join(f"{k} {v:.4f}" for k, v in after.items()))
    return RLResult(result, before, after, online.reference, online.history)
