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
from typing import Any

import jax

from vlp_jax import losses
from vlp_jax.core import task as task_lib
from vlp_jax.eval import dual_encoder
from vlp_jax.methods.mama import backbones
from vlp_jax.methods.mama.meta_task import MetaWeightedTask


@task_lib.register("mama_retrieval")
class MAMARetrievalTask(MetaWeightedTask):
  """Angular-margin contrastive retrieval with meta-learned sample weights."""

  keys = ("video", "text_ids", "text_mask", "valid")
  image_mix = True  # dual-encoder pre-training on video + image-text data (data.image_ratio)

  def __init__(self, config, text):
    super().__init__(config, text)
    self.backbone = backbones.build(config, text.vocab_size)
    self.pretrained_keys = self.backbone.pretrained_keys

  def model_init(self, rng: jax.Array) -> dict[str, Any]:
    return self.backbone.init(rng)

  def import_pretrained(self, key: str, path: str, params: dict[str, Any]) -> dict[str, Any]:
    return dict(params, model=self.backbone.import_pretrained(key, path, params["model"]))

  def per_sample(self, params, batch, rng, train):
    """(angular-margin loss float32 [B], metrics) of the `model` params on one batch."""
    video, text = self.backbone.features(params, batch, rng if train else None)
    scale = losses.scale_from_logit(params[backbones.LOGIT_SCALE])
    return losses.angular_margin_loss(video, text, margin=self.margin, scale=scale,
                                      close_negatives=self.close_negatives)

  def loss(self, params, batches, rng, *, train, frozen=None, step=None):
    """Plain mean angular-margin loss (the update without meta weights)."""
    del frozen
    loss, metrics = self.mean_loss(params["model"], batches["train"], rng, train)
    return loss, dict(metrics, **{"loss/angular": loss})

  @functools.cached_property
  def _evaluators(self):
    embed = lambda params, batch: dict(zip(("video", "text"),
                                           self.backbone.features(params, batch)))

    def retrieval(params, batches, mesh, rules, eval_cfg):
      del eval_cfg
      return self.with_weight_curve(
          params, dual_encoder.evaluate(embed, params["model"], batches, mesh, rules))
    return {"retrieval": retrieval}

  def evaluators(self) -> dict[str, task_lib.Evaluator]:
    """`retrieval`: similarity ranks (both directions), contrast probes; its arrays add the
    learned weight curve w(l) for `launch.report`."""
    return self._evaluators
