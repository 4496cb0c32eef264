"""Builds the loaders a run needs from its config (the trainer's one entry into data/).

TensorFlow is imported only for `data.source` "tfrecord" or "tfds", so the device benchmark path
(`data.source = "random"`) runs without it.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
from jax.experimental import multihost_utils

from vlp_jax.data import answers as answers_lib
from vlp_jax.data import clip_tokenizer, mixture, synthetic
from vlp_jax.data import tokenizer as tok
from vlp_jax.data.random_source import RandomLoader


def resolve_dir(config, workdir: str) -> str | None:
  """The dataset directory: `config.data.dir`, or WORKDIR/data (generated when synthetic).
  With `data.source = "tfds"` the records are TFDS's: `data.dir` (optional) only holds
  vocab.txt. A config with a `data.clip_tokenizer` section and no `data.vocab` also gets
  DIR/clip_tokenizer/ (see `vocab_path`), built here from the captions of
  `data.clip_tokenizer.splits` when it is missing.

  Raises:
    FileNotFoundError: the directory does not exist and no synthetic corpus is configured.
  """
  d = config.data
  if d.source == "tfds":
    return os.path.abspath(d.dir) if d.dir else None
  path = os.path.abspath(d.dir) if d.dir else os.path.join(os.path.abspath(workdir), "data")
  if d.synthetic.generate:
    if jax.process_index() == 0:
      synthetic.ensure(path, d.synthetic)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("synthetic corpus ready")
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f"data directory {path!r} does not exist: set --config.data.dir to a directory of "
        "TFRecord shards (see `python -m launch.ingest`), or use a preset that generates the "
        "synthetic corpus")
  if _builds_clip_tokenizer(config):
    ct = d.clip_tokenizer
    if jax.process_index() == 0:
      clip_tokenizer.ensure_clip_tokenizer(path, tuple(ct.splits), int(ct.vocab_size))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("clip tokenizer ready")
  return path


def _builds_clip_tokenizer(config) -> bool:
  return not config.data.vocab and "clip_tokenizer" in config.data


def vocab_path(config, data_dir: str | None) -> str:
  """The tokenizer a run reads: `data.vocab` (a BERT vocab.txt or a transformers tokenizer
  directory); "" = DATA_DIR/clip_tokenizer/ for a config with a `data.clip_tokenizer` section
  (a CLIP BPE learned from the corpus's captions, `vlp_jax.data.clip_tokenizer`), else
  DATA_DIR/vocab.txt."""
  if config.data.vocab:
    return config.data.vocab
  if data_dir is None:
    raise ValueError("data.vocab is empty and there is no data directory to find the "
                     "tokenizer in")
  if _builds_clip_tokenizer(config):
    return os.path.join(data_dir, clip_tokenizer.TOKENIZER_DIR)
  return os.path.join(data_dir, "vocab.txt")


class TextInfo:
  """Tokenizer (None for random data) and the vocabulary facts the model and masking need.

  `answers`: the video-QA answer vocabulary (list of str), None for caption tasks.
  """

  def __init__(self, tokenizer: Any, vocab_size: int, answers: list[str] | None = None):
    self.tokenizer = tokenizer
    self.vocab_size = vocab_size
    self.answers = answers


def text_info(config, data_dir: str | None, workdir: str | None = None) -> TextInfo:
  """Tokenizer, and for video QA (`config.model.num_answers` > 0) the answer vocabulary:
  `WORKDIR/answers.json`, built from `data.train_split` on first use."""
  if config.data.source == "random":
    size = int(config.model.text.vocab_size)
    if size <= 0:
      raise ValueError("data.source='random' needs config.model.text.vocab_size > 0")
    return TextInfo(None, size)
  if not config.data.vocab and not data_dir:
    raise ValueError("data.source='tfds' needs data.vocab (a WordPiece vocab.txt) or data.dir "
                     "holding vocab.txt")
  t = tok.load_tokenizer(vocab_path(config, data_dir))
  answers = None
  k = int(config.model.get("num_answers", 0))
  if k > 0:
    if workdir is None:
      raise ValueError("a QA config (model.num_answers > 0) needs the run's workdir for "
                       "answers.json")
    answers = answers_lib.load_or_build(workdir, data_dir, config.data.train_split, k,
                                        write=jax.process_index() == 0)
  return TextInfo(t, len(t), answers)


def stream_loader(config, data_dir: str | None, text: TextInfo, stream, batch_per_process: int):
  """Infinite host-local batches of one named stream (this process's rows of each global batch).

  Args:
    stream: a `vlp_jax.core.task.Stream`: its `split` (None = `data.train_split`),
      `seed_offset`, `exclude_ids` and `image_mix`. With `image_mix` and
      `data.image_ratio` > 0, each step is instead, with that probability, a batch of the
      still images of split `data.image_split` in `data.image_dir` ("" = the data
      directory): a `mixture.MixtureLoader`, whose batches also carry `is_image` bool [B].
      A stream of `data.train_split` also draws captions from the side files
      `data.extra_captions` (see `read_captions`). A stream with `features` (a
      `feature_loader.FeatureSource`) reads windows of the split's cached frame features
      instead of its records (`feature_loader.FeatureLoader`).
  """
  d = config.data
  seed = int(config.seed) + int(stream.seed_offset)
  split = stream.split or d.train_split
  if stream.features is not None:  # cached frame features (`Stream.features`), no records
    from vlp_jax.data import feature_loader  # noqa: PLC0415
    return feature_loader.FeatureLoader(stream.features, split, batch_size=batch_per_process,
                                        training=True, seed=seed,
                                        process_index=jax.process_index(),
                                        process_count=jax.process_count())
  exclude = _exclude_ids(stream.exclude_ids)
  # Generated captions extend the training split only: other streams (a meta set) stay as
  # annotated.
  spec = d.get("extra_captions", "")
  extra = read_captions(spec) if spec and split == d.train_split else None
  video = _train_loader(config, data_dir, split, text, batch_per_process, seed, exclude, extra)
  ratio = float(d.get("image_ratio", 0.0))
  if not stream.image_mix or ratio <= 0.0:
    return video
  image_dir = os.path.abspath(d.image_dir) if d.get("image_dir", "") else data_dir
  # Another seed: the two loaders' shuffles and MLM masks are independent.
  image = _train_loader(config, image_dir, d.image_split, text, batch_per_process, seed + 1)
  return mixture.MixtureLoader(video, image, ratio, seed)


def _exclude_ids(path: str) -> list[str] | None:
  if not path:
    return None
  from vlp_jax.data import meta_set  # noqa: PLC0415  (imports tensorflow)
  return meta_set.read_ids(path)


def read_captions(paths: str | Sequence[str]) -> dict[str, list[str]]:
  """Extra training captions from caption side files (JSONL, one object with `video_id` and
  `caption` per line, as `python -m launch.augment_captions` writes them).

  Args:
    paths: one path, comma-separated paths, or a list of paths.

  Returns:
    video id -> its captions, in file order; empty and repeated captions are left out.

  Raises:
    FileNotFoundError: a file does not exist (the message names it).
    ValueError: a line is not a JSON object with string `video_id` and `caption` (names the
      file and line). A last line without its newline (a writer still running or
      interrupted) is ignored.
  """
  if isinstance(paths, str):
    paths = paths.split(",")
  out: dict[str, list[str]] = {}
  for path in (p.strip() for p in paths):
    if not path:
      continue
    if not os.path.isfile(path):
      raise FileNotFoundError(f"caption side file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
      lines = f.read().split("\n")
    # After the last newline: "" for a complete file, else a half-written line.
    for number, line in enumerate(lines[:-1], 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        video_id, caption = row["video_id"], row["caption"]
      except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}:{number}: not a caption line ({type(e).__name__}: {e})") from e
      if not isinstance(video_id, str) or not isinstance(caption, str):
        raise ValueError(f"{path}:{number}: video_id and caption must be strings")
      caption = caption.strip()
      captions = out.setdefault(video_id, [])
      if caption and caption not in captions:
        captions.append(caption)
  return {k: v for k, v in out.items() if v}


def _train_loader(config, data_dir, split, text, batch_per_process, seed, exclude=None,
                  extra_captions=None):
  d = config.data
  if d.source == "random":
    return RandomLoader(batch_size_global=config.batch_size, num_frames=d.num_frames,
                        image_size=d.image_size, max_text_len=d.max_text_len,
                        vocab_size=text.vocab_size, seed=seed,
                        process_index=jax.process_index(), process_count=jax.process_count())
  if d.source not in ("tfrecord", "tfds"):
    raise ValueError(f"config.data.source must be 'tfrecord', 'tfds' or 'random', got "
                     f"{d.source!r}")
  from vlp_jax.data import pipeline  # noqa: PLC0415  (imports tensorflow)
  loader = pipeline.TfdsLoader if d.source == "tfds" else pipeline.Loader
  return loader(d, split, batch_size=batch_per_process, training=True, seed=seed,
                tokenizer=text.tokenizer, num_frames=d.num_frames, image_size=d.image_size,
                process_index=jax.process_index(), process_count=jax.process_count(),
                data_dir=data_dir, answer_vocab=text.answers, exclude_ids=exclude,
                extra_captions=extra_captions)


def eval_loader(config, data_dir: str, split: str, text: TextInfo, batch_per_process: int):
  """One deterministic pass over `split`; the last batch is padded with valid=False rows."""
  from vlp_jax.data import pipeline  # noqa: PLC0415  (imports tensorflow)
  d = config.data
  loader = pipeline.TfdsLoader if d.source == "tfds" else pipeline.Loader
  return loader(d, split, batch_size=batch_per_process, training=False, seed=config.seed,
                tokenizer=text.tokenizer, num_frames=d.num_frames, image_size=d.image_size,
                process_index=jax.process_index(), process_count=jax.process_count(),
                data_dir=data_dir, answer_vocab=text.answers)


def expected_count(config, data_dir: str | None, split: str) -> int | None:
  """Clips of `split` as written (shard manifests, or TFDS's split info), None when unknown."""
  if config.data.source == "tfds":
    from vlp_jax.data import pipeline  # noqa: PLC0415  (imports tensorflow)
    return int(pipeline.tfds_builder(config.data.tfds).info.splits[split].num_examples)
  from vlp_jax.data import records  # noqa: PLC0415  (imports tensorflow)
  return records.expected_count(data_dir, split)
