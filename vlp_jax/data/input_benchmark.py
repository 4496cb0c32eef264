"""Throughput of the tf.data input pipeline alone (`launch.benchmark --input_only`).

Clips per second of training batches (record read, frame choice, JPEG decode of the chosen
frames, crop and resize, tokenisation and MLM masking) from JPEG records it writes itself.
"""
from __future__ import annotations

import copy
import os
import tempfile
import time

from vlp_jax.data import pipeline, synthetic
from vlp_jax.data import tokenizer as tok


def run(config, *, frames=(4, 8), image_size: int = 224, num_clips: int = 128,
        batch_size: int = 16, batches: int = 20, warmup: int = 3) -> dict:
  """Measures the training loader of `config.data` on generated records.

  Args:
    config: a config (its `data` section: sampling, crop, text length, parallelism).
    frames: sampled frames per clip to measure (T); the records store max(frames) frames.
    image_size: stored and output frame side (px).
    num_clips: clips written (the loader repeats them).
    batch_size: clips per batch.
    batches, warmup: timed and untimed batches per T.
  Returns:
    {"input_clips_per_s": {T: clips/s}, "input_clips_per_s_per_core": {T: ...}, "cores",
     "image_size", "batch_size"}.
  """
  data = copy.deepcopy(config.data)
  with data.unlocked():
    data.image_size = image_size
    data.shuffle_buffer = num_clips
  cores = os.cpu_count() or 1
  out = {"input_clips_per_s": {}, "input_clips_per_s_per_core": {}, "cores": cores,
         "image_size": image_size, "batch_size": batch_size}
  with tempfile.TemporaryDirectory() as d:
    synthetic.generate(d, seed=0, num_train=num_clips, num_val=1, num_test=1,
                       num_test_unseen=1, num_frames=max(frames), image_size=image_size,
                       num_shards=4)
    tokenizer = tok.load_tokenizer(os.path.join(d, "vocab.txt"))
    for t in frames:
      with data.unlocked():
        data.num_frames = t
      loader = pipeline.Loader(data, "train", batch_size=batch_size, training=True, seed=0,
                               tokenizer=tokenizer, num_frames=t, image_size=image_size,
                               data_dir=d)
      for _ in range(warmup):
        next(loader)
      start = time.perf_counter()
      for _ in range(batches):
        next(loader)
      rate = batches * batch_size / (time.perf_counter() - start)
      out["input_clips_per_s"][t] = rate
      out["input_clips_per_s_per_core"][t] = rate / cores
  return out
