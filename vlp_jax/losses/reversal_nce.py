"""Time-reversal InfoNCE: a label-free objective that makes a video encoder see frame order.

Each clip's positive is another view of it (the same frames, shifted in space); its negatives
are the other clips' views and every clip played backwards, its own reversal included. A clip
and its reversal show the same frames, so only a feature that depends on their order tells
them apart: the reversal is the negative that appearance cannot solve. (On a corpus where every
motion's reverse is as common as the motion, "is this clip reversed?" has no answer, so the
arrow of time cannot be a classification target; as a contrastive negative it can.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def reversal_nce(query: jax.Array, positive: jax.Array, reversed_: jax.Array,
                 temp: float, mask: jax.Array | None = None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """InfoNCE of each clip against its other view, with every clip's reversal as a negative.

  Args:
    query: float [B, E], L2-normalised features of the clips.
    positive: float [B, E], L2-normalised features of another view of the same clips (row i
      is clip i's positive).
    reversed_: float [B, E], L2-normalised features of the clips played backwards.
    temp: the softmax temperature (> 0).
    mask: optional bool [B], the rows the metrics average over (all rows still serve as
      negatives); None = every row.

  Returns:
    per_sample: float32 [B], `-log softmax([q_i . p_j]_j ++ [q_i . r_j]_j / temp)[i]`.
    metrics: float32 scalars `order/acc` (share of clips whose positive scores highest of the
      2B candidates) and `order/reversal_cos` (mean `q_i . r_i`), over the masked rows (0
      when none is).
  """
  if query.ndim != 2 or query.shape != positive.shape or query.shape != reversed_.shape:
    raise ValueError("reversal_nce expects query, positive and reversed_ of one shape [B, E], "
                     f"got {query.shape}, {positive.shape}, {reversed_.shape}")
  if not temp > 0:
    raise ValueError(f"reversal_nce: temp must be > 0, got {temp}")
  q = query.astype(jnp.float32)
  keys = jnp.concatenate([positive, reversed_], 0).astype(jnp.float32)
  logits = jnp.matmul(q, keys.T, precision=jax.lax.Precision.HIGHEST) / temp  # [B, 2B]
  target = jnp.arange(q.shape[0])
  per_sample = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), target[:, None], 1)[:, 0]
  w = jnp.ones_like(per_sample) if mask is None else mask.astype(jnp.float32)
  mean = lambda x: jnp.sum(w * x) / jnp.maximum(jnp.sum(w), 1.0)
  metrics = {
      "order/acc": mean((jnp.argmax(logits, -1) == target).astype(jnp.float32)),
      "order/reversal_cos": mean(jnp.sum(q * reversed_.astype(jnp.float32), -1)),
  }
  return per_sample, metrics


def twin_cosine(features: jax.Array, twin: jax.Array) -> jax.Array:
  """Mean cosine between a row's feature and its time-reversed twin's over a batch's pairs.

  With `data.reverse_twins` a training batch holds pairs of a clip and the same clip played
  backwards, captioned with opposite direction words. An encoder blind to frame order gives
  both clips the same feature (cosine 1); a text tower that ignores the direction words gives
  both captions the same feature. VTC's gradient on the difference of the two video features
  is proportional to the difference of the two caption features, and the reverse, so while
  both cosines are near 1 VTC barely moves either.

  Args:
    features: float [B, E], L2-normalised.
    twin: int [B], row r's twin is row r + twin[r]; 0 = no twin.

  Returns:
    float32 scalar: the mean of `features[r] . features[r + twin[r]]` over the rows with a
    twin (0 when none has one).
  """
  if features.ndim != 2 or twin.shape != features.shape[:1]:
    raise ValueError(f"twin_cosine expects features [B, E] and twin [B], got {features.shape} "
                     f"and {twin.shape}")
  partner = jnp.arange(features.shape[0], dtype=jnp.int32) + twin.astype(jnp.int32)
  f = features.astype(jnp.float32)
  has = twin != 0
  cos = jnp.where(has, jnp.sum(f * f[partner], -1), 0.0)
  return jnp.sum(cos) / jnp.maximum(jnp.sum(has), 1)


def shifted_views(key: jax.Array, video: jax.Array, max_shift: int) -> jax.Array:
  """Each clip moved by its own offset, the same on every frame: a view whose motion is unchanged.

  Args:
    key: PRNG key.
    video: float [B, T, H, W, C].
    max_shift: largest offset in pixels (>= 0); each clip's (dy, dx) is uniform in
      [-max_shift, max_shift]^2, and edge pixels fill the gap.

  Returns:
    float [B, T, H, W, C], the dtype of `video`.
  """
  if max_shift < 0:
    raise ValueError(f"shifted_views: max_shift must be >= 0, got {max_shift}")
  b, t, h, w, c = video.shape
  m = int(max_shift)
  padded = jnp.pad(video, ((0, 0), (0, 0), (m, m), (m, m), (0, 0)), mode="edge")
  offsets = jax.random.randint(key, (b, 2), 0, 2 * m + 1)
  crop = lambda clip, o: jax.lax.dynamic_slice(clip, (0, o[0], o[1], 0), (t, h, w, c))
  return jax.vmap(crop)(padded, offsets)
