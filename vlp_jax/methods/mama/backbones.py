"""The dual encoders MAMA's retrieval task trains: ALPRO's, or CLIP's towers over frames.

A backbone owns the parameters of the `model` collection, including MAMA's learnable
`logit_scale` (s = exp(logit_scale)), and maps a batch to L2-normalised features:

  alpro  ALPRO's TimeSformer and BERT text encoder with their VTC projections (the fusion
         layers and heads are in the params but unused; `optim.model.frozen` freezes them).
         Pretrained: `init.checkpoint` (an ALPRO run), `init.video` / `init.text` = "hf:DIR".
  clip   CLIP's image tower on every frame, mean-pooled over time (CLIP4Clip's parameter-free
         "meanP"), and its text tower pooled at the last real token ([SEP] for the BERT
         tokenizer, <|endoftext|> for CLIP's). `logit_scale` is CLIP's own. Pretrained:
         `init.clip` = "hf:DIR" (a `CLIPModel`): the architecture then comes from that
         directory's config.json (image tower resized to `data.image_size`); its text ids only
         make sense with its own tokenizer (`data.vocab` = the tokenizer directory).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from vlp_jax.convert import hf
from vlp_jax.models import clip as clip_lib
from vlp_jax.models import layers
from vlp_jax.models.alpro import ALPRO, alpro_config

LOGIT_SCALE = "logit_scale"  # s = exp(logit_scale), in the `model` collection of both
BACKBONES = ("alpro", "clip")


def _hf_dir(spec: str) -> str:
  if not spec.startswith("hf:"):
    raise ValueError(f"init.clip must be 'hf:DIR' (a local transformers CLIPModel), got {spec!r}")
  return spec[3:]


class AlproBackbone:
  """ALPRO's video and text encoders with their VTC projections, plus `logit_scale`."""

  pretrained_keys = ("text", "video")

  def __init__(self, config, vocab_size: int):
    self.config = config
    self.model = ALPRO(alpro_config(config.model, vocab_size))

  def init(self, rng: jax.Array) -> dict[str, Any]:
    """Fresh `model` params (boxed with logical axes)."""
    d = self.config.data
    video = jnp.zeros((2, d.num_frames, d.image_size, d.image_size, 3), jnp.float32)
    ids = jnp.zeros((2, d.max_text_len), jnp.int32)
    params = dict(self.model.init({"params": rng, "dropout": rng}, video, ids,
                                  jnp.ones_like(ids))["params"])
    params[LOGIT_SCALE] = nn.LogicallyPartitioned(
        jnp.float32(self.config.mama.logit_scale_init), ())
    return params

  def import_pretrained(self, key: str, path: str, params: dict[str, Any]) -> dict[str, Any]:
    fn = {"text": hf.init_alpro_text, "video": hf.init_alpro_video}[key]
    params = dict(params)
    scale = params.pop(LOGIT_SCALE)
    return dict(fn(params, path, self.model.config), **{LOGIT_SCALE: scale})

  def features(self, params, batch, rng=None) -> tuple[jax.Array, jax.Array]:
    """L2-normalised (video [B,E], text [B,E]) float32; dropout on when `rng` is given."""
    backbone = {k: v for k, v in params.items() if k != LOGIT_SCALE}
    keys = jax.random.split(rng) if rng is not None else (None, None)
    app = lambda method, *a, key=None, **kw: self.model.apply(
        {"params": backbone}, *a, method=method, rngs={"dropout": key} if key is not None
        else {}, **kw)
    det = rng is None
    video = app(ALPRO.encode_video, batch["video"], deterministic=det, key=keys[0])
    text = app(ALPRO.encode_text, batch["text_ids"], batch["text_mask"], deterministic=det,
               key=keys[1])
    return app(ALPRO.video_feature, video), app(ALPRO.text_feature, text)


def clip_config(config, vocab_size: int) -> clip_lib.ClipConfig:
  """`config.clip` (or the `init.clip` checkpoint's config.json) as a `ClipConfig`."""
  c, d, m = config.clip, config.data, config.model
  if config.init.get("clip", ""):
    return hf.clip_config_from_dir(_hf_dir(config.init.clip), image_size=int(d.image_size),
                                   dtype=m.dtype, attention=m.attention, remat=m.remat)
  t, v = c.text, c.vision
  if int(d.max_text_len) > int(t.max_position):
    raise ValueError(f"data.max_text_len {d.max_text_len} exceeds clip.text.max_position "
                     f"{t.max_position}")
  text = clip_lib.ClipTextConfig(
      vocab_size=int(vocab_size), hidden=int(t.hidden), layers=int(t.layers),
      heads=int(t.heads), mlp_dim=int(t.mlp_dim), max_position=int(t.max_position),
      hidden_act=str(c.hidden_act), eos_token_id=0, bos_token_id=None, pad_token_id=None)
  vision = clip_lib.ClipVisionConfig(
      image_size=int(d.image_size), patch_size=int(v.patch_size), hidden=int(v.hidden),
      layers=int(v.layers), heads=int(v.heads), mlp_dim=int(v.mlp_dim),
      hidden_act=str(c.hidden_act))
  return clip_lib.ClipConfig(text=text, vision=vision, projection_dim=int(c.projection_dim),
                             logit_scale_init=float(config.mama.logit_scale_init),
                             dtype=m.dtype, attention=m.attention, remat=m.remat)


class ClipBackbone:
  """CLIP's towers as a video dual encoder (frame features mean-pooled over time)."""

  pretrained_keys = ("clip",)

  def __init__(self, config, vocab_size: int):
    self.config = config
    self.model = clip_lib.CLIP(clip_config(config, vocab_size))

  def init(self, rng: jax.Array) -> dict[str, Any]:
    """Fresh `model` params (boxed with logical axes); `logit_scale` is CLIP's own."""
    d, v = self.config.data, self.model.config.vision
    pixels = jnp.zeros((1, v.image_size, v.image_size, 3), jnp.float32)
    ids = jnp.zeros((1, int(d.max_text_len)), jnp.int32)
    return dict(self.model.init(rng, pixels, ids)["params"])

  def import_pretrained(self, key: str, path: str, params: dict[str, Any]) -> dict[str, Any]:
    """Every CLIP parameter from a `CLIPModel` directory; shapes must match `params`."""
    assert key == "clip", key
    _, imported = hf.import_clip(path, image_size=self.model.config.vision.image_size)
    want = traverse_util.flatten_dict(params)
    got = traverse_util.flatten_dict(imported)
    if set(want) != set(got):
      missing = sorted("/".join(k) for k in set(want) - set(got))
      extra = sorted("/".join(k) for k in set(got) - set(want))
      raise hf.ConversionError(f"{path}: CLIP parameters differ from the model's: missing "
                               f"{missing[:5]}, unexpected {extra[:5]}")
    for k, target in want.items():
      if tuple(target.shape) != tuple(got[k].shape):
        raise hf.ConversionError(f"{path}: {'/'.join(k)} has shape {tuple(got[k].shape)}, "
                                 f"the model's is {tuple(target.shape)}")
    return traverse_util.unflatten_dict(got)

  def features(self, params, batch, rng=None) -> tuple[jax.Array, jax.Array]:
    """L2-normalised (video [B,P], text [B,P]) float32 (CLIP has no dropout: `rng` unused)."""
    del rng
    app = lambda method, *a: self.model.apply({"params": params}, *a, method=method)
    frames = app(clip_lib.CLIP.encode_frames, batch["video"])  # [B, T, P]
    video = jnp.mean(frames.astype(jnp.float32), axis=1)
    mask = batch["text_mask"]
    eot = jnp.maximum(jnp.sum(mask.astype(jnp.int32), axis=1) - 1, 0)  # last real token
    embeds = app(clip_lib.CLIP.embed_tokens, batch["text_ids"])
    text = app(clip_lib.CLIP.encode_text_embeds, embeds, eot, mask)
    return layers.l2_normalize(video), layers.l2_normalize(text)


def build(config, vocab_size: int) -> AlproBackbone | ClipBackbone:
  """The backbone named by `config.backbone`."""
  if config.backbone == "alpro":
    return AlproBackbone(config, vocab_size)
  if config.backbone == "clip":
    return ClipBackbone(config, vocab_size)
  raise ValueError(f"backbone {config.backbone!r} is not one of {BACKBONES}")
