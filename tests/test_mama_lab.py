"""MAMA's synthetic lab: the corpus's long-tail and caption-noise knobs, the simulated LVLM
captioner, and the per-frequency-bucket recall."""
import collections
import json
import os

import numpy as np
import pytest

from vlp_jax.data import records, setup, synthetic
from vlp_jax.methods.mama import lab

SIZES = dict(num_val=4, num_test=4, num_test_unseen=2, num_frames=2, image_size=32,
             num_shards=1)


def _by_id(d, split="train"):
  out = {}
  for f in records.split_files(d, split):
    for r in records.read_records(f):
      ex = records.example_to_dict(r)
      vid = ex[records.VIDEO_ID][0]
      out[vid.decode() if isinstance(vid, bytes) else vid] = ex
  return out


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
  root = tmp_path_factory.mktemp("lab")
  clean, noisy = str(root / "clean"), str(root / "noisy")
  synthetic.generate(clean, seed=3, num_train=300, topic_zipf=1.2, **SIZES)
  summary = synthetic.generate(noisy, seed=3, num_train=300, topic_zipf=1.2, caption_noise=0.3,
                               **SIZES)
  return clean, noisy, summary


def test_caption_noise_replaces_only_the_listed_clips_captions(corpora):
  clean, noisy, summary = corpora
  with open(os.path.join(noisy, synthetic.NOISY_IDS_FILE)) as f:
    listed = {line.strip() for line in f if line.strip()}
  assert summary["noisy_train"] == len(listed) and 0.2 * 300 < len(listed) < 0.4 * 300
  a, b = _by_id(clean), _by_id(noisy)
  assert set(a) == set(b)
  changed = {vid for vid in a if a[vid][records.CAPTIONS] != b[vid][records.CAPTIONS]}
  assert changed == listed
  all_clean_captions = [tuple(x[records.CAPTIONS]) for x in a.values()]
  for vid in listed:  # another training clip's captions; frames and attributes its own
    assert tuple(b[vid][records.CAPTIONS]) in all_clean_captions
    assert b[vid][records.FRAMES] == a[vid][records.FRAMES]
    assert b[vid][lab.ATTRIBUTES] == a[vid][lab.ATTRIBUTES]
  assert not os.path.exists(os.path.join(clean, synthetic.NOISY_IDS_FILE))


def test_topic_zipf_makes_a_long_tail_in_train_only(corpora):
  clean, _, _ = corpora
  counts = collections.Counter(lab.topic(o) for _, o in lab.clip_attributes(clean, "train"))
  uniform = 1 / len(synthetic.topics(synthetic.heldout_pairs(3)))
  top = counts.most_common(1)[0][1] / 300
  assert top > 8 * uniform  # Zipf(1.2) over 56 topics: ~28 % for the first, vs 1.8 %
  w = synthetic.topic_weights(3, synthetic.heldout_pairs(3), 1.2)
  assert w.sum() == pytest.approx(1.0) and sorted(w)[-1] / sorted(w)[-2] == pytest.approx(2 ** 1.2)
  assert np.allclose(synthetic.topic_weights(3, synthetic.heldout_pairs(3), 0.0), uniform)
  with pytest.raises(ValueError, match="caption_noise"):
    synthetic.generate(clean + "_bad", seed=3, num_train=4, caption_noise=1.0, **SIZES)


def test_standin_captioner_names_the_true_attributes_at_its_error_rate(corpora, tmp_path):
  clean, _, _ = corpora
  truth = dict(lab.clip_attributes(clean, "train"))
  exact = lab.standin_captions(clean, "train", str(tmp_path / "exact.jsonl"), error_rate=0.0)
  assert exact["captioned"] == 300 and exact["wrong"] == 0
  side = setup.read_captions(str(tmp_path / "exact.jsonl"))
  assert set(side) == set(truth)
  for vid, (caption,) in side.items():
    o = truth[vid][0]
    assert caption.startswith("a video of a ") and f"{o['colour']} {o['shape']}" in caption
  noisy = lab.standin_captions(clean, "train", str(tmp_path / "noisy.jsonl"), error_rate=0.5,
                               seed=1)
  assert 0.4 * 300 < noisy["wrong"] < 0.6 * 300
  with open(tmp_path / "noisy.jsonl") as f:
    row = json.loads(f.readline())
  assert row["captioner"] == "lvlm_standin(error_rate=0.5)" and row["seed"] == 1
  with pytest.raises(ValueError, match="error_rate"):
    lab.standin_captions(clean, "train", str(tmp_path / "x.jsonl"), error_rate=1.5)


def test_frequency_buckets_and_bucket_recall_on_a_hand_made_case():
  a, b, c = ("circle", "red"), ("star", "blue"), ("ring", "pink")
  buckets = lab.frequency_buckets([a] * 10 + [b] * 5 + [c], [a, b, c, c])
  assert buckets == {c: 0, b: 1, a: 2}
  # Queries (1-based ranks): a found first, b fourth, c once first once second.
  got = lab.bucket_recall(np.array([1, 4, 1, 2]), [a, b, c, c], buckets)
  assert got == [50.0, 0.0, 100.0]
  with pytest.raises(ValueError, match="4 ranks for 3"):
    lab.bucket_recall(np.zeros(4, int), [a, b, c], buckets)
