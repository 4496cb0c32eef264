"""VTM re-ranking of retrieval (vlp_jax.eval.rerank, ALPRO's retrieval evaluator) against naive
numpy."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs import alpro_retrieval
from vlp_jax.eval import rerank
from vlp_jax.eval.retrieval import retrieval_metrics
from vlp_jax.models.alpro import ALPRO
from vlp_jax.parallel import sharding as shd
from vlp_jax.data.setup import TextInfo
from vlp_jax.methods.alpro.pretrain import ALPROTask


def _orders(scores, extra, k):
  """Per row: candidates in re-ranked order (top-k by score re-sorted by score + extra, then
  the rest in score order)."""
  out = []
  for i in range(scores.shape[0]):
    order = np.argsort(-scores[i], kind="stable")
    top, rest = order[:k], order[k:]
    top = top[np.argsort(-(scores[i, top] + extra[i, top]), kind="stable")]
    out.append(np.concatenate([top, rest]))
  return out


def _summary(ranks, prefix):
  ranks = np.asarray(ranks, np.float64)
  out = {f"{prefix}_R@{r}": 100.0 * np.mean(ranks <= r) for r in (1, 5, 10)}
  out[f"{prefix}_MdR"] = float(np.median(ranks))
  out[f"{prefix}_MnR"] = float(np.mean(ranks))
  return out


def naive_reranked(sim, extra, t2v, k):
  """Numpy re-rank in both directions; `extra[t, v]` is the pair score (VTM logit)."""
  nt, nv = sim.shape
  t_orders = _orders(sim, extra, k)
  t_ranks = [1 + int(np.nonzero(t_orders[i] == t2v[i])[0][0]) for i in range(nt)]
  v_orders = _orders(sim.T, extra.T, k)
  v_ranks = []
  for j in range(nv):
    gts = [i for i in range(nt) if t2v[i] == j]
    if gts:
      v_ranks.append(min(1 + int(np.nonzero(v_orders[j] == i)[0][0]) for i in gts))
  out = _summary(t_ranks, "t2v")
  out.update(_summary(v_ranks, "v2t"))
  return out, t_ranks


def _assert_close(got, want):
  assert sorted(got) == sorted(want)
  for key in want:
    assert got[key] == pytest.approx(want[key], abs=1e-4), key


def test_rows_per_chunk():
  assert rerank.rows_per_chunk(64, 16) == 4
  assert rerank.rows_per_chunk(8, 16) == 1          # at least one query
  assert rerank.rows_per_chunk(64, 16, 8) == 4      # 4 * 16 pairs split over 8 shards
  assert rerank.rows_per_chunk(20, 3, 8) == 8       # 6 rows -> 8 so that 8 * 3 % 8 == 0
  assert rerank.rows_per_chunk(20, 6, 8) == 4       # 3 rows -> 4: 24 pairs


@pytest.mark.parametrize("sharded", [False, True])
def test_equals_naive_rerank_and_changes_only_the_topk(sharded):
  rng = np.random.default_rng(0)
  nt, nv, k = 16, 11, 3
  sim = rng.normal(size=(nt, nv)).astype(np.float32)
  extra = (3 * rng.normal(size=(nt, nv))).astype(np.float32)  # large: reorders the top-k
  t2v = rng.integers(0, nv, size=nt)
  calls = []

  def pair_score(text_idx, video_idx):
    calls.append((np.asarray(text_idx), np.asarray(video_idx)))
    return jnp.asarray(extra)[text_idx, video_idx]

  s = sim
  if sharded:
    mesh = Mesh(np.array(jax.devices()).reshape(8), ("data",))
    s = jax.device_put(sim, NamedSharding(mesh, P("data", None)))
  got = rerank.reranked_metrics(s, t2v, k, pair_score, chunk_rows=5)
  want, ranks = naive_reranked(sim, extra, t2v, k)
  _assert_close(got, want)
  # Fixed-shape calls only ([5, k]: 16 texts -> 4 calls, 11 videos -> 3), and only top-k pairs.
  assert len(calls) == 4 + 3 and all(t.shape == v.shape == (5, k) for t, v in calls)
  for t, v in calls[:4]:
    for i, j in zip(t.ravel(), v.ravel()):
      assert j in np.argsort(-sim[i])[:k]
  # A text whose video is outside its VTC top-k keeps its VTC-only rank.
  vtc_rank = 1 + np.sum(sim > sim[np.arange(nt), t2v][:, None], axis=1)
  outside = vtc_rank > k
  assert outside.any() and (~outside).any()
  np.testing.assert_array_equal(np.asarray(ranks)[outside], vtc_rank[outside])
  assert (np.asarray(ranks)[~outside] <= k).all()
  # And the re-ranking did change something inside the top-k.
  assert got != {n: v for n, v in retrieval_metrics(sim, t2v).items()}


def test_no_extra_score_gives_vtc_metrics():
  rng = np.random.default_rng(1)
  sim = rng.normal(size=(9, 9)).astype(np.float32)
  got = rerank.reranked_metrics(sim, np.arange(9), 4, lambda t, v: jnp.zeros(t.shape), 2)
  _assert_close(got, retrieval_metrics(sim, np.arange(9)))


# ----------------------------------------------------------------------------------------
# ALPRO's retrieval evaluator with re-ranking on a tiny random model


def _task_and_batches():
  c = alpro_retrieval.get_config("tiny")
  c.evals.test.rerank_k = 4
  c.eval_batch_size = 8
  task = ALPROTask(c, TextInfo(None, 40))
  rng = np.random.default_rng(2)
  d = c.data
  batches = []
  for n_valid in (8, 5):  # the last batch is padded with 3 invalid rows
    b = task.dummy_batch(8)
    b["video"] = rng.normal(size=b["video"].shape).astype(np.float32)
    b["text_ids"] = rng.integers(5, 40, size=b["text_ids"].shape).astype(np.int32)
    lengths = rng.integers(3, d.max_text_len + 1, size=8)
    b["text_mask"] = (np.arange(d.max_text_len)[None] < lengths[:, None]).astype(np.int32)
    b["valid"] = np.arange(8) < n_valid
    batches.append(b)
  return task, batches


def test_task_evaluate_reranks_with_vtm_logits():
  task, batches = _task_and_batches()
  mesh = Mesh(np.array(jax.devices()).reshape(8, 1, 1), ("data", "fsdp", "tensor"))
  rules = shd.rules_from_config(task.config.sharding_rules)
  params = nn.unbox(jax.jit(task.init_params)(jax.random.PRNGKey(0)))
  params = jax.device_put(params, NamedSharding(mesh, P()))
  got, arrays = task.evaluators()["retrieval"]({"model": params}, batches, mesh, rules,
                                               task.config.evals.test)

  # Naive: the model applied directly to the 13 valid rows, every (text, video) pair fused.
  rows = {k: np.concatenate([b[k][b["valid"]] for b in batches])
          for k in ("video", "text_ids", "text_mask")}

  @jax.jit
  def direct(p, video, ids, mask):
    app = lambda method, *a: task.model.apply({"params": p}, *a, method=method)
    v = app(ALPRO.encode_video, video)
    t = app(ALPRO.encode_text, ids, mask)
    sim = app(ALPRO.text_feature, t) @ app(ALPRO.video_feature, v).T
    n = sim.shape[0]
    ti, vi = jnp.repeat(jnp.arange(n), n), jnp.tile(jnp.arange(n), n)
    fused = app(ALPRO.fuse, t[ti], mask[ti], v[vi])
    return sim, app(ALPRO.vtm_logits, fused)[:, 1].reshape(n, n)

  sim, vtm = map(np.asarray, direct(jax.device_get(params), rows["video"], rows["text_ids"],
                                    rows["text_mask"]))
  n = sim.shape[0]
  assert np.ptp(vtm) > 1e-3  # the pair scores really differ

  want, _ = naive_reranked(sim, vtm, np.arange(n), 4)
  _assert_close({k[len("retrieval/"):]: v for k, v in got.items()
                 if k.startswith("retrieval/")}, want)
  _assert_close({k[len("retrieval_vtc/"):]: v for k, v in got.items()
                 if k.startswith("retrieval_vtc/")}, retrieval_metrics(sim, np.arange(n)))
  # The report's arrays: the VTC similarity block and every query's VTC rank.
  np.testing.assert_allclose(arrays["similarity"], sim[:n, :n], rtol=1e-5, atol=1e-6)
  want_t2v = 1 + np.sum(sim > np.diag(sim)[:, None], axis=1)
  want_v2t = 1 + np.sum(sim > np.diag(sim)[None, :], axis=0)
  np.testing.assert_array_equal(arrays["t2v_rank"], want_t2v)
  np.testing.assert_array_equal(arrays["v2t_rank"], want_v2t)
