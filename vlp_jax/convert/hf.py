"""Pretrained `transformers` checkpoints (local directories, no hub access) in and out.

  module, params = hf.import_bert(path)          # BertModel / BertForMaskedLM
  module, params = hf.import_timesformer(path)   # TimesformerModel (or a ViTModel, inflated)
  module, params = hf.import_clip(path)          # CLIPModel (vlp_jax/convert/clip.py)
  params = hf.init_alpro_text(params, path, model_cfg)    # config.init.text = "hf:DIR"
  params = hf.init_alpro_video(params, path, model_cfg)   # config.init.video = "hf:DIR"

Every mismatch raises `ConversionError` naming the tensor (and both shapes); checkpoint
tensors a conversion does not use are logged.
"""
from __future__ import annotations

from vlp_jax.convert.bert import import_bert, init_alpro_text
from vlp_jax.convert.hf_io import ConversionError, load_pretrained, save_pretrained
from vlp_jax.convert.timesformer import import_timesformer, init_alpro_video

_CLIP_NAMES = ("import_clip", "export_clip")


def __getattr__(name: str):
  # CLIP conversion lives in its own module; `hasattr(hf, "export_clip")` is False when
  # that module (or the function) is not there.
  if name in _CLIP_NAMES:
    try:
      from vlp_jax.convert import clip
    except ImportError as e:
      raise AttributeError(f"vlp_jax.convert.hf.{name} is unavailable: {e}") from e
    if hasattr(clip, name):
      return getattr(clip, name)
  raise AttributeError(f"module 'vlp_jax.convert.hf' has no attribute {name!r}")


__all__ = ["ConversionError", "import_bert", "import_timesformer", "init_alpro_text",
           "init_alpro_video", "load_pretrained", "save_pretrained", *_CLIP_NAMES]
