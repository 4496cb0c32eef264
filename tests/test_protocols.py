"""Tests of vlp_jax.eval.classification and vlp_jax.data.protocols against naive loops."""
import math

import numpy as np
import pytest

from vlp_jax.data import protocols
from vlp_jax.eval import classification as cls

# ---------------------------------------------------------------------------- metrics


def _naive_topk_sorted(scores, labels, k):
  """Top-k by sorting; only right without ties (continuous random scores)."""
  hits = [labels[i] in np.argsort(-scores[i])[:k] for i in range(len(labels))]
  return 100.0 * sum(hits) / len(labels)


def _naive_topk_ties(scores, labels, k):
  """The documented rule: correct iff fewer than k other classes score >= the label."""
  hits = 0
  for i in range(len(labels)):
    y = labels[i]
    others = sum(1 for j in range(scores.shape[1]) if j != y and scores[i, j] >= scores[i, y])
    hits += others <= k - 1
  return 100.0 * hits / len(labels)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3, 5, 11])
def test_topk_accuracy_matches_sorting_on_random_scores(seed, k):
  rng = np.random.default_rng(seed)
  scores = rng.normal(size=(60, 11)).astype(np.float32)
  labels = rng.integers(0, 11, size=60)
  # Make the accuracy non-trivial: nudge the label's score up for some samples.
  scores[np.arange(60), labels] += rng.uniform(0, 2, size=60).astype(np.float32)
  got = cls.topk_accuracy(scores, labels, k)
  assert isinstance(got, float)
  assert got == pytest.approx(_naive_topk_sorted(scores, labels, k), abs=1e-9)
  if k == 11:
    assert got == 100.0


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_topk_accuracy_ties_match_naive_loop(seed, k):
  rng = np.random.default_rng(seed)
  scores = rng.integers(0, 3, size=(50, 6)).astype(np.float64)  # many ties
  labels = rng.integers(0, 6, size=50)
  assert cls.topk_accuracy(scores, labels, k) == pytest.approx(
      _naive_topk_ties(scores, labels, k), abs=1e-9)


def test_topk_accuracy_hand_case_with_ties():
  scores = np.array([[1, 1, 0],   # label 0 ties with class 1: top-2, not top-1
                     [2, 1, 1],   # label 1 below 0, tied with 2: top-3 only
                     [0, 0, 0],   # all tied: top-3 only
                     [3, 2, 2]],  # label 0 strictly best
                    np.float32)
  labels = np.array([0, 1, 2, 0])
  assert cls.topk_accuracy(scores, labels, 1) == 25.0
  assert cls.topk_accuracy(scores, labels, 2) == 50.0
  assert cls.topk_accuracy(scores, labels, 3) == 100.0
  # Same answer whatever the column order (no dependence on a sort's tie breaking).
  perm = np.array([2, 0, 1])
  inv = np.argsort(perm)
  assert cls.topk_accuracy(scores[:, perm], inv[labels], 1) == 25.0
  assert cls.topk_accuracy(scores[:, perm], inv[labels], 2) == 50.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mean_class_accuracy_matches_loop(seed):
  rng = np.random.default_rng(seed)
  c = 9
  # Imbalanced, and classes 7 and 8 never occur.
  labels = rng.choice(7, size=80, p=np.array([20, 10, 5, 5, 3, 2, 1]) / 46)
  scores = rng.normal(size=(80, c))
  scores[np.arange(80), labels] += 1.0
  per_class = []
  for y in range(c):
    rows = [i for i in range(80) if labels[i] == y]
    if rows:
      per_class.append(np.mean([np.argmax(scores[i]) == y for i in rows]))
  want = 100.0 * np.mean(per_class)
  assert cls.mean_class_accuracy(scores, labels) == pytest.approx(want, abs=1e-9)
  assert cls.mean_class_accuracy(scores, labels, num_classes=c) == pytest.approx(want)


def test_mean_class_accuracy_hand_case_and_ties():
  # Class 0: 3 of 3 right; class 1: its one sample ties with class 0 -> wrong.
  scores = np.array([[2.0, 0.0], [1.0, 0.0], [3.0, 1.0], [0.5, 0.5]])
  labels = np.array([0, 0, 0, 1])
  assert cls.mean_class_accuracy(scores, labels) == 50.0
  assert cls.topk_accuracy(scores, labels, 1) == 75.0
  with pytest.raises(ValueError, match="num_classes=3"):
    cls.mean_class_accuracy(scores, labels, num_classes=3)


def test_action_metrics_keys_and_top5_clamped():
  scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.3, 0.3, 0.4]])
  labels = np.array([1, 2, 0])
  m = cls.action_metrics(scores, labels)
  assert sorted(m) == ["action/mean_class", "action/top1", "action/top5"]
  assert m["action/top1"] == pytest.approx(100 / 3)
  assert m["action/top5"] == 100.0  # C = 3 < 5: top-3
  assert m["action/mean_class"] == pytest.approx(100 / 3)
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(40, 12))
  labels = rng.integers(0, 12, size=40)
  m = cls.action_metrics(scores, labels)
  assert m["action/top5"] == pytest.approx(_naive_topk_sorted(scores, labels, 5))


def test_metric_input_errors():
  scores = np.zeros((2, 3))
  with pytest.raises(ValueError, match="outside"):
    cls.topk_accuracy(scores, np.array([0, 3]), 1)
  with pytest.raises(ValueError, match="k must be"):
    cls.topk_accuracy(scores, np.array([0, 1]), 4)
  with pytest.raises(ValueError, match="NaN"):
    cls.topk_accuracy(np.array([[np.nan, 0.0, 0.0], [0, 0, 0]]), np.array([0, 1]), 1)
  with pytest.raises(ValueError, match="shape"):
    cls.topk_accuracy(scores, np.array([0, 1, 2]), 1)


@pytest.mark.parametrize("seed", [0, 1])
def test_opposite_accuracy_matches_a_naive_loop(seed):
  rng = np.random.default_rng(seed)
  scores = rng.integers(0, 3, (60, 6)).astype(float)  # many ties: they count against
  labels = rng.integers(0, 6, 60)
  pairs = [(0, 1), (4, 2)]
  opposite = {0: 1, 1: 0, 4: 2, 2: 4}
  rows = [i for i in range(60) if labels[i] in opposite]
  hits = [scores[i, labels[i]] > scores[i, opposite[labels[i]]] for i in rows]
  assert cls.opposite_accuracy(scores, labels, pairs) == pytest.approx(
      100.0 * sum(hits) / len(rows))


def test_opposite_accuracy_hand_case_and_errors():
  scores = np.array([[2.0, 1.0, 9.0], [2.0, 1.0, 0.0], [0.0, 0.0, 5.0], [0.0, 0.0, 5.0]])
  # clip 0 (class 0) beats 1; clip 1 (class 1) loses to 0; clip 2 ties (against); clip 3 is
  # of the unpaired class 2 and does not count.
  assert cls.opposite_accuracy(scores, np.array([0, 1, 1, 2]), [(0, 1)]) == pytest.approx(
      100 / 3)
  with pytest.raises(ValueError, match="no clip"):
    cls.opposite_accuracy(scores, np.array([2, 2, 2, 2]), [(0, 1)])
  with pytest.raises(ValueError, match="two pairs"):
    cls.opposite_accuracy(scores, np.array([0, 1, 1, 2]), [(0, 1), (1, 2)])
  with pytest.raises(ValueError, match="outside"):
    cls.opposite_accuracy(scores, np.array([0, 1, 1, 2]), [(0, 3)])


def test_harmonic_mean_hand_values():
  assert cls.harmonic_mean(0, 0) == 0.0
  assert cls.harmonic_mean(100, 0) == 0.0
  assert cls.harmonic_mean(50, 50) == 50.0
  assert cls.harmonic_mean(80, 40) == pytest.approx(160 / 3)
  assert cls.harmonic_mean(90, 60) == pytest.approx(72.0)
  with pytest.raises(ValueError):
    cls.harmonic_mean(-1, 50)
  m = cls.base_to_novel_metrics(80, 40)
  assert m == {"openset/seen_top1": 80.0, "openset/unseen_top1": 40.0,
               "openset/hm": pytest.approx(160 / 3)}


def test_aggregate_episodes():
  m = cls.aggregate_episodes([50.0, 60.0, 70.0])
  assert m["fewshot/top1"] == pytest.approx(60.0)
  assert m["fewshot/top1_std"] == pytest.approx(math.sqrt(200 / 3))  # ddof=0
  assert m["fewshot/episodes"] == 3 and isinstance(m["fewshot/episodes"], int)
  assert cls.aggregate_episodes([42.0])["fewshot/top1_std"] == 0.0
  with pytest.raises(ValueError):
    cls.aggregate_episodes([])

# ---------------------------------------------------------------------------- few-shot


def _labels(counts):
  """Shuffled labels with counts[c] samples of class c."""
  labels = np.repeat(np.arange(len(counts)), counts)
  return np.random.default_rng(123).permutation(labels)


def test_episodes_structure():
  labels = _labels([12, 9, 30, 8, 15, 10, 3, 20])  # class 6 (3 samples) is not eligible
  eps = protocols.sample_episodes(labels, n_way=5, k_shot=3, n_query=4, num_episodes=40,
                                  seed=0)
  assert len(eps) == 40
  seen_classes = set()
  for ep in eps:
    assert ep.classes.shape == (5,) and len(set(ep.classes.tolist())) == 5
    assert 6 not in ep.classes
    assert np.all(np.diff(ep.classes) > 0)
    assert ep.support.shape == (15,) and ep.query.shape == (20,)
    assert not set(ep.support.tolist()) & set(ep.query.tolist())
    assert len(set(ep.support.tolist())) == 15 and len(set(ep.query.tolist())) == 20
    np.testing.assert_array_equal(ep.support_labels, np.repeat(np.arange(5), 3))
    np.testing.assert_array_equal(ep.query_labels, np.repeat(np.arange(5), 4))
    # Episode-local labels point at the right global class.
    np.testing.assert_array_equal(labels[ep.support], ep.classes[ep.support_labels])
    np.testing.assert_array_equal(labels[ep.query], ep.classes[ep.query_labels])
    for i in range(5):
      assert np.sum(ep.support_labels == i) == 3 and np.sum(ep.query_labels == i) == 4
    assert not ep.support.flags.writeable
    seen_classes.update(ep.classes.tolist())
  assert seen_classes == {0, 1, 2, 3, 4, 5, 7}


def test_episodes_determinism_and_seeds():
  labels = _labels([10] * 12)
  args = dict(n_way=5, k_shot=1, n_query=5, num_episodes=6)
  a = protocols.sample_episodes(labels, seed=3, **args)
  b = protocols.sample_episodes(labels, seed=3, **args)
  c = protocols.sample_episodes(labels, seed=4, **args)
  prefix = protocols.sample_episodes(labels, seed=3, **{**args, "num_episodes": 2})
  fields = ("classes", "support", "support_labels", "query", "query_labels")
  for x, y in zip(a, b):
    for f in fields:
      np.testing.assert_array_equal(getattr(x, f), getattr(y, f))
  for x, y in zip(prefix, a):
    np.testing.assert_array_equal(x.support, y.support)
  assert any(not np.array_equal(x.support, y.support) for x, y in zip(a, c))
  # Episodes within one run differ too.
  assert len({tuple(e.support.tolist()) for e in a}) == len(a)


def test_episodes_too_few_classes():
  labels = _labels([10, 10, 4, 10, 2])
  with pytest.raises(ValueError, match=r"only 3 of the 5 classes.*largest has 10"):
    protocols.sample_episodes(labels, n_way=4, k_shot=2, n_query=3, num_episodes=1, seed=0)
  # n_way = 3 fits exactly the eligible classes.
  ep, = protocols.sample_episodes(labels, n_way=3, k_shot=2, n_query=3, num_episodes=1,
                                  seed=0)
  assert ep.classes.tolist() == [0, 1, 3]


def test_kshot_subset_counts_and_errors():
  labels = _labels([7, 5, 9, 6])
  idx = protocols.kshot_subset(labels, 5, seed=0)
  assert idx.dtype == np.int64 and len(idx) == 20 and len(set(idx.tolist())) == 20
  assert np.all(np.diff(idx) > 0)
  np.testing.assert_array_equal(np.bincount(labels[idx]), [5, 5, 5, 5])
  np.testing.assert_array_equal(idx, protocols.kshot_subset(labels, 5, seed=0))
  assert not np.array_equal(protocols.kshot_subset(labels, 2, seed=0),
                            protocols.kshot_subset(labels, 2, seed=1))
  with pytest.raises(ValueError, match="class 1 has 5 samples, fewer than k=6"):
    protocols.kshot_subset(labels, 6, seed=0)
  with pytest.raises(ValueError, match="class 4 has 0 samples"):
    protocols.kshot_subset(labels, 2, seed=0, num_classes=5)

# ---------------------------------------------------------------------------- open set


@pytest.mark.parametrize("c,frac,seen", [(4, 0.75, 3), (10, 0.5, 5), (101, 0.75, 76),
                                         (400, 0.5, 200), (5, 0.5, 3)])
def test_openset_splits(c, frac, seen):
  splits = protocols.openset_splits(c, frac, num_draws=4, seed=0)
  assert len(splits) == 4
  for s, u in splits:
    assert len(s) == seen and len(u) == c - seen
    assert not set(s.tolist()) & set(u.tolist())
    np.testing.assert_array_equal(np.sort(np.concatenate([s, u])), np.arange(c))
    assert np.all(np.diff(s) > 0) and np.all(np.diff(u) > 0)
  assert len({tuple(s.tolist()) for s, _ in splits}) == 4
  again = protocols.openset_splits(c, frac, num_draws=4, seed=0)
  for (s, u), (s2, u2) in zip(splits, again):
    np.testing.assert_array_equal(s, s2)
    np.testing.assert_array_equal(u, u2)


def test_openset_splits_names_and_limits():
  names = ["a", "b", "c", "d"]
  splits = protocols.openset_splits(names, 0.75, num_draws=4, seed=1)
  # The 4 draws are the 4 distinct ways to hold one class out.
  assert sorted(u.tolist() for _, u in splits) == [[0], [1], [2], [3]]
  with pytest.raises(ValueError, match=r"num_draws must be in \[1, 4\]"):
    protocols.openset_splits(names, 0.75, num_draws=5, seed=1)
  with pytest.raises(ValueError, match="more than once"):
    protocols.openset_splits(["a", "b", "a"], 0.5, num_draws=1, seed=0)


def test_read_split_file(tmp_path):
  names = ["archery", "playing guitar", "juggling", "surfing"]
  path = tmp_path / "seen.txt"
  path.write_text("# seen classes\n\nsurfing\n  playing guitar  \narchery\n")
  np.testing.assert_array_equal(protocols.read_split_file(path, names), [3, 1, 0])
  path.write_text("surfing\n# c\nplaing guitar\n")
  with pytest.raises(ValueError) as e:
    protocols.read_split_file(path, names)
  assert str(e.value) == (f"{path}:3: unknown class name 'plaing guitar'; "
                          "did you mean 'playing guitar'?")
  path.write_text("surfing\nzzqx\n")
  with pytest.raises(ValueError, match=r"seen\.txt:2: unknown class name 'zzqx'$"):
    protocols.read_split_file(path, names)

# ---------------------------------------------------------------------------- windows


def _step_of(idx):
  steps = set(np.diff(idx).tolist())
  assert len(steps) == 1, idx
  return steps.pop()


def test_sample_window_steps_and_range():
  rng = np.random.default_rng(0)
  steps, starts = set(), set()
  for _ in range(400):
    idx = protocols.sample_window(40, 8, rng)
    assert idx.dtype == np.int32 and idx.shape == (8,)
    assert idx.min() >= 0 and idx.max() < 40
    step = _step_of(idx)
    steps.add(step)
    starts.add((step, int(idx[0])))
  assert steps == {1, 2, 3, 4}
  # Step 4 spans 29 frames: its offsets cover exactly 0 .. 11.
  assert {s for st, s in starts if st == 4} == set(range(12))
  assert max(s for st, s in starts if st == 1) <= 32


def test_sample_window_falls_back_to_smaller_steps():
  rng = np.random.default_rng(1)
  # 16 frames, length 8: steps 1 (span 8) and 2 (span 15) fit; 3 (22) and 4 (29) do not,
  # so 3 and 4 fall back to 2.
  counts = {1: 0, 2: 0}
  for _ in range(400):
    counts[_step_of(protocols.sample_window(16, 8, rng))] += 1
  assert counts[1] > 50 and counts[2] > counts[1]
  # 10 frames: only step 1 fits; with strides (1/2, 1/4) step 1 is the last resort.
  for strides in (protocols.DEFAULT_STRIDES, (0.5, 0.25)):
    for _ in range(20):
      idx = protocols.sample_window(10, 8, rng, strides=strides)
      assert _step_of(idx) == 1 and 0 <= idx[0] <= 2
  with pytest.raises(ValueError, match="1/n"):
    protocols.sample_window(10, 8, rng, strides=(0.4,))


def test_sample_window_short_clip_rule():
  rng = np.random.default_rng(0)
  state = rng.bit_generator.state
  idx = protocols.sample_window(3, 5, rng)
  np.testing.assert_array_equal(idx, [0, 0, 1, 2, 2])
  assert idx.dtype == np.int32
  assert rng.bit_generator.state == state  # no draw
  np.testing.assert_array_equal(protocols.sample_window(1, 4, rng), [0, 0, 0, 0])
  np.testing.assert_array_equal(protocols.sample_window(5, 5, rng), np.arange(5))
  idx = protocols.sample_window(7, 16, rng)
  assert idx[0] == 0 and idx[-1] == 6 and np.all(np.diff(idx) >= 0)
  assert set(idx.tolist()) == set(range(7))


def test_eval_windows():
  w = protocols.eval_windows(100, 8, 5)
  assert w.shape == (5, 8) and w.dtype == np.int32
  np.testing.assert_array_equal(w[:, 0], [0, 23, 46, 69, 92])
  assert w[0, 0] == 0 and w[-1, -1] == 99
  np.testing.assert_array_equal(np.diff(w, axis=1), np.ones((5, 7)))
  w = protocols.eval_windows(10, 8, 3)  # overlapping
  np.testing.assert_array_equal(w[:, 0], [0, 1, 2])
  assert w[-1, -1] == 9
  np.testing.assert_array_equal(protocols.eval_windows(50, 8, 1), [np.arange(8)])
  w = protocols.eval_windows(3, 5, 4)  # short clip: every window is the spread
  assert w.shape == (4, 5)
  np.testing.assert_array_equal(w, np.tile([0, 0, 1, 2, 2], (4, 1)))
