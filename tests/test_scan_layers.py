"""model.scan_layers: one nn.scan over identical layers, stacked params converted at the
Hugging Face boundary (vlp_jax/convert/stacked.py)."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from vlp_jax.convert import stacked
from vlp_jax.core import init as init_lib
from vlp_jax.models import layers
from vlp_jax.models.alpro import ALPRO, ALPROConfig, TextConfig, VideoConfig

VIDEO = VideoConfig(image_size=16, patch_size=8, num_frames=2, hidden=32, layers=3, heads=2,
                    mlp_dim=64)
TEXT = TextConfig(vocab_size=40, hidden=32, layers=4, fusion_layer=2, heads=2, mlp_dim=64,
                  max_position=16, dropout=0.0)
CFG = ALPROConfig(video=VIDEO, text=TEXT, embed_dim=16)


def _inputs():
  rng = np.random.default_rng(0)
  video = rng.standard_normal((2, 2, 16, 16, 3)).astype(np.float32)
  ids = rng.integers(1, 40, size=(2, 8)).astype(np.int32)
  mask = (np.arange(8)[None] < np.array([[8], [5]])).astype(np.int32)
  return video, ids, mask


def _init(cfg):
  video, ids, mask = _inputs()
  boxed = jax.jit(ALPRO(cfg).init)(jax.random.PRNGKey(0), video, ids, mask)["params"]
  return boxed, jax.tree.map(np.asarray, nn.unbox(boxed))


def test_scanned_model_equals_the_layer_loop():
  _, plain = _init(CFG)
  scanned_cfg = dataclasses.replace(CFG, scan_layers=True)
  boxed, scanned = _init(scanned_cfg)
  # Stacked params: one block per encoder, a leading layer axis named "layers".
  assert list(scanned["video_encoder"]["encoder"]) == ["layers_from_0"]
  assert list(scanned["text_encoder"]["encoder"]) == ["layers_from_0"]
  assert list(scanned["fusion_encoder"]["encoder"]) == ["layers_from_2"]
  qkv = boxed["video_encoder"]["encoder"]["layers_from_0"]["layer"]["attention"]["attention"]
  assert qkv["qkv"]["kernel"].names[0] == "layers" and "layers" in layers.LOGICAL_AXES
  assert scanned["fusion_encoder"]["encoder"]["layers_from_2"]["layer"]["output"]["dense"][
      "kernel"].shape == (2, 64, 32)

  # The loop's params, stacked, give the same outputs; unstacking gives them back exactly.
  converted = stacked.stack_like(plain, scanned)
  assert jax.tree.structure(converted) == jax.tree.structure(scanned)
  back = stacked.unstack(converted)
  assert jax.tree.structure(back) == jax.tree.structure(plain)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(plain)):
    np.testing.assert_array_equal(a, b)
  video, ids, mask = _inputs()
  want = jax.jit(ALPRO(CFG).apply)({"params": plain}, video, ids, mask)
  got = jax.jit(ALPRO(scanned_cfg).apply)({"params": converted}, video, ids, mask)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_scanned_gradients_equal_the_layer_loop():
  _, plain = _init(CFG)
  scanned_cfg = dataclasses.replace(CFG, scan_layers=True)
  _, scanned = _init(scanned_cfg)
  video, ids, mask = _inputs()

  def loss(cfg, p):
    out = ALPRO(cfg).apply({"params": p}, video, ids, mask)
    return (jnp.sum(out["video_feature"] @ out["text_feature"].T)
            + jnp.sum(out["mlm_logits"] ** 2) * 1e-3 + jnp.sum(out["vtm_logits"]))

  g_plain = jax.jit(jax.grad(lambda p: loss(CFG, p)))(plain)
  g_scan = jax.jit(jax.grad(lambda p: loss(scanned_cfg, p)))(stacked.stack_like(plain, scanned))
  flat_plain = traverse_util.flatten_dict(g_plain)
  flat_scan = traverse_util.flatten_dict(stacked.unstack(jax.tree.map(np.asarray, g_scan)))
  assert flat_plain.keys() == flat_scan.keys()
  for k, v in flat_plain.items():
    np.testing.assert_allclose(flat_scan[k], v, rtol=1e-4, atol=1e-6, err_msg="/".join(k))


def test_weight_decay_mask_ignores_the_layer_axis_and_skips_video_embeddings():
  from vlp_jax.core import optim
  _, plain = _init(CFG)
  _, scanned = _init(dataclasses.replace(CFG, scan_layers=True))
  mask = optim.decay_mask(scanned)
  assert not mask["video_encoder"]["encoder"]["layers_from_0"]["layer"]["output"]["dense"][
      "bias"]  # [layers, D]: a bias
  want = traverse_util.flatten_dict(optim.decay_mask(plain))
  got = traverse_util.flatten_dict(stacked.unstack(
      jax.tree.map(lambda m, p: np.full(p.shape[:1], m), mask, scanned)))
  assert want.keys() == got.keys()
  assert all(bool(np.all(got[k])) == v and bool(np.all(got[k] == v)) for k, v in want.items())
  # ALPRO's default: TimeSformer's CLS token, position and time embeddings are not decayed
  # (BERT's position embeddings are).
  from configs import alpro_pretrain
  no_decay = alpro_pretrain.get_config("tiny").optim.model.no_decay
  emb = optim.decay_mask(plain, no_decay)
  assert not any(emb["video_encoder"]["embeddings"][k]
                 for k in ("cls_token", "position_embeddings", "time_embeddings"))
  assert emb["video_encoder"]["embeddings"]["patch_embeddings"]["projection"]["kernel"]
  assert emb["text_encoder"]["embeddings"]["position_embeddings"]["embedding"]


def test_init_checkpoint_refuses_another_layer_layout(monkeypatch):
  _, plain = _init(CFG)
  _, scanned = _init(dataclasses.replace(CFG, scan_layers=True))
  shapes = {("model",) + k: v.shape
            for k, v in traverse_util.flatten_dict(scanned).items()}
  monkeypatch.setattr(init_lib, "checkpoint_param_shapes", lambda workdir, step: (7, shapes))
  with pytest.raises(ValueError, match=r"scan_layers=True.*scan_layers=False"):
    init_lib.copy_matching({"model": plain}, {}, "/runs/scanned")


transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


def test_hf_import_and_export_through_stacked_params(tmp_path):
  """init.text / init.video into a scanned model = the loop model's import, stacked; the
  export of a scanned model writes the same checkpoint as the loop model's."""
  from helpers import perturb
  from vlp_jax.convert import export as export_lib
  from vlp_jax.convert import hf, hf_io

  torch.manual_seed(0)
  bert = perturb(transformers.BertForMaskedLM(transformers.BertConfig(
      vocab_size=40, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
      intermediate_size=64, max_position_embeddings=16)))
  bert.save_pretrained(str(tmp_path / "bert"))
  tsf = perturb(transformers.TimesformerModel(transformers.TimesformerConfig(
      image_size=16, patch_size=8, num_frames=2, hidden_size=32, num_hidden_layers=3,
      num_attention_heads=2, intermediate_size=64, layer_norm_eps=1e-6)))
  tsf.save_pretrained(str(tmp_path / "tsf"))

  _, plain = _init(CFG)
  scanned_cfg = dataclasses.replace(CFG, scan_layers=True)
  _, scanned = _init(scanned_cfg)
  want = hf.init_alpro_video(hf.init_alpro_text(plain, str(tmp_path / "bert"), CFG),
                             str(tmp_path / "tsf"), CFG)
  got = hf.init_alpro_video(hf.init_alpro_text(scanned, str(tmp_path / "bert"), scanned_cfg),
                            str(tmp_path / "tsf"), scanned_cfg)
  assert jax.tree.structure(got) == jax.tree.structure(scanned)
  for a, b in zip(jax.tree.leaves(stacked.unstack(got)), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  for name, (p, cfg) in {"plain": (want, CFG), "scanned": (got, scanned_cfg)}.items():
    export_lib.export_transformers(p, cfg, str(tmp_path / name))
  for sub in ("bert", "timesformer"):
    a = hf_io.load_pretrained(str(tmp_path / "plain" / sub))[1]
    b = hf_io.load_pretrained(str(tmp_path / "scanned" / sub))[1]
    assert sorted(a) == sorted(b)
    for k in a:
      np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
