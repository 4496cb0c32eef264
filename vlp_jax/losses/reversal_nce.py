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
                 temp: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """InfoNCE of each clip against its other view, with every clip's reversal as a negative.

  Args:
    query: float [B, E], L2-normalised features of the clips.
    positive: float [B, E], L2-normalised features of another view of the same clips (row i
      is clip i's positive).
    reversed_: float [B, E], L2-normalised features of the clips played backwards.
    temp: the softmax temperature (> 0).

  Returns:
    per_sample: float32 [B], `-log softmax([q_i . p_j]_j ++ [q_i . r_j]_j / temp)[i]`.
    metrics: float32 scalars `order/acc` (share of clips whose positive scores highest of the
      2B candidates) and `order/reversal_cos` (mean `q_i . r_i`).
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
  metrics = {
      "order/acc": jnp.mean((jnp.argmax(logits, -1) == target).astype(jnp.float32)),
      "order/reversal_cos": jnp.mean(jnp.sum(q * reversed_.astype(jnp.float32), -1)),
  }
  return per_sample, metrics
