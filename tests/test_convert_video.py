"""TimeSformer / ViT checkpoints: import against `transformers`, inflation, ALPRO video init."""
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import traverse_util  # noqa: E402

from helpers import perturb  # noqa: E402
from vlp_jax.convert import hf, hf_io  # noqa: E402
from vlp_jax.convert import timesformer as tsf_conv  # noqa: E402
from vlp_jax.models import timesformer as tsf_lib  # noqa: E402
from vlp_jax.models.alpro import ALPRO, ALPROConfig, TextConfig, VideoConfig  # noqa: E402

SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             patch_size=8)


def _save(model, root, name):
  path = str(root / name)
  model.save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """Random TimeSformer (divided, space-only; 24 px, 2 frames) and ViT (16 px) checkpoints."""
  root = tmp_path_factory.mktemp("video_ckpts")
  torch.manual_seed(0)
  out = {}
  for kind in ("divided_space_time", "space_only"):
    cfg = transformers.TimesformerConfig(image_size=24, num_frames=2, attention_type=kind,
                                         **SIZES)
    model = perturb(transformers.TimesformerModel(cfg))
    out[kind] = (_save(model, root, kind), model)
  vit = perturb(transformers.ViTModel(transformers.ViTConfig(image_size=16, **SIZES)))
  out["vit"] = (_save(vit, root, "vit"), vit)
  return out


def _video(batch, frames, size):
  return np.random.default_rng(0).standard_normal((batch, frames, size, size, 3)).astype(
      np.float32)


def _max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.mark.parametrize("kind", ["divided_space_time", "space_only"])
def test_import_timesformer_matches_transformers(checkpoints, kind):
  path, model = checkpoints[kind]
  video = _video(2, 2, 24)
  module, params = hf.import_timesformer(path)
  ours = jax.jit(module.apply)({"params": params}, video)
  with torch.no_grad():
    ref = model(torch.tensor(video.transpose(0, 1, 4, 2, 3))).last_hidden_state.numpy()
  diff = _max_diff(ours, ref)
  print(f"\nmax|diff| timesformer ({kind}) last_hidden_state: {diff:.2e}")
  # divided: [B, 1 + T*N, D]; space_only: every frame alone, [B*T, 1 + N, D].
  assert ours.shape == ref.shape == ((2, 1 + 2 * 9, 32) if kind != "space_only" else (4, 10, 32))
  assert diff <= 1e-4


def test_export_round_trip_loads_in_transformers(checkpoints, tmp_path):
  path, model = checkpoints["divided_space_time"]
  module, params = hf.import_timesformer(path)
  out = str(tmp_path / "export")
  hf_io.save_pretrained(out, *tsf_conv.export_timesformer(params, module.config))
  loaded, info = transformers.TimesformerModel.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  want = model.state_dict()
  got = loaded.state_dict()
  assert got.keys() == want.keys()
  for name, tensor in got.items():
    np.testing.assert_array_equal(tensor.numpy(), want[name].numpy(), err_msg=name)


def _alpro(video_cfg):
  text = TextConfig(vocab_size=20, hidden=32, layers=2, fusion_layer=1, heads=2, mlp_dim=64,
                    max_position=8, dropout=0.0)
  return ALPROConfig(video=video_cfg, text=text, embed_dim=16)


def test_vit_inflation_one_frame_equals_vit(checkpoints):
  """ALPRO initialised from a ViT: with one frame its video tokens are the ViT's tokens.

  ALPRO's video output is [CLS, temporal mean of the patch tokens] after the final LayerNorm;
  with T = 1 the mean is the identity, the temporal branch adds `temporal_dense(.) = 0` and
  the time embedding is 0, so it equals ViTModel's last_hidden_state (after ViT's final
  LayerNorm; the pooler is not compared).
  """
  path, vit = checkpoints["vit"]
  cfg = _alpro(VideoConfig(image_size=16, patch_size=8, num_frames=1, hidden=32, layers=2,
                           heads=2, mlp_dim=64, layer_norm_eps=1e-12))
  model = ALPRO(cfg)
  video = _video(3, 1, 16)
  ids = np.zeros((1, 4), np.int32)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), video[:1], ids, ids + 1))["params"]
  new = hf.init_alpro_video(jax.tree.map(np.asarray, params), path, cfg)

  ours = jax.jit(lambda p, v: model.apply({"params": p}, v, method=ALPRO.encode_video))(new, video)
  with torch.no_grad():
    ref = vit(torch.tensor(video[:, 0].transpose(0, 3, 1, 2))).last_hidden_state.numpy()
  diff = _max_diff(ours, ref)
  print(f"\nmax|diff| ViT -> ALPRO video encoder, one frame, vs ViTModel last_hidden_state: "
        f"{diff:.2e}")
  assert ours.shape == ref.shape == (3, 5, 32)
  assert diff <= 1e-4

  enc = new["video_encoder"]
  np.testing.assert_array_equal(enc["embeddings"]["time_embeddings"], 0)
  for i in range(2):
    layer = enc["encoder"][f"layer_{i}"]
    for a, b in ((layer["temporal_attention"], layer["attention"]),
                 (layer["temporal_layernorm"], layer["layernorm_before"])):
      jax.tree.map(np.testing.assert_array_equal, a, b)
    for leaf in layer["temporal_dense"].values():
      np.testing.assert_array_equal(leaf, 0)
  # The text side is untouched.
  jax.tree.map(np.testing.assert_array_equal, new["text_encoder"],
               jax.tree.map(np.asarray, params["text_encoder"]))


def test_init_alpro_video_resizes_position_and_time_embeddings(checkpoints):
  path, _ = checkpoints["divided_space_time"]  # 24 px (3x3 patches), 2 frames
  video_cfg = VideoConfig(image_size=16, patch_size=8, num_frames=3, hidden=32, layers=2, heads=2,
                          mlp_dim=64)
  cfg = _alpro(video_cfg)
  abstract = jax.eval_shape(lambda: ALPRO(cfg).init(
      jax.random.PRNGKey(0), np.zeros((1, 3, 16, 16, 3), np.float32), np.zeros((1, 4), np.int32),
      np.ones((1, 4), np.int32)))["params"]
  params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), nn.unbox(abstract))
  new = hf.init_alpro_video(params, path, cfg)
  _, full, _ = tsf_conv.timesformer_params(path)  # the checkpoint at its own sizes

  emb, ref = new["video_encoder"]["embeddings"], full["embeddings"]
  assert emb["position_embeddings"].shape == (1 + 4, 32)
  np.testing.assert_array_equal(emb["position_embeddings"][0], ref["position_embeddings"][0])
  np.testing.assert_allclose(emb["position_embeddings"],
                             tsf_conv.resize_position_embeddings(ref["position_embeddings"], 4))
  np.testing.assert_allclose(
      emb["time_embeddings"],
      tsf_lib.resize_time_embeddings(jnp.asarray(ref["time_embeddings"]), 3), rtol=1e-6)
  # Everything else is the checkpoint's, unchanged.
  flat_new = traverse_util.flatten_dict(new["video_encoder"])
  for k, v in traverse_util.flatten_dict(full).items():
    if k[-1] not in ("position_embeddings", "time_embeddings"):
      np.testing.assert_array_equal(flat_new[k], v, err_msg="/".join(k))


def test_errors_name_the_problem(checkpoints, tmp_path):
  path, _ = checkpoints["divided_space_time"]
  joint = tmp_path / "joint"
  shutil.copytree(path, joint)
  config, tensors = hf_io.load_pretrained(str(joint))
  hf_io.save_pretrained(str(joint), dict(config, attention_type="joint_space_time"), tensors)
  with pytest.raises(hf.ConversionError, match="attention_type='joint_space_time' is not "
                                               "supported"):
    hf.import_timesformer(str(joint))
  bert = tmp_path / "bert"
  hf_io.save_pretrained(str(bert), {"model_type": "bert", "architectures": ["BertModel"]}, {})
  with pytest.raises(hf.ConversionError, match=r"model_type='bert' \(architectures=\['BertModel'"
                                               r"\]\), expected one of \['timesformer', 'vit'\]"):
    hf.import_timesformer(str(bert))
  trunc = tmp_path / "trunc"
  shutil.copytree(path, trunc)
  (trunc / "model.safetensors").write_bytes((trunc / "model.safetensors").read_bytes()[:4])
  with pytest.raises(hf.ConversionError, match=r"cannot read .*model\.safetensors"):
    hf.import_timesformer(str(trunc))
  params = {"video_encoder": {}}
  with pytest.raises(hf.ConversionError, match=r"num_hidden_layers=2 but model.video.layers=1"):
    hf.init_alpro_video(params, path, _alpro(VideoConfig(16, 8, 2, 32, 1, 2, 64)))
  # Another patch size: the patch-embedding tensor, the checkpoint's and the expected shape.
  cfg = _alpro(VideoConfig(16, 4, 2, 32, 2, 2, 64))
  abstract = jax.eval_shape(lambda: ALPRO(cfg).init(
      jax.random.PRNGKey(0), np.zeros((1, 2, 16, 16, 3), np.float32), np.zeros((1, 4), np.int32),
      np.ones((1, 4), np.int32)))["params"]
  with pytest.raises(hf.ConversionError, match=r"'embeddings.patch_embeddings.projection.weight' "
                                               r"has shape \(32, 3, 8, 8\) in the checkpoint, "
                                               r"expected \(32, 3, 4, 4\)"):
    hf.init_alpro_video(nn.unbox(abstract), path, cfg)
