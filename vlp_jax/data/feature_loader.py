"""Host batches of frame-feature windows read from a feature cache (`feature_cache.py`).

A stream of a task reads the cache instead of the records when its `Stream.features` is a
`FeatureSource` (`vlp_jax.data.setup.stream_loader`); evaluators build `FeatureLoader`s
themselves with `training=False`.

Training: an infinite stream over the selected clips of a split. Epoch e visits them in the
order of a permutation drawn from (seed, e); each row takes one window of `length` frames
(`protocols.sample_window`: a random stride and start) with a generator keyed by (seed, the
row's global number), so a clip gets another window every epoch. Global batch k is rows
[k G, (k + 1) G) of that stream (G = batch size per process x process count; batches run on
across epoch boundaries) and process p yields its rows [k G + p b, k G + (p + 1) b): every
process computes the same order and keeps its own part, as `host_to_global` expects. The
stream is a function of (seed, batches delivered), so `save` / `restore` keep only a counter.

Evaluation: one pass over every window of `protocols.eval_windows(T_i, length, num_windows)` of
each selected clip, in clip order (clip-major, window-minor), split over processes the same
way; the last global batch is padded with valid=False rows.

Selection (`select`): the labelled clips of the split, optionally only those of some classes
(relabelled by their position among them: open-set training on the seen classes) and then a
K-shot subset (`protocols.kshot_subset`); or, with `require_labels=False`, every clip,
labelled or not. With `choices` (per clip, candidate integers such as the rows of its captions
in a caption table) only the clips that have some are read, and each training row also draws
one of its clip's candidates (`choice`) with a generator keyed by (seed, the row's global
number), as its window is drawn.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vlp_jax.data import feature_cache, protocols


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: holds a metadata dict
class FeatureSource:
  """What a feature stream reads (the value of `vlp_jax.core.task.Stream.features`).

  Attributes:
    dir: the cache directory (`python -m launch.extract_features --out`).
    length: frames per window, T.
    strides: allowed strides of training windows (`protocols.sample_window`).
    classes: keep only clips of these label indices, relabelled by their position in this
      tuple; None = every clip, labels as stored.
    k_shot: > 0: then only k clips of every (kept) class (`protocols.kshot_subset`).
    subset_seed: seed of the K-shot draw.
    num_classes: labels (as stored) must be below this; None = unchecked.
    expect: metadata the cache must match (`feature_cache.open_cache`), e.g. the fingerprint
      of the CLIP checkpoint the features must come from; None = unchecked.
    allow_missing: read a split whose extraction left shards missing.
    require_labels: clips must have a label (< `num_classes`); False = every clip is read,
      its label as stored (-1 = none), and `classes` / `k_shot` cannot be used.
    choices: video id -> candidate integers (e.g. the table rows of the clip's captions);
      only clips with at least one are read, and every training row carries one of its
      clip's candidates drawn uniformly (`choice`). None = no choice (`choice` is -1).
  """
  dir: str
  length: int = 16
  strides: tuple[float, ...] = protocols.DEFAULT_STRIDES
  classes: tuple[int, ...] | None = None
  k_shot: int = 0
  subset_seed: int = 0
  num_classes: int | None = None
  expect: Mapping[str, Any] | None = None
  allow_missing: bool = False
  require_labels: bool = True
  choices: Mapping[str, Sequence[int]] | None = None


def open_split(source: FeatureSource, split: str
               ) -> tuple[feature_cache.FeatureCache, feature_cache.SplitIndex]:
  """The source's cache (checked against `source.expect`) and the `SplitIndex` of `split`.

  Raises:
    ValueError: `source.dir` is empty, or the cache mismatches `expect` (names each field).
    FileNotFoundError: not a feature cache. KeyError: no such split in it.
  """
  if not source.dir:
    raise ValueError("the feature cache directory is empty: make one with python -m "
                     "launch.extract_features --clip=hf:DIR --data_dir=DATA --split=S --out=OUT")
  cache = feature_cache.open_cache(source.dir, expect=source.expect)
  return cache, cache.split(split, allow_missing=source.allow_missing)


def check_labels(index: feature_cache.SplitIndex, positions: np.ndarray,
                 num_classes: int | None) -> None:
  """Raises ValueError naming the first clip (of `positions`) without a label or with one
  >= `num_classes`."""
  labels = index.labels[positions]
  bad = labels < 0
  if num_classes is not None:
    bad |= labels >= num_classes
  if bad.any():
    i = int(positions[int(np.argmax(bad))])
    what = ("has no label (clip/label/index)" if index.labels[i] < 0 else
            f"has label {int(index.labels[i])}, but there are {num_classes} classes")
    raise ValueError(f"split {index.split!r} of the feature cache: {int(bad.sum())} clip(s) "
                     f"without a usable label; e.g. clip {index.video_ids[i]!r} {what}")


def select(index: feature_cache.SplitIndex, source: FeatureSource
           ) -> tuple[np.ndarray, np.ndarray]:
  """The clips a stream reads and their labels.

  Returns:
    (positions int64 [N] into the split, ascending; labels int64 [N]: as stored, or the
    position of the stored label in `source.classes`). With `source.choices`, only the clips
    that have a candidate.

  Raises:
    ValueError: a clip without a label or with one >= `num_classes` (unless
      `source.require_labels` is False); a K-shot class with fewer than k clips (named with its
      count); nothing left.
  """
  positions = np.arange(len(index), dtype=np.int64)
  labels = index.labels.astype(np.int64)
  if not source.require_labels:
    if source.classes is not None or source.k_shot > 0:
      raise ValueError("a feature source with require_labels=False cannot select classes or "
                       "a K-shot subset (they need every clip's label)")
  else:
    check_labels(index, positions, source.num_classes)
  if source.choices is not None:
    keep = np.asarray([len(source.choices.get(v, ())) > 0 for v in index.video_ids], bool)
    positions, labels = positions[keep], labels[keep]
  if source.classes is not None:
    lookup = {int(c): i for i, c in enumerate(source.classes)}
    keep = np.asarray([int(c) in lookup for c in labels], bool)
    positions = positions[keep]
    labels = np.asarray([lookup[int(c)] for c in labels[keep]], np.int64)
  if source.k_shot > 0:
    num = len(source.classes) if source.classes is not None else source.num_classes
    chosen = protocols.kshot_subset(labels, int(source.k_shot), int(source.subset_seed),
                                    num_classes=num)
    positions, labels = positions[chosen], labels[chosen]
  if not len(positions):
    raise ValueError(f"split {index.split!r} of the feature cache {source.dir!r}: no clip is "
                     "left to read (classes: "
                     f"{None if source.classes is None else list(source.classes)})")
  return positions, labels


class FeatureLoader:
  """Host-local batches of feature windows of one split (module docstring).

  Iterating yields dicts:
    features: float32 [b, length, D] (the cache's float16 values).
    label: int32 [b] (`select`'s labels, or as stored with explicit `positions`; -1 on
      padding rows).
    valid: bool [b] (False only on evaluation padding rows).
    clip: int32 [b] the row's clip as its position in `positions` (-1 on padding).
    window: int32 [b] the window number within its clip (evaluation; 0 in training).
    choice: int32 [b] one of the clip's `source.choices`, drawn per training row (-1 in
      evaluation, on padding and without `choices`).
    video_id: object [b] of str (host only; "" on padding).

  Args:
    source: the `FeatureSource`.
    split: the cache split to read.
    batch_size: rows per process, b.
    training: an infinite shuffled stream of random windows, else one pass over all windows.
    seed: the shuffling and window seed (training).
    process_index, process_count: this process's share of every global batch.
    num_windows: evaluation windows per clip.
    positions: explicit clips (positions into the split, in the order to read them; labels as
      stored); None = `select(index, source)`.

  Attributes:
    index: the split's `SplitIndex`. positions, labels: int64 [N] the clips read.
    dim: D. step: batches delivered so far. num_rows: rows of one evaluation pass.
  """

  def __init__(self, source: FeatureSource, split: str, *, batch_size: int, training: bool,
               seed: int = 0, process_index: int = 0, process_count: int = 1,
               num_windows: int = 5, positions: Sequence[int] | None = None):
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if batch_size < 1 or source.length < 1:
      raise ValueError(f"batch_size ({batch_size}) and length ({source.length}) must be >= 1")
    self.source = source
    self.split = split
    self.batch_size = int(batch_size)
    self.training = bool(training)
    self.seed = int(seed)
    self.process_index = int(process_index)
    self.process_count = int(process_count)
    cache, self.index = open_split(source, split)
    self.dim = cache.dim
    if positions is None:
      self.positions, self.labels = select(self.index, source)
    else:
      self.positions = np.asarray(positions, np.int64).reshape(-1)
      if len(self.positions) and (self.positions.min() < 0
                                  or self.positions.max() >= len(self.index)):
        raise ValueError(f"positions must be in [0, {len(self.index)})")
      self.labels = self.index.labels[self.positions].astype(np.int64)
    self.step = 0
    self._perms: dict[int, np.ndarray] = {}
    if self.training:
      if not len(self.positions):
        raise ValueError(f"split {split!r}: no clip to train on")
      self.num_rows = None
    else:
      # (clip number, frame indices) of every window, clip-major.
      frames = self.index.num_frames[self.positions]
      self._windows = [protocols.eval_windows(int(t), source.length, num_windows)
                       for t in frames]
      self.num_windows = int(num_windows)
      self.num_rows = len(self.positions) * self.num_windows

  @property
  def global_batch(self) -> int:
    return self.batch_size * self.process_count

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      rng = np.random.default_rng([self.seed, 0, epoch])
      self._perms = {epoch: rng.permutation(len(self.positions))}  # one epoch at a time
    return self._perms[epoch]

  def _rows(self) -> range:
    start = self.step * self.global_batch + self.process_index * self.batch_size
    return range(start, start + self.batch_size)

  def _empty(self) -> dict[str, np.ndarray]:
    b = self.batch_size
    return dict(features=np.zeros((b, self.source.length, self.dim), np.float32),
                label=np.full((b,), -1, np.int32), valid=np.zeros((b,), bool),
                clip=np.full((b,), -1, np.int32), window=np.zeros((b,), np.int32),
                choice=np.full((b,), -1, np.int32), video_id=np.full((b,), "", object))

  def _fill(self, out: dict, i: int, clip: int, frames: np.ndarray, window: int) -> None:
    pos = int(self.positions[clip])
    out["features"][i] = self.index.features(pos)[frames]
    out["label"][i] = self.labels[clip]
    out["valid"][i] = True
    out["clip"][i] = clip
    out["window"][i] = window
    out["video_id"][i] = self.index.video_ids[pos]

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    n = len(self.positions)
    if not self.training and self.step * self.global_batch >= self.num_rows:
      raise StopIteration
    out = self._empty()
    for i, row in enumerate(self._rows()):
      if self.training:
        epoch, j = divmod(row, n)
        clip = int(self._perm(epoch)[j])
        frames_total = int(self.index.num_frames[self.positions[clip]])
        rng = np.random.default_rng([self.seed, 1, row])
        frames = protocols.sample_window(frames_total, self.source.length, rng,
                                         self.source.strides)
        self._fill(out, i, clip, frames, 0)
        if self.source.choices is not None:
          # Its own generator: the windows are those of a source without choices.
          options = self.source.choices[out["video_id"][i]]
          pick = np.random.default_rng([self.seed, 2, row]).integers(len(options))
          out["choice"][i] = int(options[pick])
      elif row < self.num_rows:
        clip, w = divmod(row, self.num_windows)
        self._fill(out, i, clip, self._windows[clip][w], w)
    self.step += 1
    return out

  # ------------------------------------------------------------------------ checkpointing
  def _identity(self) -> dict:
    return dict(split=self.split, training=self.training, seed=self.seed,
                process_index=self.process_index, process_count=self.process_count,
                batch_size=self.batch_size, clips=int(len(self.positions)))

  def save(self, path: str) -> None:
    """Writes the position (batches delivered) and what it is a position of to `path.json`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".json.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(dict(self._identity(), step=self.step), f)
    os.replace(tmp, path + ".json")

  def restore(self, path: str) -> None:
    """Continues from a position written by `save` of an identically built loader.

    Raises:
      FileNotFoundError: nothing saved at `path`. ValueError: saved by a loader of another
        split, seed, process layout, batch size or clip selection (names both).
    """
    if not os.path.exists(path + ".json"):
      raise FileNotFoundError(f"no loader state at {path!r}")
    with open(path + ".json", encoding="utf-8") as f:
      state = json.load(f)
    saved = {k: state.get(k) for k in self._identity()}
    if saved != self._identity():
      raise ValueError(f"loader state {path!r} is of another stream: {saved}, this loader is "
                       f"{self._identity()}")
    self.step = int(state["step"])
