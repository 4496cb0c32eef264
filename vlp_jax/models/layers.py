"""Building blocks shared by the video (TimeSformer) and text (BERT) encoders.

Every parameter is created through the helpers here so that it carries logical axis names
from the sharding vocabulary (`LOGICAL_AXES`); the trainer maps them to mesh axes with
`nn.logical_axis_rules`. Outside such a context the names are inert metadata and
`nn.with_logical_constraint` is a no-op.
"""
from __future__ import annotations

from typing import Any
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., Any]

# Logical axis names models/ may use on parameters and activations.
LOGICAL_AXES = ("batch", "frames", "length", "embed", "heads", "kv", "mlp", "vocab",
                "entities", "classes", "prompts", "layers")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ATTENTION_IMPLS = ("xla", "cudnn")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def compute_dtype(name: str) -> Dtype:
  """Maps a config dtype name ("float32" | "bfloat16") to a jnp dtype."""
  try:
    return DTYPES[name]
  except KeyError:
    raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}") from None


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Logical sharding constraint on an activation (no-op without axis rules in scope)."""
  return nn.with_logical_constraint(x, tuple(names))


class DenseGeneral(nn.Module):
  """Linear map over one or more trailing input axes to one or more output axes.

  Unlike `nn.DenseGeneral`, the kernel is created at its full shape (e.g.
  `[D, heads, head_dim]`): flax's version initialises a flattened 2-D kernel and, with a mesh
  in scope, applies the 3-D logical constraint to it, which fails.

  Attributes:
    features: output feature shape.
    kernel_axes: logical names, input dims then output dims; the bias takes the output part.
    axis: contracted input axes.
    dtype: compute dtype (inputs and kernel are cast to it); params are float32.
    use_bias: whether to add a bias.
    kernel_init: shape-agnostic initializer (normal / truncated normal / zeros).
    bias_init: bias initializer.
  """
  features: int | Sequence[int]
  kernel_axes: Sequence[str | None]
  axis: int | Sequence[int] = -1
  dtype: Dtype = jnp.float32
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.normal(0.02)
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x `[..., *in]` -> `[..., *features]` in `dtype`."""
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
    axis = tuple(sorted(a % x.ndim for a in axis))
    names = tuple(self.kernel_axes)
    if len(names) != len(axis) + len(features):
      raise ValueError(f"kernel_axes {names} must have {len(axis) + len(features)} names")
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, names),
                        tuple(x.shape[a] for a in axis) + features, jnp.float32)
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                            ((axis, tuple(range(len(axis)))), ((), ())))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(self.bias_init, names[len(axis):]),
                        features, jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


def dense(features: int | Sequence[int], kernel_axes: Sequence[str | None], *, dtype: Dtype,
          axis: int | Sequence[int] = -1, kernel_init: Initializer | None = None,
          bias_init: Initializer = nn.initializers.zeros, use_bias: bool = True,
          name: str | None = None) -> DenseGeneral:
  """A `DenseGeneral` whose kernel and bias carry logical axis names.

  Args:
    features: output feature shape (an int or a tuple, e.g. `(heads, head_dim)`).
    kernel_axes: logical names of the kernel, input dims first then output dims, so its
      length is `len(axis) + len(features)`; the bias takes the output part.
    dtype: compute dtype; params are always float32.
    axis: input axes contracted (e.g. `(-2, -1)` for an attention output projection).
    kernel_init: defaults to normal(0.02) (BERT / ViT convention).
    bias_init: bias initializer.
    use_bias: whether to add a bias.
    name: submodule name.

  Returns:
    An unbound `DenseGeneral` module.
  """
  return DenseGeneral(features=features, kernel_axes=tuple(kernel_axes), axis=axis, dtype=dtype,
                      use_bias=use_bias, kernel_init=kernel_init or nn.initializers.normal(0.02),
                      bias_init=bias_init, name=name)


def layer_norm(epsilon: float, dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
  """LayerNorm over the last (embed) axis; statistics are reduced in float32.

  Output is in `dtype`; scale and bias are float32 params named `("embed",)`.
  """
  return nn.LayerNorm(
      epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32, force_float32_reductions=True,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), name=name)


def embed(num_embeddings: int, features: int, axes: Sequence[str | None], *, dtype: Dtype,
          init: Initializer | None = None, name: str | None = None) -> nn.Embed:
  """An embedding table `[num_embeddings, features]` with logical names `axes`."""
  init = init or nn.initializers.normal(0.02)
  return nn.Embed(num_embeddings, features, dtype=dtype, param_dtype=jnp.float32,
                  embedding_init=nn.with_logical_partitioning(init, tuple(axes)), name=name)


def remat_block(block_cls: type[nn.Module], remat: str,
                static_argnums: Sequence[int] = ()) -> type[nn.Module]:
  """Wraps a block class in `nn.remat` according to a config name.

  Args:
    block_cls: the `nn.Module` subclass of one residual block.
    remat: "none" (no rematerialisation), "full" (save nothing), "dots" (save matmul
      outputs), "dots_no_batch" (save matmul outputs without batch dims).
    static_argnums: positions of Python (non-array) arguments such as `deterministic`,
      counted flax-style with `self` as argument 0. Those arguments must be passed
      positionally.

  Returns:
    `block_cls` itself for "none", otherwise the lifted remat class; parameter paths are
    unchanged either way, so checkpoints do not depend on the remat setting.
  """
  if remat not in REMAT_POLICIES:
    raise ValueError(f"unknown remat {remat!r}; expected one of {sorted(REMAT_POLICIES)}")
  if remat == "none":
    return block_cls
  return nn.remat(block_cls, policy=REMAT_POLICIES[remat], static_argnums=tuple(static_argnums))


def stacked_name(start: int) -> str:
  """The module name of scanned layers `start, start+1, ...` (convert/stacked.py reads it)."""
  return f"layers_from_{start}"


class _ScanBody(nn.Module):
  """One scan iteration: `make(name="layer")` applied to the carry and the broadcast args."""
  make: Callable[..., nn.Module]
  deterministic: bool
  tuple_carry: bool

  @nn.compact
  def __call__(self, carry, *args):
    block = self.make(name="layer")
    if self.tuple_carry:
      return block(*carry, *args, self.deterministic), None
    return block(carry, *args, self.deterministic), None


def layer_stack(make: Callable[..., nn.Module], start: int, end: int, scan: bool,
                deterministic: bool, carry, *args, tuple_carry: bool = False):
  """Runs layers `start .. end-1`, each `make(name=...)(*carry, *args, deterministic)`.

  Args:
    make: builds one (possibly rematerialised) block given its `name`.
    scan: False: a Python loop, params `layer_{i}` (the Hugging Face layout). True: `nn.scan`
      over one block, params stacked on a leading `[end - start]` axis (logical name
      `layers`) under `layers_from_{start}/layer`; compile time no longer grows with depth.
      `vlp_jax/convert/stacked.py` converts between the two.
    carry: the hidden state (a tuple when `tuple_carry`); args: the same for every layer.
  Returns:
    The last layer's output (same structure as `carry`).
  """
  if not scan:
    for i in range(start, end):
      out = make(name=f"layer_{i}")
      carry = out(*carry, *args, deterministic) if tuple_carry else out(carry, *args,
                                                                        deterministic)
    return carry
  scanned = nn.scan(_ScanBody, variable_axes={"params": 0},
                    split_rngs={"params": True, "dropout": True}, in_axes=nn.broadcast,
                    length=end - start, metadata_params={nn.PARTITION_NAME: "layers"})
  carry, _ = scanned(make, deterministic, tuple_carry, name=stacked_name(start))(carry, *args)
  return carry


def attention_mask(key_mask: jax.Array, query_len: int, attention: str) -> jax.Array:
  """Key-padding mask `[B, S]` (nonzero = attend) -> bool `[B, 1, 1 | T, S]`.

  cuDNN wants the mask at full `[B, 1, T, S]` (it becomes a bias); XLA broadcasts.
  """
  mask = key_mask.astype(bool)[:, None, None, :]
  if attention == "cudnn":
    mask = jnp.broadcast_to(mask, (mask.shape[0], 1, query_len, mask.shape[-1]))
  return mask


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                          attention: str) -> jax.Array:
  """`softmax(q k^T / sqrt(d) + mask) v` over `[B, L, heads, head_dim]` inputs.

  Softmax statistics are float32 inside `jax.nn.dot_product_attention`. No attention-prob
  dropout (the fused kernels have none).
  """
  if attention not in ATTENTION_IMPLS:
    raise ValueError(f"unknown attention {attention!r}; expected one of {ATTENTION_IMPLS}")
  impl = None if attention == "xla" else attention
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)


class MultiHeadAttention(nn.Module):
  """Q/K/V projections + scaled dot-product attention, *without* the output projection.

  The output projection lives in a sibling module (HF's `attention/output/dense`), so this
  returns per-head values `[B, L, heads, head_dim]` in the compute dtype.

  Attributes:
    num_heads: number of heads; must divide the input width.
    dtype: compute dtype.
    attention: "xla" | "cudnn".
    fused_qkv: one `qkv` kernel `[D, 3, heads, head_dim]` (TimeSformer / timm layout) instead
      of separate `query` / `key` / `value` kernels (BERT layout).
    kernel_init: kernel initializer.
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  attention: str = "xla"
  fused_qkv: bool = False
  kernel_init: Initializer | None = None

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
    """x: `[B, L, D]`; key_mask: optional `[B, L]` (1 = real token). -> `[B, L, H, D/H]`."""
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"heads ({self.num_heads}) must divide width ({width})")
    head_dim = width // self.num_heads
    if self.fused_qkv:
      qkv = dense((3, self.num_heads, head_dim), ("embed", None, "heads", "kv"),
                  dtype=self.dtype, kernel_init=self.kernel_init, name="qkv")(x)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
      proj = lambda n: dense((self.num_heads, head_dim), ("embed", "heads", "kv"),
                             dtype=self.dtype, kernel_init=self.kernel_init, name=n)(x)
      q, k, v = proj("query"), proj("key"), proj("value")
    names = ("batch", "length", "heads", "kv")
    q, k, v = constrain(q, names), constrain(k, names), constrain(v, names)
    mask = None if key_mask is None else attention_mask(key_mask, x.shape[1], self.attention)
    out = dot_product_attention(q, k, v, mask, self.attention)
    return constrain(out, names)


class OutputDense(nn.Module):
  """A `dense` (+ hidden dropout) under a named scope, i.e. HF's `*.output.dense`.

  Attributes:
    features: output width.
    kernel_axes: logical kernel names (e.g. `("heads", "kv", "embed")`).
    axis: contracted input axes (`(-2, -1)` for per-head attention values).
    dtype: compute dtype.
    dropout: hidden dropout rate (rng "dropout").
    kernel_init: kernel initializer.
  """
  features: int
  kernel_axes: tuple
  axis: Any = -1
  dtype: Dtype = jnp.float32
  dropout: float = 0.0
  kernel_init: Initializer | None = None

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    """x `[..., in...]` -> `[..., features]` in `dtype`."""
    y = dense(self.features, self.kernel_axes, axis=self.axis, dtype=self.dtype,
              kernel_init=self.kernel_init, name="dense")(x)
    if self.dropout:
      y = nn.Dropout(self.dropout)(y, deterministic)
    return y


class Intermediate(nn.Module):
  """HF `*.intermediate`: `dense` (embed -> mlp) and exact (erf) GELU (+ dropout)."""
  features: int
  dtype: Dtype = jnp.float32
  dropout: float = 0.0
  kernel_init: Initializer | None = None

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    """x `[B, L, D]` -> `[B, L, features]` in `dtype`."""
    y = dense(self.features, ("embed", "mlp"), dtype=self.dtype, kernel_init=self.kernel_init,
              name="dense")(x)
    y = constrain(gelu(y), ("batch", "length", "mlp"))
    if self.dropout:
      y = nn.Dropout(self.dropout)(y, deterministic)
    return y


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU `x / 2 * (1 + erf(x / sqrt(2)))` (HF's "gelu", torch's default), any shape
  and float dtype.

  The same function as `jax.nn.gelu(x, approximate=False)`, which XLA expands through erfc:
  this erf form is about 4x faster on CPU, forward and backward.
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """`x / max(||x||, eps)` along the last axis (torch `F.normalize`)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)
