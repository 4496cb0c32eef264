"""MAMA's bilevel update: meta-learned sample weights through one virtual SGD step.

Every `meta.every` steps, with model params theta and weighting-net params phi:
  1. virtual step  theta' = theta - alpha * grad_theta sum_i w~_i(phi) l_i(theta), where
     w~ = w_phi(stop_grad(l)) normalised (by their sum, or their L2 norm);
  2. meta loss     mean_j l_j(theta') on a batch of the clean meta stream;
  3. phi update    with the `weight_net` optimizer, from grad_phi of the meta loss (it flows
                   through theta' into w~, never through l's inputs);
then, every step, the real update of theta with the `model` optimizer on sum_i w~_i l_i, the
weights now from the new phi and stopped. The released MAMA code's virtual step is a silent
no-op, so its weighting net never learns; here theta' != theta and grad_phi != 0 (tested).

`gradient="first_order"` replaces steps 1-2 by their first-order expansion in alpha:
L_meta(theta') ~ L_meta(theta) - alpha * sum_i w~_i(phi) g_meta . grad l_i, with g_meta the meta
loss's gradient at theta, and the alignments g_meta . grad l_i of all samples from one JVP. It
needs no virtual forward pass and no differentiation through a gradient.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from vlp_jax.core.task import UpdateContext

# (model params, batch, rng, train) -> (per-sample loss float32 [B], metrics)
PerSampleLoss = Callable[[Any, dict, jax.Array, bool], tuple[jax.Array, dict]]
# (weight-net params, stop-gradient losses [B]) -> weights [B]
WeightFn = Callable[[Any, jax.Array], jax.Array]


def normalize(weights: jax.Array, valid: jax.Array, how: str) -> jax.Array:
  """Weights of the valid rows normalised by their sum ("sum") or L2 norm ("l2"); 0 elsewhere."""
  w = jnp.where(valid, weights, 0.0)
  if how == "sum":
    return w / jnp.maximum(jnp.sum(w), 1e-12)
  if how == "l2":
    return w / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(w))), 1e-12)
  raise ValueError(f"meta.normalize must be 'sum' or 'l2', got {how!r}")


def _mean(x: jax.Array, valid: jax.Array) -> jax.Array:
  v = valid.astype(jnp.float32)
  return jnp.sum(x * v) / jnp.maximum(jnp.sum(v), 1.0)


def make_bilevel_update(per_sample: PerSampleLoss, weight_fn: WeightFn, ctx: UpdateContext, *,
                        virtual_lr: float, every: int = 1, how: str = "sum",
                        remat: bool = False, gradient: str = "exact") -> Callable:
  """The task update `(state, batches, frozen) -> (state, metrics)` of the bilevel scheme.

  Args:
    per_sample: the per-sample training loss of the `model` collection.
    weight_fn: applies the `weight_net` collection to stop-gradient losses.
    ctx: the core's optimizers and schedules (collections `model` and `weight_net`).
    virtual_lr: alpha of the virtual SGD step.
    every: meta-update period in steps (phi is kept in between).
    how: weight normalisation, "sum" or "l2".
    remat: recompute the virtual step's forward pass in the meta backward pass (memory).
    gradient: "exact" (through the virtual step) or "first_order" (see the module docstring).
  Batches: {"train": ..., "meta": ...}, each with `valid` bool [B].
  Metrics: `loss` (weighted training loss), `loss/plain` (unweighted mean), `meta/loss`,
  `meta/weight_mean`, `meta/weight_std`, `meta/weight_min`, `meta/weight_max` (raw weights
  w_phi over the valid rows), `meta/virtual_delta` (||theta' - theta||; with "first_order"
  the meta loss is taken at theta and there is no virtual step: 0), `grad_norm`,
  `grad_norm/weight_net`, `lr`, `lr/weight_net`.
  """
  if every < 1:
    raise ValueError(f"meta.every must be >= 1, got {every}")
  if gradient not in ("exact", "first_order"):
    raise ValueError(f"meta.gradient must be 'exact' or 'first_order', got {gradient!r}")
  if ctx.grad_accum != 1:
    raise ValueError("the bilevel update does not accumulate gradients: set "
                     "optim.grad_accum=1 (lower the batch size instead)")
  tx_model, tx_weight = ctx.optimizers["model"], ctx.optimizers["weight_net"]

  def update(state, batches, frozen=None):
    del frozen
    train, meta = batches["train"], batches["meta"]
    rng = jax.random.fold_in(state.rng, state.step)
    k_train, k_meta = jax.random.split(rng)
    theta, phi = state.params["model"], state.params["weight_net"]

    def weighted(theta_, phi_):
      losses, _ = per_sample(theta_, train, k_train, True)
      w = normalize(weight_fn(phi_, jax.lax.stop_gradient(losses)), train["valid"], how)
      return jnp.sum(w * losses)

    def meta_objective(phi_):
      grads = jax.grad(weighted)(theta, phi_)
      virtual = jax.tree.map(lambda p, g: p - virtual_lr * g, theta, grads)
      losses, _ = per_sample(virtual, meta, k_meta, True)
      delta = optax.tree_utils.tree_norm(jax.tree.map(jnp.subtract, virtual, theta))
      return _mean(losses, meta["valid"]), delta

    objective = jax.checkpoint(meta_objective) if remat else meta_objective

    def first_order(phi_):
      meta_loss, g_meta = jax.value_and_grad(
          lambda t: _mean(per_sample(t, meta, k_meta, True)[0], meta["valid"]))(theta)
      # align_i = grad l_i(theta) . g_meta for every training sample: one forward-mode pass.
      losses, align = jax.jvp(lambda t: per_sample(t, train, k_train, True)[0], (theta,),
                              (g_meta,))
      losses, align = jax.lax.stop_gradient(losses), jax.lax.stop_gradient(align)

      def expansion(p):  # L_meta(theta') - L_meta(theta), to first order in alpha
        return -virtual_lr * jnp.sum(normalize(weight_fn(p, losses), train["valid"], how) * align)
      return meta_loss, jnp.zeros((), jnp.float32), jax.grad(expansion)(phi_)

    def meta_step(phi_, opt):
      if gradient == "first_order":
        meta_loss, delta, g_phi = first_order(phi_)
      else:
        (meta_loss, delta), g_phi = jax.value_and_grad(objective, has_aux=True)(phi_)
      updates, opt = tx_weight.update(g_phi, opt, phi_)
      return optax.apply_updates(phi_, updates), opt, meta_loss, delta, g_phi

    def skip(phi_, opt):
      zero = jnp.zeros((), jnp.float32)
      return phi_, opt, zero, zero, jax.tree.map(jnp.zeros_like, phi_)

    if every == 1:
      phi_new, opt_phi, meta_loss, delta, g_phi = meta_step(phi, state.opt_state["weight_net"])
    else:
      phi_new, opt_phi, meta_loss, delta, g_phi = jax.lax.cond(
          state.step % every == 0, meta_step, skip, phi, state.opt_state["weight_net"])

    def real(theta_):
      losses, metrics = per_sample(theta_, train, k_train, True)
      raw = weight_fn(phi_new, jax.lax.stop_gradient(losses))
      w = jax.lax.stop_gradient(normalize(raw, train["valid"], how))
      return jnp.sum(w * losses), (metrics, losses, raw)

    (loss, (metrics, losses, raw)), g_theta = jax.value_and_grad(real, has_aux=True)(theta)
    updates, opt_theta = tx_model.update(g_theta, state.opt_state["model"], theta)
    theta_new = optax.apply_updates(theta, updates)

    valid = train["valid"]
    big = jnp.float32(jnp.finfo(jnp.float32).max)
    w_mean = _mean(raw, valid)
    metrics = dict(
        metrics, loss=loss, **{
            "loss/plain": _mean(losses, valid), "meta/loss": meta_loss,
            "meta/weight_mean": w_mean,
            "meta/weight_std": jnp.sqrt(_mean(jnp.square(raw - w_mean), valid)),
            "meta/weight_min": jnp.min(jnp.where(valid, raw, big)),
            "meta/weight_max": jnp.max(jnp.where(valid, raw, -big)),
            "meta/virtual_delta": delta,
            "grad_norm": optax.tree_utils.tree_norm(g_theta),
            "grad_norm/weight_net": optax.tree_utils.tree_norm(g_phi),
            "lr": ctx.schedules["model"](state.step),
            "lr/weight_net": ctx.schedules["weight_net"](state.step)})
    new_state = state.replace(step=state.step + 1,
                              params={"model": theta_new, "weight_net": phi_new},
                              opt_state={"model": opt_theta, "weight_net": opt_phi})
    return new_state, metrics

  return update
