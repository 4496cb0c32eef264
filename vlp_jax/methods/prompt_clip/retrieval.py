"""Prompt-CLIP text-video retrieval (task `prompt_clip_retrieval`; Ju et al., ECCV 2022).

The action task (action.py: the same frozen CLIP text tower `init.clip`, feature cache
`data.features`, `prompts` and `temporal` collections) with the learned prompt vectors around
each *caption* instead of a class name: `[SOT] p_1 .. p_P <caption tokens> q_1 .. q_Q [EOT]`
(`model.prompts.template` still wraps the caption, "{}" = the caption alone). A caption must fit
the context: P + Q + its tokens + 2 <= the text tower's context (else an error names it).

Captions: the feature cache holds no text, so the captions of a split are read once, on the
host, from the `caption/string` lists of the records of `data.dir` (`read_captions`; every
process reads every shard) and tokenised once into a `CaptionTable` (row r = one caption, with
its video). Clips without a caption are not trained on.

Training: B windows of `model.num_frames` cached frame features of the training split's clips
(`feature_loader.FeatureLoader`, as in action), each row carrying one of its clip's caption rows
drawn by the loader's seeded generator (`choice`; `FeatureSource.choices`). The step gathers the
B rows' token ids, prompt slots and EOT positions from the caption table (held with the frozen
CLIP, replicated: not a constant of the compiled step) and encodes only those B captions. Loss:
the symmetric InfoNCE over the batch, logits = cos(video, text) / `model.temperature` (0.07,
fixed), the mean of the video->text and text->video cross-entropies of the valid rows
(`losses.vtc_loss` with the padding rows masked; `loss/nce`, `vtc/t2v_acc`, `vtc/v2t_acc`,
`params/trainable`).
Only `prompts` and `temporal` train; the CLIP text tower is a `Frozen` pytree.

Evaluator `retrieval` (`config.evals.<name>.type`): the core's pass over the split's records
lists its clips (`eval/num_clips`; each must be in the cache, or `eval.allow_missing`); a clip's
feature is the L2-normalised mean of the pooled features of `windows` (5) evenly spaced windows;
every caption of those clips, prompted, is a query; similarity = text x video cosine; metrics
of `eval.retrieval.retrieval_metrics` (ties count in the query's favour; v2t: a video's best
caption) -> `retrieval/t2v_R@1`, `_R@5`, `_R@10`, `_MdR`, `_MnR`, the same with `v2t_`, and
`retrieval/captions`, `retrieval/clips` (plus `retrieval/uncached_clips`). The action task's
evaluators are kept (they need `data.classes`).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vlp_jax import losses
from vlp_jax.core import task as task_lib
from vlp_jax.data import feature_loader
from vlp_jax.eval import features
from vlp_jax.eval import retrieval as retrieval_lib
from vlp_jax.methods.prompt_clip import action
from vlp_jax.models import prompts
from vlp_jax.parallel import sharding as shd

KEYS = ("features", "choice", "valid")
TABLE_KEYS = ("ids", "slot", "eot_index")  # what a step gathers of the caption table


def read_captions(data_dir: str, split: str) -> dict[str, list[str]]:
  """{video_id: its captions (`caption/string`, in record order)} of every record of `split`
  in `data_dir` (a repeated id keeps its first record; a record without captions maps to []).

  Raises:
    FileNotFoundError: no shards of the split.
  """
  import tensorflow as tf  # noqa: PLC0415  (only this reader needs it)

  from vlp_jax.data import records  # noqa: PLC0415  (imports tensorflow)
  # The two context fields only, parsed by TF (the frames are skipped, not decoded).
  spec = {records.VIDEO_ID: tf.io.FixedLenFeature([], tf.string),
          records.CAPTIONS: tf.io.RaggedFeature(tf.string)}
  out: dict[str, list[str]] = {}
  for shard in records.split_files(data_dir, split):
    ds = tf.data.TFRecordDataset(shard).map(
        lambda s: tf.io.parse_single_sequence_example(s, context_features=spec)[0])
    try:
      for ex in ds.as_numpy_iterator():
        out.setdefault(ex[records.VIDEO_ID].decode("utf-8"),
                       [c.decode("utf-8", "replace") for c in ex[records.CAPTIONS]])
    except tf.errors.OpError as e:  # the core's pass names and counts what the shard lost
      logging.warning("prompt_clip_retrieval: captions of %s read up to a %s", shard,
                      type(e).__name__)
  return out


@dataclasses.dataclass(frozen=True, eq=False)
class CaptionTable:
  """The prompted tokens of every caption of a split, one row per caption.

  Attributes:
    texts: Nt captions (row order: videos in record order, each video's captions in order).
    video_ids: Nt the video of each row.
    rows: video id -> its rows (int tuple; absent for a video without captions).
    tokens: `prompts.PromptTokens` of the Nt (templated) captions, int32 [Nt, L] / [Nt].
  """
  texts: list[str]
  video_ids: list[str]
  rows: Mapping[str, tuple[int, ...]]
  tokens: prompts.PromptTokens


def _text_batches(tokens: prompts.PromptTokens, rows: np.ndarray, batch_size: int,
                  process_index: int, process_count: int) -> Iterator[dict[str, np.ndarray]]:
  """Host batches of caption rows: process p's rows of each global batch (as the feature loader
  splits them), the last global batch padded with valid=False rows (row 0's tokens).

  Yields {ids, slot int32 [b, L], eot_index int32 [b], valid bool [b]}.
  """
  total = batch_size * process_count
  for start in range(0, len(rows), total):
    take = np.arange(start + process_index * batch_size,
                     start + (process_index + 1) * batch_size)
    valid = take < len(rows)
    r = np.where(valid, rows[np.minimum(take, len(rows) - 1)], rows[0])
    yield {"ids": tokens.ids[r], "slot": tokens.slot[r], "eot_index": tokens.eot_index[r],
           "valid": valid}


@task_lib.register("prompt_clip_retrieval")
class PromptClipRetrievalTask(action.PromptClipActionTask):
  """Prompt vectors around captions and a temporal transformer on a frozen CLIP, trained with
  a symmetric InfoNCE for text-video retrieval (module docstring)."""

  trains_from_frames = False  # reads the feature cache only

  def __init__(self, config, text):
    super().__init__(config, text)
    p = config.protocol
    if self.protocol != "closed" or int(p.k_shot) > 0:
      raise ValueError("prompt_clip_retrieval trains on every captioned clip: set "
                       f"protocol.name='closed' and protocol.k_shot=0 (got {self.protocol!r}, "
                       f"k_shot={int(p.k_shot)})")
    if config.data.get("source", "tfrecord") != "tfrecord" or not config.data.get("dir", ""):
      raise ValueError("prompt_clip_retrieval reads the captions from the records of data.dir "
                       "(data.source='tfrecord'): set --config.data.dir=DATA_DIR")
    self._tables: dict[str, CaptionTable] = {}

  # ---- captions -------------------------------------------------------------------------------

  def caption_table(self, split: str) -> CaptionTable:
    """The `CaptionTable` of `split` of `data.dir` (read and tokenised once per split).

    Raises:
      ValueError: a caption too long for the context with the prompts (naming it); a split
        without any caption.
    """
    if split not in self._tables:
      captions = read_captions(str(self.config.data.dir), split)
      texts, videos, rows = [], [], {}
      for video, caps in captions.items():
        if caps:
          rows[video] = tuple(range(len(texts), len(texts) + len(caps)))
          texts.extend(caps)
          videos.extend([video] * len(caps))
      if not texts:
        raise ValueError(f"split {split!r} of {self.config.data.dir!r} has no captions "
                         "(caption/string) to retrieve")
      p = self.config.model.prompts
      tokens = prompts.build_prompt_tokens(
          self.tokenizer, [self.template.format(t) for t in texts], int(p.prefix),
          int(p.suffix), context_length=self.clip.config.text.max_position,
          layout=str(p.layout), kind="caption")
      logging.info("prompt_clip_retrieval: %d captions of %d clips of split %r", len(texts),
                   len(rows), split)
      self._tables[split] = CaptionTable(texts, videos, rows, tokens)
    return self._tables[split]

  @functools.cached_property
  def init_tokens(self) -> prompts.PromptTokens:
    """The prompt tokens of one empty text: the learned table's size and the init's shapes,
    without reading any caption (and checking the layout)."""
    p = self.config.model.prompts
    return prompts.build_prompt_tokens(
        self.tokenizer, [""], int(p.prefix), int(p.suffix),
        context_length=self.clip.config.text.max_position, layout=str(p.layout),
        kind="caption")

  def frozen_host(self) -> dict[str, Any]:
    """The frozen pytree as host numpy: {"clip": the text tower's float32 params, "captions":
    {ids, slot int32 [Nt, L], eot_index int32 [Nt]} of the training split's caption table}."""
    table = self.caption_table(self.config.data.train_split).tokens
    return {"clip": self._clip_host,
            "captions": {k: np.asarray(getattr(table, k)) for k in TABLE_KEYS}}

  def load_frozen(self, mesh, rules, workdir: str) -> task_lib.Frozen:
    """{"clip": the frozen CLIP text tower (`frozen_on`), "captions": the training split's
    caption table (replicated: every step gathers its batch's rows)}.

    The caption tables of the `retrieval` evaluations' splits are built here too, so that a
    caption too long for the context fails before training, not at its first evaluation.
    """
    for ev in self.config.get("evals", {}).values():
      if ev.get("type") == "retrieval":
        self.caption_table(str(ev.split))
    clip = super().load_frozen(mesh, rules, workdir)
    table = self.frozen_host()["captions"]
    rep = shd.replicated(mesh)
    placed = {k: jax.make_array_from_callback(v.shape, rep, lambda i, v=v: v[i])
              for k, v in table.items()}
    return task_lib.Frozen(params={"clip": clip.params, "captions": placed},
                           shardings={"clip": clip.shardings,
                                      "captions": {k: rep for k in table}})

  # ---- data -----------------------------------------------------------------------------------

  def feature_source(self, *, train: bool) -> feature_loader.FeatureSource:
    """The cache of `data.features`, every clip (labelled or not); for training only the
    captioned clips of the training split, each row with one of its caption rows."""
    d = self.config.data
    choices = self.caption_table(d.train_split).rows if train else None
    return feature_loader.FeatureSource(
        dir=str(d.features), length=self.num_frames, strides=tuple(float(s) for s in d.strides),
        expect=self.cache_expect, allow_missing=bool(d.get("features_allow_missing", False)),
        require_labels=False, choices=choices)

  def streams(self) -> dict[str, task_lib.Stream]:
    """`train`: windows of the training split's captioned clips with a caption row each."""
    return {"train": task_lib.Stream(keys=KEYS, features=self.feature_source(train=True))}

  # ---- the model --------------------------------------------------------------------------

  def caption_features(self, clip_params, prompt_params, table: Mapping[str, jax.Array],
                       rows: jax.Array) -> jax.Array:
    """L2-normalised float32 [B, D] features of the prompted captions `rows` int [B] of
    `table` ({ids, slot, eot_index}): only those B rows are gathered and encoded."""
    tokens = prompts.PromptTokens(
        ids=jnp.take(table["ids"], rows, axis=0), slot=jnp.take(table["slot"], rows, axis=0),
        eot_index=jnp.take(table["eot_index"], rows, axis=0), mask=None,
        table_rows=self.prompt_learner.table_rows)
    return self.text_features(clip_params, prompt_params, tokens)

  def loss(self, params, batches, rng, *, train, frozen=None, step=None):
    """Symmetric InfoNCE over batch `train` (module docstring).

    Returns:
      (float32 scalar, metrics: `loss/nce`, the in-batch accuracies `vtc/t2v_acc`,
      `vtc/v2t_acc` (0-1), `params/trainable`).
    """
    del rng, train, step  # no dropout, nothing scheduled
    if frozen is None:
      raise ValueError("prompt_clip_retrieval: the loss needs the frozen CLIP and the caption "
                       "table (load_frozen)")
    batch = batches["train"]
    valid = batch["valid"].astype(bool) & (batch["choice"] >= 0)
    text = self.caption_features(frozen["clip"], params["prompts"], frozen["captions"],
                                 jnp.maximum(batch["choice"], 0).astype(jnp.int32))
    video = self.video_features(params, batch["features"])
    per_sample, metrics, _ = losses.vtc_loss(video, text, jnp.float32(self.temperature),
                                             valid)
    loss = jnp.sum(per_sample) / jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)
    return loss, {"loss/nce": loss, **metrics,
                  "params/trainable": jnp.float32(self.num_trainable)}

  # ---- evaluation -----------------------------------------------------------------------------

  @functools.cached_property
  def _caption_fn(self):
    """({"clip", "prompts"}, text batch) -> {"text": [b, D]} (one jit cache)."""
    def encode(args, batch):
      tokens = prompts.PromptTokens(ids=batch["ids"], slot=batch["slot"],
                                    eot_index=batch["eot_index"], mask=None,
                                    table_rows=self.prompt_learner.table_rows)
      return {"text": self.text_features(args["clip"], args["prompts"], tokens)}
    return encode

  def retrieval_features(self, params, batches, mesh, rules, eval_cfg) -> dict[str, Any]:
    """The clips the records list and their captions' features, as numpy on the host.

    Returns:
      {"video": float32 [Nv, D] normalised clip features (mean of the window features),
       "text": float32 [Nt, D] normalised features of their prompted captions,
       "text_to_video": int64 [Nt] each caption's clip, "video_ids": Nv ids, "captions": Nt
       strings, "lost": clips listed by the records but absent from the cache}.
    """
    split = eval_cfg.split
    source = self.feature_source(train=False)
    _, index = feature_loader.open_split(source, split)
    positions, lost = self._covered(batches, index)
    per_process = shd.batch_size_per_process(int(self.config.eval_batch_size), mesh, rules)
    loader = feature_loader.FeatureLoader(
        source, split, batch_size=per_process, training=False,
        num_windows=int(eval_cfg.get("windows", 5)), positions=positions,
        process_index=jax.process_index(), process_count=jax.process_count())
    out = jax.device_get(features.collect(self._embed_fn, params, loader, mesh, rules))
    video = np.zeros((len(positions), out["video"].shape[1]))
    np.add.at(video, np.asarray(out["clip"]), np.asarray(out["video"], np.float64))
    video /= np.maximum(np.linalg.norm(video, axis=1, keepdims=True), 1e-12)

    table = self.caption_table(split)
    video_ids = [index.video_ids[p] for p in positions]
    rows, gt = [], []
    for j, v in enumerate(video_ids):
      for r in table.rows.get(v, ()):
        rows.append(r)
        gt.append(j)
    if not rows:
      raise ValueError(f"retrieval: none of the {len(video_ids)} evaluated clips of split "
                       f"{split!r} has a caption")
    rows = np.asarray(rows, np.int64)
    frozen = self.frozen_on(mesh, rules)
    texts = _text_batches(table.tokens, rows, per_process, jax.process_index(),
                          jax.process_count())
    text = jax.device_get(features.collect(
        self._caption_fn, {"clip": frozen.params, "prompts": params["prompts"]}, texts, mesh,
        rules))["text"]
    return {"video": video.astype(np.float32), "text": np.asarray(text, np.float32),
            "text_to_video": np.asarray(gt, np.int64), "video_ids": video_ids,
            "captions": [table.texts[r] for r in rows], "lost": lost}

  def _retrieval(self, params, batches, mesh, rules, eval_cfg) -> dict[str, float]:
    f = self.retrieval_features(params, batches, mesh, rules, eval_cfg)
    sim = f["text"] @ f["video"].T  # [Nt, Nv] cosines (rows = captions)
    out = {f"retrieval/{k}": v
           for k, v in retrieval_lib.retrieval_metrics(sim, f["text_to_video"]).items()}
    out["retrieval/captions"] = float(len(f["text_to_video"]))
    out["retrieval/clips"] = float(len(f["video_ids"]))
    if f["lost"]:
      out["retrieval/uncached_clips"] = float(f["lost"])
    return out

  # ---- export ---------------------------------------------------------------------------------

  def export(self, params: dict[str, Any], out_dir: str, *, platforms: Sequence[str]
             ) -> dict[str, Any] | None:
    """Not implemented for retrieval runs (the action export is built around class names)."""
    del params, out_dir, platforms
    return None

  def evaluators(self) -> dict[str, task_lib.Evaluator]:
    """`retrieval` (module docstring) and the action task's evaluators."""
    return {**super().evaluators(), "retrieval": self._retrieval}
