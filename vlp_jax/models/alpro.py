"""ALPRO (Li et al., CVPR 2022): TimeSformer + BERT text/fusion encoders and their heads.

The module is a bundle of methods that the ALPRO task calls separately through
`model.apply({"params": p}, ..., method=ALPRO.<name>)`; `__call__` touches every submodule
so that `init` creates the whole parameter tree:

  video_encoder/...   TimeSformer (timesformer.py)
  text_encoder/...    BERT embeddings + layers [0, fusion_layer) (bert.py)
  fusion_encoder/...  BERT layers [fusion_layer, layers)
  vision_proj, text_proj   Dense D -> embed_dim (VTC)
  temp                     scalar temperature
  vtm_head                 Dense D -> 2
  mlm_head/{transform/{dense, LayerNorm}, bias}   decoder tied to the word embeddings
  qa_head/{dense, out}     MLP D -> 2D -> num_answers (video QA), only when num_answers > 0
  pem_head/{dense, out}    MLP D -> 2D -> num_entities (PEM), only when num_entities > 0
"""
from __future__ import annotations

import dataclasses
from typing import Any
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.models import bert
from vlp_jax.models import layers
from vlp_jax.models import timesformer

TEMPORAL_MODES = ("divided", "none")
TEMP_RANGE = (0.001, 0.5)


def _check(cond: bool, msg: str) -> None:
  if not cond:
    raise ValueError(msg)


def _check_positive(prefix: str, obj: Any, names: tuple[str, ...]) -> None:
  for n in names:
    v = getattr(obj, n)
    _check(isinstance(v, int) and not isinstance(v, bool) and v > 0,
           f"{prefix}.{n} must be a positive int, got {v!r}")


def _check_heads(prefix: str, hidden: int, heads: int) -> None:
  _check(hidden % heads == 0,
         f"{prefix}.heads ({heads}) must divide {prefix}.hidden ({hidden})")


def _check_dropout(prefix: str, rate: float) -> None:
  _check(0.0 <= rate < 1.0, f"{prefix}.dropout must be in [0, 1), got {rate!r}")


@dataclasses.dataclass(frozen=True)
class VideoConfig:
  """TimeSformer sizes. `temporal`: "divided" (space-time) or "none" (frames independent)."""
  image_size: int
  patch_size: int
  num_frames: int
  hidden: int
  layers: int
  heads: int
  mlp_dim: int
  temporal: str = "divided"
  dropout: float = 0.0
  layer_norm_eps: float = 1e-6  # timm / TimeSformer; ViT checkpoints use 1e-12
  # Std of the (truncated normal) CLS token and position embeddings, and of the time
  # embeddings, at a fresh init. 0.02 (timm) leaves a from-scratch model nearly blind to when a
  # patch is; imports overwrite these anyway.
  embed_init_std: float = 0.02
  time_init_std: float = 0.02
  # Std of every other (truncated normal) kernel at a fresh init: patch embedding, attention,
  # MLP (timm: 0.02).
  init_std: float = 0.02
  # Std of `temporal_dense` (the temporal attention's output projection) at a fresh init;
  # 0 = zeros (TimeSformer).
  temporal_dense_init_std: float = 0.0

  def __post_init__(self):
    p = "model.video"
    _check_positive(p, self, ("image_size", "patch_size", "num_frames", "hidden", "layers",
                              "heads", "mlp_dim"))
    _check_heads(p, self.hidden, self.heads)
    _check(self.image_size % self.patch_size == 0,
           f"{p}.image_size ({self.image_size}) must be divisible by {p}.patch_size "
           f"({self.patch_size})")
    _check(self.temporal in TEMPORAL_MODES,
           f"{p}.temporal must be one of {TEMPORAL_MODES}, got {self.temporal!r}")
    _check_dropout(p, self.dropout)
    _check(self.layer_norm_eps > 0, f"{p}.layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
    _check(self.temporal_dense_init_std >= 0,
           f"{p}.temporal_dense_init_std must be >= 0 (0 = zeros), got "
           f"{self.temporal_dense_init_std!r}")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """BERT sizes; layers [0, fusion_layer) are the text encoder, the rest the fusion encoder."""
  vocab_size: int
  hidden: int
  layers: int
  fusion_layer: int
  heads: int
  mlp_dim: int
  max_position: int = 512
  dropout: float = 0.1
  type_vocab_size: int = 2
  # Std of every BERT weight and embedding at a fresh init (HF `initializer_range`, 0.02).
  # At small widths 0.02 makes all texts' features nearly equal at init; 1 / sqrt(hidden) is
  # the width-scaled choice.
  init_std: float = 0.02

  def __post_init__(self):
    p = "model.text"
    _check_positive(p, self, ("vocab_size", "hidden", "layers", "heads", "mlp_dim",
                              "max_position", "type_vocab_size"))
    _check_heads(p, self.hidden, self.heads)
    _check(isinstance(self.fusion_layer, int) and 0 < self.fusion_layer < self.layers,
           f"{p}.fusion_layer ({self.fusion_layer}) must satisfy 0 < fusion_layer < "
           f"{p}.layers ({self.layers})")
    _check_dropout(p, self.dropout)


@dataclasses.dataclass(frozen=True)
class ALPROConfig:
  """The whole model. `dtype` is the compute dtype; params are always float32."""
  video: VideoConfig
  text: TextConfig
  embed_dim: int = 256
  temp_init: float = 0.07
  attention: str = "xla"
  dtype: str = "float32"
  remat: str = "none"
  scan_layers: bool = False  # nn.scan over each encoder's layers (stacked params)
  num_entities: int = 0  # K of the PEM head; 0 = no PEM head
  num_answers: int = 0  # K of the video-QA head (answer vocabulary); 0 = no QA head

  def __post_init__(self):
    # Fusion concatenates video and text tokens along the sequence, so widths must agree.
    _check(self.video.hidden == self.text.hidden,
           f"model.video.hidden ({self.video.hidden}) must equal model.text.hidden "
           f"({self.text.hidden})")
    _check(isinstance(self.embed_dim, int) and self.embed_dim > 0,
           f"model.embed_dim must be a positive int, got {self.embed_dim!r}")
    _check(isinstance(self.num_answers, int) and self.num_answers >= 0,
           f"model.num_answers must be an int >= 0, got {self.num_answers!r}")
    _check(TEMP_RANGE[0] <= self.temp_init <= TEMP_RANGE[1],
           f"model.temp_init ({self.temp_init}) must be in {list(TEMP_RANGE)}")
    _check(self.attention in layers.ATTENTION_IMPLS,
           f"model.attention must be one of {layers.ATTENTION_IMPLS}, got {self.attention!r}")
    _check(self.dtype in layers.DTYPES,
           f"model.dtype must be one of {tuple(layers.DTYPES)}, got {self.dtype!r}")
    _check(isinstance(self.num_entities, int) and self.num_entities >= 0,
           f"model.num_entities must be an int >= 0, got {self.num_entities!r}")
    _check(isinstance(self.scan_layers, bool),
           f"model.scan_layers must be True or False, got {self.scan_layers!r}")
    _check(self.remat in layers.REMAT_POLICIES,
           f"model.remat must be one of {tuple(layers.REMAT_POLICIES)}, got {self.remat!r}")
    # cuDNN flash attention has no float32 kernel.
    _check(self.attention != "cudnn" or self.dtype == "bfloat16",
           f"model.attention='cudnn' needs model.dtype='bfloat16', got {self.dtype!r}")


def _get(mapping: Any, key: str, path: str, default: Any = dataclasses.MISSING) -> Any:
  try:
    return mapping[key]
  except (KeyError, AttributeError, TypeError):
    if default is dataclasses.MISSING:
      raise ValueError(f"{path}.{key} is missing") from None
    return default


def _section(cls: type, mapping: Any, path: str, overrides: Mapping[str, Any]) -> Any:
  kwargs = {}
  for f in dataclasses.fields(cls):
    if f.name in overrides:
      kwargs[f.name] = overrides[f.name]
      continue
    value = _get(mapping, f.name, path, f.default)
    # Coerce to the field's type so `1` for a float or `"2"` never leaks through.
    kind = {"int": int, "float": float, "str": str}.get(
        f.type if isinstance(f.type, str) else getattr(f.type, "__name__", ""))
    if kind is not None:
      try:
        if kind is int and isinstance(value, float) and not value.is_integer():
          raise ValueError
        value = kind(value)
      except (TypeError, ValueError):
        raise ValueError(f"{path}.{f.name} must be {kind.__name__}, got {value!r}") from None
    kwargs[f.name] = value
  return cls(**kwargs)


def alpro_config(model_cfg: Any, vocab_size: int) -> ALPROConfig:
  """Builds and validates an `ALPROConfig` from the `config.model` section.

  Args:
    model_cfg: any mapping-like object (ml_collections `ConfigDict` or nested dicts) with
      `video`, `text`, `embed_dim`, `temp_init`, `attention`, `dtype`, `remat`.
    vocab_size: the tokenizer's vocabulary size, used when `model.text.vocab_size == 0`.

  Returns:
    A frozen `ALPROConfig`.

  Raises:
    ValueError: naming the offending key (e.g. "model.video.hidden (128) must equal
      model.text.hidden (64)").
  """
  video = _section(VideoConfig, _get(model_cfg, "video", "model"), "model.video", {})
  text_cfg = _get(model_cfg, "text", "model")
  vocab = int(_get(text_cfg, "vocab_size", "model.text", 0))
  if vocab == 0:
    vocab = int(vocab_size)
  _check(vocab > 0, f"model.text.vocab_size is 0 and the tokenizer vocab_size is {vocab_size}")
  text = _section(TextConfig, text_cfg, "model.text", {"vocab_size": vocab})
  top = {}
  for f in dataclasses.fields(ALPROConfig):
    if f.name not in ("video", "text"):
      top[f.name] = _get(model_cfg, f.name, "model", f.default)
  try:
    top["embed_dim"] = int(top["embed_dim"])
    top["temp_init"] = float(top["temp_init"])
  except (TypeError, ValueError):
    raise ValueError(f"model.embed_dim / model.temp_init must be numbers, got "
                     f"{top['embed_dim']!r} / {top['temp_init']!r}") from None
  return ALPROConfig(video=video, text=text, **top)


class BertMLMHead(nn.Module):
  """HF `BertLMPredictionHead`: transform (dense, GELU, LayerNorm), tied decoder + bias.

  Attributes:
    hidden: D.
    vocab_size: V.
    dtype: compute dtype for the transform.
  """
  hidden: int
  vocab_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, word_embeddings: jax.Array) -> jax.Array:
    """x `[B, L, D]`, word_embeddings float32 `[V, D]` -> float32 logits `[B, L, V]`."""
    h = _Transform(self.hidden, self.dtype, name="transform")(x)
    # Compute-dtype matmul with float32 accumulation and output: the [B, L, V] logits are the
    # largest activation of the model, the softmax over V needs float32.
    logits = jnp.einsum("bld,vd->blv", h, word_embeddings.astype(self.dtype),
                        preferred_element_type=jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                      (self.vocab_size,), jnp.float32)
    return layers.constrain(logits + bias, ("batch", "length", "vocab"))


class _Transform(nn.Module):
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = layers.dense(self.hidden, ("embed", None), dtype=self.dtype, name="dense")(x)
    h = layers.gelu(h)
    return layers.layer_norm(1e-12, self.dtype, name="LayerNorm")(h)


class MLPHead(nn.Module):
  """Classifier MLP `D -> 2D -> K` with ReLU, in float32 (ALPRO's QA and PEM heads).

  Attributes:
    hidden: D.
    num_classes: K.
    class_axis: logical name of the K axis ("classes" for QA, "entities" for PEM).
  """
  hidden: int
  num_classes: int
  class_axis: str = "classes"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x `[B, D]` -> float32 logits `[B, K]`."""
    h = layers.dense(2 * self.hidden, ("embed", "mlp"), dtype=jnp.float32, name="dense")(
        x.astype(jnp.float32))
    logits = layers.dense(self.num_classes, ("mlp", self.class_axis), dtype=jnp.float32,
                          name="out")(nn.relu(h))
    return layers.constrain(logits, ("batch", self.class_axis))


class ALPRO(nn.Module):
  """ALPRO: video encoder, text encoder, fusion encoder, VTC projections, VTM and MLM heads.

  Attributes:
    config: an `ALPROConfig`.
  """
  config: ALPROConfig

  def setup(self):
    c = self.config
    dtype = layers.compute_dtype(c.dtype)
    scan = c.scan_layers
    self.video_encoder = timesformer.TimesformerModel(c.video, dtype, c.attention, c.remat,
                                                      scan=scan)
    self.text_encoder = bert.BertTextEncoder(c.text, dtype, c.attention, c.remat, scan=scan)
    self.fusion_encoder = bert.BertFusionEncoder(c.text, dtype, c.attention, c.remat, scan)
    # Heads feeding losses run in float32: they are tiny and their outputs go into
    # softmax / cross-entropy.
    self.vision_proj = layers.dense(c.embed_dim, ("embed", None), dtype=jnp.float32)
    self.text_proj = layers.dense(c.embed_dim, ("embed", None), dtype=jnp.float32)
    self.temp = self.param(
        "temp", nn.with_logical_partitioning(nn.initializers.constant(c.temp_init), ()), (),
        jnp.float32)
    self.vtm_head = layers.dense(2, ("embed", None), dtype=jnp.float32)
    self.mlm_head = BertMLMHead(c.text.hidden, c.text.vocab_size, dtype)
    if c.num_answers > 0:
      self.qa_head = MLPHead(c.text.hidden, c.num_answers, "classes")
    if c.num_entities:
      self.pem_head = MLPHead(c.text.hidden, c.num_entities, "entities")

  def __call__(self, video: jax.Array, text_ids: jax.Array, text_mask: jax.Array,
               deterministic: bool = True) -> dict[str, jax.Array]:
    """Runs every part once (used by `init` to create all parameters).

    Args:
      video: float `[B, T, H, W, 3]`, normalised.
      text_ids: int32 `[B, L]`.
      text_mask: int/bool `[B, L]`, 1 = token.
      deterministic: disables dropout when True.

    Returns:
      dict with video_tokens `[B, 1+N, D]`, text_tokens `[B, L, D]`, video_feature and
      text_feature float32 `[B, E]`, temperature float32 `[]`, fused `[B, L+1+N, D]`,
      vtm_logits float32 `[B, 2]`, mlm_logits float32 `[B, L, V]`, and with a PEM head
      pem_logits float32 `[B, K]`, with a QA head qa_logits float32 `[B, num_answers]`.
    """
    video_tokens = self.encode_video(video, deterministic)
    text_tokens = self.encode_text(text_ids, text_mask, deterministic)
    fused = self.fuse(text_tokens, text_mask, video_tokens, deterministic)
    return {
        "video_tokens": video_tokens,
        "text_tokens": text_tokens,
        "video_feature": self.video_feature(video_tokens),
        "text_feature": self.text_feature(text_tokens),
        "temperature": self.temperature(),
        "fused": fused,
        "vtm_logits": self.vtm_logits(fused),
        "mlm_logits": self.mlm_logits(fused[:, :text_ids.shape[1]]),
        **({"pem_logits": self.pem_logits(jnp.mean(fused[:, text_ids.shape[1] + 1:], axis=1))}
           if self.config.num_entities else {}),
        **({"qa_logits": self.qa_logits(fused)} if self.config.num_answers else {}),
    }

  def encode_video(self, video: jax.Array, deterministic: bool = True) -> jax.Array:
    """float `[B, T, H, W, 3]` -> `[B, 1+N, D]` (compute dtype): CLS + temporal patch mean."""
    return self.video_encoder(video, deterministic)

  def encode_text(self, text_ids: jax.Array, text_mask: jax.Array,
                  deterministic: bool = True) -> jax.Array:
    """int32 `[B, L]`, mask `[B, L]` (1 = token) -> `[B, L, D]` (compute dtype)."""
    return self.text_encoder(text_ids, text_mask, deterministic)

  def video_feature(self, video_tokens: jax.Array) -> jax.Array:
    """`[B, 1+N, D]` -> float32 `[B, E]`, L2-normalised projection of the CLS token."""
    return layers.l2_normalize(self.vision_proj(video_tokens[:, 0].astype(jnp.float32)))

  def text_feature(self, text_tokens: jax.Array) -> jax.Array:
    """`[B, L, D]` -> float32 `[B, E]`, L2-normalised projection of the [CLS] token."""
    return layers.l2_normalize(self.text_proj(text_tokens[:, 0].astype(jnp.float32)))

  def temperature(self) -> jax.Array:
    """float32 scalar in [0.001, 0.5].

    ALPRO clamps the parameter in place after each step, which never blocks its gradient.
    A plain `clip` would zero the gradient once outside the range and freeze the parameter
    there, so the clip is straight-through: the value is clipped, the gradient is not.
    """
    t = self.temp
    # `t - stop_gradient(t)` is exactly 0 in value and 1 in gradient.
    return jnp.clip(jax.lax.stop_gradient(t), *TEMP_RANGE) + (t - jax.lax.stop_gradient(t))

  def fuse(self, text_tokens: jax.Array, text_mask: jax.Array, video_tokens: jax.Array,
           deterministic: bool = True) -> jax.Array:
    """text `[B, L, D]`, mask `[B, L]`, video `[B, 1+N, D]` -> `[B, L+1+N, D]`, text first."""
    return self.fusion_encoder(text_tokens, text_mask, video_tokens, deterministic)

  def vtm_logits(self, fused: jax.Array) -> jax.Array:
    """`[B, L', D]` -> float32 `[B, 2]` from the fused text [CLS] (index 1 = match)."""
    return self.vtm_head(fused[:, 0].astype(jnp.float32))

  def qa_logits(self, fused: jax.Array) -> jax.Array:
    """`[B, L', D]` -> float32 `[B, num_answers]` from the fused [CLS] (question first)."""
    return self.qa_head(fused[:, 0])

  def mlm_logits(self, fused_text: jax.Array) -> jax.Array:
    """`[B, L, D]` (fused text positions, or a gather of them) -> float32 `[B, L, V]`."""
    return self.mlm_head(fused_text, self.text_encoder.word_embedding_matrix())

  def pem_logits(self, patch_mean: jax.Array) -> jax.Array:
    """`[B, D]` mean of fused video-patch tokens in a region -> float32 `[B, K]` entity logits.

    Needs `config.num_entities > 0`.
    """
    if not self.config.num_entities:
      raise ValueError("pem_logits needs model.num_entities > 0 (the PEM head)")
    return self.pem_head(patch_mean)
