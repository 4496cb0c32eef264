"""Retrieval ranks over sets too large for one similarity matrix, block by block.

The texts are taken `block` rows at a time; each block's similarities to all videos,
float32 [block, Nv], live sharded by video over the mesh's batch axes, and only per-query
counts (and, for VTM re-ranking, each query's top-k candidates: [block, devices, k] per
block) leave the devices. Memory per device: block x Nv / D floats for the similarity block
plus the (sharded) features; 100k x 100k with block 2048 on 8 devices is 2048 x 12.5k x 4 B =
100 MB per device, where the full matrix would be 40 GB. Two passes over the text blocks
(t2v ranks, then v2t counts), so the matmul work is twice the full matrix's.

Ranks follow `eval/retrieval.py`'s convention (1 + the number of strictly greater
similarities; a video's v2t rank is its best ground-truth text's) and equal its full-matrix
ranks.
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from vlp_jax.eval import features
from vlp_jax.parallel import sharding as shd


def _column_sharding(mesh, rules, nv: int) -> tuple[NamedSharding, NamedSharding]:
  """(video rows, similarity columns) shardings over the batch axes when Nv divides."""
  rows = shd.batch_sharding(mesh, rules, 2)
  if nv % features.batch_shards(mesh, rules):
    return NamedSharding(mesh, P()), NamedSharding(mesh, P())
  return rows, NamedSharding(mesh, P(None, rows.spec[0]))


def _t2v_local(text, video, gt, *, axes, k):
  """One text block against this device's videos (`axes`: the mesh axes the videos are split
  over, () when replicated): ranks int32 [b], ground-truth similarity float32 [b] and, with
  k > 0, each text's top-k videos (float32 / int32 [b, k])."""
  s = jnp.einsum("te,ve->tv", text.astype(jnp.float32), video.astype(jnp.float32))
  nv_local = s.shape[1]
  offset = jax.lax.axis_index(axes) * nv_local if axes else 0
  # The ground truth's similarity taken from s itself (a masked sum over the device that holds
  # it), so it compares equal to its own column.
  own = (jnp.arange(nv_local) + offset)[None, :] == gt[:, None]
  psum = (lambda x: jax.lax.psum(x, axes)) if axes else (lambda x: x)
  gt_sim = psum(jnp.sum(jnp.where(own, s, 0.0), axis=1))
  ranks = 1 + psum(jnp.sum(s > gt_sim[:, None], axis=1, dtype=jnp.int32))
  if not k:
    return ranks, gt_sim, None, None
  # This device's top-k, then the best k of all devices' candidates: only [D, b, k] moves.
  vals, idx = jax.lax.top_k(s, min(k, nv_local))
  idx = idx.astype(jnp.int32) + offset
  if axes:
    vals = jnp.moveaxis(jax.lax.all_gather(vals, axes), 0, 1).reshape(s.shape[0], -1)
    idx = jnp.moveaxis(jax.lax.all_gather(idx, axes), 0, 1).reshape(s.shape[0], -1)
  vals, pick = jax.lax.top_k(vals, k)
  return ranks, gt_sim, vals, jnp.take_along_axis(idx, pick, axis=1)


def _v2t_local(text, video, best, valid, offset, top_vals, top_idx, *, k):
  """One text block against this device's videos: int32 [Nv'] texts more similar to each
  video than its best ground truth and, with k > 0, the running per-video top-k texts
  ([Nv', k] similarities and text indices) merged with this block's."""
  s = jnp.einsum("te,ve->tv", text.astype(jnp.float32), video.astype(jnp.float32))
  above = jnp.sum((s > best[None, :]) & valid[:, None], axis=0, dtype=jnp.int32)
  if not k:
    return above, top_vals, top_idx
  # Per video over this block's texts, merged with the earlier blocks' (which come first:
  # ties keep the lower text index).
  st = jnp.where(valid[None, :], s.T, -jnp.inf)
  vals, idx = jax.lax.top_k(st, min(k, st.shape[1]))
  vals = jnp.concatenate([top_vals, vals], axis=1)
  idx = jnp.concatenate([top_idx, idx.astype(jnp.int32) + offset], axis=1)
  vals, pick = jax.lax.top_k(vals, k)
  return above, vals, jnp.take_along_axis(idx, pick, axis=1)


@functools.lru_cache(maxsize=32)
def _block_fns(mesh, axes: tuple, k_t2v: int, k_v2t: int):
  """The two jitted block functions, each device working on its own videos (shard_map over
  `axes`; plain jit when the videos are replicated)."""
  t2v = functools.partial(_t2v_local, axes=axes, k=k_t2v)
  v2t = functools.partial(_v2t_local, k=k_v2t)
  if axes:
    videos, rep = P(axes), P()
    t2v = jax.shard_map(t2v, mesh=mesh, in_specs=(rep, videos, rep),
                        out_specs=(rep, rep) + ((rep, rep) if k_t2v else (None, None)),
                        check_vma=False)
    v2t = jax.shard_map(v2t, mesh=mesh, in_specs=(rep, videos, videos, rep, rep, videos, videos),
                        out_specs=(videos, videos, videos), check_vma=False)
  return jax.jit(t2v), jax.jit(v2t)


def scan(text, video, text_to_video, mesh, rules, *, k: int = 0, block: int = 2048) -> dict:
  """Retrieval ranks, and optionally every query's top-k candidates, without the full
  [Nt, Nv] similarity matrix (two passes over `block` texts at a time).

  Args:
    text: float [Nt, E] L2-normalised text features (host or device).
    video: float [Nv, E] L2-normalised video features.
    text_to_video: int [Nt], each text's ground-truth video.
    mesh, rules: where the video features and similarity blocks are sharded.
    k: candidates kept per query (0 = ranks only), clamped to the candidate count.
    block: texts per block (the last block is padded).
  Returns:
    numpy arrays: `gt` int32 [Nt] (text_to_video); `t2v` int32 [Nt], `v2t` int32 [Nv],
    `has_text` bool [Nv] (the ranks of `retrieval._rank_vectors` on the full matrix);
    `gt_sim` float32 [Nt] (each text's similarity to its video), `best` float32 [Nv] (each
    video's best ground-truth text's, -inf without one); with k > 0 also `t2v_top_sim`
    float32 / `t2v_top_idx` int32 [Nt, min(k, Nv)] (each text's best videos, best first)
    and `v2t_top_sim` / `v2t_top_idx` [Nv, min(k, Nt)] (each video's best texts).
  """
  text = np.asarray(jax.device_get(text), np.float32)
  gt = np.asarray(text_to_video, np.int32)
  nt, nv = text.shape[0], video.shape[0]
  if gt.shape != (nt,) or gt.min(initial=0) < 0 or gt.max(initial=0) >= nv:
    raise ValueError(f"text_to_video must be [Nt]={nt} indices in [0, {nv})")
  rows, cols = _column_sharding(mesh, rules, nv)
  axes = tuple(features.axes(rows.spec[0])) if len(cols.spec) == 2 else ()
  video = jax.device_put(video, rows)
  block = max(1, min(int(block), nt))
  pad = -nt % block
  text_p = np.concatenate([text, np.zeros((pad, text.shape[1]), np.float32)])
  gt_p = np.concatenate([gt, np.zeros((pad,), np.int32)])
  valid_p = np.arange(nt + pad) < nt
  kv, kt = min(int(k), nv), min(int(k), nt)
  t2v_block, v2t_block = _block_fns(mesh, axes, kv, kt)
  t2v, gt_sim, top_sim, top_idx = [], [], [], []
  for i in range(0, nt + pad, block):
    r, g, ts, ti = t2v_block(text_p[i:i + block], video, gt_p[i:i + block])
    t2v.append(np.asarray(r))
    gt_sim.append(np.asarray(g))
    if kv:
      top_sim.append(np.asarray(ts))
      top_idx.append(np.asarray(ti))
  out = {"gt": gt, "t2v": np.concatenate(t2v)[:nt].astype(np.int32),
         "gt_sim": np.concatenate(gt_sim)[:nt]}
  best = np.full((nv,), -np.inf, np.float32)
  np.maximum.at(best, gt, out["gt_sim"])
  has_text = np.isfinite(best)
  per_video = NamedSharding(mesh, P(cols.spec[1]) if len(cols.spec) == 2 else P())
  best_d = jax.device_put(np.where(has_text, best, np.inf).astype(np.float32), per_video)
  above = np.zeros((nv,), np.int64)
  v_sim = jax.device_put(np.full((nv, kt), -np.inf, np.float32), per_video)
  v_idx = jax.device_put(np.zeros((nv, kt), np.int32), per_video)
  for i in range(0, nt + pad, block):
    a, v_sim, v_idx = v2t_block(text_p[i:i + block], video, best_d, valid_p[i:i + block],
                                np.int32(i), v_sim, v_idx)
    above += np.asarray(a)
  out.update(v2t=(1 + above).astype(np.int32), has_text=has_text, best=best)
  if kv:
    out.update(t2v_top_sim=np.concatenate(top_sim)[:nt],
               t2v_top_idx=np.concatenate(top_idx)[:nt].astype(np.int32),
               v2t_top_sim=np.asarray(v_sim), v2t_top_idx=np.asarray(v_idx))
  return out


def rank_vectors(text, video, text_to_video, mesh, rules, *, block: int = 2048
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(t2v int32 [Nt], v2t int32 [Nv], has_text bool [Nv]): `scan`'s ranks, as
  `retrieval._rank_vectors` of the full matrix."""
  out = scan(text, video, text_to_video, mesh, rules, block=block)
  return out["t2v"], out["v2t"], out["has_text"]


def benchmark(n: int, mesh, rules, *, dim: int = 256, block: int = 2048, k: int = 16,
              seed: int = 0) -> dict:
  """Times `scan` on n x n random unit features (text i near video i), with the top-k
  candidates of every query and their re-ranking (`eval/rerank.py`) when k > 0.

  The stand-in pair score is the pair's feature dot product (a gather of both features), so
  the figure is the retrieval machinery's; a model's VTM forward on n x k pairs per
  direction comes on top.

  Returns:
    `retrieval_n`, `retrieval_s` (wall time of the scan and re-ranking), `retrieval_block`,
    `retrieval_rerank_k`, `retrieval_block_bytes_per_device` (block x Nv / D x 4),
    `retrieval_full_matrix_bytes` (what one [n, n] float32 matrix would take),
    `retrieval_t2v_R@1` (VTC) and, with k > 0, `retrieval_reranked_t2v_R@1`.
  """
  from vlp_jax.eval import rerank  # noqa: PLC0415  (rerank builds on this module)

  rng = np.random.default_rng(seed)
  video = rng.standard_normal((n, dim), dtype=np.float32)
  video /= np.linalg.norm(video, axis=1, keepdims=True)
  text = video + 0.05 * rng.standard_normal((n, dim), dtype=np.float32)
  text /= np.linalg.norm(text, axis=1, keepdims=True)
  gt = np.arange(n, dtype=np.int32)
  text_d, video_d = jnp.asarray(text), jnp.asarray(video)
  pair = jax.jit(lambda t, v: jnp.einsum("cke,cke->ck", text_d[t], video_d[v]))
  chunk = rerank.rows_per_chunk(4096, max(k, 1))

  def run(m):
    out = scan(text[:m], video[:m], gt[:m], mesh, rules, k=k, block=block)
    reranked = rerank.reranked_metrics(out, pair, chunk) if k else None
    return out, reranked

  run(min(n, block))  # compile
  start = time.perf_counter()
  out, reranked = run(n)
  seconds = time.perf_counter() - start
  shards = features.batch_shards(mesh, rules) if n % features.batch_shards(mesh, rules) == 0 \
      else 1
  figures = {"retrieval_n": n, "retrieval_s": seconds, "retrieval_block": block,
             "retrieval_rerank_k": k, "retrieval_devices": mesh.size,
             "retrieval_block_bytes_per_device": block * (n // shards) * 4,
             "retrieval_full_matrix_bytes": n * n * 4,
             "retrieval_t2v_R@1": float(100.0 * np.mean(out["t2v"] == 1))}
  if reranked:
    figures["retrieval_reranked_t2v_R@1"] = reranked["t2v_R@1"]
  return figures
