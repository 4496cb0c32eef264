"""Prompt-CLIP (Ju et al., ECCV 2022): prompt learning and temporal modelling on a frozen CLIP
for video understanding. Task `clip_pretrain` trains the CLIP it freezes, in-repo;
`prompt_clip_action` learns prompts and a temporal model on its cached frame features
(closed-set, few-shot and open-set action recognition); `prompt_clip_localization` classifies
proposals of untrimmed videos with that model (mAP); `prompt_clip_retrieval` learns them
around captions for text-video retrieval. Importing this package registers them."""
from vlp_jax.methods.prompt_clip import action, clip_pretrain, localization, retrieval

__all__ = ["action", "clip_pretrain", "localization", "retrieval"]
