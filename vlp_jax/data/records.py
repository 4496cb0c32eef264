"""The record schema of DESIGN.md: one `tf.train.SequenceExample` per clip.

This module is the single writer and parser of that schema; the synthetic corpus and the
real-video ingestion both write through `clip_example` + `ShardedWriter`, and the input
pipeline reads through `split_files` + `parse_clip`.

Context features:
  video/id (bytes), video/fps (float), video/num_frames (int64),
  caption/string (bytes list), optional clip/label/index (int64), clip/label/text (bytes),
  question/string, answer/string (aligned bytes lists), entity/string (bytes list),
  clip/start/timestamp, clip/end/timestamp (int64 microseconds), plus free `extra` keys.
  Untrimmed videos (temporal localisation) add aligned lists of their annotated instances:
  segment/start, segment/end (float32 seconds from the start of the source file),
  segment/label/index (int64), sorted by start; `parse_clip` reads them when asked
  (`SEGMENT_KEYS`).
Feature list:
  image/encoded: one JPEG per stored frame.
Files: `DIR/<split>-00000-of-00008.tfrecord`.
"""
from __future__ import annotations

import glob
import json
import math
import numbers
import os
import re
from collections.abc import Iterable, Mapping, Sequence

import tensorflow as tf

VIDEO_ID = "video/id"
FPS = "video/fps"
NUM_FRAMES = "video/num_frames"
CAPTIONS = "caption/string"
LABEL_INDEX = "clip/label/index"
LABEL_TEXT = "clip/label/text"
QUESTIONS = "question/string"
ANSWERS = "answer/string"
ENTITIES = "entity/string"
START = "clip/start/timestamp"
END = "clip/end/timestamp"
# Optional evaluation probe: [caption, the same caption with one detail changed] (bytes list).
CONTRAST = "caption/contrast"
SEGMENT_START = "segment/start"
SEGMENT_END = "segment/end"
SEGMENT_LABEL_INDEX = "segment/label/index"
SEGMENT_KEYS = (SEGMENT_START, SEGMENT_END, SEGMENT_LABEL_INDEX)
FRAMES = "image/encoded"

_FILE_RE = re.compile(r"^(?P<split>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.tfrecord$")


def _bytes(values: Iterable[str | bytes]) -> list[bytes]:
  return [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values]


def _set_bytes(ctx, key: str, values: Iterable[str | bytes]) -> None:
  ctx.feature[key].bytes_list.value.extend(_bytes(values))


def _set_ints(ctx, key: str, values: Iterable[int]) -> None:
  ctx.feature[key].int64_list.value.extend(int(v) for v in values)


def _set_floats(ctx, key: str, values: Iterable[float]) -> None:
  ctx.feature[key].float_list.value.extend(float(v) for v in values)


def clip_example(
    video_id: str,
    frames_jpeg: Sequence[bytes],
    captions: Sequence[str],
    fps: float,
    *,
    label_index: int | None = None,
    label_text: str | None = None,
    questions: Sequence[str] | None = None,
    answers: Sequence[str] | None = None,
    entities: Sequence[str] | None = None,
    start_us: int | None = None,
    end_us: int | None = None,
    contrast: Sequence[str] | None = None,
    segments: Sequence[tuple[float, float, int]] | None = None,
    extra: Mapping[str, Sequence[bytes] | Sequence[int] | Sequence[float]] | None = None,
) -> tf.train.SequenceExample:
  """Builds one clip record.

  Args:
    video_id: unique clip id (stored as UTF-8 bytes).
    frames_jpeg: JPEG bytes, one per stored frame (a still image is one frame).
    captions: one or more captions (QA-only records may pass none).
    fps: frame rate the frames were sampled at.
    label_index, label_text: optional class label (action recognition).
    contrast: optional evaluation probe [caption, the caption with one detail changed]; the
      `retrieval/contrast_acc` metric counts how often a model prefers the first.
    questions, answers: optional aligned QA lists (same length).
    entities: optional entity nouns.
    start_us, end_us: optional clip boundaries within the source video, microseconds.
    segments: optional annotated instances (start s, end s, label index), end > start, as
      the `segment/*` lists in the given order; an empty list is written as empty lists (an
      annotated video without instances).
    extra: further context keys; the value type picks the list kind (bytes/str, int, float).

  Returns:
    A `tf.train.SequenceExample` with the context keys above and feature list `image/encoded`.
  """
  if not frames_jpeg:
    raise ValueError(f"clip {video_id!r} has no frames")
  if (questions is None) != (answers is None) or (
      questions is not None and len(questions) != len(answers)):
    raise ValueError(f"clip {video_id!r}: questions and answers must be aligned lists")
  ex = tf.train.SequenceExample()
  ctx = ex.context
  _set_bytes(ctx, VIDEO_ID, [video_id])
  _set_floats(ctx, FPS, [fps])
  _set_ints(ctx, NUM_FRAMES, [len(frames_jpeg)])
  _set_bytes(ctx, CAPTIONS, captions)
  if label_index is not None:
    _set_ints(ctx, LABEL_INDEX, [label_index])
  if label_text is not None:
    _set_bytes(ctx, LABEL_TEXT, [label_text])
  if questions is not None:
    _set_bytes(ctx, QUESTIONS, questions)
    _set_bytes(ctx, ANSWERS, answers)
  if entities is not None:
    _set_bytes(ctx, ENTITIES, entities)
  if start_us is not None:
    _set_ints(ctx, START, [start_us])
  if end_us is not None:
    _set_ints(ctx, END, [end_us])
  if contrast:
    if len(contrast) != 2:
      raise ValueError(f"contrast must be [caption, altered caption], got {list(contrast)!r}")
    _set_bytes(ctx, CONTRAST, contrast)
  if segments is not None:
    for start, end, _ in segments:
      if not (math.isfinite(start) and math.isfinite(end) and end > start):
        raise ValueError(f"clip {video_id!r}: bad segment [{start}, {end}] (need end > start)")
    for key, kind in ((SEGMENT_START, "float_list"), (SEGMENT_END, "float_list"),
                      (SEGMENT_LABEL_INDEX, "int64_list")):
      getattr(ctx.feature[key], kind).SetInParent()  # present even when empty
    _set_floats(ctx, SEGMENT_START, (s for s, _, _ in segments))
    _set_floats(ctx, SEGMENT_END, (e for _, e, _ in segments))
    _set_ints(ctx, SEGMENT_LABEL_INDEX, (i for _, _, i in segments))
  for key, values in (extra or {}).items():
    if key in ctx.feature:
      raise ValueError(f"extra key {key!r} collides with a schema key")
    values = list(values)
    first = values[0] if values else b""
    if isinstance(first, (bytes, str)):
      _set_bytes(ctx, key, values)
    elif isinstance(first, numbers.Integral):
      _set_ints(ctx, key, values)
    elif isinstance(first, numbers.Real):
      _set_floats(ctx, key, values)
    else:
      raise TypeError(f"extra key {key!r}: unsupported value type {type(first).__name__}")
  frame_list = ex.feature_lists.feature_list[FRAMES]
  for jpeg in frames_jpeg:
    frame_list.feature.add().bytes_list.value.append(bytes(jpeg))
  return ex


def shard_name(split: str, index: int, num_shards: int) -> str:
  """TFDS-style file name, e.g. `train-00003-of-00008.tfrecord`."""
  return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


class ShardedWriter:
  """Writes examples round-robin into `num_shards` files of one split.

  Each shard is written under a temporary name and renamed on a clean close, so a crash
  never leaves a half-written shard under its final name. Use as a context manager:

    with ShardedWriter(out_dir, "train", 8) as w:
      for ex in examples:
        w.write(ex)
  """

  def __init__(self, out_dir: str, split: str, num_shards: int,
               shards: Sequence[int] | None = None):
    if num_shards < 1:
      raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if not split or os.sep in split:
      raise ValueError(f"bad split name {split!r}")
    # `shards`: write only these shard indices (round-robin among them), e.g. one at a time
    # when shards are produced independently and a rerun skips the finished ones.
    indices = list(range(num_shards)) if shards is None else [int(i) for i in shards]
    if not indices or any(not 0 <= i < num_shards for i in indices):
      raise ValueError(f"shards must be a non-empty subset of range({num_shards}), got {shards}")
    self.out_dir = out_dir
    self.split = split
    self.num_shards = num_shards
    self.paths = [os.path.join(out_dir, shard_name(split, i, num_shards)) for i in indices]
    self._tmp = [p + ".tmp" for p in self.paths]
    self._writers = None
    self._counts = [0] * len(self.paths)
    self.count = 0

  def __enter__(self) -> ShardedWriter:
    os.makedirs(self.out_dir, exist_ok=True)
    self._writers = [tf.io.TFRecordWriter(p) for p in self._tmp]
    return self

  def write(self, example: tf.train.SequenceExample | bytes) -> None:
    """Appends one example (proto or already-serialised bytes) to the next shard."""
    if self._writers is None:
      raise RuntimeError("ShardedWriter.write outside its `with` block")
    data = example if isinstance(example, bytes) else example.SerializeToString()
    self._writers[self.count % len(self._writers)].write(data)
    self._counts[self.count % len(self._writers)] += 1
    self.count += 1

  def __exit__(self, exc_type, exc, tb) -> None:
    for w in self._writers:
      w.close()
    self._writers = None
    if exc_type is not None:
      for p in self._tmp:
        if os.path.exists(p):
          os.remove(p)
      return
    for tmp, final, n in zip(self._tmp, self.paths, self._counts):
      os.replace(tmp, final)
      write_manifest(final, n)


def manifest_path(shard: str) -> str:
  """The manifest of a shard file: `<shard>.json` with its record count and byte size."""
  return shard + ".json"


def write_manifest(shard: str, num_records: int) -> None:
  """Records what a shard holds when it is written, so readers can tell a truncated or
  corrupt shard and count what it lost."""
  tmp = manifest_path(shard) + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump({"records": int(num_records), "bytes": os.path.getsize(shard)}, f)
  os.replace(tmp, manifest_path(shard))


def remove_shard(shard: str) -> None:
  """Deletes a shard file and its manifest."""
  for path in (shard, manifest_path(shard)):
    if os.path.exists(path):
      os.remove(path)


def read_manifest(shard: str) -> dict | None:
  """{"records", "bytes"} written with the shard, or None (a shard written without one)."""
  path = manifest_path(shard)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def expected_count(data_dir: str, split: str) -> int | None:
  """Clips of `split` as written (the sum of its shards' manifests); None when a shard has no
  manifest."""
  total = 0
  for shard in split_files(data_dir, split):
    manifest = read_manifest(shard)
    if manifest is None:
      return None
    total += int(manifest["records"])
  return total


def check_shard(shard: str) -> tuple[int, str] | None:
  """(records lost, reason) for a shard that is truncated, corrupt or unreadable; None when it
  is intact. A shard with a manifest whose size differs is read to count what is left; one
  without a manifest is only checked to open and yield its first record."""
  manifest = read_manifest(shard)
  try:
    size = os.path.getsize(shard)
  except OSError as e:
    return (int(manifest["records"]) if manifest else 0), f"cannot be read: {e}"
  if manifest is None:
    if size == 0:
      return None
    try:
      next(iter(tf.data.TFRecordDataset(shard)))
    except (tf.errors.OpError, StopIteration) as e:
      return 0, f"cannot be read: {type(e).__name__}"
    return None
  if size == int(manifest["bytes"]):
    return None
  readable = 0
  try:
    for _ in tf.data.TFRecordDataset(shard):
      readable += 1
  except tf.errors.OpError as e:
    reason = f"{type(e).__name__} after record {readable}"
  else:
    reason = "ends early"
  lost = max(int(manifest["records"]) - readable, 0)
  return lost, (f"{size} of {manifest['bytes']} bytes, {readable} of {manifest['records']} "
                f"records readable ({reason})")


def list_splits(data_dir: str) -> list[str]:
  """Sorted names of the splits that have shard files in `data_dir`."""
  names = set()
  for path in glob.glob(os.path.join(glob.escape(data_dir), "*.tfrecord")):
    m = _FILE_RE.match(os.path.basename(path))
    if m:
      names.add(m.group("split"))
  return sorted(names)


def split_files(data_dir: str, split: str) -> list[str]:
  """Sorted shard paths of `split` in `data_dir`.

  Raises:
    FileNotFoundError: `data_dir` does not exist, or it has no files for `split` (the message
      lists the splits it does have).
  """
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f"data directory {data_dir!r} does not exist")
  pattern = os.path.join(glob.escape(data_dir), f"{glob.escape(split)}-*-of-*.tfrecord")
  files = sorted(p for p in glob.glob(pattern)
                 if (m := _FILE_RE.match(os.path.basename(p))) and m.group("split") == split)
  if not files:
    raise FileNotFoundError(
        f"no files for split {split!r} in {data_dir!r} (expected {shard_name(split, 0, 1)!r} "
        f"style names); splits present: {list_splits(data_dir) or 'none'}")
  return files


# Parse spec. Optional scalars get a default so a record without them still parses;
# lists are ragged (empty when absent).
_CONTEXT_SPEC = {
    VIDEO_ID: tf.io.FixedLenFeature([], tf.string),
    FPS: tf.io.FixedLenFeature([], tf.float32, default_value=0.0),
    NUM_FRAMES: tf.io.FixedLenFeature([], tf.int64, default_value=0),
    CAPTIONS: tf.io.RaggedFeature(tf.string),
    LABEL_INDEX: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    LABEL_TEXT: tf.io.FixedLenFeature([], tf.string, default_value=b""),
    QUESTIONS: tf.io.RaggedFeature(tf.string),
    ANSWERS: tf.io.RaggedFeature(tf.string),
    ENTITIES: tf.io.RaggedFeature(tf.string),
    START: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    END: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    CONTRAST: tf.io.RaggedFeature(tf.string),
}
CONTEXT_KEYS = tuple(_CONTEXT_SPEC)
# Parsed only when named in `context_keys`: the training pipelines do not read them.
_SEGMENT_SPEC = {
    SEGMENT_START: tf.io.RaggedFeature(tf.float32),
    SEGMENT_END: tf.io.RaggedFeature(tf.float32),
    SEGMENT_LABEL_INDEX: tf.io.RaggedFeature(tf.int64),
}


@tf.autograph.experimental.do_not_convert  # plain graph code; conversion only warns
def parse_clip(serialized: tf.Tensor, *, context_keys: Sequence[str] | None = None,
               extra: Mapping[str, tf.dtypes.DType] | None = None) -> dict[str, tf.Tensor]:
  """Parses one serialised record inside tf.data (graph mode).

  Args:
    serialized: scalar tf.string.
    context_keys: schema context keys to parse (default: all of `CONTEXT_KEYS`); may also
      name `SEGMENT_KEYS`.
    extra: further context keys to parse as 1-D lists, key -> dtype (tf.string/int64/float32).

  Returns:
    Dict of tensors: scalars for `video/id` (string), `video/fps` (float32),
    `video/num_frames`, `clip/label/index`, timestamps (int64; -1/0 when absent),
    `clip/label/text` (string, b"" when absent); 1-D string tensors for the list keys and for
    `image/encoded` ([num_stored_frames] JPEG bytes); `segment/start`, `segment/end` float32
    [S] seconds and `segment/label/index` int64 [S] when asked (S = 0 when absent); 1-D
    tensors for `extra` keys.
  """
  keys = CONTEXT_KEYS if context_keys is None else tuple(context_keys)
  spec = {k: _CONTEXT_SPEC[k] if k in _CONTEXT_SPEC else _SEGMENT_SPEC[k] for k in keys}
  for k, dtype in (extra or {}).items():
    spec[k] = tf.io.RaggedFeature(dtype)
  ctx, seq = tf.io.parse_single_sequence_example(
      serialized, context_features=spec,
      sequence_features={FRAMES: tf.io.FixedLenSequenceFeature([], tf.string)})
  out = dict(ctx)
  out[FRAMES] = seq[FRAMES]
  return out


def example_to_dict(record: bytes | tf.train.SequenceExample) -> dict:
  """Decodes a record into plain Python values (no TF graph; for tools and tests).

  Returns:
    {context key: list of bytes/int/float, ..., "image/encoded": list of JPEG bytes}.
  """
  ex = record if isinstance(record, tf.train.SequenceExample) else (
      tf.train.SequenceExample.FromString(record))
  out = {}
  for key, feat in ex.context.feature.items():
    kind = feat.WhichOneof("kind")
    out[key] = list(getattr(feat, kind).value) if kind else []
  out[FRAMES] = [f.bytes_list.value[0] for f in ex.feature_lists.feature_list[FRAMES].feature]
  return out


def read_records(path: str) -> list[bytes]:
  """All serialised records of one shard file, in order (eager; small files only)."""
  return [r.numpy() for r in tf.data.TFRecordDataset(path)]
