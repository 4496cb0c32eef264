"""Exports a trained run: its task's `Task.export`, or for ALPRO models `transformers`
checkpoints and a `jax.export` artifact:

  OUT/bert/            BertForMaskedLM: text layers then fusion layers, MLM head, tokenizer
  OUT/timesformer/     TimesformerModel (last_hidden_state; ALPRO's output is its CLS plus the
                       temporal mean of the patch tokens)
  OUT/alpro_heads.safetensors   vision_proj, text_proj, temp, vtm_head, QA / PEM heads
                       (flat "a/b/c" names)
  OUT/artifact/        encode_video / encode_text as serialized `jax.export` functions with a
                       symbolic batch size, their params, vocab.txt and load_artifact.py

Memory: params are restored once onto one CPU device, then every output tensor is converted
and written one at a time, so the peak is about the size of the params in float32 plus one
tensor (never a second copy of the model).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

import ml_collections

from vlp_jax.convert import bert as bert_conv
from vlp_jax.convert import hf_io, stacked
from vlp_jax.convert import timesformer as tsf_conv
from vlp_jax.core import init as init_lib
from vlp_jax.core import task as task_lib
from vlp_jax.data import setup as data_setup
from vlp_jax.models.alpro import ALPRO, ALPROConfig
from vlp_jax.parallel import mesh as mesh_lib
from vlp_jax.parallel import sharding as shd

PLATFORMS = ("cpu", "cuda", "tpu")
# Must match the data pipeline's normalisation (vlp_jax/data/pipeline.py CLIP_MEAN / CLIP_STD).
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)
# Top-level params that the transformers checkpoints hold; the rest (vision_proj, text_proj,
# temp, vtm_head, QA / PEM heads) go to alpro_heads.safetensors.
_IN_CHECKPOINTS = ("video_encoder", "text_encoder", "fusion_encoder", "mlm_head")
# `temp` is declared in ALPRO.setup, so every apply needs it (a scalar).
_FUNCTION_PARAMS = {"encode_video": ("video_encoder", "vision_proj", "temp"),
                    "encode_text": ("text_encoder", "text_proj", "temp")}


def flatten(tree: Mapping, keys: Sequence[str] | None = None) -> dict[str, Any]:
  """Nested dict -> {"a/b/c": leaf}, optionally only the top-level `keys`."""
  out = {}

  def walk(node, prefix):
    if isinstance(node, Mapping):
      for k, v in node.items():
        walk(v, prefix + (str(k),))
    else:
      out["/".join(prefix)] = node

  for k in (tree if keys is None else keys):
    walk(tree[k], (k,))
  return out


def unflatten(flat: Mapping[str, Any]) -> dict:
  """{"a/b/c": leaf} -> nested dict."""
  out: dict = {}
  for name, leaf in flat.items():
    *parents, last = name.split("/")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = leaf
  return out


def _lazy(leaf) -> hf_io.LazyTensor:
  return hf_io.LazyTensor(tuple(np.shape(leaf)), lambda: np.asarray(leaf, np.float32))


def export_transformers(params: Mapping, model_cfg: ALPROConfig, out_dir: str,
                        tokenizer: Any = None, vocab_path: str | None = None,
                        num_frames: int | None = None) -> dict[str, str]:
  """Writes OUT/bert, OUT/timesformer and OUT/alpro_heads.safetensors.

  Args:
    params: ALPRO params (nested dict of arrays; each leaf converted when written).
    model_cfg: the run's `ALPROConfig`.
    out_dir: output directory.
    tokenizer: the run's BERT tokenizer (saved with the BERT checkpoint), or None.
    vocab_path: its vocab.txt, copied next to it (for tools that read the vocabulary).
    num_frames: frames per clip of the exported TimesformerModel (default: the model's;
      launch.export uses the run's data.num_frames).

  Returns:
    {"bert": dir, "timesformer": dir, "heads": file}.
  """
  # One entry per layer (transformers' layout), whether or not the run scanned its layers.
  params = stacked.unstack(params)
  bert_dir = os.path.join(out_dir, "bert")
  pad = tokenizer.pad_token_id if tokenizer is not None else 0
  config, tensors = bert_conv.export_alpro_text(params, model_cfg.text, pad)
  hf_io.save_pretrained(bert_dir, config, tensors)
  if tokenizer is not None:
    tokenizer.save_pretrained(bert_dir)
  if vocab_path:
    shutil.copyfile(vocab_path, os.path.join(bert_dir, "vocab.txt"))
  video_dir = os.path.join(out_dir, "timesformer")
  config, tensors = tsf_conv.export_timesformer(params, model_cfg.video, ("video_encoder",),
                                                num_frames)
  hf_io.save_pretrained(video_dir, config, tensors)
  heads = os.path.join(out_dir, "alpro_heads.safetensors")
  rest = [k for k in params if k not in _IN_CHECKPOINTS]
  hf_io.write_safetensors(heads, {k: _lazy(v) for k, v in flatten(params, rest).items()})
  return {"bert": bert_dir, "timesformer": video_dir, "heads": heads}


def _encoders(model_cfg: ALPROConfig):
  # The portable artifact uses XLA attention (cuDNN kernels exist only on NVIDIA GPUs) and no
  # rematerialisation (inference only).
  model = ALPRO(dataclasses.replace(model_cfg, attention="xla", remat="none"))

  def encode_video(flat_params, video):
    p = {"params": unflatten(flat_params)}
    tokens = model.apply(p, video, method=ALPRO.encode_video)
    feature = model.apply(p, tokens, method=ALPRO.video_feature)
    return {"feature": feature, "tokens": tokens.astype(jnp.float32)}

  def encode_text(flat_params, ids, mask):
    p = {"params": unflatten(flat_params)}
    tokens = model.apply(p, ids, mask, method=ALPRO.encode_text)
    feature = model.apply(p, tokens, method=ALPRO.text_feature)
    return {"feature": feature, "tokens": tokens.astype(jnp.float32)}

  return {"encode_video": encode_video, "encode_text": encode_text}


def export_artifact(params: Mapping, model_cfg: ALPROConfig, out_dir: str, *, num_frames: int,
                    image_size: int, max_text_len: int, vocab_path: str | None = None,
                    platforms: Sequence[str] = PLATFORMS) -> str:
  """Writes the `jax.export` artifact of `encode_video` / `encode_text` to `out_dir`.

  encode_video(params, video float32 [b, num_frames, image_size, image_size, 3]) and
  encode_text(params, ids int32 [b, max_text_len], mask int32 [b, max_text_len]) each return
  {"feature": float32 [b, embed_dim] (L2-normalised VTC feature), "tokens": float32
  [b, 1 + N, D] / [b, L, D]}; b is symbolic. Run it with `load_artifact.py` (copied there).

  Returns:
    out_dir.
  """
  os.makedirs(out_dir, exist_ok=True)
  # The artifact's weights are one file entry per layer, whatever the run trained with.
  params = stacked.unstack(params)
  model_cfg = dataclasses.replace(model_cfg, scan_layers=False)
  b = jax.export.symbolic_shape("b")[0]
  inputs = {
      "encode_video": (jax.ShapeDtypeStruct((b, num_frames, image_size, image_size, 3),
                                            jnp.float32),),
      "encode_text": (jax.ShapeDtypeStruct((b, max_text_len), jnp.int32),
                      jax.ShapeDtypeStruct((b, max_text_len), jnp.int32)),
  }
  functions = {}
  for name, fn in _encoders(model_cfg).items():
    flat = flatten(params, _FUNCTION_PARAMS[name])
    spec = {k: jax.ShapeDtypeStruct(np.shape(v), jnp.float32) for k, v in flat.items()}
    exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(spec, *inputs[name])
    with open(os.path.join(out_dir, f"{name}.jaxexport"), "wb") as f:
      f.write(exported.serialize())
    hf_io.write_safetensors(os.path.join(out_dir, f"{name}.safetensors"),
                            {k: _lazy(v) for k, v in flat.items()})
    functions[name] = {"inputs": [[str(d) for d in x.shape] for x in inputs[name]]}
  has_vocab = bool(vocab_path) and os.path.isfile(vocab_path)
  if has_vocab:
    shutil.copyfile(vocab_path, os.path.join(out_dir, "vocab.txt"))
  meta = {
      "model": "alpro", "num_frames": num_frames, "image_size": image_size,
      "max_text_len": max_text_len, "embed_dim": model_cfg.embed_dim,
      "hidden": model_cfg.text.hidden, "dtype": model_cfg.dtype,
      "pixel_mean": list(PIXEL_MEAN), "pixel_std": list(PIXEL_STD),
      "platforms": list(platforms), "tokenizer": "vocab.txt" if has_vocab else None,
      "functions": functions,
  }
  with open(os.path.join(out_dir, "artifact.json"), "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=2)
  shutil.copyfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), "artifact_loader.py"),
                  os.path.join(out_dir, "load_artifact.py"))
  return out_dir


def load_run_config(workdir: str):
  """The run's config (WORKDIR/config.json, written by launch.train) as a ConfigDict."""
  file = os.path.join(workdir, "config.json")
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{file} not found: launch.export needs a run directory written "
                            "by launch.train")
  with open(file, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


@dataclasses.dataclass
class RestoredRun:
  """A run's params (single-device CPU arrays) and what they need.

  Attributes:
    params: {collection: nested dict of float32 arrays}, every collection of the task.
  """
  step: int
  task: Any
  tokenizer: Any  # None for runs on random data
  vocab_path: str | None
  params: Any


def restore_params(config, workdir: str, step: int | None = None) -> RestoredRun:
  """Restores checkpoint `step` (default: latest) of a run onto one CPU device.

  Works from any sharded layout the run was saved in; nothing is gathered on an accelerator.
  """
  data_dir = config.data.dir or os.path.join(workdir, "data")
  text = data_setup.text_info(config, data_dir)
  task = task_lib.build(config, text)
  vocab = None
  if text.tokenizer is not None:
    vocab = data_setup.vocab_path(config, data_dir)
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices("cpu")[:1])
  rules = shd.rules_from_config(config.sharding_rules)
  step, _ = init_lib.checkpoint_param_shapes(workdir, -1 if step is None else step)
  params = {}
  for name in jax.eval_shape(task.init_collections, jax.random.PRNGKey(0)):
    params[name], _ = init_lib.load_run_params(
        workdir, lambda rng, name=name: task.init_collections(rng)[name], mesh, rules, step,
        collection=name)
  return RestoredRun(step, task, text.tokenizer, vocab, params)


def _export_alpro(run: RestoredRun, config, out_dir: str, platforms: Sequence[str]) -> dict:
  """ALPRO's export: OUT/bert, OUT/timesformer, OUT/alpro_heads.safetensors, OUT/artifact."""
  params, model = run.params["model"], run.task.model
  written = export_transformers(params, model.config, out_dir, run.tokenizer, run.vocab_path,
                                int(config.data.num_frames))
  written["artifact"] = export_artifact(
      params, model.config, os.path.join(out_dir, "artifact"),
      num_frames=int(config.data.num_frames), image_size=int(config.data.image_size),
      max_text_len=int(config.data.max_text_len), vocab_path=run.vocab_path,
      platforms=platforms)
  return written


def export_run(workdir: str, out_dir: str, step: int | None = None,
               platforms: Sequence[str] = PLATFORMS) -> dict:
  """Exports checkpoint `step` (default: latest) of a run to `out_dir`.

  The task writes what its `Task.export` writes (e.g. `clip_pretrain`: a transformers
  CLIPModel directory with its tokenizer); a task without an export of its own whose model is
  ALPRO's gets OUT/bert, OUT/timesformer, OUT/alpro_heads.safetensors and OUT/artifact. Then
  OUT/export.json: what was written, from which step. Peak memory: the params in float32 on
  one CPU device plus one converted tensor.

  Returns:
    The export.json contents.

  Raises:
    ValueError: the task has no export.
  """
  config = load_run_config(workdir)
  run = restore_params(config, workdir, step)
  summary = {"workdir": os.path.abspath(workdir), "step": int(run.step), "task": config.task}
  os.makedirs(out_dir, exist_ok=True)
  written = run.task.export(run.params, out_dir, platforms=tuple(platforms))
  if written is None and isinstance(getattr(run.task, "model", None), ALPRO):
    written = _export_alpro(run, config, out_dir, platforms)
  if written is None:
    raise ValueError(f"launch.export: task {config.task!r} has no export (its Task.export "
                     "returns None)")
  summary.update(written)
  with open(os.path.join(out_dir, "export.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  logging.info("exported step %d of %s to %s", run.step, workdir, out_dir)
  return summary
