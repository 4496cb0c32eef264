"""`transformers` `CLIPModel` checkpoints <-> `vlp_jax.models.clip.CLIP` params.

Names map one-to-one (`text_model.encoder.layers.0.self_attn.q_proj.weight` <->
`text_model/encoder/layers_0/self_attn/q_proj/kernel`); layouts change as follows:

  Linear weight `[out, in]`   -> kernel `[in..., out...]` (q/k/v: `[D, heads, head_dim]`,
                                 out_proj: `[heads, head_dim, D]`), biases reshaped alike
  Conv2d weight `[D, 3, p, p]` -> kernel `[p, p, 3, D]` (NHWC)
  LayerNorm weight / Embedding weight -> scale / embedding

The vision position embedding can be resized to another image size on import (bicubic over
the patch grid, the same interpolation as HF `interpolate_pos_encoding`).
"""
from __future__ import annotations

import math
import os
from typing import Any
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from vlp_jax.convert import hf_io
from vlp_jax.convert import layout
from vlp_jax.convert.hf_io import ConversionError
from vlp_jax.models import clip

MODEL_TYPES = ("clip",)


# ----------------------------------------------------------------------------- configs

def _field(section: Mapping, key: str, default: Any, kind: type, where: str) -> Any:
  value = section.get(key, default)
  if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
    raise ConversionError(f"{where}.{key} must be an int, got {value!r}")
  if kind is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConversionError(f"{where}.{key} must be a number, got {value!r}")
    value = float(value)
  if kind is str and not isinstance(value, str):
    raise ConversionError(f"{where}.{key} must be a string, got {value!r}")
  return value


def _token_id(section: Mapping, key: str, default: int, vocab: Any, where: str) -> int | None:
  """An optional special-token id; one outside the vocabulary is dropped (HF only warns)."""
  value = section.get(key, default)
  if value is None:
    return None
  value = _field(section, key, default, int, where)
  if isinstance(vocab, int) and not 0 <= value < vocab:
    logging.warning("%s.%s=%d is outside the vocabulary (%d tokens); ignored", where, key,
                    value, vocab)
    return None
  return value


def _sub_config(config: Mapping, name: str) -> dict:
  # Configs saved by old transformers versions carry `<name>_dict`, which wins (as in HF).
  out = dict(config.get(name) or {})
  out.update(config.get(name + "_dict") or {})
  return out


def config_from_hf(config: Mapping, *, image_size: int | None = None, dtype: str = "float32",
                   attention: str = "xla", remat: str = "none",
                   where: str = "config.json") -> clip.ClipConfig:
  """Our `ClipConfig` from a `CLIPConfig` dict (config.json); absent keys take HF defaults.

  Args:
    config: the parsed config.json of a `CLIPModel`.
    image_size: overrides `vision_config.image_size` (position embeddings get resized).
    dtype, attention, remat: runtime choices of `ClipConfig`.
    where: how messages name the config.

  Raises:
    ConversionError: naming the key that is missing a usable value.
  """
  t, v = _sub_config(config, "text_config"), _sub_config(config, "vision_config")
  tw, vw = f"{where}: text_config", f"{where}: vision_config"
  dt, dv = clip.ClipTextConfig(), clip.ClipVisionConfig()
  if _field(v, "num_channels", 3, int, vw) != 3:
    raise ConversionError(f"{vw}.num_channels is {v['num_channels']}; only RGB (3) is supported")
  for key in ("image_size", "patch_size"):
    if isinstance(v.get(key), (list, tuple)):
      if len(set(v[key])) != 1:
        raise ConversionError(f"{vw}.{key} {v[key]} is not square; only square is supported")
      v[key] = v[key][0]
  if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)):
    raise ConversionError(f"image_size must be an int, got {image_size!r}")
  vocab = _field(t, "vocab_size", dt.vocab_size, int, tw)
  try:
    text = clip.ClipTextConfig(
        vocab_size=vocab,
        hidden=_field(t, "hidden_size", dt.hidden, int, tw),
        layers=_field(t, "num_hidden_layers", dt.layers, int, tw),
        heads=_field(t, "num_attention_heads", dt.heads, int, tw),
        mlp_dim=_field(t, "intermediate_size", dt.mlp_dim, int, tw),
        max_position=_field(t, "max_position_embeddings", dt.max_position, int, tw),
        hidden_act=_field(t, "hidden_act", dt.hidden_act, str, tw),
        layer_norm_eps=_field(t, "layer_norm_eps", dt.layer_norm_eps, float, tw),
        eos_token_id=_field(t, "eos_token_id", dt.eos_token_id, int, tw),
        bos_token_id=_token_id(t, "bos_token_id", dt.bos_token_id, vocab, tw),
        pad_token_id=_token_id(t, "pad_token_id", dt.pad_token_id, vocab, tw))
    vision = clip.ClipVisionConfig(
        image_size=(_field(v, "image_size", dv.image_size, int, vw) if image_size is None
                    else image_size),
        patch_size=_field(v, "patch_size", dv.patch_size, int, vw),
        hidden=_field(v, "hidden_size", dv.hidden, int, vw),
        layers=_field(v, "num_hidden_layers", dv.layers, int, vw),
        heads=_field(v, "num_attention_heads", dv.heads, int, vw),
        mlp_dim=_field(v, "intermediate_size", dv.mlp_dim, int, vw),
        hidden_act=_field(v, "hidden_act", dv.hidden_act, str, vw),
        layer_norm_eps=_field(v, "layer_norm_eps", dv.layer_norm_eps, float, vw))
    return clip.ClipConfig(
        text=text, vision=vision,
        projection_dim=_field(config, "projection_dim", 512, int, where),
        logit_scale_init=_field(config, "logit_scale_init_value", 2.6592, float, where),
        dtype=dtype, attention=attention, remat=remat)
  except ConversionError:
    raise
  except ValueError as e:
    raise ConversionError(f"{where}: {e}") from e


def config_to_hf(cfg: clip.ClipConfig) -> dict:
  """The config.json dict of a `transformers` `CLIPModel` with `cfg`'s sizes."""
  t, v = cfg.text, cfg.vision
  return {
      "architectures": ["CLIPModel"],
      "model_type": "clip",
      "projection_dim": cfg.projection_dim,
      "logit_scale_init_value": cfg.logit_scale_init,
      "text_config": {
          "model_type": "clip_text_model", "vocab_size": t.vocab_size, "hidden_size": t.hidden,
          "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
          "intermediate_size": t.mlp_dim, "max_position_embeddings": t.max_position,
          "hidden_act": t.hidden_act, "layer_norm_eps": t.layer_norm_eps,
          "eos_token_id": t.eos_token_id, "bos_token_id": t.bos_token_id,
          "pad_token_id": t.pad_token_id, "projection_dim": cfg.projection_dim},
      "vision_config": {
          "model_type": "clip_vision_model", "image_size": v.image_size,
          "patch_size": v.patch_size, "num_channels": 3, "hidden_size": v.hidden,
          "num_hidden_layers": v.layers, "num_attention_heads": v.heads,
          "intermediate_size": v.mlp_dim, "hidden_act": v.hidden_act,
          "layer_norm_eps": v.layer_norm_eps, "projection_dim": cfg.projection_dim},
  }


# ----------------------------------------------------------------------------- layouts

# Resized on import when the image size changes, so it is not in `rules`.
VISION_POSITION = layout.Rule("vision_model.embeddings.position_embedding.weight",
                              ("vision_model", "embeddings", "position_embedding", "embedding"))


def _layer_rules(tower: str, i: int) -> list[layout.Rule]:
  """`{tower}.encoder.layers.{i}.*` <-> `{tower}/encoder/layers_{i}/*`."""
  hf, ours = f"{tower}.encoder.layers.{i}", (tower, "encoder", f"layers_{i}")
  out = layout.layer_norm(f"{hf}.layer_norm1", ours + ("layer_norm1",))
  for n in ("q_proj", "k_proj", "v_proj"):
    out += layout.linear(f"{hf}.self_attn.{n}", ours + ("self_attn", n))
  out += layout.linear(f"{hf}.self_attn.out_proj", ours + ("self_attn", "out_proj"), n_in=2)
  out += layout.layer_norm(f"{hf}.layer_norm2", ours + ("layer_norm2",))
  out += layout.linear(f"{hf}.mlp.fc1", ours + ("mlp", "fc1"))
  out += layout.linear(f"{hf}.mlp.fc2", ours + ("mlp", "fc2"))
  return out


def rules(cfg: clip.ClipConfig) -> list[layout.Rule]:
  """Every `CLIPModel` tensor but the vision position embedding, with its place in ours."""
  text = [layout.Rule(f"text_model.embeddings.{n}.weight", ("text_model", "embeddings", n,
                                                            "embedding"))
          for n in ("token_embedding", "position_embedding")]
  for i in range(cfg.text.layers):
    text += _layer_rules("text_model", i)
  text += layout.layer_norm("text_model.final_layer_norm", ("text_model", "final_layer_norm"))
  vision = [
      layout.Rule("vision_model.embeddings.class_embedding",
                  ("vision_model", "embeddings", "class_embedding")),
      layout.Rule("vision_model.embeddings.patch_embedding.weight",
                  ("vision_model", "embeddings", "patch_embedding", "kernel"), "conv")]
  vision += layout.layer_norm("vision_model.pre_layrnorm", ("vision_model", "pre_layrnorm"))
  for i in range(cfg.vision.layers):
    vision += _layer_rules("vision_model", i)
  vision += layout.layer_norm("vision_model.post_layernorm", ("vision_model", "post_layernorm"))
  heads = (layout.linear("visual_projection", ("visual_projection",), bias=False)
           + layout.linear("text_projection", ("text_projection",), bias=False)
           + [layout.Rule("logit_scale", ("logit_scale",))])
  return text + vision + heads


# ----------------------------------------------------------------------------- resizing

def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """`[n_out, n_in]` weights of torch's 1-D bicubic resize (a = -0.75, align_corners=False).

  Source coordinate `(i + 0.5) * n_in / n_out - 0.5`, four taps, indices clamped at the
  borders, no antialiasing: `torch.nn.functional.interpolate(mode="bicubic")`.
  """
  a = -0.75
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # |x| <= 1
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2
  m = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    src = (i + 0.5) * n_in / n_out - 0.5
    base = math.floor(src)
    t = src - base
    for k, wgt in zip(range(-1, 3), (far(t + 1), near(t), near(1 - t), far(2 - t))):
      m[i, min(max(base + k, 0), n_in - 1)] += wgt
  return m


def resize_position_embedding(pos: np.ndarray, grid: int) -> np.ndarray:
  """Resizes a ViT position embedding to a `grid x grid` patch grid.

  Args:
    pos: float `[1 + g*g, D]`: the CLS position, then the g x g grid row-major.
    grid: the new patches per side.

  Returns:
    float32 `[1 + grid*grid, D]`; the CLS row is kept, the grid is resized bicubically
    (HF `CLIPVisionEmbeddings.interpolate_pos_encoding`). `pos` itself if the size matches.

  Raises:
    ConversionError: `pos` does not hold a square grid.
  """
  n = pos.shape[0] - 1
  old = math.isqrt(n)
  if old * old != n:
    raise ConversionError(f"vision position embedding {tuple(pos.shape)} does not hold a "
                          f"square patch grid plus a CLS position")
  if old == grid:
    return pos
  m = _bicubic_matrix(old, grid)
  g = pos[1:].reshape(old, old, -1).astype(np.float64)
  g = np.einsum("ih,hwd,jw->ijd", m, g, m).reshape(grid * grid, -1)
  return np.concatenate([pos[:1], g.astype(pos.dtype)], axis=0).astype(np.float32)


# ----------------------------------------------------------------------------- import

def abstract_params(module: clip.CLIP) -> dict:
  """Nested dict of `jax.ShapeDtypeStruct` for `module`'s params (nothing is computed)."""
  size = module.config.vision.image_size
  boxed = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                         jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
                         jax.ShapeDtypeStruct((1, 1), jnp.int32))
  return nn.unbox(boxed)["params"]


def params_from_tensors(module: clip.CLIP, tensors: Mapping[str, np.ndarray],
                        source: str = "checkpoint") -> dict:
  """Our params from a `CLIPModel` state dict (name -> array).

  Args:
    module: the target `CLIP`; a vision image size other than the checkpoint's resizes the
      position embedding.
    tensors: checkpoint name -> array (HF layout).
    source: how messages name the checkpoint.

  Returns:
    Nested dict of float32 numpy arrays.

  Raises:
    ConversionError: a tensor is missing or its shape does not fit (names both shapes).
  """
  src = hf_io.TensorSource(tensors, source)
  params = hf_io.to_mutable(abstract_params(module))
  layout.import_rules(rules(module.config), src, "", params)
  # Any square grid of the right width is accepted here; it is interpolated to ours.
  width = module.config.vision.hidden
  pos = src.take(VISION_POSITION.hf)
  if pos.ndim != 2 or pos.shape[1] != width:
    raise ConversionError(f"{source}: tensor {VISION_POSITION.hf!r} has shape "
                          f"{tuple(pos.shape)}, expected (1 + g*g, {width})")
  hf_io.assign(params, VISION_POSITION.ours,
               resize_position_embedding(pos, module.config.vision.grid))
  left = hf_io.unfilled(params)
  if left:
    raise ConversionError(f"{source}: params not filled: {left}")
  unused = src.unused()
  if unused:
    logging.info("%s: %d tensors unused by CLIP: %s", source, len(unused), ", ".join(unused))
  return params


def config_from_dir(path: str, *, image_size: int | None = None, dtype: str = "float32",
                    attention: str = "xla", remat: str = "none") -> clip.ClipConfig:
  """The `ClipConfig` of a `CLIPModel` directory, from its config.json alone (no weights read).

  Raises:
    ConversionError: no such directory or config.json, not a CLIP config.
  """
  path = os.fspath(path)
  file = os.path.join(path, hf_io.CONFIG_NAME)
  if not os.path.isfile(file):
    raise ConversionError(f"CLIP checkpoint directory {path!r} has no {hf_io.CONFIG_NAME}")
  config = hf_io._read_json(file)
  hf_io.check_architecture(config, MODEL_TYPES, path)
  return config_from_hf(config, image_size=image_size, dtype=dtype, attention=attention,
                        remat=remat, where=file)


def import_clip(path: str, *, image_size: int | None = None, dtype: str = "float32",
                attention: str = "xla", remat: str = "none") -> tuple[clip.CLIP, dict]:
  """Loads a `transformers` `CLIPModel` directory (from `save_pretrained`).

  Args:
    path: directory with config.json and model.safetensors (or pytorch_model.bin, sharded
      variants).
    image_size: run the image tower at this square size instead of the checkpoint's; the
      position embeddings are interpolated bicubically (as HF `interpolate_pos_encoding`).
    dtype: compute dtype ("float32" | "bfloat16"); params stay float32.
    attention: "xla" | "cudnn".
    remat: remat policy name.

  Returns:
    (module, params): a `CLIP` module and its params as a nested dict of float32 numpy
    arrays, for `module.apply({"params": params}, ..., method="encode_image")` etc.

  Raises:
    ConversionError: not a CLIP checkpoint (names its model_type), a missing tensor or one
      whose shape does not fit (names the tensor and both shapes), unreadable files.
  """
  config, tensors = hf_io.load_pretrained(path)
  hf_io.check_architecture(config, MODEL_TYPES, path)
  cfg = config_from_hf(config, image_size=image_size, dtype=dtype, attention=attention,
                       remat=remat, where=os.path.join(os.fspath(path), hf_io.CONFIG_NAME))
  module = clip.CLIP(cfg)
  return module, params_from_tensors(module, tensors, source=os.fspath(path))


# ----------------------------------------------------------------------------- export

def tensors_from_params(cfg: clip.ClipConfig, params: Any) -> dict[str, hf_io.LazyTensor]:
  """Our params (boxed or not, jax or numpy) -> `CLIPModel` state dict, converted lazily.

  Raises:
    ConversionError: a param is missing, extra, or of another shape than `cfg` implies.
  """
  params = nn.unbox(params)
  want = traverse_util.flatten_dict(abstract_params(clip.CLIP(cfg)))
  have = traverse_util.flatten_dict(dict(params))
  missing = sorted("/".join(k) for k in want if k not in have)
  extra = sorted("/".join(k) for k in have if k not in want)
  if missing or extra:
    raise ConversionError(f"params do not fit the CLIP config: missing {missing}, "
                          f"unexpected {extra}")
  for path, leaf in want.items():
    if np.shape(have[path]) != tuple(leaf.shape):
      raise ConversionError(f"param {'/'.join(path)!r} has shape {np.shape(have[path])}, the "
                            f"CLIP config needs {tuple(leaf.shape)}")
  return layout.export_rules(rules(cfg) + [VISION_POSITION], params, "")


def export_clip(module_config: clip.ClipConfig, params: Any, out_dir: str) -> None:
  """Writes a `transformers` `CLIPModel` directory: config.json + model.safetensors.

  `CLIPModel.from_pretrained(out_dir)` then gives the same `get_image_features` /
  `get_text_features` as our `encode_image` / `encode_text`.

  Args:
    module_config: the `ClipConfig` of the params (e.g. `module.config`).
    params: the params tree (nested dict; boxed or plain; jax or numpy leaves).
    out_dir: the directory to write (created if needed).

  Raises:
    ConversionError: params missing, extra or of another shape than the config implies.
  """
  hf_io.save_pretrained(out_dir, config_to_hf(module_config),
                        tensors_from_params(module_config, params))
