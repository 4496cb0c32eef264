"""Retrieval ranks over sets too large for one similarity matrix, block by block.

The texts are taken `block` rows at a time; each block's similarities to all videos,
float32 [block, Nv], live sharded by video over the mesh's batch axes, and only per-query
counts leave the devices. Memory per device: block x Nv / D floats for the similarity block
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


@functools.partial(jax.jit, static_argnames=("cols",))
def _t2v_block(text, video, gt, cols):
  """(ranks int32 [b], ground-truth similarity float32 [b]) of one text block."""
  s = jax.lax.with_sharding_constraint(
      jnp.einsum("te,ve->tv", text.astype(jnp.float32), video.astype(jnp.float32)), cols)
  # The ground truth's similarity taken from s itself (a masked sum: no gather of a sharded
  # row), so it compares equal to its own column.
  own = jnp.arange(s.shape[1])[None, :] == gt[:, None]
  gt_sim = jnp.sum(jnp.where(own, s, 0.0), axis=1)
  return 1 + jnp.sum(s > gt_sim[:, None], axis=1, dtype=jnp.int32), gt_sim


@functools.partial(jax.jit, static_argnames=("cols",))
def _v2t_block(text, video, best, valid, cols):
  """int32 [Nv]: texts of this block more similar to each video than its best ground truth."""
  s = jax.lax.with_sharding_constraint(
      jnp.einsum("te,ve->tv", text.astype(jnp.float32), video.astype(jnp.float32)), cols)
  return jnp.sum((s > best[None, :]) & valid[:, None], axis=0, dtype=jnp.int32)


def rank_vectors(text, video, text_to_video, mesh, rules, *, block: int = 2048
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Retrieval ranks without the full [Nt, Nv] similarity matrix.

  Args:
    text: float [Nt, E] L2-normalised text features (host or device).
    video: float [Nv, E] L2-normalised video features.
    text_to_video: int [Nt], each text's ground-truth video.
    mesh, rules: where the video features and similarity blocks are sharded.
    block: texts per block (the last block is padded).
  Returns:
    (t2v int32 [Nt], v2t int32 [Nv], has_text bool [Nv]) as numpy, as
    `retrieval._rank_vectors` of the full matrix.
  """
  text = np.asarray(jax.device_get(text), np.float32)
  gt = np.asarray(text_to_video, np.int32)
  nt, nv = text.shape[0], video.shape[0]
  if gt.shape != (nt,) or gt.min(initial=0) < 0 or gt.max(initial=0) >= nv:
    raise ValueError(f"text_to_video must be [Nt]={nt} indices in [0, {nv})")
  rows, cols = _column_sharding(mesh, rules, nv)
  video = jax.device_put(video, rows)
  block = max(1, min(int(block), nt))
  pad = -nt % block
  text_p = np.concatenate([text, np.zeros((pad, text.shape[1]), np.float32)])
  gt_p = np.concatenate([gt, np.zeros((pad,), np.int32)])
  valid_p = np.arange(nt + pad) < nt
  t2v, gt_sim = [], []
  for i in range(0, nt + pad, block):
    r, g = _t2v_block(text_p[i:i + block], video, gt_p[i:i + block], cols)
    t2v.append(np.asarray(r))
    gt_sim.append(np.asarray(g))
  t2v = np.concatenate(t2v)[:nt]
  gt_sim = np.concatenate(gt_sim)[:nt]
  best = np.full((nv,), -np.inf, np.float32)
  np.maximum.at(best, gt, gt_sim)
  has_text = np.isfinite(best)
  per_video = NamedSharding(mesh, P(cols.spec[1]) if len(cols.spec) == 2 else P())
  best_d = jax.device_put(np.where(has_text, best, np.inf).astype(np.float32), per_video)
  above = np.zeros((nv,), np.int64)
  for i in range(0, nt + pad, block):
    above += np.asarray(_v2t_block(text_p[i:i + block], video, best_d, valid_p[i:i + block],
                                   cols))
  return t2v.astype(np.int32), (1 + above).astype(np.int32), has_text


def benchmark(n: int, mesh, rules, *, dim: int = 256, block: int = 2048, seed: int = 0
              ) -> dict:
  """Times `rank_vectors` on n x n random unit features (text i near video i).

  Returns:
    `retrieval_n`, `retrieval_s` (wall time of both passes), `retrieval_block`,
    `retrieval_block_bytes_per_device` (block x Nv / D x 4), `retrieval_full_matrix_bytes`
    (what one [n, n] float32 matrix would take), `retrieval_t2v_R@1`.
  """
  rng = np.random.default_rng(seed)
  video = rng.standard_normal((n, dim), dtype=np.float32)
  video /= np.linalg.norm(video, axis=1, keepdims=True)
  text = video + 0.05 * rng.standard_normal((n, dim), dtype=np.float32)
  text /= np.linalg.norm(text, axis=1, keepdims=True)
  gt = np.arange(n, dtype=np.int32)
  rank_vectors(text[:block], video[:block], gt[:block], mesh, rules, block=block)  # compile
  start = time.perf_counter()
  t2v, _, _ = rank_vectors(text, video, gt, mesh, rules, block=block)
  seconds = time.perf_counter() - start
  shards = features.batch_shards(mesh, rules) if n % features.batch_shards(mesh, rules) == 0 \
      else 1
  return {"retrieval_n": n, "retrieval_s": seconds, "retrieval_block": block,
          "retrieval_devices": mesh.size,
          "retrieval_block_bytes_per_device": block * (n // shards) * 4,
          "retrieval_full_matrix_bytes": n * n * 4,
          "retrieval_t2v_R@1": float(100.0 * np.mean(t2v == 1))}
