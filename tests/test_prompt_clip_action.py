"""Prompt-CLIP action recognition (task `prompt_clip_action`): the frozen CLIP stays frozen, the
loss and logits match numpy, the feature loader's windows, selection and resume, each
evaluator's number on features built so that the answer is known, and 8 devices = 1.

The world: a CLIP tokenizer learned on the class names, a tiny CLIP written as a transformers
CLIPModel directory next to it, and feature caches written directly (no extraction)."""
import dataclasses
import os

import jax
import numpy as np
import pytest

import helpers
from configs import prompt_clip_action
from vlp_jax.core import task as task_lib
from vlp_jax.core.trainer import Trainer
from vlp_jax.data import feature_cache, feature_loader, protocols
from vlp_jax.eval import classification
from vlp_jax.methods.prompt_clip import action  # noqa: F401  (registers the task)
from vlp_jax.parallel import mesh as mesh_lib
from vlp_jax.parallel import sharding as shd

NAMES = ["moving left", "moving right", "moving up", "moving down", "growing", "shrinking"]
D = 16        # CLIP projection width = frame feature width
LENGTH = 4    # the tiny preset's window (model.num_frames)
TRAIN_FRAMES = (3, 5, 8, 12)  # frames of the 4 training clips of each class


@dataclasses.dataclass
class World:
  root: str
  clip: str       # CLIPModel + tokenizer directory
  data: str       # data directory (classes.txt)
  features: str   # the training cache (split `train`)
  train: list     # its clips: (video_id, float32 [T, D], label)


def write_cache(out: str, clip_dir: str, splits: dict, shards: int = 2) -> None:
  """A feature cache of `splits` ({split: [(video_id, features [T, D], label)]}) as
  launch.extract_features lays it out, `shards` output shards per split."""
  meta = dict(feature_cache.describe(clip_dir))
  meta["source"] = {"data_dir": out, "splits": {
      s: {"shards": [f"{s}-{i:05d}-of-{shards:05d}" for i in range(shards)],
          "records": len(clips)} for s, clips in splits.items()}}
  identity = feature_cache.identity_digest(feature_cache.prepare(out, meta))
  for split, clips in splits.items():
    for i in range(shards):
      part = [feature_cache.CachedClip(v, np.asarray(f), int(y), 4.0)
              for v, f, y in clips[i::shards]]
      feature_cache.write_shard(out, split, f"{split}-{i:05d}-of-{shards:05d}", part,
                                identity=identity, dim=D,
                                report={"clips": len(part),
                                        "frames": sum(len(c.features) for c in part),
                                        "skipped": []})
    feature_cache.finish_split(out, split)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
  root = str(tmp_path_factory.mktemp("prompt_clip"))
  clip_dir = os.path.join(root, "clip")
  _, rng = helpers.save_tiny_clip(clip_dir, NAMES * 4, D, vocab_size=600)
  data = os.path.join(root, "data")
  os.makedirs(data)
  with open(os.path.join(data, "classes.txt"), "w") as f:
    f.write("\n".join(NAMES) + "\n")
  # Training clips whose features say which clip (column 0) and frame (column 1) they are.
  train = []
  for label in range(len(NAMES)):
    for t in TRAIN_FRAMES:
      k = len(train)
      f = rng.standard_normal((t, D)).astype(np.float32)
      f[:, 0], f[:, 1] = k, np.arange(t)
      f = f.astype(np.float16).astype(np.float32)  # as cached
      train.append((f"clip-{k:03d}", f, label))
  features = os.path.join(root, "features")
  write_cache(features, clip_dir, {"train": train})
  return World(root, clip_dir, data, features, train)


def _config(world: World, preset: str = "tiny", **overrides):
  c = prompt_clip_action.get_config(preset)
  c.data.dir = world.data
  c.init.clip = "hf:" + world.clip
  c.data.vocab = world.clip  # the run's tokenizer (its evaluation pass tokenises captions)
  c.data.features = world.features
  return helpers.override(c, **overrides)


def _task(config):
  return task_lib.build(config, None)


_params = helpers.init_params


def _norm(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------- training

def _steps(world, tmp_path, devices, mesh, n=2):
  """n train steps: (metrics per step, params before, params after, frozen before, frozen
  after (host copies), the final state)."""
  c = _config(world)
  c.mesh.update(mesh)
  run = Trainer(c, str(tmp_path), devices=devices).build()
  assert run.apply_init()  # init.clip is accepted: it names the frozen CLIP, no trained param
  frozen = run.load_frozen()
  before = jax.device_get(run.state.params)
  frozen_before = jax.tree.map(np.array, jax.device_get(frozen.params))
  step_fn = run.update_fn(frozen)
  loader = run.loaders()["train"]
  state, metrics = run.state, []
  for _ in range(n):
    state, m = step_fn(state, run.device_batches({"train": next(loader)}))
    metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
  return (metrics, before, jax.device_get(state.params), frozen_before,
          jax.device_get(frozen.params), state)


@pytest.fixture(scope="module")
def one_device(world, tmp_path_factory):
  return _steps(world, tmp_path_factory.mktemp("one"), jax.devices()[:1],
                dict(data=1, fsdp=1, tensor=1))


def test_frozen_clip_stays_bit_identical_and_only_prompts_and_temporal_train(world, one_device):
  metrics, before, after, frozen_before, frozen_after, state = one_device
  assert set(after) == set(state.opt_state) == {"prompts", "temporal"}  # no CLIP opt state
  for name in ("prompts", "temporal"):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(before[name]),
                            jax.tree.leaves(after[name])):
      assert not np.array_equal(a, b), (name, jax.tree_util.keystr(path))
  assert set(frozen_after) == set(action.TEXT_PARAMS)  # the image tower is not loaded
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(frozen_before),
                          jax.tree.leaves(frozen_after)):
    np.testing.assert_array_equal(a, np.asarray(b), err_msg=jax.tree_util.keystr(path))
  # The values: the checkpoint's text tower.
  from vlp_jax.convert import clip as convert_clip
  _, want = convert_clip.import_clip(world.clip)
  for k in action.TEXT_PARAMS:
    for a, b in zip(jax.tree.leaves(want[k]), jax.tree.leaves(frozen_before[k])):
      np.testing.assert_array_equal(a, b)
  m = metrics[-1]
  assert np.isfinite(m["loss"]) and m["loss"] == pytest.approx(m["loss/ce"])
  counts = [sum(np.size(x) for x in jax.tree.leaves(before[k])) for k in before]
  assert m["params/trainable"] == sum(counts)


def test_sharded_step_matches_single_device(world, one_device, tmp_path):
  assert jax.device_count() >= 8
  one_metrics, _, one_params, *_ = one_device
  many_metrics, _, many_params, _, _, state = _steps(world, tmp_path, jax.devices()[:8],
                                                      dict(data=2, fsdp=2, tensor=2))
  for a, b in zip(one_metrics, many_metrics):
    for k in ("loss", "train/top1", "grad_norm"):
      assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(one_params),
                          jax.tree.leaves(many_params)):
    # The gradient of an attention key bias is zero in exact arithmetic (it shifts every logit
    # of a query equally), so Adam turns float noise into +-lr steps there.
    if "['k_proj']['bias']" in jax.tree_util.keystr(path):
      continue
    # Adam divides by sqrt(v): float32 reduction-order noise in small gradients reaches ~1e-5
    # relative after two steps (machine-dependent); a wrong sharded gradient is ~1e-2.
    err = np.linalg.norm(a - b) / (np.linalg.norm(a) + 1e-12)
    assert err <= 1e-4, (jax.tree_util.keystr(path), err)
  specs = [str(x.sharding.spec) for x in jax.tree.leaves(state.params)]
  assert any("fsdp" in s for s in specs)


def test_loss_and_logits_match_numpy_on_mean_pooled_windows(world):
  """temporal.layers = 0 (mean pooling, no `temporal` collection): the logits are the cosine
  of the mean frame feature and the class text features over 0.07, the loss their
  cross-entropy."""
  task = _task(_config(world, **{"model.temporal.layers": 0}))
  params = _params(task)
  assert set(params) == {"prompts"}
  frozen = task._clip_host
  loader = feature_loader.FeatureLoader(task.feature_source(train=True), "train", batch_size=8,
                                        training=True, seed=0)
  batch = next(loader)
  loss, metrics = task.loss(params, {"train": batch}, jax.random.PRNGKey(0), train=True,
                            frozen=frozen)
  text = np.asarray(task.text_features(frozen, params["prompts"], task.train_tokens))
  assert text.shape == (len(NAMES), D)
  logits = _norm(batch["features"].mean(axis=1)) @ text.T / 0.07
  np.testing.assert_allclose(np.asarray(task.logits(params, frozen, batch["features"])),
                             logits, rtol=1e-4, atol=1e-4)
  shifted = logits - logits.max(axis=1, keepdims=True)
  ce = np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(8), batch["label"]]
  assert float(loss) == pytest.approx(ce.mean(), rel=1e-5)
  assert float(metrics["train/top1"]) == pytest.approx(
      100 * np.mean(logits.argmax(axis=1) == batch["label"]))


# ----------------------------------------------------------------------------- the loader

def _source(world, **kw):
  return feature_loader.FeatureSource(dir=world.features, length=LENGTH, **kw)


def test_training_windows_are_valid_and_each_epoch_visits_every_clip(world):
  n = len(world.train)
  loader = feature_loader.FeatureLoader(_source(world), "train", batch_size=5, training=True,
                                        seed=7)
  rows = [next(loader) for _ in range(2 * n // 5 + 1)]
  cat = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
  assert cat["features"].dtype == np.float32 and cat["label"].dtype == np.int32
  assert cat["valid"].all()
  for epoch in range(2):  # each epoch is a permutation of the clips
    ids = cat["video_id"][epoch * n:(epoch + 1) * n]
    assert sorted(ids) == sorted(v for v, _, _ in world.train)
  steps = set()
  for f, label, vid in zip(cat["features"], cat["label"], cat["video_id"]):
    k = int(f[0, 0])
    v, frames, want_label = world.train[k]
    assert vid == v and label == want_label
    idx = f[:, 1].astype(int)
    t = len(frames)
    np.testing.assert_array_equal(f, frames[idx])  # the rows of those frames
    if t < LENGTH:
      np.testing.assert_array_equal(idx, np.round(np.linspace(0, t - 1, LENGTH)))
    else:
      step = np.diff(idx)
      assert len(set(step)) == 1 and step[0] in (1, 2, 3, 4), idx
      assert 0 <= idx[0] and idx[-1] < t
      steps.add(int(step[0]))
  assert len(steps) > 1  # random strides
  # Processes: each yields its rows of the same global batches.
  parts = [feature_loader.FeatureLoader(_source(world), "train", batch_size=5, training=True,
                                        seed=7, process_index=p, process_count=2)
           for p in range(2)]
  whole = feature_loader.FeatureLoader(_source(world), "train", batch_size=10, training=True,
                                       seed=7)
  for _ in range(3):
    got = np.concatenate([next(p)["features"] for p in parts])
    np.testing.assert_array_equal(got, next(whole)["features"])


def test_selection_keeps_the_protocols_clips_and_relabels_them(world):
  source = _source(world, classes=(1, 3, 5), k_shot=2, subset_seed=0, num_classes=6)
  loader = feature_loader.FeatureLoader(source, "train", batch_size=6, training=True, seed=0)
  stored = {v: y for v, _, y in world.train}
  kept = sorted(stored[loader.index.video_ids[p]] for p in loader.positions)
  assert kept == [1, 1, 3, 3, 5, 5]
  batch = next(loader)  # one epoch: the 6 clips
  assert sorted(batch["label"].tolist()) == [0, 0, 1, 1, 2, 2]
  for vid, label in zip(batch["video_id"], batch["label"]):
    assert (1, 3, 5)[label] == stored[vid]
  with pytest.raises(ValueError, match="fewer than k=5"):
    feature_loader.FeatureLoader(_source(world, k_shot=5), "train", batch_size=2,
                                 training=True)
  with pytest.raises(ValueError, match="8 clip.*has label 4, but there are 4 classes"):
    feature_loader.FeatureLoader(_source(world, num_classes=4), "train", batch_size=2,
                                 training=True)


def test_save_restore_resumes_the_same_batches(world, tmp_path):
  make = lambda seed=3: feature_loader.FeatureLoader(_source(world), "train", batch_size=7,
                                                     training=True, seed=seed)
  a = make()
  for _ in range(3):
    next(a)
  path = str(tmp_path / "pos" / "train")
  a.save(path)
  want = [next(a) for _ in range(4)]  # crosses the epoch boundary (24 clips)
  b = make()
  b.restore(path)
  for w in want:
    got = next(b)
    for k in w:
      np.testing.assert_array_equal(got[k], w[k], err_msg=k)
  with pytest.raises(ValueError, match="another stream"):
    make(seed=4).restore(path)
  # Evaluation: every window of every clip once, the last batch padded.
  ev = feature_loader.FeatureLoader(_source(world), "train", batch_size=7, training=False,
                                    num_windows=3)
  batches = list(ev)
  assert len(batches) == -(-3 * len(world.train) // 7)
  valid = np.concatenate([x["valid"] for x in batches])
  clips = np.concatenate([x["clip"] for x in batches])[valid]
  windows = np.concatenate([x["window"] for x in batches])[valid]
  assert valid.sum() == 3 * len(world.train) and not valid[-1]
  np.testing.assert_array_equal(clips, np.repeat(np.arange(len(world.train)), 3))
  np.testing.assert_array_equal(windows, np.tile(np.arange(3), len(world.train)))


# ----------------------------------------------------------------------------- evaluators

_records_pass = helpers.records_pass


def _eval_setup(world, tmp_path, clips, **overrides):
  """(task, params, mesh, rules, text features [C, D]) of a mean-pooling model whose test
  split holds `clips` ([(id, features [T, D], label)])."""
  cache = str(tmp_path / "cache")
  write_cache(cache, world.clip, {"train": world.train, "test": clips})
  c = _config(world, **{"model.temporal.layers": 0, "data.features": cache, **overrides})
  task = _task(c)
  params = _params(task)
  mesh = mesh_lib.make_mesh(c.mesh, jax.devices()[:1])
  rules = shd.rules_from_config(c.sharding_rules)
  return task, params, mesh, rules, c


def _text(world):
  task = _task(_config(world, **{"model.temporal.layers": 0}))
  params = _params(task)
  return np.asarray(task.text_features(task._clip_host, params["prompts"], task.all_tokens))


def test_action_evaluator_on_known_answers(world, tmp_path):
  text = _text(world)  # the untrained model's class text features
  clips = [(f"ok-{c}", np.repeat(3 * text[c:c + 1], 6, axis=0), c) for c in range(6)]
  clips.append(("wrong-0", np.repeat(text[1:2], 6, axis=0), 0))  # looks like class 1
  mixed = np.concatenate([np.repeat(text[2:3], 6, axis=0), np.repeat(text[3:4], 2, axis=0)])
  clips.append(("mixed-2", mixed, 2))  # windows: 3 of class 2, one 3:1, one 2:2 -> class 2
  clips.append(("short-4", np.repeat(text[4:5], 2, axis=0), 4))  # shorter than a window
  task, params, mesh, rules, c = _eval_setup(world, tmp_path, clips)
  ev = c.evals.test
  ids = [v for v, _, _ in clips]
  m = task.evaluators()["action"](params, _records_pass(ids), mesh, rules, ev)
  assert m["action/top1"] == pytest.approx(100 * 8 / 9)
  assert m["action/mean_class"] == pytest.approx((50 + 5 * 100) / 6)
  assert m["action/clips"] == 9
  # top-5 against the window-averaged softmax computed naively.
  scores = []
  for _, f, _ in clips:
    w = protocols.eval_windows(len(f), LENGTH, 5)
    v = _norm(np.asarray(f, np.float16).astype(np.float64)[w].mean(axis=1))
    logits = v @ text.T / 0.07
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    scores.append((p / p.sum(axis=1, keepdims=True)).mean(axis=0))
  want = classification.action_metrics(np.stack(scores), np.asarray([y for *_, y in clips]))
  for k, v in want.items():
    assert m[k] == pytest.approx(v, abs=1e-6), k
  assert "action/opposite_acc" not in m
  # Time-reversed pairs by name: clips of classes 0-3 (ok-0..3, wrong-0, mixed-2) count.
  ev.opposites = ("moving left|moving right", "moving up|moving down")
  m = task.evaluators()["action"](params, _records_pass(ids), mesh, rules, ev)
  assert m["action/opposite_acc"] == pytest.approx(100 * 5 / 6)
  ev.opposites = ("moving left|sliding",)
  with pytest.raises(ValueError, match="'sliding' is not one of the 6 classes"):
    task.evaluators()["action"](params, _records_pass(ids), mesh, rules, ev)
  ev.opposites = ()
  # Only the clips the records list are evaluated; a listed clip the cache lacks is an error.
  assert task.evaluators()["action"](params, _records_pass(ids[:3]), mesh, rules,
                                     ev)["action/clips"] == 3
  with pytest.raises(ValueError, match="1 clip.*not in the feature cache"):
    task.evaluators()["action"](params, _records_pass(ids + ["gone"]), mesh, rules, ev)
  task.config.eval.allow_missing = True
  m = task.evaluators()["action"](params, _records_pass(ids + ["gone"]), mesh, rules, ev)
  assert m["action/uncached_clips"] == 1 and m["action/clips"] == 9


def test_fewshot_evaluator_equals_a_naive_episode_loop(world, tmp_path):
  text = _text(world)
  rng = np.random.default_rng(5)
  clips = []
  for c in range(6):
    for i in range(4):
      t = int(rng.integers(2, 9))
      f = text[c] + 0.6 * rng.standard_normal((t, D))  # noisy: not every query is right
      clips.append((f"c{c}-{i}", f.astype(np.float32), c))
  overrides = {"evals.test_fewshot.n_way": 3, "evals.test_fewshot.k_shot": 1,
               "evals.test_fewshot.n_query": 2, "evals.test_fewshot.episodes": 12,
               "evals.test_fewshot.seed": 3}
  task, params, mesh, rules, c = _eval_setup(world, tmp_path, clips, **overrides)
  m = task.evaluators()["fewshot"](params, _records_pass([v for v, _, _ in clips]), mesh,
                                   rules, c.evals.test_fewshot)
  # Naive: a clip's feature is the normalised mean of its normalised windows; a query's score
  # for class c is cos(query, text_c) + cos(query, mean of class c's support features).
  order = sorted(range(len(clips)), key=lambda i: (i % 2, i))  # the cache's (shard) order
  feats, labels = [], []
  for i in order:
    _, f, y = clips[i]
    w = protocols.eval_windows(len(f), LENGTH, 5)
    feats.append(_norm(_norm(np.asarray(f, np.float16).astype(np.float64)[w].mean(1)).mean(0)))
    labels.append(y)
  feats, labels = np.stack(feats), np.asarray(labels)
  accs = []
  for ep in protocols.sample_episodes(labels, 3, 1, 2, 12, 3):
    right = 0
    for q, y in zip(ep.query, ep.query_labels):
      s = [feats[q] @ _norm(text[c]) + feats[q] @ _norm(
          feats[ep.support[ep.support_labels == j]].mean(0))
           for j, c in enumerate(ep.classes)]
      right += int(np.argmax(s) == y)
    accs.append(100 * right / len(ep.query))
  assert 0 < np.mean(accs) < 100  # a case where episodes differ
  assert m["fewshot/top1"] == pytest.approx(np.mean(accs), abs=1e-6)
  assert m["fewshot/top1_std"] == pytest.approx(np.std(accs), abs=1e-6)
  assert m["fewshot/episodes"] == 12


def test_openset_trains_on_seen_classes_and_scores_each_part_among_its_own(world, tmp_path):
  text = _text(world)
  seen, unseen = protocols.openset_splits(6, 0.5, 2, 0)[1]
  clips = [(f"ok-{c}-{i}", np.repeat(text[c:c + 1], 5, axis=0), c) for c in range(6)
           for i in range(2)]
  # An unseen-class clip that looks like another unseen class: wrong among the unseen.
  clips.append(("wrong", np.repeat(text[unseen[1]:unseen[1] + 1], 5, axis=0), int(unseen[0])))
  task, params, mesh, rules, c = _eval_setup(
      world, tmp_path, clips, **{"protocol.name": "openset", "protocol.seen_fraction": 0.5,
                                 "protocol.num_draws": 2, "protocol.draw": 1})
  np.testing.assert_array_equal(task.train_classes, seen)
  assert len(task.train_tokens.ids) == 3
  # Training reads the seen classes' clips only, labelled 0..2 in the order of `seen`.
  loader = feature_loader.FeatureLoader(task.feature_source(train=True), "train",
                                        batch_size=12, training=True)
  batch = next(loader)
  stored = {v: y for v, _, y in world.train}
  assert sorted(stored[v] for v in batch["video_id"]) == sorted(np.repeat(seen, 4).tolist())
  assert [seen[y] for y in batch["label"]] == [stored[v] for v in batch["video_id"]]
  m = task.evaluators()["openset"](params, _records_pass([v for v, _, _ in clips]), mesh,
                                   rules, c.evals.test)
  assert m["openset/seen_top1"] == pytest.approx(100)
  assert m["openset/unseen_top1"] == pytest.approx(100 * 6 / 7)
  assert m["openset/hm"] == pytest.approx(classification.harmonic_mean(100, 600 / 7))


def test_configuration_errors_name_the_fix(world, tmp_path):
  c = _config(world)
  c.init.clip = ""
  with pytest.raises(ValueError, match=r"set --config.init.clip=hf:DIR \(a CLIPModel"):
    _task(c)
  with pytest.raises(ValueError, match="launch.extract_features"):
    _task(_config(world, **{"data.features": ""}))
  with pytest.raises(ValueError, match="openset evaluator needs protocol.name='openset'"):
    _task(_config(world, **{"evals.test.type": "openset"}))
  classes = str(tmp_path / "classes.txt")
  with open(classes, "w") as f:
    f.write("moving left\n" + " ".join(["moving"] * 12) + "\n")
  task = _task(_config(world, **{"data.classes": classes}))
  with pytest.raises(ValueError, match=r"class 'moving moving.*' has 12 tokens"):
    task.init_collections(jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="exactly one"):
    _ = _task(_config(world, **{"model.prompts.template": "a video"})).all_tokens


def test_template_wraps_every_class_name(world):
  """The template's words are real tokens around the name; the learned slots go around the
  templated text, and P = Q = 0 leaves the template alone."""
  plain = _task(_config(world)).all_tokens
  task = _task(_config(world, **{"model.prompts.template": "a {} video",
                                 "model.prompts.prefix": 0, "model.prompts.suffix": 0}))
  tok = task.tokenizer
  for name, ids, eot in zip(NAMES, task.all_tokens.ids, task.all_tokens.eot_index):
    want = tok(f"a {name} video", add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(ids[1:eot], want)
  assert (task.all_tokens.slot == -1).all()
  assert (task.all_tokens.ids[:, 0] == tok.bos_token_id).all()
  # Around the template (P = Q = 2): the name's tokens 2 slots later, the EOT 4 later.
  wrapped = _task(_config(world, **{"model.prompts.template": "a {} video"})).all_tokens
  np.testing.assert_array_equal(wrapped.eot_index, task.all_tokens.eot_index + 4)
  assert plain.table_rows == wrapped.table_rows == 4


def _train_losses(workdir):
  import json
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def test_fit_evaluates_through_the_records_pass_and_resumes_exactly(world, tmp_path):
  """The trainer's path: the evaluation pass over the split's records lists (and counts) its
  clips, the evaluators read their cached features; a run stopped after step 2 resumes (state
  and stream position) to the losses of an uninterrupted run."""
  import shutil

  import tensorflow as tf

  from vlp_jax.data import records
  data = str(tmp_path / "data")
  os.makedirs(data)
  shutil.copy(os.path.join(world.data, "classes.txt"), data)
  rng = np.random.default_rng(2)
  test = [(f"test-{c}-{i}", rng.standard_normal((6, D)).astype(np.float32), c)
          for c in range(6) for i in range(3)]
  jpeg = tf.io.encode_jpeg(np.zeros((8, 8, 3), np.uint8)).numpy()
  for split, clips in (("train", world.train), ("test", test)):
    with records.ShardedWriter(data, split, 2) as w:
      for v, _, y in clips:
        w.write(records.clip_example(v, [jpeg] * 2, [NAMES[y]], 4.0, label_index=y))
  cache = str(tmp_path / "cache")
  write_cache(cache, world.clip, {"train": world.train, "test": test})
  c = _config(world, **{"data.dir": data, "data.features": cache, "num_steps": 4,
                        "log_every": 1, "ckpt_every": 2, "mesh.data": 1})
  c.evals.test_fewshot.update(n_way=2, k_shot=1, n_query=1, episodes=4)
  one = jax.devices()[:1]
  Trainer(c, str(tmp_path / "a"), devices=one).build().fit(stop_at=2)
  results = Trainer(c, str(tmp_path / "a"), devices=one).build().fit()
  assert results["test"]["eval/num_clips"] == len(test) == results["test"]["action/clips"]
  assert 0 <= results["test"]["action/top1"] <= 100
  assert results["test_fewshot"]["fewshot/episodes"] == 4
  c.evals = {}
  Trainer(c, str(tmp_path / "b"), devices=one).build().fit()
  resumed, straight = _train_losses(tmp_path / "a"), _train_losses(tmp_path / "b")
  assert sorted(resumed) == [1, 2, 3, 4]
  for step in range(1, 5):
    assert resumed[step] == pytest.approx(straight[step], rel=1e-6), step


def test_demo_opposites_are_the_synthetic_corpus_time_reversed_classes():
  from vlp_jax.data import synthetic
  want = {frozenset((synthetic.LABEL_TEXT[a], synthetic.LABEL_TEXT[b]))
          for a, b in synthetic.OPPOSITE.items()}
  got = {frozenset(p.split("|")) for p in prompt_clip_action.SYNTHETIC_OPPOSITES}
  assert got == want
