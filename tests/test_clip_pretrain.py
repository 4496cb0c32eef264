"""Prompt-CLIP's CLIP pre-training: the CLIP tokenizer learned from captions loads as openai's
does, `clip_pretrain:tiny` trains on the synthetic stills with InfoNCE (equal to a naive numpy
InfoNCE on the model's features) and evaluates, and its export is a transformers CLIPModel
directory that reproduces our features and imports back to the same params."""
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import clip_pretrain
from vlp_jax.data import clip_tokenizer
from vlp_jax.data import text as text_lib
from vlp_jax.data import tokenizer as tok_lib

CAPTION = "a small red circle moves to the left"
CORPUS = [CAPTION, "A large blue square moves to the right.", "a green star grows",
          "two shapes: a red circle and a green star", "the small triangle shrinks"] * 4


def test_clip_tokenizer_encodes_and_decodes_as_openai_clip(tmp_path):
  transformers = pytest.importorskip("transformers")
  out = str(tmp_path / "tok")
  built = clip_tokenizer.build_clip_tokenizer(CORPUS, out, vocab_size=1024)
  for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"):
    assert os.path.isfile(os.path.join(out, name)), name
  hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
  ours = tok_lib.load_tokenizer(out)
  n = len(ours)
  assert len(hf_tok) == len(built) == n < 1024
  # openai's layout: byte characters, their </w> forms, the merges, then SOT and EOT.
  with open(os.path.join(out, "vocab.json"), encoding="utf-8") as f:
    vocab = json.load(f)
  assert vocab["!"] == 0 and vocab["!</w>"] == 256
  assert (vocab[clip_tokenizer.SOT], vocab[clip_tokenizer.EOT]) == (n - 2, n - 1)
  sot, eot = n - 2, n - 1
  assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (sot, eot, eot)
  assert ours.model_max_length == 77

  ids, mask = text_lib.tokenize(ours, [CAPTION, CAPTION.upper()], 16)
  words = CAPTION.split()
  assert ids[0, 0] == sot and ids[0, len(words) + 1] == eot
  assert np.all(ids[0, len(words) + 1:] == eot)  # padded with EOT, as openai's
  assert mask[0].tolist() == [1] * (len(words) + 2) + [0] * (16 - len(words) - 2)
  # Every word of the corpus is one merged token; CLIP lowercases.
  assert ours.convert_ids_to_tokens(ids[0, 1:len(words) + 1].tolist()) == [
      w + "</w>" for w in words]
  np.testing.assert_array_equal(ids[1], ids[0])
  np.testing.assert_array_equal(
      hf_tok([CAPTION], padding="max_length", max_length=16)["input_ids"], ids[:1])
  assert ours.decode(ids[0], skip_special_tokens=True) == CAPTION
  # Unseen text still encodes (bytes) and round-trips, lowercased.
  unseen = "Zebra 42 jumps!"
  assert ours.decode(ours(unseen)["input_ids"], skip_special_tokens=True) == "zebra 4 2 jumps !"
  with pytest.raises(ValueError, match="vocab_size=100 must be >= 514"):
    clip_tokenizer.build_clip_tokenizer(CORPUS, str(tmp_path / "small"), vocab_size=100)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """`clip_pretrain:tiny` trained on one device (the trainer keeps the final state) and
  exported by `launch.export`'s code."""
  from vlp_jax.convert import export
  from vlp_jax.core import trainer
  root = tmp_path_factory.mktemp("clip_pretrain")
  workdir, out = str(root / "run"), str(root / "hf")
  c = clip_pretrain.get_config("tiny")
  run = trainer.Trainer(c, workdir, devices=jax.devices()[:1]).build()
  results = run.fit()
  summary = export.export_run(workdir, out)
  return run, out, results, summary


def _logged_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  return [r["loss"] for r in rows if "loss" in r]


def test_tiny_trains_on_stills_with_a_learned_clip_tokenizer_and_evaluates(trained):
  run, _, results, _ = trained
  c, workdir = run.config, run.workdir
  tok_dir = os.path.join(workdir, "data", clip_tokenizer.TOKENIZER_DIR)
  with open(os.path.join(tok_dir, clip_tokenizer.BUILD_FILE), encoding="utf-8") as f:
    assert json.load(f)["splits"] == ["images", "train"]
  losses = _logged_losses(workdir)
  assert len(losses) == 3 and all(np.isfinite(losses)) and losses[-1] < losses[0]
  assert results["train"]["logit_scale"] <= 100.0
  test = results["test"]
  assert test["eval/num_clips"] == c.data.synthetic.num_test
  assert 0.0 <= test["retrieval/t2v_R@1"] <= 100.0 and "retrieval/contrast_acc" in test


def test_loss_is_symmetric_infonce_of_the_model_features(trained):
  run = trained[0]
  c = run.config
  batch = next(iter(run.loaders()["train"]))
  assert batch["video"].shape == (8, 1, 32, 32, 3)  # one-frame stills
  device = run.device_batches({"train": batch})
  params = run.state.params
  loss, metrics = jax.jit(lambda p, b: run.task.loss(p, b, jax.random.PRNGKey(0), train=True))(
      params, device)
  image, text = jax.device_get(jax.jit(run.task.features)(params["model"], device["train"]))
  scale = float(np.exp(min(float(params["model"]["logit_scale"]),
                           float(c.model.max_logit_scale))))
  logits = scale * np.asarray(text, np.float64) @ np.asarray(image, np.float64).T
  diag = np.arange(len(logits))

  def ce(x):  # rows: each query against every candidate, target = its own pair
    x = x - x.max(1, keepdims=True)
    return -(x[diag, diag] - np.log(np.exp(x).sum(1)))

  want = np.mean(0.5 * (ce(logits) + ce(logits.T)))
  assert float(loss) == pytest.approx(want, rel=1e-5)
  assert float(metrics["logit_scale"]) == pytest.approx(scale, rel=1e-6)


def test_export_is_a_transformers_clip_model_with_our_features_and_params(trained):
  torch = pytest.importorskip("torch", reason="comparing with transformers' CLIPModel needs torch")
  transformers = pytest.importorskip("transformers")
  from vlp_jax.convert import hf
  from vlp_jax.models.clip import CLIP
  run, out, _, summary = trained
  c = run.config
  assert summary["task"] == "clip_pretrain" and summary["step"] == c.num_steps
  assert summary["clip"] == out and summary["tokenizer"] == out
  with open(os.path.join(out, "export.json"), encoding="utf-8") as f:
    assert json.load(f) == summary
  for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "vocab.json", "merges.txt", "preprocessor_config.json"):
    assert os.path.isfile(os.path.join(out, name)), name

  params = jax.device_get(run.state.params["model"])
  model, imported = hf.import_clip(out)
  flat_ours = traverse_util.flatten_dict(params)
  flat_imported = traverse_util.flatten_dict(imported)
  assert set(flat_ours) == set(flat_imported)
  for k, v in flat_ours.items():
    np.testing.assert_array_equal(flat_imported[k], np.asarray(v), err_msg="/".join(k))

  hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
  ids, mask = text_lib.tokenize(run.text.tokenizer, [CAPTION, "a blue square"],
                                c.data.max_text_len)
  np.testing.assert_array_equal(
      hf_tok([CAPTION, "a blue square"], padding="max_length",
             max_length=c.data.max_text_len)["input_ids"], ids)
  pixels = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
  app = lambda *a, method: run.task.model.apply({"params": params}, *a, method=method)
  ours_image = np.asarray(app(jnp.asarray(pixels), method=CLIP.encode_image))
  ours_text = np.asarray(app(jnp.asarray(ids), jnp.asarray(mask), method=CLIP.encode_text))

  hf_model = transformers.CLIPModel.from_pretrained(out).eval()
  with torch.no_grad():
    hf_image = hf_model.get_image_features(
        pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)))
    hf_text = hf_model.get_text_features(input_ids=torch.tensor(ids, dtype=torch.long),
                                         attention_mask=torch.tensor(mask, dtype=torch.long))
  hf_out = lambda o: getattr(o, "pooler_output", o).detach().numpy()  # transformers 4 / 5
  np.testing.assert_allclose(hf_out(hf_image), ours_image, atol=1e-4)
  np.testing.assert_allclose(hf_out(hf_text), ours_text, atol=1e-4)
  assert model.config.text.eos_token_id == hf_tok.eos_token_id


def test_export_of_a_task_without_one_names_the_task(tmp_path, monkeypatch):
  from vlp_jax.convert import export
  from vlp_jax.core import task as task_lib
  # The contract's default: no export.
  assert task_lib.Task.export(None, {}, str(tmp_path), platforms=("cpu",)) is None
  run = types.SimpleNamespace(task=types.SimpleNamespace(export=lambda *a, **k: None),
                              params={}, step=1)
  monkeypatch.setattr(export, "load_run_config", lambda w: clip_pretrain.get_config("tiny"))
  monkeypatch.setattr(export, "restore_params", lambda *a, **k: run)
  with pytest.raises(ValueError, match="task 'clip_pretrain' has no export"):
    export.export_run(str(tmp_path), str(tmp_path / "out"))
