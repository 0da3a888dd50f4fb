"""The train state and the pure, jitted train/eval steps every training stage shares.

A stage supplies only `loss_fn(model, batch, key) -> (loss_sum, count)`; this file turns it into one
compiled step with gradient accumulation, clipping, the optimizer update and a NaN guard.

A loss may also return a third item, a dict of metric sums over the same items as `count` (e.g.
DPO's rewards/margins summed over pairs): the step reports each divided by the total count, except
names starting with "min_" / "max_", which hold a minimum / maximum and are reduced as such. A
stage whose loss needs arrays that are neither trained nor checkpointed (a frozen reference model's
weights) passes them as `constants`: an argument of the compiled step, then
`loss_fn(model, batch, key, constants)`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxllm import parallel
from jaxllm.losses import IGNORE_INDEX, cross_entropy_sum

LossFn = Callable[..., tuple]   # (model, batch, key[, constants]) -> (loss_sum, count[, metric sums])


def metric_reduction(name: str):
    """How a metric sum combines over micro-batches: min, max, or a sum."""
    return jnp.minimum if name.startswith("min_") else jnp.maximum if name.startswith("max_") else jnp.add


def _metric_start(name: str) -> float:
    """The value a metric's reduction starts from (its identity)."""
    return jnp.inf if name.startswith("min_") else -jnp.inf if name.startswith("max_") else 0.0


def metric_means(sums: dict, count) -> dict:
    """Metric sums -> means over `count` (minima and maxima as they are)."""
    return {k: v if k.startswith(("min_", "max_")) else v / count for k, v in sums.items()}


def _apply(loss_fn, model, batch, key, constants):
    return loss_fn(model, batch, key) if constants is None else loss_fn(model, batch, key, constants)


def _call(loss_fn, model, batch, key, constants):
    out = _apply(loss_fn, model, batch, key, constants)
    return out if len(out) == 3 else (*out, {})


class TrainState(NamedTuple):
    step: jax.Array          # int32 scalar: optimizer updates applied so far
    trainable: nnx.State     # what the optimizer sees (all params, or only LoRA/adapters/heads)
    frozen: nnx.State        # everything else; never touched by the update
    opt_state: Any


def split_model(model: nnx.Module, trainable=nnx.Param):
    """graphdef, trainable state, frozen state: "train only LoRA" is just another filter."""
    return nnx.split(model, trainable, ...)


def init_train_state(model: nnx.Module, optimizer: optax.GradientTransformation, trainable=nnx.Param):
    graphdef, train_vars, frozen = split_model(model, trainable)
    state = TrainState(jnp.zeros((), jnp.int32), train_vars, frozen, optimizer.init(train_vars))
    return graphdef, state


def abstract_train_state(make_model: Callable[[], nnx.Module], optimizer: optax.GradientTransformation):
    """(graphdef, train state as shapes only) of the model `make_model()` builds, nothing allocated:
    for compiling a step from shapes (memory per device, compile time) without making the weights."""
    graphdef = nnx.split(nnx.eval_shape(make_model))[0]
    return graphdef, jax.eval_shape(lambda: init_train_state(make_model(), optimizer)[1])


def lm_loss_fn(model, batch, key):
    """Pretraining loss: batch = (x, y) with y already shifted (nanoGPT's windows)."""
    x, y = batch
    return cross_entropy_sum(model(x, dropout_key=key), y)


def make_train_step(graphdef, loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    lr_fn: Callable | None = None, mesh=None, updates: bool = False,
                    state_sharding=None):
    """Returns step(state, batch, key) -> (state, metrics), jitted with the state donated.

    With a `mesh` (see `jaxllm.parallel.data_mesh`) the state must be replicated on it and the
    batch placed with `parallel.shard_batch(batch, mesh, 1)` (rows split across devices); XLA adds
    the gradient all-reduce, and the new state stays replicated. With `state_sharding` (a tree of
    NamedSharding shaped like the state, see `jaxllm.parallel.state_shardings`) the state is split
    that way instead, on a named (data, fsdp, tensor) mesh, and the new state keeps the same split.

    `key` is the run's base key; the step's own dropout key is derived from it and `state.step`
    inside the compiled program, so resuming needs no key state (and no per-step host work).

    `batch` leaves carry a leading gradient-accumulation axis (accum, micro_batch, ...). Gradients
    of the summed loss are added over micro-batches and divided once by the total token count, so
    every token weighs the same however the batch is split. A non-finite loss or gradient leaves
    the state unchanged and sets `metrics["finite"]` to False; the loop stops on it before the
    next checkpoint, so a NaN never reaches one.

    With `updates=True` the batch has one more leading axis, (updates, accum, micro_batch, ...):
    one call applies that many optimizer updates in turn (PPO's epochs over minibatches of one
    rollout), and reports each metric's mean over them ("tokens" summed, "finite" all).
    """

    def sum_loss(trainable, frozen, micro_batch, key, constants):
        model = nnx.merge(graphdef, trainable, frozen)
        loss_sum, count, aux = _call(loss_fn, model, micro_batch, key, constants)
        return loss_sum, (count, aux)

    grad_fn = jax.value_and_grad(sum_loss, has_aux=True)

    def one_update(state: TrainState, batch, key, constants=None):
        accum = jax.tree.leaves(batch)[0].shape[0]
        keys = jax.random.split(jax.random.fold_in(key, state.step), accum)

        def micro(carry, inputs):
            grads_acc, loss_acc, count_acc, aux_acc = carry
            micro_batch, k = inputs
            (loss_sum, (count, aux)), grads = grad_fn(state.trainable, state.frozen, micro_batch, k, constants)
            grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
            aux_acc = {name: metric_reduction(name)(aux_acc[name], v) for name, v in aux.items()}
            return (grads_acc, loss_acc + loss_sum, count_acc + count, aux_acc), None

        first = jax.tree.map(lambda a: a[0], batch)
        if accum == 1:  # no scan: XLA sees one straight-line program
            (loss_sum, (count, aux)), grads = grad_fn(state.trainable, state.frozen, first, keys[0], constants)
        else:
            # the metric sums' structure, from an abstract evaluation (no compute, no second copy)
            aux_shape = jax.eval_shape(lambda: sum_loss(state.trainable, state.frozen, first, keys[0], constants)[1][1])
            aux0 = {name: jnp.full(a.shape, _metric_start(name), jnp.float32) for name, a in aux_shape.items()}
            zeros = jax.tree.map(jnp.zeros_like, state.trainable)
            carry = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), aux0)
            (grads, loss_sum, count, aux), _ = jax.lax.scan(micro, carry, (batch, keys))
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        loss = loss_sum / count
        grad_norm = optax.tree.norm(grads)

        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply(state, grads):
            updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
            trainable = optax.apply_updates(state.trainable, updates)
            return state._replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)

        # The update runs inside the cond's branch, so the donated buffers are updated in place;
        # a select between old and new state would make XLA copy every optimizer buffer.
        new_state = jax.lax.cond(ok, apply, lambda state, grads: state, state, grads)
        metrics = {**metric_means(aux, count), "loss": loss, "grad_norm": grad_norm, "tokens": count, "finite": ok}
        if lr_fn is not None:
            metrics["lr"] = lr_fn(state.step)
        return new_state, metrics

    def step(state: TrainState, batch, key, constants=None):
        with parallel.on_mesh(mesh):   # a named mesh's activation hints (see parallel.constrain_rows)
            return updates_of(state, batch, key, constants)

    def updates_of(state: TrainState, batch, key, constants=None):
        if not updates:
            return one_update(state, batch, key, constants)
        state, per_update = jax.lax.scan(lambda st, b: one_update(st, b, key, constants), state, batch)
        metrics = {k: (jnp.all(v) if k == "finite" else jnp.sum(v) if k == "tokens"
                       else jnp.min(v) if k.startswith("min_") else jnp.max(v) if k.startswith("max_")
                       else jnp.mean(v)) for k, v in per_update.items()}
        return state, metrics

    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    if state_sharding is not None:
        return jax.jit(step, donate_argnums=0, out_shardings=(state_sharding, parallel.replicated(mesh)))
    return jax.jit(step, donate_argnums=0, out_shardings=parallel.replicated(mesh))


def make_eval_step(graphdef, loss_fn: LossFn = lm_loss_fn, mesh=None, constants=None):
    """Returns eval(state, batch) -> what loss_fn returns (loss_sum, count[, metric sums]) with no
    dropout, jitted.

    With a `mesh`, batch rows (axis 0) are split across its devices."""

    def evaluate(trainable, frozen, batch, constants):
        model = nnx.merge(graphdef, trainable, frozen)
        with parallel.on_mesh(mesh):
            return _apply(loss_fn, model, batch, None, constants)

    jitted = jax.jit(evaluate)
    if mesh is None:
        return lambda state, batch: jitted(state.trainable, state.frozen, batch, constants)
    if constants is not None:   # beside the state, on every device of the mesh
        constants = jax.device_put(constants, parallel.replicated(mesh))
    return lambda state, batch: jitted(state.trainable, state.frozen, parallel.shard_batch(batch, mesh, 0), constants)


def mask_rows(y_BT, row_mask_B):
    """Targets of padded rows become IGNORE_INDEX so a fixed-shape eval batch counts only real rows."""
    return jnp.where(jnp.asarray(row_mask_B)[:, None], y_BT, IGNORE_INDEX)


def evaluate_model(model: nnx.Module, trainable, make_eval) -> dict:
    """Run a stage's evaluator (the loop's `make_eval`) on a model outside the loop: the numbers
    "before tuning"."""
    graphdef, train_vars, frozen = split_model(model, trainable)
    metrics = make_eval(graphdef, None)(TrainState(None, train_vars, frozen, None))
    return {k: float(v) for k, v in metrics.items()}
