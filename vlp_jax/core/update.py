"""The update step: the default one (value_and_grad over every collection, gradient accumulation
over strided micro-batches, one optimizer per collection) and the jit that runs any update,
default or a task's own, on the mesh with the state donated."""
from __future__ import annotations

import inspect
from typing import Any
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vlp_jax.core.state import TrainState
from vlp_jax.parallel import sharding as shd

# (params {collection: tree}, batches {stream: batch}, rng, *, train, frozen) ->
# (scalar loss, metrics dict of scalars).
LossFn = Callable[..., tuple[jax.Array, dict]]
# (state, batches, frozen) -> (state, metrics).
UpdateFn = Callable[[TrainState, dict, Any], tuple[TrainState, dict]]


def split_micro(batch: Any, accum: int) -> Any:
  """Every leaf [B, ...] -> [accum, B/accum, ...], taking rows i*accum + a into micro-batch a.

  Strided rows keep every micro-batch spread over all batch shards (a contiguous split would put
  each micro-batch on a fraction of the devices).
  """
  def split(x):
    if x.shape[0] % accum:
      raise ValueError(f"batch of {x.shape[0]} rows does not split into {accum} micro-batches")
    x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:])
    x = jnp.swapaxes(x, 0, 1)
    return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))
  return jax.tree.map(split, batch)


def make_default_update(loss_fn: LossFn, optimizers: Mapping[str, optax.GradientTransformation],
                        schedules: Mapping[str, Any], grad_accum: int = 1) -> UpdateFn:
  """Returns `update(state, batches, frozen) -> (state, metrics)`; jit it with `jit_update`.

  Every collection is differentiated and updated by its own optimizer (frozen leaves get zero
  updates there). `frozen` (a pytree or None) is passed to the loss unchanged: it is not
  differentiated and has no optimizer state.

  Metrics: the task's metrics averaged over micro-batches, plus `grad_norm` (all collections),
  `lr` (of `model`, or of the first collection), `finite` (loss, gradient norm and update norm
  are finite) and, with several collections, `grad_norm/<name>` and `lr/<name>`.
  """
  # `step` goes to losses that take it (schedules); a task written before it keeps working.
  params_of_loss = inspect.signature(loss_fn).parameters
  takes_step = "step" in params_of_loss or any(
      p.kind is inspect.Parameter.VAR_KEYWORD for p in params_of_loss.values())

  def grads_of(params, batches, rng, frozen, step):
    extra = {"step": step} if takes_step else {}
    (loss, metrics), grads = jax.value_and_grad(
        lambda p: loss_fn(p, batches, rng, train=True, frozen=frozen, **extra),
        has_aux=True)(params)
    return grads, dict(metrics, loss=loss)

  def update(state: TrainState, batches: dict, frozen: Any = None):
    rng = jax.random.fold_in(state.rng, state.step)
    if grad_accum == 1:
      grads, metrics = grads_of(state.params, batches, rng, frozen, state.step)
    else:
      micro = split_micro(batches, grad_accum)

      def body(carry, xs):
        acc, i = carry
        g, m = grads_of(state.params, xs, jax.random.fold_in(rng, i), frozen, state.step)
        return (jax.tree.map(jnp.add, acc, g), i + 1), m

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, _), metrics = jax.lax.scan(body, (zeros, 0), micro)
      grads = jax.tree.map(lambda g: g / grad_accum, grads)
      metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
    params, opt_state, update_norms = {}, {}, []
    for name, tx in optimizers.items():
      updates, opt_state[name] = tx.update(grads[name], state.opt_state[name],
                                           state.params[name])
      params[name] = optax.apply_updates(state.params[name], updates)
      update_norms.append(optax.tree_utils.tree_norm(updates))
    gnorm = optax.tree_utils.tree_norm(grads)
    # Finite loss and gradients are not enough: the update (e.g. lr) could still be bad, and a
    # checkpoint of the updated params must never hold NaNs.
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(gnorm)
    for n in update_norms:
      finite &= jnp.isfinite(n)
    main = "model" if "model" in schedules else next(iter(schedules))
    metrics.update(grad_norm=gnorm, lr=schedules[main](state.step), finite=finite)
    if len(optimizers) > 1:
      for name in optimizers:
        metrics[f"grad_norm/{name}"] = optax.tree_utils.tree_norm(grads[name])
        metrics[f"lr/{name}"] = schedules[name](state.step)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return update


def with_finite_check(update: UpdateFn) -> UpdateFn:
  """For a task's own update: adds to its metrics `finite`: the loss and every collection's
  new params are finite (and so is the update's own `finite`, when it reports one)."""
  def checked(state, batches, frozen=None):
    new_state, metrics = update(state, batches, frozen)
    if "loss" not in metrics:
      raise ValueError("an update function must report `loss` in its metrics")
    finite = jnp.isfinite(metrics["loss"])
    if "finite" in metrics:
      finite &= metrics["finite"]
    for tree in new_state.params.values():
      finite &= jnp.isfinite(optax.tree_utils.tree_norm(tree))
    return new_state, dict(metrics, finite=finite)
  return checked


def jit_update(update: UpdateFn, state_shardings, mesh, rules, frozen=None,
               frozen_shardings=None) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """Jits an update with state in/out shardings, every batch leaf sharded on `batch` and the
  state donated.

  Returns `run(state, batches) -> (state, metrics)`, with `run.lower(state, batches)` for
  ahead-of-time compilation; the `frozen` pytree (sharded as `frozen_shardings`) is bound here
  and passed to every step as an argument, not a constant.
  """
  batch_shd = shd.batch_sharding(mesh, rules)  # a prefix: every batch leaf splits on dim 0
  frozen_shd = shd.replicated(mesh) if frozen is None else frozen_shardings
  jitted = jax.jit(update,
                   in_shardings=(state_shardings, batch_shd, frozen_shd),
                   out_shardings=(state_shardings, shd.replicated(mesh)), donate_argnums=(0,))

  def run(state, batches):
    with shd.activate(mesh, rules):
      return jitted(state, batches, frozen)

  def lower(state, batches):
    """The step lowered for these inputs (`.compile()`, cost and memory analyses)."""
    with shd.activate(mesh, rules):
      return jitted.lower(state, batches, frozen)
  run.lower = lower
  return run
