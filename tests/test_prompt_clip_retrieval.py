"""Prompt-CLIP text-video retrieval (task `prompt_clip_retrieval`): the caption table read from
the records, the loader's per-row caption choice, the symmetric InfoNCE against numpy, the
frozen CLIP staying frozen, the evaluator's numbers on features built so that the answer is
known (and against `eval/retrieval.py` on a naive similarity matrix), and a caption too long for
the context.

The world (as in test_prompt_clip_action.py): a CLIP tokenizer learned on the captions, a tiny
CLIP written as a transformers CLIPModel directory, records with captions (no class labels) and
feature caches written directly (no extraction)."""
import dataclasses
import os

import jax
import numpy as np
import pytest

import helpers
from configs import prompt_clip_retrieval
from vlp_jax.core import task as task_lib
from vlp_jax.core.trainer import Trainer
from vlp_jax.data import feature_cache, feature_loader
from vlp_jax.eval import retrieval as retrieval_lib
from vlp_jax.methods.prompt_clip import action, retrieval  # noqa: F401  (registers the task)
from vlp_jax.parallel import mesh as mesh_lib
from vlp_jax.parallel import sharding as shd

D = 16        # CLIP projection width = frame feature width
COLOURS = ("red", "green", "blue", "yellow")
MOTIONS = ("moves left", "moves right", "moves up", "moves down", "grows", "shrinks")
# Training clips: 2 captions each, 12 clips of 3..8 frames.
TRAIN = [(f"clip-{k:03d}", [f"a {COLOURS[k % 4]} square {MOTIONS[k % 6]}",
                            f"the {COLOURS[(k + 1) % 4]} shape {MOTIONS[k % 6]}"], 3 + k % 6)
         for k in range(12)]
# Test clips: one distinct caption each (known answers), and one with two captions.
TEST = [(f"test-{k}", [f"a {c} circle {m}"], 6)
        for k, (c, m) in enumerate(zip(COLOURS + COLOURS[:2], MOTIONS))]
TEST.append(("test-two", ["the red circle moves left", "a green square grows"], 6))


@dataclasses.dataclass
class World:
  root: str
  clip: str       # CLIPModel + tokenizer directory
  data: str       # records with captions
  features: str   # cache of `train` and `test` (random features)


def write_records(data_dir: str, split: str, clips) -> None:
  """Records of clips [(video_id, captions, frames)] without labels, 2 shards."""
  import tensorflow as tf

  from vlp_jax.data import records
  jpeg = tf.io.encode_jpeg(np.zeros((8, 8, 3), np.uint8)).numpy()
  with records.ShardedWriter(data_dir, split, 2) as w:
    for vid, caps, _ in clips:
      w.write(records.clip_example(vid, [jpeg] * 2, caps, 4.0))


def write_cache(out: str, clip_dir: str, splits: dict) -> None:
  """A feature cache of `splits` ({split: [(video_id, features [T, D])]}, no labels), one
  output shard per split, as launch.extract_features lays it out."""
  meta = dict(feature_cache.describe(clip_dir))
  meta["source"] = {"data_dir": out, "splits": {
      s: {"shards": [f"{s}-00000-of-00001"], "records": len(c)} for s, c in splits.items()}}
  identity = feature_cache.identity_digest(feature_cache.prepare(out, meta))
  for split, clips in splits.items():
    part = [feature_cache.CachedClip(v, np.asarray(f), -1, 4.0) for v, f in clips]
    feature_cache.write_shard(out, split, f"{split}-00000-of-00001", part, identity=identity,
                              dim=D, report={"clips": len(part), "frames": 0, "skipped": []})
    feature_cache.finish_split(out, split)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
  root = str(tmp_path_factory.mktemp("prompt_clip_ret"))
  clip_dir = os.path.join(root, "clip")
  texts = [c for _, caps, _ in TRAIN + TEST for c in caps]
  _, rng = helpers.save_tiny_clip(clip_dir, texts * 4, D, vocab_size=600, vocab_multiple=4)
  data = os.path.join(root, "data")
  os.makedirs(data)
  write_records(data, "train", TRAIN)
  write_records(data, "test", TEST)
  feats = {s: [(v, rng.standard_normal((t, D)).astype(np.float32)) for v, _, t in clips]
           for s, clips in (("train", TRAIN), ("test", TEST))}
  features = os.path.join(root, "features")
  write_cache(features, clip_dir, feats)
  return World(root, clip_dir, data, features)


def _config(world: World, **overrides):
  c = prompt_clip_retrieval.get_config("tiny")
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


# ----------------------------------------------------------------------------- captions

def test_caption_table_holds_every_caption_of_the_split_by_video(world):
  task = _task(_config(world))
  table = task.caption_table("train")
  want = {v: caps for v, caps, _ in TRAIN}
  assert len(table.texts) == 24 and set(table.rows) == set(want)
  for v, rows in table.rows.items():
    assert [table.texts[r] for r in rows] == want[v]
    assert all(table.video_ids[r] == v for r in rows)
  tok = task.tokenizer
  for r in (0, 13):  # [SOT] 2 prompt slots, the caption's tokens, 2 slots, [EOT]
    ids = tok(table.texts[r], add_special_tokens=False)["input_ids"]
    n = len(ids)
    np.testing.assert_array_equal(table.tokens.ids[r, 3:3 + n], ids)
    assert table.tokens.eot_index[r] == 1 + 2 + n + 2
    np.testing.assert_array_equal(table.tokens.slot[r, [1, 2, 3 + n, 4 + n]], [0, 1, 2, 3])
  assert task.prompt_learner.table_rows == 4


def test_loader_draws_one_of_each_clips_candidates_with_unchanged_windows(world):
  table = _task(_config(world)).caption_table("train")
  # Two clips have no candidate: they are not read; labels -1 are accepted.
  choices = {v: rows for v, rows in table.rows.items() if v not in ("clip-000", "clip-005")}
  source = feature_loader.FeatureSource(dir=world.features, length=4, require_labels=False,
                                        choices=choices)
  loader = feature_loader.FeatureLoader(source, "train", batch_size=5, training=True, seed=3)
  assert len(loader.positions) == 10
  batches = [next(loader) for _ in range(8)]  # 4 epochs
  picked = {}
  for b in batches:
    for vid, choice in zip(b["video_id"], b["choice"]):
      assert choice in choices[vid]
      picked.setdefault(vid, set()).add(int(choice))
  assert set(picked) == set(choices)
  assert sum(len(p) == 2 for p in picked.values()) >= 5  # both captions get drawn
  again = feature_loader.FeatureLoader(source, "train", batch_size=5, training=True, seed=3)
  np.testing.assert_array_equal(next(again)["choice"], batches[0]["choice"])  # seeded
  # Choices leave the windows as they are: those of a source without choices.
  make = lambda choices: feature_loader.FeatureLoader(
      feature_loader.FeatureSource(dir=world.features, length=4, require_labels=False,
                                   choices=choices), "train", batch_size=5, training=True,
      seed=3)
  full, plain = make(table.rows), make(None)
  assert len(plain.positions) == 12
  for _ in range(3):
    a, b = next(full), next(plain)
    np.testing.assert_array_equal(a["features"], b["features"])
    np.testing.assert_array_equal(a["video_id"], b["video_id"])
    assert (a["choice"] >= 0).all() and (b["choice"] == -1).all()
  with pytest.raises(ValueError, match="without a usable label"):
    feature_loader.FeatureLoader(feature_loader.FeatureSource(dir=world.features, length=4),
                                 "train", batch_size=2, training=True)
  with pytest.raises(ValueError, match="require_labels=False cannot select"):
    feature_loader.FeatureLoader(
        feature_loader.FeatureSource(dir=world.features, length=4, require_labels=False,
                                     k_shot=1), "train", batch_size=2, training=True)


# ----------------------------------------------------------------------------- training

def test_loss_is_the_symmetric_info_nce_of_the_tasks_features(world):
  task = _task(_config(world))
  params = _params(task)
  assert set(params) == {"prompts", "temporal"}
  frozen = task.frozen_host()
  loader = feature_loader.FeatureLoader(task.feature_source(train=True), "train", batch_size=8,
                                        training=True, seed=0)
  batch = next(loader)
  table = task.caption_table("train")
  assert all(table.video_ids[c] == v for c, v in zip(batch["choice"], batch["video_id"]))
  loss, metrics = task.loss(params, {"train": batch}, jax.random.PRNGKey(0), train=True,
                            frozen=frozen)
  text = np.asarray(task.caption_features(frozen["clip"], params["prompts"],
                                          frozen["captions"], batch["choice"]), np.float64)
  video = np.asarray(task.video_features(params, batch["features"]), np.float64)
  # The text features are those of the whole table's rows (gathering changes nothing).
  whole = np.asarray(task.text_features(frozen["clip"], params["prompts"], table.tokens))
  np.testing.assert_allclose(text, whole[batch["choice"]], rtol=1e-5, atol=1e-6)
  logits = video @ text.T / 0.07

  def ce(x):  # mean cross-entropy of row i against column i
    x = x - x.max(axis=1, keepdims=True)
    return np.mean(np.log(np.exp(x).sum(axis=1)) - np.diag(x))

  v2t, t2v = ce(logits), ce(logits.T)
  assert float(loss) == pytest.approx((v2t + t2v) / 2, rel=1e-5)
  assert float(metrics["loss/nce"]) == pytest.approx((v2t + t2v) / 2, rel=1e-5)
  # logits rows are videos: a video picks its best text along axis 1, a text along axis 0.
  assert float(metrics["vtc/v2t_acc"]) == pytest.approx(
      np.mean(logits.argmax(axis=1) == np.arange(8)))
  assert float(metrics["vtc/t2v_acc"]) == pytest.approx(
      np.mean(logits.argmax(axis=0) == np.arange(8)))
  # A padding row is neither a query nor a candidate: the loss of the 6 others.
  batch["valid"][6:] = False
  masked, _ = task.loss(params, {"train": batch}, jax.random.PRNGKey(0), train=True,
                        frozen=frozen)
  assert float(masked) == pytest.approx((ce(logits[:6, :6]) + ce(logits[:6, :6].T)) / 2,
                                        rel=1e-5)


def _run(world, tmp_path, devices, mesh):
  c = _config(world)
  c.mesh.update(mesh)
  return Trainer(c, str(tmp_path), devices=devices).build()


def test_two_steps_train_only_prompts_and_temporal(world, tmp_path):
  run = _run(world, tmp_path, jax.devices()[:1], dict(data=1, fsdp=1, tensor=1))
  assert run.apply_init()
  frozen = run.load_frozen()
  assert set(frozen.params) == {"clip", "captions"}
  assert set(frozen.params["clip"]) == set(action.TEXT_PARAMS)
  before = jax.device_get(run.state.params)
  frozen_before = jax.tree.map(np.array, jax.device_get(frozen.params))
  step_fn = run.update_fn(frozen)
  loader = run.loaders()["train"]
  state, losses = run.state, []
  for _ in range(2):
    state, m = step_fn(state, run.device_batches({"train": next(loader)}))
    losses.append(float(m["loss"]))
    assert float(m["loss"]) == pytest.approx(float(m["loss/nce"]))
  assert all(np.isfinite(losses))
  after = jax.device_get(state.params)
  assert set(after) == set(state.opt_state) == {"prompts", "temporal"}
  for name in ("prompts", "temporal"):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(before[name]),
                            jax.tree.leaves(after[name])):
      assert not np.array_equal(a, b), (name, jax.tree_util.keystr(path))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(frozen_before),
                          jax.tree.leaves(jax.device_get(frozen.params))):
    np.testing.assert_array_equal(a, np.asarray(b), err_msg=jax.tree_util.keystr(path))
  from vlp_jax.convert import clip as convert_clip
  _, want = convert_clip.import_clip(world.clip)
  for k in action.TEXT_PARAMS:
    for a, b in zip(jax.tree.leaves(want[k]), jax.tree.leaves(frozen_before["clip"][k])):
      np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(frozen_before["captions"]["ids"],
                                run.task.caption_table("train").tokens.ids)
  # 8 devices (batch split over data x fsdp, the [B, B] logits across them): the same losses.
  many = _run(world, tmp_path / "many", jax.devices()[:8], dict(data=2, fsdp=2, tensor=2))
  assert many.apply_init()
  step_fn, loader, state = many.update_fn(many.load_frozen()), many.loaders()["train"], many.state
  for want in losses:
    state, m = step_fn(state, many.device_batches({"train": next(loader)}))
    assert float(m["loss"]) == pytest.approx(want, rel=1e-5)


# ----------------------------------------------------------------------------- evaluation

_records_pass = helpers.records_pass


def _eval_world(world, tmp_path, test_features):
  """(task, params, mesh, rules, eval config) of a mean-pooling model whose test cache holds
  `test_features` ({video_id: [T, D]})."""
  cache = str(tmp_path / "cache")
  train = [(v, np.zeros((t, D), np.float32)) for v, _, t in TRAIN]
  write_cache(cache, world.clip, {"train": train, "test": list(test_features.items())})
  c = _config(world, **{"model.temporal.layers": 0, "data.features": cache})
  task = _task(c)
  mesh = mesh_lib.make_mesh(c.mesh, jax.devices()[:1])
  return task, _params(task), mesh, shd.rules_from_config(c.sharding_rules), c.evals.test


def _caption_text(world):
  """{caption: float32 [D] its prompted text feature} of the test captions, untrained model."""
  task = _task(_config(world, **{"model.temporal.layers": 0}))
  params, table = _params(task), task.caption_table("test")
  text = np.asarray(task.text_features(task._clip_host, params["prompts"], table.tokens))
  return dict(zip(table.texts, text))


def test_retrieval_evaluator_on_known_answers(world, tmp_path):
  text = _caption_text(world)
  single = [(v, caps[0]) for v, caps, _ in TEST if len(caps) == 1]
  # Each clip's frames are its caption's text feature: every query finds its own first.
  feats = {v: np.repeat(text[cap][None], 6, axis=0) for v, cap in single}
  task, params, mesh, rules, ev = _eval_world(world, tmp_path, feats)
  ids = [v for v, _ in single]
  m = task.evaluators()["retrieval"](params, _records_pass(ids), mesh, rules, ev)
  for d in ("t2v", "v2t"):
    for k in (1, 5, 10):
      assert m[f"retrieval/{d}_R@{k}"] == 100.0
    assert m[f"retrieval/{d}_MdR"] == 1.0 and m[f"retrieval/{d}_MnR"] == 1.0
  assert m["retrieval/captions"] == m["retrieval/clips"] == 6
  # Swapping two clips' features: those two captions (and clips) miss at R@1.
  a, b = ids[0], ids[1]
  feats[a], feats[b] = feats[b], feats[a]
  task, params, mesh, rules, ev = _eval_world(world, tmp_path / "swap", feats)
  m = task.evaluators()["retrieval"](params, _records_pass(ids), mesh, rules, ev)
  assert m["retrieval/t2v_R@1"] == pytest.approx(100 * 4 / 6)
  assert m["retrieval/v2t_R@1"] == pytest.approx(100 * 4 / 6)
  assert m["retrieval/t2v_R@10"] == 100.0  # 6 clips: everything is in the top 10


def test_retrieval_evaluator_equals_metrics_of_a_naive_similarity(world, tmp_path):
  """Noisy multi-window clips, one with two captions, one the records list that is absent
  from the cache: the metrics of a naive text x clip similarity (clip = normalised mean of
  the normalised mean-pooled windows)."""
  from vlp_jax.data import protocols
  text = _caption_text(world)
  rng = np.random.default_rng(4)
  feats = {}
  for v, caps, _ in TEST:
    t = int(rng.integers(2, 9))
    feats[v] = (text[caps[0]] + 0.15 * rng.standard_normal((t, D))).astype(np.float32)
  task, params, mesh, rules, ev = _eval_world(world, tmp_path, feats)
  ids = [v for v, _, _ in TEST]
  with pytest.raises(ValueError, match="1 clip.*not in the feature cache"):
    task.evaluators()["retrieval"](params, _records_pass(ids + ["gone"]), mesh, rules, ev)
  task.config.eval.allow_missing = True
  m = task.evaluators()["retrieval"](params, _records_pass(ids + ["gone"]), mesh, rules, ev)
  assert m["retrieval/uncached_clips"] == 1
  assert m["retrieval/clips"] == 7 and m["retrieval/captions"] == 8
  # Naive: in the cache's clip order (the order of the written list: one shard).
  videos, queries, gt = [], [], []
  for j, (v, caps, _) in enumerate(TEST):
    f = np.asarray(feats[v], np.float16).astype(np.float64)
    w = protocols.eval_windows(len(f), 4, 5)
    videos.append(_norm(_norm(f[w].mean(axis=1)).mean(axis=0)))
    for cap in caps:
      queries.append(text[cap])
      gt.append(j)
  sim = np.stack(queries) @ np.stack(videos).T
  want = retrieval_lib.retrieval_metrics(sim, np.asarray(gt))
  assert want["t2v_R@1"] < 100  # a case where ranks differ
  for k, v in want.items():
    assert m[f"retrieval/{k}"] == pytest.approx(v, abs=1e-6), k


def test_a_caption_too_long_for_the_context_is_named(world, tmp_path):
  data = str(tmp_path / "data")
  os.makedirs(data)
  long = "a red square moves left " * 3 + "and grows"
  write_records(data, "train", [("ok", ["a red square grows"], 4), ("long", [long], 4)])
  task = _task(_config(world, **{"data.dir": data}))
  too_long = (r"caption 'a red square moves left a red.*' has \d+ tokens; with 2 \+ 2 prompt "
              r"vectors.*context of 16")
  with pytest.raises(ValueError, match=too_long):
    task.caption_table("train")
  # A test caption too long fails before training (load_frozen), not at the first evaluation.
  data = str(tmp_path / "long_test")
  os.makedirs(data)
  write_records(data, "train", [("ok", ["a red square grows"], 4)])
  write_records(data, "test", [("long", [long], 4)])
  c = _config(world, **{"data.dir": data})
  task = _task(c)
  assert len(task.caption_table("train").texts) == 1
  mesh = mesh_lib.make_mesh(c.mesh, jax.devices()[:1])
  with pytest.raises(ValueError, match=too_long):
    task.load_frozen(mesh, shd.rules_from_config(c.sharding_rules), str(tmp_path))
  with pytest.raises(ValueError, match="protocol.name='closed'"):
    _task(_config(world, **{"protocol.name": "fewshot", "protocol.k_shot": 1}))
