"""MAMA (Nguyen et al., ECCV 2024): tasks `mama_retrieval` and `mama_qa` (angular-margin
contrastive loss with meta-learned sample weights); importing this package registers them."""
from vlp_jax.methods.mama import qa, retrieval

__all__ = ["qa", "retrieval"]
