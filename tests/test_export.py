"""launch.export: a sharded ALPRO checkpoint -> transformers checkpoints + jax.export artifact.

The exported BERT / TimeSformer load with `from_pretrained` and reproduce our encoders; the
artifact runs in a fresh process without this project's code and gives our VTC features.
"""
import ast
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import flax.linen as nn  # noqa: E402
from flax import traverse_util  # noqa: E402

from configs import alpro_pretrain  # noqa: E402
from vlp_jax.data import text as text_lib  # noqa: E402
from vlp_jax.data import tokenizer as tok_lib  # noqa: E402
from vlp_jax.models.alpro import ALPRO  # noqa: E402
from vlp_jax.parallel import mesh as mesh_lib  # noqa: E402
from vlp_jax.parallel import sharding as shd  # noqa: E402
from vlp_jax.core import checkpoint as ckpt_lib  # noqa: E402
from vlp_jax.core import task as task_lib  # noqa: E402
from vlp_jax.data.setup import TextInfo  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = ["a red circle moves left", "the video of a blue square", "two shapes"]


def _max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device in the child, as for a user
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _random_params(abstract, seed=3):
  """Non-trivial values for every param (zero biases / temporal_dense would hide layout bugs)."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(abstract)
  return traverse_util.unflatten_dict({
      k: ((1.0 if k[-1] == "scale" else 0.0)
          + 0.05 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in flat.items()})


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """A tiny ALPRO run's params saved sharded over 4 devices, exported by launch.export."""
  root = tmp_path_factory.mktemp("export")
  data_dir, workdir, out = root / "data", root / "run", root / "out"
  vocab = tok_lib.write_vocab(str(data_dir / "vocab.txt"),
                              " ".join(CAPTIONS).split() + ["moves", "right"])
  c = alpro_pretrain.get_config("tiny")
  c.model.text.vocab_size = vocab
  if "pem" in c.loss:
    c.loss.pem = 0.0  # no prompter stage
  c.mesh.update(data=2, fsdp=2, tensor=1)
  c.data.dir = str(data_dir)  # launch.train writes the resolved data dir into config.json
  c.data.num_frames = 3  # clips longer than model.video.num_frames (2): time embeddings resized
  task = task_lib.build(c, TextInfo(None, vocab))
  mesh = mesh_lib.make_mesh(c.mesh, jax.devices()[:4])
  rules = shd.rules_from_config(c.sharding_rules)
  with shd.activate(mesh, rules):
    abstract = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
    shardings = shd.logical_to_sharding(abstract, mesh, rules)
  host = _random_params(nn.unbox(abstract))
  sharded = jax.tree.map(jax.device_put, host, shardings)
  assert any(len(x.sharding.device_set) == 4 and not x.sharding.is_fully_replicated
             for x in jax.tree.leaves(sharded))
  checkpointer = ckpt_lib.Checkpointer(str(workdir), keep=1)
  checkpointer.save(7, {"params": {"model": sharded}, "step": np.int32(7)})
  checkpointer.close()
  (workdir / "config.json").write_text(c.to_json_best_effort(indent=2))
  proc = subprocess.run([sys.executable, "-m", "launch.export", f"--workdir={workdir}",
                         f"--out={out}"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out, task.model, host, c


def _reference(model, params, ids, mask, video):

  @jax.jit
  def forward(p):
    app = lambda *a, **k: model.apply({"params": p}, *a, **k)
    text = app(ids, mask, method=ALPRO.encode_text)
    no_video = jnp.zeros((ids.shape[0], 0, text.shape[-1]), text.dtype)
    fused = app(text, mask, no_video, method=ALPRO.fuse)
    tokens = app(video, method=ALPRO.encode_video)
    return {"text": text, "mlm_logits": app(fused, method=ALPRO.mlm_logits),
            "video_tokens": tokens, "video_feature": app(tokens, method=ALPRO.video_feature),
            "text_feature": app(text, method=ALPRO.text_feature)}

  return jax.tree.map(np.asarray, forward(params))


def test_export_writes_everything(exported):
  out, _, _, _ = exported
  summary = json.loads((out / "export.json").read_text())
  assert summary["step"] == 7 and summary["task"] == "alpro"
  art = out / "artifact"
  for name in ("artifact.json", "encode_video.jaxexport", "encode_video.safetensors",
               "encode_text.jaxexport", "encode_text.safetensors", "vocab.txt",
               "load_artifact.py"):
    assert (art / name).is_file(), name
  meta = json.loads((art / "artifact.json").read_text())
  assert meta["platforms"] == ["cpu", "cuda", "tpu"]
  # The loader normalises frames as the data pipeline does (read from its source: importing
  # it would import TensorFlow).
  tree = ast.parse(open(os.path.join(ROOT, "vlp_jax", "data", "pipeline.py")).read())
  consts = {t.id: ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
            for t in n.targets if isinstance(t, ast.Name) and t.id in ("CLIP_MEAN", "CLIP_STD")}
  assert meta["pixel_mean"] == list(consts["CLIP_MEAN"])
  assert meta["pixel_std"] == list(consts["CLIP_STD"])
  assert meta["functions"]["encode_video"]["inputs"] == [["b", "3", "32", "32", "3"]]
  from safetensors.numpy import load_file
  heads = load_file(str(out / "alpro_heads.safetensors"))
  assert {k.split("/")[0] for k in heads} == {"vision_proj", "text_proj", "temp", "vtm_head"}


def test_transformers_reproduce_our_encoders(exported):
  out, model, params, c = exported
  tok = tok_lib.load_tokenizer(str(out / "bert" / "vocab.txt"))
  ids, mask = text_lib.tokenize(tok, CAPTIONS, c.data.max_text_len)
  assert (mask == 0).any()
  video = np.random.default_rng(0).standard_normal((3, 3, 32, 32, 3)).astype(np.float32)
  ref = _reference(model, params, ids, mask, video)

  bert = transformers.BertForMaskedLM.from_pretrained(str(out / "bert")).eval()
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(out / "bert"))
  np.testing.assert_array_equal(hf_tok(CAPTIONS, padding="max_length", truncation=True,
                                       max_length=c.data.max_text_len)["input_ids"], ids)
  with torch.no_grad():
    o = bert(input_ids=torch.tensor(ids, dtype=torch.long),
             attention_mask=torch.tensor(mask, dtype=torch.long), output_hidden_states=True)
  fusion_layer = model.config.text.fusion_layer
  video_model = transformers.TimesformerModel.from_pretrained(str(out / "timesformer")).eval()
  with torch.no_grad():
    h = video_model(torch.tensor(video.transpose(0, 1, 4, 2, 3))).last_hidden_state.numpy()
  assert video_model.config.num_frames == 3
  t, n = 3, (32 // 16) ** 2  # HF tokens are [CLS, patch-major (n, t)]
  pooled = np.concatenate([h[:, :1], h[:, 1:].reshape(3, n, t, -1).mean(2)], axis=1)
  diffs = {"bert hidden_states[fusion_layer] vs encode_text": _max_diff(
               o.hidden_states[fusion_layer], ref["text"]),
           "bert MLM logits vs ours (text-only fusion)": _max_diff(o.logits, ref["mlm_logits"]),
           "timesformer CLS + temporal patch mean vs encode_video": _max_diff(
               pooled, ref["video_tokens"])}
  print("\n" + "\n".join(f"max|diff| export {k}: {v:.2e}" for k, v in diffs.items()))
  assert max(diffs.values()) <= 1e-4


def test_artifact_runs_in_a_fresh_process_without_our_code(exported, tmp_path):
  out, model, params, c = exported
  video = np.random.default_rng(1).standard_normal((3, 3, 32, 32, 3)).astype(np.float32)
  np.save(tmp_path / "video.npy", video)
  script = f"""
import json, sys
import numpy as np
sys.path.insert(0, {str(out / "artifact")!r})
from load_artifact import Artifact
art = Artifact({str(out / "artifact")!r})
v = art.encode_video(np.load({str(tmp_path / "video.npy")!r}))
t = art.encode_text({CAPTIONS!r})
ids, mask = art.tokenize({CAPTIONS!r})
assert not any(m.startswith("vlp_jax") for m in sys.modules), "imported our code"
np.savez({str(tmp_path / "got.npz")!r}, video=v["feature"], video_tokens=v["tokens"],
         text=t["feature"], text_tokens=t["tokens"], ids=ids, mask=mask)
"""
  proc = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env=_env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = np.load(tmp_path / "got.npz")
  tok = tok_lib.load_tokenizer(os.path.join(c.data.dir, "vocab.txt"))
  ids, mask = text_lib.tokenize(tok, CAPTIONS, c.data.max_text_len)
  np.testing.assert_array_equal(got["ids"], ids)
  np.testing.assert_array_equal(got["mask"], mask)
  ref = _reference(model, params, ids, mask, video)
  diffs = {"video feature": _max_diff(got["video"], ref["video_feature"]),
           "text feature": _max_diff(got["text"], ref["text_feature"]),
           "video tokens": _max_diff(got["video_tokens"], ref["video_tokens"]),
           "text tokens": _max_diff(got["text_tokens"], ref["text"])}
  print("\n" + "\n".join(f"max|diff| artifact (fresh process, batch 3) {k}: {v:.2e}"
                         for k, v in diffs.items()))
  assert got["video"].shape == (3, c.model.embed_dim)
  np.testing.assert_allclose(np.linalg.norm(got["video"], axis=-1), 1.0, rtol=1e-5)
  assert max(diffs.values()) <= 1e-5
