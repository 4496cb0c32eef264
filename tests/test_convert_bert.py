"""BERT checkpoints: import against `transformers`, ALPRO text init, formats and errors."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import flax.linen as nn  # noqa: E402
from flax import traverse_util  # noqa: E402

from vlp_jax.convert import bert as bert_conv  # noqa: E402
from helpers import perturb  # noqa: E402
from vlp_jax.convert import hf, hf_io  # noqa: E402
from vlp_jax.models.alpro import ALPRO, ALPROConfig, TextConfig, VideoConfig  # noqa: E402

VOCAB, LAYERS, FUSION = 60, 3, 2


def _bert_config(**kw):
  return transformers.BertConfig(
      vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
      intermediate_size=64, max_position_embeddings=40, hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0, **kw)


def _inputs(batch=2, length=7):
  rng = np.random.default_rng(0)
  ids = rng.integers(5, VOCAB, (batch, length)).astype(np.int32)
  mask = np.ones((batch, length), np.int32)
  mask[1, 4:] = 0  # padding
  ids[mask == 0] = 0
  return ids, mask


def _torch_outputs(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long), output_hidden_states=True)


def _max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.fixture(scope="module")
def mlm(tmp_path_factory):
  """A random BertForMaskedLM saved with save_pretrained: (dir, torch model)."""
  torch.manual_seed(0)
  model = perturb(transformers.BertForMaskedLM(_bert_config()))
  path = str(tmp_path_factory.mktemp("bert_mlm"))
  model.save_pretrained(path)
  return path, model


def _alpro_config(**text):
  kw = dict(vocab_size=VOCAB, hidden=32, layers=LAYERS, fusion_layer=FUSION, heads=2, mlp_dim=64,
            max_position=16, dropout=0.0)
  kw.update(text)
  video = VideoConfig(image_size=16, patch_size=8, num_frames=2, hidden=32, layers=1, heads=2,
                      mlp_dim=64)
  return ALPROConfig(video=video, text=TextConfig(**kw), embed_dim=16)


def test_import_bert_matches_transformers(mlm):
  path, model = mlm
  ids, mask = _inputs()
  module, params = hf.import_bert(path)
  ours = jax.jit(module.apply)({"params": params}, ids, mask)
  ref = _torch_outputs(model, ids, mask).hidden_states[-1].numpy()
  diff = _max_diff(ours, ref)
  print(f"\nmax|diff| bert last_hidden_state (padded batch): {diff:.2e}")
  assert ours.shape == ref.shape == (2, 7, 32)
  assert diff <= 1e-4


def test_checkpoint_formats_and_unused_tensors(mlm, tmp_path):
  path, model = mlm
  _, want, unused = bert_conv.bert_params(path)
  assert unused == sorted(n for n in hf_io.load_pretrained(path)[1] if n.startswith("cls."))
  # A BertModel (no `bert.` prefix, with a pooler) of the same weights, as a PyTorch .bin and
  # as sharded safetensors: the same params, the pooler listed as unused.
  base = transformers.BertModel(_bert_config())
  missing, _ = base.load_state_dict(model.bert.state_dict(), strict=False)
  assert all(k.startswith("pooler.") for k in missing)
  bin_dir, sharded_dir = tmp_path / "bin", tmp_path / "sharded"
  base.config.save_pretrained(bin_dir)
  torch.save(base.state_dict(), bin_dir / "pytorch_model.bin")
  base.save_pretrained(sharded_dir, max_shard_size="20KB")
  assert (sharded_dir / "model.safetensors.index.json").exists()
  flat_want = traverse_util.flatten_dict(want)
  for d in (bin_dir, sharded_dir):
    _, got, unused = bert_conv.bert_params(str(d))
    assert unused == ["pooler.dense.bias", "pooler.dense.weight"]
    flat = traverse_util.flatten_dict(got)
    assert flat.keys() == flat_want.keys()
    for k, v in flat.items():
      np.testing.assert_array_equal(v, flat_want[k], err_msg=f"{d.name}: {'/'.join(k)}")
  # bfloat16 safetensors (numpy has no bfloat16): read, widened to float32.
  half_dir = tmp_path / "bf16"
  base.to(torch.bfloat16).save_pretrained(half_dir)
  _, got, _ = bert_conv.bert_params(str(half_dir))
  for k, v in traverse_util.flatten_dict(got).items():
    assert v.dtype == np.float32
    np.testing.assert_allclose(v, flat_want[k], rtol=1e-2, atol=1e-2, err_msg="/".join(k))
    np.testing.assert_array_equal(v, v.astype(jnp.bfloat16).astype(np.float32))


def _alpro_params(cfg, ids, mask):
  video = np.zeros((1, 2, 16, 16, 3), np.float32)
  variables = jax.jit(ALPRO(cfg).init)(jax.random.PRNGKey(1), video, ids[:1], mask[:1])
  return jax.tree.map(np.asarray, nn.unbox(variables["params"]))


def test_init_alpro_text_splits_layers_and_round_trips(mlm, tmp_path):
  path, model = mlm
  ids, mask = _inputs()
  cfg = _alpro_config()
  params = _alpro_params(cfg, ids, mask)
  new = hf.init_alpro_text(params, path, cfg)

  flat_old, flat_new = traverse_util.flatten_dict(params), traverse_util.flatten_dict(new)
  assert flat_old.keys() == flat_new.keys()
  for k, v in flat_old.items():
    assert flat_new[k].shape == v.shape, k
    if k[0] in ("video_encoder", "vision_proj", "text_proj", "temp", "vtm_head"):
      np.testing.assert_array_equal(flat_new[k], v, err_msg="/".join(k))
    else:
      assert not np.array_equal(flat_new[k], v), f"{'/'.join(k)} was not imported"
  enc = traverse_util.flatten_dict(new["text_encoder"]["encoder"])
  fus = traverse_util.flatten_dict(new["fusion_encoder"]["encoder"])
  assert {k[0] for k in enc} == {"layer_0", "layer_1"} and {k[0] for k in fus} == {"layer_2"}
  np.testing.assert_array_equal(  # max_position 16 < 40: the first 16 rows
      new["text_encoder"]["embeddings"]["position_embeddings"]["embedding"],
      model.bert.embeddings.position_embeddings.weight.detach().numpy()[:16])

  module = ALPRO(cfg)

  @jax.jit
  def forward(p, ids, mask):
    text = module.apply({"params": p}, ids, mask, method=ALPRO.encode_text)
    no_video = jnp.zeros((ids.shape[0], 0, cfg.text.hidden), jnp.float32)
    fused = module.apply({"params": p}, text, mask, no_video, method=ALPRO.fuse)
    return text, fused, module.apply({"params": p}, fused, method=ALPRO.mlm_logits)

  text, fused, logits = forward(new, ids, mask)
  ref = _torch_outputs(model, ids, mask)
  diffs = {
      "text encoder vs hidden_states[fusion_layer]": _max_diff(text, ref.hidden_states[FUSION]),
      "fusion (text only) vs hidden_states[-1]": _max_diff(fused, ref.hidden_states[-1]),
      "mlm logits": _max_diff(logits, ref.logits)}
  print("\n" + "\n".join(f"max|diff| ALPRO init {k}: {v:.2e}" for k, v in diffs.items()))
  assert max(diffs.values()) <= 1e-4

  # Round trip: our params -> BertForMaskedLM checkpoint -> transformers -> same tensors.
  out = tmp_path / "export"
  hf_io.save_pretrained(str(out), *bert_conv.export_alpro_text(new, cfg.text))
  loaded, info = transformers.BertForMaskedLM.from_pretrained(str(out), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  want = model.state_dict()
  for name, tensor in loaded.state_dict().items():
    ref_t = want[name].numpy()
    if name == "bert.embeddings.position_embeddings.weight":
      ref_t = ref_t[:16]
    np.testing.assert_array_equal(tensor.numpy(), ref_t, err_msg=name)
  assert loaded.cls.predictions.decoder.weight.data_ptr() == (
      loaded.bert.embeddings.word_embeddings.weight.data_ptr())  # tied, as in ours


def _rewrite(src: str, dst, config=None, tensors=None):
  shutil.copytree(src, dst)
  c, t = hf_io.load_pretrained(str(dst))
  hf_io.save_pretrained(str(dst), config or c, tensors if tensors is not None else t)
  return str(dst)


def test_errors_name_the_problem(mlm, tmp_path):
  path, _ = mlm
  # Truncated weights file: named.
  broken = tmp_path / "truncated"
  shutil.copytree(path, broken)
  weights = broken / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:-100])
  with pytest.raises(hf.ConversionError, match=r"model\.safetensors .*truncated"):
    hf.import_bert(str(broken))
  # Another architecture.
  config, tensors = hf_io.load_pretrained(path)
  vit = _rewrite(path, tmp_path / "vit", dict(config, model_type="vit",
                                             architectures=["ViTModel"]))
  with pytest.raises(hf.ConversionError, match=r"model_type='vit' \(architectures=\['ViTModel'\]"
                                               r"\), expected one of \['bert'\]"):
    hf.import_bert(vit)
  # A tensor with another shape: its name, the checkpoint shape and the expected one.
  name = "bert.encoder.layer.1.attention.self.key.weight"
  bad = _rewrite(path, tmp_path / "shape", tensors=dict(tensors, **{name: tensors[name][:, :16]}))
  with pytest.raises(hf.ConversionError, match=rf"{name}' has shape \(32, 16\) in the "
                                               r"checkpoint, expected \(32, 32\)"):
    hf.import_bert(bad)
  # A missing tensor: named, with near names.
  name = "bert.encoder.layer.2.output.dense.bias"
  gone = _rewrite(path, tmp_path / "missing",
                  tensors={k: v for k, v in tensors.items() if k != name})
  with pytest.raises(hf.ConversionError, match=rf"'{name}' is missing; near names"):
    hf.import_bert(gone)
  # Sizes that differ from the model config name both keys.
  with pytest.raises(hf.ConversionError, match=r"intermediate_size=64 but model.text.mlp_dim=48"):
    hf.init_alpro_text({}, path, _alpro_config(mlp_dim=48))
  # Directory problems.
  with pytest.raises(hf.ConversionError, match="does not exist"):
    hf.import_bert(str(tmp_path / "nowhere"))
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "config.json").write_text(json.dumps(config))
  with pytest.raises(hf.ConversionError, match="has no weights file"):
    hf.import_bert(str(tmp_path / "empty"))
  assert os.path.isdir(path)
