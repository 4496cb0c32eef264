"""Mixed video + image-text training: each global step is a video batch or an image batch.

ALPRO pre-trains on WebVid videos and CC3M images, half of the steps each. Whether step `s`
is an image step is a function of (seed, s) only, so every host makes the same choice without
communication, and a resumed run makes the choices of an uninterrupted one. A batch is never
mixed: the prompter's entity embeddings (video or image prompts) are chosen per batch.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

# Key of the host batch that marks image rows (bool [B]); all rows of a batch agree.
IS_IMAGE = "is_image"


def is_image_step(seed: int, step: int, ratio: float) -> bool:
  """Whether global step `step` (0-based) draws from the image loader."""
  if ratio <= 0.0:
    return False
  if ratio >= 1.0:
    return True
  u = np.random.default_rng([int(seed), int(step), 0x1A6E]).random()
  return bool(u < ratio)


class MixtureLoader:
  """Infinite host-local batches, each from the video or the image loader.

  Yields the chosen loader's batch plus `is_image`: bool [B].

  Args:
    video: a training loader (iterator of batches with `save` / `restore`).
    image: the same for still images (one-frame clips repeated to T frames by the pipeline).
    ratio: probability that a step is an image step (0..1; ALPRO: 0.5).
    seed: the run's seed.

  Attributes:
    step: batches delivered so far (the global step of the next batch).
    image_steps: how many of them were image batches.
  """

  def __init__(self, video, image, ratio: float, seed: int):
    ratio = float(ratio)
    if not 0.0 <= ratio <= 1.0:
      raise ValueError(f"data.image_ratio must be in [0, 1], got {ratio}")
    self.video, self.image = video, image
    self.ratio = ratio
    self.seed = int(seed)
    self.step = 0
    self.image_steps = 0

  @property
  def skipped(self) -> int:
    return int(getattr(self.video, "skipped", 0)) + int(getattr(self.image, "skipped", 0))

  @property
  def corrupt_records(self) -> int:
    return (int(getattr(self.video, "corrupt_records", 0))
            + int(getattr(self.image, "corrupt_records", 0)))

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, Any]:
    image = is_image_step(self.seed, self.step, self.ratio)
    batch = dict(next(self.image if image else self.video))
    batch[IS_IMAGE] = np.full(len(batch["valid"]), image, bool)
    self.step += 1
    self.image_steps += int(image)
    return batch

  def save(self, path: str) -> None:
    """Saves both loaders' positions (`path.video*`, `path.image*`) and the step (`path.mix`)."""
    self.video.save(path + ".video")
    self.image.save(path + ".image")
    tmp = path + ".mix.tmp"
    with open(tmp, "w") as f:
      json.dump(dict(step=self.step, image_steps=self.image_steps, ratio=self.ratio,
                     seed=self.seed), f)
    os.replace(tmp, path + ".mix")

  def restore(self, path: str) -> None:
    """Restores a position written by `save` into an identically built MixtureLoader."""
    if not os.path.exists(path + ".mix"):
      raise FileNotFoundError(f"no mixture loader state at {path!r}")
    with open(path + ".mix") as f:
      state = json.load(f)
    if (state["ratio"], state["seed"]) != (self.ratio, self.seed):
      raise ValueError(f"mixture state {path!r} has image_ratio {state['ratio']} and seed "
                       f"{state['seed']}, this run {self.ratio} and {self.seed}")
    self.video.restore(path + ".video")
    self.image.restore(path + ".image")
    self.step, self.image_steps = int(state["step"]), int(state["image_steps"])
