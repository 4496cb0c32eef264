"""MAMA's weighting network: per-sample loss -> sample weight (Meta-Weight-Net's MLP)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class WeightNet(nn.Module):
  """MLP 1 -> hidden -> 1, ReLU, sigmoid.

  Attributes:
    hidden: width of the hidden layer (MAMA's code: 64; Meta-Weight-Net: 100).
  """
  hidden: int = 64

  @nn.compact
  def __call__(self, loss: jax.Array) -> jax.Array:
    """loss: float [B] (the caller stops its gradient) -> weights float32 [B] in (0, 1)."""
    x = loss.astype(jnp.float32)[:, None]
    x = nn.relu(nn.Dense(self.hidden, name="dense")(x))
    return nn.sigmoid(nn.Dense(1, name="out")(x))[:, 0]
