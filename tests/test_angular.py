"""MAMA's angular-margin contrastive loss against a naive numpy version (value and gradient),
InfoNCE at mu = 0, finite gradients at c = 1, the positive logit's peak at theta = mu, and the
sharded global batch."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlp_jax.losses import angular_margin_loss, scale_from_logit, vtc_loss
from vlp_jax.losses.angular import positive_logit


def _features(b=6, d=8, seed=0):
  rng = np.random.default_rng(seed)
  v = rng.normal(size=(b, d))
  t = v + 0.8 * rng.normal(size=(b, d))  # positives closer than negatives, never identical
  norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  return norm(v).astype(np.float32), norm(t).astype(np.float32)


def _naive(v, t, mu, s):
  """Per pair, with arccos, in float64: CE over videos of text i + CE over texts of video i."""
  v, t = v.astype(np.float64), t.astype(np.float64)
  b = v.shape[0]
  out = np.zeros(b)
  for i in range(b):
    row = [s * (math.cos(math.acos(t[i] @ v[j]) - mu) if j == i else t[i] @ v[j])
           for j in range(b)]
    col = [s * (math.cos(math.acos(t[j] @ v[i]) - mu) if j == i else t[j] @ v[i])
           for j in range(b)]
    for logits in (np.asarray(row), np.asarray(col)):
      out[i] += -(logits[i] - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max())
  return out


@pytest.mark.parametrize("mu", [0.0, 0.1, 0.35])
def test_value_matches_naive_arccos(mu):
  v, t = _features()
  s = 10.0
  got, m = angular_margin_loss(jnp.asarray(v), jnp.asarray(t), margin=mu, scale=s)
  np.testing.assert_allclose(np.asarray(got), _naive(v, t, mu, s), rtol=2e-5, atol=2e-5)
  assert float(m["angular/scale"]) == s
  np.testing.assert_allclose(float(m["angular/pos_cos"]), np.mean(np.sum(v * t, 1)), rtol=1e-5)


def test_gradient_matches_finite_differences():
  v, t = _features(b=4, d=5, seed=1)
  mu, s = 0.2, 8.0
  w = np.random.default_rng(2).normal(size=4)
  f = lambda v_, t_: jnp.sum(jnp.asarray(w, jnp.float32) * angular_margin_loss(
      v_, t_, margin=mu, scale=s)[0])
  gv, gt = jax.grad(f, argnums=(0, 1))(jnp.asarray(v), jnp.asarray(t))
  naive = lambda v_, t_: float(np.sum(w * _naive(v_, t_, mu, s)))
  h = 1e-5
  for got, which in ((gv, 0), (gt, 1)):
    fd = np.zeros(v.shape)
    for idx in np.ndindex(*v.shape):
      args = [v.astype(np.float64), t.astype(np.float64)]
      plus, minus = [a.copy() for a in args], [a.copy() for a in args]
      plus[which][idx] += h
      minus[which][idx] -= h
      fd[idx] = (naive(*plus) - naive(*minus)) / (2 * h)
    np.testing.assert_allclose(np.asarray(got), fd, rtol=2e-3, atol=2e-3)


def test_zero_margin_is_infonce():
  v, t = _features(b=8, seed=3)
  s = 14.0
  got, _ = angular_margin_loss(jnp.asarray(v), jnp.asarray(t), margin=0.0, scale=s)
  vtc, _, _ = vtc_loss(jnp.asarray(v), jnp.asarray(t), jnp.float32(1.0 / s))
  np.testing.assert_allclose(np.asarray(got), 2.0 * np.asarray(vtc), rtol=1e-6, atol=1e-6)


def test_gradient_is_finite_at_perfect_alignment():
  v, _ = _features()
  for mu in (0.0, 0.3):
    g = jax.grad(lambda x: jnp.sum(angular_margin_loss(x, x, margin=mu, scale=20.0)[0]))(
        jnp.asarray(v))
    assert np.isfinite(np.asarray(g)).all()
  # The official arccos form is not: d arccos(c) / dc is infinite at c = 1.
  g = jax.grad(lambda c: jnp.cos(jnp.arccos(c) - 0.3))(jnp.float32(1.0))
  assert not np.isfinite(float(g))


@pytest.mark.parametrize("mu", [0.0, 0.2, 0.5, 1.0])
def test_positive_logit_peaks_at_theta_equal_mu(mu):
  theta = np.linspace(0.0, math.pi / 2, 2001)
  values = np.asarray(positive_logit(jnp.asarray(np.cos(theta), jnp.float32), mu))
  assert abs(theta[np.argmax(values)] - mu) < 2e-3
  np.testing.assert_allclose(values, np.cos(theta - mu), atol=1e-3)  # eps floor near c = 1


def _released_rule(v, t, mu, s):
  """The released code's logits, in numpy: theta - mu wherever theta <= mu or on the diagonal."""
  cos = np.clip(t.astype(np.float64) @ v.astype(np.float64).T, -1, 1)
  theta = np.arccos(cos)
  shift = np.eye(len(v), dtype=bool) | (theta <= mu)
  logits = s * np.cos(np.where(shift, theta - mu, theta))
  lse = lambda x, ax: np.log(np.sum(np.exp(x - x.max(ax, keepdims=True)), ax)) + x.max(ax)
  d = np.diagonal(logits)
  return (lse(logits, 1) - d) + (lse(logits, 0) - d)


def test_close_negative_option_reproduces_the_released_rule_and_is_off_by_default():
  v, t = _features(b=6, seed=5)
  v[1] = v[0]  # text 0's negative video 1 is as close as its positive: theta_01 <= mu
  mu, s = 0.9, 12.0
  assert np.arccos(float(t[0] @ v[1])) <= mu
  got, _ = angular_margin_loss(jnp.asarray(v), jnp.asarray(t), margin=mu, scale=s,
                               close_negatives=True)
  np.testing.assert_allclose(np.asarray(got), _released_rule(v, t, mu, s), rtol=2e-5, atol=2e-5)
  default, _ = angular_margin_loss(jnp.asarray(v), jnp.asarray(t), margin=mu, scale=s)
  np.testing.assert_allclose(np.asarray(default), _naive(v, t, mu, s), rtol=2e-5, atol=2e-5)
  assert abs(float(got[0]) - float(default[0])) > 1e-3


def test_bad_margin_and_shapes_are_clear_errors():
  v, t = _features()
  with pytest.raises(ValueError, match=r"margin mu must be in \[0, pi/2\]"):
    angular_margin_loss(jnp.asarray(v), jnp.asarray(t), margin=2.0, scale=1.0)
  with pytest.raises(ValueError, match=r"margin mu must be in \[0, pi/2\]"):
    angular_margin_loss(jnp.asarray(v), jnp.asarray(t), margin=-0.1, scale=1.0)
  with pytest.raises(ValueError, match=r"\[B, D\]"):
    angular_margin_loss(jnp.asarray(v), jnp.asarray(t[:3]), margin=0.1, scale=1.0)


def test_scale_is_clamped_exp_of_the_logit():
  assert float(scale_from_logit(4.60)) == pytest.approx(math.exp(4.60), rel=1e-6)
  assert float(scale_from_logit(10.0)) == pytest.approx(200.0, rel=1e-6)
  assert float(scale_from_logit(-3.0)) == pytest.approx(1.0)


def test_sharded_global_batch_equals_unsharded():
  v, t = _features(b=16, seed=4)
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  shard = NamedSharding(mesh, P("data", None))
  fn = jax.jit(lambda a, b: angular_margin_loss(a, b, margin=0.25, scale=30.0)[0])
  sharded = fn(jax.device_put(v, shard), jax.device_put(t, shard))
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(fn(v, t)), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(sharded), _naive(v, t, 0.25, 30.0), rtol=2e-5,
                             atol=2e-5)
