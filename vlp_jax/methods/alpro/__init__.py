"""ALPRO (Li et al., CVPR 2022): tasks `alpro` (pre-training, retrieval fine-tuning) and
`alpro_qa` (video question answering); importing this package registers them."""
from vlp_jax.methods.alpro import pretrain, qa

__all__ = ["pretrain", "qa"]
