"""MAMA's bilevel update against a hand-written reference (the weighting net's gradient through
the virtual step, checked by finite differences), theta' != theta and grad phi != 0 (the
released code's bug), and the sharded task step on 8 devices against 1 device."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import mama_retrieval
from vlp_jax.core.state import TrainState
from vlp_jax.core.task import UpdateContext
from vlp_jax.core.trainer import Trainer
from vlp_jax.methods.mama import bilevel

ALPHA, ETA = 0.3, 0.05


def _per_sample(theta, batch, rng, train):
  del rng, train
  err = batch["x"] @ theta["w"] - batch["y"]
  return err ** 2, {}


def _weights(phi, losses):
  return jax.nn.sigmoid(phi["a"] * losses + phi["b"])


def _batches(seed=0, b=6, d=3):
  rng = np.random.default_rng(seed)
  mk = lambda n: {"x": rng.normal(size=(n, d)), "y": rng.normal(size=(n,)),
                  "valid": np.ones((n,), bool)}
  return mk(b), mk(4)


def _np_reference(theta_w, phi, train, meta, how="sum"):
  """float64 numpy: (meta loss at theta'(phi), theta_new(phi_new)) for given phi."""
  x, y = train["x"], train["y"]
  err = x @ theta_w - y
  losses = err ** 2
  raw = 1.0 / (1.0 + np.exp(-(phi[0] * losses + phi[1])))
  w = raw / (raw.sum() if how == "sum" else np.sqrt((raw ** 2).sum()))
  grad = (w * 2 * err) @ x  # d/dtheta sum_i w_i (x_i theta - y_i)^2, w fixed
  virtual = theta_w - ALPHA * grad
  meta_loss = np.mean((meta["x"] @ virtual - meta["y"]) ** 2)
  return meta_loss, grad, virtual


@pytest.mark.parametrize("how", ["sum", "l2"])
def test_bilevel_step_matches_the_hand_written_reference(how):
  train, meta = _batches()
  theta = {"w": jnp.asarray([0.5, -0.2, 0.1], jnp.float32)}
  phi = {"a": jnp.float32(-0.7), "b": jnp.float32(0.3)}
  # SGD with lr 1 for phi: phi_new = phi - grad_phi exposes the meta-gradient exactly.
  txs = {"model": optax.sgd(ETA), "weight_net": optax.sgd(1.0)}
  ctx = UpdateContext(txs, {"model": lambda s: ETA, "weight_net": lambda s: 1.0}, 1)
  update = jax.jit(bilevel.make_bilevel_update(_per_sample, _weights, ctx, virtual_lr=ALPHA,
                                               how=how))
  state = TrainState(step=jnp.int32(0), params={"model": theta, "weight_net": phi},
                     opt_state={k: txs[k].init(p) for k, p in (("model", theta),
                                                               ("weight_net", phi))},
                     rng=jax.random.PRNGKey(0))
  f32 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)
  new, m = update(state, {"train": f32(train), "meta": f32(meta)})

  theta0 = np.asarray(theta["w"], np.float64)
  phi0 = np.asarray([phi["a"], phi["b"]], np.float64)
  meta_loss, _, virtual = _np_reference(theta0, phi0, train, meta, how)
  assert float(m["meta/loss"]) == pytest.approx(meta_loss, rel=1e-4)
  # theta' != theta: the virtual step really moves (the released code's step is a no-op).
  assert float(m["meta/virtual_delta"]) == pytest.approx(np.linalg.norm(virtual - theta0),
                                                          rel=1e-4)
  assert float(m["meta/virtual_delta"]) > 1e-3
  # grad phi through the virtual step, by central finite differences of the numpy meta loss.
  h = 1e-6
  fd = np.array([(_np_reference(theta0, phi0 + h * e, train, meta, how)[0]
                  - _np_reference(theta0, phi0 - h * e, train, meta, how)[0]) / (2 * h)
                 for e in np.eye(2)])
  got = phi0 - np.asarray([new.params["weight_net"]["a"], new.params["weight_net"]["b"]])
  np.testing.assert_allclose(got, fd, rtol=2e-3, atol=1e-6)
  assert np.abs(got).max() > 1e-4  # grad phi != 0
  # The real step: theta - eta * grad of sum w~ l with the weights of the NEW phi, stopped.
  _, grad_new, _ = _np_reference(theta0, phi0 - got, train, meta, how)
  np.testing.assert_allclose(np.asarray(new.params["model"]["w"]), theta0 - ETA * grad_new,
                             rtol=1e-4, atol=1e-6)
  assert int(new.step) == 1


def test_meta_every_keeps_phi_between_meta_steps():
  train, meta = _batches(1)
  theta = {"w": jnp.ones((3,), jnp.float32)}
  phi = {"a": jnp.float32(0.2), "b": jnp.float32(-0.1)}
  txs = {"model": optax.sgd(ETA), "weight_net": optax.sgd(1.0)}
  ctx = UpdateContext(txs, {"model": lambda s: ETA, "weight_net": lambda s: 1.0}, 1)
  update = jax.jit(bilevel.make_bilevel_update(_per_sample, _weights, ctx, virtual_lr=ALPHA,
                                               every=2))
  state = TrainState(step=jnp.int32(1), params={"model": theta, "weight_net": phi},
                     opt_state={"model": txs["model"].init(theta),
                                "weight_net": txs["weight_net"].init(phi)},
                     rng=jax.random.PRNGKey(0))
  f32 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)
  new, m = update(state, {"train": f32(train), "meta": f32(meta)})  # step 1: no meta step
  assert float(new.params["weight_net"]["a"]) == float(phi["a"])
  assert float(m["meta/loss"]) == 0.0 and float(m["grad_norm/weight_net"]) == 0.0
  new, m = update(new, {"train": f32(train), "meta": f32(meta)})  # step 2: meta step
  assert float(new.params["weight_net"]["a"]) != float(phi["a"])
  with pytest.raises(ValueError, match="normalize"):
    bilevel.normalize(jnp.ones(3), jnp.ones(3, bool), "max")


def _config(mesh, **meta):
  c = mama_retrieval.get_config("tiny")
  c.data.source = "random"
  c.model.text.vocab_size = 64
  c.evals = ml_collections.ConfigDict()
  c.mesh.update(mesh)
  c.meta.update(meta)
  return c


def _steps(tmp_path, devices, mesh, n=2):
  run = Trainer(_config(mesh), str(tmp_path), devices=devices).build()
  loaders = {k: iter(v) for k, v in run.loaders().items()}
  step = run.update_fn()
  state, rows = run.state, []
  for _ in range(n):
    state, m = step(state, run.device_batches({k: next(it) for k, it in loaders.items()}))
    rows.append({k: float(v) for k, v in jax.device_get(m).items()})
  return rows, jax.device_get(state.params), state


def test_sharded_mama_step_equals_one_device(tmp_path):
  one, p_one, _ = _steps(tmp_path / "one", jax.devices()[:1], dict(data=1, fsdp=1, tensor=1))
  many, p_many, state = _steps(tmp_path / "many", jax.devices()[:8],
                               dict(data=2, fsdp=2, tensor=2))
  for a, b in zip(one, many):
    for k in ("loss", "loss/plain", "meta/loss", "meta/weight_mean", "meta/virtual_delta",
              "grad_norm/weight_net"):
      assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
  assert one[0]["meta/virtual_delta"] > 0 and one[0]["grad_norm/weight_net"] > 0
  for x, y in zip(jax.tree.leaves(p_one["weight_net"]), jax.tree.leaves(p_many["weight_net"])):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
  # The unused ALPRO parts are frozen: no optimizer state for them.
  frozen = [x for x in jax.tree.leaves(state.opt_state["model"]) if getattr(x, "ndim", 0)]
  trained = [x for x in jax.tree.leaves(state.params["model"]) if x.ndim]
  assert len(frozen) < 2 * len(trained)


def test_mama_tiny_trains_evaluates_and_reports_its_weight_curve(tmp_path):
  """End to end on the tiny corpus: train and meta streams, evaluation, the weight curve PNG."""
  import os

  from vlp_jax.core import trainer
  from vlp_jax.eval import report
  c = mama_retrieval.get_config("tiny")
  c.update_from_flattened_dict({"num_steps": 3, "log_every": 1})
  results = trainer.train(c, str(tmp_path))
  assert results["train"]["meta/virtual_delta"] > 0
  assert 0.0 < results["train"]["meta/weight_mean"] < 1.0
  assert results["test"]["eval/num_clips"] == 16
  paths = report.write_report(str(tmp_path))
  assert os.path.join(str(tmp_path), "report", "test_weight_curve.png") in paths
  with np.load(tmp_path / "eval" / "test" / "step_3.npz") as arrays:
    curve = arrays["weight_curve"]
    assert curve.shape == (81,) and np.all((curve > 0) & (curve < 1))


def test_meta_set_is_balanced_held_out_of_training_and_named_when_short(tmp_path):
  """launch.meta_set on the tiny corpus: per_group clips of every label, written as split
  `meta` with its id list; the MAMA train stream never yields them; a short group is named."""
  import os
  import subprocess
  import sys

  from vlp_jax.data import meta_set, records, synthetic
  data = tmp_path / "data"
  synthetic.ensure(str(data), mama_retrieval.get_config("tiny").data.synthetic)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-m", "launch.meta_set", f"--data_dir={data}",
                         "--field=entity", "--per_group=2"], cwd=root, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  ids = meta_set.read_ids(meta_set.ids_path(str(data), "meta"))
  meta = [records.example_to_dict(r) for f in records.split_files(str(data), "meta")
          for r in records.read_records(f)]
  shapes = [m[records.ENTITIES][0].decode() for m in meta]
  assert len(ids) == len(meta) == 2 * len(set(shapes)) and len(set(shapes)) >= 4
  assert all(shapes.count(s) == 2 for s in set(shapes))
  assert sorted(ids) == sorted(m[records.VIDEO_ID][0].decode() for m in meta)
  assert records.expected_count(str(data), "meta") == len(ids)
  with pytest.raises(ValueError, match=r"cannot be balanced: group '.*' of field 'label' has "
                                       r"\d+ clips, fewer than per_group=1000"):
    meta_set.build(str(data), split="train", field="label", per_group=1000, seed=0,
                   out_split="meta2")
  with pytest.raises(FileExistsError, match="already exists"):
    meta_set.build(str(data), split="train", field="entity", per_group=2, seed=0)

  c = mama_retrieval.get_config("tiny")
  c.data.dir = str(data)
  c.meta.split = "meta"
  run = Trainer(c, str(tmp_path / "run")).build()
  assert run.streams["train"].exclude_ids == meta_set.ids_path(str(data), "meta")
  loaders = run.loaders()
  seen = {v.decode() for _ in range(20) for v in next(loaders["train"])["video_id"]}
  assert len(seen) > 20 and not seen & set(ids)  # 20 batches of 8: most clips, no meta clip
  meta_seen = {v.decode() for _ in range(3) for v in next(loaders["meta"])["video_id"]}
  assert meta_seen <= set(ids)
  run.checkpointer.close()


def _np_first_order(theta_w, phi, train, meta, how="sum"):
  """float64 numpy: the first-order expansion's phi-gradient, by central differences."""
  x, y = train["x"], train["y"]
  err = x @ theta_w - y
  losses = err ** 2
  g_meta = np.mean(2 * (meta["x"] @ theta_w - meta["y"])[:, None] * meta["x"], axis=0)
  align = (2 * err[:, None] * x) @ g_meta  # grad l_i . g_meta

  def expansion(p):
    raw = 1.0 / (1.0 + np.exp(-(p[0] * losses + p[1])))
    w = raw / (raw.sum() if how == "sum" else np.sqrt((raw ** 2).sum()))
    return -ALPHA * np.sum(w * align)
  h = 1e-6
  return np.array([(expansion(phi + h * e) - expansion(phi - h * e)) / (2 * h)
                   for e in np.eye(2)])


def test_first_order_meta_gradient_is_the_expansion_and_near_exact_for_small_steps():
  train, meta = _batches(5)
  theta = {"w": jnp.asarray([0.4, 0.1, -0.3], jnp.float32)}
  phi = {"a": jnp.float32(-0.5), "b": jnp.float32(0.2)}
  f32 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)
  batches = {"train": f32(train), "meta": f32(meta)}

  def g_phi(gradient, alpha):
    # SGD with lr 1/alpha for phi: phi - phi_new = grad / alpha, large enough for float32.
    txs = {"model": optax.sgd(ETA), "weight_net": optax.sgd(1.0 / alpha)}
    ctx = UpdateContext(txs, {"model": lambda s: ETA, "weight_net": lambda s: 1.0 / alpha}, 1)
    update = jax.jit(bilevel.make_bilevel_update(_per_sample, _weights, ctx,
                                                 virtual_lr=alpha, gradient=gradient))
    state = TrainState(step=jnp.int32(0), params={"model": theta, "weight_net": phi},
                       opt_state={"model": txs["model"].init(theta),
                                  "weight_net": txs["weight_net"].init(phi)},
                       rng=jax.random.PRNGKey(0))
    new, m = update(state, batches)
    return alpha * np.asarray([phi["a"] - new.params["weight_net"]["a"],
                               phi["b"] - new.params["weight_net"]["b"]], np.float64), m

  got, m = g_phi("first_order", ALPHA)
  want = _np_first_order(np.asarray(theta["w"], np.float64),
                         np.asarray([phi["a"], phi["b"]], np.float64), train, meta)
  np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-6)
  assert float(m["meta/virtual_delta"]) == 0.0
  # The expansion's error shrinks with the virtual step: first order in alpha (measured: 4 %,
  # 0.4 %, 0.04 % at alpha = 1e-2, 1e-3, 1e-4).
  errors = []
  for alpha in (1e-3, 1e-4):
    exact, _ = g_phi("exact", alpha)
    approx, _ = g_phi("first_order", alpha)
    errors.append(np.max(np.abs(approx - exact) / np.abs(exact)))
  assert errors[1] < 2e-3 and errors[1] < 0.2 * errors[0]
  big_exact, _ = g_phi("exact", 1.0)  # a large step: the expansion is only an approximation
  big_approx, _ = g_phi("first_order", 1.0)
  assert not np.allclose(big_approx, big_exact, rtol=5e-3)
  with pytest.raises(ValueError, match="meta.gradient"):
    bilevel.make_bilevel_update(_per_sample, _weights, UpdateContext(
        {"model": None, "weight_net": None}, {}, 1), virtual_lr=0.1, gradient="second")


def test_clip_backbone_imports_a_clip_model_matches_transformers_and_meta_trains(tmp_path):
  """backbone=clip with init.clip=hf:DIR: the params are the checkpoint's, the video feature is
  the mean of transformers' per-frame image features, the text feature pools at the last real
  token; the bilevel step runs on it."""
  import torch
  import transformers

  from vlp_jax.convert import hf
  from vlp_jax.methods.mama import backbones

  torch.manual_seed(0)
  vocab, eos = 64, 63
  model = transformers.CLIPModel(transformers.CLIPConfig(
      text_config=dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=64, max_position_embeddings=16,
                       eos_token_id=eos, bos_token_id=1, pad_token_id=0),
      vision_config=dict(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64),
      projection_dim=16)).eval()
  path = str(tmp_path / "clip")
  model.save_pretrained(path)

  c = _config(dict(data=1, fsdp=1, tensor=1))
  c.update_from_flattened_dict({"backbone": "clip", "init.clip": "hf:" + path,
                                "model.text.vocab_size": vocab})
  run = Trainer(c, str(tmp_path / "run"), devices=jax.devices()[:1]).build()
  assert run.apply_init()
  params = jax.device_get(run.state.params["model"])
  _, want = hf.import_clip(path, image_size=32)
  for (k, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(k))

  rng = np.random.default_rng(0)
  video = rng.standard_normal((2, 2, 32, 32, 3)).astype(np.float32)
  ids = rng.integers(2, eos, (2, 16)).astype(np.int32)
  mask = np.ones_like(ids)
  ids[0, 9], ids[1, 15] = eos, eos  # the last real token of each row is the EOT
  ids[0, 10:], mask[0, 10:] = 0, 0
  v, t = backbones.build(c, vocab).features(params, {"video": video, "text_ids": ids,
                                                    "text_mask": mask})
  with torch.no_grad():
    frames = torch.tensor(video.reshape(4, 32, 32, 3).transpose(0, 3, 1, 2))
    hv = _hf_out(model.get_image_features(pixel_values=frames)).reshape(2, 2, -1).mean(1)
    ht = _hf_out(model.get_text_features(input_ids=torch.tensor(ids, dtype=torch.long),
                                         attention_mask=torch.tensor(mask)))
  norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(v), norm(hv), atol=2e-5)
  np.testing.assert_allclose(np.asarray(t), norm(ht), atol=2e-5)

  loaders = {k: iter(x) for k, x in run.loaders().items()}
  state, m = run.update_fn()(run.state, run.device_batches(
      {k: next(it) for k, it in loaders.items()}))
  m = jax.device_get(m)
  assert np.isfinite(float(m["loss"])) and float(m["meta/virtual_delta"]) > 0
  assert float(m["grad_norm/weight_net"]) > 0


def _hf_out(out):
  """transformers 5 returns a model output from get_*_features; older versions a tensor."""
  return getattr(out, "pooler_output", out).detach().numpy()


def test_unknown_backbone_and_bad_clip_init_are_clear_errors(tmp_path):
  from vlp_jax.methods.mama import backbones
  c = _config(dict(data=1, fsdp=1, tensor=1))
  c.backbone = "resnet"
  with pytest.raises(ValueError, match="backbone 'resnet' is not one of"):
    backbones.build(c, 64)
  c.update_from_flattened_dict({"backbone": "clip", "init.clip": "hf:" + str(tmp_path)})
  with pytest.raises(Exception, match="has no config.json"):
    backbones.build(c, 64)


def test_mama_qa_loss_is_ce_plus_angular_over_answerable_questions_and_trains(tmp_path):
  """mama_qa: the plain loss is the mean over in-vocabulary questions of the answer
  cross-entropy + contrastive_weight x the angular loss (numpy), and the tiny config trains
  with its meta stream and evaluates."""
  from configs import mama_qa
  from vlp_jax.core import trainer
  c = mama_qa.get_config("tiny")
  c.update_from_flattened_dict({"num_steps": 2, "log_every": 1, "mama.contrastive_weight": 0.5})
  results = trainer.train(c, str(tmp_path))
  assert results["train"]["meta/virtual_delta"] > 0
  assert results["train"]["grad_norm/weight_net"] > 0
  assert results["test"]["eval/num_queries"] == 64 and 0 <= results["test"]["qa/accuracy"] <= 100

  run = Trainer(c, str(tmp_path)).build()
  run.restore()
  task, params = run.task, jax.device_get(run.state.params["model"])
  rng = np.random.default_rng(0)
  b, length = 6, c.data.max_text_len
  batch = {"video": rng.standard_normal((b, 2, 32, 32, 3)).astype(np.float32),
           "text_ids": rng.integers(5, 60, (b, length)).astype(np.int32),
           "text_mask": np.ones((b, length), np.int32),
           "answer_idx": np.array([0, 3, -1, 7, -1, 2], np.int32), "valid": np.ones(b, bool)}
  loss, _ = task.loss({"model": params}, {"train": batch}, None, train=False)
  logits, v, t = (np.asarray(x, np.float64) for x in task._forward(params, batch, None))
  lse = lambda x, ax: np.log(np.sum(np.exp(x - x.max(ax, keepdims=True)), ax)) + x.max(ax)
  known = batch["answer_idx"] >= 0
  ce = lse(logits, 1) - logits[np.arange(b), np.maximum(batch["answer_idx"], 0)]
  s = float(np.exp(min(float(params["logit_scale"]), np.log(200.0))))
  cos = t @ v.T
  theta = np.arccos(np.clip(cos, -1, 1))
  z = s * np.where(np.eye(b, dtype=bool), np.cos(theta - 0.05), cos)
  ang = (lse(z, 1) - np.diagonal(z)) + (lse(z, 0) - np.diagonal(z))
  want = np.mean((ce + 0.5 * ang)[known])
  assert float(loss) == pytest.approx(want, rel=1e-4)
