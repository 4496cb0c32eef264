"""Tests for vlp_jax/models: shapes, config validation, logical names, TimeSformer temporal
behaviour, padding, tied MLM head, remat, bfloat16, and a numpy reference for attention.

Tiny sizes (hidden 32, 2 layers, 32 px, 2 frames) and jitted calls keep this file fast.
"""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import alpro_pretrain
from vlp_jax.models import alpro as alpro_lib
from vlp_jax.models import bert
from vlp_jax.models import layers
from vlp_jax.models import timesformer
from vlp_jax.models.alpro import ALPRO

B, T, S, L, V = 2, 2, 32, 6, 50  # batch, frames, image size, text length, vocab
N = (S // 16) ** 2  # patches per frame


def tiny_config(**kw) -> alpro_lib.ALPROConfig:
  video_kw = {k[2:]: kw.pop(k) for k in list(kw) if k.startswith("v_")}
  text_kw = {k[2:]: kw.pop(k) for k in list(kw) if k.startswith("t_")}
  video = alpro_lib.VideoConfig(**{**dict(image_size=S, patch_size=16, num_frames=T, hidden=32,
                                          layers=2, heads=2, mlp_dim=64), **video_kw})
  text = alpro_lib.TextConfig(**{**dict(vocab_size=V, hidden=32, layers=2, fusion_layer=1,
                                        heads=2, mlp_dim=64, max_position=16), **text_kw})
  return alpro_lib.ALPROConfig(video=video, text=text, embed_dim=16, **kw)


def inputs(seed=0, frames=T):
  rng = np.random.default_rng(seed)
  video = jnp.asarray(rng.normal(size=(B, frames, S, S, 3)), jnp.float32)
  ids = jnp.asarray(rng.integers(1, V, size=(B, L)), jnp.int32)
  mask = jnp.asarray([[1] * L, [1] * 4 + [0] * (L - 4)], jnp.int32)
  return video, ids, mask


@functools.cache
def _base_params():
  """Really initialised params of `tiny_config()` (the one init compile of this file)."""
  video, ids, mask = inputs()
  # unsafe_rbg keys halve the init compile time on CPU compared with threefry.
  key = jax.random.key(0, impl="unsafe_rbg")
  variables = jax.jit(ALPRO(tiny_config()).init)(key, video, ids, mask)
  return nn.unbox(variables["params"])


def param_shapes(cfg):
  """Boxed `ShapeDtypeStruct` param tree of `cfg` (traced, not compiled)."""
  video, ids, mask = inputs()
  return jax.eval_shape(ALPRO(cfg).init, jax.random.PRNGKey(0), video, ids, mask)["params"]


def init_params(cfg):
  """Params for `cfg`, taken from the base init (every variant's tree is a subset of it).

  Variants differ only in dtype / remat / dropout / temporal mode, none of which change the
  shape of a parameter they share with the base model; this saves an init compile each.
  """
  base = traverse_util.flatten_dict(_base_params(), sep="/")
  want = traverse_util.flatten_dict(nn.unbox(param_shapes(cfg)), sep="/")
  out = {}
  for path, sds in want.items():
    assert base[path].shape == sds.shape, path
    out[path] = base[path]
  return traverse_util.unflatten_dict(out, sep="/")


@functools.cache
def jitted(cfg, method):
  model = ALPRO(cfg)
  fn = getattr(ALPRO, method)
  return jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=fn))


def call(cfg, method, params, *args):
  return jitted(cfg, method)(params, *args)


def set_path(params, path, value):
  flat = traverse_util.flatten_dict(params, sep="/")
  assert path in flat, path
  flat[path] = value
  return traverse_util.unflatten_dict(flat, sep="/")


def get_path(params, path):
  return traverse_util.flatten_dict(params, sep="/")[path]


# ---------------------------------------------------------------------------------------
# Shapes


def test_every_method_shapes_and_dtypes():
  cfg = tiny_config()
  params = init_params(cfg)
  video, ids, mask = inputs()
  out = call(cfg, "__call__", params, video, ids, mask)
  D, E = 32, 16
  expected = {
      "video_tokens": (B, 1 + N, D), "text_tokens": (B, L, D), "video_feature": (B, E),
      "text_feature": (B, E), "temperature": (), "fused": (B, L + 1 + N, D),
      "vtm_logits": (B, 2), "mlm_logits": (B, L, V)}
  assert {k: v.shape for k, v in out.items()} == expected
  for k in ("video_feature", "text_feature", "temperature", "vtm_logits", "mlm_logits"):
    assert out[k].dtype == jnp.float32, k

  np.testing.assert_allclose(np.linalg.norm(out["video_feature"], axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(out["text_feature"], axis=-1), 1.0, atol=1e-5)

  # Each method on its own, as the trainer calls them (traced only: __call__ runs them all).
  model = ALPRO(cfg)
  ap = lambda m, *a: jax.eval_shape(
      functools.partial(model.apply, method=m), {"params": params}, *a)
  vt, tt = ap(ALPRO.encode_video, video), ap(ALPRO.encode_text, ids, mask)
  assert (vt.shape, tt.shape) == ((B, 1 + N, D), (B, L, D))
  assert ap(ALPRO.video_feature, vt).shape == ap(ALPRO.text_feature, tt).shape == (B, E)
  fused = ap(ALPRO.fuse, tt, mask, vt)
  assert fused.shape == (B, L + 1 + N, D)
  assert ap(ALPRO.vtm_logits, fused).shape == (B, 2)
  assert ap(ALPRO.mlm_logits, tt).shape == (B, L, V)
  mlm3 = ap(ALPRO.mlm_logits, jax.ShapeDtypeStruct((B, 3, D), jnp.float32))
  assert (mlm3.shape, mlm3.dtype) == ((B, 3, V), jnp.float32)  # any gathered positions
  # Longer clips / other frame counts.
  assert ap(ALPRO.encode_video, jax.ShapeDtypeStruct((B, 5, S, S, 3), jnp.float32)).shape == (
      B, 1 + N, D)
  temp = ALPRO(cfg).apply({"params": params}, method=ALPRO.temperature)
  np.testing.assert_allclose(temp, 0.07, rtol=1e-6)


def test_gelu_is_exact_erf_gelu_with_its_gradient():
  import math
  x = np.concatenate([np.linspace(-8, 8, 401), [-30.0, -1e-3, 0.0, 1e-3, 30.0]]).astype(np.float32)
  want = np.array([v / 2 * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
  np.testing.assert_allclose(layers.gelu(jnp.asarray(x)), want, rtol=2e-6, atol=1e-6)
  # d/dx = Phi(x) + x phi(x): the same gradient as jax's erfc form.
  want_grad = np.array([(1 + math.erf(v / math.sqrt(2))) / 2 + v * math.exp(-v * v / 2)
                        / math.sqrt(2 * math.pi) for v in x.astype(np.float64)])
  grad = jax.vmap(jax.grad(layers.gelu))(jnp.asarray(x))
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad, jax.vmap(jax.grad(lambda v: nn.gelu(v, approximate=False)))(
      jnp.asarray(x)), rtol=1e-5, atol=1e-6)
  xb = jnp.asarray(x, jnp.bfloat16)
  assert layers.gelu(xb).dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(layers.gelu(xb), np.float32),
                             np.asarray(nn.gelu(xb, approximate=False), np.float32), rtol=2e-2,
                             atol=1e-2)


def test_temperature_clipped_with_gradient():
  cfg = tiny_config()
  params = init_params(cfg)
  model = ALPRO(cfg)
  for raw, want in ((1.0, 0.5), (-3.0, 0.001), (0.2, 0.2)):
    p = set_path(params, "temp", jnp.float32(raw))
    t, g = jax.value_and_grad(
        lambda p: model.apply({"params": p}, method=ALPRO.temperature))(p)
    np.testing.assert_allclose(t, want, rtol=1e-6)
    # Straight-through: the parameter never gets stuck with a zero gradient.
    assert float(g["temp"]) == 1.0


# ---------------------------------------------------------------------------------------
# Config


def test_alpro_config_from_ml_collections():
  c = alpro_pretrain.get_config("tiny").model
  cfg = alpro_lib.alpro_config(c, vocab_size=123)
  assert cfg.text.vocab_size == 123  # 0 in the config = tokenizer size
  assert cfg.video.hidden == cfg.text.hidden == 32
  assert cfg.text.fusion_layer == 1 and cfg.video.temporal == "divided"
  c.text.vocab_size = 77
  assert alpro_lib.alpro_config(c, vocab_size=123).text.vocab_size == 77
  base = alpro_lib.alpro_config(alpro_pretrain.get_config("base").model, 30522)
  assert (base.video.hidden, base.text.layers, base.embed_dim) == (768, 12, 256)


@pytest.mark.parametrize("key,value,match", [
    ("video.hidden", 64, r"model\.video\.hidden \(64\) must equal model\.text\.hidden \(32\)"),
    ("video.heads", 3, r"model\.video\.heads"),
    ("text.heads", 5, r"model\.text\.heads"),
    ("text.fusion_layer", 0, r"model\.text\.fusion_layer"),
    ("text.fusion_layer", 2, r"model\.text\.fusion_layer"),
    ("video.image_size", 40, r"model\.video\.image_size"),
    ("video.temporal", "joint", r"model\.video\.temporal"),
    ("attention", "flash", r"model\.attention"),
    ("dtype", "float16", r"model\.dtype"),
    ("remat", "some", r"model\.remat"),
    ("video.layers", 0, r"model\.video\.layers"),
    ("text.dropout", 1.5, r"model\.text\.dropout"),
])
def test_alpro_config_validation_names_key(key, value, match):
  # A plain nested dict (bypasses ConfigDict type locking): any mapping is accepted.
  d = alpro_pretrain.get_config("tiny").model.to_dict()
  *parents, leaf = key.split(".")
  node = d
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ValueError, match=match):
    alpro_lib.alpro_config(d, vocab_size=100)


def test_alpro_config_cudnn_needs_bfloat16():
  d = alpro_pretrain.get_config("tiny").model.to_dict()
  d["attention"] = "cudnn"
  with pytest.raises(ValueError, match=r"model\.attention"):
    alpro_lib.alpro_config(d, vocab_size=100)
  d["dtype"] = "bfloat16"
  assert alpro_lib.alpro_config(d, vocab_size=100).attention == "cudnn"


# ---------------------------------------------------------------------------------------
# Logical axis names


@pytest.mark.parametrize("temporal", ["divided", "none"])
def test_every_param_has_logical_names(temporal):
  cfg = tiny_config(v_temporal=temporal, num_entities=3, num_answers=4)  # PEM and QA heads too
  video, ids, mask = inputs()
  shapes = jax.eval_shape(ALPRO(cfg).init, jax.random.PRNGKey(0), video, ids, mask)["params"]
  flat = traverse_util.flatten_dict(
      shapes, sep="/", is_leaf=lambda _, x: isinstance(x, nn.LogicallyPartitioned))
  assert len(flat) > 40
  for path, leaf in flat.items():
    assert isinstance(leaf, nn.LogicallyPartitioned), path
    names = leaf.names
    value = leaf.value
    assert len(names) == value.ndim, (path, names, value.shape)
    assert all(n is None or n in layers.LOGICAL_AXES for n in names), (path, names)
    named = [n for n in names if n is not None]
    assert len(named) == len(set(named)), (path, names)  # flax rejects duplicate names
    assert value.dtype == jnp.float32, path
  # Spot-check the conventions.
  assert flat["text_encoder/embeddings/word_embeddings/embedding"].names == ("vocab", "embed")
  q = flat["text_encoder/encoder/layer_0/attention/self/query/kernel"]
  assert q.names == ("embed", "heads", "kv")
  o = flat["fusion_encoder/encoder/layer_1/attention/output/dense/kernel"]
  assert o.names == ("heads", "kv", "embed")
  assert flat["video_encoder/layernorm/scale"].names == ("embed",)
  assert flat["text_encoder/encoder/layer_0/intermediate/dense/kernel"].names == ("embed", "mlp")
  assert flat["pem_head/out/kernel"].names == ("mlp", "entities")
  assert flat["qa_head/out/kernel"].names == ("mlp", "classes")
  has_temporal = any("temporal" in p or "time_embeddings" in p for p in flat)
  assert has_temporal == (temporal == "divided")


def test_runs_under_logical_rules_on_a_mesh():
  """Param names and activation constraints resolve with the config's rules on a mesh."""
  if len(jax.devices()) < 4:
    pytest.skip("needs 4 devices")
  cfg = tiny_config()
  params = init_params(cfg)
  video, ids, mask = inputs()
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(1, 2, 2),
                           ("data", "fsdp", "tensor"))
  rules = alpro_pretrain.get_config("tiny").sharding_rules
  model = ALPRO(cfg)
  specs = nn.get_partition_spec(param_shapes(cfg))
  with nn.logical_axis_rules(rules):
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  flat = traverse_util.flatten_dict(shardings, sep="/")
  mlp = flat["text_encoder/encoder/layer_0/intermediate/dense/kernel"]
  assert mlp.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  params = jax.device_put(params, shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    # Init under the mesh applies every parameter's constraint at its full shape.
    sharded_shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), video, ids, mask)
    # Lowering checks every activation constraint against the mesh (rank, divisibility);
    # compiling and running it would only re-test XLA's SPMD partitioner.
    lowered = jax.jit(lambda p, *a: model.apply({"params": p}, *a)).lower(
        params, video, ids, mask)
  assert jax.tree_util.tree_structure(nn.unbox(sharded_shapes["params"])) == (
      jax.tree_util.tree_structure(params))
  text = lowered.as_text()
  # Shardy (`sdy.sharding_constraint`) or GSPMD (`custom_call @Sharding`) spelling.
  assert text.count("sharding_constraint") + text.count("@Sharding") >= 20


# ---------------------------------------------------------------------------------------
# TimeSformer


def test_temporal_fc_zero_init_makes_temporal_branch_a_no_op():
  cfg = tiny_config()
  params = init_params(cfg)
  video, _, _ = inputs()
  for i in range(2):
    for leaf in ("kernel", "bias"):
      w = get_path(params, f"video_encoder/encoder/layer_{i}/temporal_dense/{leaf}")
      assert not np.any(np.asarray(w))
  base = call(cfg, "encode_video", params, video)
  # Scrambling the temporal attention weights changes nothing while temporal_dense is zero.
  p = params
  rng = np.random.default_rng(7)
  for i in range(2):
    path = f"video_encoder/encoder/layer_{i}/temporal_attention/attention/qkv/kernel"
    w = get_path(p, path)
    p = set_path(p, path, jnp.asarray(rng.normal(size=w.shape), jnp.float32))
  np.testing.assert_array_equal(call(cfg, "encode_video", p, video), base)


def _perturb_temporal_dense(params, scale=0.5):
  """Random `temporal_dense` kernels, so the temporal branch contributes."""
  flat = traverse_util.flatten_dict(params, sep="/")
  for i, path in enumerate(sorted(p for p in flat if p.endswith("temporal_dense/kernel"))):
    noise = np.random.default_rng(i).normal(size=flat[path].shape)  # numpy: no per-shape compile
    flat[path] = jnp.asarray(scale * noise, jnp.float32)
  return traverse_util.unflatten_dict(flat, sep="/")


def test_divided_depends_on_frame_order_none_does_not():
  video, _, _ = inputs()
  rev = video[:, ::-1]

  cfg = tiny_config()
  params = _perturb_temporal_dense(init_params(cfg))
  a = call(cfg, "encode_video", params, video)
  b = call(cfg, "encode_video", params, rev)
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3

  cfg = tiny_config(v_temporal="none")
  params = init_params(cfg)
  a = call(cfg, "encode_video", params, video)
  b = call(cfg, "encode_video", params, rev)
  assert a.shape == (B, 1 + N, 32)
  np.testing.assert_array_equal(a, b)
  # ... and it is the mean of the per-frame encodings.
  per_frame = [call(cfg, "encode_video", params, video[:, t:t + 1]) for t in range(T)]
  np.testing.assert_allclose(a, (per_frame[0] + per_frame[1]) / 2, atol=1e-5)


def test_time_embedding_interpolation():
  emb = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8)), jnp.float32)
  assert timesformer.resize_time_embeddings(emb, 2) is emb
  up = timesformer.resize_time_embeddings(emb, 4)
  a, b = np.asarray(emb)
  np.testing.assert_allclose(up, np.stack([a, .75 * a + .25 * b, .25 * a + .75 * b, b]),
                             atol=1e-6)

  cfg = tiny_config()  # num_frames = 2
  params = _perturb_temporal_dense(init_params(cfg))
  video4, _, _ = inputs(frames=4)
  out4 = call(cfg, "encode_video", params, video4)
  assert out4.shape == (B, 1 + N, 32)
  assert np.all(np.isfinite(out4))
  # The 2-frame table drives the 4-frame run.
  path = "video_encoder/embeddings/time_embeddings"
  # (A constant shift would be removed by the pre-norm LayerNorms, so use a random one.)
  changed = set_path(params, path, get_path(params, path)
                     + np.random.default_rng(5).normal(size=(T, 32)).astype(np.float32))
  out4c = call(cfg, "encode_video", changed, video4)
  assert float(jnp.max(jnp.abs(out4 - out4c))) > 1e-4


# ---------------------------------------------------------------------------------------
# Text / fusion


def test_padding_does_not_leak():
  cfg = tiny_config()
  params = init_params(cfg)
  video, ids, mask = inputs()
  ids2 = jnp.where(mask == 0, (ids + 17) % V, ids)
  assert not np.array_equal(ids, ids2)
  t1 = call(cfg, "encode_text", params, ids, mask)
  t2 = call(cfg, "encode_text", params, ids2, mask)
  real = np.asarray(mask, bool)
  np.testing.assert_allclose(np.asarray(t1)[real], np.asarray(t2)[real], atol=1e-6)
  assert float(jnp.max(jnp.abs(t1 - t2))) > 1e-3  # padded positions themselves do change
  vt = call(cfg, "encode_video", params, video)
  f1 = np.asarray(call(cfg, "fuse", params, t1, mask, vt))
  f2 = np.asarray(call(cfg, "fuse", params, t2, mask, vt))
  np.testing.assert_allclose(f1[:, :L][real], f2[:, :L][real], atol=1e-6)
  np.testing.assert_allclose(f1[:, L:], f2[:, L:], atol=1e-6)  # video tokens too
  # Control: without the mask the padded ids would leak into real positions.
  ones = jnp.ones_like(mask)
  u1 = call(cfg, "encode_text", params, ids, ones)
  u2 = call(cfg, "encode_text", params, ids2, ones)
  assert float(jnp.max(jnp.abs(np.asarray(u1)[real] - np.asarray(u2)[real]))) > 1e-4


def test_mlm_head_is_tied_to_word_embeddings():
  cfg = tiny_config()
  params = init_params(cfg)
  head = traverse_util.flatten_dict(params["mlm_head"], sep="/")
  assert sorted(head) == ["bias", "transform/LayerNorm/bias", "transform/LayerNorm/scale",
                          "transform/dense/bias", "transform/dense/kernel"]
  assert not any(leaf.shape[-1:] == (V,) and leaf.ndim == 2 for leaf in head.values())
  x = jnp.asarray(np.random.default_rng(1).normal(size=(B, L, 32)), jnp.float32)
  base = np.asarray(call(cfg, "mlm_logits", params, x))
  path = "text_encoder/embeddings/word_embeddings/embedding"
  emb = get_path(params, path)
  v = 7
  delta = jnp.asarray(np.random.default_rng(2).normal(size=(32,)), jnp.float32)
  out = np.asarray(call(cfg, "mlm_logits", set_path(params, path, emb.at[v].add(delta)), x))
  diff = out - base
  # Only the perturbed word's logit moves, by <transform(x), delta> (linear in the table).
  np.testing.assert_allclose(np.delete(diff, v, axis=-1), 0.0, atol=1e-6)
  assert np.all(np.abs(diff[..., v]) > 1e-4)
  out2 = np.asarray(call(cfg, "mlm_logits", set_path(params, path, emb.at[v].add(2 * delta)), x))
  np.testing.assert_allclose(out2[..., v] - base[..., v], 2 * diff[..., v], rtol=1e-3, atol=1e-5)


def test_bert_attention_matches_numpy():
  cfg = tiny_config().text
  module = bert.BertAttention(cfg)
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 5, 32)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)
  variables = jax.jit(module.init)(jax.random.PRNGKey(1), x, mask)
  p = nn.unbox(variables["params"])
  # Non-trivial LayerNorm and biases.
  p = jax.tree_util.tree_map(
      lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32), p)
  got = np.asarray(jax.jit(module.apply)({"params": p}, x, mask))

  p = jax.tree_util.tree_map(np.asarray, p)
  h, dh = 2, 16
  proj = lambda n: (np.einsum("bld,dhk->blhk", x, p["self"][n]["kernel"])
                    + p["self"][n]["bias"])
  q, k, v = proj("query"), proj("key"), proj("value")
  scores = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(dh)
  scores = scores + np.where(mask[:, None, None, :] > 0, 0.0, -1e30)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  ctx = np.einsum("bhqs,bshk->bqhk", probs, v)
  y = np.einsum("bqhk,hkd->bqd", ctx, p["output"]["dense"]["kernel"]) + p["output"]["dense"]["bias"]
  y = y + x
  mu = y.mean(-1, keepdims=True)
  var = ((y - mu) ** 2).mean(-1, keepdims=True)
  ln = p["output"]["LayerNorm"]
  want = (y - mu) / np.sqrt(var + 1e-12) * ln["scale"] + ln["bias"]
  assert h * dh == 32
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# Remat and dtype


def _loss(cfg):
  """Jitted value-and-grad of a loss through both remat'ed block types (TimeSformer, BERT).

  Fusion layers and heads are left out: they reuse the same BERT block and would only add
  compile time.
  """
  model = ALPRO(cfg)
  rng = np.random.default_rng(0)
  wv = jnp.asarray(rng.normal(size=(1 + N, 32)), jnp.float32)
  wt = jnp.asarray(rng.normal(size=(L, 32)), jnp.float32)

  def loss(params, video, ids, mask):
    ap = lambda m, *a: model.apply({"params": params}, *a, method=m)
    vt = ap(ALPRO.encode_video, video)
    tt = ap(ALPRO.encode_text, ids, mask)
    return jnp.mean(jnp.tanh(vt * wv)) + jnp.mean(jnp.tanh(tt * wt))

  return jax.jit(jax.value_and_grad(loss))


def test_remat_full_matches_none():
  base = tiny_config(v_layers=1)  # one video block keeps the two grad compiles small
  params = _perturb_temporal_dense(init_params(base))  # so the temporal branch has gradients
  video, ids, mask = inputs()
  lowered0 = _loss(base).lower(params, video, ids, mask)
  lowered1 = _loss(dataclasses.replace(base, remat="full")).lower(params, video, ids, mask)
  # Remat is really in effect: the rematerialised blocks sit behind optimization barriers.
  assert "optimization_barrier" not in lowered0.as_text()
  assert "optimization_barrier" in lowered1.as_text()
  l0, g0 = lowered0.compile()(params, video, ids, mask)
  l1, g1 = lowered1.compile()(params, video, ids, mask)
  np.testing.assert_allclose(l1, l0, atol=1e-5)
  flat0 = traverse_util.flatten_dict(g0, sep="/")
  flat1 = traverse_util.flatten_dict(g1, sep="/")
  assert flat0.keys() == flat1.keys()
  for k in flat0:
    np.testing.assert_allclose(flat1[k], flat0[k], rtol=1e-5, atol=1e-5, err_msg=k)
  assert float(jnp.max(jnp.abs(
      flat0["video_encoder/encoder/layer_0/temporal_attention/attention/qkv/kernel"]))) > 0


def test_remat_policies_build():
  for name in ("dots", "dots_no_batch"):
    cls = layers.remat_block(bert.BertLayer, name, static_argnums=(3,))
    assert cls is not bert.BertLayer
  assert layers.remat_block(bert.BertLayer, "none") is bert.BertLayer
  with pytest.raises(ValueError, match="remat"):
    layers.remat_block(bert.BertLayer, "bogus")


def test_bfloat16_runs_and_params_stay_float32():
  cfg = tiny_config(dtype="bfloat16")
  shapes = nn.unbox(param_shapes(cfg))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(shapes))
  params = init_params(cfg)
  video, ids, mask = inputs()
  out = call(cfg, "__call__", params, video, ids, mask)
  assert out["video_tokens"].dtype == jnp.bfloat16
  assert out["text_tokens"].dtype == jnp.bfloat16
  for k in ("video_feature", "text_feature", "temperature", "vtm_logits", "mlm_logits"):
    assert out[k].dtype == jnp.float32, k
    assert np.all(np.isfinite(np.asarray(out[k]))), k
  ref = call(tiny_config(), "__call__", params, video, ids, mask)
  np.testing.assert_allclose(out["video_feature"], ref["video_feature"], atol=0.05)
  np.testing.assert_allclose(out["mlm_logits"], ref["mlm_logits"], atol=0.1)


def test_dropout_uses_rng_and_deterministic_flag():
  cfg = tiny_config(t_dropout=0.5)
  params = init_params(cfg)
  _, ids, mask = inputs()
  model = ALPRO(cfg)
  f = jax.jit(lambda det, key: model.apply({"params": params}, ids, mask, det,
                                           method=ALPRO.encode_text, rngs={"dropout": key}),
              static_argnums=0)
  a, b = f(False, jax.random.PRNGKey(0)), f(False, jax.random.PRNGKey(1))
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3
  # (deterministic=True needs no rng at all: every other test here runs that way.)


def test_init_stds_from_config():
  """model.video.embed_init_std (CLS / position embeddings), model.video.time_init_std (time
  embeddings), model.video.temporal_dense_init_std (zeros by default), model.video.init_std
  (every other TimeSformer kernel) and model.text.init_std
  (every BERT weight and embedding) set the fresh init; the defaults are timm's and HF's 0.02."""
  c = alpro_pretrain.get_config("tiny")
  c.model.video.update(hidden=64, mlp_dim=128)
  c.model.text.update(vocab_size=512, hidden=64, mlp_dim=128)

  def stds(embed_std, time_std, text_std, video_std, temporal_dense_std=0.0):
    c.model.video.embed_init_std, c.model.text.init_std = embed_std, text_std
    c.model.video.time_init_std, c.model.video.init_std = time_std, video_std
    c.model.video.temporal_dense_init_std = temporal_dense_std
    model = ALPRO(alpro_lib.alpro_config(c.model, 512))
    p = nn.unbox(jax.jit(functools.partial(model.init))(
        jax.random.PRNGKey(0), np.zeros((1, 2, 32, 32, 3), np.float32),
        np.zeros((1, 16), np.int32), np.ones((1, 16), np.int32))["params"])
    video = p["video_encoder"]
    emb = video["embeddings"]
    text = p["text_encoder"]
    layer = video["encoder"]["layer_0"]
    return (float(np.std(emb["position_embeddings"])), float(np.std(emb["time_embeddings"])),
            float(np.std(text["embeddings"]["word_embeddings"]["embedding"])),
            float(np.std(text["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"])),
            float(np.std(text["encoder"]["layer_0"]["output"]["dense"]["kernel"])),
            float(np.std(emb["patch_embeddings"]["projection"]["kernel"])),
            float(np.std(layer["attention"]["attention"]["qkv"]["kernel"])),
            float(np.std(layer["intermediate"]["dense"]["kernel"])),
            float(np.std(layer["temporal_dense"]["kernel"])))

  default = stds(0.02, 0.02, 0.02, 0.02)
  # truncated normal at 2 std has std 0.88 x; a plain normal 1 x.
  np.testing.assert_allclose(default[:2], 0.02 * 0.88, rtol=0.25)
  np.testing.assert_allclose(default[2:5], 0.02, rtol=0.1)
  np.testing.assert_allclose(default[5:8], 0.02 * 0.88, rtol=0.15)
  assert default[8] == 0.0  # temporal_dense: zeros, as TimeSformer
  scaled = stds(0.3, 0.5, 1 / 8, 0.1, 0.2)
  np.testing.assert_allclose(scaled[:2], [0.3 * 0.88, 0.5 * 0.88], rtol=0.25)
  np.testing.assert_allclose(scaled[2:5], 1 / 8, rtol=0.1)
  np.testing.assert_allclose(scaled[5:8], 0.1 * 0.88, rtol=0.15)
  np.testing.assert_allclose(scaled[8], 0.2 * 0.88, rtol=0.15)
