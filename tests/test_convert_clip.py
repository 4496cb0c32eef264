"""CLIP: the Flax model against `transformers` CLIPModel, import / export round trips, errors."""
import dataclasses
import functools
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vlp_jax.convert import clip as convert_clip  # noqa: E402
from vlp_jax.convert import hf_io  # noqa: E402
from vlp_jax.convert.hf_io import ConversionError  # noqa: E402
from vlp_jax.models import clip  # noqa: E402

TOL = 1e-4
VOCAB, EOS, BOS, PAD = 99, 98, 97, 0
IMAGE, BATCH, LENGTH = 32, 3, 10


@functools.partial(jax.jit, static_argnums=(0, 1))
def _run(module, method, params, *args):
  # One compiled program per (config, method, shapes): equal modules share it.
  return module.apply({"params": params}, *args, method=method)


def _max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _hf_out(out):
  # transformers 5 returns a model output whose pooler_output holds the projected features.
  return getattr(out, "pooler_output", out).detach().numpy()


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
  """A tiny random CLIPModel saved as safetensors and as pytorch_model.bin."""
  torch.manual_seed(0)
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=37, max_position_embeddings=16,
                       eos_token_id=EOS, bos_token_id=BOS, pad_token_id=PAD,
                       hidden_act="quick_gelu"),
      # The vision tower uses exact GELU so both activations are checked against HF.
      vision_config=dict(image_size=IMAGE, patch_size=8, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=37, hidden_act="gelu"),
      projection_dim=16)
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():  # LayerNorm scales/biases and all biases away from their init values
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  root = tmp_path_factory.mktemp("hf_clip")
  st, pt = str(root / "safetensors"), str(root / "bin")
  model.save_pretrained(st)
  os.makedirs(pt)
  model.config.save_pretrained(pt)
  torch.save(model.state_dict(), os.path.join(pt, "pytorch_model.bin"))
  assert os.listdir(st) != os.listdir(pt)
  return model, {"safetensors": st, "bin": pt}


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  pixels = rng.standard_normal((BATCH, IMAGE, IMAGE, 3)).astype(np.float32)
  ids = rng.integers(1, BOS, (BATCH, LENGTH)).astype(np.int32)
  ids[:, 0] = BOS
  ids[0, 9] = EOS
  ids[1, 6] = EOS
  ids[2, 4] = EOS
  ids[1, 7:] = PAD
  ids[2, 5:] = PAD
  # Row 1 is left-padded (3 pads before its tokens): padding *before* the EOT is the case
  # where the mask changes the pooled feature (the causal mask already hides later pads).
  ids[1] = np.roll(ids[1], 3)
  mask = (ids != PAD).astype(np.int32)
  return pixels, ids, mask


def _hf_features(model, pixels, ids, mask=None, **kw):
  with torch.no_grad():
    img = model.get_image_features(pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)),
                                   **kw)
    txt = model.get_text_features(input_ids=torch.tensor(ids, dtype=torch.long),
                                  attention_mask=None if mask is None else torch.tensor(mask))
  return _hf_out(img), _hf_out(txt)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_import_matches_transformers(hf_clip, inputs, fmt):
  model, dirs = hf_clip
  pixels, ids, mask = inputs
  module, params = convert_clip.import_clip(dirs[fmt])
  assert module.config.vision.hidden_act == "gelu"
  assert module.config.text.hidden_act == "quick_gelu"
  assert module.config.text.eos_token_id == EOS and not module.config.text.pools_at_argmax

  hf_img, hf_txt = _hf_features(model, pixels, ids)
  _, hf_txt_masked = _hf_features(model, pixels, ids, mask)
  img = _run(module, "encode_image", params, pixels)
  txt = _run(module, "encode_text", params, ids)
  txt_masked = _run(module, "encode_text", params, ids, mask)
  assert img.shape == (BATCH, 16) and img.dtype == jnp.float32
  diffs = {"image": _max_diff(img, hf_img), "text": _max_diff(txt, hf_txt),
           "text_masked": _max_diff(txt_masked, hf_txt_masked)}
  print(f"\n[{fmt}] max abs diff vs transformers: {diffs}")
  assert max(diffs.values()) <= TOL, diffs
  # The mask is not a no-op: the left-padded row changes, the others do not.
  assert _max_diff(hf_txt_masked[1], hf_txt[1]) > 1e-2
  assert _max_diff(txt_masked[0], txt[0]) <= 1e-6

  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)),
                attention_mask=torch.tensor(mask))
  logits = module.apply({"params": params}, img, txt_masked, method="similarity")
  assert _max_diff(logits, out.logits_per_image.numpy()) <= 10 * TOL


def test_legacy_eos_pools_at_argmax(hf_clip, inputs, tmp_path):
  """eos_token_id == 2 in the config: HF pools at argmax(input_ids); so do we."""
  model, dirs = hf_clip
  pixels, ids, _ = inputs
  legacy = str(tmp_path / "legacy")
  shutil.copytree(dirs["safetensors"], legacy)
  with open(os.path.join(legacy, "config.json")) as f:
    cfg = json.load(f)
  cfg["text_config"]["eos_token_id"] = 2
  with open(os.path.join(legacy, "config.json"), "w") as f:
    json.dump(cfg, f)
  module, params = convert_clip.import_clip(legacy)
  assert module.config.text.pools_at_argmax
  ids = ids.copy()
  # Row 2 without EOT (nor BOS, the largest id left): the two pooling rules disagree.
  ids[2] = np.where(ids[2] >= BOS, 5, ids[2])
  index = np.asarray(module.apply({"params": params}, ids, method="eot_index"))
  np.testing.assert_array_equal(index, np.argmax(ids, axis=1))
  new_rule = np.argmax(ids == EOS, axis=1)
  assert (index != new_rule).any()

  model.text_model.eos_token_id = 2
  try:
    _, hf_txt = _hf_features(model, pixels, ids)
  finally:
    model.text_model.eos_token_id = EOS
  diff = _max_diff(_run(module, "encode_text", params, ids), hf_txt)
  print(f"\n[legacy eos] max abs diff vs transformers: {diff}")
  assert diff <= TOL


def test_token_embeds_path(hf_clip, inputs):
  """Prompt learning path: embeddings + EOT index reproduce the ids path; the index matters."""
  _, dirs = hf_clip
  _, ids, mask = inputs
  module, params = convert_clip.import_clip(dirs["safetensors"])
  embeds = module.apply({"params": params}, ids, method="embed_tokens")
  assert embeds.shape == (BATCH, LENGTH, 32)
  np.testing.assert_array_equal(
      embeds, params["text_model"]["embeddings"]["token_embedding"]["embedding"][ids])
  eot = module.apply({"params": params}, ids, method="eot_index")
  np.testing.assert_array_equal(eot, [9, 9, 4])  # row 1 was rolled by 3
  by_ids = _run(module, "encode_text", params, ids, mask)
  by_embeds = _run(module, "encode_text_embeds", params, embeds, eot, mask)
  assert _max_diff(by_embeds, by_ids) <= 1e-6
  moved = _run(module, "encode_text_embeds", params, embeds, eot - 1, mask)
  assert _max_diff(moved, by_ids) > 1e-2
  with pytest.raises(ValueError, match="eot_index must have shape"):
    module.apply({"params": params}, embeds, eot[:2], method="encode_text_embeds")


def test_encode_frames_is_per_frame_encode_image(hf_clip, inputs):
  _, dirs = hf_clip
  pixels, _, _ = inputs
  module, params = convert_clip.import_clip(dirs["safetensors"])
  frames = np.stack([pixels, pixels[::-1]], axis=1)  # [B, T=2, H, W, 3]
  feats = _run(module, "encode_frames", params, frames)
  assert feats.shape == (BATCH, 2, 16)
  per_image = _run(module, "encode_image", params, pixels)
  assert _max_diff(feats[:, 0], per_image) <= 1e-5
  assert _max_diff(feats[:, 1], per_image[::-1]) <= 1e-5


def test_export_round_trip(hf_clip, inputs, tmp_path):
  model, dirs = hf_clip
  pixels, ids, mask = inputs
  module, params = convert_clip.import_clip(dirs["safetensors"])
  out = str(tmp_path / "exported")
  convert_clip.export_clip(module.config, jax.tree.map(jnp.asarray, params), out)
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  reloaded = transformers.CLIPModel.from_pretrained(out).eval()
  text_cfg = reloaded.config.text_config
  assert (text_cfg.eos_token_id, text_cfg.bos_token_id, text_cfg.pad_token_id) == (EOS, BOS, PAD)
  assert reloaded.config.vision_config.hidden_act == "gelu"
  want_img, want_txt = _hf_features(model, pixels, ids, mask)
  got_img, got_txt = _hf_features(reloaded, pixels, ids, mask)
  ours_txt = _run(module, "encode_text", params, ids, mask)
  diffs = {"image": _max_diff(got_img, want_img), "text_masked": _max_diff(got_txt, want_txt),
           "ours_vs_reloaded_text": _max_diff(ours_txt, got_txt)}
  print(f"\n[round trip] max abs diff: {diffs}")
  assert max(diffs.values()) <= TOL, diffs
  # The state dicts are equal tensor by tensor (layouts invert exactly).
  want, got = model.state_dict(), reloaded.state_dict()
  assert set(want) == set(got)
  for k in want:
    np.testing.assert_array_equal(got[k].numpy(), want[k].numpy(), err_msg=k)
  _, again = convert_clip.import_clip(out)
  jax.tree.map(np.testing.assert_array_equal, again, params)


def test_resized_position_embedding_matches_interpolate_pos_encoding(hf_clip, inputs):
  model, dirs = hf_clip
  size = 48  # a 6x6 patch grid from the checkpoint's 4x4
  rng = np.random.default_rng(1)
  pixels = rng.standard_normal((2, size, size, 3)).astype(np.float32)
  module, params = convert_clip.import_clip(dirs["safetensors"], image_size=size)
  assert module.config.vision.image_size == size
  pos = params["vision_model"]["embeddings"]["position_embedding"]["embedding"]
  assert pos.shape == (1 + 36, 32)
  hf_img, _ = _hf_features(model, pixels, inputs[1], interpolate_pos_encoding=True)
  diff = _max_diff(_run(module, "encode_image", params, pixels), hf_img)
  print(f"\n[image_size=48] max abs diff vs transformers interpolate_pos_encoding: {diff}")
  assert diff <= TOL
  # Same-size resize is the identity; the matrix rows of a resize sum to one.
  same = convert_clip.resize_position_embedding(pos, 6)
  assert same is pos
  np.testing.assert_allclose(convert_clip._bicubic_matrix(4, 7).sum(1), 1.0, atol=1e-12)
  with pytest.raises(ValueError, match="import the checkpoint with image_size=32"):
    module.apply({"params": params}, inputs[0], method="encode_image")


def test_bfloat16_compute_is_close(hf_clip, inputs):
  _, dirs = hf_clip
  pixels = inputs[0]
  module, params = convert_clip.import_clip(dirs["safetensors"], dtype="bfloat16")
  f32_module = module.clone(config=dataclasses.replace(module.config, dtype="float32"))
  img = _run(module, "encode_image", params, pixels)
  ref = _run(f32_module, "encode_image", params, pixels)
  assert img.dtype == jnp.float32  # features stay float32
  assert 0 < _max_diff(img, ref) <= 0.05 * float(np.abs(ref).max())


def test_errors_name_the_problem(hf_clip, tmp_path, caplog):
  model, dirs = hf_clip
  config = model.config.to_dict()
  tensors = {k: v.numpy() for k, v in model.state_dict().items()}

  bert = str(tmp_path / "bert")
  hf_io.save_pretrained(bert, {"model_type": "bert", "architectures": ["BertModel"]}, tensors)
  with pytest.raises(ConversionError, match="model_type='bert'"):
    convert_clip.import_clip(bert)

  truncated = str(tmp_path / "truncated")
  shutil.copytree(dirs["safetensors"], truncated)
  weights = os.path.join(truncated, "model.safetensors")
  with open(weights, "r+b") as f:
    f.truncate(os.path.getsize(weights) // 2)
  with pytest.raises(ConversionError, match="truncated"):
    convert_clip.import_clip(truncated)

  missing = str(tmp_path / "missing")
  name = "text_model.encoder.layers.1.mlp.fc1.weight"
  hf_io.save_pretrained(missing, config, {k: v for k, v in tensors.items() if k != name})
  with pytest.raises(ConversionError, match=rf"'{name}' is missing"):
    convert_clip.import_clip(missing)

  bad_shape = str(tmp_path / "bad_shape")
  wrong = json.loads(json.dumps(config))
  wrong["vision_config"]["intermediate_size"] = 40
  hf_io.save_pretrained(bad_shape, wrong, tensors)
  with pytest.raises(ConversionError, match=r"vision_model\.encoder\.layers\.0\.mlp\.fc1\.weight"
                     r"' has shape \(37, 32\) in the checkpoint, expected \(40, 32\)"):
    convert_clip.import_clip(bad_shape)

  bad_act = str(tmp_path / "bad_act")
  wrong = json.loads(json.dumps(config))
  wrong["text_config"]["hidden_act"] = "swish"
  hf_io.save_pretrained(bad_act, wrong, tensors)
  with pytest.raises(ConversionError, match="clip.text.hidden_act"):
    convert_clip.import_clip(bad_act)

  with pytest.raises(ConversionError, match="not divisible|divisible by"):
    convert_clip.import_clip(dirs["safetensors"], image_size=36)

  extra = str(tmp_path / "extra")
  hf_io.save_pretrained(extra, config, {**tensors, "text_model.embeddings.position_ids":
                         np.arange(16, dtype=np.int64)[None]})
  with caplog.at_level(logging.INFO):
    convert_clip.import_clip(extra)
  assert "text_model.embeddings.position_ids" in caplog.text

  module, params = convert_clip.import_clip(dirs["safetensors"])
  params["visual_projection"]["kernel"] = np.zeros((32, 8), np.float32)
  with pytest.raises(ConversionError, match=r"visual_projection/kernel.*\(32, 8\).*\(32, 16\)"):
    convert_clip.export_clip(module.config, params, str(tmp_path / "never"))


def test_config_validation():
  with pytest.raises(ValueError, match=r"clip.text.heads \(3\) must divide clip.text.hidden"):
    clip.ClipTextConfig(hidden=32, heads=3)
  with pytest.raises(ValueError, match="clip.vision.image_size"):
    clip.ClipVisionConfig(image_size=30, patch_size=8)
  with pytest.raises(ValueError, match="clip.text.eos_token_id"):
    clip.ClipTextConfig(vocab_size=10, eos_token_id=10)
  with pytest.raises(ValueError, match="clip.dtype"):
    clip.ClipConfig(dtype="float16")


def test_hf_facade_reexports(hf_clip):
  from vlp_jax.convert import hf
  assert hf.import_clip is convert_clip.import_clip
  assert hf.export_clip is convert_clip.export_clip
  module, params = hf.import_clip(hf_clip[1]["safetensors"])
  assert isinstance(module, clip.CLIP)
  assert params["logit_scale"].shape == () and params["logit_scale"].dtype == np.float32
