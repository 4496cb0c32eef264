"""Text-video retrieval metrics (R@K, median and mean rank) and the VTM re-ranking seam.

Ranking is done with jnp inside `jax.jit`, so a similarity matrix sharded over a mesh
(possibly spanning hosts) is ranked where it lives; only scalars come back to the host.

Rank convention: the rank of a ground truth is 1 + the number of candidates with a
*strictly* greater similarity, so ties count in the query's favour (a tie with the ground
truth never pushes it down). With several texts per video, the v2t rank of a video is the
best rank among its ground-truth texts; videos without any text are left out of v2t.
MdR is the median of the 1-based ranks (the mean of the two middle ranks when their count
is even).
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

RECALL_AT = (1, 5, 10)


def _masked_stats(ranks: jax.Array, valid: jax.Array, prefix: str) -> dict[str, jax.Array]:
  """Device scalars for the metrics over the entries of `ranks` [N] where `valid` [N].

  Counts stay integers and the percentages are formed on the host in float64, so a
  perfect score is exactly 100.0 (XLA may turn a float32 division into a reciprocal).
  """
  n = jnp.sum(valid.astype(jnp.int32))
  out = {f"_{prefix}_n": n}
  for k in RECALL_AT:
    out[f"_{prefix}_hits@{k}"] = jnp.sum((ranks <= k) & valid)
  # Invalid entries sort to the end; the median then sits at the middle of the first n.
  ordered = jnp.sort(jnp.where(valid, ranks, jnp.iinfo(jnp.int32).max))
  out[f"_{prefix}_med_lo"] = ordered[jnp.maximum(n - 1, 0) // 2]
  out[f"_{prefix}_med_hi"] = ordered[n // 2]
  # float32: a sum of Nt * Nv ranks can overflow int32 on very large sets.
  out[f"_{prefix}_rank_sum"] = jnp.sum(jnp.where(valid, ranks, 0).astype(jnp.float32))
  return out


def _finish(stats: dict, prefix: str) -> dict[str, float]:
  n = max(int(stats[f"_{prefix}_n"]), 1)
  out = {f"{prefix}_R@{k}": 100.0 * int(stats[f"_{prefix}_hits@{k}"]) / n for k in RECALL_AT}
  out[f"{prefix}_MdR"] = 0.5 * (int(stats[f"_{prefix}_med_lo"]) + int(stats[f"_{prefix}_med_hi"]))
  out[f"{prefix}_MnR"] = float(stats[f"_{prefix}_rank_sum"]) / n
  return out


def _rank_vectors(sim: jax.Array, gt: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(t2v ranks int32 [Nt], v2t ranks int32 [Nv], videos with a text bool [Nv])."""
  nv = sim.shape[1]
  # [Nt] similarity of each text to its own video.
  gt_sim = jnp.take_along_axis(sim, gt[:, None], axis=1)[:, 0]

  # t2v: videos strictly more similar than the ground truth.
  t2v_rank = 1 + jnp.sum(sim > gt_sim[:, None], axis=1, dtype=jnp.int32)

  # v2t: the best ground-truth text of video j has the largest similarity among them,
  # so its rank (the minimum over gt texts) is 1 + #texts strictly above that maximum.
  # Videos without text get the dtype's lowest value here and are masked out below.
  best_gt = jax.ops.segment_max(gt_sim, gt, num_segments=nv)
  n_texts = jax.ops.segment_sum(jnp.ones_like(gt), gt, num_segments=nv)
  has_text = n_texts > 0
  v2t_rank = 1 + jnp.sum(sim > best_gt[None, :], axis=0, dtype=jnp.int32)
  return t2v_rank, v2t_rank, has_text


@jax.jit
def _retrieval_stats(sim: jax.Array, text_to_video: jax.Array) -> dict[str, jax.Array]:
  """Device scalars from which the metrics are formed, plus validation counters."""
  nt, nv = sim.shape
  in_range = (text_to_video >= 0) & (text_to_video < nv)
  t2v_rank, v2t_rank, has_text = _rank_vectors(sim, jnp.clip(text_to_video, 0, nv - 1))
  out = _masked_stats(t2v_rank, jnp.ones((nt,), bool), "t2v")
  out.update(_masked_stats(v2t_rank, has_text, "v2t"))
  out["_num_out_of_range"] = jnp.sum(~in_range)
  out["_first_out_of_range"] = jnp.argmax(~in_range)
  out["_num_nonfinite"] = jnp.sum(~jnp.isfinite(sim))
  return out


def _as_array(x):
  return x if isinstance(x, jax.Array) else np.asarray(x)


def retrieval_metrics(sim, text_to_video) -> dict[str, float]:
  """Text-to-video and video-to-text retrieval metrics.

  Args:
    sim: float [Nt, Nv] similarities, rows = texts, columns = videos; a numpy array or a
      (possibly sharded) jax array. It is never gathered to the host.
    text_to_video: int [Nt], the ground-truth video column of each text; several texts
      may share a video.

  Returns:
    Python floats under the keys `t2v_R@1`, `t2v_R@5`, `t2v_R@10` (percent 0-100),
    `t2v_MdR`, `t2v_MnR` and the same with `v2t_`. See the module docstring for the rank
    convention (ties count in the query's favour).

  Raises:
    ValueError: on a wrongly shaped input, a non-integer or out-of-range
      `text_to_video`, or a non-finite similarity.
  """
  sim = _as_array(sim)
  text_to_video = _as_array(text_to_video)
  if sim.ndim != 2:
    raise ValueError(f"retrieval_metrics: sim must be [Nt, Nv], got shape {tuple(sim.shape)}")
  nt, nv = sim.shape
  if nt == 0 or nv == 0:
    raise ValueError(f"retrieval_metrics: sim is empty, shape {tuple(sim.shape)}")
  if not (jnp.issubdtype(sim.dtype, jnp.floating) or jnp.issubdtype(sim.dtype, jnp.integer)):
    raise ValueError(f"retrieval_metrics: sim must be numeric, got dtype {sim.dtype}")
  if text_to_video.ndim != 1 or text_to_video.shape[0] != nt:
    raise ValueError(
        f"retrieval_metrics: text_to_video must have shape [Nt] = [{nt}] to match sim "
        f"{tuple(sim.shape)}, got {tuple(text_to_video.shape)}")
  if not jnp.issubdtype(text_to_video.dtype, jnp.integer):
    raise ValueError(
        f"retrieval_metrics: text_to_video must be integer, got dtype {text_to_video.dtype}")

  stats = jax.device_get(_retrieval_stats(sim, text_to_video.astype(jnp.int32)))
  if int(stats["_num_out_of_range"]):
    i = int(stats["_first_out_of_range"])
    raise ValueError(
        f"retrieval_metrics: {int(stats['_num_out_of_range'])} text_to_video entries are "
        f"outside [0, Nv={nv}), first at text {i}")
  if int(stats["_num_nonfinite"]):
    raise ValueError(
        f"retrieval_metrics: sim has {int(stats['_num_nonfinite'])} non-finite entries")
  out = _finish(stats, "t2v")
  out.update(_finish(stats, "v2t"))
  return out


def metrics_from_ranks(t2v_rank, v2t_rank, has_text) -> dict[str, float]:
  """`retrieval_metrics`' keys from rank vectors (e.g. `eval/blockwise.py`'s).

  Args:
    t2v_rank: int [Nt] 1-based ranks; v2t_rank: int [Nv]; has_text: bool [Nv], the videos
      with a ground-truth text (the others are left out of v2t).
  """
  stats = _masked_stats(jnp.asarray(t2v_rank, jnp.int32), jnp.ones((len(t2v_rank),), bool),
                        "t2v")
  stats.update(_masked_stats(jnp.asarray(v2t_rank, jnp.int32), jnp.asarray(has_text, bool),
                             "v2t"))
  stats = jax.device_get(stats)
  out = _finish(stats, "t2v")
  out.update(_finish(stats, "v2t"))
  return out


@jax.jit
def _ranks(sim, text_to_video):
  return _rank_vectors(sim, jnp.clip(text_to_video, 0, sim.shape[1] - 1))


def ranks(sim, text_to_video) -> tuple[np.ndarray, np.ndarray]:
  """Per-query 1-based ranks (the convention of `retrieval_metrics`), for histograms.

  Returns:
    (t2v int32 [Nt], v2t int32 [Nv'] over the videos that have a ground-truth text).
  """
  t2v, v2t, has_text = jax.device_get(_ranks(_as_array(sim),
                                              _as_array(text_to_video).astype(jnp.int32)))
  return np.asarray(t2v), np.asarray(v2t)[np.asarray(has_text)]


def rerank_topk(sim: jax.Array, k: int,
                score_fn: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
  """Re-scores the top-k candidates of each row (ALPRO: VTC ranks, VTM re-ranks).

  Row `i` keeps its top-k columns by `sim`, now scored `sim + score_fn(...)`; every other
  column is shifted by one constant per row (so their order is kept, up to float
  rounding) to lie below the smallest re-scored top-k value, so nothing outside the
  top-k can overtake it. For the v2t direction call it on `sim.T` with a `score_fn`
  taking (video, text) indices.

  Args:
    sim: float [Nq, Nc] similarities, rows = queries (texts), columns = candidates.
    k: number of candidates to re-score per row; clamped to Nc.
    score_fn: `(text_idx int32 [Nq, k], video_idx int32 [Nq, k]) -> float [Nq, k]`,
      the additional score of each pair (e.g. a VTM score).

  Returns:
    float32 [Nq, Nc], the re-ranked similarity matrix.
  """
  sim = jnp.asarray(sim, jnp.float32)
  if sim.ndim != 2:
    raise ValueError(f"rerank_topk: sim must be 2-D, got shape {tuple(sim.shape)}")
  nq, nc = sim.shape
  if k < 1:
    raise ValueError(f"rerank_topk: k must be >= 1, got {k}")
  k = min(int(k), nc)
  top_sim, top_idx, row_idx = _top_k(sim, k)
  extra = jnp.asarray(score_fn(row_idx, top_idx), jnp.float32)
  if extra.shape != (nq, k):
    raise ValueError(
        f"rerank_topk: score_fn returned shape {tuple(extra.shape)}, expected {(nq, k)}")
  return _rescore(sim, top_sim, top_idx, row_idx, extra)


@functools.partial(jax.jit, static_argnums=(1,))
def _top_k(sim: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  top_sim, top_idx = jax.lax.top_k(sim, k)
  row_idx = jnp.broadcast_to(jnp.arange(sim.shape[0], dtype=jnp.int32)[:, None], top_idx.shape)
  return top_sim, top_idx.astype(jnp.int32), row_idx


@jax.jit
def _rescore(sim, top_sim, top_idx, row_idx, extra) -> jax.Array:
  new_top = top_sim + extra
  # Everything outside the top-k is <= the k-th value; subtracting (kth - new_min + 1)
  # puts it at least 1 below the re-scored minimum (the margin survives float rounding).
  shift = top_sim[:, -1] - jnp.min(new_top, axis=1) + 1.0
  out = sim - shift[:, None]
  return out.at[row_idx, top_idx].set(new_top)
