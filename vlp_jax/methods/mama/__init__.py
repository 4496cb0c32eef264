"""MAMA (Nguyen et al., ECCV 2024): task `mama_retrieval` (angular-margin contrastive loss with
meta-learned sample weights); importing this package registers it."""
from vlp_jax.methods.mama import retrieval

__all__ = ["retrieval"]
