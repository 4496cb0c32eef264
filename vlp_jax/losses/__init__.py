"""Loss functions: pure jax, per-sample values `[B]` plus a dict of scalar metrics."""
from vlp_jax.losses.mlm import IGNORE_INDEX, mlm_loss
from vlp_jax.losses.vtc import vtc_loss
from vlp_jax.losses.vtm import sample_hard_negatives, vtm_loss

__all__ = [
    "IGNORE_INDEX",
    "mlm_loss",
    "sample_hard_negatives",
    "vtc_loss",
    "vtm_loss",
]
