"""tf.data input pipeline: TFRecord shards -> host-local numpy batches.

Per process: its files (`files[process_index::process_count]`) -> (training: seeded file
shuffle, repeat, interleave, seeded record shuffle) -> parse -> pick frame indices from
`video/num_frames` -> check the selected JPEGs (corrupt clips dropped and counted) -> decode
only those frames, crop and resize (the same crop for every frame of a clip) -> batch ->
(Python) tokenise captions + MLM masking.

Determinism: all randomness inside tf.data is stateless, keyed by (seed, process, element
counter), and the Python text rng is keyed by (seed, process, batch counter), so the same
seed gives the same batches, and a restored iterator continues exactly as the uninterrupted
one would.
"""
from __future__ import annotations

import copy
import json
import os
import threading
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging

from vlp_jax.data import answers as answers_lib
from vlp_jax.data import records, text

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAMPLING_MODES = ("rand", "headtail", "uniform")
BATCH_KEYS = ("video", "text_ids", "text_mask", "mlm_ids", "mlm_labels", "valid", "label",
              "video_id")


def frame_indices(n: tf.Tensor, num_frames: int, mode: str, u: tf.Tensor | None = None
                  ) -> tf.Tensor:
  """Which stored frames to use, in time order.

  Args:
    n: int32 scalar >= 1, number of stored frames.
    num_frames: T, frames to pick (repeats when n < T).
    mode: `rand` (split [0, n) into T equal integer segments, one uniform index in each),
      `uniform` (segment centres), `headtail` (first and last frame, evenly spaced ones in
      between; T == 1 gives the first frame).
    u: float32 [T] uniforms in [0, 1) for `rand`.

  Returns:
    int32 [T] non-decreasing indices in [0, n).
  """
  n = tf.cast(n, tf.int32)
  t = num_frames
  i = tf.range(t, dtype=tf.int32)
  if mode == "rand":
    start = (i * n) // t
    length = tf.maximum((i + 1) * n // t - start, 1)  # n < T: empty segments repeat a frame
    offset = tf.cast(tf.floor(u * tf.cast(length, tf.float32)), tf.int32)
    idx = start + tf.minimum(offset, length - 1)
  elif mode == "uniform":
    idx = ((2 * i + 1) * n) // (2 * t)
  elif mode == "headtail":
    if t == 1:
      idx = tf.zeros([1], tf.int32)
    else:
      idx = (2 * i * (n - 1) + (t - 1)) // (2 * (t - 1))  # round(i * (n-1) / (T-1))
  else:
    raise ValueError(f"unknown frame sampling mode {mode!r}; expected one of {SAMPLING_MODES}")
  return tf.clip_by_value(idx, 0, n - 1)


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(frames: tf.Tensor) -> tf.Tensor:
  """bool [K]: starts with the PNG signature (TFDS video features store PNG frames)."""
  lens = tf.strings.length(frames)
  return tf.strings.substr(frames, tf.zeros_like(lens), tf.fill(tf.shape(lens), 8)) == _PNG_MAGIC


def _looks_like_image(frames: tf.Tensor) -> tf.Tensor:
  """bool [K]: a complete-looking JPEG (FFD8 ... FFD9, tf.io.is_jpeg) or a PNG; no decode."""
  lens = tf.strings.length(frames)
  two = tf.fill(tf.shape(lens), 2)
  head = tf.strings.substr(frames, tf.zeros_like(lens), two) == b"\xff\xd8"
  tail = tf.strings.substr(frames, tf.maximum(lens - 2, 0), two) == b"\xff\xd9"
  magic = tf.map_fn(tf.io.is_jpeg, frames, fn_output_signature=tf.bool)
  return ((lens >= 4) & head & tail & magic) | ((lens > 8) & _is_png(frames))


def _seeds(seed: int, process_index: int) -> dict[str, int]:
  state = np.random.SeedSequence([seed, process_index, 0x7DA7A]).generate_state(3, np.uint32)
  return dict(files=int(state[0]), records=int(state[1]), elements=int(state[2]))


def parse_swap(spec: str) -> tuple[tuple[str, str], ...]:
  """`data.reverse_twins.swap`: "a>b,c>d" (directed word rewrites; "a:b" = both ways) -> pairs;
  "" = the synthetic corpus's table (`synthetic.REVERSED_WORDS`)."""
  if not spec.strip():
    from vlp_jax.data import synthetic  # noqa: PLC0415  (its tables only; PIL drawing unused)
    return synthetic.REVERSED_WORDS
  pairs = []
  for item in spec.split(","):
    item = item.strip()
    sep = ">" if ">" in item else ":"
    parts = [w.strip() for w in item.split(sep)]
    if len(parts) != 2 or not all(parts) or not all(w.isalnum() for w in parts):
      raise ValueError(f"data.reverse_twins.swap: {item!r} is not 'word>word' or 'word:word'")
    pairs.append(tuple(parts))
    if sep == ":":
      pairs.append((parts[1], parts[0]))
  return tuple(pairs)


def swap_words(captions: tf.Tensor, pairs: tuple[tuple[str, str], ...]) -> tf.Tensor:
  """Every whole word `a` of each caption replaced by `b` for each pair (a, b), all at once
  (a word rewritten is not rewritten again); string tensor of any shape."""
  out = captions
  # Two passes through placeholders: "left" -> "right" must not become "left" again.
  for i, (a, _) in enumerate(pairs):
    out = tf.strings.regex_replace(out, rf"\b{a}\b", f"@@{i}@@")
  for i, (_, b) in enumerate(pairs):
    out = tf.strings.regex_replace(out, f"@@{i}@@", b)
  return out


def decode_frame(frame: tf.Tensor, window: tf.Tensor, png: tf.Tensor, size: int) -> tf.Tensor:
  """One stored frame (JPEG or PNG bytes) cropped to `window` int32 [4] (top, left, height,
  width) and resized to float32 [size, size, 3] in 0..255 (bilinear, antialiased)."""
  img = tf.cond(
      png, lambda: tf.image.crop_to_bounding_box(tf.io.decode_png(frame, channels=3),
                                                 window[0], window[1], window[2], window[3]),
      lambda: tf.io.decode_and_crop_jpeg(frame, window, channels=3))
  return tf.image.resize(img, [size, size], method="bilinear", antialias=True)


class Loader:
  """Host-local batches of one split.

  Iterating yields dicts:
    video: float32 [B, T, H, W, 3], CLIP-normalised.
    text_ids, text_mask: int32 [B, L] ([CLS] caption [SEP] pad; L = data_cfg.max_text_len).
    mlm_ids, mlm_labels: int32 [B, L] (labels -100 where not masked and on invalid rows).
    valid: bool [B] (False only on eval padding rows).
    label: int32 [B] the clip's class (`clip/label/index`); -1 when the record has none, on
      padding rows and on time-reversed twins.
    twin: int32 [B], only with `data.reverse_twins.rate` > 0 in training: the row offset of a
      row's time-reversed twin in the batch (row r's twin is row r + twin[r]), 0 = none.
      Offsets, not indices, so they stay right when process batches are concatenated.
    video_id: object [B] of bytes (host-only; b"" on padding rows).
  Training: infinite, shuffled, random caption per clip. Eval: one deterministic pass, first
  caption per clip, the last batch padded to `batch_size` with valid=False rows.

  Video QA (`answer_vocab` given): the text is a question instead of a caption, and batches
  also hold `answer_idx` int32 [B] (index in `answer_vocab`, -1 when out of vocabulary and on
  padding rows). Training draws one random question per clip visit (clips without questions
  are passed over); eval yields one example per (clip, question), in record order.

  Args:
    data_cfg: `config.data` (dir, train_sampling, eval_sampling, crop_scale, flip,
      max_text_len, mlm_prob, shuffle_buffer, num_parallel_calls, prefetch).
    split: split name (files `<split>-XXXXX-of-XXXXX.tfrecord`).
    batch_size: per-process batch size B.
    training: shuffled infinite stream with augmentation, else one deterministic pass.
    seed: everything random derives from (seed, process_index).
    tokenizer: BERT tokenizer (tokenizer.load_tokenizer).
    num_frames, image_size: T and H = W of the output video.
    process_index, process_count: this process reads files[process_index::process_count].
    data_dir: overrides `data_cfg.dir` (e.g. the resolved `WORKDIR/data`).
    answer_vocab: the QA answer vocabulary (answers.load_or_build); None = captions.
    exclude_ids: clip ids a training stream never yields (e.g. MAMA's held-out meta set).
    extra_captions: video id -> further captions (MAMA's generated ones, `setup.read_captions`);
      training draws each clip's caption uniformly from its record's captions and these.
      Evaluation and QA ignore them.

  Attributes:
    files: this process's shard files.
    skipped: clips dropped so far because a selected frame was not a well-formed JPEG.
    corrupt_records: records lost to truncated, corrupt or unreadable shards (found at start,
      from the shards' manifests).
    step: batches delivered so far.
  """

  def __init__(self, data_cfg, split: str, *, batch_size: int, training: bool, seed: int,
               tokenizer, num_frames: int, image_size: int, process_index: int = 0,
               process_count: int = 1, data_dir: str | None = None,
               answer_vocab: list[str] | None = None, exclude_ids: list[str] | None = None,
               extra_captions: dict[str, list[str]] | None = None):
    self.cfg = data_cfg
    self.exclude_ids = sorted(set(exclude_ids or ()))
    self.split = split
    self.batch_size = int(batch_size)
    self.training = bool(training)
    self.seed = int(seed)
    self.tokenizer = tokenizer
    self.num_frames = int(num_frames)
    self.image_size = int(image_size)
    self.process_index = int(process_index)
    self.process_count = int(process_count)
    self.max_text_len = int(data_cfg.max_text_len)
    self.qa = answer_vocab is not None
    self.answer_index = {a: i for i, a in enumerate(answer_vocab or ())}
    self.sampling = data_cfg.train_sampling if training else data_cfg.eval_sampling
    if self.sampling not in SAMPLING_MODES:
      raise ValueError(f"frame sampling {self.sampling!r} not in {SAMPLING_MODES}")
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    self.corrupt_records = 0
    self.special_ids = sorted(set(tokenizer.all_special_ids))
    self.vocab_size = len(tokenizer)
    self.mask_id = tokenizer.mask_token_id
    self._seeds = _seeds(self.seed, self.process_index)
    # The tf.data map's own copy: transformers' fast tokenizers must not be used from two
    # threads at once (eval batches are tokenised on the main thread meanwhile).
    self._pipeline_tokenizer = copy.deepcopy(tokenizer)
    self._tokenizer_lock = threading.Lock()
    twins = data_cfg.get("reverse_twins", {})
    rate = float(twins.get("rate", 0.0)) if self.training and not self.qa else 0.0
    if not 0.0 <= rate <= 0.5:
      raise ValueError(f"data.reverse_twins.rate must be in [0, 0.5], got {rate}")
    self._twins = int(rate * self.batch_size)
    self._swap_pairs = parse_swap(str(twins.get("swap", "")))
    self._extra_captions = (self._caption_table(extra_captions)
                            if extra_captions and self.training and not self.qa else None)
    self._iterator = iter(self._dataset(self._source(data_dir)))
    self._ckpt = tf.train.Checkpoint(iterator=self._iterator)
    self.skipped = 0
    self.step = 0
    self._done = False

  # ----------------------------------------------------------------------------- tf.data
  def _npc(self):
    npc = self.cfg.num_parallel_calls
    return tf.data.AUTOTUNE if npc in (-1, None) else int(npc)

  def _context_keys(self) -> tuple[str, ...]:
    keys = (records.VIDEO_ID, records.NUM_FRAMES, records.CAPTIONS, records.LABEL_INDEX)
    if self.qa:
      keys += (records.QUESTIONS, records.ANSWERS)
    elif not self.training:
      keys += (records.CONTRAST,)
    return keys

  def _parse(self, serialized) -> dict[str, tf.Tensor]:
    return records.parse_clip(serialized, context_keys=self._context_keys())

  def _sentinel_example(self) -> tf.data.Dataset:
    """One marker element (parsed, flagged) that ends an eval pass; see `_dataset`."""
    return tf.data.Dataset.from_tensors(tf.constant(self._sentinel())).map(
        lambda s: (self._parse(s), True))

  def _source(self, data_dir: str | None) -> tf.data.Dataset:
    """(parsed clip dict in `records.parse_clip`'s layout, is-end-marker) pairs of this
    process's share of the split: shuffled and repeated for training, one pass for eval."""
    split = self.split
    data_dir = data_dir if data_dir is not None else self.cfg.dir
    if not data_dir:
      raise ValueError("data.dir is empty: pass the resolved data directory")

    all_files = records.split_files(data_dir, split)
    mine = all_files[self.process_index::self.process_count]
    if not mine:
      raise ValueError(
          f"process {self.process_index} of {self.process_count} gets no files of split "
          f"{split!r}: {len(all_files)} file(s) in {data_dir!r}; write at least as many "
          "shards as processes")
    # A shard that is truncated or corrupt (its size differs from its manifest) keeps what is
    # still readable and counts the rest; one that cannot be read at all is left out. Both are
    # named here, at start.
    self.corrupt_records = 0
    readable = []
    for f in mine:
      problem = records.check_shard(f)
      if problem is None:
        readable.append(f)
        continue
      lost, reason = problem
      self.corrupt_records += lost
      logging.warning("split %r: shard %s %s: %d records lost", split, f, reason, lost)
      if not reason.startswith("cannot be read"):
        readable.append(f)
    self.files = mine
    nonempty = [f for f in readable if os.path.getsize(f) > 0]  # empty shards: nothing to read
    if self.training and not nonempty:
      # repeat() over files without records would spin forever.
      raise ValueError(f"process {self.process_index}: all its files of split {split!r} are "
                       f"empty: {mine}")

    files = nonempty
    cfg = self.cfg
    npc = self._npc()
    files_ds = tf.data.Dataset.from_tensor_slices(tf.constant(files, tf.string))
    if self.training:
      files_ds = files_ds.shuffle(len(files), seed=self._seeds["files"],
                                  reshuffle_each_iteration=True).repeat()
      ds = files_ds.interleave(tf.data.TFRecordDataset, cycle_length=min(len(files), 16),
                               block_length=1, num_parallel_calls=npc, deterministic=True)
      if self.exclude_ids:
        ds = ds.filter(self._not_excluded())
      ds = ds.shuffle(int(cfg.shuffle_buffer), seed=self._seeds["records"],
                      reshuffle_each_iteration=True)
      return ds.map(lambda s: (self._parse(s), False), num_parallel_calls=npc,
                    deterministic=True)
    ds = files_ds.flat_map(tf.data.TFRecordDataset).map(
        lambda s: (self._parse(s), False), num_parallel_calls=npc, deterministic=True)
    # One marker element at the end: it carries the final skip count out of the pipeline
    # even when the last real clips were dropped, and ends the pass.
    return ds.concatenate(self._sentinel_example())

  # ----------------------------------------------------------------------------- tf.data
  def _dataset(self, ds: tf.data.Dataset) -> tf.data.Dataset:
    cfg = self.cfg
    npc = self._npc()
    ds = ds.enumerate()
    ds = ds.map(self._select, num_parallel_calls=npc, deterministic=True)

    def count(total, x):
      total += tf.cast(~x["ok"] & ~x["sentinel"], tf.int64)
      return total, dict(x, skipped=total)
    ds = ds.scan(tf.constant(0, tf.int64), count)
    ds = ds.filter(lambda x: (x["ok"] & x["has_text"]) | x["sentinel"])
    ds = ds.map(self._decode, num_parallel_calls=npc, deterministic=True)
    if self.qa and not self.training:
      ds = ds.flat_map(self._per_question)
    ds = ds.ignore_errors(log_warning=True)  # last defence: a JPEG that passed the checks
    ds = ds.batch(self.batch_size, drop_remainder=self.training)
    if self._twins:
      ds = ds.map(self._reversed_twins, num_parallel_calls=npc, deterministic=True)
    # Tokenisation and MLM masking inside tf.data: off the training thread, prefetched with
    # the frames, and part of the iterator checkpoint (exact resume positions).
    ds = ds.enumerate().map(self._tokenize_batch, num_parallel_calls=npc, deterministic=True)
    ds = ds.prefetch(int(cfg.prefetch))
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)

  def _reversed_twins(self, b):
    """Direction negatives: the last n = rate x B rows of a training batch become the first n
    clips played backwards, captioned with their direction words swapped (`swap_words`). A
    clip whose caption has no direction word keeps its row. Each such pair differs only in
    the direction of time, so VTC and VTM must look at frame order to tell them apart."""
    n = self._twins
    caption = b["caption"]
    src = caption[:n]
    swapped = swap_words(src, self._swap_pairs)
    has = tf.not_equal(swapped, src)
    rows = tf.shape(caption)[0]

    def place(x, twin):
      keep = tf.reshape(has, [-1] + [1] * (len(x.shape) - 1))
      tail = tf.where(keep, twin, x[rows - n:])
      return tf.concat([x[:rows - n], tail], 0)
    out = dict(b)
    out["video"] = place(b["video"], tf.reverse(b["video"][:n], axis=[1]))
    out["caption"] = place(caption, swapped)
    out["video_id"] = place(b["video_id"], tf.strings.join([b["video_id"][:n], "#reversed"]))
    # A reversed clip's class is not known generically (no class map of opposites here).
    out["label"] = place(b["label"], tf.fill([n], tf.constant(-1, b["label"].dtype)))
    gap = tf.cast(rows - n, tf.int32)
    pair = tf.cast(has, tf.int32) * gap
    out["twin"] = tf.concat([pair, tf.zeros([rows - 2 * n], tf.int32), -pair], 0)
    return out

  def _tokenize_batch(self, index, b):
    """Adds `text_ids`, `text_mask`, `mlm_ids`, `mlm_labels` int32 [b, L] to a batch; the MLM
    draw is seeded by (seed, process, batch index), so it is the same after a resume."""
    def tokenize(captions, sentinel, index):
      with self._tokenizer_lock:  # one tokenizer per loader, used by one thread at a time
        ids, mask = text.tokenize(self._pipeline_tokenizer,
                                  [c.decode("utf-8", "replace") for c in captions],
                                  self.max_text_len)
      rng = np.random.default_rng([self.seed, self.process_index, int(index), 0x313])
      mlm_ids, labels = text.mlm_mask(ids, mask, rng, vocab_size=self.vocab_size,
                                      mask_id=self.mask_id, special_ids=self.special_ids,
                                      prob=float(self.cfg.mlm_prob))
      labels[sentinel] = text.IGNORE_LABEL
      return [np.asarray(x, np.int32) for x in (ids, mask, mlm_ids, labels)]
    out = tf.numpy_function(tokenize, [b["caption"], b["sentinel"], index], [tf.int32] * 4,
                            stateful=False)
    names = ("text_ids", "text_mask", "mlm_ids", "mlm_labels")
    for x in out:
      x.set_shape([None, self.max_text_len])
    return dict(b, **dict(zip(names, out)))

  def _not_excluded(self):
    """A tf.data predicate: the record's clip id is not in `exclude_ids`."""
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(self.exclude_ids, tf.string),
                                            tf.ones([len(self.exclude_ids)], tf.bool)),
        default_value=False)
    spec = {records.VIDEO_ID: tf.io.FixedLenFeature([], tf.string)}

    def keep(serialized):
      ctx, _ = tf.io.parse_single_sequence_example(serialized, context_features=spec)
      return tf.logical_not(table.lookup(ctx[records.VIDEO_ID]))
    return keep

  @staticmethod
  def _caption_table(extra: dict[str, list[str]]) -> tf.lookup.StaticHashTable:
    """video id -> its extra captions joined with the unit separator ("" when none)."""
    ids = sorted(extra)
    joined = ["\x1f".join(c.replace("\x1f", " ") for c in extra[i]) for i in ids]
    return tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(ids, tf.string),
                                            tf.constant(joined, tf.string)),
        default_value="")

  @staticmethod
  def _sentinel() -> bytes:
    jpeg = tf.io.encode_jpeg(tf.zeros([8, 8, 3], tf.uint8)).numpy()
    return records.clip_example("", [jpeg], [""], 0.0).SerializeToString()

  def _select(self, index, pair):
    """Choose frame indices and caption, check the chosen frames (no decoding)."""
    ex, sentinel = pair
    frames = ex[records.FRAMES]
    stored = tf.shape(frames, out_type=tf.int32)[0]
    declared = tf.cast(ex[records.NUM_FRAMES], tf.int32)
    n = tf.where(declared > 0, tf.minimum(declared, stored), stored)
    key = tf.stack([tf.constant(self._seeds["elements"], tf.int64), index])
    keys = tf.random.experimental.stateless_split(key, 3)
    u = tf.random.stateless_uniform([self.num_frames], seed=keys[0])
    idx = frame_indices(tf.maximum(n, 1), self.num_frames, self.sampling, u)
    idx = tf.where(n > 0, idx, stored)  # no frames: points at the b"" pad, fails the check
    unique_idx, frame_pos = tf.unique(idx)  # decode each repeated frame once
    jpegs = tf.gather(tf.concat([frames, [b""]], 0), unique_idx)
    ok = (n > 0) & tf.reduce_all(_looks_like_image(jpegs))
    captions = ex[records.CAPTIONS]
    if self._extra_captions is not None:
      extra = tf.strings.split(self._extra_captions.lookup(ex[records.VIDEO_ID]), "\x1f")
      captions = tf.concat([captions, tf.boolean_mask(extra, extra != "")], 0)
    num_captions = tf.size(captions)
    if self.training:
      pick = tf.random.stateless_uniform([], seed=keys[1], minval=0,
                                         maxval=tf.maximum(num_captions, 1), dtype=tf.int32)
    else:
      pick = 0
    caption = tf.concat([captions, [""]], 0)[pick]  # no caption: empty text
    out = dict(video_id=ex[records.VIDEO_ID], caption=caption, jpegs=jpegs,
               frame_pos=frame_pos, ok=ok, sentinel=sentinel, key=keys[2],
               has_text=tf.constant(True), label=ex[records.LABEL_INDEX])
    if self.qa:
      # Aligned lists; a malformed record with more questions than answers keeps the prefix.
      num_qa = tf.minimum(tf.size(ex[records.QUESTIONS]), tf.size(ex[records.ANSWERS]))
      questions = ex[records.QUESTIONS][:num_qa]
      answers = ex[records.ANSWERS][:num_qa]
      out["has_text"] = num_qa > 0
      if self.training:  # one random question per visit, like captions
        q = tf.random.stateless_uniform([], seed=keys[1], minval=0,
                                        maxval=tf.maximum(num_qa, 1), dtype=tf.int32)
        out["caption"] = tf.concat([questions, [""]], 0)[q]
        out["answer"] = tf.concat([answers, [""]], 0)[q]
      else:
        out["questions"], out["answers"] = questions, answers
    elif not self.training:  # [caption, altered caption], or two empty strings
      probe = ex[records.CONTRAST]
      out["probe"] = tf.where(tf.size(probe) == 2, tf.concat([probe, ["", ""]], 0)[:2],
                              tf.constant(["", ""]))
    return out

  def _decode(self, x):
    """Decode only the chosen frames, crop (same window for all frames) and resize."""
    jpegs = x["jpegs"]
    png = _is_png(jpegs[:1])[0]
    shape = tf.cond(png, lambda: tf.shape(tf.io.decode_png(jpegs[0], channels=3)),
                    lambda: tf.io.extract_jpeg_shape(jpegs[0]))
    h, w = shape[0], shape[1]
    size = self.image_size
    crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(x["key"], 2))
    if self.training:
      lo, hi = self.cfg.crop_scale
      begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
          shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=crop_key,
          min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3),
          area_range=(float(lo), float(hi)), max_attempts=10,
          use_image_if_no_bounding_boxes=True)
      window = tf.stack([begin[0], begin[1], extent[0], extent[1]])
    else:
      # Resize short side then centre crop == centre square crop then resize.
      side = tf.minimum(h, w)
      window = tf.stack([(h - side) // 2, (w - side) // 2, side, side])

    frames = tf.map_fn(lambda frame: decode_frame(frame, window, png, size), jpegs,
                       fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))
    video = tf.gather(frames, x["frame_pos"])
    if self.training and self.cfg.flip:
      flip = tf.random.stateless_uniform([], seed=flip_key) < 0.5
      video = tf.cond(flip, lambda: tf.reverse(video, [2]), lambda: video)
    video = (video / 255.0 - tf.constant(CLIP_MEAN)) / tf.constant(CLIP_STD)
    video = tf.ensure_shape(video, [self.num_frames, size, size, 3])
    out = dict(video=video, video_id=x["video_id"], caption=x["caption"],
               skipped=x["skipped"], sentinel=x["sentinel"], label=x["label"])
    for k in ("probe", "answer", "questions", "answers"):
      if k in x:
        out[k] = x[k]
    return out

  @staticmethod
  def _per_question(x):
    """One eval element per question of a clip (the end marker stays a single element)."""
    questions = tf.cond(x["sentinel"], lambda: tf.constant([""]), lambda: x["questions"])
    answers = tf.cond(x["sentinel"], lambda: tf.constant([""]), lambda: x["answers"])
    clip = {k: v for k, v in x.items() if k not in ("questions", "answers", "caption")}
    return tf.data.Dataset.from_tensor_slices((questions, answers)).map(
        lambda q, a: dict(clip, caption=q, answer=a))

  # ------------------------------------------------------------------------------ python
  def __iter__(self):
    return self

  def __next__(self) -> dict[str, Any]:
    if self._done:
      raise StopIteration
    try:
      b = next(self._iterator)
    except StopIteration:
      self._done = True
      raise
    sentinel = b["sentinel"].numpy()
    self.skipped = max(self.skipped, int(b["skipped"].numpy().max()))
    if sentinel.all():  # only the end marker left: the eval pass is over
      self._done = True
      raise StopIteration
    video = b["video"].numpy()
    video_id = b["video_id"].numpy()
    valid = ~sentinel
    pad = self.batch_size - len(valid)
    if pad > 0:
      video = np.concatenate([video, np.zeros((pad,) + video.shape[1:], video.dtype)])
      video_id = np.concatenate([video_id, np.full(pad, b"", object)])
      valid = np.concatenate([valid, np.zeros(pad, bool)])
    video[~valid] = 0.0  # the end marker row looks like padding
    video_id = np.asarray([v if ok else b"" for v, ok in zip(video_id, valid)], object)
    tokens = {k: b[k].numpy() for k in ("text_ids", "text_mask", "mlm_ids", "mlm_labels")}
    if pad > 0:  # padding rows: the empty caption, no MLM labels
      empty_ids, empty_mask = text.tokenize(self.tokenizer, [""], self.max_text_len)
      fill = {"text_ids": empty_ids, "text_mask": empty_mask, "mlm_ids": empty_ids,
              "mlm_labels": np.full_like(empty_ids, text.IGNORE_LABEL)}
      tokens = {k: np.concatenate([v, np.repeat(fill[k], pad, axis=0)]) for k, v in
                tokens.items()}
    self.step += 1
    label = np.concatenate([b["label"].numpy(), np.full(pad, -1, np.int64)])
    batch = dict(video=video, valid=valid, video_id=video_id,
                 label=np.where(valid, label, -1).astype(np.int32), **tokens)
    if "twin" in b:  # training only: no padding rows
      batch["twin"] = b["twin"].numpy().astype(np.int32)
    if self.qa:
      answer = np.concatenate([b["answer"].numpy(), np.full(pad, b"", object)])
      idx = answers_lib.indices(answer, self.answer_index)
      batch["answer_idx"] = np.where(valid, idx, answers_lib.OOV).astype(np.int32)
    if "probe" in b:
      batch.update(self._probes(b["probe"].numpy(), valid))
    return batch

  def _probes(self, probe: np.ndarray, valid: np.ndarray) -> dict[str, np.ndarray]:
    """Tokenised contrast probes: `probe_ids`, `probe_mask` int32 [B, 2, L], `has_probe` [B]."""
    probe = np.concatenate([probe, np.full((len(valid) - len(probe), 2), b"", object)])
    has = valid & np.array([bool(p[0]) and bool(p[1]) for p in probe])
    flat = [p.decode("utf-8", "replace") for p in probe.reshape(-1)]
    ids, mask = text.tokenize(self.tokenizer, flat, self.max_text_len)
    shape = (len(valid), 2, self.max_text_len)
    return dict(probe_ids=ids.reshape(shape), probe_mask=mask.reshape(shape), has_probe=has)

  # ------------------------------------------------------------------------ checkpointing
  def save(self, path: str) -> None:
    """Saves the iterator position (incl. shuffle buffers) to `path.*` and `path.json`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self._ckpt.write(path)
    state = dict(step=self.step, skipped=self.skipped, done=self._done, split=self.split,
                 process_index=self.process_index, process_count=self.process_count)
    tmp = path + ".json.tmp"
    with open(tmp, "w") as f:
      json.dump(state, f)
    os.replace(tmp, path + ".json")

  def restore(self, path: str) -> None:
    """Restores a position written by `save` into this (identically built) Loader."""
    if not os.path.exists(path + ".json"):
      raise FileNotFoundError(f"no loader state at {path!r}")
    with open(path + ".json") as f:
      state = json.load(f)
    if (state["split"], state["process_index"], state["process_count"]) != (
        self.split, self.process_index, self.process_count):
      raise ValueError(f"loader state {path!r} is for split {state['split']!r}, process "
                       f"{state['process_index']} of {state['process_count']}")
    self._ckpt.read(path).assert_consumed()
    self.step, self.skipped, self._done = state["step"], state["skipped"], state["done"]


def tfds_builder(tfds_cfg):
  """The prepared TFDS dataset `data.tfds` names: `name` (+ `dir` as its data_dir), or a
  dataset version directory in `dir` (`tfds.builder_from_directory`)."""
  import tensorflow_datasets as tfds  # noqa: PLC0415  (slow import, only for this source)
  if tfds_cfg.name:
    return tfds.builder(tfds_cfg.name, data_dir=tfds_cfg.dir or None)
  if not tfds_cfg.dir or not os.path.isdir(tfds_cfg.dir):
    raise FileNotFoundError(f"data.tfds.dir {tfds_cfg.dir!r} is not a prepared TFDS dataset "
                            "directory (or set data.tfds.name)")
  return tfds.builder_from_directory(tfds_cfg.dir)


class TfdsLoader(Loader):
  """`Loader` over a prepared TFDS video dataset (`data.source = "tfds"`, e.g. a user's
  prepared `ucf101`), through the feature mapping `data.tfds`:

    video    a `tfds.features.Video` feature (its encoded frames are read, only the sampled
             ones decoded, as for our records)
    caption  a text feature used as the caption; "" = the class name of `label`
    label    a `ClassLabel` feature (also the caption when `caption` is "")
    id       a feature naming the clip; "" = TFDS's own example id

  Files are split over processes by TFDS (`input_context`); training shuffles the files and
  the examples, evaluation reads the split once in order.
  """

  def _source(self, data_dir):
    del data_dir
    import tensorflow_datasets as tfds  # noqa: PLC0415  (slow import, only for this source)
    m = self.cfg.tfds
    builder = tfds_builder(m)
    info = builder.info
    if self.split not in info.splits:
      raise ValueError(f"TFDS dataset {info.name!r} has no split {self.split!r}; it has "
                       f"{sorted(info.splits)}")
    for key, what in ((m.video, "video"), (m.caption, "caption"), (m.label, "label"),
                      (m.id, "id")):
      if key and key not in info.features:
        raise ValueError(f"data.tfds.{what}={key!r} is not a feature of {info.name!r}; it has "
                         f"{sorted(info.features)}")
    if not m.caption and not m.label:
      raise ValueError("data.tfds needs a caption or a label feature for the text")
    self.files = [f"{info.name}:{self.split}"]
    names = tf.constant(info.features[m.label].names if m.label and not m.caption else [""])
    read = tfds.ReadConfig(
        shuffle_seed=self._seeds["files"], add_tfds_id=True,
        input_context=tf.distribute.InputContext(num_input_pipelines=self.process_count,
                                                 input_pipeline_id=self.process_index))
    ds = builder.as_dataset(split=self.split, shuffle_files=self.training, read_config=read,
                            decoders={m.video: tfds.decode.SkipDecoding()})

    def to_clip(x):
      frames = x[m.video]
      label = tf.cast(x[m.label], tf.int64) if m.label else tf.constant(-1, tf.int64)
      text = x[m.caption] if m.caption else tf.gather(names, label)
      clip_id = x[m.id] if m.id else x["tfds_id"]
      return {records.VIDEO_ID: tf.strings.as_string(clip_id) if clip_id.dtype != tf.string
              else clip_id,
              records.NUM_FRAMES: tf.cast(tf.shape(frames)[0], tf.int64),
              records.CAPTIONS: tf.reshape(text, [1]), records.FRAMES: frames,
              records.LABEL_INDEX: label,
              records.QUESTIONS: tf.zeros([0], tf.string),
              records.ANSWERS: tf.zeros([0], tf.string),
              records.CONTRAST: tf.zeros([0], tf.string)}

    npc = self._npc()
    if self.training:
      ds = ds.repeat().shuffle(int(self.cfg.shuffle_buffer), seed=self._seeds["records"],
                               reshuffle_each_iteration=True)
      return ds.map(lambda x: (to_clip(x), False), num_parallel_calls=npc, deterministic=True)
    keys = self._context_keys() + (records.FRAMES,)
    ds = ds.map(lambda x: ({k: v for k, v in to_clip(x).items() if k in keys}, False),
                num_parallel_calls=npc, deterministic=True)
    return ds.concatenate(self._sentinel_example())
