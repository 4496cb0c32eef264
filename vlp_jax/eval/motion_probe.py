"""Can a video encoder learn the direction of motion? Probes on the synthetic corpus.

A fresh TimeSformer of the config's `model.video` sizes and init, plus linear heads, is trained
with cross-entropy on clips of the synthetic corpus whose first shape moves left, right, up,
down, grows or shrinks (6 classes). Three of the pairs are each other played backwards, so a
model blind to frame order cannot pass 50 %: it can tell the axis of a motion (its trail
looks the same either way) but not the direction. `tasks="motion+appearance"` adds the
shape's colour and shape as two more heads with equal weight, as in pre-training, where
motion is one of several things the encoder must learn at once. `tasks="appearance"` trains the
colour and shape heads alone (the motion head is only evaluated): an encoder pre-trained on what
a frame shows, as ImageNet weights are for real video models. `tasks="order"` uses no label:
the encoder is trained with a time-reversal InfoNCE (`losses/reversal_nce.py`: each clip
against a shifted copy of itself, with every clip played backwards as a negative), and
`motion_acc` is then a linear probe's (softmax regression on the frozen CLS features of the
training clips): does a label-free order objective make direction linearly readable?

`save_encoder` writes a trained encoder as a `transformers` TimesformerModel checkpoint, which
`config.init.video=hf:DIR` loads into ALPRO: a video tower pre-trained on labelled clips (or,
with "order", on unlabelled ones).

Used to tell apart "the encoder cannot learn direction (in this budget)" from "the
pre-training objective does not ask for it" (`launch.motion_probe`).
"""
from __future__ import annotations

import io
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from vlp_jax.convert import hf_io
from vlp_jax.convert import timesformer as tsf_conv
from vlp_jax.data import synthetic
from vlp_jax.data.pipeline import CLIP_MEAN, CLIP_STD
from vlp_jax.losses.reversal_nce import reversal_nce
from vlp_jax.models.timesformer import TimesformerModel

MOTIONS = ("left", "right", "up", "down", "grows", "shrinks")  # i ^ 1 = the reversed motion
# Loss weight of the motion, colour and shape heads per `tasks`.
_HEAD_WEIGHTS = {"motion": (1.0, 0.0, 0.0), "motion+appearance": (1.0, 1.0, 1.0),
                 "appearance": (0.0, 1.0, 1.0), "order": (0.0, 0.0, 0.0)}
TASKS = tuple(_HEAD_WEIGHTS)
ORDER_DIM = 128  # the "order" task's projection of the CLS feature, as SimCLR's head


def render(num_clips: int, *, seed: int, stored_frames: int, stored_size: int, num_frames: int,
           image_size: int) -> dict[str, np.ndarray]:
  """Clips of the synthetic `train` split whose first shape has a directional motion.

  Returns `video` uint8 [N, num_frames, image_size, image_size, 3] (frames evenly spaced over
  the stored ones, in time order, resized bilinearly), `motion` int32 [N] (index in
  `MOTIONS`), `colour`, `shape` int32 [N] (indices in sorted `synthetic.COLOURS`,
  `synthetic.SHAPES`).
  """
  if num_frames > stored_frames:
    raise ValueError(f"num_frames ({num_frames}) exceeds the stored frames ({stored_frames})")
  held = synthetic.heldout_pairs(seed)
  pick = np.round(np.linspace(0, stored_frames - 1, num_frames)).astype(int)
  colours = sorted(synthetic.COLOURS)
  out = {k: [] for k in ("video", "motion", "colour", "shape")}
  index = 0
  while len(out["video"]) < num_clips:
    clip = synthetic.render_clip(seed, "train", index, stored_frames, stored_size, held)
    index += 1
    obj = clip["objects"][0]
    if obj["motion"] not in MOTIONS:
      continue
    frames = [np.asarray(Image.open(io.BytesIO(clip["frames"][i])).convert("RGB")
                         .resize((image_size, image_size), Image.BILINEAR)) for i in pick]
    out["video"].append(np.stack(frames))
    out["motion"].append(MOTIONS.index(obj["motion"]))
    out["colour"].append(colours.index(obj["colour"]))
    out["shape"].append(synthetic.SHAPES.index(obj["shape"]))
  return {k: np.asarray(v, np.uint8 if k == "video" else np.int32) for k, v in out.items()}


class _Probe(nn.Module):
  video: Any  # a VideoConfig

  @nn.compact
  def __call__(self, x):
    h = TimesformerModel(self.video)(x)[:, 0]  # the CLS token, as ALPRO's VTC feature
    emb = nn.Dense(ORDER_DIM, name="proj")(h)
    return (nn.Dense(len(MOTIONS), name="motion")(h),
            nn.Dense(len(synthetic.COLOURS), name="colour")(h),
            nn.Dense(len(synthetic.SHAPES), name="shape")(h),
            emb / jnp.linalg.norm(emb, axis=-1, keepdims=True), h)


def _shift(video: np.ndarray, rng: np.random.Generator, max_shift: int) -> np.ndarray:
  """Each clip [T, H, W, C] moved by its own (dy, dx) in [-max_shift, max_shift] pixels, the
  same on every frame (edge pixels fill the gap): a view with the clip's motion unchanged."""
  _, _, h, w, _ = video.shape
  m = max_shift
  padded = np.pad(video, ((0, 0), (0, 0), (m, m), (m, m), (0, 0)), mode="edge")
  dy, dx = rng.integers(0, 2 * m + 1, (2, len(video)))
  return np.stack([p[:, y:y + h, x:x + w] for p, y, x in zip(padded, dy, dx)])


def _linear_probe(train_h, train_y, tests, *, steps: int = 300, lr: float = 0.05):
  """Test accuracies (percent) of a softmax regression fitted (full batch, Adam) on frozen
  features: `train_h` float [N, D], `train_y` int [N], `tests` [(h [M, D], y [M]), ...]."""
  mean, std = train_h.mean(0), train_h.std(0) + 1e-6
  x = jnp.asarray((train_h - mean) / std)
  y = jnp.asarray(train_y)
  w = {"w": jnp.zeros((x.shape[1], len(MOTIONS))), "b": jnp.zeros(len(MOTIONS))}
  opt = optax.adamw(lr, weight_decay=1e-3)

  @jax.jit
  def fit(w):
    def body(carry, _):
      w, s = carry
      g = jax.grad(lambda w: optax.softmax_cross_entropy_with_integer_labels(
          x @ w["w"] + w["b"], y).mean())(w)
      u, s = opt.update(g, s, w)
      return (optax.apply_updates(w, u), s), None
    return jax.lax.scan(body, (w, opt.init(w)), None, length=steps)[0][0]

  w = fit(w)
  return [float(100.0 * np.mean(np.argmax(((h - mean) / std) @ np.asarray(w["w"]) +
                                          np.asarray(w["b"]), -1) == t)) for h, t in tests]


def run(video_cfg, data: dict[str, np.ndarray], *, steps: int, batch_size: int, lr: float,
        seed: int, tasks: str = "motion", num_test: int | None = None, evals: int = 4,
        order_temp: float = 0.1, max_shift: int = 4) -> dict:
  """Trains one probe (AdamW, warm-up then cosine decay, weight decay 0.01) and evaluates it.

  Args:
    video_cfg: a `VideoConfig` (sizes and fresh-init stds of the encoder).
    data: `render`'s arrays; the last `num_test` clips are held out (None: a quarter of
      them, at most 512).
    tasks: "motion", "motion+appearance", "appearance" or "order" (see the module
      docstring).
    order_temp, max_shift: the "order" task's InfoNCE temperature and the largest shift (in
      pixels) of a clip's positive view.
  Returns:
    {"steps": [...], "loss": [...], "motion_acc": [...], "reversed_acc": [...], "seconds",
    "encoder"}: at `evals` evenly spaced steps, the training loss and the test accuracy
    (percent, 6 classes, chance 16.7) on the clips and on the same clips played backwards
    (label: the opposite motion) — the motion head's, or for "order" a linear probe's;
    "order" adds "reversal_cos" (mean cosine of a test clip's projected feature with its
    reversal's). `encoder` is the trained TimeSformer's params (nested dict of numpy
    float32 arrays, `TimesformerModel` names) for `save_encoder`.
  """
  if tasks not in TASKS:
    raise ValueError(f"tasks must be one of {TASKS}, got {tasks!r}")
  if max_shift < 0 or not order_temp > 0:
    raise ValueError(f"max_shift must be >= 0 and order_temp > 0, got {max_shift}, {order_temp}")
  n = len(data["motion"])
  num_test = min(512, n // 4) if num_test is None else int(num_test)
  if n <= num_test:
    raise ValueError(f"{n} clips leave none for training after {num_test} test clips")
  # The training pipeline's normalisation (ALPRO's, CLIP's constants).
  video = (data["video"].astype(np.float32) / 255.0 - np.asarray(CLIP_MEAN, np.float32)) / \
      np.asarray(CLIP_STD, np.float32)
  labels = np.stack([data["motion"], data["colour"], data["shape"]], 1)
  test = slice(n - num_test, n)  # the training clips are the first n - num_test
  model = _Probe(video_cfg)
  # Plain arrays (not logically boxed): the returned encoder goes straight to the exporter.
  params = nn.unbox(model.init(jax.random.PRNGKey(seed), video[:2]))
  warmup = max(steps // 20, 1) if steps > 1 else 0  # the decay needs at least one step
  opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps),
                    b2=0.98, weight_decay=0.01)
  state = opt.init(params)
  weights = _HEAD_WEIGHTS[tasks]

  @jax.jit
  def step(params, state, x, y):
    def loss_fn(p):
      if tasks == "order":  # x = [clips; shifted clips; reversed clips], one forward pass
        q, pos, rev = jnp.split(model.apply(p, x)[3], 3)
        return reversal_nce(q, pos, rev, order_temp)[0].mean()
      logits = model.apply(p, x)
      return sum(w * optax.softmax_cross_entropy_with_integer_labels(lg, y[:, i]).mean()
                 for i, (w, lg) in enumerate(zip(weights, logits)) if w)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  predict = jax.jit(lambda p, x: jnp.argmax(model.apply(p, x)[0], -1))
  features = jax.jit(lambda p, x: model.apply(p, x)[3:])  # (projected, CLS)

  def batched(fn, p, x):
    return [np.concatenate(a) for a in zip(*[jax.device_get(fn(p, x[i:i + 128]))
                                              for i in range(0, len(x), 128)])]

  def accuracies(p, x, y):
    if tasks != "order":
      pred = batched(lambda p, x: (predict(p, x),), p, np.concatenate([x, x[:, ::-1]]))[0]
      return [float(100.0 * np.mean(pred[:len(y)] == y)),
              float(100.0 * np.mean(pred[len(y):] == y ^ 1))]
    train = slice(0, min(n - num_test, 2048))
    h_train = batched(features, p, video[train])[1]
    (e, h), (e_rev, h_rev) = batched(features, p, x), batched(features, p, x[:, ::-1])
    out.setdefault("reversal_cos", []).append(round(float(np.mean(np.sum(e * e_rev, -1))), 6))
    return _linear_probe(h_train, data["motion"][train], [(h, y), (h_rev, y ^ 1)])

  rng = np.random.default_rng(seed)
  every = max(steps // evals, 1)
  out = {"steps": [], "loss": [], "motion_acc": [], "reversed_acc": []}
  t0 = time.time()
  for i in range(1, steps + 1):
    idx = rng.integers(0, n - num_test, batch_size)
    x = video[idx]
    if tasks == "order":
      x = np.concatenate([x, _shift(x, rng, max_shift), x[:, ::-1]])
    params, state, loss = step(params, state, x, labels[idx])
    if i % every == 0 or i == steps:
      acc, rev_acc = accuracies(params, video[test], data["motion"][test])
      out["steps"].append(i)
      out["loss"].append(round(float(loss), 4))
      out["motion_acc"].append(round(acc, 2))
      out["reversed_acc"].append(round(rev_acc, 2))
  out["seconds"] = round(time.time() - t0, 1)
  out["encoder"] = jax.device_get(params["params"]["TimesformerModel_0"])
  return out


def save_encoder(encoder: dict, video_cfg: Any, path: str) -> None:
  """Writes a TimeSformer's params as a `transformers` TimesformerModel checkpoint.

  Args:
    encoder: nested dict of float32 arrays with `TimesformerModel` names (`run`'s `encoder`).
    video_cfg: its `VideoConfig`.
    path: directory for config.json + model.safetensors, loadable with
      `config.init.video=hf:PATH`.
  """
  config, tensors = tsf_conv.export_timesformer(encoder, video_cfg)
  hf_io.save_pretrained(path, config, tensors)
