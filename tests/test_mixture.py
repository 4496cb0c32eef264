"""Mixed video + image-text training: the step choice, the loader, and the synthetic images."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from configs import alpro_pretrain
from vlp_jax.data import mixture, records, setup, synthetic
from vlp_jax.core.task import Stream

MIXED = Stream(image_mix=True)  # ALPRO's train stream: videos mixed with still images


def test_image_steps_follow_the_ratio_and_depend_only_on_seed_and_step():
  for ratio in (0.5, 0.25):
    picks = np.array([mixture.is_image_step(0, s, ratio) for s in range(4000)])
    assert abs(picks.mean() - ratio) < 0.03
  a = [mixture.is_image_step(3, s, 0.5) for s in range(200)]
  assert a == [mixture.is_image_step(3, s, 0.5) for s in range(200)]
  assert a != [mixture.is_image_step(4, s, 0.5) for s in range(200)]
  assert not any(mixture.is_image_step(0, s, 0.0) for s in range(100))
  assert all(mixture.is_image_step(0, s, 1.0) for s in range(100))


class _Counter:
  """A loader yielding batches numbered 0, 1, ... with save/restore of its position."""

  def __init__(self, name):
    self.name, self.step = name, 0

  def __next__(self):
    self.step += 1
    return {"source": np.full(2, self.name), "n": np.full(2, self.step - 1),
            "valid": np.ones(2, bool)}

  def save(self, path):
    with open(path, "w") as f:
      json.dump(self.step, f)

  def restore(self, path):
    with open(path) as f:
      self.step = json.load(f)


def test_mixture_routes_batches_and_resumes_exactly(tmp_path):
  mix = mixture.MixtureLoader(_Counter("v"), _Counter("i"), 0.5, seed=1)
  first = [next(mix) for _ in range(6)]
  for s, b in enumerate(first):
    image = mixture.is_image_step(1, s, 0.5)
    assert list(b["is_image"]) == [image, image]
    assert b["source"][0] == ("i" if image else "v")
  assert [b["n"][0] for b in first if b["source"][0] == "v"] == list(range(6 - mix.image_steps))
  mix.save(str(tmp_path / "it"))
  rest = [next(mix) for _ in range(6)]
  resumed = mixture.MixtureLoader(_Counter("v"), _Counter("i"), 0.5, seed=1)
  resumed.restore(str(tmp_path / "it"))
  for a, b in zip(rest, [next(resumed) for _ in range(6)]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  with pytest.raises(ValueError, match="image_ratio 0.5"):
    mixture.MixtureLoader(_Counter("v"), _Counter("i"), 0.25, seed=1).restore(
        str(tmp_path / "it"))
  with pytest.raises(ValueError, match="image_ratio"):
    mixture.MixtureLoader(_Counter("v"), _Counter("i"), 1.5, seed=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("shapes"))
  synthetic.ensure(path, alpro_pretrain.get_config("tiny").data.synthetic)
  return path


def test_synthetic_images_are_still_one_frame_clips_without_motion(corpus):
  clips = [records.example_to_dict(r) for f in records.split_files(corpus, synthetic.IMAGE_SPLIT)
           for r in records.read_records(f)]
  assert len(clips) == alpro_pretrain.get_config("tiny").data.synthetic.num_images
  phrases = [p for verbs, parts in synthetic.MOTION_PHRASES.values() for p in verbs + parts]
  for c in clips:
    objects = json.loads(c["synthetic/attributes"][0])
    assert c[records.NUM_FRAMES] == [1] and len(c[records.FRAMES]) == 1
    assert all(o["motion"] == "still" for o in objects)
    assert c[records.ENTITIES] == [o["shape"].encode() for o in objects]
    for cap in (x.decode() for x in c[records.CAPTIONS]):
      words = set(cap.replace(":", " ").split())
      assert not any(f" {p} " in f" {cap} " for p in phrases), cap
      for o in objects:
        assert o["shape"] in words and o["colour"] in words, cap
    assert Image.open(io.BytesIO(c[records.FRAMES][0])).size == (32, 32)
  held = {tuple(p) for p in synthetic.heldout_pairs(0)}
  assert not any((o["shape"], o["colour"]) in held for c in clips
                 for o in json.loads(c["synthetic/attributes"][0]))


def _config(corpus):
  c = alpro_pretrain.get_config("tiny")
  c.data.dir = corpus
  return c


def test_train_loader_mixes_video_and_image_batches_and_resumes(tmp_path, corpus):
  c = _config(corpus)
  text = setup.text_info(c, corpus)
  loader = setup.stream_loader(c, corpus, text, MIXED, 8)
  assert isinstance(loader, mixture.MixtureLoader)
  batches = [next(loader) for _ in range(8)]
  kinds = [bool(b["is_image"][0]) for b in batches]
  assert kinds == [mixture.is_image_step(c.seed, s, 0.5) for s in range(8)]
  assert True in kinds and False in kinds
  for b, image in zip(batches, kinds):
    assert b["is_image"].all() == image and b["is_image"].any() == image
    same_frames = np.all(b["video"] == b["video"][:, :1], axis=(1, 2, 3, 4))
    if image:  # the one stored frame is repeated to num_frames
      assert same_frames.all()
      assert all(v.startswith(b"shapes-images-") for v in b["video_id"])
    else:
      assert not same_frames.all()
      assert all(v.startswith(b"shapes-train-") for v in b["video_id"])
  loader.save(str(tmp_path / "it"))
  ref = [next(loader) for _ in range(4)]
  again = setup.stream_loader(c, corpus, text, MIXED, 8)
  again.restore(str(tmp_path / "it"))
  for a, b in zip(ref, [next(again) for _ in range(4)]):
    for k in ("video", "text_ids", "mlm_ids", "is_image", "video_id"):
      np.testing.assert_array_equal(a[k], b[k])


def test_ratio_zero_is_the_plain_video_loader_and_random_data_mixes_too(corpus):
  c = _config(corpus)
  c.data.image_ratio = 0.0
  plain = setup.stream_loader(c, corpus, setup.text_info(c, corpus), MIXED, 8)
  assert not isinstance(plain, mixture.MixtureLoader) and "is_image" not in next(plain)
  r = alpro_pretrain.get_config("tiny")
  r.data.source = "random"
  r.model.text.vocab_size = 64
  rand = setup.stream_loader(r, None, setup.text_info(r, None), MIXED, 8)
  kinds = [bool(next(rand)["is_image"][0]) for _ in range(6)]
  assert kinds == [mixture.is_image_step(r.seed, s, 0.5) for s in range(6)]
  bad = _config(corpus)
  bad.data.image_split = "nope"
  with pytest.raises(FileNotFoundError, match="nope"):
    setup.stream_loader(bad, corpus, setup.text_info(bad, corpus), MIXED, 8)
