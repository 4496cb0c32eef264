"""Temporal action localisation: segment IoU, temporal NMS and ActivityNet-style mAP.

Prompt-CLIP localises actions by classifying externally supplied class-agnostic proposals
(`load_proposals`); the resulting detections are scored here with the detection mAP of the
official ActivityNet evaluation (`Evaluation/eval_detection.py`), re-implemented in numpy:

* `interpolated_average_precision` is ActivityNet's `interpolated_prec_rec`.
* `average_precision_at_tiou` is `compute_average_precision_detection` for one class:
  predictions in descending score order; each is a true positive at a tIoU threshold if
  some not yet matched ground truth of the same video overlaps it by tIoU >= threshold
  (ground truths are tried by descending tIoU and the first unmatched one is taken),
  otherwise a false positive (so a second detection of a matched instance is a false
  positive). AP = interpolated AP of precision against recall = cumTP / num_gt.
* `mean_average_precision` averages AP over the classes that have ground truth, per
  threshold; `metrics` reports it in percent.

Tie order (ActivityNet leaves it to numpy's unstable `argsort()[::-1]`): equal scores keep
their input order, and ground truths of equal tIoU are tried in input order.

Records: a ground truth is `(video_id, start, end, label)` and a prediction
`(video_id, start, end, label, score)`; `video_id` is any hashable (usually a str),
`start`/`end` are seconds (or frames, consistently), `label` an int in [0, num_classes).
The one-class function takes the same records without the label.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Collection, Hashable, Iterable, Sequence
from numbers import Real

import numpy as np

THUMOS14_TIOUS = (0.3, 0.4, 0.5, 0.6, 0.7)
ACTIVITYNET_TIOUS = np.linspace(0.5, 0.95, 10)


def segment_iou(target, candidates) -> np.ndarray:
  """Temporal IoU of one segment with each of several.

  Args:
    target: float [2], (start, end).
    candidates: float [N, 2], rows (start, end).

  Returns:
    float64 [N]. A pair whose union has zero length (two identical points) gets 0, where
    ActivityNet's formula would give NaN.
  """
  target = np.asarray(target, np.float64)
  candidates = np.asarray(candidates, np.float64).reshape(-1, 2)
  if target.shape != (2,):
    raise ValueError(f"segment_iou: target must have shape [2], got {target.shape}")
  inter = np.clip(np.minimum(target[1], candidates[:, 1]) -
                  np.maximum(target[0], candidates[:, 0]), 0.0, None)
  union = (candidates[:, 1] - candidates[:, 0]) + (target[1] - target[0]) - inter
  return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def segment_iou_matrix(segments_a, segments_b) -> np.ndarray:
  """Pairwise temporal IoU: float64 [N, M] for segments_a [N, 2] and segments_b [M, 2].

  Zero-length unions give 0, as in `segment_iou`.
  """
  a = np.asarray(segments_a, np.float64).reshape(-1, 2)
  b = np.asarray(segments_b, np.float64).reshape(-1, 2)
  inter = np.clip(np.minimum(a[:, None, 1], b[None, :, 1]) -
                  np.maximum(a[:, None, 0], b[None, :, 0]), 0.0, None)
  union = (a[:, 1] - a[:, 0])[:, None] + (b[:, 1] - b[:, 0])[None, :] - inter
  return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def temporal_nms(segments, scores, iou_threshold: float) -> np.ndarray:
  """Greedy temporal non-maximum suppression.

  Repeatedly keeps the highest-scoring remaining segment and drops every remaining one
  whose tIoU with it is strictly greater than `iou_threshold`.

  Args:
    segments: float [N, 2], rows (start, end).
    scores: float [N].
    iou_threshold: suppression threshold on tIoU.

  Returns:
    int64 [K], indices into `segments` of the kept segments in descending score order
    (equal scores in input order).
  """
  segments = np.asarray(segments, np.float64).reshape(-1, 2)
  scores = np.asarray(scores, np.float64).reshape(-1)
  if scores.shape[0] != segments.shape[0]:
    raise ValueError(f"temporal_nms: {segments.shape[0]} segments but {scores.shape[0]} scores")
  order = np.argsort(-scores, kind="stable")
  keep = []
  while order.size:
    i = order[0]
    keep.append(i)
    rest = order[1:]
    order = rest[segment_iou(segments[i], segments[rest]) <= iou_threshold]
  return np.asarray(keep, np.int64)


def interpolated_average_precision(precision, recall) -> float:
  """Area under the interpolated precision-recall curve (ActivityNet's `interpolated_prec_rec`).

  Precision is padded with 0 on both ends and recall with 0 in front and 1 at the end;
  precision is then made non-increasing from the right (each value becomes the maximum
  precision at that point or later), and the area is the sum over the points i where
  recall changes of (recall[i] - recall[i-1]) * precision[i].

  Args:
    precision: float [N], precision after each prediction (in score order).
    recall: float [N], the matching recall (non-decreasing for detections).

  Returns:
    The AP as a Python float in [0, 1]; 0 for empty inputs.
  """
  prec = np.asarray(precision, np.float64).reshape(-1)
  rec = np.asarray(recall, np.float64).reshape(-1)
  if prec.shape != rec.shape:
    raise ValueError(
        f"interpolated_average_precision: precision {prec.shape} and recall {rec.shape} differ")
  mprec = np.concatenate([[0.0], prec, [0.0]])
  mrec = np.concatenate([[0.0], rec, [1.0]])
  # Running maximum from the right == ActivityNet's backward max loop.
  mprec = np.maximum.accumulate(mprec[::-1])[::-1]
  idx = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
  return float(np.sum((mrec[idx] - mrec[idx - 1]) * mprec[idx]))


def _thresholds(tiou_thresholds) -> np.ndarray:
  t = np.asarray(tiou_thresholds, np.float64).reshape(-1)
  if t.size == 0 or not np.all(np.isfinite(t)):
    raise ValueError(f"tIoU thresholds must be a non-empty list of finite numbers, got {t}")
  return t


def _check_segment(what: str, i: int, video, start: float, end: float) -> None:
  if not (math.isfinite(start) and math.isfinite(end)):
    raise ValueError(f"{what} {i} (video {video!r}) has a non-finite segment [{start}, {end}]")
  if end < start:
    raise ValueError(f"{what} {i} (video {video!r}) has end {end} < start {start}")


def average_precision_at_tiou(ground_truth: Iterable[Sequence],
                              predictions: Iterable[Sequence],
                              tiou_thresholds=ACTIVITYNET_TIOUS) -> np.ndarray:
  """Detection AP of ONE class at each tIoU threshold (ActivityNet's algorithm).

  Args:
    ground_truth: records `(video_id, start, end)`, the instances of this class.
    predictions: records `(video_id, start, end, score)`, this class's detections.
    tiou_thresholds: float [T].

  Returns:
    float64 [T], AP in [0, 1] per threshold. With no ground truth the AP is 0 (recall is
    undefined; ActivityNet would produce NaN, but never evaluates such a class); with no
    predictions it is 0.
  """
  thresholds = _thresholds(tiou_thresholds)
  gt = [(v, float(s), float(e)) for v, s, e in ground_truth]
  preds = [(v, float(s), float(e), float(c)) for v, s, e, c in predictions]
  for i, (v, s, e) in enumerate(gt):
    _check_segment("ground truth", i, v, s, e)
  for i, (v, s, e, c) in enumerate(preds):
    _check_segment("prediction", i, v, s, e)
    if not math.isfinite(c):
      raise ValueError(f"prediction {i} (video {v!r}) has a non-finite score {c}")
  ap = np.zeros(len(thresholds), np.float64)
  if not gt or not preds:
    return ap

  # Ground truth grouped by video: global indices (for the match locks) and segments.
  by_video: dict[Hashable, list[int]] = {}
  for j, (v, _, _) in enumerate(gt):
    by_video.setdefault(v, []).append(j)
  gt_segments = np.asarray([(s, e) for _, s, e in gt], np.float64)

  scores = np.asarray([c for *_, c in preds], np.float64)
  order = np.argsort(-scores, kind="stable")
  matched = np.zeros((len(thresholds), len(gt)), bool)
  tp = np.zeros((len(thresholds), len(preds)), np.float64)
  for rank, p in enumerate(order):
    v, s, e, _ = preds[p]
    gt_idx = by_video.get(v)
    if gt_idx is None:  # no instance of this class in the video: FP at every threshold
      continue
    gt_idx = np.asarray(gt_idx)
    iou = segment_iou((s, e), gt_segments[gt_idx])
    by_iou = np.argsort(-iou, kind="stable")
    iou, gt_idx = iou[by_iou], gt_idx[by_iou]
    for t, thr in enumerate(thresholds):
      # ActivityNet walks gt by descending IoU, skips matched ones and stops at the first
      # below the threshold: i.e. the first unmatched gt with IoU >= threshold.
      free = (iou >= thr) & ~matched[t, gt_idx]
      if free.any():
        k = gt_idx[np.argmax(free)]
        matched[t, k] = True
        tp[t, rank] = 1.0
  cum_tp = np.cumsum(tp, axis=1)
  cum_fp = np.cumsum(1.0 - tp, axis=1)
  recall = cum_tp / len(gt)
  precision = cum_tp / (cum_tp + cum_fp)
  for t in range(len(thresholds)):
    ap[t] = interpolated_average_precision(precision[t], recall[t])
  return ap


def mean_average_precision(ground_truth: Iterable[Sequence],
                           predictions: Iterable[Sequence],
                           tiou_thresholds=THUMOS14_TIOUS, *,
                           num_classes: int) -> dict:
  """Detection mAP over classes, per tIoU threshold and averaged.

  Args:
    ground_truth: records `(video_id, start, end, label)`.
    predictions: records `(video_id, start, end, label, score)`.
    tiou_thresholds: float [T].
    num_classes: C; every label must be an int in [0, C).

  Returns:
    A dict with
      `ap`: float64 [C, T], per-class AP in [0, 1]; NaN rows for classes without ground
        truth (they are left out of the mean, as in ActivityNet, whose class list comes
        from the ground truth; their predictions count nowhere).
      `mAP`: float64 [T], the mean of `ap` over classes with ground truth.
      `mAP_avg`: float, the mean of `mAP` over thresholds.
      `num_gt`: int64 [C], ground-truth instances per class.
      `tiou_thresholds`: float64 [T].

  Raises:
    ValueError: on a bad label, segment or score, or when no class has ground truth.
  """
  thresholds = _thresholds(tiou_thresholds)
  gt_by_class: list[list[tuple]] = [[] for _ in range(num_classes)]
  pred_by_class: list[list[tuple]] = [[] for _ in range(num_classes)]
  for what, records, out in (("ground truth", ground_truth, gt_by_class),
                             ("prediction", predictions, pred_by_class)):
    for i, rec in enumerate(records):
      label = rec[3]
      if (isinstance(label, bool) or not isinstance(label, int | np.integer)
          or not 0 <= label < num_classes):
        raise ValueError(
            f"{what} {i} (video {rec[0]!r}) has label {label!r}, expected an int in "
            f"[0, {num_classes})")
      out[int(label)].append((*rec[:3], *rec[4:]))
  num_gt = np.asarray([len(g) for g in gt_by_class], np.int64)
  if not num_gt.any():
    raise ValueError("mean_average_precision: no class has ground truth")
  ap = np.full((num_classes, len(thresholds)), np.nan)
  for c in np.flatnonzero(num_gt):
    ap[c] = average_precision_at_tiou(gt_by_class[c], pred_by_class[c], thresholds)
  m = np.mean(ap[num_gt > 0], axis=0)
  return {"ap": ap, "mAP": m, "mAP_avg": float(np.mean(m)), "num_gt": num_gt,
          "tiou_thresholds": thresholds}


def metrics(ground_truth: Iterable[Sequence], predictions: Iterable[Sequence],
            tiou_thresholds=THUMOS14_TIOUS, *, num_classes: int) -> dict[str, float]:
  """`mean_average_precision` as flat scalars in percent (0-100).

  Returns:
    `loc/mAP@{t:g}` for each threshold t (e.g. `loc/mAP@0.5`) and `loc/mAP_avg`.
  """
  res = mean_average_precision(ground_truth, predictions, tiou_thresholds,
                               num_classes=num_classes)
  out = {f"loc/mAP@{t:g}": 100.0 * float(m) for t, m in zip(res["tiou_thresholds"], res["mAP"])}
  out["loc/mAP_avg"] = 100.0 * res["mAP_avg"]
  return out


def _number(x) -> bool:
  return isinstance(x, Real) and not isinstance(x, bool)


def load_proposals(path: str | os.PathLike,
                   known_videos: Collection[Hashable]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Reads class-agnostic proposals from an ActivityNet-style JSON file.

  The file is `{"results": {video_id: [{"segment": [start, end], "score": s}, ...]}}`
  (other top-level keys, e.g. "version", are ignored) or that inner mapping on its own.
  Extra keys in a proposal (e.g. "label") are ignored.

  Args:
    path: the JSON file.
    known_videos: the video ids of the evaluated split; every video in the file must be
      one of them (a mismatch usually means the wrong split or id format).

  Returns:
    video_id -> (segments float64 [N, 2], scores float64 [N]), in file order; N may be 0.

  Raises:
    ValueError: naming the file, video and proposal index, for an unknown video, a
      missing or malformed field, a non-finite number or a segment with end <= start.
  """
  path = os.fspath(path)
  with open(path, "r") as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"proposal file {path} is not valid JSON: {e}") from e
  if isinstance(data, dict) and "results" in data:
    data = data["results"]
  if not isinstance(data, dict):
    raise ValueError(
        f"proposal file {path}: expected a mapping video_id -> proposals (optionally under "
        f"'results'), got {type(data).__name__}")
  known = known_videos if isinstance(known_videos, set | frozenset | dict) else set(known_videos)
  out = {}
  for video, props in data.items():
    if video not in known:
      raise ValueError(f"proposal file {path} names unknown video {video!r}")
    if not isinstance(props, list):
      raise ValueError(
          f"proposal file {path}: video {video!r} must map to a list of proposals, got "
          f"{type(props).__name__}")
    segments = np.zeros((len(props), 2), np.float64)
    scores = np.zeros((len(props),), np.float64)
    for i, p in enumerate(props):
      where = f"proposal file {path}: video {video!r} proposal {i}"
      if not isinstance(p, dict):
        raise ValueError(f"{where} must be an object, got {type(p).__name__}")
      for key in ("segment", "score"):
        if key not in p:
          raise ValueError(f"{where} has no {key!r} field")
      seg, score = p["segment"], p["score"]
      if not (isinstance(seg, list | tuple) and len(seg) == 2 and all(map(_number, seg))):
        raise ValueError(f"{where}: 'segment' must be [start, end] numbers, got {seg!r}")
      if not _number(score):
        raise ValueError(f"{where}: 'score' must be a number, got {score!r}")
      start, end, score = float(seg[0]), float(seg[1]), float(score)
      if not all(map(math.isfinite, (start, end, score))):
        raise ValueError(f"{where} has a non-finite value: segment {seg!r}, score {score!r}")
      if end <= start:
        raise ValueError(f"{where} has end <= start: segment [{start}, {end}]")
      segments[i] = (start, end)
      scores[i] = score
    out[video] = (segments, scores)
  return out
