"""PEM: regions, patch masks, soft labels and the loss against numpy; the frozen prompter; the
pre-training run that trains its own prompter and logs `loss/pem`."""
import dataclasses
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import alpro_pretrain, alpro_prompter
from helpers import tiny_config, train
from vlp_jax import losses
from vlp_jax.core import init as init_lib
from vlp_jax.core.metrics import read_metrics
from vlp_jax.core.trainer import Trainer
from vlp_jax.data.setup import TextInfo
from vlp_jax.eval import motion_probe
from vlp_jax.methods.alpro import pretrain as task_lib
from vlp_jax.models import alpro as alpro_lib
from vlp_jax.models.timesformer import TimesformerModel


# ------------------------------------------------------------------ numpy references
def _np_regions(u, grid, area=(0.3, 0.5), aspect=(0.3, 1 / 0.3)):
  """ALPRO's random_erase on the patch grid, draw by draw (the rule of losses/pem.py)."""
  gh, gw = grid
  out = []
  for draws in u.astype(np.float32):
    for ua, ur, ut, ul in draws:  # the first accepted draw  # noqa: B007
      a = np.float32(area[0]) + ua * np.float32(area[1] - area[0])
      r = np.float32(aspect[0]) + ur * np.float32(aspect[1] - aspect[0])
      cells = a * np.float32(gh * gw)
      w = int(np.floor(np.sqrt(cells / r)))
      h = int(np.floor(np.sqrt(cells * r)))
      if 1 <= w <= gw and 1 <= h <= gh:
        break
    else:  # none accepted: the last draw, clipped to the grid
      h, w = min(max(h, 1), gh), min(max(w, 1), gw)
    top = min(int(np.floor(ut * np.float32(gh - h + 1))), gh - h)
    left = min(int(np.floor(ul * np.float32(gw - w + 1))), gw - w)
    out.append((top, left, h, w))
  return np.array(out)


def _np_patch_mask(regions, grid):
  gh, gw = grid
  m = np.zeros((len(regions), gh, gw), np.float32)
  for i, (t, l, h, w) in enumerate(regions):
    m[i, t:t + h, l:l + w] = 1.0
  return m.reshape(len(regions), gh * gw)


def _np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


# ------------------------------------------------------------------------- unit tests
@pytest.mark.parametrize("grid", [(14, 14), (5, 5), (2, 2), (3, 7)])
def test_regions_match_numpy_rule(grid):
  u = np.random.default_rng(grid[0] * 10 + grid[1]).random((300, 10, 4)).astype(np.float32)
  got = np.asarray(losses.regions_from_uniforms(jnp.asarray(u), grid))
  np.testing.assert_array_equal(got, _np_regions(u, grid))
  top, left, h, w = got.T
  gh, gw = grid
  assert (h >= 1).all() and (w >= 1).all()
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= gh).all() and (left + w <= gw).all()
  if grid == (14, 14):  # snapping only shrinks: every region is <= 0.5 of the frame
    frac = h * w / (gh * gw)
    assert frac.max() <= 0.5 and 0.2 < frac.mean() < 0.4
    aspect = h / w
    assert aspect.min() < 0.5 and aspect.max() > 2.0  # both tall and wide regions occur


def test_sample_regions_is_keyed_and_uses_the_whole_grid():
  a = losses.sample_regions(jax.random.PRNGKey(0), 512, (5, 5))
  b = losses.sample_regions(jax.random.PRNGKey(0), 512, (5, 5))
  c = losses.sample_regions(jax.random.PRNGKey(1), 512, (5, 5))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  top, left, h, w = np.asarray(a).T
  # Positions spread over the grid, up to both edges.
  assert np.unique(top).size >= 3 and np.unique(left).size >= 3
  assert (top == 0).any() and (top + h == 5).any() and (left == 0).any() and (left + w == 5).any()
  with pytest.raises(ValueError, match="area"):
    losses.regions_from_uniforms(jnp.zeros((1, 1, 4)), (5, 5), area=(0.5, 0.3))


def test_patch_mask_and_region_only_frames_match_numpy():
  grid, p = (3, 4), 2
  regions = np.array([[0, 0, 1, 1], [1, 2, 2, 2], [0, 0, 3, 4]], np.int32)
  mask = np.asarray(losses.region_patch_mask(jnp.asarray(regions), grid))
  np.testing.assert_array_equal(mask, _np_patch_mask(regions, grid))
  video = np.random.default_rng(0).normal(size=(3, 2, 6, 8, 3)).astype(np.float32)
  got = np.asarray(losses.keep_region(jnp.asarray(video), jnp.asarray(regions), p))
  # Pixel (y, x) is in patch (y // p, x // p), whose token index is row-major.
  pix = np.repeat(np.repeat(mask.reshape(3, *grid), p, 1), p, 2)
  np.testing.assert_array_equal(got, video * pix[:, None, :, :, None])
  assert np.count_nonzero(got[0, 0, :, :, 0]) == p * p
  # The patch embedding flattens (rows, cols) row-major: token i = row i // gw, col i % gw.
  patches = video.reshape(3, 2, 3, p, 4, p, 3).transpose(0, 1, 2, 4, 3, 5, 6).reshape(
      3, 2, 12, -1)
  got_patches = got.reshape(3, 2, 3, p, 4, p, 3).transpose(0, 1, 2, 4, 3, 5, 6).reshape(
      3, 2, 12, -1)
  kept = np.abs(got_patches).sum(-1) > 0
  np.testing.assert_array_equal(kept, (mask[:, None] > 0) & (np.abs(patches).sum(-1) > 0))
  tokens = np.random.default_rng(1).normal(size=(3, 12, 5)).astype(np.float32)
  want = np.stack([tokens[i][mask[i] > 0].mean(0) for i in range(3)])
  np.testing.assert_allclose(losses.region_mean(jnp.asarray(tokens), jnp.asarray(mask)), want,
                             rtol=1e-6)


def test_soft_labels_threshold_on_top_probability_not_index():
  temp = 0.1
  sim = np.array([
      [0.9, 0.1, 0.1, 0.1, 0.1, 0.1],     # entity 0, confident: kept (the official bug
                                          # compares the index 0 < 0.2 and drops it)
      [0.10, 0.11, 0.10, 0.1, 0.1, 0.1],  # entity 1, top prob 0.18: dropped (the bug keeps it)
      [0.1, 0.1, 0.5, 0.1, 0.1, 0.1],     # entity 2, confident: kept
      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],     # uniform, 1/6: dropped
  ], np.float32)
  labels, keep = losses.soft_labels(jnp.asarray(sim), jnp.float32(temp), 0.2)
  want = _np_softmax(sim / temp)
  np.testing.assert_allclose(labels, want, rtol=1e-6)
  np.testing.assert_array_equal(keep, want.max(-1) >= 0.2)
  np.testing.assert_array_equal(keep, [True, False, True, False])
  _, keep = losses.soft_labels(jnp.asarray(sim), jnp.float32(temp), 0.15)
  np.testing.assert_array_equal(keep, [True, True, True, True])


def test_soft_labels_over_uniform_threshold():
  # temp 1 and sim = log(p): the labels are p itself. K = 4, uniform 0.25.
  probs = np.array([
      [0.40, 0.20, 0.20, 0.20],  # 0.40 - 0.25 = 0.15 >= 0.1: kept
      [0.30, 0.70 / 3, 0.70 / 3, 0.70 / 3],  # 0.05: dropped
      [0.25, 0.25, 0.25, 0.25],  # uniform, 0.0: dropped
      [0.10, 0.10, 0.10, 0.70],  # 0.45: kept
  ], np.float32)
  sim = jnp.asarray(np.log(probs))
  labels, keep = losses.soft_labels(sim, jnp.float32(1.0), 0.1, over_uniform=True)
  np.testing.assert_allclose(labels, probs, rtol=1e-5)
  np.testing.assert_array_equal(keep, [True, False, False, True])
  # The absolute rule (the default) keeps all of them at 0.2: every top probability >= 0.25.
  _, keep = losses.soft_labels(sim, jnp.float32(1.0), 0.2)
  np.testing.assert_array_equal(keep, [True, True, True, True])
  _, keep = losses.soft_labels(sim, jnp.float32(1.0), 0.2, over_uniform=True)
  np.testing.assert_array_equal(keep, [False, False, False, True])


def test_label_quality_by_hand():
  labels = np.array([
      [0.1, 0.7, 0.1, 0.1],  # argmax 1, present {1}: correct, chance 1/4
      [0.1, 0.1, 0.2, 0.6],  # argmax 3, present {0, 2}: wrong, chance 2/4
      [0.9, 0.0, 0.1, 0.0],  # dropped (keep False): not counted
      [0.4, 0.2, 0.2, 0.2],  # no present entity: not counted
      [0.1, 0.1, 0.5, 0.3],  # argmax 2, present {2, 3}: correct, chance 2/4
  ], np.float32)
  keep = np.array([True, True, False, True, True])
  present = np.array([
      [False, True, False, False],
      [True, False, True, False],
      [True, False, False, False],
      [False, False, False, False],
      [False, False, True, True],
  ])
  m = losses.label_quality(jnp.asarray(labels), jnp.asarray(keep), jnp.asarray(present))
  assert sorted(m) == ["pem/teacher_acc", "pem/teacher_chance", "pem/teacher_rows"]
  assert all(v.dtype == jnp.float32 and v.shape == () for v in m.values())
  assert float(m["pem/teacher_rows"]) == 3.0
  assert float(m["pem/teacher_acc"]) == pytest.approx(100.0 * 2 / 3)
  assert float(m["pem/teacher_chance"]) == pytest.approx(100.0 * (1 / 4 + 2 / 4 + 2 / 4) / 3)
  # No counted row: 0, not NaN.
  m = losses.label_quality(jnp.asarray(labels), jnp.zeros(5, bool), jnp.asarray(present))
  assert [float(m[k]) for k in ("pem/teacher_acc", "pem/teacher_chance",
                                "pem/teacher_rows")] == [0.0, 0.0, 0.0]


def test_pem_loss_against_numpy():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(5, 7)).astype(np.float32)
  labels = _np_softmax(rng.normal(size=(5, 7)) * 3).astype(np.float32)
  keep = np.array([True, False, True, True, False])
  per, m = losses.pem_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(keep))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -(labels * logp).sum(-1)
  np.testing.assert_allclose(per, np.where(keep, ce, 0.0), rtol=1e-5)
  assert float(m["pem/kept_frac"]) == pytest.approx(0.6)
  agree = logits.argmax(-1) == labels.argmax(-1)
  assert float(m["pem/acc"]) == pytest.approx(agree[keep].mean())
  _, m = losses.pem_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.zeros(5, bool))
  assert float(m["pem/acc"]) == 0.0 and float(m["pem/kept_frac"]) == 0.0


def test_pem_head_shapes_and_logical_axes():
  c = alpro_pretrain.get_config("tiny").model
  cfg = alpro_lib.alpro_config(c, vocab_size=64)
  model = alpro_lib.ALPRO(dataclasses.replace(cfg, num_entities=5))
  video = jnp.zeros((2, 2, 32, 32, 3))
  ids = jnp.zeros((2, 6), jnp.int32)
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), video, ids,
                                            jnp.ones((2, 6), jnp.int32)))["params"]
  head = boxed["pem_head"]
  d = cfg.text.hidden
  assert head["dense"]["kernel"].value.shape == (d, 2 * d)
  assert head["out"]["kernel"].value.shape == (2 * d, 5)
  assert head["dense"]["kernel"].names == ("embed", "mlp")
  assert head["out"]["kernel"].names == ("mlp", "entities")
  assert head["out"]["bias"].names == ("entities",)
  assert "pem_head" not in jax.eval_shape(lambda: alpro_lib.ALPRO(cfg).init(
      jax.random.PRNGKey(0), video, ids, jnp.ones((2, 6), jnp.int32)))["params"]
  with pytest.raises(ValueError, match="num_entities"):
    dataclasses.replace(cfg, num_entities=-1)


def test_prompter_config_is_vtc_only_with_the_same_model():
  pre = alpro_pretrain.get_config("demo")
  pro = alpro_prompter.get_config("demo")
  assert pro.model.to_dict() == pre.model.to_dict()
  assert pro.data.to_dict() == pre.data.to_dict()
  assert pro.loss.to_dict() == dict(vtc=1.0, vtm=0.0, mlm=0.0, pem=0.0)
  assert pro.num_steps == pre.pem.prompter_steps
  assert alpro_prompter.get_config("tiny,num_steps=3").num_steps == 3
  with pytest.raises(ValueError, match="nope"):
    alpro_prompter.get_config("nope")


# ------------------------------------------------------------------ training with PEM
def _tiny(data_dir, **overrides):
  # A 10-step prompter is not confident: keep every label.
  return tiny_config(data_dir, **{"evals": {}, "pem.threshold": 0.0, **overrides})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from vlp_jax.data import synthetic
  path = tmp_path_factory.mktemp("data")
  synthetic.ensure(str(path), alpro_pretrain.get_config("tiny").data.synthetic)
  return path


# One checkpoint per run (saves dominate tiny runs on 8 simulated devices); the same step
# program (num_steps enters the lr schedule) in every test, so it compiles once.
RUN = {"num_steps": 2, "log_every": 1, "ckpt_every": 100}


@pytest.fixture(scope="module")
def pretrain_dir(tmp_path_factory, data_dir):
  """A tiny pre-training run with PEM that trains its own prompter (pem.prompter = "")."""
  workdir = tmp_path_factory.mktemp("pretrain")
  train(_tiny(data_dir, **RUN), str(workdir))
  return workdir


def test_pretraining_trains_its_prompter_and_logs_pem(pretrain_dir):
  prompter = [r for r in read_metrics(pretrain_dir / "prompter") if r["split"] == "train"]
  assert prompter[-1]["step"] == 10  # tiny: pem.prompter_steps
  assert "loss/vtm" not in prompter[-1] and "loss/pem" not in prompter[-1]
  rows = [r for r in read_metrics(pretrain_dir) if r["split"] == "train"]
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:
    assert r["loss/pem"] > 0 and math.isfinite(r["loss/pem"])
    assert r["pem/kept_frac"] == 1.0 and 0.0 <= r["pem/acc"] <= 1.0
    # Synthetic captions name their shapes, the entities: there is ground truth.
    assert r["pem/teacher_rows"] > 0
    assert 0.0 <= r["pem/teacher_acc"] <= 100.0 and 0.0 < r["pem/teacher_chance"] <= 100.0
    assert r["data/image_frac"] in (0.0, 1.0)  # a batch is all video or all images
    parts = r["loss/vtc"] + r["loss/vtm"] + r["loss/mlm"] + r["loss/pem"]
    assert r["loss"] == pytest.approx(parts, rel=1e-4)


def test_evaluate_cli_on_a_pretraining_run_without_prompter_trains_nothing(tmp_path, data_dir,
                                                                           pretrain_dir):
  """`launch.evaluate` never trains: not the run, and not PEM's missing prompter."""
  import shutil
  import subprocess
  import sys
  run = tmp_path / "run"
  shutil.copytree(pretrain_dir, run, ignore=shutil.ignore_patterns("prompter"))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, "-m", "launch.evaluate", "--config=configs/alpro_pretrain.py:tiny",
       f"--config.data.dir={data_dir}", f"--workdir={run}"],
      cwd=root, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not os.path.exists(run / "prompter")
  rows = read_metrics(run)
  assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2]  # no new training rows
  (test,) = [r for r in rows if r["split"] == "test"]
  assert test["step"] == 2 and 0.0 <= test["retrieval/t2v_R@1"] <= 100.0
  assert '"step": 2' in proc.stdout


def test_warm_start_begins_pretraining_from_the_prompter(tmp_path, data_dir, pretrain_dir):
  prompter = pretrain_dir / "prompter"
  c = _tiny(data_dir, **RUN, **{"loss.pem": 0.0, "pem.warm_start": True})
  # Without PEM the prompter stage still runs when pre-training starts from it.
  (name, stage, stage_dir), = alpro_pretrain.stages(c, str(tmp_path / "w"))
  assert (name, stage_dir) == ("prompter", str(tmp_path / "w" / "prompter"))
  assert not stage.pem.warm_start and stage.loss.to_dict()["vtm"] == 0.0
  assert alpro_pretrain.stages(_tiny(data_dir, **{"loss.pem": 0.0}), str(tmp_path)) == []
  teacher = Trainer(alpro_pretrain.prompter_stage(c), str(prompter)).build()
  assert teacher.restore() == 10
  want = jax.device_get(teacher.state.params["model"])
  teacher.checkpointer.close()
  c.pem.prompter = str(prompter)
  run = Trainer(c, str(tmp_path / "run")).build()
  fresh = jax.device_get(run.state.params["model"])
  assert run.apply_init()
  got = jax.device_get(run.state.params["model"])
  run.checkpointer.close()
  for k in ("video_encoder", "text_encoder", "vision_proj", "text_proj"):
    for a, b in zip(jax.tree.leaves(want[k]), jax.tree.leaves(got[k])):
      np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, f) for a, f in zip(jax.tree.leaves(want[k]),
                                                         jax.tree.leaves(fresh[k])))
  # The VTM and MLM heads the prompter never trained: the prompter's untrained values
  # (same names and shapes); the run still starts at step 0 with a fresh optimiser.
  assert int(jax.device_get(run.state.step)) == 0
  # init.video on top of the warm start: applied when the warm run did not start from it,
  # skipped (the warm run's trained tower kept) when its config.json says it did.
  video_cfg = alpro_lib.alpro_config(c.model, 1).video
  encoder = jax.device_get(nn.unbox(TimesformerModel(video_cfg).init(
      jax.random.PRNGKey(7), jnp.zeros((1, video_cfg.num_frames, video_cfg.image_size,
                                        video_cfg.image_size, 3))))["params"])
  motion_probe.save_encoder(encoder, video_cfg, str(tmp_path / "encoder"))
  c.init.video = f"hf:{tmp_path / 'encoder'}"
  started = tmp_path / "prompter_from_encoder"
  shutil.copytree(prompter, started)
  with open(started / "config.json") as f:
    record = json.load(f)
  record["init"]["video"] = c.init.video
  with open(started / "config.json", "w") as f:
    json.dump(record, f)
  for warm, expected in ((prompter, encoder), (started, want["video_encoder"])):
    c.pem.prompter = str(warm)
    run = Trainer(c, str(tmp_path / f"run_{warm.name}")).build()
    assert run.apply_init()
    got = jax.device_get(run.state.params["model"]["video_encoder"])
    run.checkpointer.close()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, expected)
  c.init.video = ""
  c.pem.prompter = str(tmp_path / "none")
  run = Trainer(c, str(tmp_path / "run2")).build()
  with pytest.raises(FileNotFoundError, match="pem.warm_start: prompter: no checkpoint"):
    run.apply_init()
  run.checkpointer.close()


def test_prompter_is_frozen_outside_the_optimizer(tmp_path, data_dir, pretrain_dir):
  c = _tiny(data_dir, **RUN, **{"pem.prompter": str(pretrain_dir / "prompter")})
  run = Trainer(c, str(tmp_path)).build()
  frozen_run = run.load_frozen()
  assert not os.path.exists(tmp_path / "prompter")  # loaded, not trained again
  frozen = frozen_run.params
  assert sorted(frozen) == ["entities_image", "entities_video", "prompter"]
  assert sorted(frozen["prompter"]) == ["temp", "video_encoder", "vision_proj"]
  for name in ("entities_video", "entities_image"):
    x = np.asarray(frozen[name])
    assert x.shape == (8, c.model.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(x, axis=-1), 1.0, rtol=1e-5)
  assert not np.allclose(frozen["entities_video"], frozen["entities_image"])
  # The prompter's weights are the prompter run's, not this run's fresh ones ...
  src, _ = init_lib.load_run_params(str(pretrain_dir / "prompter"),
                                    lambda r: run.task.init_module(run.task.prompter, r),
                                    run.mesh, run.rules)
  kernel = lambda tree: np.asarray(tree["vision_proj"]["kernel"])
  np.testing.assert_array_equal(kernel(frozen["prompter"]), kernel(src))
  assert not np.array_equal(kernel(src), kernel(run.state.params["model"]))
  # ... and nothing of it is in the trained params or the optimizer state.
  params_shapes = [x.shape for x in jax.tree.leaves(run.state.params) if x.ndim]
  opt_shapes = [x.shape for x in jax.tree.leaves(run.state.opt_state) if x.ndim]
  assert sorted(opt_shapes) == sorted(params_shapes * 2)  # Adam's mu and nu, nothing else

  loader = run.loaders()["train"]
  batch = run.device_batches({"train": next(loader)})
  before = jax.device_get(frozen)
  head = np.asarray(run.state.params["model"]["pem_head"]["out"]["kernel"])
  step = run.update_fn(frozen_run)
  state, m = step(run.state, batch)  # lr 0 at step 0 (warm-up), so take a second step
  state, m = step(state, batch)
  assert math.isfinite(float(m["loss/pem"])) and float(m["loss/pem"]) > 0
  assert not np.array_equal(head, np.asarray(state.params["model"]["pem_head"]["out"]["kernel"]))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(frozen_run.params))):
    np.testing.assert_array_equal(a, b)
  run.checkpointer.close()


def test_soft_labels_carry_no_gradient():
  sim = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float32)
  f = lambda s, t: jnp.sum(losses.soft_labels(s, t, 0.2)[0] * jnp.arange(4.0))
  g_sim, g_temp = jax.grad(f, argnums=(0, 1))(sim, jnp.float32(0.1))
  assert float(jnp.max(jnp.abs(g_sim))) == 0.0 and float(g_temp) == 0.0


def test_pem_configuration_errors(tmp_path, data_dir):
  c = _tiny(data_dir)
  text = TextInfo(None, 64)
  task = task_lib.ALPROTask(c, text)
  assert task.entities == ["circle", "square", "triangle", "star", "cross", "diamond",
                           "hexagon", "ring"]
  assert task.model.config.num_entities == 8 and task.prompter.config.num_entities == 0
  assert "is_image" in task.streams()["train"].keys  # tiny mixes image batches
  b = {"train": jax.tree.map(jnp.asarray, task.dummy_batch(2))}
  with pytest.raises(ValueError, match="frozen prompter"):
    jax.eval_shape(lambda r: task.loss(task.init_collections(r), b, r, train=True),
                   jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="has 8 entities"):
    task_lib.ALPROTask(_tiny(data_dir, **{"pem.num_entities": 9}), text)
  with pytest.raises(ValueError, match="vtm_negatives: hard_from"):
    task_lib.ALPROTask(_tiny(data_dir, **{"vtm_negatives.ramp": -0.1}), text)
  with pytest.raises(ValueError, match="twin_prob > 0 needs time-reversed twins"):
    task_lib.ALPROTask(_tiny(data_dir, **{"vtm_negatives.twin_prob": 0.5}), text)
  with pytest.raises(ValueError, match="twin_prob must be in"):
    task_lib.ALPROTask(_tiny(data_dir, **{"vtm_negatives.twin_prob": 1.5,
                                          "data.reverse_twins.rate": 0.5}), text)
  twins = task_lib.ALPROTask(_tiny(data_dir, **{"vtm_negatives.twin_prob": 0.5,
                                                "data.reverse_twins.rate": 0.5}), text)
  assert "twin" in twins.streams()["train"].keys and "twin" not in task.streams()["train"].keys
  assert twins.dummy_batch(2)["twin"].dtype == np.int32
  with pytest.raises(FileNotFoundError, match="launch.entities"):
    task_lib.ALPROTask(_tiny(data_dir, **{"pem.entities": str(tmp_path / "none.txt")}), text)
  run = Trainer(c, str(tmp_path / "fresh")).build()
  # No prompter in WORKDIR/prompter: loading says which stage makes it, and trains nothing.
  with pytest.raises(FileNotFoundError, match="prompter.*launch.train"):
    run.task.load_frozen(run.mesh, run.rules, run.workdir)
  assert not os.path.exists(tmp_path / "fresh" / "prompter" / "checkpoints")
  run.checkpointer.close()
  empty = _tiny(data_dir, **{"pem.prompter": str(tmp_path)})
  run = Trainer(empty, str(tmp_path / "run")).build()
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    run.task.load_frozen(run.mesh, run.rules, run.workdir)
  run.checkpointer.close()


def test_vtm_leaves_time_reversed_twins_to_twin_prob(data_dir):
  """With twins in the batch (row r's clip reversed, here with the same caption) the VTM
  sampler never draws a twin unless `vtm_negatives.sample_twins`; `twin_prob` 1 makes every
  negative a twin, and `vtm/twin_frac` counts the twins among the 2B negatives."""
  text = TextInfo(None, 64)
  rng = np.random.default_rng(0)
  batch = None

  def twin_frac(**over):
    nonlocal batch
    c = _tiny(data_dir, **{"loss.pem": 0.0, "data.reverse_twins.rate": 0.5, **over})
    task = task_lib.ALPROTask(c, text)
    assert "twin" in task.streams()["train"].keys
    if batch is None:
      batch = task.dummy_batch(8)
      batch["video"] = rng.normal(size=batch["video"].shape).astype(np.float32)
      batch["video"][4:] = batch["video"][:4, ::-1]
      batch["text_ids"] = rng.integers(5, 60, size=batch["text_ids"].shape, dtype=np.int32)
      batch["text_ids"][4:] = batch["text_ids"][:4]
      batch["twin"] = np.asarray([4] * 4 + [-4] * 4, np.int32)
    params = task.init_collections(jax.random.PRNGKey(0))
    b = {"train": jax.tree.map(jnp.asarray, batch)}
    step = jax.jit(lambda r: task.loss(params, b, r, train=True, step=jnp.int32(0))[1])
    return np.mean([float(step(jax.random.PRNGKey(i))["vtm/twin_frac"]) for i in range(8)])

  assert twin_frac() == 0.0
  # The fresh model's logits are near uniform: about 1 draw in 7 is the twin (128 draws).
  assert 0.05 < twin_frac(**{"vtm_negatives.sample_twins": True}) < 0.3
  assert twin_frac(**{"vtm_negatives.twin_prob": 1.0}) == 1.0


def test_twin_cosines_are_the_direction_pairs_feature_cosines(data_dir):
  """`twin/video_cos` is the mean cosine between the projected video features of each clip
  and its time-reversed twin (numpy, from the model applied directly), over the rows with a
  twin; `twin/text_cos` the same for the captions. Logged in training only."""
  text = TextInfo(None, 64)
  rng = np.random.default_rng(1)
  task = task_lib.ALPROTask(_tiny(data_dir, **{"loss.pem": 0.0, "loss.vtm": 0.0,
                                               "loss.mlm": 0.0, "model.text.dropout": 0.0,
                                               "data.reverse_twins.rate": 0.5}), text)
  batch = task.dummy_batch(8)
  batch["video"] = rng.normal(size=batch["video"].shape).astype(np.float32)
  batch["video"][6:] = batch["video"][:2, ::-1]  # rows 0, 1 <-> 6, 7; rows 2-5 have no twin
  batch["text_ids"] = rng.integers(5, 60, size=batch["text_ids"].shape, dtype=np.int32)
  batch["twin"] = np.asarray([6, 6, 0, 0, 0, 0, -6, -6], np.int32)
  params = task.init_collections(jax.random.PRNGKey(0))
  b = {"train": jax.tree.map(jnp.asarray, batch)}
  m = task.loss(params, b, jax.random.PRNGKey(2), train=True, step=jnp.int32(0))[1]

  app = lambda method, *a: task.model.apply({"params": params["model"]}, *a, method=method)
  vfeat = np.asarray(app(alpro_lib.ALPRO.video_feature,
                         app(alpro_lib.ALPRO.encode_video, b["train"]["video"], True)))
  tfeat = np.asarray(app(alpro_lib.ALPRO.text_feature,
                         app(alpro_lib.ALPRO.encode_text, b["train"]["text_ids"],
                             b["train"]["text_mask"], True)))
  for name, f in (("video", vfeat), ("text", tfeat)):
    want = np.mean([f[0] @ f[6], f[1] @ f[7]])
    np.testing.assert_allclose(float(m[f"twin/{name}_cos"]), want, rtol=1e-5)
    wrong = np.mean([f[0] @ f[7], f[1] @ f[6]])  # rows paired the other way round
    assert abs(wrong - want) > 1e-4 * abs(want)
  evaluated = task.loss(params, b, jax.random.PRNGKey(2), train=False)[1]
  assert "twin/video_cos" not in evaluated


def test_entity_token_ids_and_threshold_mode(data_dir, monkeypatch):
  from vlp_jax.data import tokenizer as tok
  text = TextInfo(tok.load_tokenizer(str(data_dir / "vocab.txt")), 64)
  task = task_lib.ALPROTask(_tiny(data_dir, **{"pem.threshold_mode": "over_uniform"}), text)
  ids = text.tokenizer(task.entities, add_special_tokens=False)["input_ids"]
  assert all(len(i) == 1 for i in ids)  # the synthetic entities are vocabulary words
  np.testing.assert_array_equal(task._entity_ids, [i[0] for i in ids])
  # Without a tokenizer nothing can be matched: every id is -1.
  no_tok = task_lib.ALPROTask(_tiny(data_dir), TextInfo(None, 64))
  np.testing.assert_array_equal(no_tok._entity_ids, np.full(8, -1))
  with pytest.raises(ValueError, match="threshold_mode"):
    task_lib.ALPROTask(_tiny(data_dir, **{"pem.threshold_mode": "relative"}), text)

  # `_pem` passes the mode to soft_labels and returns the label-quality metrics (shapes only).
  seen = []
  real = losses.soft_labels
  monkeypatch.setattr(losses, "soft_labels",
                      lambda *a, **k: seen.append(k.get("over_uniform")) or real(*a, **k))
  from flax import linen as nn
  b = {"train": jax.tree.map(jnp.asarray, task.dummy_batch(2))}
  d = task.model.config.embed_dim

  def metrics(r):
    frozen = {"prompter": nn.unbox(task.init_module(task.prompter, r)),
              "entities_video": jnp.zeros((8, d)), "entities_image": jnp.zeros((8, d))}
    return task.loss(nn.unbox(task.init_collections(r)), b, r, train=True, frozen=frozen)[1]

  m = jax.eval_shape(metrics, jax.random.PRNGKey(0))
  assert seen == [True]
  for k in ("pem/teacher_acc", "pem/teacher_chance", "pem/teacher_rows", "pem/kept_frac"):
    assert m[k].shape == () and m[k].dtype == jnp.float32
