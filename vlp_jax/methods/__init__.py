"""The methods built on `vlp_jax.core`, one folder each; importing this package registers their
tasks (`config.task`). A method never imports another method."""
from vlp_jax.methods import alpro, mama, prompt_clip

__all__ = ["alpro", "mama", "prompt_clip"]
