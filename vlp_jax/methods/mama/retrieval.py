"""MAMA retrieval (task `mama_retrieval`): a dual encoder trained with the angular-margin
contrastive loss, its per-sample losses weighted by a meta-learned weighting net.

Backbones (`backbone` in configs/mama_retrieval.py; vlp_jax/methods/mama/backbones.py): `alpro`,
ALPRO's video and text encoders with their VTC projections (an ALPRO pre-training run loads with
`init.checkpoint`; the unused fusion layers and heads are frozen by `optim.model.frozen`), or
`clip`, CLIP's towers over frames (`init.clip` = "hf:DIR"); both with a learnable `logit_scale`.
Collections: `model` and, with `meta.enabled`, `weight_net` (vlp_jax/methods/mama/bilevel.py).
Streams: `train`, and `meta` (a clean, balanced split held out of training, `meta.split`).
"""
from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlp_jax import losses
from vlp_jax.core import task as task_lib
from vlp_jax.eval import dual_encoder
from vlp_jax.methods.mama import backbones, bilevel
from vlp_jax.methods.mama.weight_net import WeightNet

KEYS = ("video", "text_ids", "text_mask", "valid")


@task_lib.register("mama_retrieval")
class MAMARetrievalTask(task_lib.Task):
  """Angular-margin contrastive retrieval with meta-learned sample weights."""

  def __init__(self, config, text):
    super().__init__(config, text)
    self.margin = float(config.mama.margin)
    self.close_negatives = bool(config.mama.get("close_negatives", False))
    self.backbone = backbones.build(config, text.vocab_size)
    self.pretrained_keys = self.backbone.pretrained_keys
    self.weight_net = WeightNet(int(config.meta.hidden))
    self.meta = bool(config.meta.enabled)

  def streams(self) -> dict[str, task_lib.Stream]:
    """`train` (without the meta set's clips) and, with meta weights, `meta`."""
    out = {"train": task_lib.Stream(keys=KEYS, exclude_ids=self._meta_ids())}
    if self.meta:
      out["meta"] = task_lib.Stream(keys=KEYS, split=self.config.meta.split,
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

  def init_collections(self, rng: jax.Array) -> dict[str, Any]:
    out = {"model": self.backbone.init(rng)}
    if self.meta:
      out["weight_net"] = self.weight_net.init(jax.random.fold_in(rng, 1),
                                               jnp.zeros((2,), jnp.float32))["params"]
    return out

  def import_pretrained(self, key: str, path: str, params: dict[str, Any]) -> dict[str, Any]:
    return dict(params, model=self.backbone.import_pretrained(key, path, params["model"]))

  def _features(self, params, batch, rng=None):
    """L2-normalised (video [B,E], text [B,E]) float32; dropout on when `rng` is given."""
    return self.backbone.features(params, batch, rng)

  def per_sample(self, params, batch, rng, train):
    """(angular-margin loss float32 [B], metrics) of the `model` params on one batch."""
    video, text = self._features(params, batch, rng if train else None)
    scale = losses.scale_from_logit(params[backbones.LOGIT_SCALE])
    per, metrics = losses.angular_margin_loss(video, text, margin=self.margin, scale=scale,
                                              close_negatives=self.close_negatives)
    return per, metrics

  def loss(self, params, batches, rng, *, train, frozen=None):
    """Plain mean angular-margin loss (the update without meta weights)."""
    del frozen
    batch = batches["train"]
    per, metrics = self.per_sample(params["model"], batch, rng, train)
    v = batch["valid"].astype(jnp.float32)
    loss = jnp.sum(per * v) / jnp.maximum(jnp.sum(v), 1.0)
    return loss, dict(metrics, **{"loss/angular": loss})

  def make_update(self, ctx):
    if not self.meta:
      return None
    m = self.config.meta
    return bilevel.make_bilevel_update(
        self.per_sample, lambda phi, l: self.weight_net.apply({"params": phi}, l), ctx,
        virtual_lr=float(m.virtual_lr), every=int(m.every), how=str(m.normalize),
        remat=bool(m.remat), gradient=str(m.gradient))

  def weight_curve(self, phi) -> dict[str, np.ndarray]:
    """The learned w(l) on a grid of losses: `weight_curve_loss`, `weight_curve` float32 [N]."""
    grid = np.linspace(0.0, float(self.config.meta.curve_max_loss), 81, dtype=np.float32)
    w = jax.device_get(self.weight_net.apply({"params": phi}, jnp.asarray(grid)))
    return {"weight_curve_loss": grid, "weight_curve": np.asarray(w, np.float32)}

  @functools.cached_property
  def _evaluators(self):
    embed = lambda params, batch: dict(zip(("video", "text"), self._features(params, batch)))

    def retrieval(params, batches, mesh, rules, eval_cfg):
      del eval_cfg
      metrics, arrays = dual_encoder.evaluate(embed, params["model"], batches, mesh, rules)
      if "weight_net" in params:  # the report's learned weight curve w(l)
        arrays.update(self.weight_curve(params["weight_net"]))
      return metrics, arrays
    return {"retrieval": retrieval}

  def evaluators(self) -> dict[str, task_lib.Evaluator]:
    """`retrieval`: similarity ranks (both directions), contrast probes; its arrays add the
    learned weight curve w(l) for `launch.report`."""
    return self._evaluators
