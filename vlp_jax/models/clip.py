"""CLIP (Radford et al., 2021): a ViT image tower and a causal text tower with projections.

Module and parameter names follow Hugging Face `CLIPModel`, so a checkpoint maps one-to-one
(`vlp_jax/convert/clip.py`):

  text_model/embeddings/{token_embedding, position_embedding}/embedding   [V, D], [P, D]
  text_model/encoder/layers_{i}/{layer_norm1, self_attn, layer_norm2, mlp/{fc1, fc2}}
  text_model/final_layer_norm
  vision_model/embeddings/{class_embedding [D], patch_embedding/kernel [p, p, 3, D],
      position_embedding/embedding [1 + N, D]}
  vision_model/{pre_layrnorm, encoder/layers_{i}/..., post_layernorm}
  visual_projection/kernel, text_projection/kernel (no bias); logit_scale []

`self_attn/{q,k,v}_proj` kernels are `[D, heads, head_dim]`, `out_proj` is
`[heads, head_dim, D]` (HF Linear weights `[out, in]` are transposed/reshaped on import).

Every tower is pre-LayerNorm. The text tower is causal and pools the final-LayerNorm state
at the end-of-text (EOT) position; the image tower pools its CLS token. Use the methods
through `apply(..., method=...)`: `encode_image`, `encode_frames`, `encode_text`,
`embed_tokens` + `encode_text_embeds` (prompt learning), `similarity`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.models import layers

_INIT = nn.initializers.normal(0.02)

# HF `hidden_act` names -> functions (HF `ACT2FN`): "gelu" is the exact erf form,
# "gelu_new" / "gelu_pytorch_tanh" the tanh approximation, "quick_gelu" x * sigmoid(1.702 x).
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": layers.gelu,
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
}

# HF checkpoints from before transformers PR #24773 carry eos_token_id == 2; for them
# CLIPTextModel pools at argmax(input_ids) (the EOT id is the largest in CLIP's vocabulary).
LEGACY_EOS_TOKEN_ID = 2


def _check(cond: bool, msg: str) -> None:
  if not cond:
    raise ValueError(msg)


def _check_tower(prefix: str, cfg: Any, ints: tuple[str, ...]) -> None:
  for n in ints:
    v = getattr(cfg, n)
    _check(isinstance(v, int) and not isinstance(v, bool) and v > 0,
           f"{prefix}.{n} must be a positive int, got {v!r}")
  _check(cfg.hidden % cfg.heads == 0,
         f"{prefix}.heads ({cfg.heads}) must divide {prefix}.hidden ({cfg.hidden})")
  _check(cfg.hidden_act in ACTIVATIONS,
         f"{prefix}.hidden_act must be one of {sorted(ACTIVATIONS)}, got {cfg.hidden_act!r}")
  _check(isinstance(cfg.layer_norm_eps, float) and cfg.layer_norm_eps > 0,
         f"{prefix}.layer_norm_eps must be a positive float, got {cfg.layer_norm_eps!r}")


@dataclasses.dataclass(frozen=True)
class ClipTextConfig:
  """Text tower sizes (HF `CLIPTextConfig` names in brackets).

  vocab_size, hidden [hidden_size], layers [num_hidden_layers], heads [num_attention_heads],
  mlp_dim [intermediate_size], max_position [max_position_embeddings], hidden_act,
  layer_norm_eps, eos_token_id: the EOT id that `encode_text` pools at (first occurrence);
  `LEGACY_EOS_TOKEN_ID` (2) means "pool at argmax(input_ids)" as HF does for old configs.
  bos_token_id / pad_token_id: the start-of-text and padding ids (None = unknown); the
  model does not use them, prompt builders and exports do.
  """
  vocab_size: int = 49408
  hidden: int = 512
  layers: int = 12
  heads: int = 8
  mlp_dim: int = 2048
  max_position: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  bos_token_id: int | None = 49406
  pad_token_id: int | None = 1

  def __post_init__(self):
    p = "clip.text"
    _check_tower(p, self, ("vocab_size", "hidden", "layers", "heads", "mlp_dim",
                           "max_position"))
    for n in ("eos_token_id", "bos_token_id", "pad_token_id"):
      v = getattr(self, n)
      _check((v is None and n != "eos_token_id")
             or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < self.vocab_size),
             f"{p}.{n} must be an int in [0, vocab_size={self.vocab_size}), got {v!r}")

  @property
  def pools_at_argmax(self) -> bool:
    return self.eos_token_id == LEGACY_EOS_TOKEN_ID


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig:
  """Image tower (ViT) sizes; square images of `image_size`, `patch_size` patches."""
  image_size: int = 224
  patch_size: int = 32
  hidden: int = 768
  layers: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  def __post_init__(self):
    p = "clip.vision"
    _check_tower(p, self, ("image_size", "patch_size", "hidden", "layers", "heads", "mlp_dim"))
    _check(self.image_size % self.patch_size == 0,
           f"{p}.image_size ({self.image_size}) must be divisible by {p}.patch_size "
           f"({self.patch_size})")

  @property
  def grid(self) -> int:
    """Patches per side."""
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid ** 2


@dataclasses.dataclass(frozen=True)
class ClipConfig:
  """The two towers, the shared projection width and runtime choices.

  `dtype` is the compute dtype of the towers (params are float32; projections, pooled
  features and `similarity` are float32); `attention` "xla" | "cudnn"; `remat` a
  `layers.REMAT_POLICIES` name.
  """
  text: ClipTextConfig = dataclasses.field(default_factory=ClipTextConfig)
  vision: ClipVisionConfig = dataclasses.field(default_factory=ClipVisionConfig)
  projection_dim: int = 512
  logit_scale_init: float = math.log(1 / 0.07)
  dtype: str = "float32"
  attention: str = "xla"
  remat: str = "none"

  def __post_init__(self):
    _check(isinstance(self.text, ClipTextConfig),
           f"clip.text must be a ClipTextConfig, got {type(self.text).__name__}")
    _check(isinstance(self.vision, ClipVisionConfig),
           f"clip.vision must be a ClipVisionConfig, got {type(self.vision).__name__}")
    _check(isinstance(self.projection_dim, int) and self.projection_dim > 0,
           f"clip.projection_dim must be a positive int, got {self.projection_dim!r}")
    _check(self.dtype in layers.DTYPES,
           f"clip.dtype must be one of {tuple(layers.DTYPES)}, got {self.dtype!r}")
    _check(self.attention in layers.ATTENTION_IMPLS,
           f"clip.attention must be one of {layers.ATTENTION_IMPLS}, got {self.attention!r}")
    _check(self.remat in layers.REMAT_POLICIES,
           f"clip.remat must be one of {tuple(layers.REMAT_POLICIES)}, got {self.remat!r}")
    # cuDNN flash attention has no float32 kernel.
    _check(self.attention != "cudnn" or self.dtype == "bfloat16",
           f"clip.attention='cudnn' needs clip.dtype='bfloat16', got {self.dtype!r}")


class ClipAttention(nn.Module):
  """HF `CLIPAttention`: q/k/v projections, SDPA, `out_proj`.

  Attributes:
    heads: number of heads (divides the width).
    dtype: compute dtype.
    attention: "xla" | "cudnn".
  """
  heads: int
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """x `[B, L, D]`, mask bool `[B | 1, 1, L, L]` (True = attend) or None -> `[B, L, D]`."""
    d = x.shape[-1]
    proj = lambda n: layers.dense((self.heads, d // self.heads), ("embed", "heads", "kv"),
                                  dtype=self.dtype, kernel_init=_INIT, name=n)(x)
    names = ("batch", "length", "heads", "kv")
    q, k, v = (layers.constrain(proj(n), names) for n in ("q_proj", "k_proj", "v_proj"))
    if mask is not None and self.attention == "cudnn":
      mask = jnp.broadcast_to(mask, (x.shape[0],) + mask.shape[1:])
    out = layers.constrain(layers.dot_product_attention(q, k, v, mask, self.attention), names)
    return layers.dense(d, ("heads", "kv", "embed"), axis=(-2, -1), dtype=self.dtype,
                        kernel_init=_INIT, name="out_proj")(out)


class ClipMLP(nn.Module):
  """HF `CLIPMLP`: `fc1` (embed -> mlp), activation, `fc2` (mlp -> embed)."""
  mlp_dim: int
  hidden_act: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x `[B, L, D]` -> `[B, L, D]` in `dtype`."""
    h = layers.dense(self.mlp_dim, ("embed", "mlp"), dtype=self.dtype, kernel_init=_INIT,
                     name="fc1")(x)
    h = layers.constrain(ACTIVATIONS[self.hidden_act](h), ("batch", "length", "mlp"))
    return layers.dense(x.shape[-1], ("mlp", "embed"), dtype=self.dtype, kernel_init=_INIT,
                        name="fc2")(h)


class ClipEncoderLayer(nn.Module):
  """One pre-LN block: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.

  Attributes:
    config: a `ClipTextConfig` or `ClipVisionConfig`.
    dtype: compute dtype.
    attention: "xla" | "cudnn".
  """
  config: Any
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """x `[B, L, D]`, mask bool `[B | 1, 1, L, L]` or None -> `[B, L, D]` in `dtype`."""
    cfg = self.config
    ln = lambda n: layers.layer_norm(cfg.layer_norm_eps, self.dtype, name=n)
    x = x + ClipAttention(cfg.heads, self.dtype, self.attention, name="self_attn")(
        ln("layer_norm1")(x), mask)
    x = x + ClipMLP(cfg.mlp_dim, cfg.hidden_act, self.dtype, name="mlp")(ln("layer_norm2")(x))
    return layers.constrain(x, ("batch", "length", "embed"))


class ClipEncoder(nn.Module):
  """`layers_0 .. layers_{L-1}`, each optionally rematerialised."""
  config: Any
  dtype: Any = jnp.float32
  attention: str = "xla"
  remat: str = "none"

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """x `[B, L, D]`, mask bool `[B | 1, 1, L, L]` or None -> `[B, L, D]`."""
    block = layers.remat_block(ClipEncoderLayer, self.remat)
    for i in range(self.config.layers):
      x = block(self.config, self.dtype, self.attention, name=f"layers_{i}")(x, mask)
    return x


class ClipTextEmbeddings(nn.Module):
  """HF `CLIPTextEmbeddings`: `token_embedding` and (learned, absolute) `position_embedding`."""
  config: ClipTextConfig
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    self.token_embedding = layers.embed(cfg.vocab_size, cfg.hidden, ("vocab", "embed"),
                                        dtype=self.dtype, init=_INIT)
    self.position_embedding = layers.embed(cfg.max_position, cfg.hidden, (None, "embed"),
                                           dtype=self.dtype, init=nn.initializers.normal(0.01))

  def tokens(self, input_ids: jax.Array) -> jax.Array:
    """int `[B, L]` -> `[B, L, D]` token embeddings (no positions) in `dtype`."""
    return layers.constrain(self.token_embedding(input_ids), ("batch", "length", "embed"))

  def __call__(self, token_embeds: jax.Array) -> jax.Array:
    """`[B, L, D]` token embeddings -> `[B, L, D]` with positions `0..L-1` added."""
    length = token_embeds.shape[1]
    if length > self.config.max_position:
      raise ValueError(f"text length {length} exceeds clip.text.max_position "
                       f"({self.config.max_position})")
    x = token_embeds.astype(self.dtype) + self.position_embedding(jnp.arange(length))[None]
    return layers.constrain(x, ("batch", "length", "embed"))


def causal_mask(length: int, attention_mask: jax.Array | None = None) -> jax.Array:
  """Causal mask, optionally with key padding: bool `[B | 1, 1, L, L]`, True = attend.

  Args:
    length: L.
    attention_mask: optional int/bool `[B, L]`, nonzero = real token (HF convention).
  """
  mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
  if attention_mask is None:
    return mask
  if attention_mask.ndim != 2 or attention_mask.shape[1] != length:
    raise ValueError(f"attention_mask must be [B, {length}], got {tuple(attention_mask.shape)}")
  return mask & attention_mask.astype(bool)[:, None, None, :]


class ClipTextTransformer(nn.Module):
  """HF `CLIPTextModel` body: embeddings, causal pre-LN encoder, `final_layer_norm`."""
  config: ClipTextConfig
  dtype: Any = jnp.float32
  attention: str = "xla"
  remat: str = "none"

  def setup(self):
    cfg = self.config
    self.embeddings = ClipTextEmbeddings(cfg, self.dtype)
    self.encoder = ClipEncoder(cfg, self.dtype, self.attention, self.remat)
    self.final_layer_norm = layers.layer_norm(cfg.layer_norm_eps, self.dtype)

  def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
    """int `[B, L]` -> `[B, L, D]` in `dtype`."""
    return self.embeddings.tokens(input_ids)

  def __call__(self, token_embeds: jax.Array, attention_mask: jax.Array | None = None):
    """`[B, L, D]` token embeddings, optional mask `[B, L]` -> `[B, L, D]` after final LN."""
    x = self.embeddings(token_embeds)
    x = self.encoder(x, causal_mask(x.shape[1], attention_mask))
    return self.final_layer_norm(x)


class ClipVisionEmbeddings(nn.Module):
  """HF `CLIPVisionEmbeddings`: conv patches (no bias), class token, position embeddings."""
  config: ClipVisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    """pixels float `[B, H, W, 3]` -> `[B, 1 + N, D]` in `dtype`."""
    cfg = self.config
    b, h, w, _ = pixels.shape
    if h != cfg.image_size or w != cfg.image_size:
      raise ValueError(
          f"image size {h}x{w} does not match clip.vision.image_size ({cfg.image_size}); "
          f"import the checkpoint with image_size={h} to interpolate the position embeddings")
    p = cfg.patch_size
    patches = nn.Conv(
        cfg.hidden, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(_INIT, (None, None, None, "embed")),
        name="patch_embedding")(pixels.astype(self.dtype))
    patches = patches.reshape(b, cfg.num_patches, cfg.hidden)  # row-major grid, as HF
    cls = self.param("class_embedding", nn.with_logical_partitioning(_INIT, ("embed",)),
                     (cfg.hidden,), jnp.float32)
    x = jnp.concatenate(
        [jnp.broadcast_to(cls.astype(self.dtype), (b, 1, cfg.hidden)), patches], axis=1)
    pos = layers.embed(1 + cfg.num_patches, cfg.hidden, (None, "embed"), dtype=self.dtype,
                       init=_INIT, name="position_embedding")
    x = x + pos(jnp.arange(1 + cfg.num_patches))[None]
    return layers.constrain(x, ("batch", "length", "embed"))


class ClipVisionTransformer(nn.Module):
  """HF `CLIPVisionModel` body: embeddings, `pre_layrnorm`, encoder, `post_layernorm`."""
  config: ClipVisionConfig
  dtype: Any = jnp.float32
  attention: str = "xla"
  remat: str = "none"

  @nn.compact
  def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """pixels `[B, H, W, 3]` -> (tokens `[B, 1 + N, D]`, pooled `[B, D]`), in `dtype`.

    `tokens` is the last encoder state (no LayerNorm, as HF `last_hidden_state`); `pooled`
    is `post_layernorm` of its CLS token.
    """
    cfg = self.config
    ln = lambda n: layers.layer_norm(cfg.layer_norm_eps, self.dtype, name=n)
    x = ClipVisionEmbeddings(cfg, self.dtype, name="embeddings")(pixels)
    x = ln("pre_layrnorm")(x)  # sic: HF's parameter name
    x = ClipEncoder(cfg, self.dtype, self.attention, self.remat, name="encoder")(x)
    return x, ln("post_layernorm")(x[:, 0])


class CLIP(nn.Module):
  """CLIP with HF `CLIPModel` parameter names; a bundle of methods for `apply(method=...)`.

  All methods are pure functions of the params, so a frozen CLIP can encode the frames of a
  clip once (`encode_frames`) and the caller can cache the features across steps/epochs.

  Attributes:
    config: a `ClipConfig`.
  """
  config: ClipConfig

  def setup(self):
    c = self.config
    dtype = layers.compute_dtype(c.dtype)
    self.text_model = ClipTextTransformer(c.text, dtype, c.attention, c.remat)
    self.vision_model = ClipVisionTransformer(c.vision, dtype, c.attention, c.remat)
    # Projections in float32: their outputs are the features compared by cosine similarity.
    self.visual_projection = layers.dense(c.projection_dim, ("embed", None), dtype=jnp.float32,
                                          use_bias=False, kernel_init=_INIT)
    self.text_projection = layers.dense(c.projection_dim, ("embed", None), dtype=jnp.float32,
                                        use_bias=False, kernel_init=_INIT)
    self.logit_scale = self.param(
        "logit_scale", nn.with_logical_partitioning(nn.initializers.constant(c.logit_scale_init),
                                                    ()), (), jnp.float32)

  def __call__(self, pixels: jax.Array, input_ids: jax.Array,
               attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Both towers (used by `init`): -> (image features `[B_i, P]`, text features `[B_t, P]`)."""
    return self.encode_image(pixels), self.encode_text(input_ids, attention_mask)

  def encode_image(self, pixels: jax.Array) -> jax.Array:
    """Image features, as HF `CLIPModel.get_image_features` (not normalised).

    Args:
      pixels: float `[B, H, W, 3]` (NHWC), already normalised with CLIP's mean/std;
        H = W = `config.vision.image_size`.

    Returns:
      float32 `[B, projection_dim]`.
    """
    _, pooled = self.vision_model(pixels)
    return self.visual_projection(pooled.astype(jnp.float32))

  def encode_frames(self, frames: jax.Array) -> jax.Array:
    """Per-frame image features of clips: float `[B, T, H, W, 3]` -> float32 `[B, T, P]`.

    The B*T frames go through the image tower as one batch. With frozen params this is a
    pure function of the pixels, so it can run once per clip and be cached.
    """
    b, t = frames.shape[:2]
    feats = self.encode_image(frames.reshape(b * t, *frames.shape[2:]))
    return layers.constrain(feats.reshape(b, t, -1), ("batch", "frames", None))

  def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
    """Token embeddings (no positions): int `[B, L]` -> `[B, L, D_text]` (compute dtype)."""
    return self.text_model.embed_tokens(input_ids)

  def eot_index(self, input_ids: jax.Array) -> jax.Array:
    """Where HF `CLIPTextModel` pools: int `[B, L]` -> int32 `[B]`.

    The first position of `config.text.eos_token_id`, or `argmax(input_ids)` when the
    config carries the legacy eos_token_id 2. A row without the EOT id gives 0, as in HF.
    """
    ids = input_ids.astype(jnp.int32)
    if self.config.text.pools_at_argmax:
      return jnp.argmax(ids, axis=-1).astype(jnp.int32)
    return jnp.argmax(ids == self.config.text.eos_token_id, axis=-1).astype(jnp.int32)

  def encode_text(self, input_ids: jax.Array,
                  attention_mask: jax.Array | None = None) -> jax.Array:
    """Text features, as HF `CLIPModel.get_text_features` (not normalised).

    Args:
      input_ids: int `[B, L]`, L <= `config.text.max_position`.
      attention_mask: optional int/bool `[B, L]`, nonzero = real token (padding keys are
        masked on top of the causal mask).

    Returns:
      float32 `[B, projection_dim]`.
    """
    return self.encode_text_embeds(self.embed_tokens(input_ids), self.eot_index(input_ids),
                                   attention_mask)

  def encode_text_embeds(self, token_embeds: jax.Array, eot_index: jax.Array,
                         attention_mask: jax.Array | None = None) -> jax.Array:
    """Text features from token embeddings (e.g. with learned prompt vectors inserted).

    Args:
      token_embeds: float `[B, L, D_text]`, token embeddings without positions (from
        `embed_tokens`, possibly edited); positions `0..L-1` are added here.
      eot_index: int `[B]`, the position to pool at (where the EOT token ended up). Values
        cannot be checked under jit: an index >= L gives NaN features, a negative one counts
        from the end.
      attention_mask: optional int/bool `[B, L]`, nonzero = real token.

    Returns:
      float32 `[B, projection_dim]`.
    """
    b = token_embeds.shape[0]
    eot_index = jnp.asarray(eot_index)
    if eot_index.shape != (b,):
      raise ValueError(f"eot_index must have shape [{b}], got {tuple(eot_index.shape)}")
    h = self.text_model(token_embeds, attention_mask)
    pooled = jnp.take_along_axis(h, eot_index.astype(jnp.int32)[:, None, None], axis=1)[:, 0]
    return self.text_projection(pooled.astype(jnp.float32))

  def similarity(self, image_features: jax.Array, text_features: jax.Array) -> jax.Array:
    """HF `logits_per_image`: `exp(logit_scale) * cos(image, text)`, float32 `[B_i, B_t]`."""
    img = layers.l2_normalize(image_features.astype(jnp.float32))
    txt = layers.l2_normalize(text_features.astype(jnp.float32))
    return jnp.exp(self.logit_scale) * img @ txt.T
