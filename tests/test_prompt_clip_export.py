"""launch.export of a prompt_clip_action run: the frozen CLIP loads with transformers, and the
jax.export artifact, run in a fresh process without this project's code, tokenises class names
as training does and gives the task's own class probabilities.

The world (tiny CLIP, its tokenizer, a feature cache) is that of test_prompt_clip_action.py."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import test_prompt_clip_action as pca
from vlp_jax.convert import export as export_lib
from vlp_jax.core.trainer import Trainer

transformers = pytest.importorskip("transformers")
pytest.importorskip("torch")

world = pca.world  # the module-scoped fixture


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device in the child, as for a user
  env["JAX_PLATFORMS"] = "cpu"
  return env


@pytest.fixture(scope="module")
def exported(world, tmp_path_factory):
  """A tiny run trained 3 steps (checkpoint at the end), exported for the CPU."""
  root = tmp_path_factory.mktemp("prompt_clip_export")
  c = pca._config(world, **{"num_steps": 3, "ckpt_every": 3, "log_every": 1, "mesh.data": 1})
  c.evals = {}
  workdir, out = str(root / "run"), str(root / "out")
  Trainer(c, workdir, devices=jax.devices()[:1]).build().fit()
  summary = export_lib.export_run(workdir, out, platforms=("cpu",))
  run = export_lib.restore_params(export_lib.load_run_config(workdir), workdir)
  return out, run, summary


def _reference(run, features, names):
  """The task's own softmax(logits) of `names` on frame features [B, T, D]."""
  task = run.task
  tokens = task._tokens(names)
  logits = jax.jit(lambda p, f: task.logits(p, task._clip_host, f, tokens))(run.params, features)
  return np.asarray(jax.nn.softmax(logits, axis=-1)), tokens


def test_export_writes_clip_prompts_and_artifact(exported):
  out, run, summary = exported
  assert summary["step"] == 3 and summary["task"] == "prompt_clip_action"
  model = transformers.CLIPModel.from_pretrained(os.path.join(out, "clip"))
  assert model.config.projection_dim == pca.D
  tok = transformers.AutoTokenizer.from_pretrained(os.path.join(out, "clip"))
  assert tok("growing", add_special_tokens=False)["input_ids"]
  with open(os.path.join(out, "prompt_clip.json")) as f:
    meta = json.load(f)
  assert meta["class_names"] == pca.NAMES
  assert meta["prompts"] == {"prefix": 2, "suffix": 2, "layout": "shared", "table_rows": 4,
                             "template": "{}"}
  assert meta["temporal"]["layers"] == 1 and meta["temperature"] == pytest.approx(0.07)
  from safetensors.numpy import load_file
  trained = load_file(os.path.join(out, "prompt_clip.safetensors"))
  np.testing.assert_array_equal(trained["prompts/prompts"], run.params["prompts"]["prompts"])
  assert any(k.startswith("temporal/encoder/") for k in trained)
  assert sorted(os.listdir(os.path.join(out, "artifact"))) == [
      "artifact.json", "artifact_loader.py", "classify.jaxexport", "classify.safetensors",
      "encode_classes.jaxexport", "encode_classes.safetensors", "load_artifact.py"]


def test_artifact_classifies_like_the_task_in_a_fresh_process(exported, tmp_path):
  out, run, _ = exported
  rng = np.random.default_rng(5)
  features = rng.standard_normal((3, pca.LENGTH, pca.D)).astype(np.float32)
  np.save(tmp_path / "features.npy", features)
  names = ["growing", "moving left", "shrinking", "moving up moving down"]
  art = os.path.join(out, "artifact")
  script = f"""
import sys
import numpy as np
sys.path.insert(0, {art!r})
from load_artifact import load
model = load({art!r})
f = np.load({str(tmp_path / "features.npy")!r})
probs = model.classify(f, {names!r})
ids, slot, eot = model.tokenize({names!r})
run_probs = model.classify(f[:1], model.meta["class_names"])
errors = []
for bad in (["growing", "growing " * 20], ["growing", ""], ["growing", "<|endoftext|>"]):
  try:
    model.classify(f, bad)
    errors.append("no error")
  except ValueError as e:
    errors.append(str(e))
assert not any(m.startswith("vlp_jax") for m in sys.modules), "imported our code"
np.savez({str(tmp_path / "got.npz")!r}, probs=probs, ids=ids, slot=slot, eot=eot,
         run_probs=run_probs, errors=np.asarray(errors))
"""
  proc = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env=_env(),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = np.load(tmp_path / "got.npz")
  ref, tokens = _reference(run, features, names)
  np.testing.assert_array_equal(got["ids"], tokens.ids)
  np.testing.assert_array_equal(got["slot"], tokens.slot)
  np.testing.assert_array_equal(got["eot"], tokens.eot_index)
  diff = float(np.max(np.abs(got["probs"] - ref)))
  print(f"\nmax|diff| artifact (fresh process) vs task softmax(logits): {diff:.2e}")
  assert got["probs"].shape == (3, len(names))
  assert diff <= 1e-4
  np.testing.assert_allclose(got["probs"].sum(axis=1), 1.0, rtol=1e-5)
  run_ref, _ = _reference(run, features[:1], pca.NAMES)
  assert float(np.max(np.abs(got["run_probs"] - run_ref))) <= 1e-4
  too_long, empty, unknown = (str(e) for e in got["errors"])
  assert "'growing growing" in too_long and "tokens" in too_long and "fit" in too_long
  assert "non-empty" in empty
  assert "'<|endoftext|>'" in unknown and "unknown" in unknown


def test_official_layout_without_temporal_layers_in_process(world, tmp_path):
  """The other prompt layout, a template and mean pooling (no `temporal` collection), from init
  params through `Task.export`; the loader imported in this process."""
  import importlib.util

  c = pca._config(world, **{"model.prompts.layout": "official", "model.temporal.layers": 0,
                            "model.prompts.template": "moving {}"})
  task = pca._task(c)
  params = pca._params(task)
  assert "temporal" not in params
  written = task.export(params, str(tmp_path), platforms=("cpu",))
  spec = importlib.util.spec_from_file_location(
      "prompt_clip_artifact", os.path.join(written["artifact"], "load_artifact.py"))
  loader = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(loader)
  model = loader.load(written["artifact"])
  assert model.meta["prompts"]["layout"] == "official"
  assert model.meta["prompts"]["template"] == "moving {}"  # the loader wraps names the same way
  features = np.random.default_rng(6).standard_normal((2, pca.LENGTH, pca.D)).astype(np.float32)
  names = ["moving right", "growing"]
  ids, slot, eot = model.tokenize(names)
  tokens = task._tokens(names)
  np.testing.assert_array_equal(slot, tokens.slot)
  np.testing.assert_array_equal(ids, tokens.ids)
  np.testing.assert_array_equal(eot, tokens.eot_index)
  logits = task.logits(params, task._clip_host, features, tokens)
  ref = np.asarray(jax.nn.softmax(logits, axis=-1))
  assert float(np.max(np.abs(model.classify(features, names) - ref))) <= 1e-4
  with pytest.raises(ValueError, match=r"features must have shape \[B, 4, 16\]"):
    model.classify(features[:, :2], names)
