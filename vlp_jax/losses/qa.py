"""Video QA loss: cross-entropy over the answer vocabulary, out-of-vocabulary answers ignored."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def qa_loss(logits: jax.Array, answer_idx: jax.Array
            ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """Per-question softmax cross-entropy (ALPRO's QA objective).

  A question whose answer is outside the vocabulary (`answer_idx` < 0, also used for padding
  rows) has no target: loss 0 and weight 0. The caller forms the batch loss as
  `sum(per_sample) / max(sum(weight), 1)`.

  Args:
    logits: float [B, K] answer scores (the math is done in float32).
    answer_idx: int [B], the answer's index in the vocabulary, or -1.

  Returns:
    per_sample: float32 [B], the cross-entropy (0 where there is no target).
    weight: float32 [B], 1 where the answer is in the vocabulary, else 0.
    metrics: `qa/train_acc`: float32 scalar, argmax accuracy over the questions with a
      target (0 if there are none).
  """
  if logits.ndim != 2 or answer_idx.shape != logits.shape[:1]:
    raise ValueError("qa_loss expects logits [B, K] and answer_idx [B], got "
                     f"{tuple(logits.shape)} and {tuple(answer_idx.shape)}")
  known = answer_idx >= 0
  safe = jnp.where(known, answer_idx, 0).astype(jnp.int32)
  logits32 = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits32, safe[:, None], axis=-1)[:, 0]
  ce = jnp.where(known, jax.nn.logsumexp(logits32, axis=-1) - picked, 0.0)
  weight = known.astype(jnp.float32)
  right = (jnp.argmax(logits32, axis=-1) == safe) & known
  metrics = {"qa/train_acc": jnp.sum(right.astype(jnp.float32)) / jnp.maximum(jnp.sum(weight),
                                                                              1.0)}
  return ce, weight, metrics
