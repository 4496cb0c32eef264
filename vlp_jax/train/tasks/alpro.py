"""ALPRO pre-training objective: VTC + VTM (hard negatives) + MLM + PEM, weights `config.loss`.

The task is the one place that knows which losses the objective uses; the loop only sees
`init_params`, `loss`, `frozen_params` and `evaluate`.

PEM (`loss.pem` > 0, settings `config.pem`) needs a prompter: an ALPRO model of the same
encoders trained with VTC only (`prompter_stage`), loaded frozen by `frozen_params`, which
also computes the prompt-ensembled entity embeddings once. `pem.prompter` = "" means
WORKDIR/prompter, trained there first (`pem.prompter_steps`) unless it is complete.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import PartitionSpec as P

from vlp_jax import losses
from vlp_jax.data.mixture import IS_IMAGE
from vlp_jax.models.alpro import ALPRO, alpro_config, l2_normalize
from vlp_jax.parallel import sharding as shd
from vlp_jax.train import init as init_lib

# Host-batch arrays the pre-training step reads (the loop's default), plus `is_image` with
# mixed image batches.
DEVICE_KEYS = ("video", "text_ids", "text_mask", "mlm_ids", "mlm_labels", "valid")
PROMPTER_SUBDIR = "prompter"
_PROMPT_CHUNK = 512  # prompts encoded per step of the one-off entity embedding


def prompter_stage(config):
  """The prompter stage of a pre-training config: same model, data and optimiser, VTC only.

  Returns a copy with `loss` = VTC only, `num_steps` = `pem.prompter_steps`, `ckpt_every` =
  `pem.prompter_ckpt_every`, evaluation only at the end, and no `init.checkpoint`
  (transformers imports `init.text` / `init.video` stay).
  """
  c = copy.deepcopy(config)
  with c.unlocked():
    for k in c.loss:
      c.loss[k] = 1.0 if k == "vtc" else 0.0
    c.num_steps = int(config.pem.prompter_steps)
    c.eval_every = 0
    c.ckpt_every = int(config.pem.prompter_ckpt_every)
    if "init" in c:
      c.init.checkpoint = ""
  return c


def _latest_step(workdir: str) -> int | None:
  ckpt = os.path.join(workdir, "checkpoints")
  steps = [int(n) for n in os.listdir(ckpt) if n.isdigit()] if os.path.isdir(ckpt) else []
  return max(steps) if steps else None


class ALPROTask:
  """Wraps the ALPRO module with its pre-training loss and retrieval evaluation.

  Attributes:
    device_keys: host-batch keys the step needs.
    entities: PEM entity names ([] without PEM or with random data).
  """

  def __init__(self, config, vocab_size: int):
    self.config = config
    self.weights = {k: float(config.loss.get(k, 0.0)) for k in ("vtc", "vtm", "mlm", "pem")}
    mixed = float(config.data.get("image_ratio", 0.0)) > 0.0
    self.device_keys = DEVICE_KEYS + ((IS_IMAGE,) if mixed else ())
    model_cfg = alpro_config(config.model, vocab_size)
    self.entities: list[str] = []
    if self.weights["pem"]:
      k = int(config.pem.num_entities)
      if k < 1:
        raise ValueError(f"loss.pem > 0 needs pem.num_entities >= 1, got {k}")
      if config.data.source != "random":
        from vlp_jax.data import entities as entities_lib
        self.entities = entities_lib.load_entities(self._entity_file(), k)
      model_cfg = dataclasses.replace(model_cfg, num_entities=k)
      # The frozen teacher: the same encoders, no PEM head.
      self.prompter = ALPRO(dataclasses.replace(model_cfg, num_entities=0))
    self.model = ALPRO(model_cfg)

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
    if IS_IMAGE in getattr(self, "device_keys", ()):
      batch[IS_IMAGE] = np.zeros((batch_size,), bool)
    return batch

  def _init(self, model, rng: jax.Array) -> Any:
    b = self.dummy_batch(2)
    return model.init({"params": rng, "dropout": rng}, b["video"], b["text_ids"],
                      b["text_mask"])["params"]

  def init_params(self, rng: jax.Array) -> Any:
    """Logically boxed float32 params (call under `jax.eval_shape` / jit)."""
    return self._init(self.model, rng)

  def _apply(self, params, method, *args, rng=None, **kwargs):
    rngs = {"dropout": rng} if rng is not None else {}
    return self.model.apply({"params": params}, *args, method=method, rngs=rngs, **kwargs)

  # ---- PEM's frozen prompter ----------------------------------------------------------------

  def frozen_params(self, mesh, rules, workdir: str | None = None):
    """The frozen pytree PEM reads, or None without PEM.

    Loads the prompter (`pem.prompter`: a prompter run's WORKDIR; "" = WORKDIR/prompter,
    trained there first unless it already holds the final step of `prompter_stage(config)`;
    with `data.source='random'`, the throughput benchmark, "" is a seeded untrained
    prompter), encodes the 12 video and 12 image prompts of every entity once, and keeps
    what the loss needs. Called once per run, after the mesh exists.

    Returns:
      (frozen, shardings): frozen = {"prompter": its video_encoder, vision_proj and temp
      params, "entities_video", "entities_image": float32 [K, E], the L2-normalised mean of
      the normalised prompt features (random unit vectors with `data.source='random'`,
      which has no tokenizer)}; the entity axis is the logical axis `entities`.
    """
    if not getattr(self, "weights", {}).get("pem"):
      return None
    init_fn = functools.partial(self._init, self.prompter)
    if self.config.data.source == "random" and not self.config.pem.prompter:
      # Benchmark data has nothing to learn: a seeded fresh prompter exercises PEM's compute.
      key = jax.random.fold_in(jax.random.PRNGKey(int(self.config.seed)), 0x9E7)
      with shd.activate(mesh, rules):
        shardings = shd.logical_to_sharding(jax.eval_shape(init_fn, key), mesh, rules)
        params = jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=shardings)(key)
      logging.info("PEM: random data, untrained prompter")
    else:
      path = self._ensure_prompter(workdir, list(mesh.devices.flat))
      step = int(self.config.pem.step)
      params, shardings = init_lib.load_run_params(path, init_fn, mesh, rules, step=step)
      logging.info("PEM: prompter from %s (step %s), %d entities", path,
                   _latest_step(path) if step < 0 else step, self.model.config.num_entities)
    ent_shd = nn.logical_to_mesh_sharding(P("entities", None), mesh, rules)
    video, image = self._entity_features(params, mesh, rules, ent_shd)
    keep = ("video_encoder", "vision_proj", "temp")
    frozen = {"prompter": {k: params[k] for k in keep}, "entities_video": video,
              "entities_image": image}
    frozen_shd = {"prompter": {k: shardings[k] for k in keep}, "entities_video": ent_shd,
                  "entities_image": ent_shd}
    return frozen, frozen_shd

  def _ensure_prompter(self, workdir: str | None, devices=None) -> str:
    """The prompter run's directory; with `pem.prompter` = "" trains it first if needed (on
    `devices`, default all)."""
    if self.config.pem.prompter:
      return os.path.abspath(self.config.pem.prompter)
    if workdir is None:
      raise ValueError("pem.prompter is '' (= WORKDIR/prompter, trained on first use) but no "
                       "workdir was given; set pem.prompter to a prompter run's WORKDIR")
    path = os.path.join(os.path.abspath(workdir), PROMPTER_SUBDIR)
    stage = prompter_stage(self.config)
    if (_latest_step(path) or 0) < stage.num_steps:
      logging.info("PEM: training the prompter (VTC only, %d steps) in %s first",
                   stage.num_steps, path)
      from vlp_jax.train import loop  # lazy: the loop imports the tasks
      results = loop.train(stage, path, devices=devices)
      logging.info("PEM: prompter trained: %s", {
          split: {k: round(v, 2) for k, v in m.items() if k.startswith("retrieval/t2v_R")}
          for split, m in results.items() if split != "train"})
    return path

  def _prompt_tokens(self) -> tuple[np.ndarray, np.ndarray]:
    """int32 ids and mask [24 K, L] of the video then image prompts (template-major)."""
    from vlp_jax.data import entities as entities_lib
    from vlp_jax.data import text, tokenizer
    d = self.config.data
    tok = tokenizer.load_tokenizer(d.vocab or os.path.join(d.dir, "vocab.txt"))
    prompts = entities_lib.prompts(
        self.entities, entities_lib.VIDEO_TEMPLATES + entities_lib.IMAGE_TEMPLATES)
    ids, mask = text.tokenize(tok, prompts, 64)
    length = int(mask.sum(axis=1).max())  # right-padded: cut to the longest prompt
    return ids[:, :length], mask[:, :length]

  def _entity_features(self, params, mesh, rules, sharding) -> tuple[jax.Array, jax.Array]:
    """(video, image) entity embeddings float32 [K, E] from the prompter's text tower."""
    from vlp_jax.data import entities as entities_lib
    k = self.model.config.num_entities
    e = self.model.config.embed_dim
    if self.config.data.source == "random":
      rng = np.random.default_rng([int(self.config.seed), 0xE7])
      feats = rng.standard_normal((2, k, e)).astype(np.float32)
      feats /= np.linalg.norm(feats, axis=-1, keepdims=True)
      return tuple(jax.make_array_from_callback((k, e), sharding, lambda i, f=f: f[i])
                   for f in feats)
    ids, mask = self._prompt_tokens()
    n = ids.shape[0]
    chunk = min(n, _PROMPT_CHUNK)
    pad = -n % chunk  # whole chunks; the padding rows repeat row 0 and are cut off
    ids = np.concatenate([ids, np.repeat(ids[:1], pad, 0)]).reshape(-1, chunk, ids.shape[1])
    mask = np.concatenate([mask, np.repeat(mask[:1], pad, 0)]).reshape(ids.shape)
    rep = shd.replicated(mesh)
    ids, mask = (jax.make_array_from_callback(x.shape, rep, lambda i, x=x: x[i])
                 for x in (ids, mask))
    num_video = len(entities_lib.VIDEO_TEMPLATES)
    model = self.prompter

    def embed(params, ids, mask):
      def one(x):
        tokens = model.apply({"params": params}, *x, method=ALPRO.encode_text)
        return model.apply({"params": params}, tokens, method=ALPRO.text_feature)
      feats = jax.lax.map(one, (ids, mask)).reshape(-1, e)[:n].reshape(-1, k, e)
      # Ensemble: mean of the normalised features of a set's templates, normalised again.
      return l2_normalize(jnp.mean(feats[:num_video], 0)), l2_normalize(
          jnp.mean(feats[num_video:], 0))

    with shd.activate(mesh, rules):
      return jax.jit(embed, out_shardings=(sharding, sharding))(params, ids, mask)

  def loss(self, params, batch: dict, rng: jax.Array, train: bool = True, frozen=None):
    """Weighted sum of the per-sample losses, averaged over the global batch.

    Args:
      batch: global arrays: video float32 [B,T,H,W,3]; text_ids, text_mask, mlm_ids,
        mlm_labels int32 [B,L]; valid bool [B]; optional is_image bool [B] (image batch).
      frozen: `frozen_params`' pytree (needed when `loss.pem` > 0).
    Returns:
      (scalar float32 loss, metrics dict with `loss/vtc`, `loss/vtm`, `loss/mlm`, `loss/pem`
      (each when its weight is > 0), accuracies, `pem/kept_frac`, `temp`, and
      `data/image_frac` with mixed image batches).
    """
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

    b = text.shape[0]
    mask = batch["text_mask"]
    fused_pos = None  # fused (text_i, video_i): VTM's positive pairs, PEM's input
    if w["vtm"]:
      neg_video, neg_text = losses.sample_hard_negatives(keys[4], logits_t2v)
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
                         "`task.frozen_params(...)[0]` as `frozen`")
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
    labels, keep = losses.soft_labels(sim, teacher(ALPRO.temperature), float(p.threshold))
    keep = keep & batch["valid"]

    # Student: the mean fused video-patch token inside the region -> PEM head.
    length = batch["text_ids"].shape[1]
    region = losses.region_mean(fused_pos[:, length + 1:], patch_mask)
    logits = self._apply(params, ALPRO.pem_logits, region)
    per_sample, metrics = losses.pem_loss(logits, labels, keep)
    pem = jnp.sum(per_sample) / jnp.maximum(jnp.sum(keep.astype(jnp.float32)), 1.0)
    return pem, metrics

  # ---- evaluation -------------------------------------------------------------------------

  def _features(self, params, batch, tokens: bool) -> dict[str, jax.Array]:
    video = self._apply(params, ALPRO.encode_video, batch["video"])
    text = self._apply(params, ALPRO.encode_text, batch["text_ids"], batch["text_mask"])
    out = {"video": self._apply(params, ALPRO.video_feature, video),
           "text": self._apply(params, ALPRO.text_feature, text)}
    if tokens:  # what VTM re-ranking fuses later
      out.update(video_tokens=video, text_tokens=text, text_mask=batch["text_mask"])
    if "probe_ids" in batch:
      b, _, length = batch["probe_ids"].shape
      probe = self._apply(params, ALPRO.encode_text, batch["probe_ids"].reshape(2 * b, length),
                          batch["probe_mask"].reshape(2 * b, length))
      out["probe"] = self._apply(params, ALPRO.text_feature, probe).reshape(b, 2, -1)
      out["has_probe"] = batch["has_probe"]
    return out

  @functools.cached_property
  def _embed(self):
    """(params, batch) -> dict of float32 features `video`, `text` [B,E], and, when the
    batch has contrast probes, `probe` [B,2,E] with `has_probe` bool [B]."""
    return functools.partial(self._features, tokens=False)

  @functools.cached_property
  def _embed_tokens(self):
    """`_embed` plus `video_tokens` [B,1+N,D], `text_tokens` [B,L,D], `text_mask` [B,L]."""
    return functools.partial(self._features, tokens=True)

  @functools.cached_property
  def _vtm_pair_logit(self):
    """Jitted (params, text_tokens, text_mask, video_tokens, text_rows, video_rows) ->
    float32 [P]: VTM positive logit of the fused pairs (text_rows[p], video_rows[p])."""
    from vlp_jax.models import layers

    def score(params, text_tokens, text_mask, video_tokens, text_rows, video_rows):
      pairs = lambda x: layers.constrain(x, ("batch",) + (None,) * (x.ndim - 1))
      fused = self._apply(params, ALPRO.fuse, pairs(text_tokens[text_rows]),
                          pairs(text_mask[text_rows]), pairs(video_tokens[video_rows]))
      return self._apply(params, ALPRO.vtm_logits, fused)[:, 1]
    return jax.jit(score)

  def evaluate(self, params, batches, mesh, rules, frozen=None) -> dict[str, float]:
    """Retrieval over one pass of an eval loader (text i describes video i).

    Ranks by VTC similarity; with `config.eval_rerank_k` > 0 the top-k of every query (both
    directions) are re-ranked by VTC similarity + VTM positive logit (ALPRO's evaluation).

    Returns metrics with the DESIGN.md keys (`retrieval/t2v_R@1`, ...; re-ranked when
    re-ranking is on, and then also the VTC-only ranks under `retrieval_vtc/...`), plus
    `retrieval/contrast_acc` (percent of clips whose video is closer to its probe caption than
    to the altered one) when the split carries contrast probes.
    """
    del frozen  # evaluation uses the trained model only
    from vlp_jax.eval import features, rerank, retrieval
    from vlp_jax.parallel import sharding as shd
    k = int(self.config.get("eval_rerank_k", 0))
    if k > 0:
      rows, keep = features.collect_rows(self._embed_tokens, params, batches, mesh, rules)
      feats = features.take({n: v for n, v in rows.items()
                             if n in ("video", "text", "probe", "has_probe")}, keep, mesh)
    else:
      feats = features.collect(self._embed, params, batches, mesh, rules)
    sim = features.similarity(feats["text"], feats["video"], mesh, rules)
    gt = np.arange(sim.shape[0])
    vtc = retrieval.retrieval_metrics(sim, gt)
    if k > 0:
      keep_d = jnp.asarray(keep, jnp.int32)

      def pair_score(text_idx, video_idx):
        with shd.activate(mesh, rules):
          logit = self._vtm_pair_logit(params, rows["text_tokens"], rows["text_mask"],
                                       rows["video_tokens"], keep_d[text_idx.reshape(-1)],
                                       keep_d[video_idx.reshape(-1)])
        return logit.reshape(text_idx.shape)

      # About eval_batch_size fused pairs per call, evenly split over the batch shards.
      chunk = rerank.rows_per_chunk(int(self.config.eval_batch_size), k,
                                    features.batch_shards(mesh, rules))
      out = {f"retrieval/{n}": v
             for n, v in rerank.reranked_metrics(sim, gt, k, pair_score, chunk).items()}
      out.update({f"retrieval_vtc/{n}": v for n, v in vtc.items()})
    else:
      out = {f"retrieval/{n}": v for n, v in vtc.items()}
    if "probe" in feats and bool(jnp.any(feats["has_probe"])):
      scores = jnp.einsum("be,bke->bk", feats["video"], feats["probe"])
      right = (scores[:, 0] > scores[:, 1]) & feats["has_probe"]
      out["retrieval/contrast_acc"] = float(100.0 * jnp.sum(right) / jnp.sum(feats["has_probe"]))
    return out
