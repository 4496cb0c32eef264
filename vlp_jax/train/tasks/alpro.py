"""ALPRO pre-training objective: VTC + VTM (hard negatives) + MLM, weights from `config.loss`.

The task is the one place that knows which losses the objective uses; the loop only sees
`init_params`, `loss` and `evaluate`.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlp_jax import losses
from vlp_jax.models.alpro import ALPRO, alpro_config


class ALPROTask:
  """Wraps the ALPRO module with its pre-training loss and retrieval evaluation."""

  def __init__(self, config, vocab_size: int):
    self.config = config
    self.model = ALPRO(alpro_config(config.model, vocab_size))
    self.weights = {k: float(config.loss[k]) for k in ("vtc", "vtm", "mlm")}

  def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    """Zero arrays with the shapes and dtypes of a real batch (for init and shape checks)."""
    d = self.config.data
    t = d.max_text_len
    return {
        "video": np.zeros((batch_size, d.num_frames, d.image_size, d.image_size, 3), np.float32),
        "text_ids": np.zeros((batch_size, t), np.int32),
        "text_mask": np.ones((batch_size, t), np.int32),
        "mlm_ids": np.zeros((batch_size, t), np.int32),
        "mlm_labels": np.full((batch_size, t), -100, np.int32),
        "valid": np.ones((batch_size,), bool),
    }

  def init_params(self, rng: jax.Array) -> Any:
    """Logically boxed float32 params (call under `jax.eval_shape` / jit)."""
    b = self.dummy_batch(2)
    return self.model.init({"params": rng, "dropout": rng}, b["video"], b["text_ids"],
                           b["text_mask"])["params"]

  def _apply(self, params, method, *args, rng=None, **kwargs):
    rngs = {"dropout": rng} if rng is not None else {}
    return self.model.apply({"params": params}, *args, method=method, rngs=rngs, **kwargs)

  def loss(self, params, batch: dict, rng: jax.Array, train: bool = True):
    """Weighted sum of the per-sample losses, averaged over the global batch.

    Args:
      batch: global arrays: video float32 [B,T,H,W,3]; text_ids, text_mask, mlm_ids,
        mlm_labels int32 [B,L].
    Returns:
      (scalar float32 loss, metrics dict with `loss/vtc`, `loss/vtm`, `loss/mlm`, accuracies,
      `temp`).
    """
    det = not train
    keys = jax.random.split(rng, 6)
    drop = (lambda i: keys[i]) if train else (lambda i: None)
    app = self._apply
    w = self.weights
    metrics = {}

    video = app(params, ALPRO.encode_video, batch["video"], deterministic=det, rng=drop(0))
    text = app(params, ALPRO.encode_text, batch["text_ids"], batch["text_mask"],
               deterministic=det, rng=drop(1))
    vfeat = app(params, ALPRO.video_feature, video)
    tfeat = app(params, ALPRO.text_feature, text)
    temp = app(params, ALPRO.temperature)
    vtc, m, logits_t2v = losses.vtc_loss(vfeat, tfeat, temp)
    total = w["vtc"] * jnp.mean(vtc)
    metrics.update(m)
    metrics["loss/vtc"] = jnp.mean(vtc)
    metrics["temp"] = temp

    if w["vtm"]:
      neg_video, neg_text = losses.sample_hard_negatives(keys[4], logits_t2v)
      b = text.shape[0]
      mask = batch["text_mask"]
      # Pairs: (text_i, video_i), (text_i, hard-negative video), (hard-negative text, video_i).
      fused = app(params, ALPRO.fuse,
                  jnp.concatenate([text, text, text[neg_text]]),
                  jnp.concatenate([mask, mask, mask[neg_text]]),
                  jnp.concatenate([video, video[neg_video], video]),
                  deterministic=det, rng=drop(2))
      logits = app(params, ALPRO.vtm_logits, fused)
      vtm, m = losses.vtm_loss(logits[:b], logits[b:2 * b], logits[2 * b:])
      total = total + w["vtm"] * jnp.mean(vtm)
      metrics.update(m)
      metrics["loss/vtm"] = jnp.mean(vtm)

    if w["mlm"]:
      masked = app(params, ALPRO.encode_text, batch["mlm_ids"], batch["text_mask"],
                   deterministic=det, rng=drop(3))
      fused = app(params, ALPRO.fuse, masked, batch["text_mask"], video, deterministic=det,
                  rng=drop(5))
      logits = app(params, ALPRO.mlm_logits, fused[:, :masked.shape[1]])
      mlm, count, m = losses.mlm_loss(logits, batch["mlm_labels"])
      mlm_mean = jnp.sum(mlm * count) / jnp.maximum(jnp.sum(count), 1.0)
      total = total + w["mlm"] * mlm_mean
      metrics.update(m)
      metrics["loss/mlm"] = mlm_mean

    return total, metrics

  # ---- evaluation -------------------------------------------------------------------------

  @functools.cached_property
  def _embed(self):
    """Jitted (params, batch) -> dict of float32 features `video`, `text` [B,E], and, when the
    batch has contrast probes, `probe` [B,2,E] with `has_probe` bool [B]."""
    def embed(params, batch):
      video = self._apply(params, ALPRO.encode_video, batch["video"])
      text = self._apply(params, ALPRO.encode_text, batch["text_ids"], batch["text_mask"])
      out = {"video": self._apply(params, ALPRO.video_feature, video),
             "text": self._apply(params, ALPRO.text_feature, text)}
      if "probe_ids" in batch:
        b, _, length = batch["probe_ids"].shape
        probe = self._apply(params, ALPRO.encode_text, batch["probe_ids"].reshape(2 * b, length),
                            batch["probe_mask"].reshape(2 * b, length))
        out["probe"] = self._apply(params, ALPRO.text_feature, probe).reshape(b, 2, -1)
        out["has_probe"] = batch["has_probe"]
      return out
    return embed

  def evaluate(self, params, batches, mesh, rules) -> dict[str, float]:
    """Zero-shot retrieval over one pass of an eval loader (text i describes video i).

    Returns metrics with the DESIGN.md keys (`retrieval/t2v_R@1`, ...), plus
    `retrieval/contrast_acc` (percent of clips whose video is closer to its probe caption than
    to the altered one) when the split carries contrast probes.
    """
    from vlp_jax.eval import features, retrieval
    feats = features.collect(self._embed, params, batches, mesh, rules)
    sim = features.similarity(feats["text"], feats["video"], mesh, rules)
    out = {f"retrieval/{k}": v
           for k, v in retrieval.retrieval_metrics(sim, np.arange(sim.shape[0])).items()}
    if "probe" in feats and bool(jnp.any(feats["has_probe"])):
      scores = jnp.einsum("be,bke->bk", feats["video"], feats["probe"])
      right = (scores[:, 0] > scores[:, 1]) & feats["has_probe"]
      out["retrieval/contrast_acc"] = float(100.0 * jnp.sum(right) / jnp.sum(feats["has_probe"]))
    return out
