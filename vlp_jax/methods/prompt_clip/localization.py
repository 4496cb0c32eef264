"""Prompt-CLIP temporal action localisation (task `prompt_clip_localization`; Ju et al., ECCV
2022): externally supplied class-agnostic proposals, each classified by its frame features.

The task is `prompt_clip_action` (same collections, same training, same frozen CLIP and
feature cache; see action.py) with one more evaluator, so a model trained by
`prompt_clip_action` is evaluated on untrimmed videos with `launch.evaluate` and
`--config.init.checkpoint=ACTION_WORKDIR`:

  localization  for every video of the split (the core's pass over its records lists them;
                each must be in the feature cache `data.features`):
    1. proposals: `proposals` (an ActivityNet-style JSON, {"results": {video_id: [{"segment":
       [start, end], "score": p}, ...]}}; "" = DATA_DIR/proposals_<split>.json), read by
       `eval.localization.load_proposals` (a video not in the split, or end <= start, is an
       error naming the file, video and proposal);
    2. frames: seconds -> the cached frames whose time span overlaps the proposal
       (`proposal_frames`: frame t of a video covers [o + t / fps, o + (t + 1) / fps), fps
       and the offset o = `clip/start/timestamp` from the cache index; at least one frame),
       evenly resampled to `frames` (0 = `model.temporal.max_frames`) when longer
       (`window_frames`); a shorter proposal keeps all its frames (the rest of the window is
       masked out);
    3. class probabilities: the temporal model over those frames (with
       `model.temporal.layers` = 0: the mean of the proposal's frame features), L2-normalised,
       softmax over all C classes of cos(proposal, prompted class text) / `model.temperature`;
    4. detections: for each of the proposal's `top_k` (2) most probable classes, score =
       proposal score x class probability;
    5. temporal NMS per video and class (`eval.localization.temporal_nms`: a detection whose
       tIoU with a higher-scored kept one exceeds `nms_iou` (0.5) is dropped; 1.0 = none);
    6. ActivityNet detection mAP (`eval.localization.metrics`) against the ground-truth
       segments of the records at `tious`: "thumos14" (0.3:0.1:0.7), "activitynet"
       (0.5:0.05:0.95) or a comma-separated list.
    -> `loc/mAP@<t>` (percent), `loc/mAP_avg`, `loc/videos`, `loc/gt_segments`,
       `loc/proposals`, `loc/detections` (after NMS), `loc/uncached_videos` when some were
       missing from the cache (`eval.allow_missing`).

Ground truth: the context lists `segment/start`, `segment/end` (float seconds, on the same
time axis as the proposals) and `segment/label/index` (int64, line of `data.classes`) of each
record of `data.dir`'s split, parsed here (`example_segments`); a video without them has no
ground truth (its detections are all false positives). Every process reads the split's
records and scores every proposal (their feature batches are split over the mesh).
"""
from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vlp_jax.core import task as task_lib
from vlp_jax.data import feature_cache, feature_loader, records
from vlp_jax.eval import features, localization
from vlp_jax.methods.prompt_clip import action
from vlp_jax.models import layers
from vlp_jax.parallel import sharding as shd

# The record schema's segment fields of untrimmed videos (context lists, aligned).
SEGMENT_START, SEGMENT_END, SEGMENT_LABEL = records.SEGMENT_KEYS
TIOU_PRESETS = {"thumos14": localization.THUMOS14_TIOUS,
                "activitynet": localization.ACTIVITYNET_TIOUS}
PROPOSALS_FILE = "proposals_{split}.json"  # under the data directory
# Frame boundaries: a time within this many frames of a boundary counts as on it (float
# seconds such as 0.1 * 8 are not exact).
_FRAME_TOLERANCE = 1e-6


class VideoSegments(NamedTuple):
  """Ground truth of one video: segments float64 [K, 2] (start, end seconds), labels int64
  [K]."""
  segments: np.ndarray
  labels: np.ndarray


def tiou_thresholds(spec: str | Sequence[float]) -> np.ndarray:
  """float64 [T] tIoU thresholds of `tious`: "thumos14", "activitynet", "0.3,0.5" or a
  sequence of floats.

  Raises:
    ValueError: an unknown name, a value outside (0, 1] or an empty list.
  """
  if isinstance(spec, str):
    name = spec.strip().lower()
    if name in TIOU_PRESETS:
      return np.asarray(TIOU_PRESETS[name], np.float64)
    try:
      values = [float(v) for v in name.split(",") if v.strip()]
    except ValueError:
      raise ValueError(f"tious must be one of {sorted(TIOU_PRESETS)} or comma-separated "
                       f"numbers, got {spec!r}") from None
  else:
    values = [float(v) for v in spec]
  out = np.asarray(values, np.float64)
  if not out.size or not np.all((out > 0) & (out <= 1)):
    raise ValueError(f"tious must be non-empty thresholds in (0, 1], got {spec!r}")
  return out


def proposal_frames(start: float, end: float, fps: float, num_frames: int,
                    offset: float = 0.0) -> tuple[int, int]:
  """The frames [first, stop) of a video that a segment [start, end] (seconds) covers.

  Frame t covers [offset + t / fps, offset + (t + 1) / fps): the frames whose span overlaps
  the segment are first = floor((start - offset) fps) .. stop = ceil((end - offset) fps),
  clipped to the video. At least one frame: a segment inside one frame's span takes that
  frame; one outside the video takes the nearest frame.

  Args:
    start, end: seconds, end > start.
    fps: frames per second the video's frames were stored at, > 0.
    num_frames: T >= 1.
    offset: seconds of frame 0 (the record's `clip/start/timestamp`).

  Returns:
    (first, stop) with 0 <= first < stop <= num_frames.
  """
  if not fps > 0:
    raise ValueError(f"proposal_frames: fps must be > 0, got {fps}")
  if num_frames < 1:
    raise ValueError(f"proposal_frames: num_frames must be >= 1, got {num_frames}")
  first = math.floor((start - offset) * fps + _FRAME_TOLERANCE)
  stop = math.ceil((end - offset) * fps - _FRAME_TOLERANCE)
  first = min(max(first, 0), num_frames - 1)
  stop = min(max(stop, first + 1), num_frames)
  return first, stop


def window_frames(first: int, stop: int, length: int) -> np.ndarray:
  """int64 [min(stop - first, length)] frame indices of a proposal's window: all of
  [first, stop) when they fit, else `length` evenly spread from first to stop - 1
  (round(linspace), both ends included)."""
  n = stop - first
  if n < 1 or length < 1:
    raise ValueError(f"window_frames: empty range [{first}, {stop}) or length {length}")
  if n <= length:
    return np.arange(first, stop, dtype=np.int64)
  return first + np.round(np.linspace(0, n - 1, length)).astype(np.int64)


def example_segments(context: Mapping[str, Sequence], video_id: str = "") -> VideoSegments:
  """The ground-truth segments of one record's context lists (`records.example_to_dict`).

  Raises:
    ValueError: lists of different lengths, or a segment with end <= start or a non-finite
      time (names the video and the segment).
  """
  starts = [float(v) for v in context.get(SEGMENT_START, [])]
  ends = [float(v) for v in context.get(SEGMENT_END, [])]
  labels = [int(v) for v in context.get(SEGMENT_LABEL, [])]
  if not len(starts) == len(ends) == len(labels):
    raise ValueError(f"video {video_id!r}: {SEGMENT_START}, {SEGMENT_END} and "
                     f"{SEGMENT_LABEL} must be aligned lists, got {len(starts)}, {len(ends)} "
                     f"and {len(labels)} values")
  for k, (s, e) in enumerate(zip(starts, ends)):
    if not (math.isfinite(s) and math.isfinite(e) and e > s):
      raise ValueError(f"video {video_id!r} segment {k}: [{s}, {e}] must have "
                       "finite times with end > start")
  return VideoSegments(np.asarray(starts + ends, np.float64).reshape(2, -1).T.copy(),
                       np.asarray(labels, np.int64))


def read_ground_truth(data_dir: str, split: str) -> dict[str, VideoSegments]:
  """{video_id: its segments} of every record of `split` in `data_dir` (record order; a
  repeated id keeps its first record).

  Raises:
    FileNotFoundError: no shards of the split. ValueError: bad segment fields (names the
      video).
  """
  import tensorflow as tf  # noqa: PLC0415  (only the evaluation reads records)

  from vlp_jax.data import records  # noqa: PLC0415  (imports tensorflow)
  out: dict[str, VideoSegments] = {}
  for shard in records.split_files(data_dir, split):
    try:
      for raw in tf.data.TFRecordDataset(shard):
        context = tf.train.SequenceExample.FromString(raw.numpy()).context.feature
        video_id = context[records.VIDEO_ID].bytes_list.value[0].decode("utf-8")
        lists = {}
        for key in (SEGMENT_START, SEGMENT_END, SEGMENT_LABEL):
          if key in context:
            kind = context[key].WhichOneof("kind")
            lists[key] = list(getattr(context[key], kind).value) if kind else []
        out.setdefault(video_id, example_segments(lists, video_id))
    except tf.errors.OpError as e:  # the core's pass names and counts what the shard lost
      logging.warning("localization: ground truth of %s read up to a %s", shard,
                      type(e).__name__)
  return out


def detections(video_ids: Sequence[str], segments: np.ndarray, scores: np.ndarray,
               probs: np.ndarray, labels: np.ndarray, nms_iou: float) -> list[tuple]:
  """Scored, per-class suppressed detections of classified proposals.

  Args:
    video_ids: P videos of the proposals.
    segments: float [P, 2] (start, end) seconds.
    scores: float [P] proposal scores.
    probs: float [P, K] the probabilities of each proposal's K most probable classes.
    labels: int [P, K] those classes.
    nms_iou: temporal NMS threshold per (video, class) (`eval.localization.temporal_nms`).

  Returns:
    [(video_id, start, end, label, score)] with score = proposal score x class probability,
    grouped by (video, class) in order of first appearance, each group in descending score.
  """
  segments = np.asarray(segments, np.float64).reshape(-1, 2)
  scores = np.asarray(scores, np.float64).reshape(-1)
  probs = np.asarray(probs, np.float64)
  labels = np.asarray(labels, np.int64)
  groups: dict[tuple[str, int], list[tuple[int, float]]] = {}
  for i, video in enumerate(video_ids):
    for p, c in zip(probs[i], labels[i]):
      groups.setdefault((video, int(c)), []).append((i, float(scores[i] * p)))
  out = []
  for (video, c), members in groups.items():
    rows = np.asarray([i for i, _ in members], np.int64)
    s = np.asarray([v for _, v in members], np.float64)
    for j in localization.temporal_nms(segments[rows], s, nms_iou):
      start, end = segments[rows[j]]
      out.append((video, float(start), float(end), c, float(s[j])))
  return out


def _proposal_batches(index: feature_cache.SplitIndex, rows: Sequence[tuple[int, np.ndarray]],
                      length: int, dim: int, batch_size: int, process_index: int,
                      process_count: int):
  """Host batches of proposal windows: process p's rows of each global batch (as the feature
  loader splits them), the last global batch padded with valid=False rows.

  Yields {features float32 [b, length, D], mask bool [b, length], valid bool [b]}.
  """
  total = batch_size * process_count
  for start in range(0, len(rows), total):
    feats = np.zeros((batch_size, length, dim), np.float32)
    mask = np.zeros((batch_size, length), bool)
    valid = np.zeros((batch_size,), bool)
    for i in range(batch_size):
      row = start + process_index * batch_size + i
      if row < len(rows):
        position, frames = rows[row]
        feats[i, :len(frames)] = index.features(position)[frames]
        mask[i, :len(frames)] = True
        valid[i] = True
    yield {"features": feats, "mask": mask, "valid": valid}


@task_lib.register("prompt_clip_localization")
class PromptClipLocalizationTask(action.PromptClipActionTask):
  """`prompt_clip_action` plus the `localization` evaluator (module docstring)."""

  trains_from_frames = False  # reads the feature cache only

  @functools.cached_property
  def _class_fns(self) -> dict[int, Any]:
    return {}

  def _class_fn(self, top_k: int):
    """({"params", "text"}, proposal batch) -> the top-k class probabilities and classes,
    float32 / int32 [b, k] (one function, so one jit cache, per k)."""
    cache = self._class_fns
    if top_k not in cache:
      def classify(args, batch):
        pooled = self.temporal.apply({"params": args["params"].get("temporal", {})},
                                     batch["features"].astype(jnp.float32), batch["mask"])
        logits = layers.l2_normalize(pooled) @ args["text"].T / self.temperature
        probs, labels = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), top_k)
        return {"prob": probs, "label": labels}
      cache[top_k] = classify
    return cache[top_k]

  def _localization(self, params, batches, mesh, rules, eval_cfg) -> dict[str, float]:
    split = eval_cfg.split
    top_k = int(eval_cfg.get("top_k", 2))
    nms_iou = float(eval_cfg.get("nms_iou", 0.5))
    thresholds = tiou_thresholds(eval_cfg.get("tious", "thumos14"))
    max_frames = int(self.config.model.temporal.max_frames)
    length = int(eval_cfg.get("frames", 0)) or max_frames
    if top_k < 1:
      raise ValueError(f"localization: top_k must be >= 1, got {top_k}")
    if not 1 <= length <= max_frames:
      raise ValueError(f"localization: frames ({length}) must be in [1, "
                       f"model.temporal.max_frames = {max_frames}]")
    data_dir = self.config.data.get("dir") or ""
    if self.config.data.get("source", "tfrecord") != "tfrecord" or not data_dir:
      raise ValueError("localization reads the ground-truth segments from the records of "
                       "data.dir (data.source='tfrecord')")
    path = str(eval_cfg.get("proposals", "")) or os.path.join(
        data_dir, PROPOSALS_FILE.format(split=split))
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"localization: no proposal file {path!r} (an ActivityNet-style JSON of "
          "class-agnostic proposals; set evals.<name>.proposals)")

    source = self.feature_source(train=False)
    _, index = feature_loader.open_split(source, split)
    positions, lost = self._covered(batches, index)
    truth = read_ground_truth(data_dir, split)
    proposals = localization.load_proposals(path, truth)
    videos = [index.video_ids[p] for p in positions]
    missing = [v for v in videos if v not in truth]
    if missing:
      raise ValueError(f"localization: {len(missing)} cached video(s) of split {split!r} have "
                       f"no record in {data_dir!r} (e.g. {missing[:3]})")
    ground_truth = [(v, float(a), float(b), int(c)) for v in videos
                    for (a, b), c in zip(truth[v].segments, truth[v].labels)]
    if not ground_truth:
      raise ValueError(f"localization: the {len(videos)} evaluated video(s) of split "
                       f"{split!r} have no ground-truth segments ({SEGMENT_START}, ...)")

    # Every proposal of the evaluated videos: (position, its window's frames).
    rows, ids, segments, scores = [], [], [], []
    for position, video in zip(positions, videos):
      if video not in proposals:
        continue
      fps = float(index.fps[position])
      if not fps > 0:
        raise ValueError(f"localization: video {video!r} has no fps in the feature cache "
                         "(video/fps of its record); seconds cannot be mapped to frames")
      offset = max(int(index.start_us[position]), 0) / 1e6
      t = int(index.num_frames[position])
      segs, s = proposals[video]
      for (start, end), score in zip(segs, s):
        first, stop = proposal_frames(start, end, fps, t, offset)
        rows.append((int(position), window_frames(first, stop, length)))
        ids.append(video)
        segments.append((start, end))
        scores.append(score)

    found: list[tuple] = []
    if rows:
      frozen = self.frozen_on(mesh, rules)
      with shd.activate(mesh, rules):
        text = jax.jit(self._all_text_fn, out_shardings=shd.replicated(mesh))(
            frozen.params, params["prompts"])
      k = min(top_k, len(self.class_names))
      per_process = shd.batch_size_per_process(int(self.config.eval_batch_size), mesh, rules)
      windows = _proposal_batches(index, rows, length, int(text.shape[1]), per_process,
                                  jax.process_index(), jax.process_count())
      out = jax.device_get(features.collect(self._class_fn(k), {"params": params,
                                                                "text": text},
                                            windows, mesh, rules))
      found = detections(ids, np.asarray(segments), np.asarray(scores), out["prob"],
                         out["label"], nms_iou)
    m = localization.metrics(ground_truth, found, thresholds,
                             num_classes=len(self.class_names))
    m.update({"loc/videos": float(len(videos)), "loc/gt_segments": float(len(ground_truth)),
              "loc/proposals": float(len(rows)), "loc/detections": float(len(found))})
    if lost:
      m["loc/uncached_videos"] = float(lost)
    return m

  def evaluators(self) -> dict[str, task_lib.Evaluator]:
    """The action task's evaluators and `localization` (module docstring)."""
    return {**super().evaluators(), "localization": self._localization}

