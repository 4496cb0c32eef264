"""The supervised motion probe (vlp_jax/eval/motion_probe.py, launch/motion_probe.py)."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import alpro_pretrain
from vlp_jax.convert import timesformer as tsf_conv
from vlp_jax.eval import motion_probe
from vlp_jax.models.alpro import alpro_config
from vlp_jax.models.timesformer import TimesformerModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def clips():
  return motion_probe.render(72, seed=0, stored_frames=4, stored_size=32, num_frames=3,
                             image_size=32)


def _centre(frame):
  """Centroid (x, y) of the pixels that differ most from the frame's median colour."""
  d = np.abs(frame.astype(np.float32) - np.median(frame.reshape(-1, 3), 0)).sum(-1)
  ys, xs = np.nonzero(d > 0.5 * d.max())
  return xs.mean(), ys.mean(), len(xs)


def test_render_labels_match_what_the_frames_show(clips):
  assert clips["video"].shape == (72, 3, 32, 32, 3) and clips["video"].dtype == np.uint8
  assert set(np.unique(clips["motion"])) <= set(range(6)) and len(np.unique(clips["motion"])) == 6
  agree = []
  for video, m in zip(clips["video"], clips["motion"]):
    (x0, y0, a0), (x1, y1, a1) = _centre(video[0]), _centre(video[-1])
    # The first shape moves the way its label says (a second shape, in some clips, can move
    # the centroid of both the other way).
    agree.append({"left": x1 < x0, "right": x1 > x0, "up": y1 < y0, "down": y1 > y0,
                  "grows": a1 > a0, "shrinks": a1 < a0}[motion_probe.MOTIONS[m]])
  assert np.mean(agree) > 0.8, np.mean(agree)
  with pytest.raises(ValueError, match="exceeds the stored frames"):
    motion_probe.render(1, seed=0, stored_frames=2, stored_size=32, num_frames=4, image_size=32)


def _video_cfg(**kw):
  c = alpro_pretrain.get_config("tiny")
  c.model.video.update(num_frames=3, **kw)
  return alpro_config(c.model, 1).video


def test_an_order_blind_encoder_cannot_pass_both_directions(clips, tmp_path):
  """Without temporal modelling a clip and its reversal get the same prediction, so at most
  one of (clip, label) and (reversed clip, opposite label) is right: the two accuracies sum
  to at most 100. With divided attention they need not."""
  blind = motion_probe.run(_video_cfg(temporal="none"), clips, steps=6, batch_size=8, lr=3e-3,
                           seed=0, num_test=32, evals=2)
  assert blind["steps"] == [3, 6] and len(blind["loss"]) == 2
  assert all(0 <= a <= 100 for a in blind["motion_acc"] + blind["reversed_acc"])
  assert all(a + r <= 100.0 + 1e-6 for a, r in zip(blind["motion_acc"], blind["reversed_acc"]))
  both = motion_probe.run(_video_cfg(), clips, steps=4, batch_size=8, lr=3e-3, seed=0,
                          num_test=32, evals=1, tasks="motion+appearance")
  assert both["steps"] == [4] and np.isfinite(both["loss"]).all()
  # Colour and shape heads only: the encoder it returns, saved as a TimesformerModel
  # checkpoint, imports back to the same features.
  app = motion_probe.run(_video_cfg(), clips, steps=3, batch_size=8, lr=3e-3, seed=1,
                         num_test=32, evals=1, tasks="appearance")
  assert app["steps"] == [3] and np.isfinite(app["loss"]).all()
  fresh = nn.unbox(motion_probe._Probe(_video_cfg()).init(  # run's init for seed 1
      jax.random.PRNGKey(1), clips["video"][:2].astype(np.float32)))["params"]["TimesformerModel_0"]
  leaves = jax.tree.leaves(app["encoder"])
  assert all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in leaves)
  assert any(not np.allclose(a, b) for a, b in zip(leaves, jax.tree.leaves(fresh)))  # trained
  motion_probe.save_encoder(app["encoder"], _video_cfg(), str(tmp_path / "enc"))
  module, params = tsf_conv.import_timesformer(str(tmp_path / "enc"))
  x = jnp.asarray(clips["video"][:2], jnp.float32) / 255.0
  want = TimesformerModel(_video_cfg(), pool=False).apply({"params": app["encoder"]}, x)
  np.testing.assert_allclose(module.apply({"params": params}, x), want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="tasks"):
    motion_probe.run(_video_cfg(), clips, steps=1, batch_size=8, lr=1e-3, seed=0, tasks="x")
  with pytest.raises(ValueError, match="temporal_dense_init_std"):
    _video_cfg(temporal_dense_init_std=-0.1)
  with pytest.raises(ValueError, match="none for training"):
    motion_probe.run(_video_cfg(), clips, steps=1, batch_size=8, lr=1e-3, seed=0, num_test=72)


def test_order_task_needs_no_label_and_a_blind_encoder_cannot_use_it(clips):
  """The label-free "order" task: a shifted view keeps the motion; the linear probe reads
  direction from features that carry it; an order-blind encoder maps a clip and its reversal
  to one feature (reversal_cos 1), so its probe cannot pass both directions."""
  rng = np.random.default_rng(0)
  video = rng.integers(0, 255, (6, 3, 10, 12, 3)).astype(np.uint8)
  shifted = motion_probe._shift(video, rng, 2)
  padded = np.pad(video, ((0, 0), (0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
  offsets = []
  for p, b in zip(padded, shifted):  # exactly one (dy, dx) in [-2, 2]^2 for all frames
    hits = [(y, x) for y in range(5) for x in range(5)
            if np.array_equal(p[:, y:y + 10, x:x + 12], b)]
    assert len(hits) == 1
    offsets.append(hits[0])
  assert len(set(offsets)) > 1  # each clip draws its own
  # Features that hold the motion's class (plus noise): the probe reads it, on the reversed
  # set too when the reversed features hold the opposite class.
  y = np.arange(120) % 6
  h = np.eye(6)[y] * 3.0 + rng.normal(size=(120, 6)) * 0.1
  assert motion_probe._linear_probe(h[:90], y[:90], [(h[90:], y[90:]), (h[90:], y[90:] ^ 1)]) \
      == [100.0, 0.0]
  blind = motion_probe.run(_video_cfg(temporal="none"), clips, steps=4, batch_size=8, lr=3e-3,
                           seed=0, num_test=32, evals=2, tasks="order", max_shift=2)
  assert blind["steps"] == [2, 4] and np.isfinite(blind["loss"]).all()
  np.testing.assert_allclose(blind["reversal_cos"], 1.0, atol=2e-6)
  assert all(a + r <= 100.0 + 1e-6 for a, r in zip(blind["motion_acc"], blind["reversed_acc"]))
  # Divided attention with a non-zero temporal projection sees frame order from the start.
  seeing = motion_probe.run(_video_cfg(temporal_dense_init_std=0.1, time_init_std=1.0), clips,
                            steps=4, batch_size=8, lr=3e-3, seed=0, num_test=32, evals=1,
                            tasks="order", max_shift=2)
  assert seeing["reversal_cos"][0] < 1.0 - 1e-5
  with pytest.raises(ValueError, match="max_shift"):
    motion_probe.run(_video_cfg(), clips, steps=1, batch_size=8, lr=1e-3, seed=0,
                     tasks="order", max_shift=-1)


def test_launch_motion_probe_prints_a_summary(tmp_path):
  cmd = [sys.executable, "-m", "launch.motion_probe", "--config=configs/alpro_pretrain.py:tiny",
         "--steps=2", "--seeds=0,1", "--num_clips=40", "--config.batch_size=4",
         f"--save={tmp_path}"]
  res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  lines = [json.loads(x) for x in res.stdout.strip().splitlines() if x.startswith("{")]
  assert [x["seed"] for x in lines[:-1]] == [0, 1]
  summary = lines[-1]
  finals = [x["motion_acc"][-1] for x in lines[:-1]]
  assert summary["motion_acc_mean"] == pytest.approx(np.mean(finals), abs=0.01)
  assert summary["motion_acc_std"] == pytest.approx(np.std(finals, ddof=1), abs=0.01)
  assert sorted(os.listdir(tmp_path)) == ["seed_0", "seed_1"]
  assert sorted(os.listdir(tmp_path / "seed_0")) == ["config.json", "model.safetensors"]
  bad = subprocess.run(cmd[:4] + ["--seeds=a"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert bad.returncode != 0 and "--seeds" in bad.stderr
