"""TimeSformer video encoder, ALPRO's variant (divided space-time attention).

Module and parameter names follow Hugging Face `TimesformerModel` so that a checkpoint maps
one-to-one:

  embeddings/patch_embeddings/projection/{kernel,bias}   (Conv, kernel = stride = patch)
  embeddings/{cls_token [1, D], position_embeddings [1+N, D], time_embeddings [F, D]}
  encoder/layer_{i}/temporal_layernorm, temporal_attention/{attention/qkv, output/dense},
      temporal_dense, layernorm_before, attention/{attention/qkv, output/dense},
      layernorm_after, intermediate/dense, output/dense
  layernorm

HF keeps `[1, ...]` leading dims on cls/position/time embeddings and a fused `qkv` Linear of
shape `[3D, D]`; ours are `[1, D]`, `[1+N, D]`, `[F, D]` and `qkv` `[D, 3, heads, head_dim]`.

Tokens are carried as a CLS `[B, D]` plus patches `[B, T, N, D]` (frame-major).
"""
from __future__ import annotations

import functools

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.models import layers



def kernel_init(cfg: Any) -> nn.initializers.Initializer:
  """Truncated normal with `model.video.init_std` (0.02 = timm's) for every TimeSformer
  kernel; configs built before the key existed get 0.02."""
  return nn.initializers.truncated_normal(float(getattr(cfg, "init_std", 0.02)))


def temporal_dense_init(cfg: Any) -> nn.initializers.Initializer:
  """`temporal_dense`'s kernel: zeros (TimeSformer: a fresh block starts as the image model's
  spatial block), or truncated normal with `model.video.temporal_dense_init_std` > 0. From
  scratch a zero kernel also zeroes the gradient of the temporal attention below it, which
  then starts learning only after the kernel has grown."""
  std = float(getattr(cfg, "temporal_dense_init_std", 0.0))
  return nn.initializers.truncated_normal(std) if std > 0 else nn.initializers.zeros


def resize_time_embeddings(time_emb: jax.Array, num_frames: int) -> jax.Array:
  """Linearly interpolates a `[F, D]` time embedding to `[num_frames, D]`.

  Identity (the same array) when `num_frames == F`. Half-pixel centres without antialiasing,
  i.e. `F.interpolate(mode="linear", align_corners=False)`.
  """
  if time_emb.shape[0] == num_frames:
    return time_emb
  return jax.image.resize(time_emb, (num_frames, time_emb.shape[1]), "linear", antialias=False)


class TimesformerEmbeddings(nn.Module):
  """Patch + CLS + spatial position (+ time) embeddings.

  Attributes:
    config: a `VideoConfig`.
    dtype: compute dtype.
  """
  config: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, video: jax.Array, deterministic: bool = True):
    """video: float `[B, T, H, W, 3]` -> (cls `[B, D]`, patches `[B, T, N, D]`) in `dtype`."""
    cfg = self.config
    b, t, h, w, c = video.shape
    p = cfg.patch_size
    if h % p or w % p:
      raise ValueError(f"frame size {h}x{w} is not divisible by patch size {p}")
    num_patches = (cfg.image_size // p) ** 2
    if (h // p) * (w // p) != num_patches:
      raise ValueError(f"frame size {h}x{w} gives {(h // p) * (w // p)} patches, but the "
                       f"position embeddings were built for image_size {cfg.image_size}")
    d = cfg.hidden
    patches = _PatchEmbeddings(d, p, self.dtype, kernel_init(cfg), name="patch_embeddings")(
        video.reshape(b * t, h, w, c))
    patches = patches.reshape(b, t, num_patches, d)

    # model.video.embed_init_std / time_init_std (0.02 = timm's).
    emb_init = nn.initializers.truncated_normal(float(getattr(cfg, "embed_init_std", 0.02)))
    cls_token = self.param("cls_token",
                           nn.with_logical_partitioning(emb_init, (None, "embed")),
                           (1, d), jnp.float32)
    pos = self.param("position_embeddings",
                     nn.with_logical_partitioning(emb_init, (None, "embed")),
                     (1 + num_patches, d), jnp.float32)
    cls = jnp.broadcast_to(cls_token + pos[:1], (b, d)).astype(self.dtype)
    patches = patches + pos[1:].astype(self.dtype)
    if cfg.temporal == "divided":
      # HF / official init these to zero; a small random init breaks the frame-permutation
      # symmetry from the first step when training from scratch (imports overwrite it).
      time_init = nn.initializers.truncated_normal(float(getattr(cfg, "time_init_std", 0.02)))
      time_emb = self.param("time_embeddings",
                            nn.with_logical_partitioning(time_init, (None, "embed")),
                            (cfg.num_frames, d), jnp.float32)
      patches = patches + resize_time_embeddings(time_emb, t)[:, None, :].astype(self.dtype)
    if cfg.dropout:
      drop = nn.Dropout(cfg.dropout)
      cls, patches = drop(cls, deterministic), drop(patches, deterministic)
    return cls, layers.constrain(patches, ("batch", "frames", "length", "embed"))


class _PatchEmbeddings(nn.Module):
  """HF `patch_embeddings`: a conv `projection` with kernel = stride = patch."""
  hidden: int
  patch_size: int
  dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.truncated_normal(0.02)

  @nn.compact
  def __call__(self, frames: jax.Array) -> jax.Array:
    """frames `[B', H, W, 3]` -> `[B', H/p * W/p, D]` in `dtype`."""
    p = self.patch_size
    out = nn.Conv(
        self.hidden, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(self.kernel_init, (None, None, None, "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name="projection")(frames.astype(self.dtype))
    return out.reshape(out.shape[0], -1, out.shape[-1])


class TimesformerAttention(nn.Module):
  """HF `TimeSformerAttention`: `attention` (fused qkv + SDPA) then `output/dense`."""
  num_heads: int
  dtype: Any = jnp.float32
  attention: str = "xla"
  dropout: float = 0.0
  kernel_init: Any = nn.initializers.truncated_normal(0.02)

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    """x `[B', L, D]` -> `[B', L, D]` (no mask: every token is real)."""
    heads = layers.MultiHeadAttention(self.num_heads, self.dtype, self.attention, fused_qkv=True,
                                      kernel_init=self.kernel_init, name="attention")(x)
    return layers.OutputDense(x.shape[-1], ("heads", "kv", "embed"), (-2, -1), self.dtype,
                              self.dropout, self.kernel_init, name="output")(heads,
                                                                             deterministic)


class TimesformerLayer(nn.Module):
  """One divided space-time block (ALPRO / official TimeSformer order).

  (a) temporal: for each spatial position, pre-norm attention over the T patch tokens, then
      `temporal_dense` (zero-initialised by default, so a fresh block starts as a spatial ViT
      block) and a residual add; the CLS token is left out.
  (b) spatial: per frame, attention over [CLS, N patches] with the CLS repeated per frame;
      the per-frame CLS outputs are averaged over time back into one CLS; residual.
  (c) MLP with pre-norm; residual.

  With `temporal == "none"` only (b) and (c) run (callers pass T = 1 per clip).
  """
  config: Any
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, cls: jax.Array, patches: jax.Array, deterministic: bool = True):
    """cls `[B, D]`, patches `[B, T, N, D]` -> same shapes, in `dtype`."""
    cfg = self.config
    b, t, n, d = patches.shape
    init = kernel_init(cfg)
    attn = lambda name: TimesformerAttention(cfg.heads, self.dtype, self.attention, cfg.dropout,
                                             init, name=name)
    ln = lambda name: layers.layer_norm(cfg.layer_norm_eps, self.dtype, name=name)

    if cfg.temporal == "divided":
      xt = patches.transpose(0, 2, 1, 3).reshape(b * n, t, d)
      xt = layers.constrain(xt, ("batch", "frames", "embed"))
      res = attn("temporal_attention")(ln("temporal_layernorm")(xt), deterministic)
      res = layers.dense(d, ("embed", None), dtype=self.dtype,
                         kernel_init=temporal_dense_init(cfg), name="temporal_dense")(res)
      xt = xt + res
      patches = xt.reshape(b, n, t, d).transpose(0, 2, 1, 3)
      patches = layers.constrain(patches, ("batch", "frames", "length", "embed"))

    xs = jnp.concatenate([jnp.broadcast_to(cls[:, None, None, :], (b, t, 1, d)), patches], 2)
    xs = layers.constrain(xs.reshape(b * t, 1 + n, d), ("batch", "length", "embed"))
    res = attn("attention")(ln("layernorm_before")(xs), deterministic).reshape(b, t, 1 + n, d)
    cls = cls + jnp.mean(res[:, :, 0].astype(jnp.float32), axis=1).astype(cls.dtype)
    patches = patches + res[:, :, 1:]

    x = jnp.concatenate([cls[:, None, :], patches.reshape(b, t * n, d)], axis=1)
    x = layers.constrain(x, ("batch", "length", "embed"))
    h = ln("layernorm_after")(x)
    h = layers.Intermediate(cfg.mlp_dim, self.dtype, cfg.dropout, init,
                            name="intermediate")(h, deterministic)
    h = layers.OutputDense(d, ("mlp", "embed"), -1, self.dtype, cfg.dropout, init,
                           name="output")(h, deterministic)
    x = x + h
    cls, patches = x[:, 0], x[:, 1:].reshape(b, t, n, d)
    return cls, layers.constrain(patches, ("batch", "frames", "length", "embed"))


class TimesformerEncoder(nn.Module):
  """The stack `layer_0 .. layer_{L-1}`, each optionally rematerialised, or one scanned block
  over them (`scan`, see `layers.layer_stack`)."""
  config: Any
  dtype: Any = jnp.float32
  attention: str = "xla"
  remat: str = "none"
  scan: bool = False

  @nn.compact
  def __call__(self, cls: jax.Array, patches: jax.Array, deterministic: bool = True):
    """cls `[B, D]`, patches `[B, T, N, D]` -> same shapes."""
    # static_argnums=(3,): (self, cls, patches, deterministic).
    block = layers.remat_block(TimesformerLayer, self.remat, static_argnums=(3,))
    make = functools.partial(block, self.config, self.dtype, self.attention)
    return layers.layer_stack(make, 0, self.config.layers, self.scan, deterministic,
                              (cls, patches), tuple_carry=True)


class TimesformerModel(nn.Module):
  """TimeSformer video encoder.

  Attributes:
    config: a `VideoConfig` (image_size, patch_size, num_frames, hidden, layers, heads,
      mlp_dim, temporal in {"divided", "none"}, dropout).
    dtype: compute dtype (params are float32).
    attention: "xla" | "cudnn".
    remat: "none" | "full" | "dots" | "dots_no_batch".
    scan: one `nn.scan`ned layer with stacked params instead of `layer_{i}` (`model.scan_layers`).
    pool: True: ALPRO's output (CLS + temporal patch mean). False: every token, as HF
      `TimesformerModel.last_hidden_state` (used to check imported checkpoints).
  """
  config: Any
  dtype: Any = jnp.float32
  attention: str = "xla"
  remat: str = "none"
  pool: bool = True
  scan: bool = False

  @nn.compact
  def __call__(self, video: jax.Array, deterministic: bool = True) -> jax.Array:
    """Encodes a clip.

    Args:
      video: float `[B, T, H, W, 3]`, already normalised. T may differ from
        `config.num_frames` (the time embedding is interpolated).
      deterministic: disables dropout when True.

    Returns:
      pool=True: `[B, 1 + N, D]` in `dtype`, the CLS token followed by the temporal mean of
      the N patch tokens (both after the final LayerNorm).
      pool=False: HF's token layout: `[B, 1 + N*T, D]` with patch-major order (token
      `1 + n*T + t`) for "divided"; `[B*T, 1 + N, D]` (each frame alone) for "none".
    """
    cfg = self.config
    b, t = video.shape[:2]
    if cfg.temporal == "none":
      # Frames are independent clips of one frame; pooled over time at the end.
      video = video.reshape(b * t, 1, *video.shape[2:])
    cls, patches = TimesformerEmbeddings(cfg, self.dtype, name="embeddings")(video, deterministic)
    cls, patches = TimesformerEncoder(cfg, self.dtype, self.attention, self.remat, self.scan,
                                      name="encoder")(cls, patches, deterministic)
    ln = layers.layer_norm(cfg.layer_norm_eps, self.dtype, name="layernorm")
    cls, patches = ln(cls), ln(patches)
    if not self.pool:
      patches = patches.transpose(0, 2, 1, 3).reshape(patches.shape[0], -1, patches.shape[-1])
      return jnp.concatenate([cls[:, None, :], patches], axis=1)
    if cfg.temporal == "none":
      cls = cls.reshape(b, t, -1)
      patches = patches.reshape(b, t, *patches.shape[2:])
    else:
      cls = cls[:, None]
    # Means in float32 so a bf16 clip of many frames does not lose precision.
    cls = jnp.mean(cls.astype(jnp.float32), axis=1).astype(self.dtype)
    patches = jnp.mean(patches.astype(jnp.float32), axis=1).astype(self.dtype)
    out = jnp.concatenate([cls[:, None, :], patches], axis=1)
    return layers.constrain(out, ("batch", "length", "embed"))
