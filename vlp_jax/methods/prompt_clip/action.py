"""Prompt-CLIP action recognition (task `prompt_clip_action`; Ju et al., ECCV 2022).

A frozen CLIP (`init.clip` = "hf:DIR", a transformers CLIPModel directory with its tokenizer,
e.g. one `launch.export` wrote from a `clip_pretrain` run) and two trained collections:

  prompts   `models.prompts.PromptLearner`: `model.prompts.prefix` P and `suffix` Q learned
            vectors around every class name in the token embeddings of the frozen text tower
            (`layout` shared | official), N(0, `init_std`^2).
  temporal  `models.temporal.TemporalTransformer` over a clip's T frame features
            (`model.temporal.layers`; with 0 it is mean pooling and the collection is absent).

Each step encodes all C training class names with their prompts through the frozen text tower
(C is a few hundred at most; sampling a subset of the classes per step is not implemented),
pools the clip features of the batch with the temporal model, and minimises the cross-entropy
of logits = cos(clip, class) / `model.temperature` (0.07, fixed). The frozen CLIP is a
`Frozen` pytree (its text tower only when the image tower ran once, in
launch.extract_features; both towers when training from frames), never in the optimizer
state. `params/trainable` (logged at start and in every train row)
counts the trained parameters.

Data: windows of `model.num_frames` cached frame features of `data.features` (a cache of
`python -m launch.extract_features` made with the same CLIP), or, with `data.features` empty,
`data.num_frames` frames of each clip of `data.dir` through the frozen image tower in the
step (closed-set; evaluation: one window per clip), class names from `data.classes`
(one per line, line i = label i; "" = DATA_DIR/classes.txt). The protocol (`protocol.name`)
picks the training clips: `closed` all classes, `fewshot` a K-shot all-way subset
(`protocol.k_shot` clips per class), `openset` the seen classes of
`openset_splits(C, protocol.seen_fraction, protocol.num_draws, protocol.seed)[protocol.draw]`
(optionally K-shot too); training then scores the seen classes only.

Evaluators (`config.evals.<name>.type`), each over the cached features of its split's clips:
  action   closed-set over all C classes: the softmax averaged over `windows` (5) evenly spaced
           windows per clip -> `action/top1`, `action/top5`, `action/mean_class`; with
           `opposites` (class-name pairs "a|b", e.g. "moving left|moving right") also
           `action/opposite_acc`: the clips of a paired class scoring it above its opposite
           (50 for a model blind to frame order on time-symmetric data).
  fewshot  `episodes` N-way K-shot episodes (`n_way`, `k_shot`, `n_query`, `seed`): each query
           clip is scored among its episode's N classes by cos(clip, prompted class text) +
           cos(clip, mean of the class's L2-normalised support clip features), the sum of the
           two cosines; a clip's feature is the normalised mean of its windows' features ->
           `fewshot/top1`, `fewshot/top1_std` (over episodes), `fewshot/episodes`.
  openset  seen-class clips scored among the seen classes, unseen-class clips among the
           unseen ones (window-averaged softmax) -> `openset/seen_top1`,
           `openset/unseen_top1`, `openset/hm`.
The core's evaluation loader over the split's records is read once to list the split's clips
(and so to count them, `eval/num_clips`); every listed clip must be in the cache.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from vlp_jax.convert import clip as convert_clip
from vlp_jax.core import init as init_lib
from vlp_jax.core import task as task_lib
from vlp_jax.data import classes as classes_lib
from vlp_jax.data import feature_cache, feature_loader, protocols
from vlp_jax.data import tokenizer as tok_lib
from vlp_jax.eval import classification, features
from vlp_jax.models import clip as clip_lib
from vlp_jax.models import layers, prompts, temporal
from vlp_jax.parallel import sharding as shd

KEYS = ("features", "label", "valid")
PROTOCOLS = ("closed", "fewshot", "openset")
# The parts of CLIP the task runs: the text tower, its projection (and `logit_scale`, which the
# module declares in `setup`); the image tower ran once, in launch.extract_features.
TEXT_PARAMS = ("text_model", "text_projection", "logit_scale")
# Training from frames (no feature cache) also runs the frozen image tower in the step.
VISION_PARAMS = ("vision_model", "visual_projection")
FRAME_KEYS = ("video", "label", "valid")
INIT_CLIP_HELP = ("set --config.init.clip=hf:DIR (a CLIPModel directory, e.g. one written by "
                  "launch.export from configs/clip_pretrain.py)")


def clip_dir(config) -> str:
  """The CLIP directory of `init.clip` ("hf:DIR").

  Raises:
    ValueError: empty or not "hf:DIR". FileNotFoundError: DIR is not a directory.
  """
  spec = str(config.init.get("clip", ""))
  if not spec:
    raise ValueError(f"prompt_clip_action needs a frozen CLIP: {INIT_CLIP_HELP}")
  if not spec.startswith("hf:"):
    raise ValueError(f"config.init.clip must be 'hf:DIR', got {spec!r}: {INIT_CLIP_HELP}")
  path = spec[3:]
  if not os.path.isdir(path):
    raise FileNotFoundError(f"config.init.clip: {path!r} is not a directory; {INIT_CLIP_HELP}")
  return path


def softmax_scores(video: np.ndarray, text: np.ndarray, clip: np.ndarray, num_clips: int,
                   temperature: float) -> np.ndarray:
  """Per-clip class scores: the mean over a clip's windows of softmax(cos / temperature).

  Args:
    video: float [W, D] L2-normalised window features.
    text: float [C, D] L2-normalised class text features.
    clip: int [W] each window's clip in [0, num_clips).
    num_clips: N.
    temperature: the logits' temperature.
  Returns:
    float64 [N, C]; a clip without windows gets zeros.
  """
  logits = (np.asarray(video, np.float64) @ np.asarray(text, np.float64).T) / temperature
  logits -= logits.max(axis=1, keepdims=True)
  p = np.exp(logits)
  p /= p.sum(axis=1, keepdims=True)
  scores = np.zeros((num_clips, p.shape[1]))
  np.add.at(scores, np.asarray(clip), p)
  counts = np.bincount(np.asarray(clip), minlength=num_clips)
  return scores / np.maximum(counts, 1)[:, None]


def episode_scores(query: np.ndarray, support: np.ndarray, support_labels: np.ndarray,
                   text: np.ndarray) -> np.ndarray:
  """Few-shot scores of one episode: cos(query, class text) + cos(query, class prototype).

  Args:
    query: float [Q, D] L2-normalised query clip features.
    support: float [S, D] L2-normalised support clip features.
    support_labels: int [S] episode-local classes in [0, N) (each present).
    text: float [N, D] L2-normalised text features of the episode's classes, in that order.
  Returns:
    float64 [Q, N]. The prototype of a class is the mean of its support features; the cosine
    normalises it.
  """
  n = text.shape[0]
  support = np.asarray(support, np.float64)
  proto = np.stack([support[support_labels == c].mean(axis=0) for c in range(n)])
  proto /= np.maximum(np.linalg.norm(proto, axis=1, keepdims=True), 1e-12)
  q = np.asarray(query, np.float64)
  return q @ np.asarray(text, np.float64).T + q @ proto.T


@task_lib.register("prompt_clip_action")
class PromptClipActionTask(task_lib.Task):
  """Prompt vectors and a temporal transformer on a frozen CLIP, trained for classification.

  Attributes:
    clip_dir: the `init.clip` directory. protocol: `protocol.name`.
    clip: the frozen `CLIP` module (text tower used). prompt_learner, temporal: modules.
  """

  pretrained_keys = ("clip",)  # accepted, and loaded as the frozen CLIP (`load_frozen`)
  trains_from_frames = True  # without data.features: frames through the frozen image tower

  def __init__(self, config, text):
    super().__init__(config, text)
    self.clip_dir = clip_dir(config)
    # No cache: frames from the records through the frozen image tower, in the step.
    self.from_frames = not config.data.get("features", "")
    if self.from_frames and not self.trains_from_frames:
      raise ValueError(
          f"data.features is empty: {config.task} reads cached CLIP frame features. Extract "
          "them first with the same CLIP: python -m launch.extract_features --clip=hf:DIR "
          "--data_dir=DATA_DIR --split=train,test --out=FEATURES, then set "
          "--config.data.features=FEATURES")
    p = config.protocol
    self.protocol = str(p.name)
    if self.protocol not in PROTOCOLS:
      raise ValueError(f"protocol.name must be one of {PROTOCOLS}, got {self.protocol!r}")
    if self.from_frames and (self.protocol != "closed" or int(p.k_shot) > 0):
      raise ValueError(f"protocol.name={self.protocol!r} (k_shot={int(p.k_shot)}) selects "
                       "clips from a feature cache: extract one (python -m "
                       "launch.extract_features) and set --config.data.features; training "
                       "from frames is closed-set on every clip")
    if self.protocol == "fewshot" and int(p.k_shot) < 1:
      raise ValueError("protocol.name='fewshot' trains on a K-shot subset: set "
                       "protocol.k_shot >= 1")
    for name, ev in config.get("evals", {}).items():
      if ev.get("type") == "openset" and self.protocol != "openset":
        raise ValueError(f"config.evals.{name}: the openset evaluator needs "
                         f"protocol.name='openset' (got {self.protocol!r})")
    m = config.model
    self.temperature = float(m.temperature)
    self.num_frames = int(m.num_frames)
    cfg = convert_clip.config_from_dir(self.clip_dir, dtype=str(m.dtype),
                                       attention=str(m.attention), remat=str(m.remat))
    self.clip = clip_lib.CLIP(cfg)
    t = m.temporal
    self.temporal = temporal.TemporalTransformer(
        width=cfg.projection_dim, layers=int(t.layers), heads=int(t.heads),
        max_frames=int(t.max_frames), dtype=str(m.dtype), attention=str(m.attention),
        remat=str(m.remat), pos_init_std=float(t.pos_init_std))
    if self.num_frames > int(t.max_frames):
      raise ValueError(f"model.num_frames ({self.num_frames}) exceeds "
                       f"model.temporal.max_frames ({t.max_frames})")
    if self.from_frames:
      self._check_frames_config(config, cfg.vision.image_size)
    self._placed: dict[Any, task_lib.Frozen] = {}

  def _check_frames_config(self, config, image_size: int) -> None:
    """Training from frames reads `model.num_frames` frames per clip at the CLIP's input size,
    unflipped (a mirror swaps left and right); anything else is an error naming the fix."""
    d = config.data
    fix = []
    if int(d.num_frames) != self.num_frames:
      fix.append(f"--config.data.num_frames={self.num_frames}")
    if int(d.image_size) != int(image_size):
      fix.append(f"--config.data.image_size={image_size}")
    if bool(d.get("flip", False)):
      fix.append("--config.data.flip=False")
    if fix:
      raise ValueError("data.features is empty, so prompt_clip_action trains from the frames "
                       "of data.dir through the frozen CLIP image tower; that needs "
                       f"{' '.join(fix)} (or a feature cache: python -m "
                       "launch.extract_features, then --config.data.features)")

  @property
  def frozen_keys(self) -> tuple[str, ...]:
    """The CLIP params the task runs: the text tower, and the image tower from frames."""
    return TEXT_PARAMS + (VISION_PARAMS if self.from_frames else ())

  # ---- classes and prompt tokens -----------------------------------------------------------

  @functools.cached_property
  def class_names(self) -> list[str]:
    """The C class names (`data.classes`, "" = DATA_DIR/classes.txt)."""
    return classes_lib.class_names(str(self.config.data.get("classes", "")),
                                   self.config.data.dir or None,
                                   write=jax.process_index() == 0)

  def class_pairs(self, opposites) -> np.ndarray:
    """int64 [M, 2] class indices of `opposites`, pairs of class names ("a|b" strings or
    2-sequences).

    Raises:
      ValueError: a malformed pair or a name that is not a class (naming it).
    """
    index = {n: i for i, n in enumerate(self.class_names)}
    out = []
    for pair in opposites:
      names = pair.split("|") if isinstance(pair, str) else list(pair)
      if len(names) != 2:
        raise ValueError(f"opposites: {pair!r} is not a pair of class names ('a|b')")
      for n in names:
        if n not in index:
          raise ValueError(f"opposites: {n!r} is not one of the {len(index)} classes "
                           f"({self.class_names[:8]}...)")
      out.append([index[n] for n in names])
    return np.asarray(out, np.int64).reshape(-1, 2)

  @functools.cached_property
  def train_classes(self) -> np.ndarray | None:
    """int64 label indices the training classifier scores (open-set: the seen classes, in
    ascending order); None = all C."""
    if self.protocol != "openset":
      return None
    return self.openset_classes[0]

  @functools.cached_property
  def openset_classes(self) -> tuple[np.ndarray, np.ndarray]:
    """(seen, unseen) int64 class indices of `protocol.draw`."""
    p = self.config.protocol
    splits = protocols.openset_splits(self.class_names, float(p.seen_fraction),
                                      int(p.num_draws), int(p.seed))
    draw = int(p.draw)
    if not 0 <= draw < len(splits):
      raise ValueError(f"protocol.draw={draw} must be in [0, protocol.num_draws={len(splits)})")
    return splits[draw]

  @functools.cached_property
  def tokenizer(self):
    """The CLIP tokenizer saved with the checkpoint (`init.clip`'s directory)."""
    return tok_lib.load_tokenizer(self.clip_dir)

  @functools.cached_property
  def template(self) -> str:
    """`model.prompts.template`: the text around each class name, "{}" = the name alone."""
    return prompts.check_template(str(self.config.model.prompts.get("template", "{}")))

  def _tokens(self, names) -> prompts.PromptTokens:
    p = self.config.model.prompts
    return prompts.build_prompt_tokens(
        self.tokenizer, [self.template.format(n) for n in names], int(p.prefix), int(p.suffix),
        context_length=self.clip.config.text.max_position, layout=str(p.layout))

  @functools.cached_property
  def all_tokens(self) -> prompts.PromptTokens:
    """Prompt tokens of all C classes (evaluation)."""
    return self._tokens(self.class_names)

  @functools.cached_property
  def train_tokens(self) -> prompts.PromptTokens:
    """Prompt tokens of the classes training scores (all, or the seen ones)."""
    if self.train_classes is None:
      return self.all_tokens
    return self._tokens([self.class_names[i] for i in self.train_classes])

  @property
  def init_tokens(self) -> prompts.PromptTokens:
    """Prompt tokens that size the learned table and its init (all class names)."""
    return self.all_tokens

  @functools.cached_property
  def prompt_learner(self) -> prompts.PromptLearner:
    p = self.config.model.prompts
    return prompts.PromptLearner(self.init_tokens.table_rows, self.clip.config.text.hidden,
                                 init_std=float(p.init_std))

  # ---- parameters ---------------------------------------------------------------------------

  def init_collections(self, rng: jax.Array) -> dict[str, Any]:
    """{"prompts": the prompt table, "temporal": the temporal transformer (absent when
    model.temporal.layers = 0)}, logically boxed float32."""
    p_rng, t_rng = jax.random.split(rng)
    tokens = self.init_tokens
    width = self.clip.config.text.hidden
    out = {"prompts": self.prompt_learner.init(
        p_rng, jnp.zeros(tokens.ids.shape[:1] + (tokens.ids.shape[1], width), jnp.float32),
        jnp.asarray(tokens.slot))["params"]}
    if self.temporal.layers:
      frames = jnp.zeros((1, self.num_frames, self.clip.config.projection_dim), jnp.float32)
      out["temporal"] = self.temporal.init(t_rng, frames)["params"]
    return out

  @functools.cached_property
  def num_trainable(self) -> int:
    """Trainable parameters (every collection; `params/trainable`)."""
    return temporal.count_params(jax.eval_shape(self.init_collections, jax.random.PRNGKey(0)))

  def import_pretrained(self, key: str, path: str, params: dict[str, Any]) -> dict[str, Any]:
    """`init.clip` names the frozen CLIP (`load_frozen`), not trained params: unchanged."""
    del key, path
    return params

  @functools.cached_property
  def _clip_host(self) -> dict[str, Any]:
    """The frozen CLIP's float32 numpy params the task runs (`frozen_keys`; read once)."""
    _, params = convert_clip.import_clip(self.clip_dir)
    return {k: params[k] for k in self.frozen_keys}

  def frozen_on(self, mesh, rules) -> task_lib.Frozen:
    """The frozen CLIP (`frozen_keys`) placed on `mesh` by its logical axes (cached per
    mesh)."""
    key = (mesh, rules)
    if key not in self._placed:
      v = self.clip.config.vision
      pixels = jnp.zeros((1, v.image_size, v.image_size, 3), jnp.float32)
      ids = jnp.zeros((1, self.clip.config.text.max_position), jnp.int32)
      with shd.activate(mesh, rules):
        boxed = jax.eval_shape(lambda r: self.clip.init(r, pixels, ids)["params"],
                               jax.random.PRNGKey(0))
        shardings = shd.logical_to_sharding(boxed, mesh, rules)
      shardings = {k: shardings[k] for k in self.frozen_keys}
      abstract = {k: nn.unbox(boxed[k]) for k in self.frozen_keys}
      params = init_lib.place_host_leaves(self._clip_host, abstract, shardings)
      self._placed[key] = task_lib.Frozen(params=params, shardings=shardings)
    return self._placed[key]

  def load_frozen(self, mesh, rules, workdir: str) -> task_lib.Frozen:
    """The frozen CLIP (from `init.clip`; the text tower, and the image tower from frames),
    placed on the mesh."""
    del workdir
    counts = {k: temporal.count_params(v) for k, v in
              jax.eval_shape(self.init_collections, jax.random.PRNGKey(0)).items()}
    logging.info("prompt_clip_action: params/trainable = %d (%s); frozen CLIP text tower "
                 "from %s", self.num_trainable, counts, self.clip_dir)
    return self.frozen_on(mesh, rules)

  # ---- data -----------------------------------------------------------------------------------

  @functools.cached_property
  def cache_expect(self) -> dict[str, Any]:
    """What the feature cache must have been made with: this CLIP (weights fingerprint) and
    its projected image embeddings (any preprocessing size)."""
    d = feature_cache.describe(self.clip_dir)
    return {k: d[k] for k in ("format", "version", "feature")} | {
        "checkpoint": {"sha256": d["checkpoint"]["sha256"]}}

  def feature_source(self, *, train: bool) -> feature_loader.FeatureSource:
    """The cache of `data.features`; for training with the protocol's clip selection."""
    d, p = self.config.data, self.config.protocol
    classes = self.train_classes if train else None
    return feature_loader.FeatureSource(
        dir=str(d.features), length=self.num_frames, strides=tuple(float(s) for s in d.strides),
        classes=None if classes is None else tuple(int(c) for c in classes),
        k_shot=int(p.k_shot) if train else 0, subset_seed=int(p.seed),
        num_classes=len(self.class_names), expect=self.cache_expect,
        allow_missing=bool(d.get("features_allow_missing", False)))

  def streams(self) -> dict[str, task_lib.Stream]:
    """`train`: windows of the training split's cached features (`protocol` selection), or,
    from frames, the records' clips (`data.num_frames` frames each, with their labels)."""
    if self.from_frames:
      return {"train": task_lib.Stream(keys=FRAME_KEYS)}
    return {"train": task_lib.Stream(keys=KEYS, features=self.feature_source(train=True))}

  # ---- the model --------------------------------------------------------------------------

  def text_features(self, clip_params, prompt_params, tokens: prompts.PromptTokens
                    ) -> jax.Array:
    """L2-normalised float32 [C, D] features of the prompted class names of `tokens`."""
    app = functools.partial(self.clip.apply, {"params": clip_params})
    embeds = app(jnp.asarray(tokens.ids), method=clip_lib.CLIP.embed_tokens)
    embeds = self.prompt_learner.apply({"params": prompt_params}, embeds,
                                       jnp.asarray(tokens.slot))
    feats = app(embeds, jnp.asarray(tokens.eot_index), method=clip_lib.CLIP.encode_text_embeds)
    return layers.l2_normalize(feats)

  def frame_features(self, clip_params, video: jax.Array) -> jax.Array:
    """float32 [B, T, D] projected image embeddings of CLIP-normalised frames float
    [B, T, S, S, 3] (S = the CLIP's image size): what `launch.extract_features` caches."""
    out = self.clip.apply({"params": clip_params}, video, method=clip_lib.CLIP.encode_frames)
    return jax.lax.stop_gradient(out)

  def video_features(self, params, frames: jax.Array) -> jax.Array:
    """L2-normalised float32 [B, D] clip features of frame features float [B, T, D]."""
    pooled = self.temporal.apply({"params": params.get("temporal", {})},
                                 frames.astype(jnp.float32))
    return layers.l2_normalize(pooled)

  def logits(self, params, clip_params, frames: jax.Array,
             tokens: prompts.PromptTokens | None = None) -> jax.Array:
    """float32 [B, C] cos(clip, class text) / temperature over the classes of `tokens`
    (default: the training classes)."""
    tokens = self.train_tokens if tokens is None else tokens
    text = self.text_features(clip_params, params["prompts"], tokens)
    return self.video_features(params, frames) @ text.T / self.temperature

  def loss(self, params, batches, rng, *, train, frozen=None, step=None):
    """Mean cross-entropy over the valid rows of batch `train` (labels index the training
    classes).

    Returns:
      (float32 scalar, metrics: `loss/ce`, `train/top1` (percent), `params/trainable`).
    """
    del rng, train, step  # no dropout, nothing scheduled
    if frozen is None:
      raise ValueError("prompt_clip_action: the loss needs the frozen CLIP (load_frozen)")
    batch = batches["train"]
    frames = (batch["features"] if "features" in batch
              else self.frame_features(frozen, batch["video"]))
    logits = self.logits(params, frozen, frames)
    labels = batch["label"].astype(jnp.int32)
    # A record without a class (-1, from frames) does not count.
    valid = (batch["valid"] & (labels >= 0)).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
    count = jnp.maximum(jnp.sum(valid), 1.0)
    loss = jnp.sum(ce * valid) / count
    hit = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return loss, {"loss/ce": loss, "train/top1": 100.0 * jnp.sum(hit * valid) / count,
                  "params/trainable": jnp.float32(self.num_trainable)}

  # ---- evaluation -----------------------------------------------------------------------------

  def _covered(self, batches, index: feature_cache.SplitIndex) -> tuple[np.ndarray, int]:
    """Reads the core's pass over the split's records; returns (positions in `index` of the
    clips it listed, on any process, ascending; listed clips absent from the cache, summed
    over processes).

    Raises:
      ValueError: listed clips absent from the cache, unless `eval.allow_missing`.
    """
    listed: set[str] = set()
    for batch in batches:
      if "video_id" not in batch:
        raise ValueError("prompt_clip_action: the evaluation batches carry no video_id to look "
                         "the clips up in the feature cache by")
      valid = np.asarray(batch["valid"], bool)
      listed.update(v.decode("utf-8") if isinstance(v, bytes) else str(v)
                    for v in np.asarray(batch["video_id"])[valid])
    ids = index.video_ids
    mine = np.asarray([v in listed for v in ids], bool)
    missing = sorted(listed - set(ids))
    counts = np.asarray([len(missing)], np.int64)
    if jax.process_count() > 1:
      mine = np.any(multihost_utils.process_allgather(mine), axis=0)
      counts = np.sum(multihost_utils.process_allgather(counts), axis=0)
    lost = int(counts[0])
    if lost:
      message = (f"{lost} clip(s) of split {index.split!r} are not in the feature cache "
                 f"{self.config.data.features!r} (e.g. {missing[:3]}); extract the split "
                 "again")
      if not bool(self.config.get("eval", {}).get("allow_missing", False)):
        raise ValueError(message + ", or set --config.eval.allow_missing=True to evaluate the "
                         "cached ones")
      logging.warning("%s; evaluating the cached ones (eval.allow_missing)", message)
    positions = np.nonzero(mine)[0].astype(np.int64)
    if not len(positions):
      raise ValueError(f"no clip of split {index.split!r} to evaluate")
    return positions, lost

  @functools.cached_property
  def _embed_fn(self):
    """(params, eval batch) -> {"video": [b, D] normalised, "clip": [b]} (one jit cache)."""
    def embed(params, batch):
      return {"video": self.video_features(params, batch["features"]), "clip": batch["clip"]}
    return embed

  @functools.cached_property
  def _all_text_fn(self):
    """(frozen CLIP params, prompt params) -> text features of all classes (one jit cache)."""
    return lambda clip_params, prompt_params: self.text_features(clip_params, prompt_params,
                                                                 self.all_tokens)

  def eval_features(self, params, batches, mesh, rules, eval_cfg) -> dict[str, Any]:
    """What every evaluator starts from, as numpy on the host.

    Returns:
      {"video": float32 [W, D] normalised window features, "clip": int64 [W] their clip,
       "text": float32 [C, D] normalised text features of all classes, "labels": int64 [N]
       the clips' labels, "lost": clips listed by the records but absent from the cache}.
    """
    if self.from_frames:
      return self._frame_eval_features(params, batches, mesh, rules, eval_cfg)
    source = self.feature_source(train=False)
    _, index = feature_loader.open_split(source, eval_cfg.split)
    positions, lost = self._covered(batches, index)
    feature_loader.check_labels(index, positions, len(self.class_names))
    per_process = shd.batch_size_per_process(int(self.config.eval_batch_size), mesh, rules)
    loader = feature_loader.FeatureLoader(
        source, eval_cfg.split, batch_size=per_process, training=False,
        num_windows=int(eval_cfg.get("windows", 5)), positions=positions,
        process_index=jax.process_index(), process_count=jax.process_count())
    out = jax.device_get(features.collect(self._embed_fn, params, loader, mesh, rules))
    return {"video": np.asarray(out["video"], np.float32),
            "clip": np.asarray(out["clip"], np.int64),
            "text": self._all_text(params, mesh, rules), "labels": loader.labels, "lost": lost}

  def _all_text(self, params, mesh, rules) -> np.ndarray:
    """float32 [C, D] normalised prompted text features of all classes, on the host."""
    frozen = self.frozen_on(mesh, rules)
    with shd.activate(mesh, rules):
      text = jax.jit(self._all_text_fn, out_shardings=shd.replicated(mesh))(
          frozen.params, params["prompts"])
    return np.asarray(jax.device_get(text), np.float32)

  @functools.cached_property
  def _embed_frames_fn(self):
    """((frozen CLIP, params), eval batch) -> {"video": [b, D] normalised, "label": [b]}."""
    def embed(both, batch):
      clip_params, params = both
      frames = self.frame_features(clip_params, batch["video"])
      return {"video": self.video_features(params, frames), "label": batch["label"]}
    return embed

  def _frame_eval_features(self, params, batches, mesh, rules, eval_cfg) -> dict[str, Any]:
    """`eval_features` from frames: one window per clip, the `data.num_frames` frames the
    records pass samples (`data.eval_sampling`), through the frozen image tower.

    Raises:
      ValueError: a clip of the split without a class label in [0, C).
    """
    frozen = self.frozen_on(mesh, rules)
    out = jax.device_get(features.collect(self._embed_frames_fn, (frozen.params, params),
                                          batches, mesh, rules))
    labels = np.asarray(out["label"], np.int64)
    bad = (labels < 0) | (labels >= len(self.class_names))
    if bad.any():
      raise ValueError(f"{int(bad.sum())} clip(s) of split {eval_cfg.split!r} have no class "
                       f"label in [0, {len(self.class_names)}) (clip/label/index)")
    return {"video": np.asarray(out["video"], np.float32),
            "clip": np.arange(len(labels), dtype=np.int64),
            "text": self._all_text(params, mesh, rules), "labels": labels, "lost": 0}

  def _action(self, params, batches, mesh, rules, eval_cfg) -> dict[str, float]:
    f = self.eval_features(params, batches, mesh, rules, eval_cfg)
    scores = softmax_scores(f["video"], f["text"], f["clip"], len(f["labels"]),
                            self.temperature)
    out = classification.action_metrics(scores, f["labels"])
    out["action/clips"] = float(len(f["labels"]))
    if eval_cfg.get("opposites", ()):
      out["action/opposite_acc"] = classification.opposite_accuracy(
          scores, f["labels"], self.class_pairs(eval_cfg.opposites))
    if f["lost"]:
      out["action/uncached_clips"] = float(f["lost"])
    return out

  def _fewshot(self, params, batches, mesh, rules, eval_cfg) -> dict[str, float]:
    f = self.eval_features(params, batches, mesh, rules, eval_cfg)
    n = len(f["labels"])
    clip_feats = np.zeros((n, f["video"].shape[1]))
    np.add.at(clip_feats, f["clip"], f["video"].astype(np.float64))
    clip_feats /= np.maximum(np.linalg.norm(clip_feats, axis=1, keepdims=True), 1e-12)
    episodes = protocols.sample_episodes(
        f["labels"], int(eval_cfg.get("n_way", 5)), int(eval_cfg.get("k_shot", 5)),
        int(eval_cfg.get("n_query", 15)), int(eval_cfg.get("episodes", 200)),
        int(eval_cfg.get("seed", 0)))
    accuracies = []
    for ep in episodes:
      scores = episode_scores(clip_feats[ep.query], clip_feats[ep.support], ep.support_labels,
                              f["text"][ep.classes])
      accuracies.append(classification.topk_accuracy(scores, ep.query_labels, 1))
    return classification.aggregate_episodes(accuracies)

  def _openset(self, params, batches, mesh, rules, eval_cfg) -> dict[str, float]:
    f = self.eval_features(params, batches, mesh, rules, eval_cfg)
    accuracies = []
    for part, name in zip(self.openset_classes, ("seen", "unseen")):
      where = {int(c): i for i, c in enumerate(part)}
      clips = np.nonzero(np.isin(f["labels"], part))[0]
      if not len(clips):
        raise ValueError(f"openset: split {eval_cfg.split!r} has no clip of the {name} "
                         f"classes {part.tolist()}")
      windows = np.isin(f["clip"], clips)
      renumber = np.full(len(f["labels"]), -1, np.int64)
      renumber[clips] = np.arange(len(clips))
      scores = softmax_scores(f["video"][windows], f["text"][part],
                              renumber[f["clip"][windows]], len(clips), self.temperature)
      labels = np.asarray([where[int(c)] for c in f["labels"][clips]], np.int64)
      accuracies.append(classification.topk_accuracy(scores, labels, 1))
    return classification.base_to_novel_metrics(*accuracies)

  # ---- export ---------------------------------------------------------------------------------

  def export(self, params: dict[str, Any], out_dir: str, *, platforms: Sequence[str]
             ) -> dict[str, Any]:
    """Writes OUT/clip (the frozen CLIP with its tokenizer), OUT/prompt_clip.safetensors and
    .json (prompts, temporal model, their config and the class names) and OUT/artifact
    (`jax.export` encode_classes / classify and a standalone load_artifact.py); see
    `methods/prompt_clip/export.py`."""
    from vlp_jax.methods.prompt_clip import export as export_lib  # noqa: PLC0415  (export only)
    return export_lib.export_prompt_clip(self, params, out_dir, platforms=platforms)

  def evaluators(self) -> dict[str, task_lib.Evaluator]:
    """`action` (closed-set, all classes), `fewshot` (N-way K-shot episodes), `openset`
    (seen / unseen classes of the protocol's draw); see the module docstring."""
    return {"action": self._action, "fewshot": self._fewshot, "openset": self._openset}
