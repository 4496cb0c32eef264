"""MAMA's caption augmentation: one generated caption per clip of a split, in a side file.

For each clip: pick keyframes (`keyframes.select`), tile them into a grid (`keyframes.grid`,
3 x 4 for MAMA's 12), caption the grid (a `captioners.Captioner`), clean the text
(`captioners.postprocess`) and append one JSON line to the side file:

  {"video_id": "...", "caption": "...", "captioner": "...", "prompt": "...", "seed": 0,
   "keyframes": [3, 9, ...]}

The records are not rewritten: training adds the side files' captions to each clip's caption
list (`config.data.extra_captions`, read by `vlp_jax.data.setup.read_captions`). A rerun
resumes: clips already in the side file are passed over.
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from absl import logging
from PIL import Image
from tqdm import tqdm

from vlp_jax.data import records
from vlp_jax.data import setup as data_setup
from vlp_jax.methods.mama import keyframes
from vlp_jax.methods.mama.captioners import DEFAULT_PROMPT, Captioner, postprocess


def _resume(out_path: str) -> set[str]:
  """Video ids already in the side file. A half-written last line (an interrupted run) is cut
  off, so its clip is captioned again and appending starts on a fresh line."""
  if not os.path.exists(out_path):
    return set()
  with open(out_path, "rb") as f:
    data = f.read()
  end = data.rfind(b"\n") + 1
  if end < len(data):
    logging.warning("%s: dropping a half-written last line (%d bytes)", out_path,
                    len(data) - end)
    with open(out_path, "r+b") as f:
      f.truncate(end)
  return set(data_setup.read_captions(out_path))


def _clips(files: Sequence[str], unreadable: list[str]) -> Iterator[dict]:
  """Decoded records (`records.example_to_dict`) of the shards, in order; a shard that cannot
  be read is named in `unreadable` and passed over."""
  for path in files:
    try:
      serialized = records.read_records(path)
    except Exception as e:  # a corrupt shard must not stop the other shards
      logging.warning("shard %s cannot be read (%s: %s); its clips are left out", path,
                      type(e).__name__, e)
      unreadable.append(path)
      continue
    for record in serialized:
      yield records.example_to_dict(record)


def decode_frames(clip: dict) -> np.ndarray:
  """uint8 [N, H, W, 3] frames of a decoded record (`video/num_frames` of them when set).

  Raises:
    ValueError: no frames, or frames of different sizes.
    OSError: a frame that is not a readable image.
  """
  jpegs = clip[records.FRAMES]
  declared = int((clip.get(records.NUM_FRAMES) or [0])[0])
  n = min(declared, len(jpegs)) if declared > 0 else len(jpegs)
  if n == 0:
    raise ValueError("the clip has no frames")
  return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in jpegs[:n]])


def _caption(captioner: Captioner, images: list[Image.Image], prompt: str,
             seed: int) -> list[tuple[Any, str | None]]:
  """(raw caption, None) or (None, reason) per image. A batch that fails is retried image by
  image, so one bad clip costs only itself."""
  def call(batch):
    out = list(captioner(batch, prompt=prompt, seed=seed))
    if len(out) != len(batch):
      raise ValueError(f"the captioner returned {len(out)} captions for {len(batch)} images")
    return out

  try:
    return [(text, None) for text in call(images)]
  except Exception as e:  # any captioner error: retried, then reported
    if len(images) == 1:
      return [(None, f"{type(e).__name__}: {e}")]
    logging.warning("captioner failed on a batch of %d (%s: %s); retrying clip by clip",
                    len(images), type(e).__name__, e)
  results = []
  for image in images:
    try:
      results.append((call([image])[0], None))
    except Exception as e:
      results.append((None, f"{type(e).__name__}: {e}"))
  return results


def augment(data_dir: str, split: str, captioner: Captioner, *, out_path: str,
            keyframe_method: str = "difference", num_keyframes: int = 12, rows: int = 3,
            cols: int = 4, batch_size: int = 8, prompt: str = DEFAULT_PROMPT, seed: int = 0,
            limit: int | None = None, progress: bool = True) -> dict[str, Any]:
  """Captions the clips of `split` in `data_dir` and appends them to the side file `out_path`.

  Clips already in `out_path` are passed over (a half-written last line is redone). A clip
  whose frames cannot be decoded, or for which the captioner raises or returns an empty
  caption (after `postprocess`), is skipped and listed in `out_path + ".skipped.jsonl"`
  (`video_id`, `reason`; rewritten by every run, so a rerun retries those clips).

  Args:
    data_dir, split: record shards `<split>-XXXXX-of-XXXXX.tfrecord` in `data_dir`.
    captioner: see `captioners.Captioner`; called on batches of PIL grid images.
    out_path: the side file (JSONL), created when missing.
    keyframe_method, num_keyframes: see `keyframes.select`.
    rows, cols: grid layout; rows * cols == num_keyframes.
    batch_size: grids per captioner call.
    prompt, seed: passed to the captioner and recorded on every line.
    limit: caption at most this many clips in this run (those already done do not count).
    progress: show a tqdm progress bar.

  Returns:
    {"captioned", "skipped", "already_done", "total" (clips visited: the sum of the three),
     "out", "skipped_file", "unreadable_shards" (shards that could not be read)}.

  Raises:
    FileNotFoundError: no shards of `split` in `data_dir`.
    ValueError: bad keyframe settings or batch size, or a malformed line in `out_path`.
  """
  if keyframe_method not in keyframes.METHODS:
    raise ValueError(f"unknown keyframe method {keyframe_method!r}; expected one of "
                     f"{keyframes.METHODS}")
  if rows * cols != num_keyframes:
    raise ValueError(f"a {rows} x {cols} grid holds {rows * cols} frames, not "
                     f"num_keyframes={num_keyframes}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  files = records.split_files(data_dir, split)
  done = _resume(out_path)
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  skipped_path = out_path + ".skipped.jsonl"
  name = getattr(captioner, "name", type(captioner).__name__)
  counts = dict(captioned=0, skipped=0, already_done=0)
  unreadable: list[str] = []
  seen = set(done)
  bar = tqdm(total=records.expected_count(data_dir, split), disable=not progress,
             unit="clip", desc=f"captioning {split}")

  with open(out_path, "a", encoding="utf-8") as out, \
      open(skipped_path, "w", encoding="utf-8") as skipped:

    def skip(video_id: str, reason: str) -> None:
      logging.warning("clip %s skipped: %s", video_id, reason)
      skipped.write(json.dumps(dict(video_id=video_id, reason=reason), ensure_ascii=False)
                    + "\n")
      counts["skipped"] += 1

    def flush(batch: list[tuple[str, Image.Image, np.ndarray]]) -> None:
      results = _caption(captioner, [image for _, image, _ in batch], prompt, seed)
      for (video_id, _, idx), (text, error) in zip(batch, results):
        if error is None and not isinstance(text, str):
          error = f"the captioner returned {type(text).__name__}, not text"
        caption = postprocess(text, prompt) if error is None else ""
        if error is None and not caption:
          error = "empty caption"
        if error is not None:
          skip(video_id, error)
          continue
        row = dict(video_id=video_id, caption=caption, captioner=name, prompt=prompt,
                   seed=int(seed), keyframes=[int(i) for i in idx])
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
        counts["captioned"] += 1
      # Whole lines only, one batch at a time: an interruption loses at most this batch.
      out.flush()
      skipped.flush()

    batch = []
    attempted = 0
    for clip in _clips(files, unreadable):
      video_id = clip[records.VIDEO_ID][0].decode("utf-8")
      if video_id in seen:
        counts["already_done"] += 1
        bar.update(1)
        continue
      if limit is not None and attempted >= limit:
        break
      seen.add(video_id)
      attempted += 1
      bar.update(1)
      try:
        frames = decode_frames(clip)
        idx = keyframes.select(frames, num_keyframes, keyframe_method)
        image = Image.fromarray(keyframes.grid(frames[idx], rows, cols))
      except (OSError, ValueError) as e:
        skip(video_id, f"frames: {type(e).__name__}: {e}")
        continue
      batch.append((video_id, image, idx))
      if len(batch) == batch_size:
        flush(batch)
        batch = []
    if batch:
      flush(batch)
  bar.close()
  total = counts["captioned"] + counts["skipped"] + counts["already_done"]
  return dict(counts, total=total, out=out_path, skipped_file=skipped_path,
              unreadable_shards=unreadable)
