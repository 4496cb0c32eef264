"""Random batches with the Loader's keys and dtypes, without tensorflow.

For device benchmarks (no input-pipeline cost, no TF install) and the multi-host equivalence
test: global row r of step s depends only on (seed, s, r), so the global batch is the same
whatever the number of processes, and process p yields rows [p*B/P, (p+1)*B/P).
"""
from __future__ import annotations

import json
import os
from typing import Any
from collections.abc import Sequence

import numpy as np

from vlp_jax.data import text


class RandomLoader:
  """Infinite iterator of host-local random batches (see pipeline.Loader for the keys).

  video: float32 [b, T, H, W, 3] ~ N(0, 1) (a window of a fixed noise pool, so producing it
  costs a copy, not a random draw per pixel); text_ids: [CLS] random non-special tokens [SEP]
  then [PAD], random lengths; text_mask, mlm_ids, mlm_labels: int32 [b, L]; valid: all True;
  label: int32 [b] zeros (class 0); video_id: object [b] of bytes.
  b = batch_size_global / process_count.
  """

  def __init__(self, *, batch_size_global: int, num_frames: int, image_size: int,
               max_text_len: int, vocab_size: int, seed: int, process_index: int = 0,
               process_count: int = 1, special_ids: Sequence[int] = (0, 1, 2, 3, 4),
               pad_id: int = 0, cls_id: int = 2, sep_id: int = 3, mask_id: int = 4,
               mlm_prob: float = 0.15):
    if batch_size_global % process_count:
      raise ValueError(f"global batch {batch_size_global} is not divisible by "
                       f"{process_count} processes")
    if max_text_len < 3:
      raise ValueError(f"max_text_len must be >= 3, got {max_text_len}")
    self.batch_size_global = int(batch_size_global)
    self.local_batch = self.batch_size_global // process_count
    self.process_index = int(process_index)
    self.process_count = int(process_count)
    self.num_frames, self.image_size = int(num_frames), int(image_size)
    self.max_text_len = int(max_text_len)
    self.vocab_size, self.seed = int(vocab_size), int(seed)
    self.special_ids = sorted({int(s) for s in special_ids} | {pad_id, cls_id, sep_id, mask_id})
    self.pad_id, self.cls_id, self.sep_id, self.mask_id = pad_id, cls_id, sep_id, mask_id
    self.mlm_prob = float(mlm_prob)
    self._tokens = np.setdiff1d(np.arange(self.vocab_size), self.special_ids).astype(np.int32)
    self._video_size = self.num_frames * self.image_size * self.image_size * 3
    pool_rng = np.random.default_rng([self.seed, 0xB0B])
    self._pool = pool_rng.standard_normal(2 * self._video_size, dtype=np.float32)
    self.step = 0
    self.skipped = 0

  def __iter__(self):
    return self

  def _row(self, step: int, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng([self.seed, step, row])
    offset = int(rng.integers(0, self._video_size + 1))
    video = self._pool[offset:offset + self._video_size].reshape(
        self.num_frames, self.image_size, self.image_size, 3)
    length = int(rng.integers(1, self.max_text_len - 1))  # tokens between [CLS] and [SEP]
    ids = np.full(self.max_text_len, self.pad_id, np.int32)
    ids[0] = self.cls_id
    ids[1:1 + length] = self._tokens[rng.integers(0, len(self._tokens), size=length)]
    ids[1 + length] = self.sep_id
    mask = (np.arange(self.max_text_len) < length + 2).astype(np.int32)
    mlm_ids, labels = text.mlm_mask(ids[None], mask[None], rng, vocab_size=self.vocab_size,
                                    mask_id=self.mask_id, special_ids=self.special_ids,
                                    prob=self.mlm_prob)
    return video, ids, mask, (mlm_ids[0], labels[0])

  def __next__(self) -> dict[str, Any]:
    lo = self.process_index * self.local_batch
    rows = [self._row(self.step, r) for r in range(lo, lo + self.local_batch)]
    ids = range(lo, lo + self.local_batch)
    batch = dict(
        video=np.stack([r[0] for r in rows]),
        text_ids=np.stack([r[1] for r in rows]),
        text_mask=np.stack([r[2] for r in rows]),
        mlm_ids=np.stack([r[3][0] for r in rows]),
        mlm_labels=np.stack([r[3][1] for r in rows]),
        valid=np.ones(self.local_batch, bool),
        label=np.zeros(self.local_batch, np.int32),
        video_id=np.array([f"random-{self.step}-{r}".encode() for r in ids], object))
    self.step += 1
    return batch

  def save(self, path: str) -> None:
    """Writes the step counter to `path` (JSON)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(dict(step=self.step, seed=self.seed), f)
    os.replace(tmp, path)

  def restore(self, path: str) -> None:
    """Resumes from a file written by `save`."""
    with open(path) as f:
      state = json.load(f)
    if state["seed"] != self.seed:
      raise ValueError(f"random loader state {path!r} has seed {state['seed']}, not {self.seed}")
    self.step = int(state["step"])
