"""ALPRO pre-training objective: VTC + VTM (hard negatives) + MLM + PEM, weights `config.loss`.

Task `alpro` (configs/alpro_pretrain.py, configs/alpro_retrieval.py). One parameter collection,
`model`; one stream, `train` (video batches, mixed with still-image batches at
`data.image_ratio`); evaluator `retrieval` (vlp_jax/methods/alpro/retrieval.py).

PEM (`loss.pem` > 0, settings `config.pem`) reads a frozen prompter and its entity embeddings
(vlp_jax/methods/alpro/prompter.py), loaded once before training; evaluation never loads it.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from vlp_jax import losses
from vlp_jax.convert import hf
from vlp_jax.core import checkpoint as ckpt_lib
from vlp_jax.core import task as task_lib
from vlp_jax.data import classes as classes_lib
from vlp_jax.data import entities as entities_lib
from vlp_jax.data.mixture import IS_IMAGE
from vlp_jax.methods.alpro import flops
from vlp_jax.methods.alpro import order as order_lib
from vlp_jax.methods.alpro import prompter as prompter_lib
from vlp_jax.methods.alpro import retrieval
from vlp_jax.models.alpro import ALPRO, alpro_config

TWIN = "twin"  # host-batch key: row offset of a row's time-reversed twin (data/pipeline.py)


@task_lib.register("alpro")
class ALPROTask(task_lib.Task):
  """The ALPRO module with its pre-training loss and retrieval evaluation.

  Attributes:
    model: the ALPRO module (with the PEM head when `loss.pem` > 0).
    prompter: the frozen teacher's module (PEM only): the same encoders, no PEM head.
    entities: PEM entity names ([] without PEM or with random data).
  """

  pretrained_keys = ("text", "video")

  def __init__(self, config, text):
    super().__init__(config, text)
    self.weights = {k: float(config.loss.get(k, 0.0)) for k in ("vtc", "vtm", "mlm", "pem")}
    schedule = config.get("vtm_negatives", {})
    self._vtm_schedule = {"hard_from": float(schedule.get("hard_from", 0.0)),
                          "ramp": float(schedule.get("ramp", 0.0)),
                          "max_sharpness": float(schedule.get("max_sharpness", 1.0))}
    if not (0.0 <= self._vtm_schedule["hard_from"] <= 1.0 and self._vtm_schedule["ramp"] >= 0
            and 0.0 <= self._vtm_schedule["max_sharpness"] <= 1.0):
      raise ValueError(f"vtm_negatives: hard_from must be in [0, 1], ramp >= 0 (fractions of "
                       f"num_steps) and max_sharpness in [0, 1], got {dict(self._vtm_schedule)}")
    # Share of the rows with a time-reversed twin in the batch whose VTM negatives are that
    # twin (its video for the text, its caption for the video) instead of a sampled one.
    self._twin_prob = float(schedule.get("twin_prob", 0.0))
    if not 0.0 <= self._twin_prob <= 1.0:
      raise ValueError(f"vtm_negatives.twin_prob must be in [0, 1], got {self._twin_prob}")
    self._twins = float(config.data.get("reverse_twins", {}).get("rate", 0.0)) > 0
    # False: the hard-negative sampler never draws a row's twin (`twin_prob` alone sets how
    # many negatives are twins).
    self._sample_twins = bool(schedule.get("sample_twins", False))
    if self._twin_prob > 0 and not self._twins:
      raise ValueError("vtm_negatives.twin_prob > 0 needs time-reversed twins in the batch: "
                       "set data.reverse_twins.rate > 0")
    model_cfg = alpro_config(config.model, text.vocab_size)
    self.entities: list[str] = []
    if self.weights["pem"]:
      k = int(config.pem.num_entities)
      if k < 1:
        raise ValueError(f"loss.pem > 0 needs pem.num_entities >= 1, got {k}")
      if config.data.source != "random":
        self.entities = entities_lib.load_entities(self._entity_file(), k)
      mode = config.pem.get("threshold_mode", "absolute")
      if mode not in ("absolute", "over_uniform"):
        raise ValueError(f"pem.threshold_mode must be 'absolute' or 'over_uniform', got {mode!r}")
      # int32 [K]: each entity's token id, -1 where it is not one token (or without a
      # tokenizer / entities): `_pem` marks an entity present when its id is in the caption.
      self._entity_ids = np.full((k,), -1, np.int32)
      if text.tokenizer is not None and self.entities:
        enc = text.tokenizer(list(self.entities), add_special_tokens=False)["input_ids"]
        for i, ids in enumerate(enc):
          if len(ids) == 1:
            self._entity_ids[i] = ids[0]
      model_cfg = dataclasses.replace(model_cfg, num_entities=k)
      self.prompter = ALPRO(dataclasses.replace(model_cfg, num_entities=0))
    self.model = ALPRO(model_cfg)

  def streams(self) -> dict[str, task_lib.Stream]:
    mixed = float(self.config.data.get("image_ratio", 0.0)) > 0.0
    keys = task_lib.CAPTION_KEYS + ((IS_IMAGE,) if mixed else ()) + (
        (TWIN,) if self._twins else ())
    return {"train": task_lib.Stream(keys=keys, image_mix=True)}

  def _entity_file(self) -> str:
    if self.config.pem.entities:
      return self.config.pem.entities
    if not self.config.data.dir:
      raise ValueError("pem.entities is '' (= DATA_DIR/entities.txt) but data.dir is not set")
    return os.path.join(self.config.data.dir, "entities.txt")

  def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    """Zero arrays with the shapes and dtypes of a real batch (for init and shape checks)."""
    d = self.config.data
    t = d.max_text_len
    batch = {
        "video": np.zeros((batch_size, d.num_frames, d.image_size, d.image_size, 3), np.float32),
        "text_ids": np.zeros((batch_size, t), np.int32),
        "text_mask": np.ones((batch_size, t), np.int32),
        "mlm_ids": np.zeros((batch_size, t), np.int32),
        "mlm_labels": np.full((batch_size, t), -100, np.int32),
        "valid": np.ones((batch_size,), bool),
    }
    if IS_IMAGE in self.streams()["train"].keys:
      batch[IS_IMAGE] = np.zeros((batch_size,), bool)
    if TWIN in self.streams()["train"].keys:
      batch[TWIN] = np.zeros((batch_size,), np.int32)
    return batch

  def analytic_flops(self, batch_size: int) -> float:
    """Matmul FLOPs of one step with this config's loss weights (methods/alpro/flops.py)."""
    return flops.train_step(self.model.config, batch_size, int(self.config.data.max_text_len),
                            self.weights)

  def init_module(self, model, rng: jax.Array) -> Any:
    """Logically boxed float32 params of `model` (this task's model or its prompter)."""
    b = self.dummy_batch(2)
    return model.init({"params": rng, "dropout": rng}, b["video"], b["text_ids"],
                      b["text_mask"])["params"]

  def init_params(self, rng: jax.Array) -> Any:
    """Logically boxed float32 params of the `model` collection (call under jit/eval_shape)."""
    return self.init_module(self.model, rng)

  def init_collections(self, rng: jax.Array) -> dict[str, Any]:
    return {"model": self.init_params(rng)}

  def import_pretrained(self, key: str, path: str, params: dict[str, Any]) -> dict[str, Any]:
    """`init.text` = a BERT checkpoint (text + fusion + MLM head), `init.video` = a
    TimeSformer or ViT checkpoint (vlp_jax/convert/hf.py)."""
    fn = {"text": hf.init_alpro_text, "video": hf.init_alpro_video}[key]
    return dict(params, model=fn(params["model"], path, self.model.config))

  def _apply(self, params, method, *args, rng=None, **kwargs):
    rngs = {"dropout": rng} if rng is not None else {}
    return self.model.apply({"params": params}, *args, method=method, rngs=rngs, **kwargs)

  def warm_start(self, workdir: str) -> str:
    """The run whose params start this one: the prompter's WORKDIR with `pem.warm_start`
    (its VTC-trained weights start pre-training), else the order stage's with `order.steps`
    > 0 (its video encoder), else "" (a fresh init)."""
    if self.config.data.source == "random":  # benchmark data: no stages
      return ""
    if self.config.get("pem", {}).get("warm_start", False):
      path, what = prompter_lib.prompter_dir(self.config, workdir), "pem.warm_start: prompter"
      stage, setting = "prompter", "pem.prompter"
    elif int(self.config.get("order", {}).get("steps", 0)) > 0:
      path, what = order_lib.order_dir(self.config, workdir), "order.steps > 0: order stage"
      stage, setting = "order", "order.dir"
    else:
      return ""
    if ckpt_lib.latest_step(path) is None:
      raise FileNotFoundError(
          f"{what}: no checkpoint in {path!r}; `python -m launch.train` with this config "
          f"trains it first (its `{stage}` stage), or set {setting}")
    return path

  def load_frozen(self, mesh, rules, workdir: str) -> task_lib.Frozen | None:
    """PEM's prompter and entity embeddings (`prompter.load_teacher`), None without PEM."""
    if not self.weights["pem"]:
      return None
    return prompter_lib.load_teacher(self, mesh, rules, workdir)

  def loss(self, params, batches, rng, *, train, frozen=None, step=None):
    """Weighted sum of the per-sample losses, averaged over the global batch.

    Args:
      params: {"model": ALPRO params}.
      batches: {"train": global arrays: video float32 [B,T,H,W,3]; text_ids, text_mask,
        mlm_ids, mlm_labels int32 [B,L]; valid bool [B]; optional is_image bool [B]}.
      frozen: `load_frozen(...).params` (needed when `loss.pem` > 0).
    Returns:
      (scalar float32 loss, metrics dict with `loss/vtc`, `loss/vtm`, `loss/mlm`, `loss/pem`
      (each when its weight is > 0), accuracies, `pem/kept_frac`, `temp`,
      `data/image_frac` with mixed image batches, and `twin/video_cos`, `twin/text_cos` (mean
      cosine of the direction pairs' projected features) with time-reversed twins).
    """
    params, batch = params["model"], batches["train"]
    det = not train
    keys = jax.random.split(rng, 6)
    drop = (lambda i: keys[i]) if train else (lambda i: None)
    app = self._apply
    w = self.weights
    metrics = {}

    video = app(params, ALPRO.encode_video, batch["video"], deterministic=det, rng=drop(0))
    text = app(params, ALPRO.encode_text, batch["text_ids"], batch["text_mask"],
               deterministic=det, rng=drop(1))
    vfeat = app(params, ALPRO.video_feature, video)
    tfeat = app(params, ALPRO.text_feature, text)
    temp = app(params, ALPRO.temperature)
    vtc, m, logits_t2v = losses.vtc_loss(vfeat, tfeat, temp)
    total = w["vtc"] * jnp.mean(vtc)
    metrics.update(m)
    metrics["loss/vtc"] = jnp.mean(vtc)
    metrics["temp"] = temp
    if IS_IMAGE in batch:
      metrics["data/image_frac"] = jnp.mean(batch[IS_IMAGE].astype(jnp.float32))
    if TWIN in batch and step is not None:  # training batches with direction pairs
      # How far each tower is from mapping a clip and its reversal (or the two captions)
      # together: 1 = blind to the direction of time.
      metrics["twin/video_cos"] = losses.twin_cosine(vfeat, batch[TWIN])
      metrics["twin/text_cos"] = losses.twin_cosine(tfeat, batch[TWIN])

    b = text.shape[0]
    mask = batch["text_mask"]
    fused_pos = None  # fused (text_i, video_i): VTM's positive pairs, PEM's input
    if w["vtm"]:
      sharp = 1.0
      if step is not None:  # the schedule of config.vtm_negatives (training only)
        sharp = losses.hard_negative_sharpness(step, self.config.num_steps,
                                               **self._vtm_schedule)
        metrics["vtm/sharpness"] = sharp
      twin = batch.get(TWIN) if step is not None and not self._sample_twins else None
      neg_video, neg_text = losses.sample_hard_negatives(keys[4], logits_t2v, sharp, twin)
      if TWIN in batch and step is not None:  # training only
        neg_video, neg_text, m = losses.twin_negatives(
            jax.random.fold_in(keys[4], 1), batch[TWIN], neg_video, neg_text, self._twin_prob)
        metrics.update(m)
      # Pairs: (text_i, video_i), (text_i, hard-negative video), (hard-negative text, video_i).
      fused = app(params, ALPRO.fuse,
                  jnp.concatenate([text, text, text[neg_text]]),
                  jnp.concatenate([mask, mask, mask[neg_text]]),
                  jnp.concatenate([video, video[neg_video], video]),
                  deterministic=det, rng=drop(2))
      fused_pos = fused[:b]
      logits = app(params, ALPRO.vtm_logits, fused)
      vtm, m = losses.vtm_loss(logits[:b], logits[b:2 * b], logits[2 * b:])
      total = total + w["vtm"] * jnp.mean(vtm)
      metrics.update(m)
      metrics["loss/vtm"] = jnp.mean(vtm)

    if w["mlm"]:
      masked = app(params, ALPRO.encode_text, batch["mlm_ids"], batch["text_mask"],
                   deterministic=det, rng=drop(3))
      fused = app(params, ALPRO.fuse, masked, batch["text_mask"], video, deterministic=det,
                  rng=drop(5))
      logits = app(params, ALPRO.mlm_logits, fused[:, :masked.shape[1]])
      mlm, count, m = losses.mlm_loss(logits, batch["mlm_labels"])
      mlm_mean = jnp.sum(mlm * count) / jnp.maximum(jnp.sum(count), 1.0)
      total = total + w["mlm"] * mlm_mean
      metrics.update(m)
      metrics["loss/mlm"] = mlm_mean

    if w["pem"]:
      if frozen is None:
        raise ValueError("loss.pem > 0 needs the frozen prompter: pass "
                         "`task.load_frozen(...).params` as `frozen`")
      if fused_pos is None:
        fused_pos = app(params, ALPRO.fuse, text, mask, video, deterministic=det, rng=drop(2))
      # Own stream: the region draw leaves the other losses' random numbers unchanged.
      pem, m = self._pem(params, frozen, batch, jax.random.fold_in(rng, 7), fused_pos)
      total = total + w["pem"] * pem
      metrics.update(m)
      metrics["loss/pem"] = pem

    return total, metrics

  def _pem(self, params, frozen, batch: dict, rng: jax.Array, fused_pos: jax.Array
           ) -> tuple[jax.Array, dict]:
    """PEM loss (mean over kept labels) and metrics.

    Metrics: `pem_loss`'s, and `label_quality`'s on the teacher labels with the entities named
    in each caption as ground truth (single-token entities only). `pem/teacher_acc` close to
    `pem/teacher_chance` means the prompter is too weak to teach anything: train it longer,
    or raise `pem.threshold`.

    Args:
      fused_pos: [B, L+1+N, D] fusion output of the matched pairs; tokens L+1.. are the video
        patch tokens in row-major grid order.
    """
    p = self.config.pem
    video = batch["video"]
    b, _, height, width, _ = video.shape
    patch = self.model.config.video.patch_size
    grid = (height // patch, width // patch)
    regions = losses.sample_regions(rng, b, grid, tuple(p.area), tuple(p.aspect))
    patch_mask = losses.region_patch_mask(regions, grid)

    # Teacher: the frozen prompter on the region-only frames (eval mode, no gradient).
    teacher = lambda method, *args: self.prompter.apply(
        {"params": frozen["prompter"]}, *args, method=method)
    region_only = losses.keep_region(video, regions, patch)
    feat = teacher(ALPRO.video_feature, teacher(ALPRO.encode_video, region_only))
    hi = jax.lax.Precision.HIGHEST
    sim = jnp.matmul(feat, frozen["entities_video"].T, precision=hi)
    if IS_IMAGE in batch:  # image batches compare with the image-prompt entities
      sim_image = jnp.matmul(feat, frozen["entities_image"].T, precision=hi)
      sim = jnp.where(batch[IS_IMAGE][:, None], sim_image, sim)
    over_uniform = p.get("threshold_mode", "absolute") == "over_uniform"
    labels, keep = losses.soft_labels(sim, teacher(ALPRO.temperature), float(p.threshold),
                                      over_uniform=over_uniform)
    keep = keep & batch["valid"]

    # Student: the mean fused video-patch token inside the region -> PEM head.
    length = batch["text_ids"].shape[1]
    region = losses.region_mean(fused_pos[:, length + 1:], patch_mask)
    logits = self._apply(params, ALPRO.pem_logits, region)
    per_sample, metrics = losses.pem_loss(logits, labels, keep)
    # Ground truth for the teacher: entity k is in clip b when its token is in the caption
    # (id -1 never matches; padding is masked out in case an entity shares the pad id).
    ids = jnp.where(batch["text_mask"] > 0, batch["text_ids"], -1)
    present = jnp.any(ids[:, :, None] == jnp.asarray(self._entity_ids)[None, None, :], axis=1)
    present = present & (jnp.asarray(self._entity_ids) >= 0)[None, :]
    metrics.update(losses.label_quality(labels, keep, present))
    pem = jnp.sum(per_sample) / jnp.maximum(jnp.sum(keep.astype(jnp.float32)), 1.0)
    return pem, metrics

  # ---- evaluation -------------------------------------------------------------------------

  @functools.cached_property
  def _evaluators(self) -> dict[str, task_lib.Evaluator]:
    return {"retrieval": retrieval.RetrievalEvaluator(self.model,
                                                      int(self.config.eval_batch_size),
                                                      lambda: self._class_names)}

  @functools.cached_property
  def _class_names(self) -> list[str] | None:
    """The data's class names (`data.classes`, "" = DATA_DIR/classes.txt), for the per-class
    contrast-probe metrics; None (metrics keyed by label index) when the data has no list.
    A malformed list fails (`classes.read_class_names`)."""
    path, data_dir = str(self.config.data.get("classes", "")), self.config.data.get("dir")
    try:
      if not path and not data_dir:
        raise FileNotFoundError("data.classes is empty and there is no data directory")
      return classes_lib.class_names(path, data_dir, write=jax.process_index() == 0)
    except FileNotFoundError as e:
      logging.warning("per-class probe metrics keyed by label index: %s", e)
      return None

  def evaluators(self) -> dict[str, task_lib.Evaluator]:
    """`retrieval`: VTC ranks, VTM re-ranking (`rerank_k`), contrast probes."""
    return self._evaluators
