"""MAMA's meta set: a clean, balanced subset of a training split, held out of training.

`build` picks `per_group` clips of every group of a record field (the label, its text, or the
first entity), seeded, copies their records into split `out_split` of the same data directory
(with shard manifests) and lists their ids in `DIR/<out_split>.ids.txt`. Training streams
leave the listed clips out (`data.exclude_ids`), so the meta set is never trained on, and it is
never an evaluation split.
"""
from __future__ import annotations

import collections
import os

import numpy as np
import tensorflow as tf

from vlp_jax.data import records

FIELDS = {"label": records.LABEL_INDEX, "label_text": records.LABEL_TEXT,
          "entity": records.ENTITIES}


def ids_path(data_dir: str, split: str) -> str:
  """DIR/<split>.ids.txt: the clip ids of a meta split, one per line."""
  return os.path.join(data_dir, f"{split}.ids.txt")


def read_ids(path: str) -> list[str]:
  """Clip ids of an ids file (one per line)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"clip id list {path!r} not found (python -m launch.meta_set "
                            "writes DIR/<meta split>.ids.txt)")
  with open(path, encoding="utf-8") as f:
    return [line.strip() for line in f if line.strip()]


def _group(record: bytes, field: str) -> str | None:
  ex = records.example_to_dict(record)
  values = ex.get(FIELDS[field], [])
  if field == "label":
    return str(values[0]) if values and int(values[0]) >= 0 else None
  if not values or not values[0]:
    return None
  v = values[0]
  return v.decode() if isinstance(v, bytes) else str(v)


def build(data_dir: str, *, split: str, field: str, per_group: int, seed: int,
          out_split: str = "meta", num_shards: int = 1) -> dict:
  """Writes the balanced meta split; returns {"groups": {group: count}, "clips", "ids_file"}.

  Raises:
    ValueError: an unknown field, no clip with the field, or a group with fewer than
      `per_group` clips (named with its count).
    FileExistsError: `out_split` already has shards (delete them to rebuild).
  """
  if field not in FIELDS:
    raise ValueError(f"meta set field {field!r}: choose one of {sorted(FIELDS)}")
  if per_group < 1:
    raise ValueError(f"per_group must be >= 1, got {per_group}")
  if out_split == split:
    raise ValueError("the meta split must differ from the training split")
  try:
    existing = records.split_files(data_dir, out_split)
  except FileNotFoundError:
    existing = []
  if existing:
    raise FileExistsError(f"split {out_split!r} already exists in {data_dir!r}; remove its "
                          "shards to rebuild the meta set")
  by_group: dict[str, list[tuple[str, bytes]]] = collections.defaultdict(list)
  for shard in records.split_files(data_dir, split):
    for raw in tf.data.TFRecordDataset(shard):
      record = raw.numpy()
      group = _group(record, field)
      if group is not None:
        clip_id = records.example_to_dict(record)[records.VIDEO_ID][0].decode()
        by_group[group].append((clip_id, record))
  if not by_group:
    raise ValueError(f"no clip of split {split!r} in {data_dir!r} has a {field!r} "
                     f"({FIELDS[field]})")
  short = {g: len(v) for g, v in by_group.items() if len(v) < per_group}
  if short:
    g = min(short, key=short.get)
    raise ValueError(f"the meta set cannot be balanced: group {g!r} of field {field!r} has "
                     f"{short[g]} clips, fewer than per_group={per_group} "
                     f"({len(short)} group(s) short)")
  rng = np.random.default_rng(seed)
  chosen = []
  for g in sorted(by_group):
    items = sorted(by_group[g])  # by id: the choice depends on the seed only
    chosen += [items[i] for i in sorted(rng.choice(len(items), per_group, replace=False))]
  with records.ShardedWriter(data_dir, out_split, num_shards) as writer:
    for _, record in chosen:
      writer.write(record)
  path = ids_path(data_dir, out_split)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.writelines(f"{clip_id}\n" for clip_id, _ in chosen)
  os.replace(path + ".tmp", path)
  return {"groups": {g: per_group for g in sorted(by_group)}, "clips": len(chosen),
          "available": {g: len(v) for g, v in sorted(by_group.items())}, "ids_file": path}
