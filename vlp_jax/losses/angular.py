"""MAMA's contrastive loss with a subtractive angular margin on the positive pairs.

For L2-normalised features the cosine matrix is c = text @ video.T over the global batch.
A positive pair's logit is s * cos(theta - mu) with theta = arccos(c_ii); every negative keeps
s * cos(theta) = s * c_ij. cos(theta - mu) peaks at theta = mu, so the positives are held
short of perfect alignment (the opposite of ArcFace's theta + m). It is written without
arccos,

    cos(theta - mu) = c * cos(mu) + sqrt(max(1 - c^2, eps)) * sin(mu),

which keeps the gradient finite at c = +-1 (where d arccos / dc is infinite), and gives
InfoNCE exactly at mu = 0. Like VTC, it is one global computation on (possibly sharded)
arrays: the positive of text i is video i.

`close_negatives=True` reproduces the released code, which also applies the margin to every
negative already within mu of its query (theta_ij <= mu); off by default, as in the paper.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MAX_LOGIT_SCALE = math.log(200.0)  # s = exp(logit_scale) is clamped to [1, 200]
LOGIT_SCALE_INIT = 4.60  # s ~ 100, CLIP's learned value


def scale_from_logit(logit_scale: jax.Array) -> jax.Array:
  """s = exp(clip(logit_scale, 0, ln 200)): float32 scalar, as in MAMA (and CLIP)."""
  return jnp.exp(jnp.clip(jnp.asarray(logit_scale, jnp.float32), 0.0, MAX_LOGIT_SCALE))


def _check(video, text, margin) -> None:
  if video.ndim != 2 or video.shape != text.shape or video.shape[0] < 1:
    raise ValueError("angular_margin_loss expects video and text features of one shape "
                     f"[B, D], got {tuple(video.shape)} and {tuple(text.shape)}")
  if not 0.0 <= float(margin) <= math.pi / 2:
    raise ValueError(f"angular_margin_loss: margin mu must be in [0, pi/2] radians, got "
                     f"{margin}")


def positive_logit(cos: jax.Array, margin: float, eps: float = 1e-6) -> jax.Array:
  """cos(arccos(cos) - margin) without arccos, elementwise (float32)."""
  cos = cos.astype(jnp.float32)
  sin = jnp.sqrt(jnp.maximum(1.0 - jnp.square(cos), eps))
  return cos * math.cos(margin) + sin * math.sin(margin)


def angular_margin_loss(video: jax.Array, text: jax.Array, *, margin: float,
                        scale: jax.Array, eps: float = 1e-6, close_negatives: bool = False
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-pair angular-margin contrastive loss over the global batch, both directions.

  Args:
    video: float [B, D], L2-normalised video features (may be sharded along B).
    text: float [B, D], L2-normalised text features; row i is paired with video i.
    margin: mu in radians, a Python float in [0, pi/2] (0 = InfoNCE).
    scale: float32 scalar s (e.g. `scale_from_logit(logit_scale)`).
    eps: floor of 1 - c^2 under the square root.
    close_negatives: also give the margin to negatives with theta_ij <= mu (c_ij >= cos mu),
      as the released code does.
  Returns:
    per_sample: float32 [B], the text->video plus the video->text cross-entropy of pair i.
    metrics: `angular/t2v_acc`, `angular/v2t_acc` (in-batch top-1, 0-1), `angular/pos_cos`
      (mean cosine of the positive pairs), `angular/scale` (s).
  Raises:
    ValueError: features of different or non-[B, D] shapes, mu outside [0, pi/2].
  """
  _check(video, text, margin)
  v = video.astype(jnp.float32)
  t = text.astype(jnp.float32)
  s = jnp.asarray(scale, jnp.float32)
  cos = jnp.matmul(t, v.T, precision=jax.lax.Precision.HIGHEST)  # [B, B], rows = texts
  b = cos.shape[0]
  diag = jnp.eye(b, dtype=bool)
  shifted = diag
  if close_negatives:
    shifted = diag | (cos >= math.cos(float(margin)))
  logits = s * jnp.where(shifted, positive_logit(cos, float(margin), eps), cos)
  ce_t2v = -jnp.diagonal(jax.nn.log_softmax(logits, axis=1))
  ce_v2t = -jnp.diagonal(jax.nn.log_softmax(logits, axis=0))
  target = jnp.arange(b)
  metrics = {
      "angular/t2v_acc": jnp.mean((jnp.argmax(logits, axis=1) == target).astype(jnp.float32)),
      "angular/v2t_acc": jnp.mean((jnp.argmax(logits, axis=0) == target).astype(jnp.float32)),
      "angular/pos_cos": jnp.mean(jnp.diagonal(cos)),
      "angular/scale": s,
  }
  return ce_t2v + ce_v2t, metrics
