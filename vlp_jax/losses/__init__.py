"""Loss functions: pure jax, per-sample values `[B]` plus a dict of scalar metrics."""
from vlp_jax.losses.angular import angular_margin_loss, scale_from_logit
from vlp_jax.losses.mlm import IGNORE_INDEX, mlm_loss
from vlp_jax.losses.pem import (keep_region, label_quality, pem_loss, region_mean,
                                region_patch_mask, regions_from_uniforms, sample_regions,
                                soft_labels)
from vlp_jax.losses.qa import qa_loss
from vlp_jax.losses.reversal_nce import reversal_nce, twin_cosine
from vlp_jax.losses.vtc import vtc_loss
from vlp_jax.losses.vtm import (hard_negative_sharpness, sample_hard_negatives, twin_negatives,
                                vtm_loss)

__all__ = [
    "IGNORE_INDEX",
    "angular_margin_loss",
    "keep_region",
    "label_quality",
    "mlm_loss",
    "pem_loss",
    "qa_loss",
    "region_mean",
    "region_patch_mask",
    "regions_from_uniforms",
    "reversal_nce",
    "hard_negative_sharpness",
    "sample_hard_negatives",
    "sample_regions",
    "scale_from_logit",
    "soft_labels",
    "twin_cosine",
    "twin_negatives",
    "vtc_loss",
    "vtm_loss",
]
