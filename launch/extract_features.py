"""Encode every stored frame of record splits with a frozen CLIP image tower, into a feature
cache (`vlp_jax/data/feature_cache.py`: format and reader).

  python -m launch.extract_features --clip=hf:DIR --data_dir=D --split=S[,S2] --out=OUT \\
      [--batch_size=256 --image_size=224 --workers=8]

--clip: a local `transformers` CLIPModel directory (`hf:` prefix optional). --image_size: the
tower's input side (default: the checkpoint's; another size interpolates the position
embeddings). The feature is CLIP's projected image embedding before L2 normalisation.

Frames are decoded on `--workers` threads as the input pipeline's evaluation path decodes
them, batched `--batch_size` frames at a time over a 1-D mesh of this process's devices (the
last batch of an input shard is padded, the padding dropped), and written one output shard per
input shard, atomically, when that input shard is done. Several processes
(`--coordinator=HOST:PORT --num_processes=N --process_id=I`, or `--distributed`): process i
takes input shards i, i + N, ...

Resume: a rerun skips every output shard already written with the same metadata and redoes
the others; a rerun into the same OUT with another checkpoint or preprocessing stops with a
message naming the differing fields. Corrupt records, frames that cannot be decoded and
truncated shards are skipped, logged, counted in the summary and listed in OUT/skipped.jsonl;
an input shard that cannot be read at all gets no output shard and is retried by the next run.
The summary (clips, frames, skipped, seconds, frames_per_s, per-split totals) is printed as
JSON on the last line.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags, logging

from launch import common

FLAGS = flags.FLAGS


def define_flags() -> None:
  # Defined when run as a program only, so tests can import `extract` next to other entry
  # points' flags.
  flags.DEFINE_string("clip", None, "CLIP checkpoint: hf:DIR, a transformers CLIPModel dir.")
  flags.DEFINE_string("data_dir", None, "Directory of the record shards.")
  flags.DEFINE_string("split", None, "Split(s) to encode, comma-separated.")
  flags.DEFINE_string("out", None, "Feature cache directory.")
  flags.DEFINE_integer("batch_size", 256, "Frames per batch, over all of this process's "
                       "devices (rounded up to a multiple of their number).")
  flags.DEFINE_integer("image_size", None, "Image tower input side (default: the checkpoint's).")
  flags.DEFINE_integer("workers", min(8, os.cpu_count() or 1), "Frame decoding threads.")
  flags.DEFINE_integer("chunk_frames", 32, "Frames decoded per task (bounds host memory).")
  flags.DEFINE_boolean("progress", True, "Show a progress bar.")
  flags.mark_flags_as_required(["clip", "data_dir", "split", "out"])
  common.define_distributed_flags()


@functools.cache
def _encode_fn():
  import jax

  # The module is static: one compiled program per (config, batch shape, sharding).
  return jax.jit(lambda module, params, pixels: module.apply(
      {"params": params}, pixels, method="encode_image"), static_argnums=0)


class _Encoder:
  """The frozen image tower, replicated over a 1-D mesh of `devices`; frames sharded on rows."""

  def __init__(self, clip_dir: str, image_size: int, devices: Sequence, batch_size: int):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from vlp_jax.convert import clip as convert_clip
    self.module, params = convert_clip.import_clip(clip_dir, image_size=image_size)
    n = len(devices)
    self.batch_size = -(-batch_size // n) * n
    if self.batch_size != batch_size:
      logging.info("batch_size %d rounded up to %d (a multiple of %d devices)", batch_size,
                   self.batch_size, n)
    mesh = Mesh(np.asarray(devices, dtype=object), ("data",))
    self._rows = NamedSharding(mesh, PartitionSpec("data"))
    self._params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    self._put = jax.device_put

  def dispatch(self, frames: np.ndarray) -> tuple[Any, int]:
    """Starts encoding float32 `[n <= batch_size, S, S, 3]` frames; -> (handle, n)."""
    n = len(frames)
    if n < self.batch_size:  # a fixed batch shape: one compiled program
      pad = np.zeros((self.batch_size - n,) + frames.shape[1:], frames.dtype)
      frames = np.concatenate([frames, pad])
    pixels = self._put(frames, self._rows)
    return _encode_fn()(self.module, self._params, pixels), n

  @staticmethod
  def fetch(handle: tuple[Any, int]) -> np.ndarray:
    """float32 `[n, D]` features of a dispatched batch, padding dropped."""
    out, n = handle
    return np.asarray(out)[:n]


@dataclasses.dataclass(eq=False)
class _ClipState:
  source: Any  # feature_cache.SourceClip
  chunks_left: int
  rows_sent: int = 0
  rows_done: int = 0
  failed: str | None = None
  parts: list = dataclasses.field(default_factory=list)

  def finished(self) -> bool:
    return self.chunks_left == 0 and (self.failed is not None or
                                      self.rows_done == self.rows_sent)


def _extract_shard(path: str, split: str, stem: str, encoder: _Encoder,
                   pool: concurrent.futures.Executor, *, image_size: int, chunk_frames: int,
                   lookahead: int, bar) -> tuple[list, list, dict, bool]:
  """Encodes one input shard.

  Returns:
    (kept `CachedClip`s, their (start_us, end_us), report, readable): `readable` is False
    when the shard could not be read at all (no output shard is written for it).
  """
  from vlp_jax.data import feature_cache as fc
  stream = fc.RecordStream(path)
  skipped: list[dict] = []

  def skip(index, video_id: str, reason: str, clips: int = 1) -> None:
    logging.warning("split %r, shard %s, record %s (%r) skipped: %s", split, stem, index,
                    video_id, reason)
    skipped.append(dict(split=split, shard=stem, index=index, id=video_id, reason=reason,
                        clips=int(clips)))

  def units():
    """(clip state, future of its next decoded chunk), clip after clip, in record order."""
    for index, record in stream:
      bar.update(1)
      try:
        source = fc.parse_record(record, index)
      except fc.RecordError as e:
        skip(index, e.video_id, str(e))
        continue
      try:
        window, png = fc.crop_window(source.frames[0])
      except ValueError as e:
        skip(index, source.video_id, str(e))
        continue
      t = len(source.frames)
      state = _ClipState(source, chunks_left=-(-t // chunk_frames))
      for a in range(0, t, chunk_frames):
        yield state, pool.submit(fc.decode_frames, source.frames[a:a + chunk_frames], window,
                                 png, image_size, a)

  order: collections.deque[_ClipState] = collections.deque()
  pending: collections.deque = collections.deque()
  buf: list[tuple[_ClipState, np.ndarray]] = []
  buf_rows = 0
  inflight: list = []  # at most one dispatched batch: decoding overlaps the device's work
  kept, stamps = [], []
  it = units()

  def fill():
    while len(pending) < lookahead:
      nxt = next(it, None)
      if nxt is None:
        return
      pending.append(nxt)

  def resolve():
    handle, owners = inflight.pop()
    feats = _Encoder.fetch(handle)
    a = 0
    for state, k in owners:
      state.parts.append(feats[a:a + k])
      state.rows_done += k
      a += k

  def run(rows: int):
    nonlocal buf_rows
    frames, owners, taken = [], [], 0
    while taken < rows:
      state, arr = buf[0]
      k = min(len(arr), rows - taken)
      frames.append(arr[:k])
      owners.append((state, k))
      if k == len(arr):
        buf.pop(0)
      else:
        buf[0] = (state, arr[k:])
      taken += k
    buf_rows -= taken
    handle = encoder.dispatch(np.concatenate(frames))
    if inflight:
      resolve()
    inflight.append((handle, owners))

  def emit():
    while order and order[0].finished():
      state = order.popleft()
      s = state.source
      if state.failed is not None:
        skip(s.index, s.video_id, state.failed)
        continue
      feats = np.concatenate(state.parts).astype(fc.FEATURE_DTYPE)
      kept.append(fc.CachedClip(s.video_id, feats, s.label, s.fps))
      stamps.append((s.start_us, s.end_us))

  try:
    fill()
    while pending:
      state, future = pending.popleft()
      fill()
      if not order or order[-1] is not state:
        order.append(state)
      try:
        frames = future.result()
      except ValueError as e:
        state.failed = state.failed or str(e)
        frames = None
      state.chunks_left -= 1
      if frames is not None and state.failed is None:
        buf.append((state, frames))
        buf_rows += len(frames)
        state.rows_sent += len(frames)
      while buf_rows >= encoder.batch_size:
        run(encoder.batch_size)
      emit()
    while buf_rows:
      run(min(encoder.batch_size, buf_rows))
    if inflight:
      resolve()
    emit()
  finally:
    for _, future in pending:
      future.cancel()
    it.close()

  readable = True
  lost = stream.lost()
  if stream.error is not None:
    readable = not stream.fatal
    what = "unreadable shard" if stream.fatal else "corrupt shard"
    count = lost if lost is not None else 1
    note = "" if lost is not None else " (at least 1 record; the shard has no manifest)"
    skip(None if stream.fatal else stream.count, "",
         f"{what}: {stream.error}, after {stream.count} records{note}", count)
  elif lost:
    skip(stream.count, "", f"corrupt shard: ends {lost} records before its manifest's count",
         lost)
  skipped.sort(key=lambda e: -1 if e["index"] is None else e["index"])
  report = dict(records=stream.count, clips=len(kept),
                frames=int(sum(len(c.features) for c in kept)), skipped=skipped)
  return kept, stamps, report, readable


def _barrier(name: str) -> None:
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def extract(clip: str, data_dir: str, splits: Sequence[str], out_dir: str, *,
            batch_size: int = 256, image_size: int | None = None, workers: int = 8,
            chunk_frames: int = 32, devices: Sequence | None = None,
            progress: bool = False) -> dict:
  """Encodes every stored frame of `splits` of `data_dir` into the feature cache `out_dir`.

  Args:
    clip: a `transformers` CLIPModel directory ("hf:DIR" or DIR).
    data_dir: the record shards' directory.
    splits: split names.
    out_dir: the cache directory (created; an existing one must match, see module doc).
    batch_size: frames per device batch (rounded up to a multiple of the devices).
    image_size: the image tower's input side (None = the checkpoint's).
    workers: frame decoding threads.
    chunk_frames: frames decoded per task.
    devices: this process's devices to shard the batch over (default: all local ones).
    progress: show a progress bar.

  Returns:
    Summary: `clips`, `frames`, `skipped` (clips this run encoded / skipped), `shards_written`,
    `shards_resumed` (already complete), `shards_failed` (unreadable, retried next run),
    `seconds`, `frames_per_s`, `devices`, `batch_size`, `process`, and on process 0
    `splits`: each split's totals over the whole cache (`feature_cache.finish_split`).

  Raises:
    ValueError: bad arguments, a checkpoint that is not CLIP, or an existing cache made with
      another checkpoint / preprocessing / source (the message names the fields).
    FileNotFoundError: no such data directory, split or checkpoint weights.
  """
  import jax
  from tqdm import tqdm

  from vlp_jax.data import feature_cache as fc
  from vlp_jax.data import records

  start = time.time()
  clip_dir = clip[len("hf:"):] if clip.startswith("hf:") else clip
  splits = list(dict.fromkeys(s.strip() for s in splits if s.strip()))
  if not splits:
    raise ValueError("no split given")
  for name, value in (("batch_size", batch_size), ("workers", workers),
                      ("chunk_frames", chunk_frames)):
    if value < 1:
      raise ValueError(f"{name} must be >= 1, got {value}")
  devices = list(jax.local_devices() if devices is None else devices)
  pi, pc = jax.process_index(), jax.process_count()

  metadata = fc.describe(clip_dir, image_size=image_size)
  metadata["source"] = fc.describe_source(data_dir, splits)
  metadata = fc.prepare(out_dir, metadata, write=pi == 0)
  _barrier("extract_features:prepare")
  identity = fc.identity_digest(metadata)
  size = int(metadata["preprocessing"]["image_size"])
  dim = int(metadata["feature"]["dim"])
  stems = {s: metadata["source"]["splits"][s]["shards"][pi::pc] for s in splits}
  todo = {s: [t for t in stems[s] if not fc.shard_done(out_dir, s, t, identity)]
          for s in splits}
  resumed = sum(len(stems[s]) - len(todo[s]) for s in splits)
  counts = collections.Counter()
  encoder = None
  if any(todo.values()):
    encoder = _Encoder(clip_dir, size, devices, batch_size)
    logging.info("process %d/%d: %d input shards to encode (%d done before) on %d devices",
                 pi, pc, sum(map(len, todo.values())), resumed, len(devices))
  manifests = [records.read_manifest(os.path.join(data_dir, t + ".tfrecord"))
               for s in splits for t in todo[s]]
  total = (sum(int(m["records"]) for m in manifests) if all(manifests) else None)
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
      total=total, unit="clip", desc="extract", disable=not progress or encoder is None,
      dynamic_ncols=True) as bar:
    for split in splits:
      for stem in todo[split]:
        path = os.path.join(data_dir, stem + ".tfrecord")
        kept, stamps, report, readable = _extract_shard(
            path, split, stem, encoder, pool, image_size=size, chunk_frames=chunk_frames,
            lookahead=2 * workers + 2, bar=bar)
        if readable:
          fc.write_shard(out_dir, split, stem, kept, identity=identity, report=report,
                         dim=dim, timestamps=stamps)
          counts["shards_written"] += 1
        else:
          fc.write_failed(out_dir, split, stem, report)
          counts["shards_failed"] += 1
        counts["clips"] += report["clips"]
        counts["frames"] += report["frames"]
        counts["skipped"] += sum(e["clips"] for e in report["skipped"])
        logging.info("split %r shard %s: %d clips, %d frames, %d skipped", split, stem,
                     report["clips"], report["frames"], len(report["skipped"]))
  _barrier("extract_features:done")
  seconds = time.time() - start
  summary = dict(out=out_dir, clips=counts["clips"], frames=counts["frames"],
                 skipped=counts["skipped"], shards_written=counts["shards_written"],
                 shards_resumed=resumed, shards_failed=counts["shards_failed"],
                 seconds=round(seconds, 2),
                 frames_per_s=round(counts["frames"] / max(seconds, 1e-9), 1),
                 devices=len(devices),
                 batch_size=encoder.batch_size if encoder is not None else batch_size,
                 process=f"{pi}/{pc}")
  if pi == 0:
    summary["splits"] = {s: fc.finish_split(out_dir, s) for s in splits}
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.setup(FLAGS)
  try:
    summary = extract(FLAGS.clip, FLAGS.data_dir, FLAGS.split.split(","), FLAGS.out,
                      batch_size=FLAGS.batch_size, image_size=FLAGS.image_size,
                      workers=FLAGS.workers, chunk_frames=FLAGS.chunk_frames,
                      progress=FLAGS.progress)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"extract_features: {e}")
  print(json.dumps(summary))


if __name__ == "__main__":
  define_flags()
  app.run(main)
