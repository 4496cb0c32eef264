"""Can a video encoder learn the direction of motion? A supervised probe on the synthetic corpus.

A fresh TimeSformer of the config's `model.video` sizes and init, plus linear heads, is trained
with cross-entropy on clips of the synthetic corpus whose first shape moves left, right, up,
down, grows or shrinks (6 classes). Three of the pairs are each other played backwards, so a
model blind to frame order cannot pass 50 %: it can tell the axis of a motion (its trail
looks the same either way) but not the direction. `tasks="motion+appearance"` adds the
shape's colour and shape as two more heads with equal weight, as in pre-training, where
motion is one of several things the encoder must learn at once. `tasks="appearance"` trains the
colour and shape heads alone (the motion head is only evaluated): an encoder pre-trained on what
a frame shows, as ImageNet weights are for real video models.

`save_encoder` writes a trained encoder as a `transformers` TimesformerModel checkpoint, which
`config.init.video=hf:DIR` loads into ALPRO: a video tower pre-trained on labelled clips.

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
from vlp_jax.models.timesformer import TimesformerModel

MOTIONS = ("left", "right", "up", "down", "grows", "shrinks")  # i ^ 1 = the reversed motion
# Loss weight of the motion, colour and shape heads per `tasks`.
_HEAD_WEIGHTS = {"motion": (1.0, 0.0, 0.0), "motion+appearance": (1.0, 1.0, 1.0),
                 "appearance": (0.0, 1.0, 1.0)}
TASKS = tuple(_HEAD_WEIGHTS)


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
    return (nn.Dense(len(MOTIONS), name="motion")(h),
            nn.Dense(len(synthetic.COLOURS), name="colour")(h),
            nn.Dense(len(synthetic.SHAPES), name="shape")(h))


def run(video_cfg, data: dict[str, np.ndarray], *, steps: int, batch_size: int, lr: float,
        seed: int, tasks: str = "motion", num_test: int | None = None, evals: int = 4) -> dict:
  """Trains one probe (AdamW, warm-up then cosine decay, weight decay 0.01) and evaluates it.

  Args:
    video_cfg: a `VideoConfig` (sizes and fresh-init stds of the encoder).
    data: `render`'s arrays; the last `num_test` clips are held out (None: a quarter of
      them, at most 512).
    tasks: "motion", "motion+appearance" or "appearance" (see the module docstring).
  Returns:
    {"steps": [...], "loss": [...], "motion_acc": [...], "reversed_acc": [...], "seconds",
    "encoder"}: at `evals` evenly spaced steps, the training loss and the test accuracy
    (percent, 6 classes, chance 16.7) on the clips and on the same clips played backwards
    (label: the opposite motion); `encoder` is the trained TimeSformer's params (nested dict
    of numpy float32 arrays, `TimesformerModel` names) for `save_encoder`.
  """
  if tasks not in TASKS:
    raise ValueError(f"tasks must be one of {TASKS}, got {tasks!r}")
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
  opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 20, 1), steps),
                    b2=0.98, weight_decay=0.01)
  state = opt.init(params)
  weights = _HEAD_WEIGHTS[tasks]

  @jax.jit
  def step(params, state, x, y):
    def loss_fn(p):
      logits = model.apply(p, x)
      return sum(w * optax.softmax_cross_entropy_with_integer_labels(lg, y[:, i]).mean()
                 for i, (w, lg) in enumerate(zip(weights, logits)) if w)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  predict = jax.jit(lambda p, x: jnp.argmax(model.apply(p, x)[0], -1))

  def accuracy(p, x, y):
    pred = np.concatenate([np.asarray(predict(p, x[i:i + 128])) for i in range(0, len(x), 128)])
    return float(100.0 * np.mean(pred == y))

  rng = np.random.default_rng(seed)
  every = max(steps // evals, 1)
  out = {"steps": [], "loss": [], "motion_acc": [], "reversed_acc": []}
  t0 = time.time()
  for i in range(1, steps + 1):
    idx = rng.integers(0, n - num_test, batch_size)
    params, state, loss = step(params, state, video[idx], labels[idx])
    if i % every == 0 or i == steps:
      x, y = video[test], data["motion"][test]
      out["steps"].append(i)
      out["loss"].append(round(float(loss), 4))
      out["motion_acc"].append(round(accuracy(params, x, y), 2))
      out["reversed_acc"].append(round(accuracy(params, x[:, ::-1], y ^ 1), 2))
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
