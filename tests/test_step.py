"""The default update: gradient accumulation, frozen pytrees, decay mask, schedule, metrics."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlp_jax.core import optim
from vlp_jax.core import update as update_lib
from vlp_jax.core.state import TrainState


def _regression(params, batches, rng, *, train, frozen=None):
  del rng, train
  p, batch = params["model"], batches["train"]
  offset = 0.0 if frozen is None else frozen["offset"]
  pred = batch["x"] @ p["w"] + p["b"] + offset
  loss = jnp.mean((pred - batch["y"]) ** 2)
  return loss, {"loss/mse": loss}


def _state(tx):
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros((2,))}
  return TrainState(step=jnp.zeros((), jnp.int32), params={"model": params},
                    opt_state={"model": tx.init(params)}, rng=jax.random.PRNGKey(0))


def _update(tx, accum):
  return update_lib.make_default_update(_regression, {"model": tx}, {"model": lambda s: 0.1},
                                        accum)


def test_grad_accumulation_equals_full_batch():
  rng = np.random.default_rng(0)
  batch = {"train": {"x": rng.normal(size=(8, 3)).astype(np.float32),
                     "y": rng.normal(size=(8, 2)).astype(np.float32)}}
  tx = optax.sgd(0.1)
  full, m_full = jax.jit(_update(tx, 1))(_state(tx), batch)
  acc, m_acc = jax.jit(_update(tx, 4))(_state(tx), batch)
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(acc.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  assert float(m_acc["loss"]) == pytest.approx(float(m_full["loss"]), rel=1e-6)
  assert int(acc.step) == 1 and bool(m_acc["finite"])
  # The update really moved the params (a no-op step would also "match").
  assert not np.allclose(full.params["model"]["w"], 1.0)


def test_frozen_params_are_read_but_not_trained():
  rng = np.random.default_rng(1)
  batch = {"train": {"x": rng.normal(size=(8, 3)).astype(np.float32),
                     "y": rng.normal(size=(8, 2)).astype(np.float32)}}
  tx = optax.adam(0.1)
  frozen = {"offset": jnp.asarray([2.0, -1.0])}
  step = jax.jit(_update(tx, 2))
  state, m = step(_state(tx), batch, frozen)
  # The loss saw the offset: same value as a loss with it folded into the targets.
  shifted = {"train": dict(batch["train"],
                           y=batch["train"]["y"] - np.asarray([2.0, -1.0], np.float32))}
  ref, m_ref = step(_state(tx), shifted)
  assert float(m["loss"]) == pytest.approx(float(m_ref["loss"]), rel=1e-6)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  # No optimizer state for it, and the optimizer state matches the trainable params only.
  assert jax.tree.structure(state.opt_state["model"]) == jax.tree.structure(
      tx.init(state.params["model"]))
  assert "offset" not in str(jax.tree_util.tree_structure(state.opt_state))


def test_micro_batches_are_strided():
  x = np.arange(8)[:, None]
  micro = update_lib.split_micro({"x": x}, 2)["x"]
  np.testing.assert_array_equal(micro[0, :, 0], [0, 2, 4, 6])
  np.testing.assert_array_equal(micro[1, :, 0], [1, 3, 5, 7])
  with pytest.raises(ValueError, match="does not split"):
    update_lib.split_micro({"x": np.zeros((6, 1))}, 4)


def test_decay_mask_and_schedule():
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,)), "temp": jnp.ones(()),
            "emb": jnp.ones((5, 2))}
  assert optim.decay_mask(params) == {"kernel": True, "bias": False, "temp": False, "emb": True}
  assert optim.decay_mask(params, no_decay="em.") == {"kernel": True, "bias": False,
                                                       "temp": False, "emb": False}
  cfg = dict(lr=1.0, warmup_frac=0.1, end_lr_frac=0.0)
  s = optim.schedule(cfg, 100)
  assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5)
  assert float(s(10)) == pytest.approx(1.0) and float(s(55)) == pytest.approx(0.5)
  assert float(s(100)) == pytest.approx(0.0, abs=1e-6)


def test_weight_decay_skips_biases():
  cfg = dict(lr=0.1, warmup_frac=0.0, end_lr_frac=1.0, b1=0.9, b2=0.98, eps=1e-6,
             weight_decay=0.5, clip_norm=0.0, frozen="", lr_mult=())
  tx, _ = optim.make_optimizer(cfg, 10)
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_allclose(updates["kernel"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_allclose(updates["bias"], 0.0)


def test_metric_writer_jsonl_and_progress(tmp_path, capsys):
  from vlp_jax.core import metrics
  w = metrics.MetricWriter(str(tmp_path))
  w.write(3, "train", {"loss": np.float32(1.5), "loss/vtc": float("nan")})
  w.write(3, "test", {"retrieval/t2v_R@1": 25.0})
  w.close()
  rows = metrics.read_metrics(str(tmp_path))
  assert rows == [{"step": 3, "split": "train", "loss": 1.5, "loss/vtc": None},
                  {"step": 3, "split": "test", "retrieval/t2v_R@1": 25.0}]
  assert metrics.mean_metrics([{"a": 1.0}, {"a": jnp.float32(3.0)}]) == {"a": 2.0}
  p = metrics.Progress(0, 10)
  for s in range(1, 11):
    p.update(s, 0.5 if s == 10 else None)
  p.close()
  line = capsys.readouterr().err.strip().split("\r")[-1]
  assert "10/10" in line and "loss 0.5000" in line and " 0.00 steps/s" not in line
