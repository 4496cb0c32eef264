"""Export of a `prompt_clip_action` run (`launch.export`; `PromptClipActionTask.export`):

  OUT/clip/                      the frozen CLIP: the files of the `init.clip` directory (a
                                 transformers CLIPModel directory with its tokenizer)
  OUT/prompt_clip.safetensors    the learned prompt table ("prompts/prompts") and the temporal
                                 model ("temporal/..."), float32, flat "a/b/c" names
  OUT/prompt_clip.json           their config: prompt counts and layout, temporal sizes,
                                 temperature, frames per window, the run's class names
  OUT/artifact/                  `jax.export` functions, their params and `load_artifact.py`:
    encode_classes(params, ids int32 [c, L], slot int32 [c, L], eot_index int32 [c])
        -> float32 [c, D] L2-normalised prompted class features (CLIP text tower + prompts)
    classify(params, features float32 [b, T, D], class_features float32 [c, D])
        -> float32 [b, c] softmax(cos(temporal(features), class) / temperature)
    b and c are symbolic; L (the text context) and T (`model.num_frames`) are fixed.

`load_artifact.py` (a copy of `prompt_clip_loader.py`) runs the artifact with jax, numpy and
`tokenizers` only: `load(OUT/artifact).classify(features, class_names)`.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlp_jax.convert import artifact_loader
from vlp_jax.convert import clip as convert_clip
from vlp_jax.convert import hf_io
from vlp_jax.convert.export import flatten, unflatten
from vlp_jax.methods.prompt_clip import action
from vlp_jax.models import clip as clip_lib
from vlp_jax.models import layers

ARTIFACT_FORMAT = "prompt_clip_action"
ARTIFACT_VERSION = 1


def _lazy(leaf) -> hf_io.LazyTensor:
  return hf_io.LazyTensor(tuple(np.shape(leaf)), lambda: np.asarray(leaf, np.float32))


def _write(file: str, flat: dict[str, Any]) -> None:
  hf_io.write_safetensors(file, {k: _lazy(v) for k, v in flat.items()})


def _copy_clip(task, out_dir: str) -> str:
  """OUT/clip: the `init.clip` directory's files (the frozen CLIP is never trained, so its
  files are the exact weights the run used), plus tokenizer.json if that directory has none."""
  dst = os.path.join(out_dir, "clip")
  shutil.copytree(task.clip_dir, dst, dirs_exist_ok=True)
  if not os.path.isfile(os.path.join(dst, "tokenizer.json")):
    task.tokenizer.save_pretrained(dst)
  if not os.path.isfile(os.path.join(dst, "tokenizer.json")):
    raise ValueError(f"the CLIP tokenizer of {task.clip_dir!r} has no tokenizer.json (a fast "
                     "tokenizer is needed by the exported artifact)")
  return dst


def run_config(task) -> dict[str, Any]:
  """What `prompt_clip.json` and `artifact.json` record about the run's model and tokens."""
  m, tok = task.config.model, task.tokenizer
  pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
  unk = getattr(tok, "unk_token_id", None)
  return {
      "format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION,
      "prompts": {"prefix": int(m.prompts.prefix), "suffix": int(m.prompts.suffix),
                  "layout": str(m.prompts.layout), "template": task.template,
                  "table_rows": int(task.all_tokens.table_rows)},
      "temporal": {"layers": int(m.temporal.layers), "heads": int(m.temporal.heads),
                   "max_frames": int(m.temporal.max_frames)},
      "num_frames": task.num_frames, "temperature": task.temperature,
      "dim": int(task.clip.config.projection_dim),
      "context_length": int(task.clip.config.text.max_position),
      # The ids `models.prompts.build_prompt_tokens` used, so the loader builds the same rows.
      "tokens": {"sot": int(tok.bos_token_id), "eot": int(tok.eos_token_id), "pad": int(pad),
                 "unk": None if unk is None else int(unk)},
      "class_names": list(task.class_names), "dtype": str(m.dtype),
  }


def _functions(task):
  """encode_classes / classify over flat params; XLA attention (cuDNN kernels exist only on
  NVIDIA GPUs) and no rematerialisation (inference only)."""
  cfg = convert_clip.config_from_dir(task.clip_dir, dtype=str(task.config.model.dtype),
                                     attention="xla", remat="none")
  clip = clip_lib.CLIP(cfg)
  learner = task.prompt_learner
  temporal = task.temporal.clone(attention="xla", remat="none")
  temperature = task.temperature

  def encode_classes(flat_params, ids, slot, eot_index):
    p = unflatten(flat_params)
    text_tower = {n: v for n, v in p.items() if n != "prompts"}

    def app(*args, **kwargs):
      return clip.apply({"params": text_tower}, *args, **kwargs)

    embeds = app(ids, method=clip_lib.CLIP.embed_tokens)
    embeds = learner.apply({"params": p["prompts"]}, embeds, slot)
    return layers.l2_normalize(app(embeds, eot_index, method=clip_lib.CLIP.encode_text_embeds))

  def classify(flat_params, features, class_features):
    p = unflatten(flat_params)
    pooled = temporal.apply({"params": p.get("temporal", {})}, features.astype(jnp.float32))
    logits = layers.l2_normalize(pooled) @ class_features.astype(jnp.float32).T / temperature
    return jax.nn.softmax(logits, axis=-1)

  return encode_classes, classify


def export_artifact(task, params: dict[str, Any], out_dir: str, platforms: Sequence[str],
                    meta: dict[str, Any]) -> str:
  """Writes OUT/artifact (module docstring). Returns its directory."""
  os.makedirs(out_dir, exist_ok=True)
  encode_classes, classify = _functions(task)
  length, dim, frames = meta["context_length"], meta["dim"], meta["num_frames"]
  b, c = jax.export.symbolic_shape("b, c")
  flats = {
      "encode_classes": flatten({**{k: task._clip_host[k] for k in action.TEXT_PARAMS},
                                 "prompts": params["prompts"]}),
      "classify": flatten({k: params[k] for k in ("temporal",) if k in params}),
  }
  inputs = {
      "encode_classes": (jax.ShapeDtypeStruct((c, length), jnp.int32),
                         jax.ShapeDtypeStruct((c, length), jnp.int32),
                         jax.ShapeDtypeStruct((c,), jnp.int32)),
      "classify": (jax.ShapeDtypeStruct((b, frames, dim), jnp.float32),
                   jax.ShapeDtypeStruct((c, dim), jnp.float32)),
  }
  functions = {}
  for name, fn in (("encode_classes", encode_classes), ("classify", classify)):
    flat = flats[name]
    spec = {k: jax.ShapeDtypeStruct(np.shape(v), jnp.float32) for k, v in flat.items()}
    exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(spec, *inputs[name])
    with open(os.path.join(out_dir, f"{name}.jaxexport"), "wb") as f:
      f.write(exported.serialize())
    _write(os.path.join(out_dir, f"{name}.safetensors"), flat)
    functions[name] = {"inputs": [[str(d) for d in x.shape] for x in inputs[name]]}
  artifact_meta = dict(meta, platforms=list(platforms), functions=functions,
                       tokenizer=os.path.join("..", "clip", "tokenizer.json"))
  with open(os.path.join(out_dir, "artifact.json"), "w", encoding="utf-8") as f:
    json.dump(artifact_meta, f, indent=2)
  shutil.copyfile(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                               "prompt_clip_loader.py"),
                  os.path.join(out_dir, "load_artifact.py"))
  # Its artifact reader (`load_functions`, ALPRO's standalone loader's).
  shutil.copyfile(artifact_loader.__file__, os.path.join(out_dir, "artifact_loader.py"))
  return out_dir


def export_prompt_clip(task, params: dict[str, Any], out_dir: str, *,
                       platforms: Sequence[str]) -> dict[str, Any]:
  """Writes OUT/clip, OUT/prompt_clip.{safetensors,json} and OUT/artifact (module docstring).

  Args:
    task: the run's `PromptClipActionTask`.
    params: {"prompts": ..., "temporal": ... (absent with 0 layers)}, float32 host arrays.
    out_dir: the output directory (it exists).
    platforms: what the `jax.export` functions are lowered for.
  Returns:
    {"clip": dir, "prompt_clip": safetensors file, "prompt_clip_config": json file,
     "artifact": dir}.
  """
  written = {"clip": _copy_clip(task, out_dir)}
  meta = run_config(task)
  trained = flatten(params, [k for k in ("prompts", "temporal") if k in params])
  written["prompt_clip"] = os.path.join(out_dir, "prompt_clip.safetensors")
  _write(written["prompt_clip"], trained)
  written["prompt_clip_config"] = os.path.join(out_dir, "prompt_clip.json")
  with open(written["prompt_clip_config"], "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=2)
  written["artifact"] = export_artifact(task, params, os.path.join(out_dir, "artifact"),
                                        platforms, meta)
  return written
