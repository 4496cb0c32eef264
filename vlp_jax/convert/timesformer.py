"""TimeSformer / ViT checkpoints <-> our TimeSformer params.

`TimesformerModel` checkpoints map one-to-one (names in `models/timesformer.py`):

  embeddings.patch_embeddings.projection   Conv2d [D, 3, p, p]  -> kernel [p, p, 3, D]
  embeddings.{cls_token [1,1,D], position_embeddings [1,1+N,D], time_embeddings [1,F,D]}
  encoder.layer.{i}.{temporal_,}attention.attention.qkv [3D, D] -> qkv [D, 3, H, Dh]
  encoder.layer.{i}.{temporal_,}attention.output.dense [D, D]   -> dense [H, Dh, D]
  encoder.layer.{i}.{temporal_layernorm, temporal_dense, layernorm_before, layernorm_after,
                     intermediate.dense, output.dense}, layernorm

An image `ViTModel` checkpoint (separate query/key/value) is inflated the way ALPRO and
TimeSformer initialise from ImageNet ViTs: spatial weights copied, temporal attention and
its LayerNorm initialised from the spatial ones, `temporal_dense` zero, time embeddings
zero. With `temporal_dense` zero the temporal branch adds nothing, so a one-frame clip gives
exactly the ViT's tokens.

Sizes that may differ from the checkpoint: the image size (position embeddings resized
bicubically on the patch grid) and the frame count (time embeddings resized linearly, as the
model does at run time).
"""
from __future__ import annotations

import math
from typing import Any
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vlp_jax.convert import hf_io
from vlp_jax.convert import layout, stacked
from vlp_jax.models import timesformer as tsf_lib
from vlp_jax.models.alpro import ALPROConfig, VideoConfig

MODEL_TYPES = ("timesformer", "vit")
_TEMPORAL = {"divided_space_time": "divided", "space_only": "none"}
_ANCHOR = "embeddings.patch_embeddings.projection.weight"
_PREFIXES = ("", "timesformer.", "vit.")

EMBEDDING_RULES = [
    layout.Rule(_ANCHOR, ("embeddings", "patch_embeddings", "projection", "kernel"), "conv"),
    layout.Rule("embeddings.patch_embeddings.projection.bias",
                ("embeddings", "patch_embeddings", "projection", "bias")),
    layout.Rule("embeddings.cls_token", ("embeddings", "cls_token"), "lead1"),
]
POSITION_RULE = layout.Rule("embeddings.position_embeddings",
                            ("embeddings", "position_embeddings"), "lead1")
TIME_RULE = layout.Rule("embeddings.time_embeddings", ("embeddings", "time_embeddings"), "lead1")
FINAL_RULES = layout.layer_norm("layernorm", ("layernorm",))


def _attention_rules(hf: str, ours: tuple[str, ...], qkv_bias: bool) -> list[layout.Rule]:
  return (layout.linear(f"{hf}.attention.qkv", ours + ("attention", "qkv"), bias=qkv_bias)
          + layout.linear(f"{hf}.output.dense", ours + ("output", "dense"), n_in=2))


def _mlp_rules(hf: str, ours: tuple[str, ...]) -> list[layout.Rule]:
  return (layout.layer_norm(f"{hf}.layernorm_after", ours + ("layernorm_after",))
          + layout.linear(f"{hf}.intermediate.dense", ours + ("intermediate", "dense"))
          + layout.linear(f"{hf}.output.dense", ours + ("output", "dense")))


def layer_rules(i: int, temporal: bool, qkv_bias: bool = True) -> list[layout.Rule]:
  """Rules of TimesformerModel layer `i` <-> our `layer_{i}` (under an `encoder` root)."""
  hf, ours = f"encoder.layer.{i}", (f"layer_{i}",)
  rules = []
  if temporal:
    rules += layout.layer_norm(f"{hf}.temporal_layernorm", ours + ("temporal_layernorm",))
    rules += _attention_rules(f"{hf}.temporal_attention", ours + ("temporal_attention",),
                              qkv_bias)
    rules += layout.linear(f"{hf}.temporal_dense", ours + ("temporal_dense",))
  rules += layout.layer_norm(f"{hf}.layernorm_before", ours + ("layernorm_before",))
  rules += _attention_rules(f"{hf}.attention", ours + ("attention",), qkv_bias)
  return rules + _mlp_rules(hf, ours)


def _square(value: Any, key: str, path: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(set(int(v) for v in value)) != 1:
      raise hf_io.ConversionError(f"{path}: {key}={list(value)} is not square; only square "
                                  "images and patches are supported")
    value = value[0]
  return int(value)


def check_config(config: Mapping, path: str) -> str:
  """Validates a TimeSformer / ViT config.json; returns the checkpoint's temporal mode.

  Returns:
    "divided" or "none" for TimeSformer, "image" for a ViT.
  """
  hf_io.check_architecture(config, MODEL_TYPES, path)
  act = config.get("hidden_act", "gelu")
  if act != "gelu":
    raise hf_io.ConversionError(f"{path}: hidden_act={act!r}; our TimeSformer uses exact 'gelu'")
  if int(config.get("num_channels", 3)) != 3:
    raise hf_io.ConversionError(f"{path}: num_channels={config.get('num_channels')}; "
                                "only RGB (3) is supported")
  if config["model_type"] == "vit":
    return "image"
  kind = config.get("attention_type", "divided_space_time")
  if kind not in _TEMPORAL:
    raise hf_io.ConversionError(f"{path}: attention_type={kind!r} is not supported; expected "
                                f"one of {sorted(_TEMPORAL)}")
  return _TEMPORAL[kind]


def video_config(config: Mapping, path: str, num_frames: int | None = None,
                 image_size: int | None = None) -> VideoConfig:
  """Our `VideoConfig` for a checkpoint (a ViT becomes a divided space-time TimeSformer).

  `num_frames` defaults to the checkpoint's (1 for a ViT); `image_size` to the checkpoint's.
  """
  kind = check_config(config, path)
  if num_frames is None:
    num_frames = 1 if kind == "image" else int(config.get("num_frames", 8))
  return VideoConfig(
      image_size=int(image_size or _square(config.get("image_size", 224), "image_size", path)),
      patch_size=_square(config.get("patch_size", 16), "patch_size", path),
      num_frames=int(num_frames), hidden=int(config["hidden_size"]),
      layers=int(config["num_hidden_layers"]), heads=int(config["num_attention_heads"]),
      mlp_dim=int(config["intermediate_size"]),
      temporal="none" if kind == "none" else "divided", dropout=0.0,
      layer_norm_eps=float(config.get("layer_norm_eps", 1e-6 if kind != "image" else 1e-12)))


def find_prefix(src: hf_io.TensorSource) -> str:
  """'' for *Model checkpoints, 'timesformer.' / 'vit.' for classification checkpoints."""
  for prefix in _PREFIXES:
    if src.has(prefix + _ANCHOR):
      return prefix
  src.take(_ANCHOR)  # raises, naming the tensor and near names
  return ""


def resize_position_embeddings(pos: np.ndarray, num_patches: int) -> np.ndarray:
  """`[1 + N', D]` -> `[1 + num_patches, D]`: bicubic on the square patch grid, CLS kept."""
  old = pos.shape[0] - 1
  if old == num_patches:
    return pos
  g_old, g_new = math.isqrt(old), math.isqrt(num_patches)
  if g_old * g_old != old or g_new * g_new != num_patches:
    raise hf_io.ConversionError(f"position embeddings for {old} patches cannot be resized to "
                                f"{num_patches}: both must be square grids")
  grid = pos[1:].reshape(g_old, g_old, -1)
  grid = np.asarray(jax.image.resize(grid, (g_new, g_new, grid.shape[-1]), "cubic",
                                     antialias=False))
  return np.concatenate([pos[:1], grid.reshape(num_patches, -1)], axis=0)


def _take_resized(src: hf_io.TensorSource, name: str, rows: int, width: int) -> np.ndarray:
  """A `[1, n, D]` embedding as `[n, D]`, checked on its width (n may differ)."""
  value = src.take(name)
  if value.ndim != 3 or value.shape[0] != 1 or value.shape[2] != width:
    raise hf_io.ConversionError(f"{src.source}: tensor {name!r} has shape {value.shape} in the "
                                f"checkpoint, expected (1, {rows}, {width})")
  return value[0]


def _inflate_qkv(src: hf_io.TensorSource, prefix: str, hf: str, shape: tuple[int, ...],
                 qkv_bias: bool) -> tuple[np.ndarray, np.ndarray]:
  """ViT's separate query/key/value Linears -> our fused `[D, 3, H, Dh]` kernel and bias."""
  d, _, h, dh = shape
  kernels, biases = [], []
  for n in ("query", "key", "value"):
    w = src.take(f"{prefix}{hf}.{n}.weight", (h * dh, d))
    kernels.append(w.T.reshape(d, h, dh))
    b = src.take(f"{prefix}{hf}.{n}.bias", (h * dh,)) if qkv_bias else np.zeros(h * dh)
    biases.append(b.reshape(h, dh))
  return np.stack(kernels, axis=1), np.stack(biases, axis=0).astype(np.float32)


def _import_vit_layer(src: hf_io.TensorSource, prefix: str, i: int, params: dict,
                      root: tuple[str, ...], divided: bool, qkv_bias: bool) -> None:
  hf, ours = f"encoder.layer.{i}", root + (f"layer_{i}",)
  layout.import_rules(layout.layer_norm(f"{hf}.layernorm_before", ("layernorm_before",))
                      + layout.linear(f"{hf}.attention.output.dense",
                                      ("attention", "output", "dense"), n_in=2)
                      + _mlp_rules(hf, ()), src, prefix, params, ours)
  qkv_path = ours + ("attention", "attention", "qkv")
  kernel, bias = _inflate_qkv(src, prefix, f"{hf}.attention.attention",
                              hf_io.get_leaf(params, qkv_path + ("kernel",)).shape, qkv_bias)
  hf_io.assign(params, qkv_path + ("kernel",), kernel)
  hf_io.assign(params, qkv_path + ("bias",), bias)
  if divided:
    _copy_spatial_to_temporal(params, ours)


def _copy_spatial_to_temporal(params: dict, layer: tuple[str, ...]) -> None:
  """ALPRO / TimeSformer inflation: temporal attention <- spatial, temporal_dense <- 0."""
  for leaf in ("scale", "bias"):
    hf_io.assign(params, layer + ("temporal_layernorm", leaf),
                 np.array(hf_io.get_leaf(params, layer + ("layernorm_before", leaf))))
  for sub in (("attention", "qkv"), ("output", "dense")):
    for leaf in ("kernel", "bias"):
      hf_io.assign(params, layer + ("temporal_attention",) + sub + (leaf,),
                   np.array(hf_io.get_leaf(params, layer + ("attention",) + sub + (leaf,))))
  for leaf in ("kernel", "bias"):
    shape = hf_io.get_leaf(params, layer + ("temporal_dense", leaf)).shape
    hf_io.assign(params, layer + ("temporal_dense", leaf), np.zeros(shape, np.float32))


def fill_video_params(src: hf_io.TensorSource, config: Mapping, cfg: VideoConfig,
                      params: dict, root: tuple[str, ...] = ()) -> None:
  """Fills our TimeSformer params at `params[root]` (in place) from a checkpoint.

  Args:
    src: the checkpoint's tensors.
    config: its config.json.
    cfg: our model's `VideoConfig` (sizes must match, except image size and frame count).
    params: nested dict whose `root` subtree is a TimesformerModel param tree (arrays or
      ShapeDtypeStructs); every leaf of that subtree is replaced.
  """
  kind = check_config(config, src.source)
  for hf_key, ours, value in (("hidden_size", "hidden", cfg.hidden),
                              ("num_hidden_layers", "layers", cfg.layers),
                              ("num_attention_heads", "heads", cfg.heads),
                              ("intermediate_size", "mlp_dim", cfg.mlp_dim)):
    if int(config[hf_key]) != int(value):
      raise hf_io.ConversionError(f"{src.source}: config.json {hf_key}={config[hf_key]} but "
                                  f"model.video.{ours}={value}")
  eps = float(config.get("layer_norm_eps", 1e-6))
  if not np.isclose(eps, cfg.layer_norm_eps, rtol=1e-3, atol=0):
    logging.warning("%s: layer_norm_eps=%g but model.video.layer_norm_eps=%g; outputs differ "
                    "slightly from the checkpoint's", src.source, eps, cfg.layer_norm_eps)
  prefix = find_prefix(src)
  qkv_bias = bool(config.get("qkv_bias", True))
  divided = cfg.temporal == "divided"
  layout.import_rules(EMBEDDING_RULES + FINAL_RULES, src, prefix, params, root)
  emb = root + ("embeddings",)
  pos = _take_resized(src, prefix + POSITION_RULE.hf, cfg.num_patches + 1, cfg.hidden)
  hf_io.assign(params, emb + ("position_embeddings",),
               resize_position_embeddings(pos, cfg.num_patches))
  has_temporal = kind == "divided"
  if divided:
    if has_temporal:
      time = _take_resized(src, prefix + TIME_RULE.hf, cfg.num_frames, cfg.hidden)
      time = np.asarray(tsf_lib.resize_time_embeddings(jnp.asarray(time), cfg.num_frames))
    else:  # the official initialisation of a fresh time embedding
      time = np.zeros((cfg.num_frames, cfg.hidden), np.float32)
    hf_io.assign(params, emb + ("time_embeddings",), time)
  for i in range(cfg.layers):
    if kind == "image":
      _import_vit_layer(src, prefix, i, params, root + ("encoder",), divided, qkv_bias)
      continue
    layout.import_rules(layer_rules(i, divided and has_temporal, qkv_bias), src, prefix,
                        params, root + ("encoder",))
    layer = root + ("encoder", f"layer_{i}")
    if not qkv_bias:  # the checkpoint has no qkv bias: ours is zero
      for attn in ("attention", "temporal_attention") if divided and has_temporal else (
          "attention",):
        path = layer + (attn, "attention", "qkv", "bias")
        hf_io.assign(params, path, np.zeros(hf_io.get_leaf(params, path).shape, np.float32))
    if divided and not has_temporal:
      _copy_spatial_to_temporal(params, layer)


def timesformer_params(path: str, num_frames: int | None = None, image_size: int | None = None,
                       dtype: Any = jnp.float32
                       ) -> tuple[tsf_lib.TimesformerModel, dict, list[str]]:
  """A TimeSformer or ViT checkpoint as our TimesformerModel (all tokens, HF layout).

  Returns:
    (module, params, unused checkpoint tensor names).
  """
  config, tensors = hf_io.load_pretrained(path)
  cfg = video_config(config, path, num_frames, image_size)
  module = tsf_lib.TimesformerModel(cfg, dtype, pool=False)
  video = jnp.zeros((1, cfg.num_frames, cfg.image_size, cfg.image_size, 3), jnp.float32)
  template = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), video))["params"]
  params = hf_io.to_mutable(nn.unbox(template))
  src = hf_io.TensorSource(tensors, path)
  fill_video_params(src, config, cfg, params)
  missing = hf_io.unfilled(params)
  if missing:
    raise hf_io.ConversionError(f"{path}: no checkpoint tensor for our params {missing}")
  return module, params, src.unused()


def import_timesformer(path: str, num_frames: int | None = None, image_size: int | None = None,
                       dtype: Any = jnp.float32) -> tuple[tsf_lib.TimesformerModel, dict]:
  """Imports a `TimesformerModel` (or an image `ViTModel`, inflated) checkpoint directory.

  Args:
    path: local `save_pretrained` directory.
    num_frames: frames per clip (default: the checkpoint's; 1 for a ViT); time embeddings
      are resized to it.
    image_size: frame size (default: the checkpoint's); position embeddings are resized.
    dtype: compute dtype of the module (params are float32).

  Returns:
    (module, params): `module.apply({"params": params}, video)` with float32 video
    `[B, T, H, W, 3]` gives `[B, 1 + T*N, D]` = TimesformerModel's `last_hidden_state`
    (`[B*T, 1 + N, D]` for attention_type "space_only"); for a ViT and T = 1, ViTModel's
    `last_hidden_state`. Unused checkpoint tensors (e.g. a ViT pooler) are logged.
  """
  module, params, unused = timesformer_params(path, num_frames, image_size, dtype)
  if unused:
    logging.info("%s: %d checkpoint tensors unused: %s", path, len(unused), ", ".join(unused))
  return module, params


def init_alpro_video(params: Mapping, path: str, model_cfg: ALPROConfig) -> dict:
  """ALPRO params with `video_encoder` replaced by a TimeSformer or (inflated) ViT checkpoint.

  Args:
    params: ALPRO's unboxed params (nested dict of arrays).
    path: local `save_pretrained` directory (TimesformerModel, ViTModel, or their
      classification variants; heads are unused and logged).
    model_cfg: the model's `ALPROConfig`.

  Returns:
    A new nested dict, same structure and shapes; every `video_encoder` leaf is a float32
    numpy array from the checkpoint (position / time embeddings resized when the image size
    / frame count differ; inflated temporal weights for a ViT).

  Raises:
    ConversionError: another architecture, a size that differs from `model.video`, a missing
      tensor or a shape that does not fit (naming the tensor and both shapes).
  """
  config, tensors = hf_io.load_pretrained(path)
  src = hf_io.TensorSource(tensors, path)
  like = params  # scanned layers are filled one layer at a time, then stacked back
  out = stacked.unstack(hf_io.to_mutable(params))
  fill_video_params(src, config, model_cfg.video, out, ("video_encoder",))
  unused = src.unused()
  if unused:
    logging.info("init.video: %d checkpoint tensors unused: %s", len(unused), ", ".join(unused))
  return stacked.stack_like(out, like)


def hf_config(cfg: VideoConfig, num_frames: int | None = None) -> dict:
  """config.json of a `TimesformerModel` with our sizes (`num_frames`: default the model's)."""
  return {
      "architectures": ["TimesformerModel"], "model_type": "timesformer",
      "image_size": cfg.image_size, "patch_size": cfg.patch_size, "num_channels": 3,
      "num_frames": int(num_frames or cfg.num_frames), "hidden_size": cfg.hidden,
      "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
      "intermediate_size": cfg.mlp_dim, "hidden_act": "gelu",
      "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": 0.0,
      "initializer_range": 0.02, "layer_norm_eps": cfg.layer_norm_eps, "qkv_bias": True,
      "attention_type": "divided_space_time" if cfg.temporal == "divided" else "space_only",
      "drop_path_rate": 0,  # transformers 5 validates this field as an int
  }


def export_timesformer(params: Mapping, cfg: VideoConfig, root: tuple[str, ...] = (),
                       num_frames: int | None = None
                       ) -> tuple[dict, dict[str, hf_io.LazyTensor]]:
  """Our TimeSformer params at `params[root]` as a `TimesformerModel` checkpoint.

  Args:
    params: nested dict holding the TimeSformer params at `root`.
    cfg: its `VideoConfig`.
    root: path of the TimeSformer params (e.g. ('video_encoder',) in ALPRO).
    num_frames: frames per clip of the exported model (default `cfg.num_frames`).
      TimesformerModel only runs clips of exactly `config.num_frames` frames, so for clips
      of another length the time embeddings are resized here exactly as our model resizes
      them at run time.

  Returns:
    (config.json dict, {checkpoint name: LazyTensor}) for `hf_io.save_pretrained`.
  """
  divided = cfg.temporal == "divided"
  rules = EMBEDDING_RULES + [POSITION_RULE] + FINAL_RULES
  tensors = layout.export_rules(rules, params, "", root)
  frames = int(num_frames or cfg.num_frames)
  if divided:
    time = hf_io.get_leaf(params, root + TIME_RULE.ours)
    tensors[TIME_RULE.hf] = hf_io.LazyTensor(
        (1, frames, cfg.hidden),
        lambda: np.asarray(tsf_lib.resize_time_embeddings(jnp.asarray(time), frames),
                           np.float32)[None])
  for i in range(cfg.layers):
    tensors.update(layout.export_rules(layer_rules(i, divided), params, "", root + ("encoder",)))
  return hf_config(cfg, frames), tensors
