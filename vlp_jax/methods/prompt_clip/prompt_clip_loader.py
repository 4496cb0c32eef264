"""Runs an exported Prompt-CLIP action classifier with jax, numpy and `tokenizers` only.

This file is self-contained: `launch.export` copies it into OUT/artifact as `load_artifact.py`,
so the artifact runs without this project installed.

  import sys; sys.path.insert(0, "OUT/artifact")
  from load_artifact import load
  model = load("OUT/artifact")
  probs = model.classify(features, ["moving left", "growing"])  # [B, C], rows sum to 1

  python load_artifact.py OUT/artifact --features clips.npy --classes "moving left" growing

`features` are float32 `[B, T, D]` CLIP image features of T frames per clip (the projected,
unnormalised image embeddings the run was trained on; T and D in artifact.json). Class names
may be any names, not only the run's (`model.meta["class_names"]`): their prompted text
features are computed by the exported text tower.

Directory layout (written by `vlp_jax.methods.prompt_clip.export`):
  artifact.json                  sizes, prompt layout, token ids, temperature, signatures
  encode_classes.jaxexport       (params, ids [c, L], slot [c, L], eot_index [c]) -> [c, D]
  encode_classes.safetensors     CLIP text tower + prompt table (float32, flat "a/b/c" names)
  classify.jaxexport             (params, features [b, T, D], class features [c, D]) -> [b, c]
  classify.safetensors           temporal model (empty without temporal layers)
  ../clip/tokenizer.json         the CLIP tokenizer (artifact.json "tokenizer", relative)
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

try:  # an exported artifact directory: export copies that module next to this one
  from artifact_loader import load_functions
except ImportError:  # inside vlp_jax
  from vlp_jax.convert.artifact_loader import load_functions


def prompt_tokens(encoded: list[list[int]], names: list[str], num_prefix: int, num_suffix: int,
                  context_length: int, layout: str, sot: int, eot: int, pad: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """ids, slot int32 `[C, L]` and eot_index int32 `[C]` of C names with P / Q prompt vectors.

  The same rows as `vlp_jax.models.prompts.build_prompt_tokens` (its copy: this file must run
  without the project): `[SOT] P slots <name tokens> Q slots [EOT] [pad ...]`; slot -1 = a real
  token, else the prompt table row ("shared": i / P + j; "official": the absolute position).

  Args:
    encoded: each name's token ids without start / end tokens.
  Raises:
    ValueError: a name whose tokens do not fit, naming it and its token count.
  """
  room = context_length - 2 - num_prefix - num_suffix
  c = len(names)
  ids = np.full((c, context_length), pad, np.int32)
  slot = np.full((c, context_length), -1, np.int32)
  eot_index = np.zeros((c,), np.int32)
  for i, (name, tokens) in enumerate(zip(names, encoded)):
    if len(tokens) > room:
      raise ValueError(f"class {name!r} has {len(tokens)} tokens; with {num_prefix} + "
                       f"{num_suffix} prompt vectors and the start / end tokens only {room} "
                       f"fit in the context of {context_length}")
    n = len(tokens)
    ids[i, 0] = sot
    ids[i, 1 + num_prefix:1 + num_prefix + n] = tokens
    end = 1 + num_prefix + n + num_suffix
    ids[i, end] = eot
    eot_index[i] = end
    prefix_pos = np.arange(1, 1 + num_prefix)
    suffix_pos = np.arange(1 + num_prefix + n, end)
    if layout == "shared":
      slot[i, prefix_pos] = np.arange(num_prefix)
      slot[i, suffix_pos] = num_prefix + np.arange(num_suffix)
    else:
      slot[i, prefix_pos] = prefix_pos
      slot[i, suffix_pos] = suffix_pos
  return ids, slot, eot_index


class PromptClipArtifact:
  """The exported class encoder and classifier with their params and tokenizer.

  Attributes:
    meta: artifact.json (class_names: the run's classes; num_frames, dim: T, D).
  """

  def __init__(self, directory: str):
    self.directory = directory
    self.meta, self._fns, self._params = load_functions(directory)
    self._tokenizer = None
    self._class_cache: dict[tuple[str, ...], np.ndarray] = {}

  def _tok(self):
    if self._tokenizer is None:
      from tokenizers import Tokenizer  # noqa: PLC0415  (text only)
      path = os.path.normpath(os.path.join(self.directory, self.meta["tokenizer"]))
      if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: the artifact reads the CLIP tokenizer "
                                "from the export's clip/ directory next to it")
      tok = Tokenizer.from_file(path)
      # Names are never cut or padded here: a name that does not fit is an error.
      tok.no_truncation()
      tok.no_padding()
      self._tokenizer = tok
    return self._tokenizer

  def tokenize(self, class_names: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class names -> (ids, slot) int32 `[C, L]`, eot_index int32 `[C]`, as in training.

    Raises:
      ValueError: no names, a name that is not a non-empty string, one with tokens the
        tokenizer does not know, one too long for the context with the prompts.
    """
    names = list(class_names)
    if not names:
      raise ValueError("classify needs at least one class name")
    for name in names:
      if not isinstance(name, str) or not name.strip():
        raise ValueError(f"class names must be non-empty strings, got {name!r}")
    template = self.meta["prompts"].get("template", "{}")
    texts = [template.format(n) for n in names]
    encoded = [e.ids for e in self._tok().encode_batch(texts, add_special_tokens=False)]
    t = self.meta["tokens"]
    for name, tokens in zip(names, encoded):
      if not tokens or (t["unk"] is not None and t["unk"] in tokens):
        raise ValueError(f"class {name!r} is unknown to the CLIP tokenizer: it encodes to "
                         f"{tokens} (no tokens, or the unknown token {t['unk']})")
    p = self.meta["prompts"]
    return prompt_tokens(encoded, texts, p["prefix"], p["suffix"], self.meta["context_length"],
                         p["layout"], t["sot"], t["eot"], t["pad"])

  def encode_classes(self, class_names: list[str]) -> np.ndarray:
    """float32 `[C, D]` L2-normalised prompted text features (cached per list of names)."""
    key = tuple(class_names)
    if key not in self._class_cache:
      out = self._fns["encode_classes"](self._params["encode_classes"], *self.tokenize(key))
      self._class_cache[key] = np.asarray(out)
    return self._class_cache[key]

  def classify_with(self, features: np.ndarray, class_features: np.ndarray) -> np.ndarray:
    """float32 features `[B, T, D]`, class features `[C, D]` -> probabilities `[B, C]`."""
    features = np.asarray(features, np.float32)
    t, d = self.meta["num_frames"], self.meta["dim"]
    if features.ndim != 3 or features.shape[1:] != (t, d):
      raise ValueError(f"features must have shape [B, {t}, {d}] (T frame features of width "
                       f"D per clip), got {list(features.shape)}")
    out = self._fns["classify"](self._params["classify"], features,
                                np.asarray(class_features, np.float32))
    return np.asarray(out)

  def classify(self, features: np.ndarray, class_names: list[str]) -> np.ndarray:
    """float32 frame features `[B, T, D]`, C class names -> float32 probabilities `[B, C]`
    (softmax of cos(clip, class) / temperature)."""
    return self.classify_with(features, self.encode_classes(class_names))


def load(directory: str) -> PromptClipArtifact:
  """The artifact in `directory` (OUT/artifact)."""
  return PromptClipArtifact(directory)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("directory")
  parser.add_argument("--features", required=True, help=".npy file: float32 [B, T, D]")
  parser.add_argument("--classes", nargs="*", default=None,
                      help="class names (default: the run's)")
  args = parser.parse_args()
  model = load(args.directory)
  names = args.classes or model.meta["class_names"]
  probs = model.classify(np.load(args.features), names)
  print(json.dumps({"classes": names, "probabilities": probs.tolist()}))


if __name__ == "__main__":
  main()
