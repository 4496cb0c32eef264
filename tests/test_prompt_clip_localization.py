"""Prompt-CLIP temporal action localisation (task `prompt_clip_localization`): seconds -> frames,
detection scoring and NMS, the evaluator's mAP on features built so that the answer is known,
proposal-file errors, the synthetic untrimmed videos and their noisy-oracle proposals, and the
trainer's evaluation path on generated videos.

The world (as in test_prompt_clip_action.py): a CLIP tokenizer learned on the class names, a
tiny CLIP written as a transformers CLIPModel directory, feature caches written directly."""
import dataclasses
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

import helpers
from configs import prompt_clip_localization
from vlp_jax.core import task as task_lib
from vlp_jax.data import feature_cache, synthetic, synthetic_untrimmed
from vlp_jax.eval import localization as loc_lib
from vlp_jax.methods.prompt_clip import action, localization
from vlp_jax.parallel import mesh as mesh_lib
from vlp_jax.parallel import sharding as shd

NAMES = [synthetic.LABEL_TEXT[m] for m in synthetic.MOTIONS]  # the untrimmed corpus's classes
D = 16
TEMPERATURE = 0.001  # sharp: a frame feature equal to a class's text feature is that class


@dataclasses.dataclass
class World:
  root: str
  clip: str   # CLIPModel + tokenizer directory
  data: str   # classes.txt


def write_cache(out: str, clip_dir: str, split: str, videos) -> None:
  """A feature cache of one split: videos = [(video_id, features [T, D], fps, start_us)], one
  output shard."""
  stem = f"{split}-00000-of-00001"
  meta = dict(feature_cache.describe(clip_dir))
  meta["source"] = {"data_dir": out, "splits": {split: {"shards": [stem],
                                                        "records": len(videos)}}}
  identity = feature_cache.identity_digest(feature_cache.prepare(out, meta))
  clips = [feature_cache.CachedClip(v, np.asarray(f), -1, float(fps)) for v, f, fps, _ in videos]
  feature_cache.write_shard(out, split, stem, clips, identity=identity, dim=D,
                            report={"clips": len(clips), "frames": 0, "skipped": []},
                            timestamps=[(s, -1) for *_, s in videos])
  feature_cache.finish_split(out, split)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
  root = str(tmp_path_factory.mktemp("prompt_clip_loc"))
  clip_dir = os.path.join(root, "clip")
  _, rng = helpers.save_tiny_clip(clip_dir, NAMES * 4, D, vocab_size=600)
  data = os.path.join(root, "data")
  os.makedirs(data)
  with open(os.path.join(data, "classes.txt"), "w") as f:
    f.write("\n".join(NAMES) + "\n")
  return World(root, clip_dir, data)


def _config(world: World, **overrides):
  c = prompt_clip_localization.get_config("tiny")
  c.data.dir = world.data
  c.init.clip = "hf:" + world.clip
  c.data.vocab = world.clip
  c.data.features = os.path.join(world.root, "unused")
  c.model.temporal.layers = 0
  c.model.temperature = TEMPERATURE
  return helpers.override(c, **overrides)


def _text(task, params) -> np.ndarray:
  """float32 [C, D] normalised text features of every class under `params`."""
  return np.asarray(task.text_features(task._clip_host, params["prompts"], task.all_tokens))


_records_pass = helpers.records_pass


def _write_records(data_dir: str, split: str, videos) -> None:
  """Records of videos [(video_id, fps, [(start, end, label)])] with the segment fields."""
  import tensorflow as tf

  from vlp_jax.data import records
  jpeg = tf.io.encode_jpeg(np.zeros((8, 8, 3), np.uint8)).numpy()
  with records.ShardedWriter(data_dir, split, 2) as w:
    for vid, fps, segs in videos:
      extra = {}
      if segs:
        extra = {localization.SEGMENT_START: [float(s) for s, _, _ in segs],
                 localization.SEGMENT_END: [float(e) for _, e, _ in segs],
                 localization.SEGMENT_LABEL: [int(c) for *_, c in segs]}
      w.write(records.clip_example(vid, [jpeg] * 2, ["a video"], fps, extra=extra))


def _write_proposals(path: str, results: dict) -> str:
  with open(path, "w") as f:
    json.dump({"version": "test", "results": results}, f)
  return path


# ----------------------------------------------------------------------------- pure parts

def test_seconds_map_to_the_frames_whose_span_overlaps():
  f = localization.proposal_frames
  assert f(1.0, 2.0, 8.0, 64) == (8, 16)      # frames 8..15 cover [1, 2) s
  assert f(1.05, 1.1, 8.0, 64) == (8, 9)      # inside one frame's span: that frame
  assert f(0.1, 0.3, 10.0, 64) == (1, 3)      # 0.1 * 10 is not exact in floats
  assert f(10.5, 12.5, 4.0, 24, offset=10.0) == (2, 10)  # frame 0 at 10 s
  assert f(7.0, 9.0, 8.0, 64) == (56, 64)     # clipped to the video
  assert f(9.0, 12.0, 8.0, 64) == (63, 64)    # past the end: the last frame
  assert f(-2.0, -1.0, 8.0, 64) == (0, 1)     # before the start: the first frame
  with pytest.raises(ValueError, match="fps must be > 0"):
    f(0.0, 1.0, 0.0, 8)
  w = localization.window_frames
  np.testing.assert_array_equal(w(8, 16, 8), np.arange(8, 16))
  np.testing.assert_array_equal(w(8, 11, 8), [8, 9, 10])        # shorter: all its frames
  np.testing.assert_array_equal(w(0, 16, 4), [0, 5, 10, 15])    # longer: evenly, both ends
  np.testing.assert_array_equal(w(3, 10, 3), [3, 6, 9])


def test_tiou_presets():
  np.testing.assert_allclose(localization.tiou_thresholds("thumos14"), [0.3, 0.4, 0.5, 0.6, 0.7])
  np.testing.assert_allclose(localization.tiou_thresholds("ActivityNet"),
                             np.linspace(0.5, 0.95, 10))
  np.testing.assert_allclose(localization.tiou_thresholds("0.5, 0.75"), [0.5, 0.75])
  with pytest.raises(ValueError, match="thumos14"):
    localization.tiou_thresholds("coco")
  with pytest.raises(ValueError, match=r"\(0, 1\]"):
    localization.tiou_thresholds("0.5,1.5")


def test_detections_multiply_scores_and_suppress_per_video_and_class():
  ids = ["a", "a", "a", "b"]
  segments = np.asarray([[0, 2], [0.2, 2], [5, 6], [0, 2]], float)
  scores = np.asarray([0.9, 0.8, 0.5, 1.0])
  probs = np.asarray([[0.7, 0.2], [0.6, 0.3], [0.9, 0.1], [0.5, 0.4]])
  labels = np.asarray([[0, 1], [0, 1], [1, 0], [0, 2]])
  got = localization.detections(ids, segments, scores, probs, labels, nms_iou=0.5)
  want = [("a", 0.0, 2.0, 0, 0.9 * 0.7),   # (a, 0): the 0.8 x 0.6 copy overlaps by 0.9
          ("a", 5.0, 6.0, 0, 0.5 * 0.1),   # ... this one does not overlap
          ("a", 0.2, 2.0, 1, 0.8 * 0.3),   # (a, 1): 0.24 beats 0.18 and suppresses it
          ("a", 5.0, 6.0, 1, 0.5 * 0.9),
          ("b", 0.0, 2.0, 0, 0.5), ("b", 0.0, 2.0, 2, 0.4)]
  key = lambda d: (d[0], d[3], d[1])
  assert len(got) == len(want)
  for g, w in zip(sorted(got, key=key), sorted(want, key=key)):
    assert g[:4] == w[:4] and g[4] == pytest.approx(w[4])
  # No NMS: every (proposal, class) pair is a detection.
  assert len(localization.detections(ids, segments, scores, probs, labels, 1.0)) == 8


# ----------------------------------------------------------------------------- the evaluator

# fps 4; v2's record starts 10 s into its source video (the proposals' and segments' time
# axis); v3 is background only.
VIDEOS = [("v0", 40, 0, [(1.0, 3.0, 0), (5.0, 8.0, 1)]),
          ("v1", 32, 0, [(2.0, 4.0, 0), (5.0, 7.0, 2)]),
          ("v2", 24, 10_000_000, [(10.5, 12.5, 3)]),
          ("v3", 16, 0, [])]
FPS = 4.0


@pytest.fixture(scope="module")
def known(world, tmp_path_factory):
  """(task, params, mesh, rules, config, data dir) of a mean-pooling model whose test videos'
  frames equal the text feature of their segment's class (0 on background)."""
  root = tmp_path_factory.mktemp("known")
  data = str(root / "data")
  os.makedirs(data)
  with open(os.path.join(data, "classes.txt"), "w") as f:
    f.write("\n".join(NAMES) + "\n")
  _write_records(data, "test", [(v, FPS, segs) for v, _, _, segs in VIDEOS])
  cache = str(root / "cache")
  c = _config(world, **{"data.dir": data, "data.features": cache})
  task = task_lib.build(c, None)
  params = jax.tree.map(np.asarray, nn.unbox(task.init_collections(jax.random.PRNGKey(1))))
  text = _text(task, params)
  cos = text @ text.T - np.eye(len(NAMES))
  assert cos.max() < 0.999  # distinct classes: at T = 0.001 the right one dominates
  cached = []
  for v, t, start_us, segs in VIDEOS:
    f = np.zeros((t, D), np.float32)
    for s, e, label in segs:
      a, b = localization.proposal_frames(s, e, FPS, t, start_us / 1e6)
      f[a:b] = text[label]
    cached.append((v, f, FPS, start_us))
  write_cache(cache, world.clip, "test", cached)
  mesh = mesh_lib.make_mesh(c.mesh, jax.devices()[:1])
  rules = shd.rules_from_config(c.sharding_rules)
  return task, params, mesh, rules, c, data


def _evaluate(known, results, **eval_overrides):
  task, params, mesh, rules, c, data = known
  _write_proposals(os.path.join(data, "proposals_test.json"), results)  # the default path
  ev = c.evals.test.copy_and_resolve_references()
  for k, v in eval_overrides.items():
    ev[k] = v
  return task.evaluators()["localization"](params, _records_pass([v[0] for v in VIDEOS]), mesh,
                                           rules, ev)


def _exact(scores=(0.9, 0.8, 0.7, 0.6, 0.5)) -> dict:
  """One proposal per ground-truth segment, exactly on it, and a false one in v3."""
  it = iter(scores)
  out = {v: [{"segment": [s, e], "score": next(it)} for s, e, _ in segs]
         for v, _, _, segs in VIDEOS if segs}
  out["v3"] = [{"segment": [0.5, 2.0], "score": 0.3}]
  return out


def test_perfect_proposals_give_100_at_every_tiou(known):
  m = _evaluate(known, _exact())
  for t in (0.3, 0.4, 0.5, 0.6, 0.7):
    assert m[f"loc/mAP@{t:g}"] == pytest.approx(100.0)
  assert m["loc/mAP_avg"] == pytest.approx(100.0)
  assert m["loc/videos"] == 4 and m["loc/gt_segments"] == 5 and m["loc/proposals"] == 6
  assert m["loc/detections"] == 12  # 2 classes per proposal, nothing overlaps
  m = _evaluate(known, _exact(), tious="activitynet")
  assert len([k for k in m if k.startswith("loc/mAP@")]) == 10
  assert m["loc/mAP@0.95"] == pytest.approx(100.0) and m["loc/mAP_avg"] == pytest.approx(100.0)


def test_one_shifted_proposal_gives_the_hand_computed_map(known):
  """v1's class-0 proposal moves from [2, 4] to [3, 5] (tIoU 1/3; its frames 12..19 are half
  class 0, half background, so it is still class 0) and outscores v0's exact one. Class 0
  (2 instances) at tIoU 0.3: both true, AP 1; at 0.4..0.7 the ranking is false, true:
  precision (0, 1/2), recall (0, 1/2) -> AP 1/2 x 1/2 = 0.25. Classes 1-3: AP 1; 4-7 have no
  ground truth and do not count."""
  results = _exact()
  results["v1"][0] = {"segment": [3.0, 5.0], "score": 0.95}
  m = _evaluate(known, results)
  assert m["loc/mAP@0.3"] == pytest.approx(100.0)
  for t in (0.4, 0.5, 0.6, 0.7):
    assert m[f"loc/mAP@{t:g}"] == pytest.approx(100 * (0.25 + 3) / 4)
  assert m["loc/mAP_avg"] == pytest.approx((100 + 4 * 81.25) / 5)
  # Ranked below v0's exact proposal instead: precision (1, 1/2), recall (1/2, 1/2) -> 0.5.
  results["v1"][0]["score"] = 0.85
  m = _evaluate(known, results)
  assert m["loc/mAP@0.5"] == pytest.approx(100 * (0.5 + 3) / 4)
  # top_k = 1: one detection per proposal, the same mAP.
  m1 = _evaluate(known, results, top_k=1)
  assert m1["loc/detections"] == 6 and m1["loc/mAP@0.5"] == pytest.approx(m["loc/mAP@0.5"])


def test_proposal_errors_name_the_video_and_proposal(known):
  bad = _exact()
  bad["nope"] = [{"segment": [0.0, 1.0], "score": 0.5}]
  with pytest.raises(ValueError, match="unknown video 'nope'"):
    _evaluate(known, bad)
  bad = _exact()
  bad["v1"].append({"segment": [3.0, 3.0], "score": 0.5})
  with pytest.raises(ValueError, match=r"video 'v1' proposal 2 has end <= start"):
    _evaluate(known, bad)
  with pytest.raises(FileNotFoundError, match="no proposal file"):
    _evaluate(known, _exact(), proposals=os.path.join(known[5], "missing.json"))
  with pytest.raises(ValueError, match="frames"):
    _evaluate(known, _exact(), frames=64)


def test_same_parameters_as_the_action_task(world):
  """A prompt_clip_action run's checkpoint fits (init.checkpoint copies params by name and
  shape); the presets build."""
  from configs import prompt_clip_action
  loc = task_lib.build(_config(world, **{"model.temporal.layers": 1}), None)
  c = prompt_clip_action.get_config("tiny")
  c.data.dir, c.init.clip, c.data.features = world.data, "hf:" + world.clip, "x"
  act = task_lib.build(c, None)
  assert isinstance(loc, action.PromptClipActionTask)
  shapes = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), nn.unbox(
      jax.eval_shape(t.init_collections, jax.random.PRNGKey(0))))
  assert shapes(loc) == shapes(act)
  for preset in ("tiny", "demo", "base"):
    cfg = prompt_clip_localization.get_config(preset)
    assert cfg.task == "prompt_clip_localization" and list(cfg.evals) == ["test"]
    assert cfg.evals.test.type == "localization" and cfg.evals.test.tious == "thumos14"
  assert prompt_clip_localization.get_config("demo").model.temporal.max_frames == 8


# ----------------------------------------------------------------------------- synthetic data

def _visible(jpeg: bytes) -> bool:
  """Whether a frame shows a shape: saturated pixels (the background is grey noise)."""
  import io

  from PIL import Image
  rgb = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(np.int32)
  return int(((rgb.max(axis=-1) - rgb.min(axis=-1)) > 80).sum()) >= 2


def test_untrimmed_videos_have_segments_where_the_shape_is_visible(tmp_path):
  from vlp_jax.data import records
  for i in range(4):
    video = synthetic_untrimmed.render_video(0, "test", i)
    t = video["num_frames"]
    assert 48 <= t <= 64 and len(video["frames"]) == t and 1 <= len(video["actions"]) <= 3
    want = np.zeros(t, bool)
    previous_end = -1
    for act in video["actions"]:
      a, b = act["frames"]
      assert 8 <= b - a <= 16 and a >= previous_end + (4 if previous_end >= 0 else 0)
      previous_end = b
      assert act["segment"] == [a / 8.0, b / 8.0]
      assert localization.proposal_frames(*act["segment"], 8.0, t) == (a, b)
      assert act["label"] == synthetic.MOTIONS.index(act["motion"])
      want[a:b] = True
    got = np.asarray([_visible(f) for f in video["frames"]])
    np.testing.assert_array_equal(got, want, err_msg=video["video_id"])
  summary = synthetic_untrimmed.generate(str(tmp_path), seed=0, counts={"test": 3},
                                         num_shards=2)
  assert summary["counts"] == {"test": 3}
  stored = {}
  for shard in records.split_files(str(tmp_path), "test"):
    for raw in records.read_records(shard):
      ex = records.example_to_dict(raw)
      stored[ex[records.VIDEO_ID][0].decode()] = ex
  assert sorted(stored) == [f"untrimmed-test-{i:06d}" for i in range(3)]
  for i in range(3):
    video = synthetic_untrimmed.render_video(0, "test", i)
    ex = stored[video["video_id"]]
    assert ex[records.FPS] == [8.0] and len(ex[records.FRAMES]) == video["num_frames"]
    truth = localization.example_segments(ex, video["video_id"])
    np.testing.assert_allclose(truth.segments, [a["segment"] for a in video["actions"]])
    np.testing.assert_array_equal(truth.labels, [a["label"] for a in video["actions"]])
    assert records.LABEL_INDEX not in ex
  with open(tmp_path / "classes.txt") as f:
    assert f.read().splitlines() == NAMES
  proposals = loc_lib.load_proposals(tmp_path / "proposals_test.json", stored)
  assert sorted(proposals) == sorted(stored)


def _random_truth(n=30, seed=0):
  rng = np.random.default_rng(seed)
  truth, durations = [], {}
  for i in range(n):
    durations[f"v{i}"] = 8.0
    t = 0.0
    for _ in range(int(rng.integers(1, 4))):
      a = t + rng.uniform(0.2, 1.0)
      b = a + rng.uniform(0.5, 2.0)
      truth.append((f"v{i}", a, b, int(rng.integers(8))))
      t = b
  return truth, durations


def _best_tiou(truth, proposals):
  out = []
  for v, s, e, _ in truth:
    segs = np.asarray([p["segment"] for p in proposals[v]])
    out.append(loc_lib.segment_iou((s, e), segs).max())
  return np.asarray(out)


def test_noisy_oracle_proposals(tmp_path):
  truth, durations = _random_truth()
  for seed in range(3):
    props = synthetic_untrimmed.noisy_oracle_proposals(truth, seed, durations=durations,
                                                       jitter=0.05)
    assert (_best_tiou(truth, props) >= 0.7).all()  # low noise: every segment is found
    for v, ps in props.items():
      assert len(ps) == 5 * sum(1 for t in truth if t[0] == v) + 3
      scores = [p["score"] for p in ps]
      assert scores == sorted(scores, reverse=True)
      assert all(0 <= p["segment"][0] < p["segment"][1] <= 8.0 for p in ps)
  # No jitter: exact copies scored 1; more jitter: worse proposals, lower scores.
  exact = synthetic_untrimmed.noisy_oracle_proposals(truth, 0, durations=durations, jitter=0.0,
                                                     num_false=0)
  assert (_best_tiou(truth, exact) == 1).all()
  assert all(p["score"] == 1.0 for ps in exact.values() for p in ps)
  low, high = (synthetic_untrimmed.noisy_oracle_proposals(truth, 0, durations=durations,
                                                          jitter=j, num_false=0)
               for j in (0.05, 0.3))
  mean = lambda props: np.mean([p["score"] for ps in props.values() for p in ps])
  assert mean(high) < mean(low) < 1.0
  assert _best_tiou(truth, high).mean() < _best_tiou(truth, low).mean()
  path = str(tmp_path / "p.json")
  synthetic_untrimmed.write_proposals(path, low)
  assert loc_lib.load_proposals(path, durations).keys() == low.keys()


# ----------------------------------------------------------------------------- the trainer

def test_trainer_evaluates_generated_untrimmed_videos(world, tmp_path):
  """The core's evaluation path (records pass over the generated split, count check) with the
  localization evaluator: exact proposals on features equal to the class texts -> 100."""
  from vlp_jax.core import metrics as metrics_lib
  from vlp_jax.core.trainer import Trainer
  data = str(tmp_path / "data")
  synthetic_untrimmed.generate(data, seed=1, counts={"test": 3}, min_frames=16, max_frames=24,
                               min_len=4, max_len=8, min_gap=2, num_shards=2)
  videos = [synthetic_untrimmed.render_video(1, "test", i, min_frames=16, max_frames=24,
                                             min_len=4, max_len=8, min_gap=2)
            for i in range(3)]
  exact = {v["video_id"]: [{"segment": a["segment"], "score": 1.0 - 0.1 * k}
                           for k, a in enumerate(v["actions"])] for v in videos}
  proposals = _write_proposals(str(tmp_path / "exact.json"), exact)
  cache = str(tmp_path / "cache")
  c = _config(world, **{"data.dir": data, "data.features": cache, "mesh.data": 1,
                        "evals.test.proposals": proposals})
  trainer = Trainer(c, str(tmp_path / "run"), devices=jax.devices()[:1]).build()
  text = _text(trainer.task, jax.device_get(trainer.state.params))
  cached = []
  for v in videos:
    f = np.zeros((v["num_frames"], D), np.float32)
    for a in v["actions"]:
      f[slice(*a["frames"])] = text[a["label"]]
    cached.append((v["video_id"], f, v["fps"], 0))
  write_cache(cache, world.clip, "test", cached)
  writer = metrics_lib.MetricWriter(str(tmp_path / "run"), tensorboard=False)
  try:
    m = trainer.evaluate(0, writer)["test"]
  finally:
    writer.close()
  assert m["eval/num_clips"] == 3 and m["loc/videos"] == 3
  assert m["loc/gt_segments"] == sum(len(v["actions"]) for v in videos)
  assert m["loc/mAP_avg"] == pytest.approx(100.0)
