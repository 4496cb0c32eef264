"""The synthetic "moving shapes" corpus: determinism, content, held-out pairs, visible motion."""
import io
import itertools
import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from vlp_jax.data import records, synthetic, text, tokenizer

SMALL = dict(num_train=24, num_val=6, num_test=6, num_test_unseen=8, num_frames=4,
             image_size=32, num_shards=2)


def _files(d):
  return sorted(f for f in os.listdir(d) if f.endswith((".tfrecord", ".txt", ".json")) or
                f == "DONE")


def _clips(d, split):
  return [records.example_to_dict(r) for f in records.split_files(d, split)
          for r in records.read_records(f)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("shapes"))
  summary = synthetic.generate(d, seed=11, **dict(SMALL, num_train=80))
  return d, summary


def test_deterministic_byte_identical(tmp_path):
  a, b, c = (str(tmp_path / n) for n in "abc")
  synthetic.generate(a, seed=4, **SMALL)
  synthetic.generate(b, seed=4, **SMALL)
  synthetic.generate(c, seed=5, **SMALL)
  assert _files(a) == _files(b)
  assert "DONE" in _files(a) and "vocab.txt" in _files(a)
  for f in _files(a):
    with open(os.path.join(a, f), "rb") as fa, open(os.path.join(b, f), "rb") as fb:
      assert fa.read() == fb.read(), f
  with open(os.path.join(a, "train-00000-of-00002.tfrecord"), "rb") as fa, open(
      os.path.join(c, "train-00000-of-00002.tfrecord"), "rb") as fc:
    assert fa.read() != fc.read()


def test_vocabulary_of_attributes():
  assert len(synthetic.SHAPES) >= 8 and len(set(synthetic.SHAPES)) == len(synthetic.SHAPES)
  assert len(synthetic.COLOURS) >= 8
  rgb = np.array(list(synthetic.COLOURS.values()), float)
  dist = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)
  assert dist[~np.eye(len(rgb), dtype=bool)].min() > 60  # clearly distinct
  assert set(synthetic.SIZES) == {"small", "large"}
  assert set(synthetic.MOTIONS) >= {"left", "right", "up", "down", "grows", "shrinks",
                                    "rotates", "still"}
  for m, o in synthetic.OPPOSITE.items():
    assert synthetic.OPPOSITE[o] == m
  assert {"left", "up", "grows"} <= set(synthetic.OPPOSITE)


def _mentions(caption, obj):
  words = caption.split()
  verbs, parts = synthetic.MOTION_PHRASES[obj["motion"]]
  return (obj["shape"] in words and obj["colour"] in words
          and any(w in words for w in synthetic.SIZE_WORDS[obj["size"]])
          and any(p in caption for p in verbs + parts))


def test_records_content(corpus):
  d, summary = corpus
  assert summary["counts"] == dict(train=80, val=6, test=6, test_unseen=8)
  tok = tokenizer.load_tokenizer(os.path.join(d, "vocab.txt"))
  n_two = 0
  for split in synthetic.SPLITS:
    clips = _clips(d, split)
    assert len(clips) == summary["counts"][split]
    for c in clips:
      objects = json.loads(c["synthetic/attributes"][0])
      n_two += len(objects) == 2
      assert c[records.NUM_FRAMES] == [SMALL["num_frames"]] == [len(c[records.FRAMES])]
      assert c[records.LABEL_INDEX] == [synthetic.MOTIONS.index(objects[0]["motion"])]
      assert c[records.LABEL_TEXT] == [synthetic.LABEL_TEXT[objects[0]["motion"]].encode()]
      assert c[records.ENTITIES] == [o["shape"].encode() for o in objects]
      captions = [x.decode() for x in c[records.CAPTIONS]]
      assert len(captions) == 3 and len(set(captions)) == 3
      for cap in captions:
        assert all(_mentions(cap, o) for o in objects), (cap, objects)
      for o in objects:
        assert not (o["motion"] == "rotates" and o["shape"] in ("circle", "ring", "hexagon"))
      ids, _ = text.tokenize(tok, captions, 40)
      assert tok.unk_token_id not in ids
      img = Image.open(io.BytesIO(c[records.FRAMES][0]))
      assert img.format == "JPEG" and img.size == (32, 32) and img.mode == "RGB"
  assert 0.1 < n_two / 92 < 0.45  # ~25 % two-shape clips outside test_unseen


def test_unseen_pairs_never_in_train(corpus):
  d, summary = corpus
  held = set(map(tuple, summary["heldout_pairs"]))
  pairs = list(itertools.product(synthetic.SHAPES, synthetic.COLOURS))
  assert 0.1 <= len(held) / len(pairs) <= 0.2
  seen = {s for s, c in pairs if (s, c) not in held}, {c for s, c in pairs if (s, c) not in held}
  assert seen == (set(synthetic.SHAPES), set(synthetic.COLOURS))  # all still trained
  for split in ("train", "val", "test"):
    for c in _clips(d, split):
      for o in json.loads(c["synthetic/attributes"][0]):
        assert (o["shape"], o["colour"]) not in held
  for c in _clips(d, "test_unseen"):
    objects = json.loads(c["synthetic/attributes"][0])
    assert len(objects) == 1 and (objects[0]["shape"], objects[0]["colour"]) in held
  assert synthetic.heldout_pairs(11) == summary["heldout_pairs"]
  assert synthetic.heldout_pairs(12) != synthetic.heldout_pairs(11)


def _masks(clip):
  colour = np.array(synthetic.COLOURS[clip["objects"][0]["colour"]], float)
  return np.stack([np.linalg.norm(np.asarray(Image.open(io.BytesIO(f)), float) - colour,
                                  axis=-1) < 60 for f in clip["frames"]])


def test_motion_is_visible():
  size, frames = 64, 8
  held = synthetic.heldout_pairs(0)
  checked = set()
  for i in range(120):
    clip = synthetic.render_clip(0, "test_unseen", i, frames, size, held)  # single objects
    motion = clip["objects"][0]["motion"]
    m = _masks(clip)
    area = m.sum((1, 2))
    assert area.min() > 4, clip["objects"]
    ys, xs = np.indices((size, size))
    cx = (m * xs).sum((1, 2)) / area
    cy = (m * ys).sum((1, 2)) / area
    travel = 0.3 * size
    if motion in ("left", "right", "up", "down"):
      c = cx if motion in ("left", "right") else cy
      sign = -1 if motion in ("left", "up") else 1
      assert sign * (c[-1] - c[0]) > travel and (sign * np.diff(c) > 0).all(), motion
      other = cy if motion in ("left", "right") else cx
      assert np.ptp(other) < 2
    elif motion in ("grows", "shrinks"):
      ratio = area[-1] / area[0]
      assert (ratio > 3) if motion == "grows" else (ratio < 1 / 3), (motion, area)
    elif motion == "rotates":
      iou = [(m[0] & m[k]).sum() / (m[0] | m[k]).sum() for k in range(1, frames)]
      assert min(iou) < 0.8 and iou[-1] < 0.95 and np.hypot(np.ptp(cx), np.ptp(cy)) < 2
    else:
      assert np.hypot(np.ptp(cx), np.ptp(cy)) < 1.5 and area.max() / area.min() < 1.3
    checked.add(motion)
  assert checked == set(synthetic.MOTIONS)


def test_ensure_generates_once_and_redoes_interrupted(tmp_path):
  d = str(tmp_path / "data")
  cfg = ml_collections.ConfigDict(dict(generate=True, seed=2, **SMALL))
  assert synthetic.ensure(d, cfg) is not None
  shard = os.path.join(d, "train-00000-of-00002.tfrecord")
  stamp = os.stat(shard).st_mtime_ns
  assert synthetic.ensure(d, cfg) is None and os.stat(shard).st_mtime_ns == stamp
  os.remove(os.path.join(d, "DONE"))  # as if killed before finishing
  assert synthetic.ensure(d, cfg) is not None
  cfg.num_shards = 3  # other parameters: regenerated, no stale shards left behind
  assert synthetic.ensure(d, cfg) is not None
  assert len(records.split_files(d, "train")) == 3
  foreign = str(tmp_path / "real")
  with records.ShardedWriter(foreign, "train", 1) as w:
    w.write(records.clip_example("v", [b"\xff\xd8\xff\xd9"], ["x"], 1.0))
  with pytest.raises(FileExistsError, match="refusing"):
    synthetic.ensure(foreign, cfg)


def test_contrast_probes_differ_only_in_direction(corpus):
  d, _ = corpus
  seen = 0
  for clip in _clips(d, "test") + _clips(d, "test_unseen"):
    objects = json.loads(clip["synthetic/attributes"][0])
    probes = [p.decode() for p in clip.get(records.CONTRAST, [])]
    if len(objects) == 1 and objects[0]["motion"] in synthetic.OPPOSITE:
      seen += 1
      motion = objects[0]["motion"]
      assert len(probes) == 2 and probes[0] != probes[1]
      assert _mentions(probes[0], objects[0])
      assert _mentions(probes[1], dict(objects[0], motion=synthetic.OPPOSITE[motion]))
      # Same words apart from the motion phrase.
      verbs = [synthetic.MOTION_PHRASES[m][0][0] for m in (motion, synthetic.OPPOSITE[motion])]
      assert probes[0].replace(verbs[0], "") == probes[1].replace(verbs[1], "")
    else:
      assert probes == []
  assert seen >= 5


def test_class_names_of_each_labelling():
  assert synthetic.class_names() == [synthetic.LABEL_TEXT[m] for m in synthetic.MOTIONS]
  colour = synthetic.class_names("colour_motion")
  assert len(colour) == 64 == len(set(colour)) and colour[:2] == ["red moving left",
                                                                    "red moving right"]
  shape = synthetic.class_names("shape_motion")
  assert len(shape) == 8 * 8 - 3 == len(set(shape))  # circles, rings, hexagons never rotate
  assert "circle rotating" not in shape and "square rotating" in shape
  with pytest.raises(ValueError, match="colour_motion"):
    synthetic.class_names("shape")


def test_labellings_share_clips_and_label_the_first_object(tmp_path):
  held = synthetic.heldout_pairs(0)
  for i in range(12):
    clips = {k: synthetic.render_clip(0, "train", i, 3, 32, held, labels=k)
             for k in synthetic.LABELINGS}
    base = clips["motion"]
    first = base["objects"][0]
    for k, clip in clips.items():
      assert clip["frames"] == base["frames"] and clip["captions"] == base["captions"]
      assert synthetic.class_names(k)[clip["label_index"]] == clip["label_text"]
    assert base["label_text"] == synthetic.LABEL_TEXT[first["motion"]]
    assert clips["colour_motion"]["label_text"] == f"{first['colour']} {base['label_text']}"
    assert clips["shape_motion"]["label_text"] == f"{first['shape']} {base['label_text']}"
  # ensure: the labelling is part of the corpus's parameters (an existing motion corpus's
  # DONE marker, which has no `labels`, still matches the default)
  d = str(tmp_path / "data")
  cfg = ml_collections.ConfigDict(dict(generate=True, seed=2, **SMALL))
  assert synthetic.ensure(d, cfg) is not None
  with open(os.path.join(d, "DONE")) as f:
    assert "labels" not in json.load(f)
  cfg.labels = "colour_motion"
  assert synthetic.ensure(d, cfg) is not None
  with open(os.path.join(d, "synthetic.json")) as f:
    assert json.load(f)["label_text"] == synthetic.class_names("colour_motion")
  for clip in _clips(d, "test"):
    first = json.loads(clip["synthetic/attributes"][0])[0]
    label = f"{first['colour']} {synthetic.LABEL_TEXT[first['motion']]}"
    assert clip[records.LABEL_TEXT] == [label.encode()]
    assert list(clip[records.LABEL_INDEX]) == [synthetic.class_names("colour_motion").index(label)]


def test_launch_synthetic_writes_the_configs_corpus(tmp_path):
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = str(tmp_path / "cm")
  cmd = [sys.executable, "-m", "launch.synthetic", "--config=configs/clip_pretrain.py:tiny",
         f"--out={out}", "--config.data.synthetic.labels=colour_motion"]
  runs = [subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=True)
          for _ in range(2)]
  first, second = (json.loads(r.stdout.strip().splitlines()[-1]) for r in runs)
  assert first["counts"]["train"] == 32 and second == dict(dir=out, existing=True)
  with open(os.path.join(out, "synthetic.json")) as f:
    meta = json.load(f)
  assert meta["labels"] == "colour_motion" and len(meta["label_text"]) == 64
  bad = subprocess.run(cmd[:-1] + ["--config.data.synthetic.labels=colour"], cwd=root,
                       capture_output=True, text=True)
  assert bad.returncode != 0 and "colour_motion" in bad.stderr
