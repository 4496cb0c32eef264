"""Evaluation protocols of action recognition: few-shot, open-set, and clip window sampling.

Everything here is host-side index bookkeeping on numpy arrays (no tensorflow), seeded
with `np.random.default_rng`, so a protocol is reproduced exactly from its seed:

- `kshot_subset`: the K-shot all-way training subset (k clips of every class).
- `sample_episodes`: N-way K-shot episodes (support and query clip indices).
- `openset_splits`, `read_split_file`: seen/unseen class splits (base-to-novel).
- `sample_window`, `eval_windows`: frame indices into a per-clip feature cache.

Sample indices are int64 positions into the `labels` array given; class indices are the
label values.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Sequence

import numpy as np

DEFAULT_STRIDES = (1.0, 0.5, 1 / 3, 0.25)


def _check_labels(labels, where: str) -> np.ndarray:
  """int64 [N] labels, validated as 1-D, integer and non-negative."""
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"{where}: labels must be [N], got shape {labels.shape}")
  if labels.size and not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{where}: labels must be integer, got dtype {labels.dtype}")
  labels = labels.astype(np.int64)
  if labels.size and labels.min() < 0:
    i = int(np.argmax(labels < 0))
    raise ValueError(f"{where}: labels must be >= 0 (drop unlabelled clips first), got "
                     f"{int(labels[i])} at index {i}")
  return labels


def _by_class(labels: np.ndarray) -> dict[int, np.ndarray]:
  """{class: its sample indices, ascending} for the classes present in `labels`."""
  order = np.argsort(labels, kind="stable")  # stable: indices ascending within a class
  classes, starts = np.unique(labels[order], return_index=True)
  return {int(c): idx for c, idx in zip(classes, np.split(order, starts[1:]))}


def _readonly(a: np.ndarray) -> np.ndarray:
  a.flags.writeable = False
  return a


def kshot_subset(labels, k: int, seed: int, *, num_classes: int | None = None) -> np.ndarray:
  """Indices of a K-shot all-way training subset: `k` samples of every class.

  Classes are taken in ascending order and each draws `k` of its samples without
  replacement from one `np.random.default_rng(seed)`, so the subset depends on the seed
  and the labels only.

  Args:
    labels: int [N] class of each sample, >= 0.
    k: samples per class, >= 1.
    seed: the draw's seed.
    num_classes: if given, every class in [0, num_classes) must have `k` samples (a class
      with no sample at all is an error too) and no label may reach num_classes;
      otherwise the classes are those present in `labels`.

  Returns:
    int64 [num classes * k] sample indices, ascending.

  Raises:
    ValueError: on bad labels or k, or a class with fewer than k samples (named with its
      count).
  """
  labels = _check_labels(labels, "kshot_subset")
  if k < 1:
    raise ValueError(f"kshot_subset: k must be >= 1, got {k}")
  groups = _by_class(labels)
  if num_classes is not None:
    if num_classes < 1:
      raise ValueError(f"kshot_subset: num_classes must be >= 1, got {num_classes}")
    if labels.size and labels.max() >= num_classes:
      raise ValueError(f"kshot_subset: label {int(labels.max())} >= num_classes={num_classes}")
    classes = range(num_classes)
  elif groups:
    classes = sorted(groups)
  else:
    raise ValueError("kshot_subset: labels is empty")
  rng = np.random.default_rng(seed)
  chosen = []
  for c in classes:
    idx = groups.get(c, np.zeros((0,), np.int64))
    if len(idx) < k:
      raise ValueError(f"kshot_subset: class {c} has {len(idx)} samples, fewer than k={k}")
    chosen.append(rng.choice(idx, k, replace=False))
  return np.sort(np.concatenate(chosen)).astype(np.int64)


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: arrays have no truthful ==
class Episode:
  """One N-way K-shot episode; arrays are read-only.

  Attributes:
    classes: int64 [n_way] the episode's classes, ascending; episode-local label i is
      class `classes[i]`.
    support: int64 [n_way * k_shot] sample indices, class-major: entries
      [i * k_shot, (i + 1) * k_shot) are of classes[i], ascending within a class.
    support_labels: int64 [n_way * k_shot] episode-local labels in [0, n_way).
    query: int64 [n_way * n_query] sample indices, class-major like `support`; disjoint
      from `support`.
    query_labels: int64 [n_way * n_query] episode-local labels in [0, n_way).
  """
  classes: np.ndarray
  support: np.ndarray
  support_labels: np.ndarray
  query: np.ndarray
  query_labels: np.ndarray


def sample_episodes(labels, n_way: int, k_shot: int, n_query: int, num_episodes: int,
                    seed: int) -> list[Episode]:
  """N-way K-shot episodes drawn from the samples of `labels`.

  Each episode draws `n_way` distinct classes among the eligible ones (those with at least
  k_shot + n_query samples), then k_shot + n_query distinct samples of each class; the
  first k_shot are its support, the rest its query, so no query is in the support.
  Episodes are drawn in turn from one `np.random.default_rng(seed)`: the same seed gives
  the same episodes, and the first m episodes do not depend on `num_episodes`.

  Args:
    labels: int [N] class of each sample, >= 0.
    n_way: classes per episode, >= 1.
    k_shot: support samples per class, >= 1.
    n_query: query samples per class, >= 1.
    num_episodes: >= 1.
    seed: the draw's seed.

  Returns:
    `num_episodes` `Episode`s.

  Raises:
    ValueError: on bad arguments, or when fewer than `n_way` classes are eligible (with
      the counts).
  """
  labels = _check_labels(labels, "sample_episodes")
  for name, v in (("n_way", n_way), ("k_shot", k_shot), ("n_query", n_query),
                  ("num_episodes", num_episodes)):
    if v < 1:
      raise ValueError(f"sample_episodes: {name} must be >= 1, got {v}")
  groups = _by_class(labels)
  need = k_shot + n_query
  eligible = np.array([c for c, idx in groups.items() if len(idx) >= need], np.int64)
  if len(eligible) < n_way:
    largest = max((len(idx) for idx in groups.values()), default=0)
    raise ValueError(
        f"sample_episodes: n_way={n_way} needs {n_way} classes with >= k_shot + n_query = "
        f"{need} samples; only {len(eligible)} of the {len(groups)} classes in labels have "
        f"that many (the largest has {largest})")
  rng = np.random.default_rng(seed)
  local_support = _readonly(np.repeat(np.arange(n_way, dtype=np.int64), k_shot))
  local_query = _readonly(np.repeat(np.arange(n_way, dtype=np.int64), n_query))
  episodes = []
  for _ in range(num_episodes):
    classes = np.sort(rng.choice(eligible, n_way, replace=False))
    support, query = [], []
    for c in classes:
      drawn = rng.choice(groups[int(c)], need, replace=False)
      support.append(np.sort(drawn[:k_shot]))
      query.append(np.sort(drawn[k_shot:]))
    episodes.append(Episode(
        classes=_readonly(classes), support=_readonly(np.concatenate(support)),
        support_labels=local_support, query=_readonly(np.concatenate(query)),
        query_labels=local_query))
  return episodes


def openset_splits(classes: Sequence[str] | int, seen_fraction: float, num_draws: int,
                   seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """Random seen/unseen class splits for open-set (base-to-novel) evaluation.

  The number of seen classes is S = round(seen_fraction * C) (halves round up), clipped
  to [1, C - 1] so both parts are non-empty. Draws come in turn from one
  `np.random.default_rng(seed)`; a seen set equal to an earlier draw's is redrawn, so the
  `num_draws` splits all differ.

  Args:
    classes: the class names (their order gives the indices) or the number of classes C;
      C >= 2.
    seen_fraction: in (0, 1), e.g. 0.75 or 0.5.
    num_draws: number of splits, >= 1 and at most C-choose-S (the number of distinct
      splits, which is at least C).
    seed: the draw's seed.

  Returns:
    `num_draws` pairs (seen int64 [S], unseen int64 [C - S]) of class indices, each part
    ascending; together they are disjoint and cover [0, C).

  Raises:
    ValueError: on bad arguments, duplicate class names, or more draws than distinct
      splits.
  """
  if isinstance(classes, str):
    raise ValueError("openset_splits: classes must be a list of names or a count, got a str")
  if isinstance(classes, (int, np.integer)):
    c = int(classes)
  else:
    names = list(classes)
    if len(set(names)) != len(names):
      dup = next(n for i, n in enumerate(names) if n in names[:i])
      raise ValueError(f"openset_splits: class name {dup!r} appears more than once")
    c = len(names)
  if c < 2:
    raise ValueError(f"openset_splits: need >= 2 classes, got {c}")
  if not 0 < seen_fraction < 1:
    raise ValueError(f"openset_splits: seen_fraction must be in (0, 1), got {seen_fraction}")
  s = min(max(math.floor(seen_fraction * c + 0.5), 1), c - 1)
  distinct = math.comb(c, s)
  if not 1 <= num_draws <= distinct:
    raise ValueError(f"openset_splits: num_draws must be in [1, {distinct}] (the distinct "
                     f"splits of {c} classes into {s} seen), got {num_draws}")
  rng = np.random.default_rng(seed)
  splits, taken = [], set()
  while len(splits) < num_draws:
    perm = rng.permutation(c)
    seen = np.sort(perm[:s]).astype(np.int64)
    key = seen.tobytes()
    if key in taken:
      continue
    taken.add(key)
    splits.append((seen, np.sort(perm[s:]).astype(np.int64)))
  return splits


def read_split_file(path: str | os.PathLike, class_names: Sequence[str]) -> np.ndarray:
  """Class indices listed in a plain-text split file.

  One class name per line, matched exactly after stripping surrounding whitespace; blank
  lines and lines starting with '#' (after stripping) are ignored.

  Args:
    path: the split file.
    class_names: all class names; a name's position is its index.

  Returns:
    int64 [M] the listed classes' indices, in file order.

  Raises:
    ValueError: an unknown name (with file:line, the name and the closest known name if
      any), a name listed twice, duplicate `class_names`, or a file listing no class.
    FileNotFoundError: no such file.
  """
  path = os.fspath(path)
  names = list(class_names)
  index = {n: i for i, n in enumerate(names)}
  if len(index) != len(names):
    dup = next(n for i, n in enumerate(names) if n in names[:i])
    raise ValueError(f"read_split_file: class name {dup!r} appears more than once in "
                     "class_names")
  out, first_line = [], {}
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      name = line.strip()
      if not name or name.startswith("#"):
        continue
      if name not in index:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{path}:{lineno}: unknown class name {name!r}{hint}")
      if name in first_line:
        raise ValueError(f"{path}:{lineno}: class {name!r} is already listed on line "
                         f"{first_line[name]}")
      first_line[name] = lineno
      out.append(index[name])
  if not out:
    raise ValueError(f"{path}: lists no class")
  return np.asarray(out, np.int64)


def _steps(strides: Sequence[float]) -> list[int]:
  """Frame steps 1/s of the strides (fractions of frames taken), validated as integers."""
  if len(strides) == 0:
    raise ValueError("sample_window: strides is empty")
  steps = []
  for s in strides:
    step = round(1 / s) if 0 < s <= 1 else 0
    if step < 1 or abs(step * s - 1) > 1e-6:
      raise ValueError(f"sample_window: stride {s} must be 1/n for an integer n >= 1 "
                       "(the fraction of frames taken)")
    steps.append(step)
  return steps


def _check_window(num_frames: int, length: int, where: str) -> None:
  if num_frames < 1:
    raise ValueError(f"{where}: num_frames must be >= 1, got {num_frames}")
  if length < 1:
    raise ValueError(f"{where}: length must be >= 1, got {length}")


def _spread(num_frames: int, length: int) -> np.ndarray:
  """int32 [length]: the short-clip rule, evenly over [0, num_frames) with repeats."""
  return np.round(np.linspace(0, num_frames - 1, length)).astype(np.int32)


def sample_window(num_frames: int, length: int, rng: np.random.Generator,
                  strides: Sequence[float] = DEFAULT_STRIDES) -> np.ndarray:
  """Frame indices of one random training window of a clip's cached features.

  A stride s is the fraction of frames taken: the window takes every (1/s)-th frame
  (step 1/s; s = 1/2 is every 2nd frame) and so spans (length - 1) * step + 1 frames.

  - num_frames >= length: a stride is picked uniformly from `strides`. When its span
    exceeds the clip, the largest smaller allowed step that fits is used instead, and
    step 1 if none does (only possible when 1.0 is not in `strides`). The window starts
    at a uniform offset in [0, num_frames - span]. Two draws from `rng`.
  - num_frames < length: the short-clip rule, no draw from `rng`:
    round(np.linspace(0, num_frames - 1, length)) (np.round: halves to even), i.e. the
    whole clip, evenly, each frame repeated once or more (e.g. 3 frames, length 5 ->
    [0, 0, 1, 2, 2]).

  Args:
    num_frames: frames in the clip's cache, >= 1.
    length: frames per window, >= 1.
    rng: the sampler's generator (one per input worker).
    strides: allowed strides, each 1/n for an integer n >= 1.

  Returns:
    int32 [length] frame indices in [0, num_frames), non-decreasing.
  """
  _check_window(num_frames, length, "sample_window")
  steps = _steps(strides)
  if num_frames < length:
    return _spread(num_frames, length)
  step = steps[int(rng.integers(len(steps)))]
  fitting = [s for s in steps if s <= step and (length - 1) * s + 1 <= num_frames]
  step = max(fitting, default=1)
  span = (length - 1) * step + 1
  start = int(rng.integers(0, num_frames - span + 1))
  return (start + step * np.arange(length)).astype(np.int32)


def eval_windows(num_frames: int, length: int, num_windows: int = 5) -> np.ndarray:
  """Frame indices of evenly spaced evaluation windows of consecutive frames (step 1).

  Window w starts at round(np.linspace(0, num_frames - length, num_windows))[w], so the
  first starts at frame 0 and the last ends at frame num_frames - 1 (with one window,
  only the first). Windows overlap when the clip is short and leave gaps when it is
  long. When num_frames < length every window is `sample_window`'s short-clip rule
  (so all are equal).

  Args:
    num_frames: frames in the clip's cache, >= 1.
    length: frames per window, >= 1.
    num_windows: >= 1.

  Returns:
    int32 [num_windows, length] frame indices in [0, num_frames).
  """
  _check_window(num_frames, length, "eval_windows")
  if num_windows < 1:
    raise ValueError(f"eval_windows: num_windows must be >= 1, got {num_windows}")
  if num_frames < length:
    return np.tile(_spread(num_frames, length), (num_windows, 1))
  starts = np.round(np.linspace(0, num_frames - length, num_windows)).astype(np.int64)
  return (starts[:, None] + np.arange(length)[None, :]).astype(np.int32)
