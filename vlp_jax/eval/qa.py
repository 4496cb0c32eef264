"""Video QA accuracy: argmax over the answer vocabulary; out-of-vocabulary answers count wrong."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def _counts(logits: jax.Array, answer_idx: jax.Array, valid: jax.Array) -> tuple[jax.Array, ...]:
  pred = jnp.argmax(logits, axis=-1)
  right = (pred == answer_idx) & (answer_idx >= 0) & valid
  return jnp.sum(right, dtype=jnp.int32), jnp.sum(valid, dtype=jnp.int32)


def qa_accuracy(logits, answer_idx, valid=None) -> float:
  """Percent (0-100) of questions whose top-scoring answer is the ground truth.

  Args:
    logits: float [N, K] answer scores (numpy or a possibly sharded jax array).
    answer_idx: int [N], the ground-truth index in the answer vocabulary; -1 = the answer is
      not in the vocabulary, which counts as wrong (it is still in the denominator).
    valid: optional bool [N]; False rows (padding) are left out entirely.

  Raises:
    ValueError: shapes that do not match, a non-integer `answer_idx`, an index >= K, or no
      valid question.
  """
  logits = logits if isinstance(logits, jax.Array) else np.asarray(logits)
  answer_idx = answer_idx if isinstance(answer_idx, jax.Array) else np.asarray(answer_idx)
  if logits.ndim != 2:
    raise ValueError(f"qa_accuracy: logits must be [N, K], got shape {tuple(logits.shape)}")
  n, k = logits.shape
  if answer_idx.shape != (n,):
    raise ValueError(f"qa_accuracy: answer_idx must have shape [N] = [{n}], got "
                     f"{tuple(answer_idx.shape)}")
  if not jnp.issubdtype(answer_idx.dtype, jnp.integer):
    raise ValueError(f"qa_accuracy: answer_idx must be integer, got dtype {answer_idx.dtype}")
  valid = np.ones((n,), bool) if valid is None else valid
  if tuple(valid.shape) != (n,):
    raise ValueError(f"qa_accuracy: valid must have shape [{n}], got {tuple(valid.shape)}")
  if int(jnp.max(answer_idx)) >= k:
    raise ValueError(f"qa_accuracy: answer_idx holds {int(jnp.max(answer_idx))}, but there are "
                     f"only K={k} answers")
  right, total = jax.device_get(_counts(logits, answer_idx.astype(jnp.int32),
                                        jnp.asarray(valid, bool)))
  if int(total) == 0:
    raise ValueError("qa_accuracy: no valid questions")
  return 100.0 * int(right) / int(total)
