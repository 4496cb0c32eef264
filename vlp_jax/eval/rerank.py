"""ALPRO retrieval evaluation: rank by VTC similarity, re-rank each query's top-k with VTM.

For a text query the top-k videos by VTC similarity are re-scored with
`VTC similarity + VTM positive logit` of the fused (text, video) pair; every other video keeps
its VTC order below them (`retrieval.rerank_topk`). For a video query the same is done over
texts. The similarity matrices stay sharded by rows; the pair scores are computed in
fixed-size chunks of queries (one compiled program), so a 10k x 10k evaluation needs only
`chunk` fused pairs in memory at a time.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from vlp_jax.eval.retrieval import rerank_topk, retrieval_metrics

# (text_idx int32 [C, k], video_idx int32 [C, k]) -> float32 [C, k], e.g. VTM positive logits.
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


def transpose(sim: jax.Array) -> jax.Array:
  """`sim.T`, row-sharded like `sim` when its rows divide evenly (else replicated)."""
  spec = getattr(getattr(sim, "sharding", None), "spec", None)
  mesh = getattr(getattr(sim, "sharding", None), "mesh", None)
  if mesh is None or not spec or spec[0] is None:
    return jnp.asarray(sim).T
  axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
  shards = int(np.prod([mesh.shape[a] for a in axes]))
  out = NamedSharding(mesh, P(spec[0], None) if sim.shape[1] % shards == 0 else P())
  return jax.jit(_t, out_shardings=out)(sim)


def _t(x: jax.Array) -> jax.Array:
  return x.T


def reranked_metrics(sim, text_to_video, k: int, pair_score: PairScore,
                     chunk_rows: int) -> dict[str, float]:
  """Retrieval metrics after VTM re-ranking of the top-k in both directions.

  Args:
    sim: float [Nt, Nv] VTC similarities (rows = texts), numpy or a (sharded) jax array.
    text_to_video: int [Nt], the ground-truth video of each text.
    k: candidates re-scored per query (clamped to the number of candidates).
    pair_score: `(text_idx int32 [C, k], video_idx int32 [C, k]) -> float32 [C, k]`, the
      score added to the VTC similarity of each pair (ALPRO: the VTM positive logit).
    chunk_rows: C, queries scored per call of `pair_score`.

  Returns:
    `retrieval_metrics` keys: `t2v_*` from the text-query re-ranking, `v2t_*` from the
    video-query re-ranking.
  """
  sim = jnp.asarray(sim, jnp.float32) if not isinstance(sim, jax.Array) else sim
  t2v = rerank_topk(sim, k, chunked(pair_score, chunk_rows))
  v2t = rerank_topk(transpose(sim), k, chunked(lambda v, t: pair_score(t, v), chunk_rows))
  out = {n: v for n, v in retrieval_metrics(t2v, text_to_video).items() if n.startswith("t2v")}
  out.update({n: v for n, v in retrieval_metrics(transpose(v2t), text_to_video).items()
              if n.startswith("v2t")})
  return out
