"""Tests of vlp_jax.eval.localization: hand-computed APs and naive re-implementations."""
import json

import numpy as np
import pytest

from vlp_jax.eval.localization import (
    ACTIVITYNET_TIOUS,
    THUMOS14_TIOUS,
    average_precision_at_tiou,
    interpolated_average_precision,
    load_proposals,
    mean_average_precision,
    metrics,
    segment_iou,
    segment_iou_matrix,
    temporal_nms,
)

# ---------------------------------------------------------------- hand-computed fixture
TIOUS = (0.3, 0.5, 0.7)

GT = [
    # class 0: 3 instances
    ("a", 0.0, 10.0, 0),
    ("a", 20.0, 30.0, 0),
    ("b", 5.0, 15.0, 0),
    # class 1: 2 instances
    ("c", 0.0, 10.0, 1),
    ("a", 40.0, 50.0, 1),
]

PREDS = [
    # class 0, listed out of score order on purpose.
    ("a", 24.0, 36.0, 0, 0.5),  # p5: vs a[20,30]: inter 6, union 16 -> 0.375: TP@0.3 only
    ("a", 0.0, 10.0, 0, 0.9),   # p1: IoU 1 with a[0,10]: TP everywhere
    ("b", 6.0, 12.0, 0, 0.7),   # p3: vs b[5,15]: inter 6, union 10 -> 0.6: TP@0.3,0.5
    ("a", 1.0, 10.0, 0, 0.8),   # p2: duplicate of a[0,10] (IoU 0.9, already matched),
                                #     IoU 0 with a[20,30]: FP everywhere
    ("c", 0.0, 10.0, 0, 0.6),   # p4: wrong video (no class-0 gt in c): FP everywhere
    # class 1
    ("c", 2.0, 10.0, 1, 0.95),  # q1: vs c[0,10]: 8/10 = 0.8: TP everywhere
    ("b", 0.0, 10.0, 1, 0.9),   # q2: wrong video: FP
    ("a", 40.0, 50.0, 1, 0.3),  # q3: IoU 1: TP
    # class 2 has no ground truth: left out of the mean, whatever its predictions.
    ("a", 0.0, 10.0, 2, 0.99),
]

# Class 0, score order p1..p5, num_gt = 3.
# @0.3: tp 1,0,1,0,1  cumTP 1,1,2,2,3  cumFP 0,1,1,2,2
#   prec 1, 1/2, 2/3, 1/2, 3/5   rec 1/3, 1/3, 2/3, 2/3, 1
#   padded prec [0, 1, .5, 2/3, .5, .6, 0] -> max from right [1, 1, 2/3, 2/3, .6, .6, 0]
#   padded rec  [0, 1/3, 1/3, 2/3, 2/3, 1, 1]: changes at i = 1, 3, 5
#   AP = 1/3*1 + 1/3*2/3 + 1/3*.6 = 15/45 + 10/45 + 9/45 = 34/45
# @0.5: tp 1,0,1,0,0  cumTP 1,1,2,2,2  cumFP 0,1,1,2,3
#   prec 1, 1/2, 2/3, 1/2, 2/5   rec 1/3, 1/3, 2/3, 2/3, 2/3
#   max from right [1, 1, 2/3, 2/3, .5, .4, 0]; rec changes at i = 1, 3, 6 (2/3 -> 1, prec 0)
#   AP = 1/3*1 + 1/3*2/3 + 1/3*0 = 5/9
# @0.7: tp 1,0,0,0,0  prec 1, 1/2, 1/3, 1/4, 1/5  rec 1/3 throughout
#   AP = 1/3*1 + 2/3*0 = 1/3
AP0 = (34 / 45, 5 / 9, 1 / 3)
# Class 1, score order q1..q3, num_gt = 2, same at every threshold (IoUs 0.8 and 1):
#   tp 1,0,1  cumTP 1,1,2  cumFP 0,1,1  prec 1, 1/2, 2/3  rec 1/2, 1/2, 1
#   max from right [1, 1, 2/3, 2/3, 0]; rec [0, .5, .5, 1, 1] changes at i = 1, 3
#   AP = 1/2*1 + 1/2*2/3 = 5/6
AP1 = (5 / 6,) * 3
# mAP = (AP0 + AP1) / 2: 143/180, 25/36 = 125/180, 7/12 = 105/180; mean 373/540.
MAP = (143 / 180, 25 / 36, 7 / 12)
MAP_AVG = 373 / 540


def _one_class(records, label):
  return [(r[0], r[1], r[2], *r[4:]) for r in records if r[3] == label]


def test_average_precision_hand_computed():
  np.testing.assert_allclose(
      average_precision_at_tiou(_one_class(GT, 0), _one_class(PREDS, 0), TIOUS), AP0,
      rtol=0, atol=1e-12)
  np.testing.assert_allclose(
      average_precision_at_tiou(_one_class(GT, 1), _one_class(PREDS, 1), TIOUS), AP1,
      rtol=0, atol=1e-12)


def test_mean_average_precision_hand_computed():
  res = mean_average_precision(GT, PREDS, TIOUS, num_classes=3)
  np.testing.assert_allclose(res["ap"][:2], np.asarray([AP0, AP1]), rtol=0, atol=1e-12)
  assert np.all(np.isnan(res["ap"][2]))
  np.testing.assert_array_equal(res["num_gt"], [3, 2, 0])
  np.testing.assert_allclose(res["mAP"], MAP, rtol=0, atol=1e-12)
  assert res["mAP_avg"] == pytest.approx(MAP_AVG, abs=1e-12)


def test_metrics_keys_and_percent():
  out = metrics(GT, PREDS, TIOUS, num_classes=3)
  assert list(out) == ["loc/mAP@0.3", "loc/mAP@0.5", "loc/mAP@0.7", "loc/mAP_avg"]
  for t, m in zip(TIOUS, MAP):
    assert out[f"loc/mAP@{t:g}"] == pytest.approx(100 * m, abs=1e-9)
  assert out["loc/mAP_avg"] == pytest.approx(100 * MAP_AVG, abs=1e-9)
  keys = list(metrics(GT, PREDS, ACTIVITYNET_TIOUS, num_classes=3))
  assert keys[:3] == ["loc/mAP@0.5", "loc/mAP@0.55", "loc/mAP@0.6"]
  assert keys[-2:] == ["loc/mAP@0.95", "loc/mAP_avg"]
  assert len(metrics(GT, PREDS, num_classes=3)) == len(THUMOS14_TIOUS) + 1


def test_match_falls_back_to_next_unmatched_gt():
  # gt g0 [0,10], g1 [8,20]. p1 [0,10] takes g0. p2 [2,12]: IoU 8/12 with g0 (matched),
  # 4/18 = 0.222 with g1: TP at tIoU 0.2, FP at 0.5.
  gt = [("v", 0.0, 10.0), ("v", 8.0, 20.0)]
  preds = [("v", 0.0, 10.0, 0.9), ("v", 2.0, 12.0, 0.8)]
  # @0.2: prec 1, 1; rec 1/2, 1 -> AP 1. @0.5: prec 1, 1/2; rec 1/2, 1/2 -> AP 1/2.
  np.testing.assert_allclose(average_precision_at_tiou(gt, preds, (0.2, 0.5)), [1.0, 0.5])


def test_ap_edge_cases():
  gt = [("v", 0.0, 1.0)]
  np.testing.assert_array_equal(average_precision_at_tiou([], [("v", 0.0, 1.0, 1.0)]),
                                np.zeros(10))
  np.testing.assert_array_equal(average_precision_at_tiou(gt, [], (0.5,)), [0.0])
  np.testing.assert_array_equal(average_precision_at_tiou(gt, [("v", 0.0, 1.0, 0.1)]),
                                np.ones(10))
  with pytest.raises(ValueError, match="no class has ground truth"):
    mean_average_precision([], PREDS, num_classes=3)
  with pytest.raises(ValueError, match="label 3"):
    mean_average_precision(GT, [("a", 0.0, 1.0, 3, 0.5)], num_classes=3)


def _loop_ap(gt, preds, thresholds):
  """ActivityNet's compute_average_precision_detection as literal loops (no pandas)."""
  preds = sorted(preds, key=lambda p: -p[3])
  tp = np.zeros((len(thresholds), len(preds)))
  lock = -np.ones((len(thresholds), len(gt)), int)
  for idx, (v, s, e, _) in enumerate(preds):
    mine = [j for j, g in enumerate(gt) if g[0] == v]
    if not mine:
      continue
    ious = segment_iou((s, e), [gt[j][1:] for j in mine])
    for t, thr in enumerate(thresholds):
      for k in np.argsort(-ious, kind="stable"):
        if ious[k] < thr:
          break
        if lock[t, mine[k]] >= 0:
          continue
        tp[t, idx], lock[t, mine[k]] = 1, idx
        break
  cum_tp = np.cumsum(tp, axis=1)
  prec = cum_tp / np.arange(1, len(preds) + 1)
  return [interpolated_average_precision(prec[t], cum_tp[t] / len(gt))
          for t in range(len(thresholds))]


def test_average_precision_against_loops():
  rng = np.random.default_rng(2)
  for _ in range(20):
    videos = ["a", "b", "c", "d"]
    gt, preds = [], []
    for _ in range(int(rng.integers(1, 12))):
      s = float(rng.uniform(0, 50))
      gt.append((str(rng.choice(videos[:3])), s, s + float(rng.uniform(1, 20))))
    for _ in range(int(rng.integers(0, 30))):
      v, s, e = gt[int(rng.integers(len(gt)))]
      js, je = rng.normal(0, 3, 2)  # jittered copies of gt, some in a gt-less video
      v = "d" if rng.random() < 0.1 else v
      preds.append((v, s + js, max(s + js + 0.1, e + je), float(rng.random())))
    np.testing.assert_allclose(average_precision_at_tiou(gt, preds, ACTIVITYNET_TIOUS),
                               _loop_ap(gt, preds, ACTIVITYNET_TIOUS), atol=1e-12)


# ------------------------------------------------------------------ interpolated AP
def _naive_interpolated_ap(prec, rec):
  """For each distinct recall level r (in increasing order, r_0 = 0): the step
  (r - r_prev) times the best precision at recall >= r; recall up to 1 has precision 0."""
  ap, prev = 0.0, 0.0
  for r in sorted(set(rec.tolist()) | {1.0}):
    if r <= prev:
      continue
    at_or_above = [p for p, q in zip(prec, rec) if q >= r]
    ap += (r - prev) * (max(at_or_above) if at_or_above else 0.0)
    prev = r
  return ap


def test_interpolated_ap_against_naive():
  rng = np.random.default_rng(0)
  for _ in range(200):
    n = int(rng.integers(1, 30))
    tp = rng.random(n) < rng.random()
    npos = int(tp.sum()) + int(rng.integers(0, 4))
    if npos == 0:
      continue
    cum_tp = np.cumsum(tp)
    prec = cum_tp / np.arange(1, n + 1)
    rec = cum_tp / npos
    assert interpolated_average_precision(prec, rec) == pytest.approx(
        _naive_interpolated_ap(prec, rec), abs=1e-12)


def test_interpolated_ap_simple():
  assert interpolated_average_precision([1.0], [1.0]) == 1.0
  assert interpolated_average_precision([], []) == 0.0
  # prec 0.5 then 1 at recalls 0.5, 1: interpolation lifts the first to 1.
  assert interpolated_average_precision([0.5, 1.0], [0.5, 1.0]) == 1.0


# ------------------------------------------------------------------------ segment IoU
def test_segment_iou_simple():
  np.testing.assert_allclose(
      segment_iou([0.0, 2.0], [[3.0, 4.0], [0.0, 2.0], [1.0, 3.0], [2.0, 5.0]]),
      [0.0, 1.0, 1 / 3, 0.0])
  assert segment_iou([1.0, 1.0], [[1.0, 1.0]]).tolist() == [0.0]  # no NaN
  a = np.asarray([[0.0, 2.0], [1.0, 3.0]])
  b = np.asarray([[0.0, 2.0], [2.0, 5.0], [1.5, 2.5]])
  mat = segment_iou_matrix(a, b)
  assert mat.shape == (2, 3)
  for i in range(2):
    np.testing.assert_allclose(mat[i], segment_iou(a[i], b))


# ------------------------------------------------------------------------------- NMS
def _naive_nms(segments, scores, thr):
  n = len(scores)
  order = sorted(range(n), key=lambda i: -scores[i])  # sorted() is stable
  dead = [False] * n
  keep = []
  for a, i in enumerate(order):
    if dead[i]:
      continue
    keep.append(i)
    for j in order[a + 1:]:
      s0, e0 = segments[i]
      s1, e1 = segments[j]
      inter = max(0.0, min(e0, e1) - max(s0, s1))
      union = (e0 - s0) + (e1 - s1) - inter
      if union > 0 and inter / union > thr:
        dead[j] = True
  return keep


def test_temporal_nms_small():
  segments = [[0, 10], [1, 10], [20, 30], [5, 25], [21, 30]]
  scores = [0.9, 0.8, 0.7, 0.6, 0.7]
  # 0 keeps; 1 (IoU .9 with 0) goes; 2 and 4 tie at 0.7: 2 first (input order), 4 (IoU .9
  # with 2) goes; 3 overlaps 0 and 2 by 5/25 = .2 each: kept at 0.5, dropped at 0.1.
  assert temporal_nms(segments, scores, 0.5).tolist() == [0, 2, 3]
  assert temporal_nms(segments, scores, 0.1).tolist() == [0, 2]
  assert temporal_nms(np.zeros((0, 2)), np.zeros(0), 0.5).tolist() == []


def test_temporal_nms_against_naive():
  rng = np.random.default_rng(1)
  for _ in range(50):
    n = int(rng.integers(1, 40))
    start = rng.uniform(0, 100, n)
    segments = np.stack([start, start + rng.uniform(0.5, 30, n)], axis=1)
    scores = np.round(rng.random(n), 1)  # rounding makes ties
    thr = float(rng.uniform(0.1, 0.9))
    assert temporal_nms(segments, scores, thr).tolist() == _naive_nms(
        segments.tolist(), scores.tolist(), thr)


# --------------------------------------------------------------------- load_proposals
def _write(tmp_path, data):
  path = tmp_path / "proposals.json"
  path.write_text(json.dumps(data))
  return path


def test_load_proposals(tmp_path):
  props = {"v1": [{"segment": [0.0, 2.5], "score": 0.9}, {"segment": [1, 4], "score": 0.2}],
           "v2": []}
  for data in ({"version": "1.3", "results": props}, props):
    out = load_proposals(_write(tmp_path, data), {"v1", "v2", "v3"})
    assert set(out) == {"v1", "v2"}
    segs, scores = out["v1"]
    assert segs.dtype == np.float64 and segs.shape == (2, 2)
    np.testing.assert_array_equal(segs, [[0.0, 2.5], [1.0, 4.0]])
    np.testing.assert_array_equal(scores, [0.9, 0.2])
    assert out["v2"][0].shape == (0, 2) and out["v2"][1].shape == (0,)


def test_load_proposals_errors(tmp_path):
  ok = {"segment": [0.0, 1.0], "score": 0.5}
  with pytest.raises(ValueError, match="names unknown video 'vx'"):
    load_proposals(_write(tmp_path, {"results": {"vx": [ok]}}), ["v1"])
  with pytest.raises(ValueError, match=r"video 'v1' proposal 1 has end <= start: "
                                       r"segment \[3\.0, 3\.0\]"):
    load_proposals(_write(tmp_path, {"v1": [ok, {"segment": [3, 3], "score": 0.1}]}), ["v1"])
  with pytest.raises(ValueError, match=r"proposal 0 has no 'score' field"):
    load_proposals(_write(tmp_path, {"v1": [{"segment": [0, 1]}]}), ["v1"])
  with pytest.raises(ValueError, match="'segment' must be"):
    load_proposals(_write(tmp_path, {"v1": [{"segment": [0], "score": 1}]}), ["v1"])
  with pytest.raises(ValueError, match="non-finite"):
    load_proposals(_write(tmp_path, {"v1": [{"segment": [0, float("inf")], "score": 1}]}),
                   ["v1"])
