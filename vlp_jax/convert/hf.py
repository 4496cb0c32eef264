"""Pretrained `transformers` checkpoints (local directories, no hub access) in and out.

  module, params = hf.import_bert(path)          # BertModel / BertForMaskedLM
  module, params = hf.import_timesformer(path)   # TimesformerModel (or a ViTModel, inflated)
  module, params = hf.import_clip(path)          # CLIPModel (vlp_jax/convert/clip.py)
  cfg = hf.clip_config_from_dir(path)            # its ClipConfig, from config.json only
  params = hf.init_alpro_text(params, path, model_cfg)    # config.init.text = "hf:DIR"
  params = hf.init_alpro_video(params, path, model_cfg)   # config.init.video = "hf:DIR"

Every mismatch raises `ConversionError` naming the tensor (and both shapes); checkpoint
tensors a conversion does not use are logged.
"""
from __future__ import annotations

from vlp_jax.convert.bert import import_bert, init_alpro_text
from vlp_jax.convert.clip import config_from_dir as clip_config_from_dir
from vlp_jax.convert.clip import export_clip, import_clip
from vlp_jax.convert.hf_io import ConversionError, load_pretrained, save_pretrained
from vlp_jax.convert.timesformer import import_timesformer, init_alpro_video

__all__ = ["ConversionError", "clip_config_from_dir", "export_clip", "import_bert",
           "import_clip", "import_timesformer", "init_alpro_text",
           "init_alpro_video", "load_pretrained", "save_pretrained"]
