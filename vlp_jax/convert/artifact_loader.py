"""Runs an exported ALPRO encoder artifact with jax + numpy (+ `tokenizers` for text) only.

This file is self-contained: `launch.export` copies it into the artifact directory as
`load_artifact.py`, so the artifact runs without this project installed.

  from load_artifact import Artifact
  art = Artifact("OUT/artifact")
  t = art.encode_text(["a red circle moves left"])    # {"feature": [B, E], "tokens": [B, L, D]}
  v = art.encode_frames(uint8_frames)                  # [B, T, H, W, 3] RGB, already resized
  similarity = t["feature"] @ v["feature"].T           # features are L2-normalised (VTC)

  python load_artifact.py OUT/artifact --text "a red circle moves left"   # prints features

Directory layout (written by `vlp_jax.convert.export.export_artifact`):
  artifact.json                 sizes, normalisation, function signatures
  encode_video.jaxexport        serialized `jax.export.Exported`, symbolic batch dimension
  encode_video.safetensors      its params (float32, flat "a/b/c" names)
  encode_text.jaxexport, encode_text.safetensors
  vocab.txt                     BERT WordPiece vocabulary (lowercasing)
"""
from __future__ import annotations

import argparse
import json
import os
import struct

import jax
import numpy as np
from jax import export as jax_export

_DTYPES = {"F32": np.float32, "F16": np.float16, "I32": np.int32, "I64": np.int64}


def read_safetensors(file: str) -> dict[str, np.ndarray]:
  """All tensors of a safetensors file as numpy arrays (no safetensors package needed)."""
  with open(file, "rb") as f:
    blob = f.read()
  if len(blob) < 8:
    raise ValueError(f"{file} is not a safetensors file (too short)")
  (n,) = struct.unpack("<Q", blob[:8])
  if 8 + n > len(blob):
    raise ValueError(f"{file} is truncated (header of {n} bytes, file of {len(blob)})")
  header = json.loads(blob[8:8 + n])
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    start, end = info["data_offsets"]
    if 8 + n + end > len(blob):
      raise ValueError(f"{file} is truncated: tensor {name!r} ends past the end of the file")
    out[name] = np.frombuffer(blob[8 + n + start:8 + n + end],
                              dtype=_DTYPES[info["dtype"]]).reshape(info["shape"])
  return out


def load_functions(directory: str) -> tuple[dict, dict, dict]:
  """An artifact directory's `artifact.json`, and per function it lists the jitted
  `jax.export` call and its params (`<name>.jaxexport`, `<name>.safetensors`)."""
  with open(os.path.join(directory, "artifact.json"), encoding="utf-8") as f:
    meta = json.load(f)
  fns, params = {}, {}
  for name in meta["functions"]:
    with open(os.path.join(directory, f"{name}.jaxexport"), "rb") as f:
      exported = jax_export.deserialize(bytearray(f.read()))
    fns[name] = jax.jit(exported.call)
    params[name] = read_safetensors(os.path.join(directory, f"{name}.safetensors"))
  return meta, fns, params


class Artifact:
  """The exported `encode_video` / `encode_text` functions with their params and tokenizer.

  Both return {"feature": float32 [B, E] (L2-normalised VTC projection of the CLS token),
  "tokens": float32 encoder outputs}: video tokens [B, 1 + N, D] (CLS + temporal mean of
  patch tokens), text tokens [B, L, D]. B is free (each new B compiles once).
  """

  def __init__(self, directory: str):
    self.directory = directory
    self.meta, self._fns, self._params = load_functions(directory)
    self._tokenizer = None

  # ------------------------------------------------------------------- video
  def preprocess(self, frames: np.ndarray) -> np.ndarray:
    """uint8 RGB `[B, T, H, W, 3]` (already at the model's size) -> normalised float32."""
    frames = np.asarray(frames)
    mean = np.asarray(self.meta["pixel_mean"], np.float32)
    std = np.asarray(self.meta["pixel_std"], np.float32)
    return ((frames.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)

  def encode_video(self, video: np.ndarray) -> dict[str, np.ndarray]:
    """Normalised float32 video `[B, T, H, W, 3]` (T, H, W as in artifact.json)."""
    video = np.asarray(video, np.float32)
    want = (self.meta["num_frames"], self.meta["image_size"], self.meta["image_size"], 3)
    if video.ndim != 5 or video.shape[1:] != want:
      raise ValueError(f"video must have shape [B, {', '.join(map(str, want))}], "
                       f"got {list(video.shape)}")
    out = self._fns["encode_video"](self._params["encode_video"], video)
    return {k: np.asarray(v) for k, v in out.items()}

  def encode_frames(self, frames: np.ndarray) -> dict[str, np.ndarray]:
    """uint8 RGB frames `[B, T, H, W, 3]` -> `encode_video(preprocess(frames))`."""
    return self.encode_video(self.preprocess(frames))

  # ------------------------------------------------------------------- text
  def tokenize(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Captions -> (ids, mask) int32 `[B, L]`: `[CLS] tokens [SEP] [PAD]...`, as in training."""
    if self._tokenizer is None:
      vocab = os.path.join(self.directory, "vocab.txt")
      if not os.path.isfile(vocab):
        raise FileNotFoundError(f"{vocab} not found: this artifact has no tokenizer; use "
                                "encode_text_ids with token ids")
      from tokenizers import BertWordPieceTokenizer  # noqa: PLC0415  (optional)
      tok = BertWordPieceTokenizer(vocab, lowercase=True)
      length = int(self.meta["max_text_len"])
      tok.enable_truncation(length)
      tok.enable_padding(length=length, pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")
      self._tokenizer = tok
    enc = self._tokenizer.encode_batch(list(captions))
    ids = np.asarray([e.ids for e in enc], np.int32)
    mask = np.asarray([e.attention_mask for e in enc], np.int32)
    return ids, mask

  def encode_text_ids(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """int32 ids and mask `[B, L]` (L = max_text_len in artifact.json)."""
    ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
    length = int(self.meta["max_text_len"])
    if ids.ndim != 2 or ids.shape[1] != length or mask.shape != ids.shape:
      raise ValueError(f"ids and mask must both have shape [B, {length}], got "
                       f"{list(ids.shape)} and {list(mask.shape)}")
    out = self._fns["encode_text"](self._params["encode_text"], ids, mask)
    return {k: np.asarray(v) for k, v in out.items()}

  def encode_text(self, captions: list[str]) -> dict[str, np.ndarray]:
    """Captions -> `encode_text_ids(*tokenize(captions))`."""
    return self.encode_text_ids(*self.tokenize(captions))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("directory")
  parser.add_argument("--text", action="append", default=[], help="caption (repeatable)")
  parser.add_argument("--video", help=".npy file: uint8 frames [B, T, H, W, 3]")
  args = parser.parse_args()
  art = Artifact(args.directory)
  result = {}
  if args.text:
    result["text_feature"] = art.encode_text(args.text)["feature"].tolist()
  if args.video:
    result["video_feature"] = art.encode_frames(np.load(args.video))["feature"].tolist()
  print(json.dumps(result))


if __name__ == "__main__":
  main()
