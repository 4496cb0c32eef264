"""Masked language modelling (MLM) loss with per-sample values and target counts."""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Label of a position that is not a prediction target (the BERT / PyTorch convention).
IGNORE_INDEX = -100


def mlm_loss(logits: jax.Array, labels: jax.Array
            ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """Token-level cross-entropy on the masked positions, reduced per sample.

  The caller forms the batch loss as `sum(per_sample * count) / max(sum(count), 1)`, the
  mean over all targets of the batch (what ALPRO/BERT optimise), while per-sample values
  stay available for sample weighting.

  Args:
    logits: float [B, L, V] (any float dtype; the math is done in float32).
    labels: int [B, L], the original token id at prediction targets and
      `IGNORE_INDEX` (-100) everywhere else.

  Returns:
    per_sample: float32 [B], mean CE over the sample's targets; 0 where it has none.
    count: float32 [B], number of targets in each sample.
    metrics: `mlm/acc`: float32 scalar, argmax accuracy over all targets of the batch
      (0 if there are none).
  """
  if logits.ndim != 3 or labels.shape != logits.shape[:2]:
    raise ValueError(
        "mlm_loss expects logits [B, L, V] and labels [B, L], got "
        f"{tuple(logits.shape)} and {tuple(labels.shape)}")
  mask = labels != IGNORE_INDEX
  safe_labels = jnp.where(mask, labels, 0).astype(jnp.int32)
  logits32 = logits.astype(jnp.float32)
  # logsumexp - picked logit rather than a full log_softmax: avoids a second [B, L, V]
  # float32 array at BERT vocabulary sizes.
  lse = jax.nn.logsumexp(logits32, axis=-1)
  picked = jnp.take_along_axis(logits32, safe_labels[..., None], axis=-1)[..., 0]
  ce = jnp.where(mask, lse - picked, 0.0)

  count = jnp.sum(mask, axis=-1).astype(jnp.float32)
  per_sample = jnp.sum(ce, axis=-1) / jnp.maximum(count, 1.0)

  correct = (jnp.argmax(logits, axis=-1) == safe_labels) & mask
  total = jnp.sum(count)
  metrics = {
      "mlm/acc": jnp.sum(correct.astype(jnp.float32)) / jnp.maximum(total, 1.0),
  }
  return per_sample, count, metrics
