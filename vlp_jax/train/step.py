"""Train state and the jitted, sharded train step (the loop's only compute)."""
from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vlp_jax.parallel import sharding as shd

# (params, batch, rng, train, frozen) -> (scalar loss, metrics dict of scalars). `frozen` is a
# pytree of parameters the loss reads but never trains (e.g. PEM's prompter), or None.
LossFn = Callable[[Any, dict, jax.Array, bool, Any], tuple[jax.Array, dict]]


@flax.struct.dataclass
class TrainState:
  """step: int32 []; params / opt_state: float32 pytrees; rng: uint32 [2] base key.

  The per-step key is `fold_in(rng, step)`, so the stored key never changes and a resumed run
  draws exactly the random numbers of an uninterrupted one.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def init_state(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
               rng: jax.Array) -> TrainState:
  """Builds the state; params may be logically boxed, the optimizer state mirrors the boxes."""
  init_rng, train_rng = jax.random.split(rng)
  params = init_params(init_rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=train_rng)


def create_sharded_state(init_params, tx, rng, mesh, rules) -> tuple[TrainState, Any]:
  """Creates the train state directly in its sharded layout (never whole on one device).

  Returns:
    (state, state_shardings) where the shardings come from the params' logical axis names.
  """
  with shd.activate(mesh, rules):
    abstract = jax.eval_shape(lambda r: init_state(init_params, tx, r), rng)
    shardings = shd.logical_to_sharding(abstract, mesh, rules)
    state = jax.jit(lambda r: nn.unbox(init_state(init_params, tx, r)),
                    out_shardings=shardings)(rng)
  return state, shardings


def _split_micro(batch: dict, accum: int) -> dict:
  """[B, ...] -> [accum, B/accum, ...] taking rows i*accum + a into micro-batch a.

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


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, schedule,
                    grad_accum: int = 1) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """Returns `step(state, batch, frozen) -> (state, metrics)`; jit it with `jit_train_step`.

  `frozen` (a pytree or None) is passed to the loss unchanged: it is not differentiated and has
  no optimizer state.

  Metrics: the task's metrics averaged over micro-batches, plus `grad_norm`, `lr` and `finite`
  (loss, gradient norm and update norm are finite).
  """
  def grads_of(params, batch, rng, frozen):
    (loss, metrics), grads = jax.value_and_grad(
        lambda p: loss_fn(p, batch, rng, True, frozen), has_aux=True)(params)
    return grads, dict(metrics, loss=loss)

  def step(state: TrainState, batch: dict, frozen: Any = None):
    rng = jax.random.fold_in(state.rng, state.step)
    if grad_accum == 1:
      grads, metrics = grads_of(state.params, batch, rng, frozen)
    else:
      micro = _split_micro(batch, grad_accum)

      def body(carry, xs):
        acc, i = carry
        g, m = grads_of(state.params, xs, jax.random.fold_in(rng, i), frozen)
        return (jax.tree.map(jnp.add, acc, g), i + 1), m

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, _), metrics = jax.lax.scan(body, (zeros, 0), micro)
      grads = jax.tree.map(lambda g: g / grad_accum, grads)
      metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    gnorm = optax.tree_utils.tree_norm(grads)
    # Finite loss and gradients are not enough: the update (e.g. lr) could still be bad, and a
    # checkpoint of the updated params must never hold NaNs.
    finite = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(gnorm)
              & jnp.isfinite(optax.tree_utils.tree_norm(updates)))
    metrics.update(grad_norm=gnorm, lr=schedule(state.step), finite=finite)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return step


def jit_train_step(step_fn, state_shardings, mesh, rules, frozen=None, frozen_shardings=None):
  """Jits the step with state in/out shardings, batch sharded on `batch`, state donated.

  Returns `run(state, batch) -> (state, metrics)`; the `frozen` pytree (sharded as
  `frozen_shardings`) is bound here and passed to every step as an argument, not a constant.
  """
  batch_shd = shd.batch_sharding(mesh, rules)  # a prefix: every batch leaf splits on dim 0
  frozen_shd = shd.replicated(mesh) if frozen is None else frozen_shardings
  jitted = jax.jit(step_fn, in_shardings=(state_shardings, batch_shd, frozen_shd),
                   out_shardings=(state_shardings, shd.replicated(mesh)), donate_argnums=(0,))

  def run(state, batch):
    with shd.activate(mesh, rules):
      return jitted(state, batch, frozen)
  return run
