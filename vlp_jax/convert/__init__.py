"""Pretrained weights in and out: `transformers` checkpoints <-> our Flax params."""
