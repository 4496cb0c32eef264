"""Flax Linen models: TimeSformer video encoder, BERT text/fusion encoders, ALPRO."""
from vlp_jax.models.alpro import ALPRO
from vlp_jax.models.alpro import ALPROConfig
from vlp_jax.models.alpro import alpro_config
from vlp_jax.models.alpro import TextConfig
from vlp_jax.models.alpro import VideoConfig

__all__ = ["ALPRO", "ALPROConfig", "TextConfig", "VideoConfig", "alpro_config"]
