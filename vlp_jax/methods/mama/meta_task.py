"""What MAMA's tasks share: the `train` / `meta` streams, the `weight_net` collection, the
bilevel update over the task's per-sample loss, and the learned weight curve w(l)."""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlp_jax.core import task as task_lib
from vlp_jax.methods.mama import bilevel
from vlp_jax.methods.mama.weight_net import WeightNet


class MetaWeightedTask(task_lib.Task):
  """A task whose per-sample loss is weighted by a meta-learned weighting net (`meta.*`).

  Subclasses set `keys` (the batch keys of both streams) and define `per_sample(params, batch,
  rng, train) -> (float32 [B], metrics)` on the `model` collection, and `model_init(rng)`.
  `rows(batch)` may narrow a batch's `valid` rows before they are weighted.
  """

  keys: tuple[str, ...] = ()
  image_mix = False  # the train stream mixes in still-image batches at `data.image_ratio`

  def __init__(self, config, text):
    super().__init__(config, text)
    self.margin = float(config.mama.margin)
    self.close_negatives = bool(config.mama.get("close_negatives", False))
    self.weight_net = WeightNet(int(config.meta.hidden))
    self.meta = bool(config.meta.enabled)

  def streams(self) -> dict[str, task_lib.Stream]:
    """`train` (without the meta set's clips) and, with meta weights, `meta`."""
    out = {"train": task_lib.Stream(keys=self.keys, exclude_ids=self._meta_ids(),
                                    image_mix=self.image_mix)}
    if self.meta:
      out["meta"] = task_lib.Stream(keys=self.keys, split=self.config.meta.split,
                                    batch_size=int(self.config.meta.batch_size) or None,
                                    seed_offset=1)
    return out

  def _meta_ids(self) -> str:
    """`meta.exclude_ids`, or DATA_DIR/<meta.split>.ids.txt when `launch.meta_set` wrote it."""
    if not self.meta:
      return ""
    if self.config.meta.exclude_ids:
      return self.config.meta.exclude_ids
    d = self.config.data.dir
    path = os.path.join(d, f"{self.config.meta.split}.ids.txt") if d else ""
    return path if path and os.path.isfile(path) else ""

  def model_init(self, rng: jax.Array) -> dict[str, Any]:
    raise NotImplementedError

  def per_sample(self, params, batch, rng, train) -> tuple[jax.Array, dict]:
    raise NotImplementedError

  def rows(self, batch: dict) -> dict:
    """The batch whose `valid` rows enter the loss (all of them by default)."""
    return batch

  def init_collections(self, rng: jax.Array) -> dict[str, Any]:
    out = {"model": self.model_init(rng)}
    if self.meta:
      out["weight_net"] = self.weight_net.init(jax.random.fold_in(rng, 1),
                                               jnp.zeros((2,), jnp.float32))["params"]
    return out

  def mean_loss(self, params, batch, rng, train) -> tuple[jax.Array, dict]:
    """Plain mean of the per-sample loss over the valid rows (the update without weights)."""
    batch = self.rows(batch)
    per, metrics = self.per_sample(params, batch, rng, train)
    v = batch["valid"].astype(jnp.float32)
    return jnp.sum(per * v) / jnp.maximum(jnp.sum(v), 1.0), metrics

  def make_update(self, ctx):
    if not self.meta:
      return None
    m = self.config.meta
    update = bilevel.make_bilevel_update(
        self.per_sample, lambda phi, l: self.weight_net.apply({"params": phi}, l), ctx,
        virtual_lr=float(m.virtual_lr), every=int(m.every), how=str(m.normalize),
        remat=bool(m.remat), gradient=str(m.gradient))

    def weighted(state, batches, frozen=None):
      return update(state, {k: self.rows(b) for k, b in batches.items()}, frozen)
    return weighted

  def weight_curve(self, phi) -> dict[str, np.ndarray]:
    """The learned w(l) on a grid of losses: `weight_curve_loss`, `weight_curve` float32 [N]."""
    grid = np.linspace(0.0, float(self.config.meta.curve_max_loss), 81, dtype=np.float32)
    w = jax.device_get(self.weight_net.apply({"params": phi}, jnp.asarray(grid)))
    return {"weight_curve_loss": grid, "weight_curve": np.asarray(w, np.float32)}

  def with_weight_curve(self, params, result):
    """An evaluator's (metrics, arrays) plus the weight curve when there is a weighting net."""
    metrics, arrays = result
    if "weight_net" in params:
      arrays = dict(arrays, **self.weight_curve(params["weight_net"]))
    return metrics, arrays
