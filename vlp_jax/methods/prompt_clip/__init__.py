"""Prompt-CLIP (Ju et al., ECCV 2022): prompt learning and temporal modelling on a frozen CLIP
for video understanding. Task `clip_pretrain` trains the CLIP it freezes, in-repo; importing
this package registers its tasks."""
from vlp_jax.methods.prompt_clip import clip_pretrain

__all__ = ["clip_pretrain"]
