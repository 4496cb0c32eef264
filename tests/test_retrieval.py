"""Tests of vlp_jax.eval.retrieval against naive numpy ranking."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlp_jax.eval.retrieval import rerank_topk, retrieval_metrics

KEYS = [f"{d}_{m}" for d in ("t2v", "v2t")
        for m in ("R@1", "R@5", "R@10", "MdR", "MnR")]


def _summary(ranks, prefix):
  ranks = np.asarray(ranks, np.float64)
  out = {f"{prefix}_R@{k}": 100.0 * np.mean(ranks <= k) for k in (1, 5, 10)}
  out[f"{prefix}_MdR"] = float(np.median(ranks))
  out[f"{prefix}_MnR"] = float(np.mean(ranks))
  return out


def _np_metrics(sim, t2v):
  """Loops: rank = 1 + #candidates strictly above the ground truth; v2t = best gt text."""
  nt, nv = sim.shape
  t_ranks = []
  for i in range(nt):
    gt = sim[i, t2v[i]]
    t_ranks.append(1 + sum(1 for j in range(nv) if sim[i, j] > gt))
  v_ranks = []
  for j in range(nv):
    gts = [i for i in range(nt) if t2v[i] == j]
    if not gts:
      continue
    v_ranks.append(min(1 + sum(1 for k in range(nt) if sim[k, j] > sim[i, j]) for i in gts))
  out = _summary(t_ranks, "t2v")
  out.update(_summary(v_ranks, "v2t"))
  return out


def _assert_metrics_close(got, want):
  assert sorted(got) == sorted(KEYS)
  for k in KEYS:
    assert isinstance(got[k], float)
    assert got[k] == pytest.approx(want[k], abs=1e-4), k


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_naive_ranking_with_ties_and_shared_videos(seed):
  rng = np.random.default_rng(seed)
  nt, nv = 37, 13
  # Few distinct values: many ties. Several texts per video, and video 0 has none.
  sim = rng.integers(0, 4, size=(nt, nv)).astype(np.float32)
  t2v = rng.integers(1, nv, size=nt)
  got = retrieval_metrics(sim, t2v)
  _assert_metrics_close(got, _np_metrics(sim, t2v))
  # Continuous values too (ranks spread beyond 10).
  sim = rng.normal(size=(nt, nv)).astype(np.float32)
  _assert_metrics_close(retrieval_metrics(jnp.asarray(sim), t2v), _np_metrics(sim, t2v))


def test_hand_computed_example():
  sim = np.array([
      [0.9, 0.9, 0.1],   # text 0 -> video 1: tied with video 0, ties favour it: rank 1
      [0.8, 0.2, 0.5],   # text 1 -> video 2: video 0 is above: rank 2
      [0.1, 0.3, 0.7],   # text 2 -> video 2: rank 1
  ], np.float32)
  t2v = np.array([1, 2, 2])
  m = retrieval_metrics(sim, t2v)
  assert m["t2v_R@1"] == pytest.approx(200 / 3)
  assert m["t2v_MdR"] == 1.0 and m["t2v_MnR"] == pytest.approx(4 / 3)
  # v2t: video 0 has no text (excluded); video 1: column [.9,.2,.3], gt text 0 rank 1;
  # video 2: column [.1,.5,.7], gt texts 1 (rank 2) and 2 (rank 1) -> best 1.
  assert m["v2t_R@1"] == 100.0 and m["v2t_MdR"] == 1.0 and m["v2t_MnR"] == 1.0


def test_perfect_diagonal():
  sim = np.eye(12, dtype=np.float32) + 0.01 * np.random.default_rng(3).random((12, 12))
  sim = sim.astype(np.float32)
  m = retrieval_metrics(sim, np.arange(12))
  for d in ("t2v", "v2t"):
    assert m[f"{d}_R@1"] == 100.0 and m[f"{d}_R@10"] == 100.0
    assert m[f"{d}_MdR"] == 1.0 and m[f"{d}_MnR"] == 1.0


def test_worst_case_and_even_median():
  # Anti-diagonal-ish: ground truth always the smallest.
  sim = -np.eye(4, dtype=np.float32)
  m = retrieval_metrics(sim, np.arange(4))
  assert m["t2v_R@1"] == 0.0 and m["t2v_MdR"] == 4.0 and m["t2v_MnR"] == 4.0
  # Ranks [1, 2] -> MdR 1.5 (median of 1-based ranks).
  m = retrieval_metrics(np.array([[1.0, 0.0], [1.0, 0.0]], np.float32), np.array([0, 1]))
  assert m["t2v_MdR"] == 1.5


def test_sharded_sim_equals_unsharded():
  rng = np.random.default_rng(4)
  nt, nv = 32, 16
  sim = rng.integers(0, 6, size=(nt, nv)).astype(np.float32)
  t2v = rng.integers(0, nv, size=nt).astype(np.int32)
  mesh = Mesh(np.array(jax.devices()).reshape(8), ("data",))
  sim_s = jax.device_put(sim, NamedSharding(mesh, P("data", None)))
  t2v_s = jax.device_put(t2v, NamedSharding(mesh, P("data")))
  assert len(sim_s.sharding.device_set) == 8
  got = retrieval_metrics(sim_s, t2v_s)
  assert got == retrieval_metrics(sim, t2v)
  _assert_metrics_close(got, _np_metrics(sim, t2v))


def test_validation_errors():
  sim = np.zeros((4, 3), np.float32)
  with pytest.raises(ValueError, match=r"\[Nt, Nv\]"):
    retrieval_metrics(np.zeros(4, np.float32), np.arange(4))
  with pytest.raises(ValueError, match="shape"):
    retrieval_metrics(sim, np.array([0, 1, 2]))
  with pytest.raises(ValueError, match="outside"):
    retrieval_metrics(sim, np.array([0, 1, 2, 3]))
  with pytest.raises(ValueError, match="first at text 1"):
    retrieval_metrics(sim, np.array([0, -1, 2, 1]))
  with pytest.raises(ValueError, match="integer"):
    retrieval_metrics(sim, np.array([0.0, 1.0, 2.0, 1.0]))
  with pytest.raises(ValueError, match="non-finite"):
    bad = sim.copy()
    bad[2, 1] = np.nan
    retrieval_metrics(bad, np.array([0, 1, 2, 1]))
  with pytest.raises(ValueError, match="empty"):
    retrieval_metrics(np.zeros((0, 3), np.float32), np.zeros(0, np.int32))


def test_rerank_topk_reorders_only_within_topk():
  rng = np.random.default_rng(5)
  nt, nv, k = 6, 10, 3
  sim = rng.normal(size=(nt, nv)).astype(np.float32)
  # Large extra scores so the order inside the top-k really changes.
  extra = (5 * rng.normal(size=(nt, nv))).astype(np.float32)
  calls = []

  def score_fn(text_idx, video_idx):
    calls.append((np.asarray(text_idx), np.asarray(video_idx)))
    return jnp.asarray(extra)[text_idx, video_idx]

  new = np.asarray(rerank_topk(jnp.asarray(sim), k, score_fn))
  assert new.shape == sim.shape
  (text_idx, video_idx), = calls
  assert text_idx.shape == video_idx.shape == (nt, k)
  np.testing.assert_array_equal(text_idx, np.repeat(np.arange(nt)[:, None], k, 1))

  changed_inside = False
  for i in range(nt):
    old_order = np.argsort(-sim[i], kind="stable")
    top, rest = old_order[:k], old_order[k:]
    assert set(video_idx[i]) == set(top)
    new_order = np.argsort(-new[i], kind="stable")
    # Same top-k set, re-ordered by sim + extra.
    assert set(new_order[:k]) == set(top)
    np.testing.assert_allclose(new[i, top], sim[i, top] + extra[i, top], rtol=1e-6)
    np.testing.assert_array_equal(new_order[:k], top[np.argsort(-(sim[i, top] + extra[i, top]))])
    changed_inside |= not np.array_equal(new_order[:k], top)
    # Everything else keeps its order and stays below the top-k.
    np.testing.assert_array_equal(new_order[k:], rest)
    assert new[i, rest].max() < new[i, top].min()
  assert changed_inside  # the test data actually exercised a re-order

  # k larger than the number of videos: everything is re-scored.
  full = np.asarray(rerank_topk(sim, 50, lambda t, v: jnp.asarray(extra)[t, v]))
  np.testing.assert_allclose(full, sim + extra, rtol=1e-6)
  with pytest.raises(ValueError, match="k must be"):
    rerank_topk(sim, 0, score_fn)


@pytest.mark.parametrize("nv", [48, 45])  # 45: not divisible by the 8 shards (replicated)
def test_blockwise_ranks_equal_the_full_matrix_on_8_devices(nv):
  from configs import alpro_pretrain
  from vlp_jax.eval import blockwise
  from vlp_jax.eval import retrieval as retrieval_lib
  from vlp_jax.parallel import mesh as mesh_lib
  from vlp_jax.parallel import sharding as shd
  mesh = mesh_lib.make_mesh(dict(data=4, fsdp=2, tensor=1), jax.devices()[:8])
  rules = shd.rules_from_config(alpro_pretrain.get_config("tiny").sharding_rules)
  rng = np.random.default_rng(nv)
  norm = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
  video = norm(rng.normal(size=(nv, 16)))
  gt = rng.integers(0, nv - 3, 100).astype(np.int32)  # shared videos; the last 3 have no text
  text = norm(video[gt] + 0.9 * rng.normal(size=(100, 16)))
  sim = text @ video.T
  want_t2v, want_v2t, want_has = jax.device_get(retrieval_lib._ranks(sim, gt))
  t2v, v2t, has = blockwise.rank_vectors(text, video, gt, mesh, rules, block=16)  # 100 = 6x16+4
  np.testing.assert_array_equal(t2v, want_t2v)
  np.testing.assert_array_equal(has, want_has)
  np.testing.assert_array_equal(v2t[has], want_v2t[has])
  assert retrieval_lib.metrics_from_ranks(t2v, v2t, has) == retrieval_metrics(sim, gt)
  with pytest.raises(ValueError, match="text_to_video"):
    blockwise.rank_vectors(text, video, gt + nv, mesh, rules)
