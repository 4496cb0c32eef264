"""Analytic FLOPs of an ALPRO training step (matrix multiplies only, 2 FLOPs per MAC).

The cross-check of `launch.benchmark`'s `flops_per_step`, which comes from XLA's cost analysis
of the compiled step and also counts element-wise work (softmax, GELU, LayerNorm, AdamW), so
the analytic figure is a little lower. Backward = 2 x forward for every trained matmul, except
the patch embedding (no gradient w.r.t. the pixels); PEM's frozen teacher runs forward only.
"""
from __future__ import annotations

from vlp_jax.models.alpro import ALPROConfig


def _layer(tokens: float, seq: float, d: int, m: int) -> float:
  """One transformer layer over `tokens` tokens in sequences of length `seq`: QKV + output
  projections, QK^T and PV, the MLP."""
  return 2 * tokens * (4 * d * d + 2 * d * m) + 4 * tokens * seq * d


def video_forward(cfg: ALPROConfig, batch: int) -> tuple[float, float]:
  """(forward FLOPs of the video encoder on `batch` clips, of which the patch embedding)."""
  v = cfg.video
  t, n, d = v.num_frames, cfg.video.num_patches, v.hidden
  patch = 2 * batch * t * n * 3 * v.patch_size ** 2 * d
  per_layer = 0.0
  if v.temporal == "divided":
    # Temporal attention over T per patch + HF's temporal_dense; every patch token.
    per_layer += 2 * batch * t * n * 5 * d * d + 4 * batch * n * t * t * d
  # Spatial attention per frame over CLS + N (the CLS token repeated per frame).
  per_layer += 2 * batch * t * (1 + n) * 4 * d * d + 4 * batch * t * (1 + n) ** 2 * d
  per_layer += 4 * batch * (1 + t * n) * d * v.mlp_dim
  return patch + v.layers * per_layer, patch


def text_forward(cfg: ALPROConfig, batch: float, length: int) -> float:
  """The text encoder (layers [0, fusion_layer)) on `batch` texts of `length` tokens."""
  x = cfg.text
  return x.fusion_layer * _layer(batch * length, length, x.hidden, x.mlp_dim)


def fusion_forward(cfg: ALPROConfig, batch: float, length: int) -> float:
  """The fusion encoder on `batch` (text, video) pairs: L + 1 + N concatenated tokens."""
  x = cfg.text
  seq = length + 1 + cfg.video.num_patches
  return (x.layers - x.fusion_layer) * _layer(batch * seq, seq, x.hidden, x.mlp_dim)


def train_step(cfg: ALPROConfig, batch: int, length: int, weights: dict) -> float:
  """FLOPs of one pre-training step with loss weights `weights` (`vtc`, `vtm`, `mlm`, `pem`)."""
  d, e = cfg.text.hidden, cfg.embed_dim
  video, patch = video_forward(cfg, batch)
  trained = video + text_forward(cfg, batch, length)
  trained += 2 * batch * (cfg.video.hidden + d) * e + 2 * batch * batch * e  # VTC
  frozen = 0.0
  if weights.get("vtm"):
    trained += fusion_forward(cfg, 3 * batch, length) + 2 * 3 * batch * d * 2
  if weights.get("mlm"):
    trained += (text_forward(cfg, batch, length) + fusion_forward(cfg, batch, length)
                + 2 * batch * length * d * (d + cfg.text.vocab_size))
  if weights.get("pem"):
    if not weights.get("vtm"):
      trained += fusion_forward(cfg, batch, length)
    k = max(cfg.num_entities, 1)
    trained += 2 * batch * (d * 2 * d + 2 * d * k)
    frozen += video_forward(cfg, batch)[0] + 2 * batch * cfg.video.hidden * e
  return 3 * trained - 2 * patch + frozen
