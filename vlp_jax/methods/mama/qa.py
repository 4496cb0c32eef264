"""MAMA video question answering (task `mama_qa`): ALPRO's QA model trained with a per-sample
loss = answer cross-entropy + `mama.contrastive_weight` x the angular-margin contrastive loss
between each clip and its question, weighted by the meta-learned weighting net.

Collections: `model` (ALPRO with the QA head, plus MAMA's `logit_scale`) and, with
`meta.enabled`, `weight_net`. Streams: `train` (without the meta set's clips) and `meta`.
Questions whose answer is outside the answer vocabulary carry no target: they are left out of
the loss and of the weight normalisation, and count wrong in evaluation (`eval/qa.py`).
"""
from __future__ import annotations

import functools
from typing import Any

import jax

from vlp_jax import losses
from vlp_jax.core import task as task_lib
from vlp_jax.eval import qa as qa_lib
from vlp_jax.methods.mama import backbones
from vlp_jax.methods.mama.backbones import LOGIT_SCALE
from vlp_jax.methods.mama.meta_task import MetaWeightedTask
from vlp_jax.models.alpro import ALPRO


@task_lib.register("mama_qa")
class MAMAQATask(MetaWeightedTask):
  """Weighted QA cross-entropy + angular-margin video-question contrast, meta-learned weights."""

  keys = ("video", "text_ids", "text_mask", "answer_idx", "valid")
  pretrained_keys = ("text", "video")

  def __init__(self, config, text):
    super().__init__(config, text)
    if config.backbone != "alpro":
      raise ValueError(f"mama_qa: backbone {config.backbone!r} is not available; choose "
                       "'alpro'")
    num_answers = int(config.model.get("num_answers", 0))
    if num_answers < 1:
      raise ValueError(f"config.task='mama_qa' needs config.model.num_answers >= 1 (the answer "
                       f"vocabulary size), got {num_answers}")
    self.contrastive_weight = float(config.mama.contrastive_weight)
    self.backbone = backbones.AlproBackbone(config, text.vocab_size)  # with the QA head
    self.model = self.backbone.model

  def rows(self, batch: dict) -> dict:
    """Questions without an in-vocabulary answer have no target: not valid for the loss."""
    return dict(batch, valid=batch["valid"] & (batch["answer_idx"] >= 0))

  def model_init(self, rng: jax.Array) -> dict[str, Any]:
    return self.backbone.init(rng)

  def import_pretrained(self, key: str, path: str, params: dict[str, Any]) -> dict[str, Any]:
    return dict(params, model=self.backbone.import_pretrained(key, path, params["model"]))

  def _forward(self, params, batch, rng):
    """(answer logits float32 [B, K], video features [B, E], question features [B, E])."""
    backbone = {k: v for k, v in params.items() if k != LOGIT_SCALE}
    det = rng is None
    keys = jax.random.split(rng, 3) if rng is not None else (None,) * 3
    app = lambda method, *a, key=None, **kw: self.model.apply(
        {"params": backbone}, *a, method=method,
        rngs={"dropout": key} if key is not None else {}, **kw)
    video = app(ALPRO.encode_video, batch["video"], deterministic=det, key=keys[0])
    question = app(ALPRO.encode_text, batch["text_ids"], batch["text_mask"], deterministic=det,
                   key=keys[1])
    fused = app(ALPRO.fuse, question, batch["text_mask"], video, deterministic=det, key=keys[2])
    return (app(ALPRO.qa_logits, fused), app(ALPRO.video_feature, video),
            app(ALPRO.text_feature, question))

  def per_sample(self, params, batch, rng, train):
    """(float32 [B] = QA cross-entropy + contrastive_weight x angular loss, metrics).

    Rows without an in-vocabulary answer have a cross-entropy of 0; `rows` leaves them out.
    """
    logits, video, question = self._forward(params, batch, rng if train else None)
    ce, _, metrics = losses.qa_loss(logits, batch["answer_idx"])
    per = ce
    if self.contrastive_weight:
      scale = losses.scale_from_logit(params[LOGIT_SCALE])
      ang, ang_metrics = losses.angular_margin_loss(
          video, question, margin=self.margin, scale=scale,
          close_negatives=self.close_negatives)
      per = per + self.contrastive_weight * ang
      metrics.update(ang_metrics)
    return per, metrics

  def loss(self, params, batches, rng, *, train, frozen=None, step=None):
    """Plain mean of the per-sample loss over questions with a target (no meta weights)."""
    del frozen
    loss, metrics = self.mean_loss(params["model"], batches["train"], rng, train)
    return loss, dict(metrics, **{"loss/mama_qa": loss})

  @functools.cached_property
  def _evaluators(self):
    def logits(params, batch):
      return self._forward(params, batch, None)[0]

    def qa(params, batches, mesh, rules, eval_cfg):
      del eval_cfg
      return self.with_weight_curve(params, qa_lib.evaluate(
          logits, params["model"], batches, mesh, rules, answers=self.text.answers,
          num_answers=self.model.config.num_answers))
    return {"qa": qa}

  def evaluators(self) -> dict[str, task_lib.Evaluator]:
    """`qa`: answer accuracy over the answer vocabulary (eval/qa.py), plus the weight curve."""
    return self._evaluators
