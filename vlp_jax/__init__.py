"""vlp_jax: video-language pre-training in JAX/Flax (ALPRO, Prompt-CLIP, MAMA) on one core."""
__version__ = "0.2.0"
