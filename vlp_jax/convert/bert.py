"""BERT: `transformers` BertModel / BertForMaskedLM checkpoints <-> our BERT params.

Checkpoint names (with a `bert.` prefix in BertForMaskedLM) map one-to-one to ours:

  embeddings.{word,position,token_type}_embeddings.weight -> embeddings/*/embedding
  encoder.layer.{i}.attention.self.{query,key,value}      -> layer_{i}/attention/self/*  [D, H, Dh]
  encoder.layer.{i}.attention.output.dense                -> .../attention/output/dense  [H, Dh, D]
  encoder.layer.{i}.{intermediate,output}.dense, *.LayerNorm
  cls.predictions.transform.{dense,LayerNorm}, cls.predictions.bias -> mlm_head/...

In ALPRO, layers `[0, fusion_layer)` live under `text_encoder/encoder`, the rest under
`fusion_encoder/encoder`; the MLM decoder is tied to the word embeddings on both sides.
"""
from __future__ import annotations

from typing import Any
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vlp_jax.convert import hf_io
from vlp_jax.convert import layout, stacked
from vlp_jax.models import bert as bert_lib
from vlp_jax.models.alpro import ALPROConfig, TextConfig

MODEL_TYPES = ("bert",)
LAYER_NORM_EPS = 1e-12  # our BERT's (and every released BERT's)
_ANCHOR = "embeddings.word_embeddings.weight"
_POSITION = "embeddings.position_embeddings.weight"
_MLM = "cls.predictions."

EMBEDDING_RULES = (
    [layout.Rule(f"embeddings.{n}.weight", ("embeddings", n, "embedding"))
     for n in ("word_embeddings", "token_type_embeddings")]
    + layout.layer_norm("embeddings.LayerNorm", ("embeddings", "LayerNorm")))

MLM_RULES = (layout.linear(f"{_MLM}transform.dense", ("transform", "dense"))
             + layout.layer_norm(f"{_MLM}transform.LayerNorm", ("transform", "LayerNorm"))
             + [layout.Rule(f"{_MLM}bias", ("bias",))])


def layer_rules(i: int) -> list[layout.Rule]:
  """Rules of layer `i`: `encoder.layer.{i}.*` <-> `layer_{i}/*` (under an `encoder` root)."""
  hf, ours = f"encoder.layer.{i}", (f"layer_{i}",)
  rules = []
  for n in ("query", "key", "value"):
    rules += layout.linear(f"{hf}.attention.self.{n}", ours + ("attention", "self", n))
  rules += layout.linear(f"{hf}.attention.output.dense", ours + ("attention", "output", "dense"),
                         n_in=2)
  rules += layout.layer_norm(f"{hf}.attention.output.LayerNorm",
                             ours + ("attention", "output", "LayerNorm"))
  rules += layout.linear(f"{hf}.intermediate.dense", ours + ("intermediate", "dense"))
  rules += layout.linear(f"{hf}.output.dense", ours + ("output", "dense"))
  rules += layout.layer_norm(f"{hf}.output.LayerNorm", ours + ("output", "LayerNorm"))
  return rules


def check_config(config: Mapping, path: str) -> None:
  """Fails on BERT variants our module does not compute (another activation, decoder, ...)."""
  hf_io.check_architecture(config, MODEL_TYPES, path)
  act = config.get("hidden_act", "gelu")
  if act != "gelu":
    raise hf_io.ConversionError(f"{path}: hidden_act={act!r}; our BERT uses exact 'gelu'")
  pos = config.get("position_embedding_type", "absolute")
  if pos != "absolute":
    raise hf_io.ConversionError(f"{path}: position_embedding_type={pos!r}; only 'absolute' "
                                "position embeddings are supported")
  if config.get("is_decoder") or config.get("add_cross_attention"):
    raise hf_io.ConversionError(f"{path}: a decoder / cross-attention BERT cannot be imported "
                                "(is_decoder / add_cross_attention set)")
  eps = float(config.get("layer_norm_eps", LAYER_NORM_EPS))
  if not np.isclose(eps, LAYER_NORM_EPS, rtol=0, atol=1e-11):
    logging.warning("%s: layer_norm_eps=%g, our BERT uses %g; outputs differ slightly.",
                    path, eps, LAYER_NORM_EPS)


def text_config(config: Mapping, fusion_layer: int | None = None) -> TextConfig:
  """Our `TextConfig` for a checkpoint's config.json (fusion at half depth by default)."""
  n = int(config["num_hidden_layers"])
  if n < 2:
    raise hf_io.ConversionError(f"num_hidden_layers={n}: our BERT needs at least 2 layers "
                                "(text and fusion parts)")
  return TextConfig(
      vocab_size=int(config["vocab_size"]), hidden=int(config["hidden_size"]), layers=n,
      fusion_layer=n // 2 if fusion_layer is None else int(fusion_layer),
      heads=int(config["num_attention_heads"]), mlp_dim=int(config["intermediate_size"]),
      max_position=int(config.get("max_position_embeddings", 512)),
      dropout=float(config.get("hidden_dropout_prob", 0.1)),
      type_vocab_size=int(config.get("type_vocab_size", 2)))


def find_prefix(src: hf_io.TensorSource) -> str:
  """'' for BertModel checkpoints, 'bert.' for BertForMaskedLM / BertForPreTraining."""
  for prefix in ("", "bert."):
    if src.has(prefix + _ANCHOR):
      return prefix
  src.take(_ANCHOR)  # raises, naming the tensor and near names
  return ""


def _import_embeddings(src: hf_io.TensorSource, prefix: str, params: dict,
                       root: tuple[str, ...]) -> None:
  layout.import_rules(EMBEDDING_RULES, src, prefix, params, root)
  # Position table: a model with fewer positions takes the first rows (position ids start at 0).
  path = root + ("embeddings", "position_embeddings", "embedding")
  rows, width = hf_io.get_leaf(params, path).shape
  table = src.take(prefix + _POSITION)
  if table.ndim != 2 or table.shape[1] != width or table.shape[0] < rows:
    raise hf_io.ConversionError(
        f"{src.source}: tensor {prefix + _POSITION!r} has shape {table.shape}, expected "
        f"({rows}, {width}) or more rows (model.text.max_position = {rows})")
  hf_io.assign(params, path, table[:rows])


def _import_mlm_head(src: hf_io.TensorSource, params: dict, root: tuple[str, ...],
                     word_embeddings: np.ndarray) -> bool:
  """MLM head if the checkpoint has one (BertForMaskedLM / BertForPreTraining)."""
  if not src.has(MLM_RULES[0].hf):
    return False
  layout.import_rules(MLM_RULES, src, "", params, root)
  # The decoder is tied to the word embeddings in our model; HF saves it only when untied.
  for name, tied in ((f"{_MLM}decoder.weight", word_embeddings),
                     (f"{_MLM}decoder.bias", src.tensors.get(f"{_MLM}bias"))):
    if src.has(name):
      value = src.take(name)
      if tied is None or value.shape != np.shape(tied) or not np.allclose(value, tied):
        logging.warning("%s: %s is not tied to %s; our MLM decoder is tied, so it is ignored.",
                        src.source, name, "the word embeddings" if "weight" in name
                        else f"{_MLM}bias")
  return True


def bert_params(path: str, dtype: Any = jnp.float32
                ) -> tuple[bert_lib.BertTextEncoder, dict, list[str]]:
  """A checkpoint as our `BertTextEncoder` over all its layers (text only).

  Returns:
    (module, params, unused): params a nested dict of float32 numpy arrays; unused the
    checkpoint tensors the module does not need (pooler, MLM head, ...), sorted.
  """
  config, tensors = hf_io.load_pretrained(path)
  check_config(config, path)
  cfg = text_config(config)
  module = bert_lib.BertTextEncoder(cfg, dtype, num_layers=cfg.layers)
  ids = jnp.zeros((1, 1), jnp.int32)
  template = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids, ids))["params"]
  params = hf_io.to_mutable(nn.unbox(template))
  src = hf_io.TensorSource(tensors, path)
  prefix = find_prefix(src)
  _import_embeddings(src, prefix, params, ())
  for i in range(cfg.layers):
    layout.import_rules(layer_rules(i), src, prefix, params, ("encoder",))
  missing = hf_io.unfilled(params)
  if missing:
    raise hf_io.ConversionError(f"{path}: no checkpoint tensor for our params {missing}")
  return module, params, src.unused()


def import_bert(path: str, dtype: Any = jnp.float32
                ) -> tuple[bert_lib.BertTextEncoder, dict]:
  """Imports a `BertModel` / `BertForMaskedLM` checkpoint directory.

  Args:
    path: local `save_pretrained` directory.
    dtype: compute dtype of the returned module (params are float32).

  Returns:
    (module, params): `module.apply({"params": params}, input_ids, attention_mask)` with
    int `[B, L]` inputs gives float `[B, L, D]` = BertModel's `last_hidden_state`
    (token_type_ids all 0). Unused checkpoint tensors are logged.
  """
  module, params, unused = bert_params(path, dtype)
  if unused:
    logging.info("%s: %d checkpoint tensors unused: %s", path, len(unused), ", ".join(unused))
  return module, params


def _check_sizes(config: Mapping, text: TextConfig, path: str) -> None:
  pairs = (("hidden_size", "hidden", text.hidden), ("num_hidden_layers", "layers", text.layers),
           ("num_attention_heads", "heads", text.heads),
           ("intermediate_size", "mlp_dim", text.mlp_dim),
           ("vocab_size", "vocab_size", text.vocab_size),
           ("type_vocab_size", "type_vocab_size", text.type_vocab_size))
  for hf_key, ours, value in pairs:
    theirs = config.get(hf_key)
    if theirs is not None and int(theirs) != int(value):
      hint = (" (the tokenizer's vocabulary; set data.vocab to the checkpoint's vocab.txt)"
              if ours == "vocab_size" else "")
      raise hf_io.ConversionError(f"{path}: config.json {hf_key}={theirs} but "
                                  f"model.text.{ours}={value}{hint}")


def init_alpro_text(params: Mapping, path: str, model_cfg: ALPROConfig) -> dict:
  """ALPRO params with the text side replaced by a BERT checkpoint.

  Embeddings and layers `[0, fusion_layer)` -> `text_encoder`, layers `[fusion_layer,
  layers)` -> `fusion_encoder`, `cls.predictions` -> `mlm_head` (kept if the checkpoint has
  none). A model with fewer positions than the checkpoint takes the first rows of the
  position table. Everything else (video encoder, projections, VTM head) is unchanged.

  Args:
    params: ALPRO's unboxed params (nested dict of arrays).
    path: local `save_pretrained` directory of a BERT checkpoint.
    model_cfg: the model's `ALPROConfig`.

  Returns:
    A new nested dict, same structure and shapes; imported leaves are float32 numpy.

  Raises:
    ConversionError: another architecture, a size that differs from `model.text`, a missing
      tensor or a shape that does not fit (naming the tensor and both shapes).
  """
  config, tensors = hf_io.load_pretrained(path)
  check_config(config, path)
  text = model_cfg.text
  _check_sizes(config, text, path)
  src = hf_io.TensorSource(tensors, path)
  prefix = find_prefix(src)
  like = params  # scanned layers are filled one layer at a time, then stacked back
  out = stacked.unstack(hf_io.to_mutable(params))
  _import_embeddings(src, prefix, out, ("text_encoder",))
  for i in range(text.layers):
    part = "text_encoder" if i < text.fusion_layer else "fusion_encoder"
    layout.import_rules(layer_rules(i), src, prefix, out, (part, "encoder"))
  words = out["text_encoder"]["embeddings"]["word_embeddings"]["embedding"]
  if not _import_mlm_head(src, out, ("mlm_head",), np.asarray(words)):
    logging.info("%s: no MLM head (cls.predictions.*) in the checkpoint; mlm_head keeps its "
                 "initialisation", path)
  unused = src.unused()
  if unused:
    logging.info("init.text: %d checkpoint tensors unused: %s", len(unused), ", ".join(unused))
  return stacked.stack_like(out, like)


def hf_config(text: TextConfig, pad_token_id: int = 0) -> dict:
  """config.json of a `BertForMaskedLM` with our text/fusion sizes."""
  return {
      "architectures": ["BertForMaskedLM"], "model_type": "bert",
      "vocab_size": text.vocab_size, "hidden_size": text.hidden,
      "num_hidden_layers": text.layers, "num_attention_heads": text.heads,
      "intermediate_size": text.mlp_dim, "hidden_act": "gelu",
      "hidden_dropout_prob": text.dropout,
      "attention_probs_dropout_prob": 0.0,  # our attention has no probability dropout
      "max_position_embeddings": text.max_position, "type_vocab_size": text.type_vocab_size,
      "initializer_range": 0.02, "layer_norm_eps": LAYER_NORM_EPS,
      "pad_token_id": int(pad_token_id), "tie_word_embeddings": True,
  }


def export_alpro_text(params: Mapping, text: TextConfig, pad_token_id: int = 0
                      ) -> tuple[dict, dict[str, hf_io.LazyTensor]]:
  """ALPRO's text + fusion encoders and MLM head as a `BertForMaskedLM` checkpoint.

  Args:
    params: ALPRO params (arrays of any kind; each is converted when written).
    text: the model's `TextConfig`.

  Returns:
    (config.json dict, {checkpoint name: LazyTensor}) for `hf_io.save_pretrained`; the
    tied decoder weights are left out, as `save_pretrained` does.
  """
  prefix = "bert."
  tensors = layout.export_rules(EMBEDDING_RULES, params, prefix, ("text_encoder",))
  tensors.update(layout.export_rules(
      [layout.Rule(_POSITION, ("embeddings", "position_embeddings", "embedding"))], params,
      prefix, ("text_encoder",)))
  for i in range(text.layers):
    part = "text_encoder" if i < text.fusion_layer else "fusion_encoder"
    tensors.update(layout.export_rules(layer_rules(i), params, prefix, (part, "encoder")))
  tensors.update(layout.export_rules(MLM_RULES, params, "", ("mlm_head",)))
  return hf_config(text, pad_token_id), tensors


def export_bert(params: Mapping, text: TextConfig) -> tuple[dict, dict[str, hf_io.LazyTensor]]:
  """Our text-only BERT params (from `import_bert`) as a `BertModel` checkpoint."""
  tensors = layout.export_rules(
      EMBEDDING_RULES + [layout.Rule(_POSITION, ("embeddings", "position_embeddings",
                                                 "embedding"))], params, "")
  for i in range(text.layers):
    tensors.update(layout.export_rules(layer_rules(i), params, "", ("encoder",)))
  config = hf_config(text)
  config["architectures"] = ["BertModel"]
  return config, tensors
