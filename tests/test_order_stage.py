"""The label-free order stage: shifted views, the masked reversal InfoNCE against numpy, the
stage recipe (order -> prompter -> pre-training on one corpus) and the warm start it feeds."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import alpro_pretrain, alpro_prompter, alpro_qa, alpro_retrieval
from helpers import override, tiny_config
from vlp_jax.core.trainer import Trainer
from vlp_jax.data.setup import TextInfo
from vlp_jax.losses import reversal_nce
from vlp_jax.losses.reversal_nce import shifted_views
from vlp_jax.methods.alpro import order as order_lib
from vlp_jax.methods.alpro import pretrain as pretrain_lib


def _lse(x):
  x = np.asarray(x, np.float64)
  return float(x.max() + np.log(np.sum(np.exp(x - x.max()))))


def _np_nce(q, pos, rev, temp):
  """Per-row loss and argmax hit of the reversal InfoNCE, float64 loops."""
  keys = np.concatenate([pos, rev]).astype(np.float64)
  per, hits = [], []
  for i in range(len(q)):
    logits = [float(np.dot(q[i], k)) / temp for k in keys]
    per.append(_lse(logits) - logits[i])
    hits.append(int(np.argmax(logits)) == i)
  return np.asarray(per), np.asarray(hits, np.float64)


def test_shifted_views_move_each_clip_by_one_offset_on_every_frame():
  rng = np.random.default_rng(0)
  video = rng.normal(size=(6, 3, 9, 11, 2)).astype(np.float32)
  out = np.asarray(shifted_views(jax.random.PRNGKey(1), jnp.asarray(video), 2))
  assert out.shape == video.shape and out.dtype == video.dtype
  padded = np.pad(video, ((0, 0), (0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
  offsets = []
  for i in range(len(video)):
    hits = [(y, x) for y in range(5) for x in range(5)
            if np.array_equal(out[i], padded[i, :, y:y + 9, x:x + 11])]
    assert len(hits) == 1, f"clip {i}: {hits}"  # one offset, the same on all frames
    offsets.append(hits[0])
  assert len(set(offsets)) > 1  # each clip draws its own
  np.testing.assert_array_equal(shifted_views(jax.random.PRNGKey(1), jnp.asarray(video), 0),
                                video)
  with pytest.raises(ValueError, match="max_shift"):
    shifted_views(jax.random.PRNGKey(1), jnp.asarray(video), -1)


def test_reversal_nce_metrics_average_over_the_masked_rows():
  rng = np.random.default_rng(4)
  q, pos, rev = (rng.normal(size=(6, 8)) for _ in range(3))
  q, pos, rev = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (q, pos, rev))
  mask = np.array([True, False, True, True, False, True])
  per, m = reversal_nce(jnp.asarray(q), jnp.asarray(pos), jnp.asarray(rev), 0.2,
                        jnp.asarray(mask))
  want, hits = _np_nce(q, pos, rev, 0.2)
  np.testing.assert_allclose(per, want, rtol=1e-5, atol=1e-5)  # every row still computed
  assert float(m["order/acc"]) == pytest.approx(hits[mask].mean())
  assert float(m["order/reversal_cos"]) == pytest.approx(np.sum(q * rev, 1)[mask].mean(),
                                                         abs=1e-6)
  _, none = reversal_nce(jnp.asarray(q), jnp.asarray(pos), jnp.asarray(rev), 0.2,
                         jnp.zeros(6, bool))
  assert float(none["order/acc"]) == 0.0 and float(none["order/reversal_cos"]) == 0.0


def _order_task(**overrides):
  c = alpro_pretrain.order_stage(override(alpro_pretrain.get_config("tiny"),
                                          **{"order.steps": 4, **overrides}))
  return order_lib.OrderTask(c, TextInfo(None, 64))


def test_order_loss_matches_numpy_over_the_moving_clips():
  task = _order_task(**{"model.video.time_init_std": 1.0})
  d = task.config.data
  rng = np.random.default_rng(0)
  video = rng.normal(size=(6, d.num_frames, d.image_size, d.image_size, 3)).astype(np.float32)
  video[1] = video[1, :1]  # a still clip: every frame the same
  valid = np.array([True, True, True, True, True, False])  # the last row is padding
  params = nn.unbox(task.init_collections(jax.random.PRNGKey(0)))
  key = jax.random.PRNGKey(7)
  batches = {"train": {"video": jnp.asarray(video), "valid": jnp.asarray(valid)}}
  loss, m = task.loss(params, batches, key, train=True)

  # The same views by hand: the loss's shift key is the first of split(rng).
  shifted = np.asarray(shifted_views(jax.random.split(key)[0], jnp.asarray(video), 4))
  embed = lambda v: np.asarray(task.model.apply({"params": params["model"]}, jnp.asarray(v)),
                               np.float64)
  q, pos, rev = embed(video), embed(shifted), embed(video[:, ::-1])
  per, hits = _np_nce(q, pos, rev, 0.1)
  queries = np.array([True, False, True, True, True, False])
  assert float(loss) == pytest.approx(per[queries].mean(), rel=1e-4)
  assert float(m["loss/order"]) == pytest.approx(float(loss))
  assert float(m["order/moving_frac"]) == pytest.approx(4 / 6)
  assert float(m["order/acc"]) == pytest.approx(hits[queries].mean())
  assert float(m["order/reversal_cos"]) == pytest.approx(np.sum(q * rev, 1)[queries].mean(),
                                                         abs=1e-5)
  with pytest.raises(ValueError, match="order.temp"):
    _order_task(**{"order.temp": 0.0})


def test_order_blind_encoder_scores_reversal_cos_one():
  """Without temporal attention a clip and its reversal get one feature; with it they do not
  (the evaluator's figure, checked against the model applied directly)."""
  for temporal, blind in (("none", True), ("divided", False)):
    task = _order_task(**{"model.video.temporal": temporal, "model.video.time_init_std": 1.0})
    d = task.config.data
    video = np.random.default_rng(1).normal(
        size=(4, d.num_frames, d.image_size, d.image_size, 3)).astype(np.float32)
    params = nn.unbox(task.init_collections(jax.random.PRNGKey(0)))
    f = task._eval_features(params["model"], {"video": jnp.asarray(video)})
    e = np.asarray(task.model.apply({"params": params["model"]}, jnp.asarray(video)))
    r = np.asarray(task.model.apply({"params": params["model"]}, jnp.asarray(video[:, ::-1])))
    np.testing.assert_allclose(f["cos"], np.sum(e * r, 1), atol=1e-6)
    assert bool(np.all(f["moving"]))
    if blind:
      np.testing.assert_allclose(f["cos"], 1.0, atol=1e-5)
    else:
      assert float(np.min(f["cos"])) < 0.9999


def _with(c, **overrides):
  return override(copy.deepcopy(c), **overrides)


def test_stages_train_order_then_prompter_on_one_corpus(tmp_path):
  c = override(alpro_pretrain.get_config("tiny"),
               **{"order.steps": 3, "pem.warm_start": True, "loss.pem": 0.0})
  root = str(tmp_path / "w")
  (o_name, o_cfg, o_dir), (p_name, p_cfg, p_dir) = alpro_pretrain.stages(c, root)
  assert (o_name, o_dir, p_name, p_dir) == ("order", f"{root}/order", "prompter",
                                            f"{root}/prompter")
  assert o_cfg.task == "alpro_order" and o_cfg.num_steps == 3 == o_cfg.ckpt_every
  assert o_cfg.data.image_ratio == 0.0 and o_cfg.data.reverse_twins.rate == 0.0
  assert [(ev.type, ev.split) for ev in o_cfg.evals.values()] == [("order", "test")]
  assert p_cfg.task == "alpro" and p_cfg.order.dir == f"{root}/order"
  assert o_cfg.data.dir == p_cfg.data.dir == f"{root}/data"  # one corpus, WORKDIR/data
  assert c.data.dir == "" and c.order.dir == ""  # the run's own config is left alone
  # A given prompter needs no order stage when pre-training starts from it ...
  assert alpro_pretrain.stages(_with(c, **{"pem.prompter": "/p"}), root) == []
  # ... but a run without a prompter stage starts from the order stage itself.
  (name, _, _), = alpro_pretrain.stages(_with(c, **{"pem.warm_start": False}), root)
  assert name == "order"
  assert alpro_pretrain.stages(_with(c, **{"order.dir": "/o", "pem.warm_start": False}),
                               root) == []
  assert alpro_pretrain.stages(_with(c, **{"data.source": "random"}), root) == []
  # The standalone prompter config trains its order stage too; fine-tunes have none.
  (name, _, _), = alpro_prompter.stages(alpro_pretrain.prompter_stage(c), root)
  assert name == "order"
  assert alpro_retrieval.get_config("demo").order.steps == 0
  assert alpro_qa.get_config("demo").order.steps == 0
  # The README's demo command: order stage, then the prompter started from it.
  demo = alpro_pretrain.get_config("demo")
  names = [(n, sc.num_steps) for n, sc, _ in alpro_pretrain.stages(demo, root)]
  assert names == [("order", demo.order.steps), ("prompter", demo.pem.prompter_steps)]
  assert demo.order.steps > 0 and alpro_pretrain.get_config("base").order.steps == 0


def test_order_stage_trains_and_starts_the_prompter(tmp_path):
  data_dir = tmp_path / "data"
  c = tiny_config(data_dir, **{"order.steps": 2, "pem.warm_start": True, "loss.pem": 0.0,
                               "log_every": 1})
  root = str(tmp_path / "w")
  (_, o_cfg, o_dir), (_, p_cfg, p_dir) = alpro_pretrain.stages(c, root)
  # The prompter cannot start before the order stage exists: a clear error, not a fresh init.
  early = Trainer(p_cfg, p_dir).build()
  with pytest.raises(FileNotFoundError, match="order stage"):
    early.apply_init()
  early.checkpointer.close()

  order = Trainer(o_cfg, o_dir).build()
  order.fit()
  assert order.results["order"]["order/moving_frac"] > 0.5
  assert 0.0 < order.results["order"]["order/reversal_cos"] <= 1.0
  assert np.isfinite(order.results["train"]["loss"])
  want = jax.device_get(order.state.params["model"])
  order.checkpointer.close()

  prompter = Trainer(p_cfg, p_dir).build()
  fresh = jax.device_get(prompter.state.params["model"])
  assert prompter.apply_init()
  got = jax.device_get(prompter.state.params["model"])
  prompter.checkpointer.close()
  for a, b in zip(jax.tree.leaves(want["video_encoder"]), jax.tree.leaves(got["video_encoder"])):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(fresh["text_encoder"]), jax.tree.leaves(got["text_encoder"])):
    np.testing.assert_array_equal(a, b)  # only the video tower comes from the order stage
  assert "order_proj" not in got

  # Without a prompter stage, pre-training itself starts from the order stage.
  assert pretrain_lib.ALPROTask(_with(c, **{"pem.warm_start": False}),
                                TextInfo(None, 64)).warm_start(root) == o_dir
