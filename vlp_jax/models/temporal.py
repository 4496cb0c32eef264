"""Temporal model of Prompt-CLIP (Ju et al., ECCV 2022) over per-frame CLIP image features.

A few CLIP-style pre-LN blocks (QuickGELU MLP, the blocks of `models/clip.py`) over the T
frame features of a clip, with a learned temporal position embedding and no CLS token; the
clip feature is the mean over time. `layers=0` is plain mean pooling and has no parameters.

Parameters (HF-style, as in `models/clip.py`):

  position_embedding/embedding                                   [max_frames, D]
  encoder/layers_{i}/{layer_norm1, self_attn/{q,k,v,out}_proj, layer_norm2, mlp/{fc1, fc2}}
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.models import clip, layers


@dataclasses.dataclass(frozen=True)
class _BlockConfig:
  """The fields `clip.ClipEncoder` / `clip.ClipEncoderLayer` read from a tower config."""
  hidden: int
  layers: int
  heads: int
  mlp_dim: int
  hidden_act: str
  layer_norm_eps: float


def _positive_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v > 0


class TemporalTransformer(nn.Module):
  """Pre-LN transformer over frames, then the (masked) mean over time.

  Attributes:
    width: D, the width of the frame features (ViT-B/16 CLIP: 512).
    layers: number of blocks; 0 = mean pooling only (no position embedding, no params).
    heads: attention heads (divide `width`).
    mlp_dim: MLP hidden width; None = 4 * width.
    max_frames: rows of the position embedding; clips may have at most this many frames.
    dtype: compute dtype of the blocks (a jnp dtype or "float32" | "bfloat16"); params are
      float32, the pooled output float32.
    attention: "xla" | "cudnn".
    remat: a `layers.REMAT_POLICIES` name.
    hidden_act: MLP activation (`clip.ACTIVATIONS`); CLIP's QuickGELU by default.
    layer_norm_eps: LayerNorm epsilon.
    pos_init_std: N(0, std) init of the position embedding (Ju et al.: 0.01).
  """
  width: int
  layers: int
  heads: int = 8
  mlp_dim: int | None = None
  max_frames: int = 16
  dtype: Any = jnp.float32
  attention: str = "xla"
  remat: str = "none"
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  pos_init_std: float = 0.01

  def _block_config(self) -> _BlockConfig:
    """Validated sizes for `clip.ClipEncoder` (ValueError naming the bad field)."""
    p = "temporal"
    for n in ("width", "heads", "max_frames"):
      if not _positive_int(getattr(self, n)):
        raise ValueError(f"{p}.{n} must be a positive int, got {getattr(self, n)!r}")
    if not (isinstance(self.layers, int) and not isinstance(self.layers, bool)
            and self.layers >= 0):
      raise ValueError(f"{p}.layers must be an int >= 0, got {self.layers!r}")
    if self.mlp_dim is not None and not _positive_int(self.mlp_dim):
      raise ValueError(f"{p}.mlp_dim must be a positive int or None, got {self.mlp_dim!r}")
    if self.width % self.heads:
      raise ValueError(f"{p}.heads ({self.heads}) must divide {p}.width ({self.width})")
    if self.hidden_act not in clip.ACTIVATIONS:
      raise ValueError(f"{p}.hidden_act must be one of {sorted(clip.ACTIVATIONS)}, "
                       f"got {self.hidden_act!r}")
    return _BlockConfig(hidden=self.width, layers=self.layers, heads=self.heads,
                        mlp_dim=self.mlp_dim or 4 * self.width, hidden_act=self.hidden_act,
                        layer_norm_eps=self.layer_norm_eps)

  @nn.compact
  def __call__(self, features: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Clip features from frame features.

    Args:
      features: float `[B, T, D]`, T <= `max_frames`, D = `width`.
      mask: optional bool/int `[B, T]`, nonzero = real frame. Padded frames (any finite
        values) are neither attended to nor averaged; a clip without real frames gives zeros.

    Returns:
      float32 `[B, D]`.

    Raises:
      ValueError: a bad field, features not `[B, T, width]`, T > `max_frames`, a mask not
        `[B, T]`.
    """
    cfg = self._block_config()
    if features.ndim != 3 or features.shape[-1] != self.width:
      raise ValueError(f"features must be [B, T, {self.width}], got {tuple(features.shape)}")
    b, t, _ = features.shape
    if t > self.max_frames:
      raise ValueError(f"{t} frames exceed temporal.max_frames ({self.max_frames}); raise "
                       f"max_frames or sample fewer frames")
    if mask is not None and tuple(mask.shape) != (b, t):
      raise ValueError(f"mask must be [{b}, {t}], got {tuple(mask.shape)}")
    dtype = layers.compute_dtype(self.dtype) if isinstance(self.dtype, str) else self.dtype
    x = layers.constrain(features, ("batch", "frames", "embed"))
    if self.layers:
      pos = layers.embed(self.max_frames, self.width, (None, "embed"), dtype=dtype,
                         init=nn.initializers.normal(self.pos_init_std),
                         name="position_embedding")
      # First T rows: a shorter clip uses the positions of its first T frames.
      x = x.astype(dtype) + pos(jnp.arange(t))[None]
      attn_mask = None if mask is None else layers.attention_mask(mask, t, self.attention)
      x = clip.ClipEncoder(cfg, dtype, self.attention, self.remat, name="encoder")(x, attn_mask)
    # Mean in float32: the pooled feature is compared by cosine similarity downstream.
    x = x.astype(jnp.float32)
    if mask is None:
      return x.mean(axis=1)
    valid = mask.astype(bool)[..., None]
    # `where`, not a product: with layers=0 a padded frame may even hold NaN.
    total = jnp.where(valid, x, 0.0).sum(axis=1)
    return total / jnp.maximum(valid.sum(axis=1), 1).astype(jnp.float32)


def count_params(params: Any) -> int:
  """Number of scalars in a pytree of arrays or `jax.ShapeDtypeStruct`s (e.g. from
  `jax.eval_shape(model.init, ...)`); boxed `nn.Partitioned` leaves are unboxed."""
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.unbox(params)))
