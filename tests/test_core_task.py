"""The core task contract with a task that is not ALPRO: two parameter collections, two streams
and the task's own (bilevel, learning-to-reweight) update, trained by the core `Trainer` on a
sharded mesh and checked against a hand-written single-device reference; per-collection
optimizer settings (`frozen`, `lr_mult`); the task registry."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import alpro_pretrain
from vlp_jax.core import optim
from vlp_jax.core import task as task_lib
from vlp_jax.core.trainer import Trainer
from vlp_jax.data import setup as data_setup
from vlp_jax.data.random_source import RandomLoader

BILEVEL, DEFAULT = "toy_bilevel_test", "toy_default_test"
ALPHA = 0.5          # the virtual SGD step of the bilevel update
FEATURE_SCALE = 8.0  # features (means of 64 N(0, 1) pixels) scaled to about unit variance
LR = dict(inner=1e-2, outer=2e-2)
WEIGHT_DECAY = dict(inner=0.01, outer=0.0)


# ---- the toy task --------------------------------------------------------------------------

def _features(batch):
  """x [B, W]: per-column mean of the first channel over frames and rows; y [B]: a target
  derived from the same clip; v [B]: the valid mask as float32."""
  x = jnp.mean(batch["video"][..., 0], axis=(1, 2)) * FEATURE_SCALE
  y = 0.5 * jnp.sum(x[:, :4], axis=-1)
  return x, y, batch["valid"].astype(jnp.float32)


class _Inner(nn.Module):
  """Linear regressor x [B, D] -> [B]."""

  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                     ("embed", None)), (x.shape[-1], 1))
    b = self.param("b", nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
                   (1,))
    return (x @ w + b)[:, 0]


class _Outer(nn.Module):
  """Weighting net: per-sample loss [B] -> weight in (0, 1) [B] (MLP 1 -> 4 -> 1)."""

  @nn.compact
  def __call__(self, losses):
    normal = nn.initializers.normal(1.0)
    w1 = self.param("w1", nn.with_logical_partitioning(normal, (None, "mlp")), (1, 4))
    b1 = self.param("b1", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                       ("mlp",)), (4,))
    w2 = self.param("w2", nn.with_logical_partitioning(normal, ("mlp", None)), (4, 1))
    b2 = self.param("b2", nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
                    (1,))
    h = jnp.tanh(losses[:, None] @ w1 + b1)
    return jax.nn.sigmoid(h @ w2 + b2)[:, 0]


def _per_sample(theta, batch):
  x, y, _ = _features(batch)
  return (_Inner().apply({"params": theta}, x) - y) ** 2


def _mean_loss(theta, batch):
  v = _features(batch)[2]
  return jnp.sum(v * _per_sample(theta, batch)) / jnp.sum(v)


def _weighted_loss(theta, phi, batch):
  """sum_i w_i l_i / sum_i w_i, w_i = outer_phi(stop_gradient(l_i)) (valid rows only)."""
  v = _features(batch)[2]
  l = _per_sample(theta, batch)
  w = _Outer().apply({"params": phi}, jax.lax.stop_gradient(l)) * v
  return jnp.sum(w * l) / jnp.sum(w)


class _ToyTask(task_lib.Task):
  """Two collections (`inner` regressor, `outer` weighting net) and two streams."""

  def init_collections(self, rng):
    r_inner, r_outer = jax.random.split(rng)
    d = int(self.config.data.image_size)
    return {"inner": _Inner().init(r_inner, jnp.zeros((1, d)))["params"],
            "outer": _Outer().init(r_outer, jnp.zeros((1,)))["params"]}

  def streams(self):
    return {"train": task_lib.Stream(keys=("video", "valid")),
            "meta": task_lib.Stream(keys=("video", "valid"), seed_offset=1)}

  def loss(self, params, batches, rng, *, train, frozen=None):
    del rng, train, frozen
    loss = _weighted_loss(params["inner"], params["outer"], batches["train"])
    return loss, {"plain_loss": _mean_loss(params["inner"], batches["train"])}

  def evaluators(self):
    return {}


@task_lib.register(DEFAULT)
class ToyDefaultTask(_ToyTask):
  """The core's default update (value_and_grad of `loss` over both collections)."""


@task_lib.register(BILEVEL)
class ToyBilevelTask(_ToyTask):
  """Learning to reweight: the outer net is trained through a virtual SGD step of the inner
  model, evaluated on the `meta` stream."""

  def make_update(self, ctx):
    tx_inner, tx_outer = ctx.optimizers["inner"], ctx.optimizers["outer"]

    def update(state, batches, frozen=None):
      del frozen
      theta, phi = state.params["inner"], state.params["outer"]
      train, meta = batches["train"], batches["meta"]

      def meta_objective(phi):
        g = jax.grad(_weighted_loss)(theta, phi, train)
        virtual = jax.tree.map(lambda p, gp: p - ALPHA * gp, theta, g)
        return _mean_loss(virtual, meta), virtual

      (meta_loss, virtual), g_phi = jax.value_and_grad(meta_objective, has_aux=True)(phi)
      upd, outer_state = tx_outer.update(g_phi, state.opt_state["outer"], phi)
      new_phi = optax.apply_updates(phi, upd)
      loss, g_theta = jax.value_and_grad(_weighted_loss)(
          theta, jax.lax.stop_gradient(new_phi), train)
      upd, inner_state = tx_inner.update(g_theta, state.opt_state["inner"], theta)
      new_theta = optax.apply_updates(theta, upd)
      delta = jax.tree.map(jnp.subtract, virtual, theta)
      metrics = {"loss": loss, "meta/loss": meta_loss,
                 "meta/virtual_delta": optax.tree_utils.tree_norm(delta),
                 "grad_norm/inner": optax.tree_utils.tree_norm(g_theta),
                 "grad_norm/outer": optax.tree_utils.tree_norm(g_phi)}
      new_state = state.replace(step=state.step + 1, params={"inner": new_theta,
                                                             "outer": new_phi},
                                opt_state={"inner": inner_state, "outer": outer_state})
      return new_state, metrics

    return update


# ---- config and helpers --------------------------------------------------------------------

def _opt(name, **overrides):
  c = dict(lr=LR[name], b1=0.9, b2=0.98, eps=1e-6, weight_decay=WEIGHT_DECAY[name],
           warmup_frac=0.0, end_lr_frac=1.0, clip_norm=0.0, frozen="", lr_mult=())
  c.update(overrides)
  return ml_collections.ConfigDict(c)


def _config(task, mesh, inner=None, outer=None):
  c = alpro_pretrain.get_config("tiny")
  c.task = task
  c.data.source = "random"
  c.model.text.vocab_size = 64
  c.evals = ml_collections.ConfigDict()
  c.progress = False
  c.num_steps = 3
  c.log_every = 1
  c.ckpt_every = 100
  c.mesh.update(mesh)
  c.optim = ml_collections.ConfigDict(dict(grad_accum=1, inner=_opt("inner", **(inner or {})),
                                           outer=_opt("outer", **(outer or {}))))
  return c


def _host_copy(tree):
  """A numpy copy (never a view of a buffer the next, donating, step may reuse)."""
  return jax.tree.map(lambda a: np.array(a, copy=True), jax.device_get(tree))


def _run_steps(trainer, n):
  """n update steps of a built trainer; returns (state, [host metrics], [host batches])."""
  step_fn = trainer.update_fn()
  iters = {k: iter(v) for k, v in trainer.loaders().items()}
  state, metrics, hosts = trainer.state, [], []
  for _ in range(n):
    host = {k: next(it) for k, it in iters.items()}
    state, m = step_fn(state, trainer.device_batches(host))
    metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
    hosts.append(host)
  return state, metrics, hosts


# ---- the hand-written reference ------------------------------------------------------------

def _ref_losses(theta, x, y):
  """(per-sample squared error, residual) of the linear regressor, in plain jnp."""
  r = x @ theta["w"][:, 0] + theta["b"][0] - y
  return r ** 2, r


def _ref_weights(phi, l):
  h = jnp.tanh(l[:, None] * phi["w1"][0] + phi["b1"])
  return jax.nn.sigmoid(h @ phi["w2"][:, 0] + phi["b2"][0])


def _ref_grad_theta(theta, w, x, y, v):
  """Closed-form gradient of sum_i w_i v_i l_i / sum_i w_i v_i at fixed weights."""
  _, r = _ref_losses(theta, x, y)
  c = w * v / jnp.sum(w * v)
  return {"w": (2.0 * (c * r) @ x)[:, None], "b": 2.0 * jnp.sum(c * r)[None]}


def _ref_features(batch):
  x = batch["video"][..., 0].mean(axis=(1, 2)) * FEATURE_SCALE
  return (jnp.asarray(x), jnp.asarray(0.5 * x[:, :4].sum(-1)),
          jnp.asarray(batch["valid"], jnp.float32))


def _ref_adamw(config, name):
  o = config.optim[name]
  return optax.adamw(float(o.lr), b1=float(o.b1), b2=float(o.b2), eps=float(o.eps),
                     weight_decay=float(o.weight_decay),
                     mask=lambda p: jax.tree.map(lambda a: a.ndim >= 2, p))


def _reference(config, params, train_batches, meta_batches):
  """The bilevel run on one device: returns (params, [per-step metrics])."""
  theta = jax.tree.map(jnp.asarray, params["inner"])
  phi = jax.tree.map(jnp.asarray, params["outer"])
  tx_in, tx_out = _ref_adamw(config, "inner"), _ref_adamw(config, "outer")
  s_in, s_out = tx_in.init(theta), tx_out.init(phi)
  history = []
  for tb, mb in zip(train_batches, meta_batches):
    x, y, v = _ref_features(tb)
    xm, ym, vm = _ref_features(mb)
    l_train, _ = _ref_losses(theta, x, y)

    def meta_of(phi):
      w = _ref_weights(phi, l_train)
      g = _ref_grad_theta(theta, w, x, y, v)
      virtual = {k: theta[k] - ALPHA * g[k] for k in theta}
      lm, _ = _ref_losses(virtual, xm, ym)
      return jnp.sum(vm * lm) / jnp.sum(vm), virtual

    (meta_loss, virtual), g_phi = jax.value_and_grad(meta_of, has_aux=True)(phi)
    upd, s_out = tx_out.update(g_phi, s_out, phi)
    phi = optax.apply_updates(phi, upd)
    w = _ref_weights(phi, l_train) * v
    loss = jnp.sum(w * l_train) / jnp.sum(w)
    upd, s_in = tx_in.update(_ref_grad_theta(theta, w, x, y, v), s_in, theta)
    delta = np.sqrt(sum(float(jnp.sum((virtual[k] - theta[k]) ** 2)) for k in theta))
    theta = optax.apply_updates(theta, upd)
    history.append({"loss": float(loss), "meta/loss": float(meta_loss),
                    "meta/virtual_delta": delta,
                    "grad_norm/outer": float(optax.tree_utils.tree_norm(g_phi))})
  return {"inner": _host_copy(theta), "outer": _host_copy(phi)}, history


def _max_abs_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ---- tests ---------------------------------------------------------------------------------

def test_bilevel_task_sharded_matches_reference(tmp_path):
  assert jax.device_count() >= 8
  config = _config(BILEVEL, dict(data=2, fsdp=2, tensor=2))
  # Constant learning rate from step 0 (warm-up 0, end_lr_frac 1), as the reference assumes.
  for name in ("inner", "outer"):
    sched = optim.schedule(config.optim[name], config.num_steps)
    assert [float(sched(i)) for i in range(3)] == pytest.approx([LR[name]] * 3, rel=1e-7)

  trainer = Trainer(config, str(tmp_path), devices=jax.devices()[:8]).build()
  assert set(trainer.streams) == {"train", "meta"}
  init = _host_copy(trainer.state.params)
  state, metrics, hosts = _run_steps(trainer, 3)
  final = _host_copy(state.params)
  assert int(jax.device_get(state.step)) == 3
  # The state really is sharded: the regressor over fsdp, the weighting net over tensor.
  assert "fsdp" in str(state.params["inner"]["w"].sharding.spec)
  assert "tensor" in str(state.params["outer"]["w1"].sharding.spec)

  # Same initial params as the core's convention: init key = split(PRNGKey(seed))[0].
  task = task_lib.build(config, data_setup.TextInfo(None, 64))
  assert isinstance(task, ToyBilevelTask)
  init_rng = jax.random.split(jax.random.PRNGKey(config.seed))[0]
  ref_init = _host_copy(jax.jit(lambda r: nn.unbox(task.init_collections(r)))(init_rng))
  assert _max_abs_diff(init, ref_init) <= 1e-7

  # Independently built loaders give the trainer's host batches (meta = seed + 1, not train).
  def loader(offset):
    d = config.data
    return RandomLoader(batch_size_global=config.batch_size, num_frames=d.num_frames,
                        image_size=d.image_size, max_text_len=d.max_text_len, vocab_size=64,
                        seed=config.seed + offset)
  ref_train, ref_meta = loader(0), loader(1)
  train_batches = [next(ref_train) for _ in range(3)]
  meta_batches = [next(ref_meta) for _ in range(3)]
  for h, tb, mb in zip(hosts, train_batches, meta_batches):
    np.testing.assert_array_equal(h["train"]["video"], tb["video"])
    np.testing.assert_array_equal(h["meta"]["video"], mb["video"])
    assert not np.array_equal(tb["video"], mb["video"])

  ref_params, ref_metrics = _reference(config, init, train_batches, meta_batches)

  for step, (m, r) in enumerate(zip(metrics, ref_metrics)):
    assert m["finite"] == 1.0
    for k in ("loss", "meta/loss", "meta/virtual_delta", "grad_norm/outer"):
      assert m[k] == pytest.approx(r[k], rel=1e-5, abs=1e-6), (step, k)
    # The virtual step moved theta, and phi got a gradient through it.
    assert m["meta/virtual_delta"] > 1e-3 and m["grad_norm/outer"] > 0.0
  for name in ("inner", "outer"):
    for path, a in jax.tree_util.tree_leaves_with_path(final[name]):
      b = ref_params[name]
      for k in path:
        b = b[k.key]
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"{name}{path}")
      # Every entry moved.
      i = init[name]
      for k in path:
        i = i[k.key]
      assert np.all(a != i), (name, path)
  diff = _max_abs_diff(final, ref_params)
  print(f"max |sharded - reference| over params: {diff:.3g}")
  assert diff <= 1e-5


def test_frozen_regex_no_updates_no_optimizer_state(tmp_path):
  # inner: only `w` frozen; outer: the whole collection frozen.
  config = _config(DEFAULT, dict(data=2, fsdp=4, tensor=1), inner=dict(frozen="w"),
                   outer=dict(frozen=".*"))
  trainer = Trainer(config, str(tmp_path), devices=jax.devices()[:8]).build()
  init = _host_copy(trainer.state.params)
  results = trainer.fit()
  final = _host_copy(trainer.state.params)
  assert int(jax.device_get(trainer.state.step)) == 3

  np.testing.assert_array_equal(final["inner"]["w"], init["inner"]["w"])
  for k in init["outer"]:
    np.testing.assert_array_equal(final["outer"][k], init["outer"][k])
  assert np.all(final["inner"]["b"] != init["inner"]["b"])

  # Frozen leaves have no optimizer state: only Adam's mu/nu of `inner/b` [1] and scalars.
  shapes = lambda tree: sorted(np.shape(a) for a in jax.tree.leaves(tree) if np.ndim(a) > 0)
  assert shapes(trainer.state.opt_state["inner"]) == [(1,), (1,)]
  assert shapes(trainer.state.opt_state["outer"]) == []

  # The frozen collection still had gradients: freezing is the optimizer's, not the loss's.
  with open(os.path.join(str(tmp_path), "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  train_rows = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in train_rows] == [1, 2, 3]
  assert all(np.isfinite(r["loss"]) and r["grad_norm/outer"] > 0 for r in train_rows)
  assert results["train"]["loss"] == pytest.approx(train_rows[-1]["loss"])


def test_frozen_run_resumes_exactly(tmp_path):
  """A run with frozen leaves (no optimizer state there) stops at step 2 and resumes: its final
  state equals an uninterrupted run's, bit for bit."""
  config = lambda: _config(DEFAULT, dict(data=2, fsdp=4, tensor=1), inner=dict(frozen="w"),
                           outer=dict(frozen=".*"))
  straight = Trainer(config(), str(tmp_path / "a"), devices=jax.devices()[:8]).build()
  straight.fit()
  Trainer(config(), str(tmp_path / "b"), devices=jax.devices()[:8]).build().fit(stop_at=2)
  resumed = Trainer(config(), str(tmp_path / "b"), devices=jax.devices()[:8]).build()
  resumed.fit()
  for a, b in zip(jax.tree.leaves(_host_copy(straight.state)),
                  jax.tree.leaves(_host_copy(resumed.state))):
    np.testing.assert_array_equal(a, b)


def test_lr_mult_zero_keeps_leaves_and_their_state(tmp_path):
  config = _config(DEFAULT, dict(data=1, fsdp=1, tensor=1), inner=dict(lr_mult=(("w", 0.0),)))
  trainer = Trainer(config, str(tmp_path), devices=jax.devices()[:1]).build()
  init = _host_copy(trainer.state.params)
  state, metrics, _ = _run_steps(trainer, 3)
  final = _host_copy(state.params)
  assert all(m["finite"] == 1.0 for m in metrics)

  np.testing.assert_array_equal(final["inner"]["w"], init["inner"]["w"])
  assert np.all(final["inner"]["b"] != init["inner"]["b"])
  for k in init["outer"]:
    assert np.all(final["outer"][k] != init["outer"][k]), k

  # Unlike a frozen leaf, `w` keeps (non-zero) Adam moments.
  w_state = [a for a in jax.tree.leaves(jax.device_get(state.opt_state["inner"]))
             if np.shape(a) == init["inner"]["w"].shape]
  assert len(w_state) == 2 and all(np.any(a != 0) for a in w_state)


@pytest.mark.parametrize("key,value", [("lr_mult", (("w", 2.0), ("wq", 0.5))),
                                       ("frozen", "inner/w"), ("no_decay", "W")])
def test_optimizer_regexes_that_match_no_parameter_are_logged(tmp_path, caplog, key, value):
  """A misspelt lr_mult, frozen or no_decay regex changes nothing: the build says so, once
  (paths are fully matched: "inner/w" is not a path of the `inner` collection, "w" is)."""
  import logging

  from vlp_jax.core import optim

  optim._WARNED.clear()
  bad = {"lr_mult": "wq", "frozen": "inner/w", "no_decay": "W"}[key]
  config = _config(DEFAULT, dict(data=1, fsdp=1, tensor=1), inner={key: value})
  with caplog.at_level(logging.WARNING):
    Trainer(config, str(tmp_path), devices=jax.devices()[:1]).build()
  said = [r.getMessage() for r in caplog.records if "matches no parameter" in r.getMessage()]
  # One message (lr_mult: none for the rule "w", which matches), naming the regex.
  assert len(said) == 1 and f"'{bad}'" in said[0] and key in said[0], said


def test_registry():
  with pytest.raises(ValueError, match="no_such_task") as err:
    task_lib.get("no_such_task")
  assert BILEVEL in str(err.value) and DEFAULT in str(err.value)
  assert BILEVEL in task_lib.known() and task_lib.known() == sorted(task_lib.known())
  assert task_lib.get(BILEVEL) is ToyBilevelTask

  # The same class again is fine; a different class under a taken name is not (and does not
  # replace the registered one).
  assert task_lib.register(BILEVEL)(ToyBilevelTask) is ToyBilevelTask

  class Other(_ToyTask):
    pass

  with pytest.raises(ValueError, match="already registered"):
    task_lib.register(BILEVEL)(Other)
  assert task_lib.get(BILEVEL) is ToyBilevelTask
  with pytest.raises(TypeError):
    task_lib.register("toy_not_a_task_test")(object)
  assert "toy_not_a_task_test" not in task_lib.known()


def test_profile_steps_write_a_trace_and_bad_ranges_fail_at_build(tmp_path):
  import glob

  c = _config(DEFAULT, dict(data=1, fsdp=1, tensor=1))
  c.profile_steps = "2:3"
  Trainer(c, str(tmp_path), devices=jax.devices()[:1]).build().fit()
  traces = glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  for bad in ("3:2", "0:1", "2"):
    c.profile_steps = bad
    with pytest.raises(ValueError, match="profile_steps must be 'A:B'"):
      Trainer(c, str(tmp_path / "bad"), devices=jax.devices()[:1]).build()
