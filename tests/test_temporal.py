"""Prompt-CLIP's temporal model (vlp_jax/models/temporal.py): mean pooling, the parameter
count of the paper, one block against a naive numpy pre-LN block, order awareness, limits."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from vlp_jax.models import temporal

B, T = 2, 5


def _features(seed=0, b=B, t=T, d=16):
  return np.random.default_rng(seed).normal(size=(b, t, d)).astype(np.float32)


def _mask():
  return np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)


def _init(model, x, mask=None):
  return nn.unbox(model.init(jax.random.PRNGKey(0), x, mask))


def _randomise(params, seed=1):
  """Every param (LayerNorm scales and biases too) random, so no term can hide."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_unflatten(
      treedef, [(0.3 * rng.normal(size=x.shape)).astype(np.float32) for x in leaves])


def test_zero_layers_is_mean_pooling_without_params():
  model = temporal.TemporalTransformer(width=16, layers=0)
  x = _features()
  variables = model.init(jax.random.PRNGKey(0), x)
  assert temporal.count_params(variables) == 0 and "params" not in variables
  np.testing.assert_allclose(model.apply(variables, x), x.mean(axis=1), rtol=1e-6, atol=1e-6)
  mask = _mask()
  x_nan = x.copy()
  x_nan[~mask] = np.nan  # padded frames never reach the mean
  want = np.stack([x[i, mask[i]].mean(axis=0) for i in range(B)])
  np.testing.assert_allclose(model.apply(variables, x_nan, mask), want, rtol=1e-6, atol=1e-6)
  # A clip without real frames gives zeros, not NaN.
  out = model.apply(variables, x, np.zeros((B, T), bool))
  np.testing.assert_array_equal(out, np.zeros((B, 16), np.float32))


def _expected_count(width, layers, max_frames=16):
  attn = 4 * (width * width + width)  # q, k, v, out projections with bias
  mlp = width * 4 * width + 4 * width + 4 * width * width + width  # fc1, fc2 with bias
  norms = 2 * 2 * width  # layer_norm1, layer_norm2: scale and bias
  return layers * (attn + mlp + norms) + max_frames * width  # + position embedding


@pytest.mark.parametrize("layers, paper_total", [(1, 3.20e6), (2, 6.35e6)])
def test_param_count_matches_the_paper(layers, paper_total):
  model = temporal.TemporalTransformer(width=512, layers=layers)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), np.zeros((1, 16, 512), np.float32))
  count = temporal.count_params(shapes["params"])
  assert count == _expected_count(512, layers)
  # Ju et al. (ECCV 2022) report the trainable parameters of Prompt-CLIP with 16 + 16 prompt
  # vectors of width 512 (CLIP ViT-B/16 text tower): ~3.20 M with 1 temporal layer and
  # ~6.35 M with 2. Temporal model + 32 * 512 prompt vectors lands within 1 % of both.
  total = count + 32 * 512
  assert abs(total - paper_total) / paper_total < 0.01, total


def _np_layer_norm(x, p, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_block(x, p, heads, key_mask=None):
  """One CLIP pre-LN block in float64 numpy: x + attn(ln1(x)); x + mlp(ln2(x))."""
  b, t, d = x.shape
  hd = d // heads
  a = p["self_attn"]
  h = _np_layer_norm(x, p["layer_norm1"])
  proj = lambda n: (h @ a[n]["kernel"].reshape(d, d) + a[n]["bias"].reshape(d)).reshape(
      b, t, heads, hd).transpose(0, 2, 1, 3)  # [B, heads, T, hd]
  q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")
  logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
  if key_mask is not None:
    logits = np.where(key_mask[:, None, None, :], logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  o = (w @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
  x = x + o @ a["out_proj"]["kernel"].reshape(d, d) + a["out_proj"]["bias"]
  m = p["mlp"]
  h = _np_layer_norm(x, p["layer_norm2"]) @ m["fc1"]["kernel"] + m["fc1"]["bias"]
  h = h / (1 + np.exp(-1.702 * h))  # QuickGELU: h * sigmoid(1.702 h)
  return x + h @ m["fc2"]["kernel"] + m["fc2"]["bias"]


@pytest.mark.parametrize("masked", [False, True])
def test_one_layer_matches_naive_numpy(masked):
  model = temporal.TemporalTransformer(width=16, layers=1, heads=2, max_frames=8)
  x = _features()
  mask = _mask() if masked else None
  params = _randomise(_init(model, x, mask)["params"])
  out = model.apply({"params": params}, x, mask)
  p64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  h = x.astype(np.float64) + p64["position_embedding"]["embedding"][:T]  # first T of 8 rows
  h = _np_block(h, p64["encoder"]["layers_0"], heads=2, key_mask=mask)
  if masked:
    want = np.stack([h[i, mask[i]].mean(axis=0) for i in range(B)])
  else:
    want = h.mean(axis=1)
  assert out.shape == (B, 16) and out.dtype == np.float32
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_padded_frames_do_not_change_the_output():
  model = temporal.TemporalTransformer(width=16, layers=2, heads=2, max_frames=8)
  x, mask = _features(), _mask()
  variables = _init(model, x, mask)
  noise = _features(seed=5)
  out = model.apply(variables, x, mask)
  out2 = model.apply(variables, np.where(mask[..., None], x, noise), mask)
  np.testing.assert_allclose(out, out2, rtol=1e-6, atol=1e-6)


def test_order_awareness_comes_from_the_position_embedding():
  x = _features()
  rev = x[:, ::-1]
  pool = temporal.TemporalTransformer(width=16, layers=0)
  np.testing.assert_allclose(pool.apply({}, x), pool.apply({}, rev), rtol=1e-6, atol=1e-6)
  model = temporal.TemporalTransformer(width=16, layers=1, heads=2, max_frames=8)
  # Random params: at init (weights N(0, 0.02), positions N(0, 0.01)) the effect is ~1e-5.
  params = _randomise(_init(model, x)["params"])
  diff = np.abs(model.apply({"params": params}, x) - model.apply({"params": params}, rev))
  assert diff.max() > 1e-2, diff.max()
  # Without positions the blocks + mean are permutation invariant.
  params["position_embedding"]["embedding"] = np.zeros((8, 16), np.float32)
  np.testing.assert_allclose(model.apply({"params": params}, x),
                             model.apply({"params": params}, rev), rtol=1e-5, atol=1e-5)


def test_too_many_frames_and_bad_fields_raise():
  model = temporal.TemporalTransformer(width=16, layers=1, heads=2, max_frames=4)
  with pytest.raises(ValueError, match=r"5 frames exceed temporal.max_frames \(4\)"):
    model.init(jax.random.PRNGKey(0), _features())
  with pytest.raises(ValueError, match="max_frames"):  # also without any parameters
    temporal.TemporalTransformer(width=16, layers=0, max_frames=4).init(
        jax.random.PRNGKey(0), _features())
  with pytest.raises(ValueError, match="must divide"):
    temporal.TemporalTransformer(width=16, layers=1, heads=3).init(
        jax.random.PRNGKey(0), _features())
  with pytest.raises(ValueError, match=r"features must be \[B, T, 32\]"):
    temporal.TemporalTransformer(width=32, layers=1).init(jax.random.PRNGKey(0), _features())
  with pytest.raises(ValueError, match="mask must be"):
    model.init(jax.random.PRNGKey(0), _features(t=4), np.ones((B, 5), bool))
