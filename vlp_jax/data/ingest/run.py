"""An ingestion run: clips -> worker processes decode -> the parent writes TFRecord shards.

Clip i of the annotation list goes to shard `i % num_shards` (the round robin of
`records.ShardedWriter`), so the assignment does not depend on what has been done before.
Shards are produced one after another; each is written under a temporary name and renamed
when complete, after its report (`OUT/.ingest/<shard file>.json`: counts, skipped and partial
clips) has been saved. A rerun skips every shard whose file and report exist, so an
interrupted run resumes where it stopped; a rerun with other settings, another shard count
or other annotations stops with an error instead of mixing shards (`overwrite=True` redoes
the split).

Workers (`workers > 0`) are spawned processes that only decode (PyAV, Pillow): they send JPEG
bytes back, and the parent builds and writes the records in clip order, so the output is
identical for any number of workers. A worker that dies (e.g. the decoder crashes on a
malformed file) breaks the pool without hanging it: the clips then in flight are retried one
at a time in a fresh pool, and the one that kills its worker again is skipped.

Outputs in `out_dir`, besides the shards: `skipped.jsonl` and `partial.jsonl` (one JSON object
per clip: split, index, id, video, source, reason; entries of other splits are kept),
`vocab.txt` and `ingest.json` (a summary per split).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import glob
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import time
from concurrent.futures.process import BrokenProcessPool
from collections.abc import Callable, Iterable, Iterator
from tqdm import tqdm

from vlp_jax.data import classes as classes_lib
from vlp_jax.data import records, tokenizer
from vlp_jax.data.ingest import decode
from vlp_jax.data.ingest.annotations import Annotations, Clip

STATE_DIR = ".ingest"
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
WORKER_DIED = "decoder crashed: the worker process died"
WORKER_TIMEOUT = "decoder timed out: the worker was killed"


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def _read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
  # spawn: the parent runs TF threads; forking such a process can deadlock.
  return concurrent.futures.ProcessPoolExecutor(
      max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def _kill(pool: concurrent.futures.ProcessPoolExecutor) -> None:
  """Stops a pool whose worker hangs: shutdown alone would wait for it forever."""
  for proc in list(getattr(pool, "_processes", {}).values()):
    proc.kill()
  pool.shutdown(wait=False, cancel_futures=True)


def ordered_results(jobs: Iterable, fn: Callable, workers: int,
                    timeout: float | None = None) -> Iterator:
  """`fn(job)` for every job, in job order; `workers` spawned processes (0 = in-process).

  A job whose worker process dies yields `WORKER_DIED` (a skip reason) instead of a result;
  one that has not finished `timeout` seconds after the results before it yields
  `WORKER_TIMEOUT`, its worker killed (None = wait forever; in-process jobs cannot time out).
  """
  if workers <= 0:
    for job in jobs:
      yield fn(job)
    return
  end = object()
  jobs = iter(jobs)
  window = 2 * workers + 2
  pending: collections.deque = collections.deque()
  pool = _pool(workers)
  try:
    while True:
      while len(pending) < window:
        job = next(jobs, end)
        if job is end:
          break
        try:
          future = pool.submit(fn, job)
        except BrokenProcessPool:
          future = None  # handled with the others in flight below
        pending.append((job, future))
      if not pending:
        return
      job, future = pending.popleft()
      try:
        if future is None:
          raise BrokenProcessPool("the pool broke before submission")
        result = future.result(timeout=timeout)
      except (BrokenProcessPool, concurrent.futures.TimeoutError):
        # Which clip killed or hung its worker is unknown: rerun the clips in flight one by
        # one, each with the full timeout.
        retry = [job] + [j for j, _ in pending]
        pending.clear()
        _kill(pool)
        pool = _pool(workers)
        for j in retry:
          try:
            result = pool.submit(fn, j).result(timeout=timeout)
          except (BrokenProcessPool, concurrent.futures.TimeoutError) as e:
            result = WORKER_DIED if isinstance(e, BrokenProcessPool) else WORKER_TIMEOUT
            _kill(pool)
            pool = _pool(workers)
          yield result
        continue
      yield result
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


def _digest(clips: list[Clip]) -> str:
  h = hashlib.sha256()
  for c in clips:
    h.update(repr(c).encode())  # the dataclass repr lists every field but the two below
    if c.segments is not None or c.alt_videos:
      h.update(repr((c.segments, c.alt_videos)).encode())
  return h.hexdigest()


def _split_files(out_dir: str, split: str) -> list[str]:
  try:
    return records.split_files(out_dir, split)
  except FileNotFoundError:
    return []


def _report_path(out_dir: str, split: str, shard: int, num_shards: int) -> str:
  return os.path.join(out_dir, STATE_DIR, records.shard_name(split, shard, num_shards) + ".json")


def _prepare(out_dir: str, split: str, params: dict, overwrite: bool) -> None:
  """Checks that finished shards in `out_dir` were made with `params`, or clears them."""
  state = os.path.join(out_dir, STATE_DIR)
  params_path = os.path.join(state, f"{split}.params.json")
  existing = _split_files(out_dir, split)
  old = _read_json(params_path)
  if overwrite:
    mine = re.compile(re.escape(split) + r"-\d{5}-of-\d{5}\.tfrecord\.json")
    reports = [p for p in glob.glob(os.path.join(glob.escape(state), "*.json"))
               if mine.fullmatch(os.path.basename(p))]  # not those of split "<split>-x"
    for path in existing:
      records.remove_shard(path)
    for path in reports:
      os.remove(path)
  elif existing and old != params:
    if old is None:
      why = "were not written by this ingestion (no record of their settings in " \
            f"{state!r})"
    else:
      keys = sorted(k for k in set(old) | set(params) if old.get(k) != params.get(k))
      if "settings" in keys:
        keys.remove("settings")
        keys += sorted(k for k in params["settings"]
                       if old.get("settings", {}).get(k) != params["settings"][k])
      why = f"were written with a different {', '.join(keys)}"
    raise FileExistsError(
        f"{len(existing)} shard(s) of split {split!r} in {out_dir!r} {why}; pass "
        "--overwrite to redo the split, or write to another --out")
  os.makedirs(state, exist_ok=True)
  _write_json(params_path, params)


def _vocab(out_dir: str, split: str, clips: list[Clip], vocab: str | None,
           max_words: int) -> dict:
  path = os.path.join(out_dir, "vocab.txt")
  if vocab:
    with open(vocab, encoding="utf-8") as f:
      tokens = [line.rstrip("\n") for line in f]
    missing = [t for t in tokenizer.SPECIAL_TOKENS if t not in tokens]
    if missing:
      raise ValueError(f"vocabulary {vocab!r} lacks the BERT special tokens {missing}")
    if os.path.abspath(vocab) != os.path.abspath(path):
      shutil.copyfile(vocab, path + ".tmp")
      os.replace(path + ".tmp", path)
    return dict(source=os.path.abspath(vocab), size=len(tokens))
  if os.path.exists(path):  # e.g. made with the train split: token ids must not change
    with open(path, encoding="utf-8") as f:
      return dict(source="existing", size=sum(1 for _ in f))
  words = tokenizer.vocab_words((t for c in clips if not c.error for t in c.texts()),
                                max_words=max_words)
  return dict(source=f"words of split {split!r}", size=tokenizer.write_vocab(path, words))


def _entry(split: str, index: int, clip: Clip, video_root: str, reason: str) -> dict:
  video = os.path.join(video_root, clip.dirs[0], clip.video) if clip.video else ""
  return dict(split=split, index=index, id=clip.id, source=clip.source, reason=reason,
              video=video)


def _rewrite_jsonl(path: str, split: str, entries: list[dict]) -> None:
  """Replaces the lines of `split` in a JSONL report, keeping other splits' lines."""
  kept = []
  if os.path.exists(path):
    with open(path) as f:
      kept = [line for line in f if line.strip() and json.loads(line).get("split") != split]
  with open(path + ".tmp", "w") as f:
    f.writelines(kept)
    f.writelines(json.dumps(e, sort_keys=True) + "\n" for e in entries)
  os.replace(path + ".tmp", path)


def _example(clip: Clip, d: decode.Decoded):
  return records.clip_example(
      clip.id, d.frames, list(clip.captions), d.fps, label_index=clip.label_index,
      label_text=clip.label_text,
      questions=None if clip.questions is None else list(clip.questions),
      answers=None if clip.answers is None else list(clip.answers),
      start_us=d.start_us, end_us=d.end_us, segments=clip.segments)


def _write_classes(out_dir: str, classes: list[str]) -> None:
  """OUT/classes.txt (line i = label index i), what `data.classes` = "" reads; every split of
  a directory must share one class list."""
  path = os.path.join(out_dir, classes_lib.CLASSES_FILE)
  if os.path.exists(path):
    have = classes_lib.read_class_names(path)
    if have != list(classes):
      raise ValueError(f"{path} lists {len(have)} classes ({have[:3]}...), this split's "
                       f"annotations {len(classes)} ({list(classes)[:3]}...): ingest splits with "
                       "different class lists into different --out directories")
    return
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write("".join(name + "\n" for name in classes))
  os.replace(tmp, path)


def ingest(ann: Annotations | list[Clip], *, out_dir: str, split: str,
           settings: decode.DecodeSettings, num_shards: int = 8, workers: int = 0,
           vocab: str | None = None, max_vocab_words: int = 30000, overwrite: bool = False,
           progress: bool = True, info: dict | None = None,
           decode_fn: Callable = decode.decode_job, worker_timeout: float | None = 600.0
           ) -> dict:
  """Decodes `ann`'s clips and writes `out_dir/<split>-XXXXX-of-<num_shards>.tfrecord`.

  Args:
    ann: parsed annotations (or a list of clips).
    out_dir: output directory (created).
    split: split name of the shard files.
    settings: how frames are decoded.
    num_shards: number of shard files.
    workers: decoding processes (0 = decode in this process).
    vocab: a `vocab.txt` to copy into `out_dir`; None = keep `out_dir/vocab.txt` if present,
      else build one from this split's text (`tokenizer.vocab_words` + `write_vocab`).
    max_vocab_words: most words of a built vocabulary.
    overwrite: delete this split's shards and reports first (else finished shards are kept
      and must match these settings and clips).
    progress: show a tqdm progress bar.
    info: extra keys for the summary (format, annotation path, ...).
    decode_fn: `decode.decode_job`, or a drop-in replacement (module-level, picklable).
    worker_timeout: seconds a decoding worker may take for one clip before it is killed and the
      clip skipped (`WORKER_TIMEOUT`); None or 0 = no limit (in-process decoding has none).

  Returns:
    The split's summary (also stored under `splits.<split>` in `out_dir/ingest.json`):
    clips, written, skipped, skipped_by_reason, partial, frames, shards, shards_resumed,
    seconds, settings, vocab, classes, plus `info`.

  Raises:
    ValueError: bad arguments. FileExistsError: finished shards made with other settings.
  """
  start_time = time.time()
  clips = ann.clips if isinstance(ann, Annotations) else list(ann)
  classes = ann.classes if isinstance(ann, Annotations) else None
  if not _SPLIT_RE.match(split or ""):
    raise ValueError(f"bad split name {split!r}: use letters, digits, '_', '.', '-'")
  if num_shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {num_shards}")
  if workers < 0:
    raise ValueError(f"workers must be >= 0, got {workers}")
  if vocab and not os.path.isfile(vocab):
    raise FileNotFoundError(f"vocabulary {vocab!r} not found")
  if not os.path.isdir(settings.video_root):
    raise FileNotFoundError(f"video root {settings.video_root!r} is not a directory")
  os.makedirs(out_dir, exist_ok=True)
  setting_values = {k: v for k, v in dataclasses.asdict(settings).items() if k != "video_root"}
  params = dict(version=1, num_shards=num_shards, settings=setting_values,
                clips=_digest(clips))
  _prepare(out_dir, split, params, overwrite)
  vocab_info = _vocab(out_dir, split, clips, vocab, max_vocab_words)

  shards = {s: list(range(s, len(clips), num_shards)) for s in range(num_shards)}
  final = {s: os.path.join(out_dir, records.shard_name(split, s, num_shards)) for s in shards}
  done = [s for s in shards if os.path.exists(final[s]) and
          _read_json(_report_path(out_dir, split, s, num_shards)) is not None]
  todo = [s for s in shards if s not in done]
  jobs = ((clips[i], settings) for s in todo for i in shards[s])
  results = ordered_results(jobs, decode_fn, workers, worker_timeout or None)
  bar = tqdm(total=sum(len(shards[s]) for s in todo), unit="clip", desc=f"ingest {split}",
             disable=not progress, dynamic_ncols=True)
  try:
    for s in todo:
      report = dict(shard=s, written=0, frames=0, skipped=[], partial=[])
      with records.ShardedWriter(out_dir, split, num_shards, shards=[s]) as writer:
        for i in shards[s]:
          result = next(results)
          bar.update(1)
          if isinstance(result, str):
            report["skipped"].append(_entry(split, i, clips[i], settings.video_root, result))
            continue
          writer.write(_example(clips[i], result))
          report["written"] += 1
          report["frames"] += len(result.frames)
          if result.partial:
            report["partial"].append(_entry(split, i, clips[i], settings.video_root,
                                            result.partial))
        # The report lands before the shard's rename: a shard file always has its report.
        _write_json(_report_path(out_dir, split, s, num_shards), report)
  finally:
    results.close()
    bar.close()

  reports = [_read_json(_report_path(out_dir, split, s, num_shards)) for s in shards]
  skipped = sorted((e for r in reports for e in r["skipped"]), key=lambda e: e["index"])
  partial = sorted((e for r in reports for e in r["partial"]), key=lambda e: e["index"])
  _rewrite_jsonl(os.path.join(out_dir, "skipped.jsonl"), split, skipped)
  _rewrite_jsonl(os.path.join(out_dir, "partial.jsonl"), split, partial)
  summary = dict(info or {}, split=split, clips=len(clips),
                 written=sum(r["written"] for r in reports),
                 frames=sum(r["frames"] for r in reports), skipped=len(skipped),
                 skipped_by_reason=dict(collections.Counter(
                     e["reason"].split(":")[0] for e in skipped)),
                 partial=len(partial), shards=num_shards, shards_resumed=len(done),
                 seconds=round(time.time() - start_time, 2), settings=setting_values,
                 video_root=settings.video_root, vocab=vocab_info, classes=classes)
  if classes:
    _write_classes(out_dir, classes)
  meta_path = os.path.join(out_dir, "ingest.json")
  meta = _read_json(meta_path) or {}
  meta.setdefault("splits", {})[split] = summary
  _write_json(meta_path, meta)
  return summary
