"""CLIP pre-training (task `clip_pretrain`): the image-text model Prompt-CLIP freezes, trained
in-repo from a corpus and a tokenizer learned on it (configs/clip_pretrain.py).

Model: `vlp_jax.models.clip.CLIP` (ViT image tower, causal text tower, projections and
`logit_scale`, HF `CLIPModel` parameter names) in the one collection `model`; sizes from
`config.model`, the image size from `data.image_size`, the vocabulary and the special ids
(EOT = where the text tower pools) from the run's tokenizer.
Objective: symmetric InfoNCE over the global batch (`losses.vtc_loss`) between the
L2-normalised image and text features, temperature 1 / exp(logit_scale), `logit_scale`
clamped at `model.max_logit_scale` (CLIP: ln 100) in the forward pass.
Data: stream `train` reads still images (one-frame clips of `data.train_split`, default
`images`; `data.num_frames` = 1); a clip of several frames gives the mean of its frame features
(CLIP4Clip's "meanP"), so one frame of a video is a fine image. With `data.image_ratio` > 0
whole batches of `data.image_split` are mixed in (`Stream.image_mix`).
Evaluator: `retrieval` (eval/dual_encoder.py): text <-> clip ranks by cosine similarity, frames
mean-pooled, contrast probes when the split has them.
Export (`launch.export`): a transformers `CLIPModel` directory with the tokenizer.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from vlp_jax import losses
from vlp_jax.convert import export as export_lib
from vlp_jax.convert import hf
from vlp_jax.core import task as task_lib
from vlp_jax.eval import dual_encoder
from vlp_jax.models import clip as clip_lib
from vlp_jax.models import layers

KEYS = ("video", "text_ids", "text_mask", "valid")
INIT_SCHEMES = ("hf", "flax")  # `model.init_scheme`: `reinit` below, or the modules' own


def special_ids(tokenizer: Any, vocab_size: int) -> tuple[int, int | None, int | None]:
  """(eos, bos, pad) ids of the text tower: the tokenizer's EOT / SOT / padding ([SEP] /
  [CLS] / [PAD] for a BERT tokenizer); openai's layout (EOT last, SOT before it) without
  one (random data)."""
  if tokenizer is None:
    return vocab_size - 1, vocab_size - 2, vocab_size - 1
  eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
  bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
  if eos is None:
    raise ValueError("clip_pretrain: the tokenizer has no end-of-text (or [SEP]) token for the "
                     "text tower to pool at")
  return int(eos), bos, tokenizer.pad_token_id


def clip_config(config, text) -> clip_lib.ClipConfig:
  """`config.model` with the run's image size and tokenizer as a `ClipConfig`.

  Raises:
    ValueError: `data.max_text_len` exceeds `model.text.max_position`, or the EOT id is
      `clip_lib.LEGACY_EOS_TOKEN_ID` (the text tower would pool at argmax(ids) instead).
  """
  m, d = config.model, config.data
  t, v = m.text, m.vision
  if int(d.max_text_len) > int(t.max_position):
    raise ValueError(f"data.max_text_len {d.max_text_len} exceeds model.text.max_position "
                     f"{t.max_position} (the text position table)")
  eos, bos, pad = special_ids(text.tokenizer, int(text.vocab_size))
  if eos == clip_lib.LEGACY_EOS_TOKEN_ID:
    raise ValueError(f"clip_pretrain: the tokenizer's end-of-text id is {eos}, which CLIP "
                     "configs reserve for pooling at argmax(input_ids)")
  return clip_lib.ClipConfig(
      text=clip_lib.ClipTextConfig(
          vocab_size=int(text.vocab_size), hidden=int(t.hidden), layers=int(t.layers),
          heads=int(t.heads), mlp_dim=int(t.mlp_dim), max_position=int(t.max_position),
          hidden_act=str(m.hidden_act), eos_token_id=eos, bos_token_id=bos, pad_token_id=pad),
      vision=clip_lib.ClipVisionConfig(
          image_size=int(d.image_size), patch_size=int(v.patch_size), hidden=int(v.hidden),
          layers=int(v.layers), heads=int(v.heads), mlp_dim=int(v.mlp_dim),
          hidden_act=str(m.hidden_act)),
      projection_dim=int(m.projection_dim), logit_scale_init=float(m.logit_scale_init),
      dtype=str(m.dtype), attention=str(m.attention), remat=str(m.remat))


def write_image_processor(out_dir: str, image_size: int) -> str:
  """preprocessor_config.json of a transformers `CLIPImageProcessor` that resizes and
  centre-crops to `image_size` and normalises as our pipeline does; returns its path."""
  size = int(image_size)
  path = os.path.join(out_dir, "preprocessor_config.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump({"image_processor_type": "CLIPImageProcessor", "do_resize": True,
               "size": {"shortest_edge": size}, "resample": 3, "do_center_crop": True,
               "crop_size": {"height": size, "width": size}, "do_rescale": True,
               "rescale_factor": 1 / 255, "do_normalize": True,
               "image_mean": list(export_lib.PIXEL_MEAN), "image_std": list(export_lib.PIXEL_STD),
               "do_convert_rgb": True}, f, indent=2)
  return path


def init_std(path: tuple[str, ...], cfg: clip_lib.ClipConfig) -> float | None:
  """The std of the normal draw HF `CLIPPreTrainedModel._init_weights` gives parameter `path`
  (initializer_factor 1), or None: keep the module's init (LayerNorms 1 / 0, biases 0,
  `logit_scale`).

  Attention and MLP weights scale with the tower's width D and depth L (q/k/v and fc2:
  D^-1/2 (2L)^-1/2, out_proj: D^-1/2, fc1: (2D)^-1/2), the class embedding and projections
  with D^-1/2, the token, position and patch embeddings get 0.02. The modules' own normal(0.02)
  everywhere leaves a small tower's pooled features nearly input-independent at init, and
  InfoNCE then sits at log(B) for hundreds of steps.
  """
  if path[-1] in ("bias", "scale") or path == ("logit_scale",):
    return None
  if path[0] in ("text_projection", "visual_projection"):
    return (cfg.text if path[0] == "text_projection" else cfg.vision).hidden ** -0.5
  tower = cfg.text if path[0] == "text_model" else cfg.vision
  d, n = tower.hidden, tower.layers
  module = path[-2] if path[-1] in ("kernel", "embedding") else path[-1]
  stds = {"q_proj": d ** -0.5 * (2 * n) ** -0.5, "k_proj": d ** -0.5 * (2 * n) ** -0.5,
          "v_proj": d ** -0.5 * (2 * n) ** -0.5, "out_proj": d ** -0.5, "fc1": (2 * d) ** -0.5,
          "fc2": d ** -0.5 * (2 * n) ** -0.5, "class_embedding": d ** -0.5}
  return stds.get(module, 0.02)


def reinit(params: dict[str, Any], rng: jax.Array, cfg: clip_lib.ClipConfig) -> dict[str, Any]:
  """`params` (logically boxed) with every leaf that `init_std` names redrawn from
  N(0, std^2) in float32, one key per parameter; the boxes (logical axes) are kept."""
  flat = traverse_util.flatten_dict(params)
  out = {}
  for i, (path, box) in enumerate(sorted(flat.items())):
    std = init_std(path, cfg)
    if std is not None:
      value = nn.unbox(box)
      new = std * jax.random.normal(jax.random.fold_in(rng, i), value.shape, jnp.float32)
      box = box.replace_boxed(new) if isinstance(box, nn.Partitioned) else new
    out[path] = box
  return traverse_util.unflatten_dict(out)


@task_lib.register("clip_pretrain")
class ClipPretrainTask(task_lib.Task):
  """CLIP trained from scratch with symmetric InfoNCE on image-text pairs.

  Attributes:
    model: the `CLIP` module.
  """

  def __init__(self, config, text):
    super().__init__(config, text)
    self.model = clip_lib.CLIP(clip_config(config, text))
    self.max_logit_scale = float(config.model.max_logit_scale)
    self.init_scheme = str(config.model.get("init_scheme", "hf"))
    if self.init_scheme not in INIT_SCHEMES:
      raise ValueError(f"model.init_scheme must be one of {INIT_SCHEMES}, got "
                       f"{self.init_scheme!r}")

  def init_collections(self, rng: jax.Array) -> dict[str, Any]:
    """{"model": logically boxed float32 CLIP params}."""
    v = self.model.config.vision
    pixels = jnp.zeros((1, v.image_size, v.image_size, 3), jnp.float32)
    ids = jnp.zeros((1, int(self.config.data.max_text_len)), jnp.int32)
    init_rng, draw_rng = jax.random.split(rng)
    params = self.model.init(init_rng, pixels, ids)["params"]
    if self.init_scheme == "hf":
      params = reinit(params, draw_rng, self.model.config)
    return {"model": params}

  def streams(self) -> dict[str, task_lib.Stream]:
    return {"train": task_lib.Stream(keys=KEYS, image_mix=True)}

  def features(self, params, batch) -> tuple[jax.Array, jax.Array]:
    """L2-normalised (image [B, P], text [B, P]) float32 of the `model` params.

    Args:
      batch: `video` float32 [B, T, H, W, 3] (CLIP-normalised; T = 1 for still images, else
        the frame features are averaged), `text_ids`, `text_mask` int32 [B, L] (the text
        tower pools at the first EOT, as HF `CLIPTextModel`).
    """
    app = functools.partial(self.model.apply, {"params": params})
    frames = app(batch["video"], method=clip_lib.CLIP.encode_frames)  # [B, T, P]
    image = jnp.mean(frames.astype(jnp.float32), axis=1)
    text = app(batch["text_ids"], batch["text_mask"], method=clip_lib.CLIP.encode_text)
    return layers.l2_normalize(image), layers.l2_normalize(text)

  def temperature(self, params) -> jax.Array:
    """float32 scalar 1 / exp(min(logit_scale, model.max_logit_scale))."""
    return jnp.exp(-jnp.minimum(params["logit_scale"], self.max_logit_scale))

  def loss(self, params, batches, rng, *, train, frozen=None, step=None):
    """Mean symmetric InfoNCE of batch `train` (`video` float32 [B, T, H, W, 3], `text_ids`,
    `text_mask` int32 [B, L]); row i's text and clip are the positive pair.

    Returns:
      (float32 scalar, metrics: `loss/infonce`, `logit_scale` (exp, <= 100), the in-batch
      accuracies `vtc/t2v_acc`, `vtc/v2t_acc`).
    """
    del rng, train, frozen, step  # CLIP has no dropout
    params = params["model"]
    image, text = self.features(params, batches["train"])
    temp = self.temperature(params)
    per_sample, metrics, _ = losses.vtc_loss(image, text, temp)
    loss = jnp.mean(per_sample)
    return loss, dict(metrics, **{"loss/infonce": loss, "logit_scale": 1.0 / temp})

  @functools.cached_property
  def _evaluators(self) -> dict[str, task_lib.Evaluator]:

    def embed(params, batch):
      image, text = self.features(params, batch)
      out = {"video": image, "text": text}
      if "probe_ids" in batch:  # contrast probes: [B, 2, L] captions per clip
        b, _, length = batch["probe_ids"].shape
        probe = self.model.apply({"params": params}, batch["probe_ids"].reshape(2 * b, length),
                                 batch["probe_mask"].reshape(2 * b, length),
                                 method=clip_lib.CLIP.encode_text)
        out["probe"] = layers.l2_normalize(probe).reshape(b, 2, -1)
        out["has_probe"] = batch["has_probe"]
      return out

    def retrieval(params, batches, mesh, rules, eval_cfg):
      del eval_cfg
      return dual_encoder.evaluate(embed, params["model"], batches, mesh, rules)
    return {"retrieval": retrieval}

  def evaluators(self) -> dict[str, task_lib.Evaluator]:
    """`retrieval`: text <-> clip ranks by cosine similarity (frames mean-pooled), both
    directions, and contrast-probe accuracy; arrays for `launch.report`."""
    return self._evaluators

  def export(self, params: dict[str, Any], out_dir: str, *, platforms: Sequence[str]
             ) -> dict[str, Any]:
    """Writes OUT as a transformers `CLIPModel` directory: config.json, model.safetensors,
    the tokenizer files (tokenizer.json, tokenizer_config.json, vocab.json, merges.txt) and
    preprocessor_config.json (`CLIPModel.from_pretrained(OUT)`,
    `AutoTokenizer.from_pretrained(OUT)`; `hf:OUT` imports back with
    `vlp_jax.convert.hf.import_clip`)."""
    del platforms  # no jax.export artifact: the checkpoint is the portable form
    hf.export_clip(self.model.config, params["model"], out_dir)
    written = {"clip": out_dir,
               "image_processor": write_image_processor(out_dir,
                                                        self.model.config.vision.image_size)}
    tok = self.text.tokenizer
    if tok is not None:
      tok.save_pretrained(out_dir)
      # transformers 5 saves tokenizer.json only; openai's vocab.json / merges.txt come along
      # from the tokenizer's directory when it has them.
      source = getattr(tok, "name_or_path", "") or ""
      for name in ("vocab.json", "merges.txt"):
        src, dst = os.path.join(source, name), os.path.join(out_dir, name)
        if os.path.isdir(source) and os.path.isfile(src) and not os.path.exists(dst):
          shutil.copyfile(src, dst)
      written["tokenizer"] = out_dir
    return written
