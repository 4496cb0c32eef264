"""Prompt-CLIP action recognition trained from frames (no feature cache): the frozen image tower
runs in the step, and the loss, the trained model's evaluation and the frozen CLIP match the
cached-feature path on the same clips.

The world: the synthetic corpus (4 frames per clip, 40 px), a CLIP tokenizer learned on its
captions, a tiny CLIP (32 px) written as a transformers CLIPModel directory, and a feature
cache `launch.extract_features` made from that CLIP."""
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

import helpers
from configs import prompt_clip_action
from launch import extract_features
from vlp_jax.core import task as task_lib
from vlp_jax.core.trainer import Trainer
from vlp_jax.data import feature_cache, pipeline, synthetic
from vlp_jax.methods.prompt_clip import action  # noqa: F401  (registers the task)
from vlp_jax.parallel import mesh as mesh_lib
from vlp_jax.parallel import sharding as shd

FRAMES, IMAGE, D = 4, 32, 16


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("frames"))
  data = os.path.join(root, "data")
  synthetic.generate(data, seed=3, num_train=16, num_val=2, num_test=8, num_test_unseen=2,
                     num_frames=FRAMES, image_size=40, num_shards=2)
  clip_dir = os.path.join(root, "clip")
  words = " ".join(synthetic.caption_words())
  _, rng = helpers.save_tiny_clip(clip_dir, [words] * 4, D, vocab_size=700, image_size=IMAGE)
  features = os.path.join(root, "features")
  extract_features.extract(f"hf:{clip_dir}", data, ("train", "test"), features, batch_size=8,
                           workers=1, chunk_frames=4, devices=jax.devices()[:1])
  return dict(root=root, data=data, clip=clip_dir, features=features)


def _config(world, *, frames: bool, **overrides):
  c = prompt_clip_action.get_config("tiny")
  c.data.dir = world["data"]
  c.data.vocab = world["clip"]
  c.init.clip = "hf:" + world["clip"]
  if frames:
    c.data.update(features="", num_frames=FRAMES, image_size=IMAGE)
  else:
    c.data.features = world["features"]
  c.model.temporal.layers = 0  # mean pooling: a cached clip of 4 frames is exactly 1 window
  return helpers.override(c, **overrides)


def _eval_batches(world, split="test"):
  c = _config(world, frames=True)
  tok = task_lib.build(c, None).tokenizer
  return list(pipeline.Loader(c.data, split, batch_size=4, training=False, seed=0,
                              tokenizer=tok, num_frames=FRAMES, image_size=IMAGE,
                              data_dir=world["data"]))


def test_frames_loss_equals_the_cached_features_loss(world):
  frames_task = task_lib.build(_config(world, frames=True), None)
  cached_task = task_lib.build(_config(world, frames=False), None)
  assert frames_task.from_frames and not cached_task.from_frames
  assert set(frames_task._clip_host) == set(action.TEXT_PARAMS + action.VISION_PARAMS)
  assert set(cached_task._clip_host) == set(action.TEXT_PARAMS)
  params = jax.tree.map(np.asarray, nn.unbox(frames_task.init_collections(jax.random.PRNGKey(1))))
  batch = _eval_batches(world)[0]
  assert (batch["label"][batch["valid"]] >= 0).all()
  cache = {c.video_id: c for c in
           feature_cache.read_split(world["features"], "test", mmap=False)}
  feats = np.stack([cache[v.decode()].features.astype(np.float32) for v in batch["video_id"]])
  np.testing.assert_array_equal(batch["label"], [cache[v.decode()].label
                                                 for v in batch["video_id"]])
  live = frames_task.frame_features(frames_task._clip_host, batch["video"])
  np.testing.assert_allclose(np.asarray(live), feats, atol=2e-3, rtol=2e-3)  # float16 cache
  lf, mf = frames_task.loss(params, {"train": {k: batch[k] for k in ("video", "label", "valid")}},
                            None, train=True, frozen=frames_task._clip_host)
  lc, mc = cached_task.loss(params, {"train": {"features": feats, "label": batch["label"],
                                               "valid": batch["valid"]}},
                            None, train=True, frozen=cached_task._clip_host)
  assert float(lf) == pytest.approx(float(lc), rel=1e-3)
  assert float(mf["train/top1"]) == pytest.approx(float(mc["train/top1"]))
  # A row without a class (-1) does not count.
  unlabelled = dict(video=batch["video"], valid=batch["valid"],
                    label=np.where(np.arange(4) == 0, -1, batch["label"]))
  l1, _ = frames_task.loss(params, {"train": unlabelled}, None, train=True,
                           frozen=frames_task._clip_host)
  kept = {"features": feats[1:], "label": batch["label"][1:], "valid": batch["valid"][1:]}
  l2, _ = cached_task.loss(params, {"train": kept}, None, train=True,
                           frozen=cached_task._clip_host)
  assert float(l1) == pytest.approx(float(l2), rel=1e-3)


def test_training_from_frames_keeps_clip_frozen_and_evaluates_like_the_cache(world, tmp_path):
  c = _config(world, frames=True, num_steps=2, ckpt_every=2)
  run = Trainer(c, str(tmp_path / "run"), devices=jax.devices()[:1]).build()
  assert run.apply_init()
  frozen = run.load_frozen()
  before = jax.tree.map(np.array, jax.device_get(frozen.params))
  assert "vision_model" in before
  step_fn = run.update_fn(frozen)
  loader = run.loaders()["train"]
  state = run.state
  start = jax.device_get(state.params)
  for _ in range(2):
    batch = next(loader)
    assert set(batch) >= {"video", "label", "valid"}
    assert batch["video"].shape[1:] == (FRAMES, IMAGE, IMAGE, 3)
    state, m = step_fn(state, run.device_batches({"train": batch}))
    assert np.isfinite(float(m["loss"]))
  after = jax.device_get(state.params)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(frozen.params))):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(start["prompts"]["prompts"], after["prompts"]["prompts"])
  # The trained params evaluated from frames and from the cache: the same scores (a cached
  # clip of exactly model.num_frames frames has one window, so the 5 windows coincide).
  mesh = mesh_lib.make_mesh(c.mesh, jax.devices()[:1])
  rules = shd.rules_from_config(c.sharding_rules)
  ev = c.evals.test
  frames_task = run.task
  cached_task = task_lib.build(_config(world, frames=False), None)
  got = frames_task.evaluators()["action"](after, _eval_batches(world), mesh, rules, ev)
  want = cached_task.evaluators()["action"](after, _eval_batches(world), mesh, rules, ev)
  assert got["action/clips"] == want["action/clips"] == 8
  for k in ("action/top1", "action/top5", "action/mean_class"):
    assert got[k] == pytest.approx(want[k]), k
  f = frames_task.eval_features(after, _eval_batches(world), mesh, rules, ev)
  g = cached_task.eval_features(after, _eval_batches(world), mesh, rules, ev)
  assert sorted(f["labels"].tolist()) == sorted(g["labels"].tolist())
  np.testing.assert_array_equal(f["clip"], np.arange(8))
  np.testing.assert_allclose(f["text"], g["text"], atol=1e-6)


def test_frames_configuration_errors_name_the_fix(world):
  with pytest.raises(ValueError, match=r"--config.data.num_frames=4 --config.data.image_size=32"):
    task_lib.build(_config(world, frames=True, **{"data.num_frames": 1, "data.image_size": 40}),
                   None)
  with pytest.raises(ValueError, match=r"--config.data.flip=False"):
    task_lib.build(_config(world, frames=True, **{"data.flip": True}), None)
  with pytest.raises(ValueError, match=r"protocol.name='openset'.*launch.extract_features"):
    task_lib.build(_config(world, frames=True, **{"protocol.name": "openset"}), None)
  c = _config(world, frames=True)
  c.task = "prompt_clip_localization"
  from vlp_jax.methods.prompt_clip import localization  # noqa: F401, PLC0415  (registers it)
  with pytest.raises(ValueError, match="prompt_clip_localization reads cached CLIP frame"):
    task_lib.build(c, None)
