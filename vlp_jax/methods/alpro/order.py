"""ALPRO's label-free video stage: the video tower learns frame order before it sees a caption.

Task `alpro_order`: the `order` stage that `python -m launch.train` runs first for a
pre-training config with `order.steps` > 0 (configs/alpro_pretrain.py `order_stage`). It
trains ALPRO's TimeSformer (same sizes, init and parameter names) plus a projection head with a
time-reversal InfoNCE (losses/reversal_nce.py): each clip must pick a shifted copy of itself
among the batch's shifted clips and every clip played backwards. No caption or label is read.
Its `video_encoder` then starts the prompter (or, without one, pre-training), as ALPRO starts
from a pre-trained video backbone: from scratch, VTC alone leaves direction of motion unlearnt
(a clip and its reversal get one feature).

Clips that do not change over time (still shapes, still images; `order.min_change`) have no
order: they are left out as queries (`order/moving_frac` counts the rest) but stay in the
batch as negatives.
Evaluator `order`: `order/reversal_cos`, the mean cosine between a moving clip's projected
feature and its reversal's (1 = blind to order).
"""
from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlp_jax.convert import hf
from vlp_jax.core import task as task_lib
from vlp_jax.eval import features
from vlp_jax.losses.reversal_nce import reversal_nce, shifted_views
from vlp_jax.models import layers, timesformer
from vlp_jax.models.alpro import ALPROConfig, alpro_config

SUBDIR = "order"  # WORKDIR/order: where `order.dir = ""` puts the stage
EMBED_DIM = 128   # the projection the InfoNCE compares (SimCLR's head; not kept by ALPRO)


def order_dir(config, workdir: str) -> str:
  """The order stage's WORKDIR: `order.dir`, or "" = WORKDIR/order."""
  if config.order.dir:
    return os.path.abspath(config.order.dir)
  return os.path.join(os.path.abspath(workdir), SUBDIR)


def moving(video: jax.Array, min_change: float) -> jax.Array:
  """bool [B]: the clips of float [B, T, H, W, C] in which some value of some frame differs
  from the first frame's by more than `min_change` (in the model's input units): clips that
  have an order to learn. Sensor noise is not motion: with CLIP's normalisation (std ~0.27,
  so 1.0 ~ 27 % of the intensity range) the synthetic corpus's still clips change by <= 0.54
  (their noise), its moving ones by >= 1.12."""
  return jnp.max(jnp.abs(video - video[:, :1]), axis=(1, 2, 3, 4)) > min_change


class OrderModel(nn.Module):
  """ALPRO's video encoder (`video_encoder`, the same parameter names) + `order_proj`.

  Attributes:
    config: an `ALPROConfig` (only `video`, `dtype`, `attention`, `remat` and `scan_layers`
      are read).
  """
  config: ALPROConfig

  def setup(self):
    c = self.config
    self.video_encoder = timesformer.TimesformerModel(
        c.video, layers.compute_dtype(c.dtype), c.attention, c.remat, scan=c.scan_layers)
    # Fan-in scaled, as SimCLR's head: at BERT's 0.02 the head starts near zero at width 128.
    self.order_proj = layers.dense(EMBED_DIM, ("embed", None), dtype=jnp.float32,
                                   kernel_init=nn.initializers.lecun_normal())

  def __call__(self, video: jax.Array, deterministic: bool = True) -> jax.Array:
    """float `[B, T, H, W, 3]` (normalised) -> float32 `[B, EMBED_DIM]`, the L2-normalised
    projection of the CLS token (the token ALPRO's VTC reads)."""
    cls = self.video_encoder(video, deterministic)[:, 0].astype(jnp.float32)
    return layers.l2_normalize(self.order_proj(cls))


@task_lib.register("alpro_order")
class OrderTask(task_lib.Task):
  """The order stage: `config.order` = {steps, temp, max_shift, min_change, dir};
  `config.model` as ALPRO.

  Attributes:
    model: the `OrderModel`.
  """

  pretrained_keys = ("video",)

  def __init__(self, config, text):
    super().__init__(config, text)
    o = config.order
    self.temp, self.max_shift = float(o.temp), int(o.max_shift)
    self.min_change = float(o.get("min_change", 0.0))
    if not self.temp > 0 or self.max_shift < 0 or self.min_change < 0:
      raise ValueError(f"order.temp must be > 0, order.max_shift >= 0 and order.min_change "
                       f">= 0, got {self.temp}, {self.max_shift}, {self.min_change}")
    self.model = OrderModel(alpro_config(config.model, text.vocab_size))

  def streams(self) -> dict[str, task_lib.Stream]:
    return {"train": task_lib.Stream(keys=("video", "valid"))}

  def init_collections(self, rng: jax.Array) -> dict[str, Any]:
    d = self.config.data
    video = jnp.zeros((2, d.num_frames, d.image_size, d.image_size, 3), jnp.float32)
    return {"model": self.model.init({"params": rng, "dropout": rng}, video)["params"]}

  def import_pretrained(self, key: str, path: str, params: dict[str, Any]) -> dict[str, Any]:
    """`init.video` = a TimeSformer or ViT checkpoint (vlp_jax/convert/hf.py)."""
    del key
    return dict(params, model=hf.init_alpro_video(params["model"], path, self.model.config))

  def loss(self, params, batches, rng, *, train, frozen=None, step=None):
    """Time-reversal InfoNCE over the moving clips of the batch.

    Args:
      params: {"model": OrderModel params}.
      batches: {"train": video float32 [B,T,H,W,3], valid bool [B]}.
    Returns:
      (float32 scalar: mean over moving valid clips, metrics `loss/order`, `order/acc`,
      `order/reversal_cos` (over those clips) and `order/moving_frac`).
    """
    del frozen, step
    batch = batches["train"]
    video = batch["video"]
    shift_key, drop_key = jax.random.split(rng)
    views = jnp.concatenate([video, shifted_views(shift_key, video, self.max_shift),
                             video[:, ::-1]])
    rngs = {"dropout": drop_key} if train else {}
    q, pos, rev = jnp.split(self.model.apply({"params": params["model"]}, views,
                                             deterministic=not train, rngs=rngs), 3)
    queries = moving(video, self.min_change) & batch["valid"]
    per_sample, metrics = reversal_nce(q, pos, rev, self.temp, queries)
    w = queries.astype(jnp.float32)
    loss = jnp.sum(per_sample * w) / jnp.maximum(jnp.sum(w), 1.0)
    metrics["loss/order"] = loss
    metrics["order/moving_frac"] = jnp.mean(w)
    return loss, metrics

  def _eval_features(self, params, batch):
    video = batch["video"]
    embed = lambda v: self.model.apply({"params": params}, v)
    return {"cos": jnp.sum(embed(video) * embed(video[:, ::-1]), -1),
            "moving": moving(video, self.min_change)}

  def _evaluate(self, params, batches, mesh, rules, eval_cfg) -> dict[str, float]:
    """`order/reversal_cos` (mean over moving clips; nan when none moves) and
    `order/moving_frac` over one pass of an eval loader."""
    del eval_cfg
    f = features.collect(self._eval_features, params["model"], batches, mesh, rules)
    cos, mov = np.asarray(f["cos"]), np.asarray(f["moving"])
    return {"order/reversal_cos": float(cos[mov].mean()) if mov.any() else float("nan"),
            "order/moving_frac": float(mov.mean())}

  def evaluators(self) -> dict[str, task_lib.Evaluator]:
    """`order`: how order-blind the projected features are."""
    return {"order": self._evaluate}
