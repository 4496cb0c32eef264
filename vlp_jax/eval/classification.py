"""Action recognition metrics: top-k and mean-class accuracy, open-set and few-shot summaries.

Numpy only: class scores are small ([N clips, C classes]) and already on the host.

Tie rule: a sample is top-k correct when the score of its label is strictly greater than
the scores of all other classes but at most k-1 of them, i.e. when fewer than k other
classes score >= the label. Ties therefore count *against* the sample (unlike retrieval's
ranks, `eval/retrieval.py`): a model emitting constant scores gets 0 top-1, not 100, and
the result never depends on the order in which a sort breaks ties.

All accuracies are percent (0-100) as Python floats.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _check(scores, labels, where: str) -> tuple[np.ndarray, np.ndarray]:
  """Validated (float64 [N, C] scores, int64 [N] labels)."""
  scores = np.asarray(scores)
  labels = np.asarray(labels)
  if scores.ndim != 2:
    raise ValueError(f"{where}: scores must be [N, C], got shape {scores.shape}")
  n, c = scores.shape
  if n == 0 or c == 0:
    raise ValueError(f"{where}: scores is empty, shape {scores.shape}")
  if labels.shape != (n,):
    raise ValueError(f"{where}: labels must have shape [N] = [{n}] to match scores "
                     f"{scores.shape}, got {labels.shape}")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{where}: labels must be integer, got dtype {labels.dtype}")
  bad = (labels < 0) | (labels >= c)
  if bad.any():
    i = int(np.argmax(bad))
    raise ValueError(f"{where}: {int(bad.sum())} labels are outside [0, C={c}), first "
                     f"label {int(labels[i])} at sample {i}")
  # float64 holds float16/bfloat16/float32 and small ints exactly, so comparisons are exact.
  scores = scores.astype(np.float64)
  if np.isnan(scores).any():
    # NaN compares False with everything and would make its row look top-1 correct.
    raise ValueError(f"{where}: scores has {int(np.isnan(scores).sum())} NaN entries")
  return scores, labels.astype(np.int64)


def _num_at_least(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """int64 [N]: how many *other* classes score >= the label (0 = strictly best)."""
  label_score = scores[np.arange(len(labels)), labels]
  return np.sum(scores >= label_score[:, None], axis=1) - 1


def topk_accuracy(scores, labels, k: int) -> float:
  """Percent of samples whose label is among the top k (see the module's tie rule).

  Args:
    scores: float [N, C] class scores (logits, similarities or probabilities); +-inf is
      allowed, NaN is not.
    labels: int [N] ground-truth classes in [0, C).
    k: 1 <= k <= C.

  Returns:
    Accuracy in percent (0-100).

  Raises:
    ValueError: on wrong shapes or dtypes, an out-of-range label or k, or a NaN score.
  """
  scores, labels = _check(scores, labels, "topk_accuracy")
  c = scores.shape[1]
  if not 1 <= k <= c:
    raise ValueError(f"topk_accuracy: k must be in [1, C={c}], got {k}")
  return 100.0 * float(np.mean(_num_at_least(scores, labels) <= k - 1))


def mean_class_accuracy(scores, labels, num_classes: int | None = None) -> float:
  """Mean over the classes present in `labels` of their top-1 accuracy, in percent.

  Each present class weighs the same whatever its sample count; classes without a sample
  are left out (their accuracy is undefined), not counted as 0. Top-1 uses the module's
  tie rule.

  Args:
    scores: float [N, C] class scores.
    labels: int [N] ground-truth classes in [0, C).
    num_classes: the size of the label space, if known; it must equal C (a check that the
      scores cover every class, e.g. after a prompt subset was used by mistake).

  Raises:
    ValueError: as `topk_accuracy`, or when `num_classes` != C.
  """
  scores, labels = _check(scores, labels, "mean_class_accuracy")
  c = scores.shape[1]
  if num_classes is not None and num_classes != c:
    raise ValueError(f"mean_class_accuracy: num_classes={num_classes} but scores have C={c} "
                     "columns")
  correct = (_num_at_least(scores, labels) == 0).astype(np.float64)
  counts = np.bincount(labels, minlength=c)
  hits = np.bincount(labels, weights=correct, minlength=c)
  present = counts > 0
  return 100.0 * float(np.mean(hits[present] / counts[present]))


def action_metrics(scores, labels) -> dict[str, float]:
  """Closed-set action recognition metrics.

  Args:
    scores: float [N, C] class scores; labels: int [N] in [0, C).

  Returns:
    {"action/top1", "action/top5", "action/mean_class"} in percent; "action/top5" is
    top-min(5, C), so it is 100 when C <= 5.
  """
  scores, labels = _check(scores, labels, "action_metrics")
  c = scores.shape[1]
  return {"action/top1": topk_accuracy(scores, labels, 1),
          "action/top5": topk_accuracy(scores, labels, min(5, c)),
          "action/mean_class": mean_class_accuracy(scores, labels)}


def opposite_accuracy(scores, labels, pairs) -> float:
  """Percent of the clips of a paired class that score their class above its opposite.

  Time-reversed pairs (left / right, grows / shrinks) isolate what only frame order tells:
  a model that pools frames without order sees the same frames in both, so it stays at 50
  on time-symmetric data, whatever it knows about appearance. Ties count against the clip.

  Args:
    scores: float [N, C] class scores; labels: int [N] in [0, C).
    pairs: int [M, 2] disjoint class pairs (a, b): a clip of a is right when
      score[a] > score[b], a clip of b when score[b] > score[a].
  Returns:
    Accuracy in percent over the clips whose label is in a pair.
  Raises:
    ValueError: no clip of a paired class, a class in two pairs, or one out of range.
  """
  scores, labels = _check(scores, labels, "opposite_accuracy")
  pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
  c = scores.shape[1]
  flat = pairs.reshape(-1)
  if len(flat) and (flat.min() < 0 or flat.max() >= c):
    raise ValueError(f"opposite_accuracy: pairs {pairs.tolist()} outside [0, C={c})")
  if len(set(flat.tolist())) != len(flat):
    raise ValueError(f"opposite_accuracy: a class is in two pairs: {pairs.tolist()}")
  opposite = np.full(c, -1, np.int64)
  opposite[pairs[:, 0]], opposite[pairs[:, 1]] = pairs[:, 1], pairs[:, 0]
  other = opposite[labels]
  keep = other >= 0
  if not keep.any():
    raise ValueError(f"opposite_accuracy: no clip of the paired classes {pairs.tolist()}")
  rows = np.nonzero(keep)[0]
  return 100.0 * float(np.mean(scores[rows, labels[rows]] > scores[rows, other[rows]]))


def harmonic_mean(a: float, b: float) -> float:
  """2ab / (a + b) of two non-negative accuracies; 0 when both are 0.

  Raises:
    ValueError: on a negative or NaN input.
  """
  a, b = float(a), float(b)
  if not (a >= 0 and b >= 0):  # also catches NaN
    raise ValueError(f"harmonic_mean: inputs must be >= 0, got {a} and {b}")
  if a + b == 0:
    return 0.0
  return 2.0 * a * b / (a + b)


def base_to_novel_metrics(seen_top1: float, unseen_top1: float) -> dict[str, float]:
  """Open-set (base-to-novel) summary: both top-1 accuracies and their harmonic mean.

  Args:
    seen_top1: top-1 (percent) on the classes seen in training, scored among seen classes.
    unseen_top1: top-1 (percent) on the held-out classes, scored among unseen classes.

  Returns:
    {"openset/seen_top1", "openset/unseen_top1", "openset/hm"}.
  """
  return {"openset/seen_top1": float(seen_top1), "openset/unseen_top1": float(unseen_top1),
          "openset/hm": harmonic_mean(seen_top1, unseen_top1)}


def aggregate_episodes(accuracies: Sequence[float]) -> dict[str, float | int]:
  """Few-shot summary over episodes.

  Args:
    accuracies: the top-1 accuracy (percent) of each episode.

  Returns:
    {"fewshot/top1": mean, "fewshot/top1_std": population std (ddof=0: the spread of
    these episodes, not an estimate over all possible ones; 0 for one episode),
    "fewshot/episodes": the number of episodes (int)}.

  Raises:
    ValueError: on no episode, a non-flat input or a non-finite accuracy.
  """
  acc = np.asarray(accuracies, np.float64)
  if acc.ndim != 1:
    raise ValueError(f"aggregate_episodes: expected a flat list of accuracies, got shape "
                     f"{acc.shape}")
  if acc.size == 0:
    raise ValueError("aggregate_episodes: no episode accuracy given")
  if not np.isfinite(acc).all():
    raise ValueError(f"aggregate_episodes: {int((~np.isfinite(acc)).sum())} non-finite "
                     "episode accuracies")
  return {"fewshot/top1": float(acc.mean()), "fewshot/top1_std": float(acc.std(ddof=0)),
          "fewshot/episodes": int(acc.size)}
