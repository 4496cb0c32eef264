"""Synthetic untrimmed videos of the moving shapes, for temporal action localisation.

Each video has `min_frames`..`max_frames` frames (48..64) stored at a nominal `fps` (8), so it
lasts 6-8 s, and holds 1..`max_actions` (3) actions: one shape (a (shape, colour) pair of
`synthetic.topics`, a size) moving in one of the 8 motions of `synthetic.MOTIONS` over
`min_len`..`max_len` frames (8..16: 1-2 s, the whole motion of a trimmed clip), drawn by
`synthetic.py`'s own functions. Between actions, at least `min_gap` (4) frames of background:
the video's noise texture with fresh per-frame noise and no shape; background may also open
and close the video. Action k occupying frames [a, b) is the ground-truth segment
[a / fps, b / fps] seconds (frame t covers [t / fps, (t + 1) / fps)) with label
`MOTIONS.index(motion)`.

Records (records.py's `clip_example`): `video/id` = "untrimmed-<split>-<index>", `video/fps`,
every frame (JPEG), `clip/start/timestamp` 0 and `clip/end/timestamp` T / fps, one caption
naming the actions in order, the shapes as entities, no `clip/label/index` (a video has
several), and the segment context lists `segment/start`, `segment/end` (float seconds) and
`segment/label/index` (int64), aligned, in time order.

`noisy_oracle_proposals` makes class-agnostic proposals from the ground truth (documented
there); `generate` writes DIR/<split>-*.tfrecord, DIR/proposals_<split>.json (ActivityNet
style), DIR/classes.txt (the 8 motions' label texts, as the trimmed corpus's), DIR/vocab.txt
and DIR/untrimmed.json (the parameters and summary). Everything is a function of the seed.
"""
from __future__ import annotations

import io
import json
import math
import os
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from vlp_jax.data import synthetic

# The record schema's segment fields of untrimmed videos (context lists, aligned).
# records.SEGMENT_KEYS, spelled out: this module imports no tensorflow at module level.
SEGMENT_START = "segment/start"
SEGMENT_END = "segment/end"
SEGMENT_LABEL = "segment/label/index"
SPLITS = ("train", "val", "test")
FPS = 8.0
META_FILE = "untrimmed.json"
PROPOSALS_FILE = "proposals_{split}.json"
CLASSES_FILE = "classes.txt"
_STREAM = 0x5E6  # rng stream of this corpus, apart from the trimmed corpus's


def layout(rng: np.random.Generator, num_frames: int, num_actions: int, min_len: int,
           max_len: int, min_gap: int) -> list[tuple[int, int]]:
  """Frame ranges [a, b) of the actions of one video, in time order.

  Lengths are uniform in [min_len, max_len]; while they and the (num_actions - 1) gaps of
  min_gap frames do not fit in num_frames, the last action is dropped (one always remains:
  its length is cut to the video). The spare frames go to the num_actions + 1 gaps (before,
  between, after) at uniformly drawn cut points.
  """
  lengths = [int(v) for v in rng.integers(min_len, max_len + 1, num_actions)]
  while len(lengths) > 1 and sum(lengths) + (len(lengths) - 1) * min_gap > num_frames:
    lengths.pop()
  lengths[0] = min(lengths[0], num_frames)
  spare = num_frames - sum(lengths) - (len(lengths) - 1) * min_gap
  cuts = np.sort(rng.integers(0, spare + 1, len(lengths)))
  out, t = [], 0
  for k, length in enumerate(lengths):
    gap = int(cuts[k] - (cuts[k - 1] if k else 0)) + (min_gap if k else 0)
    t += gap
    out.append((t, t + length))
    t += length
  return out


def _frame_jpeg(img: Image.Image) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format="JPEG", quality=90, subsampling=0)  # as the trimmed corpus's frames
  return buf.getvalue()


def render_video(seed: int, split: str, index: int, *, min_frames: int = 48,
                 max_frames: int = 64, image_size: int = 40, fps: float = FPS,
                 max_actions: int = 3, min_len: int = 8, max_len: int = 16,
                 min_gap: int = 4) -> dict[str, Any]:
  """Renders one untrimmed video (module docstring).

  Returns:
    {"video_id", "frames": list of T JPEG bytes (image_size^2 RGB), "fps", "num_frames" T,
     "actions": [{"frames": [a, b), "segment": [a / fps, b / fps], "label": int, "shape",
     "colour", "size", "motion"}] in time order, "caption": str}.
  """
  if not 1 <= min_len <= max_len or min_frames < min_len or max_frames < min_frames:
    raise ValueError(f"need 1 <= min_len ({min_len}) <= max_len ({max_len}), min_frames "
                     f"({min_frames}) >= min_len and max_frames ({max_frames}) >= min_frames")
  rng = np.random.default_rng([seed, _STREAM, SPLITS.index(split), index])
  num_frames = int(rng.integers(min_frames, max_frames + 1))
  spans = layout(rng, num_frames, int(rng.integers(1, max_actions + 1)), min_len, max_len,
                 min_gap)
  pairs = synthetic.topics(synthetic.heldout_pairs(seed))  # the trimmed corpus's topics
  actions = []
  for a, b in spans:
    shape, colour = pairs[rng.integers(len(pairs))]
    obj = dict(shape=shape, colour=colour,
               size=synthetic.SIZES[rng.integers(len(synthetic.SIZES))])
    obj["motion"] = synthetic._sample_motion(rng, shape)
    actions.append(dict(obj, frames=[a, b], segment=[a / fps, b / fps],
                        label=synthetic.MOTIONS.index(obj["motion"]),
                        track=synthetic._track(rng, obj, image_size)))
  bg = synthetic._background(rng, image_size)
  frames = []
  for f in range(num_frames):
    noise = rng.normal(0.0, 3.0, (image_size, image_size, 1)).astype(np.float32)
    img = Image.fromarray(np.clip(bg + noise, 0, 255).astype(np.uint8))
    for act in actions:
      a, b = act["frames"]
      if a <= f < b:  # the motion runs from t = 0 at its first frame to 1 at its last
        t = (f - a) / (b - a - 1) if b - a > 1 else 0.0
        pose = synthetic._pose(act["track"], act["motion"], t)
        img.paste(synthetic.COLOURS[act["colour"]], (0, 0),
                  synthetic._shape_mask(act["shape"], *pose, image_size))
    frames.append(_frame_jpeg(img))
  # Own rng stream: the wording does not move the pixels.
  words = np.random.default_rng([seed, _STREAM, SPLITS.index(split), index, 0xCA])
  phrases = []
  for act in actions:
    p = synthetic._noun_phrase(words, act)
    phrases.append(f"{p['np']} {p['verb']}")
  for act in actions:
    del act["track"]
  return dict(video_id=f"untrimmed-{split}-{index:06d}", frames=frames, fps=float(fps),
              num_frames=num_frames, actions=actions, caption=", then ".join(phrases))


def video_record(video: dict):
  """The `tf.train.SequenceExample` of a rendered video (module docstring)."""
  from vlp_jax.data import records  # noqa: PLC0415  (tensorflow only where records are written)
  acts = video["actions"]
  objects = [{k: a[k] for k in ("shape", "colour", "size", "motion")} for a in acts]
  return records.clip_example(
      video["video_id"], video["frames"], [video["caption"]], video["fps"],
      entities=list(dict.fromkeys(a["shape"] for a in acts)), start_us=0,
      end_us=int(round(video["num_frames"] / video["fps"] * 1e6)),
      extra={SEGMENT_START: [float(a["segment"][0]) for a in acts],
             SEGMENT_END: [float(a["segment"][1]) for a in acts],
             SEGMENT_LABEL: [int(a["label"]) for a in acts],
             "synthetic/attributes": [json.dumps(objects, sort_keys=True).encode()]})


def noisy_oracle_proposals(ground_truth: Iterable[Sequence], seed: int, *,
                           durations: Mapping[str, float], copies: int = 5,
                           jitter: float = 0.1, num_false: int = 3,
                           false_length: tuple[float, float] = (0.05, 0.3),
                           false_score: float = 0.3) -> dict[str, list[dict]]:
  """Class-agnostic proposals that a proposal network of known quality might output.

  For each ground-truth segment [s, e] of length L = e - s and centre c, `copies` jittered
  copies: centre c + L * jitter * n1 (clipped to the video), length L * exp(jitter * n2),
  n1, n2 ~ N(0, 1), then clipped to [0, duration]. So the boundary noise is proportional to
  the segment's length, and `jitter` = 0 gives exact copies. A copy's score is
  exp(-(|centre shift| / L + |log length ratio|)): 1 for an exact copy, decreasing as the
  jitter grows. Plus `num_false` false proposals per video: length duration x U(false_length),
  uniform position, score U(0, false_score). Each video draws from its own generator
  (seed, crc32(video id)), so a video's proposals do not depend on the others.

  Args:
    ground_truth: records (video_id, start, end, label) in seconds (the label is unused).
    seed: seed of the draws.
    durations: {video_id: seconds} of every video to propose for (videos without ground
      truth get false proposals only); every ground-truth video must be there.
    copies, jitter, num_false, false_length, false_score: as above.

  Returns:
    {video_id: [{"segment": [start, end], "score": p}, ...] in descending score}, every
    segment with end > start (`write_proposals` writes it as ActivityNet-style JSON).
  """
  if copies < 0 or num_false < 0 or jitter < 0:
    raise ValueError(f"copies ({copies}), num_false ({num_false}) and jitter ({jitter}) must "
                     "be >= 0")
  by_video: dict[str, list[tuple[float, float]]] = {v: [] for v in durations}
  for rec in ground_truth:
    video, start, end = str(rec[0]), float(rec[1]), float(rec[2])
    if video not in by_video:
      raise ValueError(f"ground-truth video {video!r} has no duration")
    by_video[video].append((start, end))
  out = {}
  for video, segments in by_video.items():
    duration = float(durations[video])
    rng = np.random.default_rng([seed, zlib.crc32(video.encode("utf-8"))])
    props = []
    for start, end in segments:
      length, centre = end - start, (start + end) / 2
      for _ in range(copies):
        n1, n2 = rng.standard_normal(2)
        log_ratio = jitter * n2
        shift = min(max(centre + length * jitter * n1, 0.0), duration) - centre
        grow = length * (math.exp(log_ratio) - 1) / 2  # per side; 0 keeps [s, e] exact
        a, b = max(start + shift - grow, 0.0), min(end + shift + grow, duration)
        if b > a:
          props.append(([a, b], math.exp(-(abs(shift) / length + abs(log_ratio)))))
    for _ in range(num_false):
      length = duration * rng.uniform(*false_length)
      a = rng.uniform(0.0, max(duration - length, 0.0))
      props.append(([a, min(a + length, duration)], float(rng.uniform(0.0, false_score))))
    props.sort(key=lambda p: -p[1])
    out[video] = [{"segment": [float(a), float(b)], "score": float(s)} for (a, b), s in props]
  return out


def write_proposals(path: str, proposals: Mapping[str, list[dict]]) -> None:
  """Writes {"version", "results": proposals, "external_data"} (ActivityNet's layout),
  atomically."""
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump({"version": "class-agnostic proposals", "results": dict(proposals),
               "external_data": {"used": False}}, f)
  os.replace(tmp, path)


def generate(out_dir: str, *, seed: int = 0, counts: Mapping[str, int],
             min_frames: int = 48, max_frames: int = 64, image_size: int = 40,
             fps: float = FPS, max_actions: int = 3, min_len: int = 8, max_len: int = 16,
             min_gap: int = 4, num_shards: int = 2, copies: int = 5, jitter: float = 0.1,
             num_false: int = 3) -> dict:
  """Writes the untrimmed corpus and its proposals (module docstring).

  Args:
    out_dir: output directory; shards of other writers there are not overwritten.
    seed: corpus seed (the proposals draw from seed + split number).
    counts: {split: videos} over `SPLITS`; 0 = no such split.
    min_frames .. min_gap: `render_video`'s sizes.
    num_shards: files per split.
    copies, jitter, num_false: `noisy_oracle_proposals`.

  Returns:
    {"dir", "counts", "segments" per split, "proposals" per split, "seconds"}.

  Raises:
    ValueError: an unknown split. FileExistsError: out_dir holds shards it did not write.
  """
  from vlp_jax.data import records, tokenizer  # noqa: PLC0415  (see video_record)
  start = time.time()
  unknown = sorted(set(counts) - set(SPLITS))
  if unknown:
    raise ValueError(f"unknown split(s) {unknown}; choose from {SPLITS}")
  os.makedirs(out_dir, exist_ok=True)
  meta_path = os.path.join(out_dir, META_FILE)
  shards = [f for f in os.listdir(out_dir) if f.endswith(".tfrecord")]
  if shards and not os.path.exists(meta_path):
    raise FileExistsError(f"{out_dir!r} holds TFRecord shards not written by the untrimmed "
                          "generator; refusing to overwrite them")
  sizes = dict(min_frames=min_frames, max_frames=max_frames, image_size=image_size, fps=fps,
               max_actions=max_actions, min_len=min_len, max_len=max_len, min_gap=min_gap)
  summary = dict(dir=out_dir, counts={}, segments={}, proposals={})
  for split, n in counts.items():
    if not n:
      continue
    for f in shards:  # e.g. another num_shards last time: would be read as extra files
      if f.startswith(f"{split}-"):
        records.remove_shard(os.path.join(out_dir, f))
    truth, durations = [], {}
    with records.ShardedWriter(out_dir, split, num_shards) as writer:
      for i in range(int(n)):
        video = render_video(seed, split, i, **sizes)
        writer.write(video_record(video))
        durations[video["video_id"]] = video["num_frames"] / video["fps"]
        truth += [(video["video_id"], *a["segment"], a["label"]) for a in video["actions"]]
    proposals = noisy_oracle_proposals(truth, seed + SPLITS.index(split), durations=durations,
                                       copies=copies, jitter=jitter, num_false=num_false)
    write_proposals(os.path.join(out_dir, PROPOSALS_FILE.format(split=split)), proposals)
    summary["counts"][split] = int(n)
    summary["segments"][split] = len(truth)
    summary["proposals"][split] = sum(len(p) for p in proposals.values())
  with open(os.path.join(out_dir, CLASSES_FILE), "w", encoding="utf-8") as f:
    f.write("\n".join(synthetic.LABEL_TEXT[m] for m in synthetic.MOTIONS) + "\n")
  tokenizer.write_vocab(os.path.join(out_dir, "vocab.txt"), tokenizer.synthetic_vocab_words())
  summary["seconds"] = time.time() - start
  with open(meta_path, "w", encoding="utf-8") as f:
    json.dump(dict(seed=int(seed), num_shards=int(num_shards), copies=int(copies),
                   jitter=float(jitter), num_false=int(num_false), **sizes,
                   classes=[synthetic.LABEL_TEXT[m] for m in synthetic.MOTIONS],
                   **{k: summary[k] for k in ("counts", "segments", "proposals")}),
              f, indent=1, sort_keys=True)
  return summary
