"""Per-frame CLIP image features of a record set, computed once: the on-disk cache.

Prompt-CLIP trains on top of a frozen CLIP image tower, so every stored frame of every clip
is encoded once (`python -m launch.extract_features`) and training reads these features
instead of JPEGs. Layout of a cache directory OUT:

  OUT/metadata.json                    what the features are (checked by `open_cache`)
  OUT/skipped.jsonl                    clips that are not in the cache, one JSON object each
  OUT/<split>/<stem>.features.npy      float16 [R, D]: the frames of the shard's clips, clip
                                       after clip, in record order (R = their frame total)
  OUT/<split>/<stem>.index.npz         what the rows are (below); written last
  OUT/<split>/<stem>.failed.json       only while the input shard could not be read

`<stem>` is the input shard's name without `.tfrecord` (`val-00003-of-00008`): one output
shard per input shard. `<stem>.index.npz` (numpy, no pickles) holds, for the N clips kept:

  video_id  str [N]      `video/id`
  label     int64 [N]    `clip/label/index`, -1 when absent
  fps       float32 [N]  `video/fps` (frames per second the frames were stored at), 0 when
                         absent; frame t of a clip is at start_us / 1e6 + t / fps seconds
  start_us, end_us  int64 [N]  `clip/start/timestamp`, `clip/end/timestamp` in the source
                         video (microseconds), -1 when absent
  offset    int64 [N+1]  clip i is rows offset[i]:offset[i+1] of the features
  identity  str []       `identity_digest` of the metadata the shard was written with
  source    str []       the input shard's file name
  report    str []       JSON: records read, clips kept, frames, skipped entries

A clip has T_i rows: every stored frame (the first `video/num_frames` of them when that is
set, as the input pipeline counts them). A feature is CLIP's projected image embedding
(`image_embeds` = visual_projection(post_layernorm(CLS)), HF `get_image_features`), not
L2-normalised, computed in float32 and stored as float16.

Preprocessing (the same as the input pipeline's evaluation path, `pipeline.Loader._decode`):
decode to RGB uint8 (JPEG, or PNG), crop the centred square of side min(H, W), resize it to
image_size x image_size (bilinear, antialiased, `tf.image.resize`; i.e. resize the short
side, centre crop), scale to [0, 1] (/ 255), subtract CLIP's mean and divide by its std per
RGB channel, NHWC.

`metadata.json`:

  format, version         "vlp_jax.feature_cache", 1
  checkpoint              sha256 (over the weight files' names and bytes, `fingerprint`),
                          files, path
  model                   the image tower's sizes, projection_dim, compute dtype
  preprocessing           image_size, crop, resize, channel_order, scale, mean, std, layout
  feature                 kind, dim (= projection_dim D), dtype "float16"
  source                  data_dir, and per split its input shards and record count
  results                 per split: clips, frames, skipped, shards written / total

`skipped.jsonl` lines: {"split", "shard" (stem), "index" (record number in the shard, null
when unknown), "id" ("" when unreadable), "reason" ("undecodable frame: ...", "corrupt record:
...", "no frames: ...", "corrupt shard: ..." for records lost to a truncated or corrupt shard,
"unreadable shard: ..."), "clips" (how many clips the entry stands for)}.

`open_cache(OUT, expect=describe(CLIP_DIR, image_size=...))` refuses a cache made with another
checkpoint, model, preprocessing or feature kind (`IDENTITY`), naming every differing field
with both values. Reading needs numpy only; TensorFlow (records, decoding) and JAX (the
checkpoint's config) are imported by the functions that write or describe.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

FORMAT = "vlp_jax.feature_cache"
VERSION = 1
METADATA = "metadata.json"
SKIPPED = "skipped.jsonl"
FEATURES_SUFFIX = ".features.npy"
INDEX_SUFFIX = ".index.npz"
FAILED_SUFFIX = ".failed.json"
FEATURE_DTYPE = np.float16
# The metadata sections (dotted keys) that define the features; a cache that differs in one
# of them holds other numbers. `checkpoint.path` and `source` do not.
IDENTITY = ("format", "version", "checkpoint.sha256", "model", "preprocessing", "feature")
# CLIP's normalisation (the values of `pipeline.CLIP_MEAN` / `CLIP_STD`, RGB order); kept here
# so that describing a cache needs no TensorFlow.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CachedClip(NamedTuple):
  """One clip of the cache: video_id str, features float16 `[T, D]`, label int (-1 = none),
  fps float (0 = unknown)."""
  video_id: str
  features: np.ndarray
  label: int
  fps: float


# ----------------------------------------------------------------------------- metadata

def fingerprint(clip_dir: str) -> dict:
  """sha256 over the weight files a checkpoint is loaded from (names and bytes).

  The files are those `hf_io.load_pretrained` reads, in its order of preference:
  `model.safetensors`, `model.safetensors.index.json` (+ the shards it names),
  `pytorch_model.bin`, `pytorch_model.bin.index.json` (+ shards). config.json is not hashed
  (its bytes change with the transformers version); the architecture is compared through
  `model` instead.

  Returns:
    {"sha256": hex digest, "files": [file names hashed], "path": absolute directory}.

  Raises:
    FileNotFoundError: no weights file.
  """
  from vlp_jax.convert import hf_io  # noqa: PLC0415  (jax; readers of a cache need numpy only)
  clip_dir = os.path.abspath(os.fspath(clip_dir))
  files = []
  for name in (hf_io.SAFETENSORS_NAME, hf_io.SAFETENSORS_INDEX_NAME, hf_io.TORCH_NAME,
               hf_io.TORCH_INDEX_NAME):
    path = os.path.join(clip_dir, name)
    if os.path.isfile(path):
      files = [name]
      if name.endswith(".index.json"):
        with open(path, encoding="utf-8") as f:
          files += sorted(set(json.load(f).get("weight_map", {}).values()))
      break
  if not files:
    raise FileNotFoundError(f"CLIP checkpoint directory {clip_dir!r} has no weights file")
  h = hashlib.sha256()
  for name in files:
    h.update(name.encode() + b"\0")
    with open(os.path.join(clip_dir, name), "rb") as f:
      for block in iter(functools.partial(f.read, 1 << 24), b""):
        h.update(block)
  return {"sha256": h.hexdigest(), "files": files, "path": clip_dir}


def preprocessing(image_size: int) -> dict:
  """The `preprocessing` section: how frames become the image tower's input (module doc)."""
  return {"image_size": int(image_size), "crop": "centre_square", "resize": "bilinear_antialias",
          "channel_order": "RGB", "scale": "1/255", "mean": list(CLIP_MEAN),
          "std": list(CLIP_STD), "layout": "NHWC"}


def describe(clip_dir: str, *, image_size: int | None = None, dtype: str = "float32") -> dict:
  """The metadata identity of features of `clip_dir`'s image tower (no weights are loaded).

  Args:
    clip_dir: a `transformers` CLIPModel directory.
    image_size: the tower's input size (None = the checkpoint's own).
    dtype: the compute dtype of the tower.

  Returns:
    {"format", "version", "checkpoint", "model", "preprocessing", "feature"}: pass it as
    `open_cache(..., expect=...)`.

  Raises:
    ValueError (`ConversionError`): not a CLIP checkpoint. FileNotFoundError: no weights.
  """
  from vlp_jax.convert import clip as convert_clip  # noqa: PLC0415  (jax, see fingerprint)
  cfg = convert_clip.config_from_dir(clip_dir, image_size=image_size, dtype=dtype)
  model = dataclasses.asdict(cfg.vision)
  model.update(projection_dim=cfg.projection_dim, compute_dtype=cfg.dtype)
  return {"format": FORMAT, "version": VERSION, "checkpoint": fingerprint(clip_dir),
          "model": model, "preprocessing": preprocessing(cfg.vision.image_size),
          "feature": {"kind": "clip_image_embeds_unnormalised", "dim": cfg.projection_dim,
                      "dtype": np.dtype(FEATURE_DTYPE).name}}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


_MISSING = "<missing>"


def _under(key: str, sections: Sequence[str]) -> str | None:
  return next((s for s in sections if key == s or key.startswith(s + ".")), None)


def differences(have: Mapping, expect: Mapping,
                sections: Sequence[str] = IDENTITY) -> list[tuple[str, Any, Any]]:
  """(dotted key, value in `have`, value in `expect`) for every key of the `sections` that
  `expect` names and whose values differ; a section `expect` leaves out is not compared."""
  flat_have, flat_expect = _flatten(have), _flatten(expect)
  named = {s for s in sections if any(_under(k, [s]) for k in flat_expect)}
  keys = sorted(k for k in set(flat_have) | set(flat_expect) if _under(k, sorted(named)))
  return [(k, flat_have.get(k, _MISSING), flat_expect.get(k, _MISSING)) for k in keys
          if flat_have.get(k, _MISSING) != flat_expect.get(k, _MISSING)]


def mismatch_message(where: str, diffs: Sequence[tuple[str, Any, Any]]) -> str:
  """A ValueError message naming each differing field and both values."""
  parts = "; ".join(f"{k}: cache {a!r}, expected {b!r}" for k, a, b in diffs)
  return (f"feature cache {where!r} was made with other settings ({parts}); extract into "
          "another directory, or delete this one")


def identity_digest(metadata: Mapping) -> str:
  """sha256 of the metadata's `IDENTITY` fields; every output shard records the one it was
  written with."""
  flat = _flatten(metadata)
  ident = {k: v for k, v in flat.items() if _under(k, IDENTITY)}
  return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def read_metadata(cache_dir: str) -> dict:
  """OUT/metadata.json. Raises FileNotFoundError naming the directory when there is none."""
  path = os.path.join(cache_dir, METADATA)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{cache_dir!r} is not a feature cache (no {METADATA}); make one "
                            "with python -m launch.extract_features")
  meta = _read_json(path)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path} is not a {FORMAT} metadata file (format {meta.get('format')!r})")
  return meta


# ----------------------------------------------------------------------------- shards

def shard_stem(input_shard: str) -> str:
  """`DIR/val-00003-of-00008.tfrecord` -> `val-00003-of-00008`."""
  name = os.path.basename(input_shard)
  return name[:-len(".tfrecord")] if name.endswith(".tfrecord") else name


def shard_paths(cache_dir: str, split: str, stem: str) -> tuple[str, str]:
  """(features .npy, index .npz) of one output shard."""
  base = os.path.join(cache_dir, split, stem)
  return base + FEATURES_SUFFIX, base + INDEX_SUFFIX


def _failed_path(cache_dir: str, split: str, stem: str) -> str:
  return os.path.join(cache_dir, split, stem + FAILED_SUFFIX)


def _load_index(path: str) -> dict[str, np.ndarray]:
  with np.load(path, allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def shard_done(cache_dir: str, split: str, stem: str, identity: str) -> bool:
  """Whether the output shard is complete and was written with metadata `identity`."""
  features, index = shard_paths(cache_dir, split, stem)
  if not (os.path.isfile(index) and os.path.isfile(features)):
    return False
  try:
    idx = _load_index(index)
    rows = np.load(features, mmap_mode="r").shape[0]
  except (OSError, ValueError, KeyError):
    return False
  return str(idx["identity"]) == identity and int(idx["offset"][-1]) == rows


def write_shard(cache_dir: str, split: str, stem: str, clips: Sequence[CachedClip], *,
                identity: str, report: Mapping, dim: int,
                timestamps: Sequence[tuple[int, int]] | None = None) -> None:
  """Writes one output shard atomically: features, then the index (the commit point).

  Args:
    cache_dir, split, stem: where (`shard_paths`).
    clips: the kept clips in record order; features float `[T_i, dim]` (cast to float16).
    identity: `identity_digest` of the cache's metadata.
    report: JSON-able summary of the input shard (records, skipped entries, ...).
    dim: D, for the shape of an empty shard.
    timestamps: (start_us, end_us) per clip, -1 when absent (None = all absent).
  """
  features_path, index_path = shard_paths(cache_dir, split, stem)
  os.makedirs(os.path.dirname(index_path), exist_ok=True)
  counts = [len(c.features) for c in clips]
  feats = (np.concatenate([np.asarray(c.features, FEATURE_DTYPE) for c in clips]) if clips
           else np.zeros((0, dim), FEATURE_DTYPE))
  if feats.ndim != 2 or feats.shape[1] != dim:
    raise ValueError(f"features of {stem} have shape {feats.shape}, expected [rows, {dim}]")
  stamps = np.asarray(timestamps if timestamps is not None else [(-1, -1)] * len(clips),
                      np.int64).reshape(len(clips), 2)
  index = dict(
      video_id=np.asarray([c.video_id for c in clips], dtype=np.str_).reshape(len(clips)),
      label=np.asarray([c.label for c in clips], np.int64),
      fps=np.asarray([c.fps for c in clips], np.float32),
      start_us=stamps[:, 0], end_us=stamps[:, 1],
      offset=np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64),
      identity=np.asarray(identity), source=np.asarray(stem + ".tfrecord"),
      report=np.asarray(json.dumps(report, sort_keys=True)))
  # np.save / np.savez given a file object keep the name (given a path they append a suffix).
  for path, write in ((features_path, lambda f: np.save(f, feats)),
                      (index_path, lambda f: np.savez(f, **index))):
    with open(path + ".tmp", "wb") as f:
      write(f)
    os.replace(path + ".tmp", path)
  failed = _failed_path(cache_dir, split, stem)
  if os.path.exists(failed):
    os.remove(failed)


def write_failed(cache_dir: str, split: str, stem: str, report: Mapping) -> None:
  """Records an input shard that could not be read (no output shard; a rerun retries it)."""
  path = _failed_path(cache_dir, split, stem)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  _write_json(path, dict(report))


def read_report(cache_dir: str, split: str, stem: str) -> dict | None:
  """The report of an output shard (or of a failed input shard), None when neither exists."""
  _, index = shard_paths(cache_dir, split, stem)
  if os.path.isfile(index):
    with np.load(index, allow_pickle=False) as z:
      return json.loads(str(z["report"]))
  failed = _failed_path(cache_dir, split, stem)
  return _read_json(failed) if os.path.isfile(failed) else None


def prepare(cache_dir: str, metadata: Mapping, *, write: bool = True) -> dict:
  """Checks an existing cache against `metadata`, or starts one; returns the merged metadata.

  `metadata` is `describe(...)` plus `source` (`data_dir`, `splits`: {split: {"shards":
  [stems], "records": int | None}}). An existing OUT/metadata.json must agree on `IDENTITY`,
  on `source.data_dir`, and on the input shards of every split both name; new splits are
  added. Only `write=True` (process 0) writes the file.

  Raises:
    ValueError: a mismatch, naming each differing field and both values.
  """
  path = os.path.join(cache_dir, METADATA)
  merged = json.loads(json.dumps(metadata))
  if os.path.isfile(path):
    old = read_metadata(cache_dir)
    diffs = differences(old, metadata, IDENTITY + ("source.data_dir",))
    new_splits = metadata.get("source", {}).get("splits", {})
    old_splits = old.get("source", {}).get("splits", {})
    for split in sorted(set(new_splits) & set(old_splits)):
      diffs += differences({"source": {"splits": {split: old_splits[split]}}},
                           {"source": {"splits": {split: new_splits[split]}}},
                           (f"source.splits.{split}",))
    if diffs:
      raise ValueError(mismatch_message(cache_dir, diffs))
    merged = dict(old)
    merged["checkpoint"] = dict(old["checkpoint"], path=metadata["checkpoint"]["path"])
    merged["source"] = dict(old["source"], splits={**old_splits, **new_splits})
  if write:
    os.makedirs(cache_dir, exist_ok=True)
    _write_json(path, merged)
  return merged


def _rewrite_jsonl(path: str, split: str, entries: Sequence[Mapping]) -> None:
  """Replaces the lines of `split` in a JSONL report, keeping other splits' lines."""
  kept = []
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      kept = [line for line in f if line.strip() and json.loads(line).get("split") != split]
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.writelines(kept)
    f.writelines(json.dumps(e, sort_keys=True) + "\n" for e in entries)
  os.replace(path + ".tmp", path)


def finish_split(cache_dir: str, split: str) -> dict:
  """Collects the shard reports of `split` into OUT/skipped.jsonl and `results.<split>` of
  the metadata (process 0, once every process has written its shards).

  Returns:
    {"clips", "frames", "skipped" (clips not in the cache), "skipped_by_reason",
     "shards", "shards_written", "shards_missing": [stems without an output shard]}.
  """
  meta = read_metadata(cache_dir)
  stems = meta["source"]["splits"][split]["shards"]
  entries, clips, frames, written, missing = [], 0, 0, 0, []
  for stem in stems:
    report = read_report(cache_dir, split, stem)
    if report is None or not os.path.isfile(shard_paths(cache_dir, split, stem)[1]):
      missing.append(stem)
    else:
      written += 1
      clips += int(report["clips"])
      frames += int(report["frames"])
    entries += (report or {}).get("skipped", [])
  entries.sort(key=lambda e: (e["shard"], e["index"] if e["index"] is not None else -1))
  _rewrite_jsonl(os.path.join(cache_dir, SKIPPED), split, entries)
  by_reason: dict[str, int] = {}
  for e in entries:
    kind = e["reason"].split(":")[0]
    by_reason[kind] = by_reason.get(kind, 0) + int(e["clips"])
  result = dict(clips=clips, frames=frames, skipped=sum(int(e["clips"]) for e in entries),
                skipped_by_reason=by_reason, shards=len(stems), shards_written=written,
                shards_missing=missing)
  meta.setdefault("results", {})[split] = result
  _write_json(os.path.join(cache_dir, METADATA), meta)
  return result


# ----------------------------------------------------------------------------- reading

class SplitIndex:
  """The clips of one split of a cache, with their features memory-mapped (read on access).

  Attributes:
    video_ids: list[str], N clips in shard then record order.
    labels: int64 `[N]` (-1 = no label). fps: float32 `[N]` (0 = unknown).
    num_frames: int64 `[N]` (T_i). start_us, end_us: int64 `[N]` (-1 = absent).
    shards: the stems read. missing_shards: stems of the split without an output shard.

  `index[i]` and iteration give `CachedClip`s whose features are read-only float16 `[T_i, D]`
  views of the memory-mapped files; `get(video_id)` looks one up by id.
  """

  def __init__(self, cache_dir: str, split: str, stems: Sequence[str], identity: str,
               dim: int):
    self.split = split
    self.shards, self.missing_shards = [], []
    self._features, where, ids = [], [], []
    columns: dict[str, list[np.ndarray]] = {k: [] for k in ("label", "fps", "start_us",
                                                            "end_us")}
    for stem in stems:
      features_path, index_path = shard_paths(cache_dir, split, stem)
      if not (os.path.isfile(index_path) and os.path.isfile(features_path)):
        self.missing_shards.append(stem)
        continue
      idx = _load_index(index_path)
      if str(idx["identity"]) != identity:
        raise ValueError(f"{index_path} was written for other metadata than "
                         f"{os.path.join(cache_dir, METADATA)} describes; extract it again")
      feats = np.load(features_path, mmap_mode="r")
      offset = idx["offset"]
      if feats.ndim != 2 or feats.shape != (int(offset[-1]), dim):
        raise ValueError(f"{features_path} has shape {feats.shape}, its index says "
                         f"({int(offset[-1])}, {dim})")
      k = len(self._features)
      self._features.append(feats)
      self.shards.append(stem)
      ids += [str(v) for v in idx["video_id"]]
      where += [(k, int(a), int(b)) for a, b in zip(offset[:-1], offset[1:])]
      for name, values in columns.items():
        values.append(idx[name])
    self.video_ids = ids
    self._where = where
    cat = lambda xs, dtype: np.concatenate(xs).astype(dtype) if xs else np.zeros(0, dtype)
    self.labels = cat(columns["label"], np.int64)
    self.fps = cat(columns["fps"], np.float32)
    self.start_us = cat(columns["start_us"], np.int64)
    self.end_us = cat(columns["end_us"], np.int64)
    self.num_frames = np.asarray([b - a for _, a, b in where], np.int64)
    self._position: dict[str, int] = {}
    for i, v in enumerate(ids):
      self._position.setdefault(v, i)  # a repeated id resolves to its first clip

  def __len__(self) -> int:
    return len(self.video_ids)

  def features(self, i: int) -> np.ndarray:
    """float16 `[T_i, D]` rows of clip i (a read-only memory-mapped view)."""
    k, a, b = self._where[i]
    return np.asarray(self._features[k][a:b])

  def __getitem__(self, i: int) -> CachedClip:
    if not -len(self) <= i < len(self):
      raise IndexError(f"clip {i} out of range for {len(self)} clips of split {self.split!r}")
    i %= len(self)
    return CachedClip(self.video_ids[i], self.features(i), int(self.labels[i]),
                      float(self.fps[i]))

  def __iter__(self) -> Iterator[CachedClip]:
    return (self[i] for i in range(len(self)))

  def position(self, video_id: str) -> int:
    """Index of the clip with this id. Raises KeyError naming it."""
    try:
      return self._position[video_id]
    except KeyError:
      raise KeyError(f"clip {video_id!r} is not in split {self.split!r} of the cache") from None

  def get(self, video_id: str) -> CachedClip:
    return self[self.position(video_id)]


class FeatureCache:
  """An opened cache directory: `metadata` and its splits (`open_cache`)."""

  def __init__(self, cache_dir: str, metadata: dict):
    self.dir = cache_dir
    self.metadata = metadata
    self.identity = identity_digest(metadata)
    self.dim = int(metadata["feature"]["dim"])

  @property
  def splits(self) -> list[str]:
    return sorted(self.metadata.get("source", {}).get("splits", {}))

  def split(self, split: str, *, allow_missing: bool = False) -> SplitIndex:
    """The `SplitIndex` of `split`.

    Raises:
      KeyError: the cache has no such split (names those it has).
      ValueError: an input shard of the split has no output shard (an unfinished or failed
        extraction), unless `allow_missing`.
    """
    splits = self.metadata.get("source", {}).get("splits", {})
    if split not in splits:
      raise KeyError(f"feature cache {self.dir!r} has no split {split!r}; it has "
                     f"{self.splits}")
    index = SplitIndex(self.dir, split, splits[split]["shards"], self.identity, self.dim)
    if index.missing_shards and not allow_missing:
      raise ValueError(f"feature cache {self.dir!r}: split {split!r} lacks "
                       f"{len(index.missing_shards)} of {len(splits[split]['shards'])} shards "
                       f"({', '.join(index.missing_shards[:5])}...); rerun the extraction to "
                       "finish it, or pass allow_missing=True")
    return index

  def read_split(self, split: str, *, allow_missing: bool = False,
                 mmap: bool = True) -> list[CachedClip]:
    """Every clip of `split` as `CachedClip`s, in shard then record order; `mmap=False`
    loads the features into memory."""
    index = self.split(split, allow_missing=allow_missing)
    if mmap:
      return list(index)
    return [c._replace(features=np.array(c.features)) for c in index]


def open_cache(cache_dir: str, expect: Mapping | None = None) -> FeatureCache:
  """Opens a cache directory, checking it against `expect` (e.g. `describe(...)`).

  Args:
    cache_dir: OUT of the extraction.
    expect: metadata the caller needs; every `IDENTITY` section it names must match.

  Raises:
    FileNotFoundError: no metadata.json.
    ValueError: another checkpoint fingerprint, model, preprocessing or feature: the message
      names each differing field with the cache's and the expected value.
  """
  meta = read_metadata(cache_dir)
  if expect is not None:
    diffs = differences(meta, expect)
    if diffs:
      raise ValueError(mismatch_message(cache_dir, diffs))
  return FeatureCache(cache_dir, meta)


def read_split(cache_dir: str, split: str, *, expect: Mapping | None = None,
               allow_missing: bool = False, mmap: bool = True) -> list[CachedClip]:
  """`open_cache(cache_dir, expect).read_split(split)`: [(video_id, float16 [T_i, D], label,
  fps)]."""
  return open_cache(cache_dir, expect).read_split(split, allow_missing=allow_missing, mmap=mmap)


# ----------------------------------------------------------------------------- records

class RecordError(ValueError):
  """A record that cannot go into the cache; `video_id` is "" when it could not be read."""

  def __init__(self, reason: str, video_id: str = ""):
    super().__init__(reason)
    self.video_id = video_id


def tf_error_text(e: Exception) -> str:
  """`Type: message` of a TensorFlow error, without its graph trace (one line, short)."""
  noise = ("Graph execution error", "Detected at node", "File ", "[[")
  lines = [x.strip() for x in str(getattr(e, "message", e)).splitlines()]
  lines = [x for x in lines if x and not x.startswith(noise)] or [""]
  text = re.sub(r"\{\{[^}]*\}\}|\s*\[Op:[^\]]*\]", "", lines[-1]).strip()
  return f"{type(e).__name__}: {text[:200]}"


@dataclasses.dataclass
class SourceClip:
  """A parsed input record: what the cache keeps of it, and its frames (JPEG / PNG bytes)."""
  index: int
  video_id: str
  label: int
  fps: float
  start_us: int
  end_us: int
  frames: list[bytes]


def describe_source(data_dir: str, splits: Sequence[str]) -> dict:
  """The `source` section: data_dir and each split's input shards and record count (from
  the shards' manifests; None when one has none).

  Raises:
    FileNotFoundError: no such directory or split (names the splits present).
  """
  from vlp_jax.data import records  # noqa: PLC0415  (tensorflow: writing side only)
  out = {}
  for split in splits:
    files = records.split_files(data_dir, split)
    out[split] = {"shards": [shard_stem(f) for f in files],
                  "records": records.expected_count(data_dir, split)}
  return {"data_dir": os.path.abspath(data_dir), "splits": out}


def _first(ctx: Mapping, key: str, default: Any) -> Any:
  values = ctx.get(key) or []
  return values[0] if values else default


def _frame_problem(frame: bytes) -> str | None:
  """Why a stored frame is not a well-formed image, without decoding it (the input pipeline's
  check: JPEG from FFD8FF to FFD9, or a PNG signature)."""
  if frame[:8] == b"\x89PNG\r\n\x1a\n" and len(frame) > 8:
    return None
  if len(frame) < 4 or frame[:3] != b"\xff\xd8\xff" or frame[-2:] != b"\xff\xd9":
    return "not a complete JPEG or PNG"
  return None


def parse_record(serialized: bytes, index: int) -> SourceClip:
  """A record of the `records` schema -> `SourceClip` with its T stored frames.

  Raises:
    RecordError: not a SequenceExample, no video/id, no frames, or a frame that is not a
      complete JPEG / PNG (the message says which).
  """
  from google.protobuf.message import DecodeError  # noqa: PLC0415  (see describe_source)

  from vlp_jax.data import records  # noqa: PLC0415  (see describe_source)
  try:
    ex = records.example_to_dict(serialized)
  except (DecodeError, IndexError) as e:
    raise RecordError(f"corrupt record: not a SequenceExample ({type(e).__name__})") from e
  video_id = _first(ex, records.VIDEO_ID, b"")
  video_id = video_id.decode("utf-8", "replace") if isinstance(video_id, bytes) else ""
  if not video_id:
    raise RecordError("corrupt record: no video/id")
  frames = ex[records.FRAMES]
  declared = int(_first(ex, records.NUM_FRAMES, 0))
  n = min(declared, len(frames)) if declared > 0 else len(frames)
  if n == 0:
    raise RecordError("no frames: the record stores none", video_id)
  frames = frames[:n]
  for t, frame in enumerate(frames):
    problem = _frame_problem(frame)
    if problem:
      raise RecordError(f"undecodable frame: frame {t} is {problem}", video_id)
  return SourceClip(index=index, video_id=video_id, label=int(_first(ex, records.LABEL_INDEX, -1)),
                    fps=float(_first(ex, records.FPS, 0.0)),
                    start_us=int(_first(ex, records.START, -1)),
                    end_us=int(_first(ex, records.END, -1)), frames=list(frames))


class RecordStream:
  """The serialised records of one input shard, in order, that stops at the first read error.

  Iterating yields (index, bytes). Afterwards `error` is None (read to the end) or the
  reason reading stopped, `fatal` says whether nothing could be read at all (the file is
  missing or unreadable: a rerun may succeed) rather than a corrupt or truncated file, and
  `count` is the records read. `lost()` compares with the shard's manifest.
  """

  def __init__(self, path: str):
    self.path = path
    self.count = 0
    self.error: str | None = None
    self.fatal = False

  def __iter__(self) -> Iterator[tuple[int, bytes]]:
    import tensorflow as tf  # noqa: PLC0415  (see describe_source)
    try:
      for record in tf.data.TFRecordDataset(self.path):
        index = self.count
        self.count += 1
        yield index, record.numpy()
    except tf.errors.OpError as e:
      self.error = tf_error_text(e)
      self.fatal = not isinstance(e, tf.errors.DataLossError)

  def lost(self) -> int | None:
    """Records the manifest lists beyond those read (None without a manifest)."""
    from vlp_jax.data import records  # noqa: PLC0415  (see describe_source)
    manifest = records.read_manifest(self.path)
    return None if manifest is None else max(int(manifest["records"]) - self.count, 0)


def crop_window(first_frame: bytes) -> tuple[np.ndarray, bool]:
  """(int32 [4] window (top, left, side, side): the centred square of the frame, is PNG),
  from a clip's first frame, as the input pipeline computes it.

  Raises:
    ValueError: the frame's header cannot be read.
  """
  import tensorflow as tf  # noqa: PLC0415  (see describe_source)
  png = first_frame[:8] == b"\x89PNG\r\n\x1a\n"
  try:
    if png:
      shape = tf.shape(tf.io.decode_png(first_frame, channels=3)).numpy()
    else:
      shape = tf.io.extract_jpeg_shape(first_frame).numpy()
  except tf.errors.OpError as e:
    raise ValueError(f"undecodable frame: frame 0: {tf_error_text(e)}") from e
  h, w = int(shape[0]), int(shape[1])
  side = min(h, w)
  return np.asarray([(h - side) // 2, (w - side) // 2, side, side], np.int32), png


@functools.cache
def _decoder(image_size: int):
  import tensorflow as tf  # noqa: PLC0415  (see describe_source)

  from vlp_jax.data import pipeline  # noqa: PLC0415  (tensorflow)
  mean, std = tf.constant(CLIP_MEAN), tf.constant(CLIP_STD)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string), tf.TensorSpec([4], tf.int32),
                                tf.TensorSpec([], tf.bool)])
  def decode(frames, window, png):
    # The input pipeline's evaluation decode, so the cached features are those of the frames
    # training would otherwise decode.
    video = tf.map_fn(lambda frame: pipeline.decode_frame(frame, window, png, image_size), frames,
                      fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32))
    return (video / 255.0 - mean) / std

  return decode


def decode_frames(frames: Sequence[bytes], window: np.ndarray, png: bool, image_size: int,
                  first: int = 0) -> np.ndarray:
  """Stored frames -> float32 `[n, image_size, image_size, 3]` image tower input (module doc).

  Args:
    frames: JPEG (or PNG, when `png`) bytes of frames of one clip.
    window, png: `crop_window` of the clip's first frame.
    image_size: output side.
    first: the clip's frame number of `frames[0]`, for messages.

  Raises:
    ValueError: a frame cannot be decoded (or does not hold the window); names the first
      such frame.
  """
  import tensorflow as tf  # noqa: PLC0415  (see describe_source)
  decode = _decoder(int(image_size))
  run = lambda fs: decode(tf.constant(list(fs), tf.string), tf.constant(window, tf.int32),
                          tf.constant(bool(png)))
  try:
    return run(frames).numpy()
  except tf.errors.OpError as e:
    error = e
  for t, frame in enumerate(frames):  # which frame: one at a time, only after a failure
    try:
      run([frame])
    except tf.errors.OpError as e:
      raise ValueError(f"undecodable frame: frame {first + t}: {tf_error_text(e)}") from e
  raise ValueError(f"undecodable frame: frames {first}..{first + len(frames) - 1}: "
                   f"{tf_error_text(error)}")
