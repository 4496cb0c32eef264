"""The answer vocabulary of video QA: the K most frequent answers of the training split.

Answers outside the vocabulary get index -1: the QA loss ignores them and accuracy counts
them wrong. The vocabulary is written to `WORKDIR/answers.json` the first time and read back
afterwards, so evaluation and resumed runs map answers exactly as training did.
"""
from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

OOV = -1  # index of an answer outside the vocabulary (and of padding rows)
FILENAME = "answers.json"


def normalize(answer: str | bytes) -> str:
  """Lowercase, whitespace collapsed: "  Red  Circle " -> "red circle"."""
  if isinstance(answer, bytes):
    answer = answer.decode("utf-8", "replace")
  return " ".join(answer.lower().split())


def top_k(answers: Iterable[str | bytes], k: int) -> list[str]:
  """The `k` most frequent normalised answers, most frequent first, ties alphabetical.

  Empty answers are not counted. Fewer than `k` distinct answers give a shorter list.

  Raises:
    ValueError: `k` < 1.
  """
  if int(k) < 1:
    raise ValueError(f"answer vocabulary size must be >= 1, got {k}")
  counts = collections.Counter(a for a in map(normalize, answers) if a)
  ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
  return [a for a, _ in ranked[:int(k)]]


def indices(answers: Sequence[str | bytes], index: Mapping[str, int]) -> np.ndarray:
  """int32 [N]: the vocabulary index of each (normalised) answer, `OOV` (-1) if absent."""
  return np.asarray([index.get(normalize(a), OOV) for a in answers], np.int32).reshape(-1)


def read_split_answers(data_dir: str, split: str) -> list[bytes]:
  """Every `answer/string` of every record of `split` (all shards, record order).

  Only the context is parsed; frames are never decoded.
  """
  import tensorflow as tf  # noqa: PLC0415  lazy: data/ is the only place importing it, and only when needed
  from vlp_jax.data import records  # noqa: PLC0415  (imports tensorflow)
  spec = {records.ANSWERS: tf.io.RaggedFeature(tf.string)}
  ds = tf.data.TFRecordDataset(records.split_files(data_dir, split))
  ds = ds.map(lambda s: tf.io.parse_single_sequence_example(s, context_features=spec)[0][
      records.ANSWERS])
  out = []
  for a in ds.as_numpy_iterator():
    out.extend(a.tolist())
  return out


def load_or_build(workdir: str, data_dir: str, split: str, k: int,
                  write: bool = True) -> list[str]:
  """The answer vocabulary of a run: `WORKDIR/answers.json`, built from `split` if absent.

  Every process builds the same list from all files of the split; only a `write=True`
  process (process 0) writes the file.

  Raises:
    ValueError: the saved vocabulary was built for a different `k`, or the split has no
      answers at all.
  """
  path = os.path.join(workdir, FILENAME)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if int(saved.get("k", -1)) != int(k):
      raise ValueError(f"{path} holds an answer vocabulary for model.num_answers="
                       f"{saved.get('k')}, but the config has {k}; use a fresh workdir")
    return list(saved["answers"])
  raw = read_split_answers(data_dir, split)
  vocab = top_k(raw, k)
  if not vocab:
    raise ValueError(f"split {split!r} in {data_dir!r} has no `answer/string` entries: not a QA "
                     "dataset (see `python -m launch.ingest --format=msrvtt_qa`)")
  if write:
    os.makedirs(workdir, exist_ok=True)
    kept = set(vocab)
    coverage = sum(normalize(a) in kept for a in raw) / max(len(raw), 1)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(dict(k=int(k), split=split, data_dir=data_dir, num_questions=len(raw),
                     train_coverage=coverage, answers=vocab), f, indent=1)
    os.replace(tmp, path)
  return vocab
