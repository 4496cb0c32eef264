"""Optimizer: AdamW with warm-up + linear decay, global-norm clipping, decay mask."""
from __future__ import annotations

from typing import Any, Mapping

import jax
import optax


def schedule(optim_cfg: Mapping[str, Any], num_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 over `warmup_frac * num_steps`, then linear decay to `end_lr_frac`."""
  lr = float(optim_cfg["lr"])
  warmup = int(round(float(optim_cfg["warmup_frac"]) * num_steps))
  end = lr * float(optim_cfg.get("end_lr_frac", 0.0))
  decay_steps = max(num_steps - warmup, 1)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, max(warmup, 1)),
       optax.linear_schedule(lr, end, decay_steps)], [warmup])


def decay_mask(params: Any) -> Any:
  """True for weights that get weight decay: matrices and embeddings.

  Biases, LayerNorm scales/offsets (1-d) and scalars such as the contrastive temperature
  (0-d) are not decayed.
  """
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim_cfg: Mapping[str, Any], num_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (transformation, learning-rate schedule)."""
  sched = schedule(optim_cfg, num_steps)
  parts = []
  if optim_cfg["clip_norm"] and float(optim_cfg["clip_norm"]) > 0:
    parts.append(optax.clip_by_global_norm(float(optim_cfg["clip_norm"])))
  parts.append(optax.adamw(sched, b1=float(optim_cfg["b1"]), b2=float(optim_cfg["b2"]),
                           eps=float(optim_cfg["eps"]),
                           weight_decay=float(optim_cfg["weight_decay"]), mask=decay_mask))
  return optax.chain(*parts), sched
