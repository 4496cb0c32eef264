"""Tests of vlp_jax.losses against naive float64 numpy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlp_jax.losses import (IGNORE_INDEX, mlm_loss, reversal_nce, sample_hard_negatives,
                            twin_cosine, vtc_loss, vtm_loss)


def _unit_rows(rng, b, e):
  x = rng.normal(size=(b, e))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _lse(xs):
  m = max(xs)
  return m + np.log(sum(np.exp(x - m) for x in xs))


def _np_vtc(v, t, temp):
  """Per-sample VTC with explicit loops, float64."""
  v = np.asarray(v, np.float64)
  t = np.asarray(t, np.float64)
  b = v.shape[0]
  logits = [[float(np.dot(t[i], v[j])) / temp for j in range(b)] for i in range(b)]
  out = []
  for i in range(b):
    t2v = _lse([logits[i][j] for j in range(b)]) - logits[i][i]
    v2t = _lse([logits[j][i] for j in range(b)]) - logits[i][i]
    out.append(0.5 * (t2v + v2t))
  return np.array(out), np.array(logits)


def test_vtc_value_and_metrics():
  rng = np.random.default_rng(0)
  v, t = _unit_rows(rng, 6, 4), _unit_rows(rng, 6, 4)
  temp = np.float32(0.07)
  per, metrics, logits = vtc_loss(v, t, temp)
  ref, ref_logits = _np_vtc(v, t, 0.07)
  assert per.shape == (6,) and per.dtype == jnp.float32
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(per, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-4)
  target = np.arange(6)
  np.testing.assert_allclose(metrics["vtc/t2v_acc"],
                             np.mean(ref_logits.argmax(1) == target), atol=1e-7)
  np.testing.assert_allclose(metrics["vtc/v2t_acc"],
                             np.mean(ref_logits.argmax(0) == target), atol=1e-7)


def test_vtc_valid_mask_equals_the_valid_sub_batch():
  rng = np.random.default_rng(3)
  v, t = _unit_rows(rng, 6, 4), _unit_rows(rng, 6, 4)
  valid = np.array([True, True, False, True, True, False])
  per, metrics, _ = vtc_loss(v, t, jnp.float32(0.1), valid)
  ref, ref_logits = _np_vtc(v[valid], t[valid], 0.1)
  np.testing.assert_allclose(per[valid], ref, rtol=1e-5, atol=1e-5)
  assert (np.asarray(per)[~valid] == 0).all()
  target = np.arange(4)
  assert float(metrics["vtc/t2v_acc"]) == pytest.approx(np.mean(ref_logits.argmax(1) == target))
  assert float(metrics["vtc/v2t_acc"]) == pytest.approx(np.mean(ref_logits.argmax(0) == target))


def test_vtc_accuracy_on_known_batch():
  # Text 0 and 1 both point at video 0; text 2 at video 2: t2v 2/3 correct. Column 1's
  # best text is text 0 or 1 (tie broken to 0), so v2t is also checked against argmax.
  v = np.eye(3, dtype=np.float32)
  t = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 1]], np.float32)
  _, metrics, _ = vtc_loss(v, t, jnp.float32(0.1))
  assert float(metrics["vtc/t2v_acc"]) == pytest.approx(2 / 3)
  # Columns: video 0 -> text 0 (correct), video 1 -> all zero, argmax 0 (wrong),
  # video 2 -> text 2 (correct).
  assert float(metrics["vtc/v2t_acc"]) == pytest.approx(2 / 3)


def _fd_grad(f, x, h=1e-5):
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    xp, xm = x.copy(), x.copy()
    xp[idx] += h
    xm[idx] -= h
    g[idx] = (f(xp) - f(xm)) / (2 * h)
  return g


def test_vtc_gradient_matches_finite_differences():
  rng = np.random.default_rng(1)
  b, e = 4, 3
  v, t = _unit_rows(rng, b, e), _unit_rows(rng, b, e)
  temp = 0.1
  # A random weighting checks the gradient of every per-sample entry, not only the mean.
  w = rng.uniform(0.5, 1.5, size=b)

  def np_obj(v_, t_, temp_):
    return float(np.dot(w, _np_vtc(v_, t_, float(temp_))[0]))

  v64, t64 = v.astype(np.float64), t.astype(np.float64)
  gv_ref = _fd_grad(lambda x: np_obj(x, t64, temp), v64)
  gt_ref = _fd_grad(lambda x: np_obj(v64, x, temp), t64)
  gtemp_ref = _fd_grad(lambda x: np_obj(v64, t64, x[()]), np.array(temp, np.float64))

  def obj(v_, t_, temp_):
    return jnp.sum(jnp.asarray(w, jnp.float32) * vtc_loss(v_, t_, temp_)[0])

  gv, gt, gtemp = jax.grad(obj, argnums=(0, 1, 2))(v, t, jnp.float32(temp))
  np.testing.assert_allclose(gv, gv_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gt, gt_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gtemp, gtemp_ref, rtol=1e-5, atol=1e-5)


def test_vtc_sharded_global_batch_equals_unsharded():
  rng = np.random.default_rng(2)
  b, e = 16, 8
  v, t = _unit_rows(rng, b, e), _unit_rows(rng, b, e)
  temp = jnp.float32(0.05)
  mesh = Mesh(np.array(jax.devices()).reshape(8), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  v_s, t_s = jax.device_put(v, sharding), jax.device_put(t, sharding)
  temp_r = jax.device_put(temp, NamedSharding(mesh, P()))
  assert len(v_s.sharding.device_set) == 8

  per_s, m_s, logits_s = jax.jit(vtc_loss)(v_s, t_s, temp_r)
  dev0 = jax.devices()[0]
  per_u, m_u, logits_u = jax.jit(vtc_loss)(jax.device_put(v, dev0),
                                           jax.device_put(t, dev0), temp)
  np.testing.assert_allclose(per_s, per_u, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(logits_s, logits_u, rtol=1e-6, atol=1e-6)
  for k in m_u:
    np.testing.assert_allclose(m_s[k], m_u[k])
  # And both are the global-batch loss (targets = arange over all 16, not per shard).
  np.testing.assert_allclose(per_s, _np_vtc(v, t, 0.05)[0], rtol=1e-5, atol=1e-5)


def test_vtc_rejects_bad_shapes():
  with pytest.raises(ValueError, match="same shape"):
    vtc_loss(np.zeros((4, 3), np.float32), np.zeros((5, 3), np.float32), 0.07)
  with pytest.raises(ValueError, match="scalar"):
    vtc_loss(np.zeros((4, 3), np.float32), np.zeros((4, 3), np.float32), np.ones(2))


def _masked_softmax(logits, axis):
  x = np.array(logits, np.float64)
  np.fill_diagonal(x, -np.inf)
  x = x - x.max(axis=axis, keepdims=True)
  p = np.exp(x)
  return p / p.sum(axis=axis, keepdims=True)


@pytest.mark.parametrize("sharpness", [1.0, 0.5, 0.0])
def test_hard_negatives_follow_masked_softmax(sharpness):
  """At sharpness s the negatives follow softmax(s * logits) without the positive: ALPRO's at
  1, a tempered softmax in between, uniform at 0 (config.vtm_negatives' schedule)."""
  b, n = 5, 20000
  rng = np.random.default_rng(3)
  logits = (1.5 * rng.normal(size=(b, b))).astype(np.float32)
  p_t2v = _masked_softmax(sharpness * logits, axis=1)  # [text, video]
  p_v2t = _masked_softmax(sharpness * logits, axis=0)  # [text, video], columns sum to 1
  if sharpness:
    # The test can tell the two directions apart (so a row/column mix-up fails).
    assert np.abs(p_t2v - p_v2t).max() > 0.1
  else:
    np.testing.assert_allclose(p_t2v[~np.eye(b, dtype=bool)], 1 / (b - 1), rtol=1e-6)

  keys = jax.random.split(jax.random.key(0), n)
  neg_v, neg_t = jax.jit(jax.vmap(lambda k: sample_hard_negatives(k, logits, sharpness)))(keys)
  neg_v, neg_t = np.asarray(neg_v), np.asarray(neg_t)
  assert neg_v.shape == (n, b) and neg_v.dtype == np.int32 and neg_t.dtype == np.int32
  # Never the positive.
  assert not np.any(neg_v == np.arange(b)[None])
  assert not np.any(neg_t == np.arange(b)[None])

  freq_v = np.stack([np.bincount(neg_v[:, i], minlength=b) for i in range(b)]) / n
  freq_t = np.stack([np.bincount(neg_t[:, j], minlength=b) for j in range(b)]).T / n
  # 5 standard deviations of a binomial frequency per cell.
  tol_v = 5 * np.sqrt(p_t2v * (1 - p_t2v) / n) + 1e-3
  tol_t = 5 * np.sqrt(p_v2t * (1 - p_v2t) / n) + 1e-3
  assert np.all(np.abs(freq_v - p_t2v) <= tol_v), np.abs(freq_v - p_t2v).max()
  assert np.all(np.abs(freq_t - p_v2t) <= tol_t), np.abs(freq_t - p_v2t).max()


def test_hard_negatives_never_draw_a_time_reversed_twin():
  """With `twin`, a row's twin is masked like its positive: the draws follow the softmax
  over the remaining pairs, in both directions, even where the twin has the top logit."""
  b, n = 6, 20000
  twin = np.asarray([3, 0, 3, -3, 0, -3], np.int32)  # rows 0 <-> 3, 2 <-> 5; 1, 4 alone
  partner = np.arange(b) + twin
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(b, b))
  logits[np.arange(b), partner] += 4.0  # twins look alike: the likeliest draw without the mask
  logits = logits.astype(np.float32)
  excluded = np.eye(b, dtype=bool)
  excluded[np.arange(b), partner] = True
  x = np.where(excluded, -np.inf, logits.astype(np.float64))
  p_t2v = np.exp(x - x.max(1, keepdims=True))
  p_t2v /= p_t2v.sum(1, keepdims=True)
  p_v2t = np.exp(x - x.max(0, keepdims=True))
  p_v2t /= p_v2t.sum(0, keepdims=True)
  keys = jax.random.split(jax.random.key(2), n)
  neg_v, neg_t = jax.jit(jax.vmap(
      lambda k: sample_hard_negatives(k, logits, 1.0, jnp.asarray(twin))))(keys)
  neg_v, neg_t = np.asarray(neg_v), np.asarray(neg_t)
  for neg in (neg_v, neg_t):
    assert not np.any(neg == np.arange(b)[None])
    assert not np.any((neg == partner[None]) & (twin != 0)[None])
  freq_v = np.stack([np.bincount(neg_v[:, i], minlength=b) for i in range(b)]) / n
  freq_t = np.stack([np.bincount(neg_t[:, j], minlength=b) for j in range(b)]).T / n
  assert np.all(np.abs(freq_v - p_t2v) <= 5 * np.sqrt(p_t2v * (1 - p_t2v) / n) + 1e-3)
  assert np.all(np.abs(freq_t - p_v2t) <= 5 * np.sqrt(p_v2t * (1 - p_v2t) / n) + 1e-3)
  # Without the mask the twin is the usual draw (what the mask is there to prevent).
  plain = jax.vmap(lambda k: sample_hard_negatives(k, logits, 1.0)[0])(keys[:2000])
  assert np.mean(np.asarray(plain)[:, 0] == 3) > 0.5
  with pytest.raises(ValueError, match="at least 3"):
    sample_hard_negatives(jax.random.key(0), logits[:2, :2], 1.0, jnp.asarray([1, -1]))


def test_twin_negatives_replace_sampled_ones_by_the_reversed_twin():
  from vlp_jax.losses import twin_negatives
  # Rows 0, 1 have twins 4, 5 (offset +4 / -4); rows 2, 3 have none.
  twin = jnp.asarray([4, 4, 0, 0, -4, -4], jnp.int32)
  sampled_v = jnp.asarray([3, 2, 1, 0, 0, 1], jnp.int32)
  sampled_t = jnp.asarray([1, 0, 3, 2, 1, 0], jnp.int32)
  v, t, m = twin_negatives(jax.random.key(0), twin, sampled_v, sampled_t, 1.0)
  np.testing.assert_array_equal(v, [4, 5, 1, 0, 0, 1])
  np.testing.assert_array_equal(t, [4, 5, 3, 2, 0, 1])
  assert float(m["vtm/twin_frac"]) == pytest.approx(8 / 12)
  v, t, m = twin_negatives(jax.random.key(0), twin, sampled_v, sampled_t, 0.0)
  np.testing.assert_array_equal(v, sampled_v)
  np.testing.assert_array_equal(t, sampled_t)
  # Twins a sampler drew count too: rows 4 and 5 were given their twins' videos 0 and 1.
  assert float(m["vtm/twin_frac"]) == pytest.approx(2 / 12)
  # At prob p each row with a twin takes it with frequency p, independently per direction.
  keys = jax.random.split(jax.random.key(1), 4000)
  v, t, _ = jax.vmap(lambda k: twin_negatives(k, twin, sampled_v, sampled_t, 0.3))(keys)
  took_v = np.asarray(v[:, :2] == jnp.asarray([4, 5]))
  took_t = np.asarray(t[:, :2] == jnp.asarray([4, 5]))
  assert abs(took_v.mean() - 0.3) < 0.02 and abs(took_t.mean() - 0.3) < 0.02
  assert abs(np.mean(took_v[:, 0] & took_t[:, 0]) - 0.09) < 0.02  # independent draws
  np.testing.assert_array_equal(np.asarray(v[:, 2:4]), np.broadcast_to(sampled_v[2:4], (4000, 2)))


def test_hard_negative_schedule():
  from vlp_jax.losses import hard_negative_sharpness as sharp
  # ALPRO: hard from the first step.
  assert [float(sharp(s, 100)) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
  # Uniform for the first 20 % of 100 steps, then linear to hard over the next 40 %.
  got = [float(sharp(s, 100, hard_from=0.2, ramp=0.4)) for s in (0, 19, 20, 40, 60, 99)]
  np.testing.assert_allclose(got, [0.0, 0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
  # A step switch without a ramp.
  assert [float(sharp(s, 10, hard_from=0.5)) for s in (4, 5)] == [0.0, 1.0]
  # Traced step (inside the jitted update).
  assert float(jax.jit(lambda s: sharp(s, 100, 0.2, 0.4))(jnp.int32(40))) == pytest.approx(0.5)
  # Tempered: the ramp ends at max_sharpness.
  got = [float(sharp(s, 100, hard_from=0.2, ramp=0.4, max_sharpness=0.5)) for s in (0, 40, 99)]
  np.testing.assert_allclose(got, [0.0, 0.25, 0.5], atol=1e-6)


def test_hard_negatives_no_gradient_and_errors():
  logits = jnp.asarray(np.random.default_rng(4).normal(size=(4, 4)), jnp.float32)
  key = jax.random.key(1)

  def f(x):
    neg_v, _ = sample_hard_negatives(key, x)
    return jnp.sum(x[jnp.arange(4), neg_v])

  g = jax.grad(f)(logits)
  neg_v, _ = sample_hard_negatives(key, logits)
  expected = np.zeros((4, 4), np.float32)
  expected[np.arange(4), np.asarray(neg_v)] = 1.0
  # Only the gather contributes: nothing flows through the sampling.
  np.testing.assert_array_equal(g, expected)

  with pytest.raises(ValueError, match="at least 2"):
    sample_hard_negatives(key, jnp.zeros((1, 1)))
  with pytest.raises(ValueError, match="square"):
    sample_hard_negatives(key, jnp.zeros((3, 4)))


def _np_ce(logits, label):
  x = np.asarray(logits, np.float64)
  m = x.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]
  return lse - x[..., label]


def test_vtm_loss_matches_numpy():
  rng = np.random.default_rng(5)
  b = 7
  pos, nv, nt = (3 * rng.normal(size=(b, 2)).astype(np.float32) for _ in range(3))
  per, metrics = vtm_loss(pos, nv, nt)
  ce = np.stack([_np_ce(pos, 1), _np_ce(nv, 0), _np_ce(nt, 0)], axis=1)  # [B, 3]
  assert per.shape == (b,) and per.dtype == jnp.float32
  np.testing.assert_allclose(per, ce.mean(1), rtol=1e-5, atol=1e-6)
  # Mean over samples = mean over all 3B pairs (labels [1]*B + [0]*2B).
  np.testing.assert_allclose(jnp.mean(per), ce.mean(), rtol=1e-5)
  correct = np.concatenate([pos.argmax(1) == 1, nv.argmax(1) == 0, nt.argmax(1) == 0])
  np.testing.assert_allclose(metrics["vtm/acc"], correct.mean(), atol=1e-7)
  with pytest.raises(ValueError, match=r"\[B, 2\]"):
    vtm_loss(pos, nv, nt[:3])


def _np_mlm(logits, labels):
  b = labels.shape[0]
  per, count, correct = np.zeros(b), np.zeros(b), 0
  for i in range(b):
    ces = []
    for l in range(labels.shape[1]):
      if labels[i, l] == -100:
        continue
      ces.append(_np_ce(logits[i, l][None], labels[i, l])[0])
      correct += int(np.argmax(logits[i, l]) == labels[i, l])
    count[i] = len(ces)
    per[i] = np.mean(ces) if ces else 0.0
  return per, count, correct / max(count.sum(), 1)


def test_mlm_loss_matches_numpy_and_ignores_unlabelled():
  rng = np.random.default_rng(6)
  b, l, v = 3, 6, 11
  logits = (2 * rng.normal(size=(b, l, v))).astype(np.float32)
  labels = rng.integers(0, v, size=(b, l)).astype(np.int32)
  labels[0, [1, 3, 4]] = IGNORE_INDEX
  labels[1, :] = IGNORE_INDEX  # a sample without targets
  labels[2, 0] = IGNORE_INDEX
  # Make some predictions right so the accuracy is not trivially 0.
  logits[0, 0, labels[0, 0]] += 20.0
  logits[2, 2, labels[2, 2]] += 20.0

  per, count, metrics = mlm_loss(logits, labels)
  ref_per, ref_count, ref_acc = _np_mlm(logits, labels)
  assert per.dtype == jnp.float32 and count.dtype == jnp.float32
  np.testing.assert_allclose(per, ref_per, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(count, ref_count)
  assert float(per[1]) == 0.0 and float(count[1]) == 0.0
  np.testing.assert_allclose(metrics["mlm/acc"], ref_acc, atol=1e-7)

  # Changing logits at ignored positions changes nothing, gradient there is 0.
  logits2 = logits.copy()
  logits2[labels == IGNORE_INDEX] = 100 * rng.normal(size=(int((labels == -100).sum()), v))
  per2, _, metrics2 = mlm_loss(logits2, labels)
  np.testing.assert_allclose(per2, per, rtol=1e-6)
  np.testing.assert_allclose(metrics2["mlm/acc"], metrics["mlm/acc"])
  g = jax.grad(lambda x: jnp.sum(mlm_loss(x, labels)[0]))(logits)
  assert np.all(np.asarray(g)[labels == IGNORE_INDEX] == 0)


def test_mlm_loss_bf16_logits_and_no_targets():
  rng = np.random.default_rng(7)
  logits = jnp.asarray(rng.normal(size=(2, 4, 9)), jnp.bfloat16)
  labels = np.array([[1, -100, 8, 0], [-100] * 4], np.int32)
  per, count, metrics = mlm_loss(logits, labels)
  assert per.dtype == jnp.float32
  ref_per, ref_count, ref_acc = _np_mlm(np.asarray(logits.astype(jnp.float32)), labels)
  np.testing.assert_allclose(per, ref_per, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(count, ref_count)
  np.testing.assert_allclose(metrics["mlm/acc"], ref_acc, atol=1e-7)
  # No targets anywhere: zeros, no NaN.
  per0, count0, m0 = mlm_loss(logits, np.full((2, 4), -100, np.int32))
  np.testing.assert_array_equal(per0, 0.0)
  np.testing.assert_array_equal(count0, 0.0)
  assert float(m0["mlm/acc"]) == 0.0
  with pytest.raises(ValueError, match="labels"):
    mlm_loss(logits, labels[:, :3])


def test_reversal_nce_matches_numpy_and_needs_order_to_win():
  rng = np.random.default_rng(3)
  q, pos, rev = (_unit_rows(rng, 5, 8) for _ in range(3))
  per, m = reversal_nce(jnp.asarray(q), jnp.asarray(pos), jnp.asarray(rev), 0.1)
  keys = np.concatenate([pos, rev]).astype(np.float64)
  want, hits = [], []
  for i in range(5):
    logits = [float(np.dot(q[i], k)) / 0.1 for k in keys]
    want.append(_lse(logits) - logits[i])
    hits.append(int(np.argmax(logits)) == i)
  np.testing.assert_allclose(per, want, rtol=1e-5, atol=1e-5)
  assert float(m["order/acc"]) == pytest.approx(np.mean(hits))
  assert float(m["order/reversal_cos"]) == pytest.approx(np.mean(np.sum(q * rev, 1)), abs=1e-6)
  # An order-blind encoder gives a clip and its reversal one feature: at best a tie between
  # the positive and the reversal, ln 2 above a perfect score, and no clip "wins".
  per_blind, m_blind = reversal_nce(jnp.asarray(q), jnp.asarray(q), jnp.asarray(q), 0.002)
  np.testing.assert_allclose(per_blind, np.log(2.0), atol=1e-4)
  assert float(m_blind["order/reversal_cos"]) == pytest.approx(1.0, abs=1e-6)
  per_order, _ = reversal_nce(jnp.asarray(q), jnp.asarray(q), -jnp.asarray(q), 0.002)
  assert float(per_order.max()) < 1e-3
  with pytest.raises(ValueError, match="one shape"):
    reversal_nce(jnp.asarray(q), jnp.asarray(pos[:4]), jnp.asarray(rev), 0.1)
  with pytest.raises(ValueError, match="temp"):
    reversal_nce(jnp.asarray(q), jnp.asarray(pos), jnp.asarray(rev), 0.0)


def test_twin_cosine_pairs_rows_by_offset():
  rng = np.random.default_rng(3)
  f = rng.normal(size=(6, 5)).astype(np.float32)
  f /= np.linalg.norm(f, axis=-1, keepdims=True)
  # Rows 0 <-> 4 and 1 <-> 3 are pairs; rows 2 and 5 have none.
  twin = np.asarray([4, 2, 0, -2, -4, 0], np.int32)
  got = float(twin_cosine(jnp.asarray(f), jnp.asarray(twin)))
  want = np.mean([f[0] @ f[4], f[1] @ f[3]])  # each pair counted from both of its rows
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert abs(want) < 0.9  # random rows: the pairing, not the diagonal, is what is read
  assert float(twin_cosine(jnp.asarray(f), jnp.zeros(6, jnp.int32))) == 0.0  # no pairs
  with pytest.raises(ValueError, match="twin"):
    twin_cosine(jnp.asarray(f), jnp.asarray(twin[:4]))
