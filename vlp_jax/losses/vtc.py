"""Video-text contrastive (VTC) loss of ALPRO: symmetric InfoNCE over the global batch.

The official ALPRO code gathers features across GPUs and builds the targets from the
*local* rank, which is wrong once there is more than one node. Here the loss is one
global computation: the function is called (under `jax.jit`) on the global batch, whose
arrays may be sharded over a mesh, and the positive of text `i` is simply video `i`.
XLA inserts whatever communication the sharding needs; there is no rank, no axis name and
no explicit all-gather.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _check_features(video_feat, text_feat, temp) -> None:
  if video_feat.ndim != 2 or text_feat.ndim != 2:
    raise ValueError(
        "vtc_loss expects video_feat and text_feat of shape [B, E], got "
        f"{tuple(video_feat.shape)} and {tuple(text_feat.shape)}")
  if video_feat.shape != text_feat.shape:
    raise ValueError(
        "vtc_loss: video_feat and text_feat must have the same shape [B, E], got "
        f"{tuple(video_feat.shape)} and {tuple(text_feat.shape)}")
  if video_feat.shape[0] < 1:
    raise ValueError("vtc_loss: empty batch")
  if jnp.ndim(temp) != 0:
    raise ValueError(f"vtc_loss: temp must be a scalar, got shape {jnp.shape(temp)}")


def vtc_loss(video_feat: jax.Array, text_feat: jax.Array, temp: jax.Array,
             valid: jax.Array | None = None
             ) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
  """Symmetric video-text contrastive loss with in-batch negatives.

  Args:
    video_feat: float [B, E], L2-normalised video embeddings of the global batch (may be
      sharded along B).
    text_feat: float [B, E], L2-normalised text embeddings; row `i` is paired with
      `video_feat[i]`.
    temp: float32 scalar temperature (the caller clamps it, ALPRO: [0.001, 0.5]).
    valid: optional bool [B]; an invalid pair (batch padding) is neither a query nor a
      candidate, and its per-sample loss is 0. None = all valid.

  Returns:
    per_sample: float32 [B], `(CE_t2v[i] + CE_v2t[i]) / 2` for pair `i`.
    metrics: `vtc/t2v_acc`, `vtc/v2t_acc`: float32 scalars, in-batch top-1 accuracy (0-1)
      over the valid pairs.
    logits_t2v: float32 [B, B], `text_feat @ video_feat.T / temp` (rows = texts); VTM
      samples its hard negatives from it.
  """
  _check_features(video_feat, text_feat, temp)
  v = video_feat.astype(jnp.float32)
  t = text_feat.astype(jnp.float32)
  temp = jnp.asarray(temp, jnp.float32)
  # HIGHEST: on TPU/GPU the default f32 matmul may use bf16 passes; the [B, B] product
  # is cheap and the loss is sensitive to it at a temperature of 0.07.
  sim = jnp.matmul(t, v.T, precision=jax.lax.Precision.HIGHEST)
  logits_t2v = sim / temp
  if valid is not None:
    valid = valid.astype(bool)
    # A large negative, not -inf: an all-invalid row stays finite (its loss is dropped).
    logits_t2v = jnp.where(valid[:, None] & valid[None, :], logits_t2v, -1e9)

  # log_softmax subtracts the max: stable for any temperature.
  logp_t2v = jax.nn.log_softmax(logits_t2v, axis=1)  # text i over videos
  logp_v2t = jax.nn.log_softmax(logits_t2v, axis=0)  # video j over texts (columns)
  ce_t2v = -jnp.diagonal(logp_t2v)
  ce_v2t = -jnp.diagonal(logp_v2t)
  per_sample = 0.5 * (ce_t2v + ce_v2t)
  weight = (jnp.ones_like(per_sample) if valid is None else valid.astype(jnp.float32))
  per_sample = per_sample * weight
  count = jnp.maximum(jnp.sum(weight), 1.0)

  target = jnp.arange(logits_t2v.shape[0])
  metrics = {
      "vtc/t2v_acc": jnp.sum(
          (jnp.argmax(logits_t2v, axis=1) == target).astype(jnp.float32) * weight) / count,
      "vtc/v2t_acc": jnp.sum(
          (jnp.argmax(logits_t2v, axis=0) == target).astype(jnp.float32) * weight) / count,
  }
  return per_sample, metrics, logits_t2v
