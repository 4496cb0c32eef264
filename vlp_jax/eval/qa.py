"""Video QA accuracy: argmax over the answer vocabulary; out-of-vocabulary answers count wrong.
`evaluate` is the QA evaluator the methods' tasks share."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlp_jax.eval import features

CONFUSION_ANSWERS = 30  # answers shown in the report's confusion matrix


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


def evaluate(logits_fn: Callable[[Any, dict], jax.Array], params, batches, mesh, rules, *,
             answers: Sequence[str] | None, num_answers: int
             ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """Accuracy over every question of one pass of an eval loader.

  Args:
    logits_fn: (params, device batch) -> float [B, K] answer logits.
    answers: the answer vocabulary (K strings, most frequent first), for the report labels.
    num_answers: K.
  Returns:
    (metrics, arrays). metrics: `qa/accuracy` (percent; out-of-vocabulary answers count
    wrong) and `qa/oov` (percent of questions whose answer is outside the vocabulary:
    100 - qa/oov bounds the accuracy). arrays (for `launch.report`): `confusion` int64
    [k, k], true answer (rows) by predicted answer (columns) over the k <= 30 most frequent
    training answers, and `labels` [k], their text.
  """
  fn = lambda p, b: {"logits": logits_fn(p, b), "answer_idx": b["answer_idx"]}
  rows, keep = features.collect_rows(fn, params, batches, mesh, rules)
  valid = np.zeros((rows["answer_idx"].shape[0],), bool)
  valid[keep] = True
  oov = jnp.sum((rows["answer_idx"] < 0) & jnp.asarray(valid))
  metrics = {"qa/accuracy": qa_accuracy(rows["logits"], rows["answer_idx"], valid),
             "qa/oov": 100.0 * float(oov) / keep.size}
  # The answer vocabulary is ordered by training frequency: its first k are the most common.
  k = min(int(num_answers), CONFUSION_ANSWERS)
  pred = np.asarray(jax.device_get(jnp.argmax(rows["logits"], axis=-1)))[keep]
  true = np.asarray(jax.device_get(rows["answer_idx"]))[keep]
  shown = (true >= 0) & (true < k) & (pred < k)
  confusion = np.zeros((k, k), np.int64)
  np.add.at(confusion, (true[shown], pred[shown]), 1)
  labels = np.asarray((list(answers) if answers else [str(i) for i in range(k)])[:k])
  return metrics, {"confusion": confusion, "labels": labels}
