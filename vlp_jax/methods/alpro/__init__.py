"""ALPRO (Li et al., CVPR 2022): tasks `alpro` (pre-training, retrieval fine-tuning),
`alpro_qa` (video question answering) and `alpro_order` (the label-free video stage before
pre-training); importing this package registers them."""
from vlp_jax.methods.alpro import order, pretrain, qa

__all__ = ["order", "pretrain", "qa"]
