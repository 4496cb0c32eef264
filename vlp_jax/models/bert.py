"""BERT (post-LayerNorm) split into ALPRO's text encoder and fusion encoder.

One bert-base is cut at `fusion_layer`: layers `[0, fusion_layer)` encode text alone,
layers `[fusion_layer, layers)` run over `concat(text tokens, video tokens)` with
self-attention only. Layer indices are global in both halves so names match Hugging Face
`BertModel` one-to-one:

  text_encoder/embeddings/{word_embeddings, position_embeddings, token_type_embeddings}/embedding
  text_encoder/embeddings/LayerNorm
  {text,fusion}_encoder/encoder/layer_{i}/attention/self/{query,key,value}   [D, heads, head_dim]
  .../layer_{i}/attention/output/{dense [heads, head_dim, D], LayerNorm}
  .../layer_{i}/intermediate/dense, .../layer_{i}/output/{dense, LayerNorm}

(HF Linear weights `[out, in]` are reshaped/transposed to these kernels on import.)
"""
from __future__ import annotations

import functools

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.models import layers

_LN_EPS = 1e-12


def _std(cfg) -> float:
  # Configs built before `init_std` existed (e.g. converters' own TextConfigs) get HF's 0.02.
  return float(getattr(cfg, "init_std", 0.02))


def _init(cfg) -> nn.initializers.Initializer:
  return nn.initializers.normal(_std(cfg))


class BertEmbeddings(nn.Module):
  """Word + position + token-type (all 0) embeddings, LayerNorm, dropout.

  Attributes:
    config: a `TextConfig`.
    dtype: compute dtype.
  """
  config: Any
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    init = _init(cfg)
    self.word_embeddings = layers.embed(cfg.vocab_size, cfg.hidden, ("vocab", "embed"),
                                        dtype=self.dtype, init=init)
    self.position_embeddings = layers.embed(cfg.max_position, cfg.hidden, (None, "embed"),
                                            dtype=self.dtype, init=init)
    self.token_type_embeddings = layers.embed(cfg.type_vocab_size, cfg.hidden, (None, "embed"),
                                              dtype=self.dtype, init=init)
    self.LayerNorm = layers.layer_norm(_LN_EPS, self.dtype)  # pylint: disable=invalid-name
    self.dropout = nn.Dropout(cfg.dropout)

  def __call__(self, input_ids: jax.Array, deterministic: bool = True) -> jax.Array:
    """input_ids int `[B, L]` -> `[B, L, D]` in `dtype`."""
    length = input_ids.shape[1]
    if length > self.config.max_position:
      raise ValueError(f"text length {length} exceeds model.text.max_position "
                       f"({self.config.max_position})")
    x = self.word_embeddings(input_ids)
    x = x + self.position_embeddings(jnp.arange(length))[None]
    x = x + self.token_type_embeddings(jnp.zeros((1, length), jnp.int32))
    x = self.LayerNorm(x)
    x = self.dropout(x, deterministic)
    return layers.constrain(x, ("batch", "length", "embed"))

  def word_embedding_matrix(self) -> jax.Array:
    """The float32 `[vocab, D]` word-embedding table (the MLM decoder is tied to it)."""
    return self.word_embeddings.embedding


class _AddNorm(nn.Module):
  """HF `BertSelfOutput` / `BertOutput`: `dense`, dropout, `LayerNorm(y + residual)`."""
  features: int
  kernel_axes: tuple
  axis: Any = -1
  dtype: Any = jnp.float32
  dropout: float = 0.0
  init_std: float = 0.02

  @nn.compact
  def __call__(self, x: jax.Array, residual: jax.Array, deterministic: bool = True):
    """x `[B, L, in...]`, residual `[B, L, D]` -> `[B, L, D]` in `dtype`."""
    y = layers.dense(self.features, self.kernel_axes, axis=self.axis, dtype=self.dtype,
                     kernel_init=nn.initializers.normal(self.init_std), name="dense")(x)
    if self.dropout:
      y = nn.Dropout(self.dropout)(y, deterministic)
    return layers.layer_norm(_LN_EPS, self.dtype, name="LayerNorm")(y + residual)


class BertAttention(nn.Module):
  """HF `BertAttention`: `self` (query/key/value + SDPA) then `output` (dense + add & norm)."""
  config: Any
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array, deterministic: bool = True):
    """x `[B, L, D]`, key_mask `[B, L]` (1 = token) -> `[B, L, D]`."""
    heads = layers.MultiHeadAttention(self.config.heads, self.dtype, self.attention,
                                      fused_qkv=False, kernel_init=_init(self.config),
                                      name="self")(x, key_mask)
    return _AddNorm(x.shape[-1], ("heads", "kv", "embed"), (-2, -1), self.dtype,
                    self.config.dropout, _std(self.config), name="output")(heads, x,
                                                                        deterministic)


class BertLayer(nn.Module):
  """One post-LN BERT layer: attention, then MLP (exact GELU), each with add & norm."""
  config: Any
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array, deterministic: bool = True):
    """x `[B, L, D]`, key_mask int/bool `[B, L]` (1 = token) -> `[B, L, D]` in `dtype`."""
    cfg = self.config
    h = BertAttention(cfg, self.dtype, self.attention, name="attention")(x, key_mask,
                                                                         deterministic)
    i = layers.Intermediate(cfg.mlp_dim, self.dtype, 0.0, _init(cfg), name="intermediate")(h)
    out = _AddNorm(cfg.hidden, ("mlp", "embed"), -1, self.dtype, cfg.dropout, _std(cfg),
                   name="output")(i, h, deterministic)
    return layers.constrain(out, ("batch", "length", "embed"))


class BertLayerStack(nn.Module):
  """Layers `layer_{start} .. layer_{end-1}` (global indices), optionally rematerialised, or
  one scanned block over them (`scan`, see `layers.layer_stack`)."""
  config: Any
  start: int
  end: int
  dtype: Any = jnp.float32
  attention: str = "xla"
  remat: str = "none"
  scan: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array, deterministic: bool = True):
    """x `[B, L, D]`, key_mask `[B, L]` -> `[B, L, D]`."""
    # static_argnums=(3,): (self, x, key_mask, deterministic).
    block = layers.remat_block(BertLayer, self.remat, static_argnums=(3,))
    make = functools.partial(block, self.config, self.dtype, self.attention)
    return layers.layer_stack(make, self.start, self.end, self.scan, deterministic, x, key_mask)


class BertTextEncoder(nn.Module):
  """Embeddings + BERT layers `[0, num_layers)` (default `[0, fusion_layer)`).

  With `num_layers = config.layers` it is HF `BertModel` (text only, last hidden state), which
  is what `vlp_jax.convert.hf.import_bert` returns.

  Attributes:
    config: a `TextConfig`.
    dtype: compute dtype.
    attention: "xla" | "cudnn".
    remat: remat policy name.
    num_layers: layers to run; None = `config.fusion_layer`.
  """
  config: Any
  dtype: Any = jnp.float32
  attention: str = "xla"
  remat: str = "none"
  num_layers: int | None = None
  scan: bool = False

  def setup(self):
    self.embeddings = BertEmbeddings(self.config, self.dtype)
    n = self.config.fusion_layer if self.num_layers is None else self.num_layers
    self.encoder = BertLayerStack(self.config, 0, n, self.dtype, self.attention, self.remat,
                                  self.scan)

  def __call__(self, input_ids: jax.Array, mask: jax.Array, deterministic: bool = True):
    """input_ids int `[B, L]`, mask int/bool `[B, L]` (1 = token) -> `[B, L, D]` in `dtype`."""
    x = self.embeddings(input_ids, deterministic)
    return self.encoder(x, mask, deterministic)

  def word_embedding_matrix(self) -> jax.Array:
    """The float32 `[vocab, D]` word-embedding table."""
    return self.embeddings.word_embedding_matrix()


class BertFusionEncoder(nn.Module):
  """BERT layers `[fusion_layer, layers)` over `concat(text, video)`, self-attention only."""
  config: Any
  dtype: Any = jnp.float32
  attention: str = "xla"
  remat: str = "none"
  scan: bool = False

  def setup(self):
    self.encoder = BertLayerStack(self.config, self.config.fusion_layer, self.config.layers,
                                  self.dtype, self.attention, self.remat, self.scan)

  def __call__(self, text_tokens: jax.Array, text_mask: jax.Array, video_tokens: jax.Array,
               deterministic: bool = True) -> jax.Array:
    """Fuses text and video.

    Args:
      text_tokens: `[B, L, D]` from the text encoder.
      text_mask: int/bool `[B, L]`, 1 = token.
      video_tokens: `[B, V, D]` from the video encoder (all real).
      deterministic: disables dropout when True.

    Returns:
      `[B, L + V, D]` in `dtype`, text positions first.
    """
    x = jnp.concatenate([text_tokens.astype(self.dtype), video_tokens.astype(self.dtype)], 1)
    x = layers.constrain(x, ("batch", "length", "embed"))
    mask = jnp.concatenate([text_mask.astype(jnp.int32),
                            jnp.ones(video_tokens.shape[:2], jnp.int32)], axis=1)
    return self.encoder(x, mask, deterministic)
