"""VTM re-ranking of retrieval (vlp_jax.eval.rerank, ALPRO's retrieval evaluator) against naive
numpy."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs import alpro_retrieval
from vlp_jax.eval import blockwise, dual_encoder, rerank
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
  """Numpy re-rank in both directions; `extra[t, v]` is the pair score added to `sim`."""
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


def _features(nt, nv, dim=8, seed=0):
  rng = np.random.default_rng(seed)
  unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
  return unit(rng.normal(size=(nt, dim))), unit(rng.normal(size=(nv, dim)))


def _mesh(devices):
  return Mesh(np.array(jax.devices()[:devices]).reshape(devices, 1, 1),
              ("data", "fsdp", "tensor"))


RULES = shd.rules_from_config(alpro_retrieval.get_config("tiny").sharding_rules)


@pytest.mark.parametrize("devices,nv,block", [(1, 11, 16), (8, 16, 5), (8, 11, 3)])
def test_equals_naive_rerank_and_changes_only_the_topk(devices, nv, block):
  """Block by block over 1 or 8 devices (Nv divisible or not, several text blocks), the
  re-ranked metrics equal a numpy re-rank of the full matrix."""
  rng = np.random.default_rng(0)
  nt, k = 16, 3
  text, video = _features(nt, nv)
  sim = text @ video.T
  extra = (3 * rng.normal(size=(nt, nv))).astype(np.float32)  # large: reorders the top-k
  t2v = rng.integers(0, nv, size=nt)
  calls = []

  def pair_score(text_idx, video_idx):
    calls.append((np.asarray(text_idx), np.asarray(video_idx)))
    return jnp.asarray(extra)[text_idx, video_idx]

  scan = blockwise.scan(text, video, t2v, _mesh(devices), RULES, k=k, block=block)
  # Each query's candidates are its VTC top-k, best first.
  np.testing.assert_array_equal(scan["t2v_top_idx"], np.argsort(-sim, axis=1)[:, :k])
  np.testing.assert_array_equal(scan["v2t_top_idx"], np.argsort(-sim.T, axis=1)[:, :k])
  np.testing.assert_allclose(scan["t2v_top_sim"], -np.sort(-sim, axis=1)[:, :k], atol=1e-6)
  got = rerank.reranked_metrics(scan, pair_score, chunk_rows=5)
  want, ranks = naive_reranked(sim, extra, t2v, k)
  _assert_close(got, want)
  t_ranks, _ = rerank.reranked_ranks(scan, pair_score, 5)
  np.testing.assert_array_equal(t_ranks, ranks)
  # Fixed-shape calls only ([5, k]: 16 texts -> 4 calls, nv videos -> ceil(nv / 5)).
  calls = calls[:len(calls) // 2]  # reranked_ranks repeated the same calls
  assert len(calls) == 4 + -(-nv // 5) and all(t.shape == v.shape == (5, k) for t, v in calls)
  # A text whose video is outside its VTC top-k keeps its VTC-only rank.
  vtc_rank = 1 + np.sum(sim > sim[np.arange(nt), t2v][:, None], axis=1)
  outside = vtc_rank > k
  assert outside.any() and (~outside).any()
  np.testing.assert_array_equal(np.asarray(ranks)[outside], vtc_rank[outside])
  assert (np.asarray(ranks)[~outside] <= k).all()
  # And the re-ranking did change something inside the top-k.
  assert got != {n: v for n, v in retrieval_metrics(sim, t2v).items()}


def test_no_extra_score_gives_vtc_metrics():
  text, video = _features(9, 9, seed=1)
  scan = blockwise.scan(text, video, np.arange(9), _mesh(1), RULES, k=4, block=4)
  got = rerank.reranked_metrics(scan, lambda t, v: jnp.zeros(t.shape), 2)
  _assert_close(got, retrieval_metrics(text @ video.T, np.arange(9)))


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
  """Re-ranked by the sum of the two heads' logits: sim / temperature + VTM log-odds."""
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
    logits = app(ALPRO.vtm_logits, fused)
    return sim, app(ALPRO.temperature), (logits[:, 1] - logits[:, 0]).reshape(n, n)

  sim, temp, log_odds = map(np.asarray, direct(jax.device_get(params), rows["video"],
                                               rows["text_ids"], rows["text_mask"]))
  n = sim.shape[0]
  assert np.ptp(log_odds) > 1e-3  # the pair scores really differ

  want, _ = naive_reranked(sim / temp, log_odds, np.arange(n), 4)
  # The scales matter: here an unscaled `sim + log-odds` sum ranks differently.
  assert want != naive_reranked(sim, log_odds, np.arange(n), 4)[0]
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


def _with_probes(batches, max_len, seed=3):
  rng = np.random.default_rng(seed)
  out = []
  for b in batches:
    b = dict(b)
    n = b["video"].shape[0]
    b["probe_ids"] = rng.integers(5, 40, size=(n, 2, max_len)).astype(np.int32)
    b["probe_mask"] = np.ones((n, 2, max_len), np.int32)
    b["has_probe"] = b["valid"] & (np.arange(n) % 3 != 0)  # some clips have no probe
    b["label"] = rng.integers(-1, 3, size=n).astype(np.int32)  # -1: a clip without a class
    out.append(b)
  return out


@pytest.mark.parametrize("temporal", ["divided", "none"])
def test_task_evaluate_probe_metrics_against_the_model_applied_directly(temporal):
  """contrast_acc, probe_cos, clip_cos and reversal_cos over the valid clips with a probe; an
  encoder without temporal attention gives a clip and its reversal the same feature (cosine 1)."""
  task, batches = _task_and_batches()
  # The demo's init: the temporal path is not zero at init.
  task.config.model.video.update(temporal=temporal, time_init_std=1.0,
                                 temporal_dense_init_std=0.2)
  task = ALPROTask(task.config, TextInfo(None, 40))
  batches = _with_probes(batches, task.config.data.max_text_len)
  mesh = Mesh(np.array(jax.devices()).reshape(8, 1, 1), ("data", "fsdp", "tensor"))
  rules = shd.rules_from_config(task.config.sharding_rules)
  params = nn.unbox(jax.jit(task.init_params)(jax.random.PRNGKey(0)))
  got, _ = task.evaluators()["retrieval"]({"model": params}, batches, mesh, rules,
                                          task.config.evals.test)

  keep = np.concatenate([b["has_probe"] for b in batches])
  cat = lambda k: np.concatenate([b[k] for b in batches])[keep]
  app = lambda method, *a: task.model.apply({"params": params}, *a, method=method)
  video = cat("video")
  v = np.asarray(app(ALPRO.video_feature, app(ALPRO.encode_video, video)))
  vr = np.asarray(app(ALPRO.video_feature, app(ALPRO.encode_video, video[:, ::-1])))
  ids, mask = cat("probe_ids"), cat("probe_mask")
  n, _, length = ids.shape
  p = np.asarray(app(ALPRO.text_feature, app(ALPRO.encode_text, ids.reshape(2 * n, length),
                                             mask.reshape(2 * n, length)))).reshape(n, 2, -1)
  scores = np.einsum("be,bke->bk", v, p)
  assert n == 8 and np.ptp(scores[:, 0] - scores[:, 1]) > 1e-4
  assert got["retrieval/contrast_acc"] == pytest.approx(100 * np.mean(scores[:, 0] > scores[:, 1]))
  assert got["retrieval/probe_cos"] == pytest.approx(np.mean(np.sum(p[:, 0] * p[:, 1], -1)),
                                                     abs=1e-5)
  c = v @ v.T
  assert got["retrieval/clip_cos"] == pytest.approx((c.sum() - np.trace(c)) / (n * n - n),
                                                    abs=1e-5)
  want = np.mean(np.sum(v * vr, -1))
  assert got["retrieval/reversal_cos"] == pytest.approx(want, abs=1e-5)
  if temporal == "none":
    assert want == pytest.approx(1.0, abs=1e-5)
  else:
    assert 1.0 - want > 5e-5  # small at init, but well above float32 error (none: < 1e-5)
  # Per class of the probe clips (no class list here: keyed by the label index).
  label = cat("label")
  classes = sorted(set(label[label >= 0].tolist()))
  assert len(classes) >= 2
  for c in classes:
    rows = label == c
    assert got[f"retrieval/contrast_acc/{c}"] == pytest.approx(
        100 * np.mean(scores[rows, 0] > scores[rows, 1]))
    assert got[f"retrieval/probe_cos/{c}"] == pytest.approx(
        np.mean(np.sum(p[rows, 0] * p[rows, 1], -1)), abs=1e-5)
    assert got[f"retrieval/reversal_cos/{c}"] == pytest.approx(
        np.mean(np.sum(v[rows] * vr[rows], -1)), abs=1e-5)
  assert not any(k.endswith("/-1") for k in got)
  # With a class list the keys are the names, spaces as "_"; a label past the list fails.
  names = ["moving left", "moving right", "grows"]
  named = dual_encoder.probe_metrics({"video": v, "probe": p, "has_probe": np.ones(n, bool),
                                      "label": label}, lambda: names)
  for c in classes:
    key = names[c].replace(" ", "_")
    assert named[f"contrast_acc/{key}"] == pytest.approx(got[f"retrieval/contrast_acc/{c}"])
    assert f"contrast_acc/{c}" not in named
  with pytest.raises(ValueError, match=f"label {max(classes)}, but the class list has"):
    dual_encoder.probe_metrics({"video": v, "probe": p, "has_probe": np.ones(n, bool),
                                "label": label}, lambda: names[:max(classes)])
  # A split without probes (or none valid) reports none of them; one clip has no clip_cos.
  one = np.arange(n) == 0
  assert "clip_cos" not in dual_encoder.probe_metrics({"video": v, "probe": p, "has_probe": one})
  assert dual_encoder.probe_metrics({"video": v}) == {}
  assert dual_encoder.probe_metrics({"video": v, "probe": p, "has_probe": np.zeros(n, bool)}) == {}


def test_task_class_names_for_probe_metrics(tmp_path):
  """The per-class keys use data.classes (or DATA_DIR/classes.txt); without a list, the label
  index; a malformed list fails rather than being ignored."""
  c = alpro_retrieval.get_config("tiny")

  def names(**data):
    cfg = c.copy_and_resolve_references()
    cfg.data.update(data)
    return ALPROTask(cfg, TextInfo(None, 40))._class_names

  assert names(classes="", dir="") is None
  assert names(classes="", dir=str(tmp_path)) is None  # no classes.txt there
  (tmp_path / "classes.txt").write_text("moving left\nmoving right\n")
  assert names(classes="", dir=str(tmp_path)) == ["moving left", "moving right"]
  bad = tmp_path / "bad.txt"
  bad.write_text("a\n\nb\n")
  with pytest.raises(ValueError, match="blank line"):
    names(classes=str(bad))
