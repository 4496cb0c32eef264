"""ALPRO retrieval evaluation: rank by VTC similarity, re-rank each query's top-k with VTM.

For a text query the top-k videos by VTC similarity are re-scored with
`VTC similarity + pair score` of the fused (text, video) pair (ALPRO: temperature x VTM
log-odds, `methods/alpro/retrieval.py`); every other video keeps its VTC order below them
(the ranks of `retrieval.rerank_topk`'s matrix). For a video query
the same is done over texts. The candidates come from `eval/blockwise.py`'s scan, so no
[Nt, Nv] similarity matrix is ever formed; the pair scores are computed in fixed-size chunks
of queries (one compiled program), so a 100k x 100k evaluation needs only `chunk` fused
pairs in memory at a time.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vlp_jax.eval.retrieval import metrics_from_ranks

# (text_idx int32 [C, k], video_idx int32 [C, k]) -> float32 [C, k], e.g. VTM scores.
PairScore = Callable[[jax.Array, jax.Array], jax.Array]


def rows_per_chunk(chunk_pairs: int, k: int, multiple_of: int = 1) -> int:
  """Queries per chunk: about `chunk_pairs // k`, at least 1, and such that the number of
  pairs (rows * k) is a multiple of `multiple_of` (the batch shard count)."""
  step = multiple_of // math.gcd(int(k), int(multiple_of))
  rows = max(1, int(chunk_pairs) // int(k))
  return -(-rows // step) * step


@functools.partial(jax.jit, static_argnums=(1,))
def _pad_rows(idx: jax.Array, multiple: int) -> jax.Array:
  """Pads [N, k] to a multiple of `multiple` rows by repeating row 0."""
  pad = -idx.shape[0] % multiple
  return jnp.concatenate([idx, jnp.broadcast_to(idx[:1], (pad,) + idx.shape[1:])])


@functools.partial(jax.jit, static_argnums=(2,))
def _block(idx: jax.Array, start: jax.Array, rows: int) -> jax.Array:
  # A traced start: one compiled slice for every block.
  return jax.lax.dynamic_slice_in_dim(idx, start, rows)


def chunked(pair_score: PairScore, rows: int) -> PairScore:
  """Wraps `pair_score` so it is always called on `[rows, k]` index blocks.

  The last block is padded by repeating the first query, and the padding is dropped from the
  result, so every call has the same shape (one compilation).
  """
  if rows < 1:
    raise ValueError(f"chunk rows must be >= 1, got {rows}")

  def score(text_idx: jax.Array, video_idx: jax.Array) -> jax.Array:
    nq = text_idx.shape[0]
    text_idx, video_idx = _pad_rows(text_idx, rows), _pad_rows(video_idx, rows)
    parts = [jnp.asarray(pair_score(_block(text_idx, start, rows),
                                    _block(video_idx, start, rows)), jnp.float32)
             for start in map(np.int32, range(0, text_idx.shape[0], rows))]
    return jnp.concatenate(parts)[:nq]
  return score


def reranked_ranks(scan: dict, pair_score: PairScore, chunk_rows: int
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Ranks after VTM re-ranking of each query's top-k, in both directions.

  Args:
    scan: `blockwise.scan(..., k=k)`: VTC ranks and each query's top-k candidates.
    pair_score: `(text_idx int32 [C, k], video_idx int32 [C, k]) -> float32 [C, k]`, the
      score added to the VTC similarity of each pair (ALPRO: temperature x VTM log-odds).
    chunk_rows: C, queries scored per call of `pair_score`.
  Returns:
    (t2v int32 [Nt], v2t int32 [Nv]): the ranks `retrieval_metrics` gives on the matrix that
    `retrieval.rerank_topk` re-scores (a ground truth outside the top-k keeps its VTC rank;
    the videos without a text are `scan["has_text"]`-masked by the caller).
  """
  t_idx = scan["t2v_top_idx"]
  rows = np.broadcast_to(np.arange(t_idx.shape[0], dtype=np.int32)[:, None], t_idx.shape)
  extra = np.asarray(chunked(pair_score, chunk_rows)(jnp.asarray(rows), jnp.asarray(t_idx)))
  t2v = _ranks(scan["t2v_top_sim"], extra, t_idx == scan["gt"][:, None], scan["gt_sim"],
               scan["t2v"])
  v_idx = scan["v2t_top_idx"]
  rows = np.broadcast_to(np.arange(v_idx.shape[0], dtype=np.int32)[:, None], v_idx.shape)
  extra = np.asarray(chunked(lambda v, t: pair_score(t, v), chunk_rows)(
      jnp.asarray(rows), jnp.asarray(v_idx)))
  v2t = _ranks(scan["v2t_top_sim"], extra, scan["gt"][v_idx] == rows, scan["best"],
               scan["v2t"])
  return t2v, v2t


def _ranks(top_sim, extra, is_gt, gt_sim, vtc_rank) -> np.ndarray:
  """Re-ranked 1-based ranks [Nq] from the top-k ([Nq, k] VTC similarities, pair scores and
  ground-truth flags), each query's (best) ground-truth VTC similarity and VTC rank."""
  new = top_sim.astype(np.float32) + extra.astype(np.float32)
  inside = is_gt.any(axis=1)
  best_new = np.max(np.where(is_gt, new, -np.inf), axis=1)
  # Inside the top-k: its place among the re-scored candidates. Outside: below all k of them,
  # then the VTC order (the candidates outside the top-k more similar than the ground truth).
  rank_in = 1 + np.sum(new > best_new[:, None], axis=1)
  outside_above = vtc_rank - 1 - np.sum(top_sim > gt_sim[:, None], axis=1)
  rank_out = 1 + top_sim.shape[1] + outside_above
  return np.where(inside, rank_in, rank_out).astype(np.int32)


def reranked_metrics(scan: dict, pair_score: PairScore, chunk_rows: int) -> dict[str, float]:
  """`retrieval_metrics` keys after VTM re-ranking of the top-k in both directions.

  Args:
    scan: `blockwise.scan(text, video, text_to_video, ..., k=k)`.
    pair_score, chunk_rows: as `reranked_ranks`.
  """
  t2v, v2t = reranked_ranks(scan, pair_score, chunk_rows)
  return metrics_from_ranks(t2v, v2t, scan["has_text"])
