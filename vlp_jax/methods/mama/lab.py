"""MAMA's synthetic lab: a simulated LVLM captioner and the lab's measurements.

The lab trains `mama_retrieval` on the moving-shapes corpus made long-tailed over its
(shape, colour) topics and with a share of mismatched training captions
(`data.synthetic.topic_zipf`, `data.synthetic.caption_noise`), and measures:
- test text->video R@1 per topic-frequency bucket (rare -> common), as MAMA's topic figure;
- the learned weights of noisy vs clean training pairs.

`standin_captions` simulates the LVLM of caption augmentation: it reads each clip's true
attributes (the corpus stores them in every record) and describes them in its own wording, with
one attribute wrong at a set error rate. It is a simulation for the lab, not a captioner of
pixels; `launch.augment_captions` runs real image-text models.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

import jax
import numpy as np

from vlp_jax.data import records, synthetic

ATTRIBUTES = "synthetic/attributes"
STANDIN_PROMPT = "In a sentence, describe the process in the video."


def clip_attributes(data_dir: str, split: str) -> list[tuple[str, list[dict]]]:
  """(video id, objects) of every clip of a synthetic split, in record order (the order a
  one-process evaluation reads them)."""
  out = []
  for path in records.split_files(data_dir, split):
    for raw in records.read_records(path):
      ex = records.example_to_dict(raw)
      if ATTRIBUTES not in ex:
        raise ValueError(f"{path}: records carry no {ATTRIBUTES!r}; the lab needs the "
                         "synthetic corpus")
      vid = ex[records.VIDEO_ID][0]
      vid = vid.decode() if isinstance(vid, bytes) else str(vid)
      attrs = ex[ATTRIBUTES][0]
      out.append((vid, json.loads(attrs.decode() if isinstance(attrs, bytes) else attrs)))
  return out


def topic(objects: Sequence[dict]) -> tuple[str, str]:
  """A clip's topic: the (shape, colour) of its first object."""
  return objects[0]["shape"], objects[0]["colour"]


def _describe(rng: np.random.Generator, objects: list[dict], error_rate: float) -> str:
  objects = [dict(o) for o in objects]
  if rng.random() < error_rate:  # one attribute of one object is wrong
    o = objects[rng.integers(len(objects))]
    key = ("shape", "colour", "motion")[rng.integers(3)]
    choices = {"shape": synthetic.SHAPES, "colour": tuple(synthetic.COLOURS),
               "motion": synthetic.MOTIONS}[key]
    o[key] = rng.choice([c for c in choices if c != o[key]])
  parts = []
  for o in objects:
    size = synthetic.SIZE_WORDS[o["size"]][0]
    phrase = synthetic.MOTION_PHRASES[o["motion"]][1][0]
    parts.append(f"{size} {o['colour']} {o['shape']} {phrase}")
  return "a video of a " + " and a ".join(parts)


def standin_captions(data_dir: str, split: str, out_path: str, *, error_rate: float,
                     seed: int = 0) -> dict:
  """Writes a `launch.augment_captions`-format side file from the clips' true attributes.

  Args:
    data_dir: a synthetic corpus.
    split: its split to caption (e.g. `train`).
    out_path: the JSONL side file (`video_id`, `caption`, `captioner`, `prompt`, `seed`,
      `keyframes`), overwritten.
    error_rate: probability that a caption names one attribute wrongly.
    seed: the simulation's seed.
  Returns:
    {"captioned": N, "wrong": number of captions with an error, "out": out_path}.
  """
  if not 0.0 <= error_rate <= 1.0:
    raise ValueError(f"error_rate must be in [0, 1], got {error_rate}")
  name = f"lvlm_standin(error_rate={error_rate:g})"
  wrong = 0
  clips = clip_attributes(data_dir, split)
  tmp = out_path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for i, (vid, objects) in enumerate(clips):
      rng = np.random.default_rng([seed, i, 0x11A])
      caption = _describe(rng, objects, error_rate)
      wrong += caption != _describe(np.random.default_rng(0), objects, 0.0)
      f.write(json.dumps(dict(video_id=vid, caption=caption, captioner=name,
                              prompt=STANDIN_PROMPT, seed=seed, keyframes=[])) + "\n")
  os.replace(tmp, out_path)
  return {"captioned": len(clips), "wrong": wrong, "out": out_path}


def frequency_buckets(train_topics: Sequence[tuple[str, str]],
                      test_topics: Sequence[tuple[str, str]], num_buckets: int = 3
                      ) -> dict[tuple[str, str], int]:
  """Topic -> bucket index (0 = rarest) by training frequency: the topics of both splits sorted
  by their training count and cut into `num_buckets` groups of (nearly) equal size."""
  counts: dict[tuple[str, str], int] = {}
  for t in train_topics:
    counts[tuple(t)] = counts.get(tuple(t), 0) + 1
  every = set(counts) | {tuple(t) for t in test_topics}
  ordered = sorted(every, key=lambda t: (counts.get(t, 0), t))
  return {t: min(i * num_buckets // len(ordered), num_buckets - 1)
          for i, t in enumerate(ordered)}


def bucket_recall(t2v_rank: np.ndarray, test_topics: Sequence[tuple[str, str]],
                  buckets: dict[tuple[str, str], int], num_buckets: int = 3) -> list[float]:
  """Text->video R@1 (percent) of the test queries of each frequency bucket (nan if empty).

  Args:
    t2v_rank: int [N], the 1-based rank of each query's video (the evaluator's `t2v_rank`).
    test_topics: the N test clips' topics, in the same order.
  """
  rank = np.asarray(t2v_rank)
  if len(rank) != len(test_topics):
    raise ValueError(f"{len(rank)} ranks for {len(test_topics)} test clips")
  which = np.asarray([buckets.get(tuple(t), 0) for t in test_topics])
  return [float(100.0 * np.mean(rank[which == b] == 1)) if np.any(which == b) else float("nan")
          for b in range(num_buckets)]


def weights_by_noise(task, params, batches, noisy_ids: set[str]) -> dict[str, float]:
  """Mean learned weight w_phi(l) of noisy and of clean training pairs.

  Args:
    task: a `mama_retrieval` task (its `per_sample` and `weight_net`).
    params: {"model": ..., "weight_net": ...} (host or device arrays).
    batches: eval-loader batches of the training split (`video_id`, `valid` and the keys of
      `per_sample`); the loss of a pair uses its batch's other pairs as negatives.
    noisy_ids: ids of the clips whose captions were replaced.
  Returns:
    `noisy_weight`, `clean_weight` (means of the raw weights), `noisy_loss`, `clean_loss`,
    `num_noisy`, `num_clean`.
  """
  step = jax.jit(lambda p, b: _weights(task, p, b))
  losses, weights, noisy = [], [], []
  for batch in batches:
    keep = np.asarray(batch["valid"], bool)
    arrays = {k: batch[k] for k in ("video", "text_ids", "text_mask", "valid")}
    loss, weight = jax.device_get(step(params, arrays))
    ids = [v.decode() if isinstance(v, bytes) else str(v) for v in batch["video_id"]]
    losses.append(np.asarray(loss)[keep])
    weights.append(np.asarray(weight)[keep])
    noisy.append(np.asarray([i in noisy_ids for i in ids])[keep])
  loss, weight, noisy = (np.concatenate(x) for x in (losses, weights, noisy))
  mean = lambda x, m: float(np.mean(x[m])) if np.any(m) else float("nan")
  return {"noisy_weight": mean(weight, noisy), "clean_weight": mean(weight, ~noisy),
          "noisy_loss": mean(loss, noisy), "clean_loss": mean(loss, ~noisy),
          "num_noisy": int(noisy.sum()), "num_clean": int((~noisy).sum())}


def _weights(task, params, batch):
  loss, _ = task.per_sample(params["model"], batch, None, False)
  return loss, task.weight_net.apply({"params": params["weight_net"]}, loss)
