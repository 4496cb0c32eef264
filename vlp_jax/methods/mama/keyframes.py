"""Keyframes of a clip and the 3 x 4 grid image MAMA's captioner sees (numpy only).

Three selection methods: `difference` (peaks of the mean absolute difference between
consecutive frames, as MAMA's released code), `density_peak` (density-peak clustering of frame
features, Rodriguez & Laio 2014, as MAMA's paper) and `uniform` (evenly spaced).
"""
from __future__ import annotations

import numpy as np

METHODS = ("difference", "density_peak", "uniform")


def uniform_indices(n: int, k: int) -> np.ndarray:
  """int64 [k] sorted centres of k equal segments of [0, n); repeats frames when n < k."""
  i = np.arange(k, dtype=np.int64)
  return ((2 * i + 1) * int(n)) // (2 * k)


def select(frames: np.ndarray, k: int = 12, method: str = "difference") -> np.ndarray:
  """Indices of k keyframes of a clip.

  Args:
    frames: uint8 [N, H, W, 3], N >= 1, in time order.
    k: keyframes to pick.
    method: "difference" (the frame after each of the k largest local maxima of the mean
      absolute difference between consecutive frames; evenly spaced frames fill in when there
      are fewer peaks), "density_peak" (the k frames with the largest rho * delta of
      density-peak clustering over 8 x 8 colour thumbnails; rho with a Gaussian kernel at the
      2nd percentile of pairwise distances, delta the distance to the nearest denser frame),
      or "uniform" (segment centres).

  Returns:
    int64 [k] sorted frame indices; distinct when N >= k, every frame (some repeated) when
    N < k.

  Raises:
    ValueError: an unknown method, k < 1, or frames that are not [N, H, W, 3] with N >= 1.
  """
  if method not in METHODS:
    raise ValueError(f"unknown keyframe method {method!r}; expected one of {METHODS}")
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[0] < 1 or frames.shape[-1] != 3:
    raise ValueError(f"frames must be [N, H, W, 3] with N >= 1, got shape {frames.shape}")
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  n = frames.shape[0]
  if n <= k or method == "uniform":
    return uniform_indices(n, k)
  if method == "difference":
    picked = _difference_peaks(frames, k)
  else:
    picked = _density_peaks(_thumbnails(frames), k)
  return np.sort(_fill(picked, n, k))


def _difference_peaks(frames: np.ndarray, k: int) -> list[int]:
  """Frames right after the k largest local maxima of the consecutive-frame difference."""
  x = frames.astype(np.float32)
  diff = np.abs(x[1:] - x[:-1]).mean(axis=(1, 2, 3))  # [N-1]; diff[i] is the jump into i+1
  padded = np.concatenate([[-np.inf], diff, [-np.inf]])
  # `>` on the left, `>=` on the right: a plateau counts once, at its first sample.
  peaks = np.flatnonzero((diff > padded[:-2]) & (diff >= padded[2:]))
  order = peaks[np.argsort(-diff[peaks], kind="stable")]
  return [int(i) + 1 for i in order[:k]]


def _thumbnails(frames: np.ndarray, side: int = 8) -> np.ndarray:
  """float32 [N, side * side * 3]: frames averaged over a side x side grid of cells, in colour
  (grey levels would merge equally bright scenes of different colours)."""
  x = frames.astype(np.float32)
  h, w = x.shape[1:3]
  rows = (np.arange(side) * h) // side
  cols = (np.arange(side) * w) // side
  # Cell sums over the row then the column bands; frames smaller than side repeat pixels.
  sums = np.add.reduceat(np.add.reduceat(x, rows, axis=1), cols, axis=2)
  counts = (np.maximum(np.diff(np.append(rows, h)), 1)[:, None]
            * np.maximum(np.diff(np.append(cols, w)), 1)[None, :])
  return (sums / counts[None, :, :, None]).reshape(len(frames), -1)


def _density_peaks(features: np.ndarray, k: int, percentile: float = 2.0) -> list[int]:
  """The k points with the largest rho * delta (density-peak cluster centres)."""
  n = len(features)
  sq = (features ** 2).sum(axis=1)
  dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * features @ features.T, 0.0))
  np.fill_diagonal(dist, 0.0)
  d_c = max(float(np.percentile(dist[np.triu_indices(n, 1)], percentile)), 1e-6)
  rho = np.exp(-(dist / d_c) ** 2).sum(axis=1) - 1.0  # minus the point itself
  # Ties in rho are broken by index, so every point but the densest has a denser one.
  order = np.argsort(-rho, kind="stable")
  delta = np.empty(n)
  delta[order[0]] = dist[order[0]].max()
  for rank in range(1, n):
    i = order[rank]
    delta[i] = dist[i, order[:rank]].min()
  gamma = rho * delta
  return [int(i) for i in np.argsort(-gamma, kind="stable")[:k]]


def _fill(picked: list[int], n: int, k: int) -> np.ndarray:
  """`picked` topped up to k distinct indices in [0, n) with evenly spaced ones (n >= k)."""
  out = list(dict.fromkeys(picked))[:k]
  if len(out) < k:
    taken = set(out)
    # Evenly spaced candidates first, then any frame, so n >= k always gives k distinct.
    for i in list(uniform_indices(n, k)) + list(range(n)):
      if len(out) == k:
        break
      if int(i) not in taken:
        taken.add(int(i))
        out.append(int(i))
  return np.asarray(out, np.int64)


def grid(frames: np.ndarray, rows: int = 3, cols: int = 4) -> np.ndarray:
  """Tiles rows * cols frames into one image, row-major (frame i at row i // cols,
  column i % cols).

  Args:
    frames: uint8 [rows * cols, H, W, 3].

  Returns:
    uint8 [rows * H, cols * W, 3].

  Raises:
    ValueError: frames is not [rows * cols, H, W, 3].
  """
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[0] != rows * cols or frames.shape[-1] != 3:
    raise ValueError(f"grid of {rows} x {cols} needs frames [{rows * cols}, H, W, 3], got "
                     f"shape {frames.shape}")
  _, h, w, c = frames.shape
  return frames.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(
      rows * h, cols * w, c)
