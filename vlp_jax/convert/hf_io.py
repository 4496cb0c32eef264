"""Reading and writing `transformers`-format checkpoint directories.

A directory as written by `save_pretrained`: `config.json` plus the weights in
`model.safetensors`, a sharded `model.safetensors.index.json`, or `pytorch_model.bin`
(read with torch, which is imported only then). Everything here is numpy; the
per-architecture converters (`bert.py`, `timesformer.py`, `clip.py`) map names and
layouts, and every mismatch surfaces as a `ConversionError` naming the tensor.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import struct
from typing import Any
from collections.abc import Callable, Iterable, Mapping

import jax
import ml_dtypes
import numpy as np
from safetensors.numpy import load_file

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
TORCH_NAME = "pytorch_model.bin"
TORCH_INDEX_NAME = "pytorch_model.bin.index.json"


class ConversionError(ValueError):
  """A checkpoint does not fit the model it is converted to or from."""


def _shape(x) -> tuple[int, ...]:
  return tuple(int(d) for d in (x.shape if hasattr(x, "shape") else np.shape(x)))


# ----------------------------------------------------------------------------- reading

def _read_json(file: str) -> dict:
  try:
    with open(file, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ConversionError(f"{file} is not valid JSON: {e}") from e
  if not isinstance(data, dict):
    raise ConversionError(f"{file} must hold a JSON object, got {type(data).__name__}")
  return data


def _extra_dtypes() -> dict[str, Any]:
  """safetensors dtype codes numpy cannot name natively (ml_dtypes ships with jax)."""
  return {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
          "F8_E5M2": ml_dtypes.float8_e5m2}


def _read_safetensors_raw(file: str) -> dict[str, np.ndarray]:
  """Parses a safetensors file by hand; used when a dtype (bf16, fp8) is not numpy's."""
  std = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
         "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
  std.update(_extra_dtypes())
  with open(file, "rb") as f:
    blob = f.read()
  (n,) = struct.unpack("<Q", blob[:8])
  header = json.loads(blob[8:8 + n])
  base = 8 + n
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in std:
      raise ConversionError(f"{file}: tensor {name!r} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    if base + end > len(blob):
      raise ConversionError(f"{file} is truncated: tensor {name!r} ends at byte "
                            f"{base + end} but the file has {len(blob)} bytes")
    out[name] = np.frombuffer(blob[base + start:base + end],
                              dtype=std[info["dtype"]]).reshape(info["shape"])
  return out


def _read_safetensors(file: str) -> dict[str, np.ndarray]:
  try:
    return load_file(file)
  except TypeError:
    # numpy has no bfloat16 / fp8 dtype; fall back to parsing the file directly.
    try:
      return _read_safetensors_raw(file)
    except ConversionError:
      raise
    except Exception as e:  # a malformed header in the fallback path
      raise ConversionError(f"cannot read {file} (corrupt or truncated safetensors "
                            f"file): {e}") from e
  except Exception as e:  # SafetensorError, OSError: truncated or corrupt file
    raise ConversionError(f"cannot read {file} (corrupt or truncated safetensors "
                          f"file): {e}") from e


def _read_torch(file: str) -> dict[str, np.ndarray]:
  try:
    import torch  # noqa: PLC0415  (optional, heavy: only for PyTorch pickles)
  except ImportError as e:
    raise ConversionError(f"{file} is a PyTorch pickle; reading it needs torch "
                          "(pip install torch), or convert it to safetensors") from e
  try:
    state = torch.load(file, map_location="cpu", weights_only=True)
  except Exception as e:
    raise ConversionError(f"cannot read {file} (corrupt or truncated PyTorch "
                          f"checkpoint): {e}") from e
  if isinstance(state, Mapping) and "state_dict" in state and not any(
      hasattr(v, "shape") for v in state.values()):
    state = state["state_dict"]
  out = {}
  for name, t in state.items():
    if not hasattr(t, "detach"):
      continue
    t = t.detach().cpu()
    if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64,
                                                 torch.float16):
      t = t.float()  # bf16 / fp8 have no numpy dtype
    out[name] = t.numpy()
  return out


def _read_index(index_file: str, reader) -> dict[str, np.ndarray]:
  index = _read_json(index_file)
  weight_map = index.get("weight_map")
  if not isinstance(weight_map, dict):
    raise ConversionError(f"{index_file} has no 'weight_map' object")
  folder = os.path.dirname(index_file)
  tensors: dict[str, np.ndarray] = {}
  for shard in sorted(set(weight_map.values())):
    shard_file = os.path.join(folder, shard)
    if not os.path.isfile(shard_file):
      raise ConversionError(f"{index_file} names shard {shard!r}, which does not exist")
    tensors.update(reader(shard_file))
  missing = sorted(set(weight_map) - set(tensors))
  if missing:
    raise ConversionError(f"{index_file} lists tensors that no shard holds: "
                          f"{missing[:10]}{' ...' if len(missing) > 10 else ''}")
  return tensors


def _rename_legacy(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """TF-era names (`LayerNorm.gamma` / `.beta`, e.g. the original bert-base .bin) -> torch's."""
  out = {}
  for name, value in tensors.items():
    if name.endswith(".gamma") and "LayerNorm" in name:
      name = name[:-len(".gamma")] + ".weight"
    elif name.endswith(".beta") and "LayerNorm" in name:
      name = name[:-len(".beta")] + ".bias"
    out[name] = value
  return out


def load_pretrained(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """Reads a `save_pretrained` directory.

  Args:
    path: a local directory with `config.json` and `model.safetensors`,
      `model.safetensors.index.json` (+ shards) or `pytorch_model.bin`.

  Returns:
    (config, tensors): the parsed config.json and every tensor by its checkpoint name,
    as numpy arrays in their stored dtype (bf16 / fp8 as ml_dtypes arrays from
    safetensors, float32 from .bin).

  Raises:
    ConversionError: missing directory or config, no weights file, a corrupt or
      truncated weights file (the message names the file).
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise ConversionError(f"checkpoint directory {path!r} does not exist")
  config_file = os.path.join(path, CONFIG_NAME)
  if not os.path.isfile(config_file):
    raise ConversionError(f"{path!r} has no {CONFIG_NAME}; expected a directory written "
                          "by transformers' save_pretrained")
  config = _read_json(config_file)
  candidates = [
      (SAFETENSORS_NAME, _read_safetensors),
      (SAFETENSORS_INDEX_NAME, lambda f: _read_index(f, _read_safetensors)),
      (TORCH_NAME, _read_torch),
      (TORCH_INDEX_NAME, lambda f: _read_index(f, _read_torch)),
  ]
  for name, reader in candidates:
    file = os.path.join(path, name)
    if os.path.isfile(file):
      return config, _rename_legacy(reader(file))
  raise ConversionError(f"{path!r} has no weights file (looked for "
                        f"{', '.join(n for n, _ in candidates)})")


def check_architecture(config: Mapping, model_types: tuple[str, ...], path: str) -> None:
  """Fails unless `config['model_type']` is one of `model_types`.

  Raises:
    ConversionError naming the checkpoint's model_type and architectures and the
    expected model types.
  """
  model_type = config.get("model_type")
  if model_type not in model_types:
    raise ConversionError(
        f"{path}: config.json has model_type={model_type!r} "
        f"(architectures={config.get('architectures')}), expected one of "
        f"{list(model_types)}")


class TensorSource:
  """The tensors of one checkpoint, taken one by one by a converter.

  `take` marks a tensor used, so after a conversion `unused()` lists what the model
  did not need (a pooler, a classification head, ...): the caller logs it.
  """

  def __init__(self, tensors: Mapping[str, np.ndarray], source: str = "checkpoint"):
    self.tensors = dict(tensors)
    self.source = source
    self._used: set[str] = set()

  def has(self, name: str) -> bool:
    return name in self.tensors

  def names(self) -> list[str]:
    return sorted(self.tensors)

  def take(self, name: str, shape: Iterable[int] | None = None) -> np.ndarray:
    """The tensor `name` as a float32 numpy array.

    Args:
      name: the checkpoint name, e.g. 'encoder.layer.0.attention.self.query.weight'.
      shape: the shape it must have (checkpoint layout), or None for any.

    Raises:
      ConversionError: the tensor is missing (the message lists near names) or its
        shape is not `shape` (the message names both shapes).
    """
    if name not in self.tensors:
      near = difflib.get_close_matches(name, list(self.tensors), n=5, cutoff=0.6)
      raise ConversionError(f"{self.source}: tensor {name!r} is missing"
                            + (f"; near names: {near}" if near else ""))
    value = np.asarray(self.tensors[name])
    if shape is not None and _shape(value) != tuple(int(d) for d in shape):
      raise ConversionError(
          f"{self.source}: tensor {name!r} has shape {_shape(value)} in the checkpoint, "
          f"expected {tuple(int(d) for d in shape)}")
    self._used.add(name)
    return np.asarray(value, dtype=np.float32)

  def unused(self) -> list[str]:
    """Sorted names never taken."""
    return sorted(set(self.tensors) - self._used)


# ----------------------------------------------------------------------------- writing

@dataclasses.dataclass(frozen=True)
class LazyTensor:
  """A tensor converted only when it is written (`make()` -> array of `shape`).

  Writers hold one converted tensor at a time, so an export needs about the size of the
  params plus one tensor of memory.
  """
  shape: tuple[int, ...]
  make: Callable[[], np.ndarray]


def write_safetensors(file: str, tensors: Mapping[str, Any],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Writes float32 tensors (arrays or `LazyTensor`s) to a safetensors file, one at a time.

  Unlike `safetensors.numpy.save_file`, which first turns every tensor into bytes, this
  streams each tensor to disk as it is converted.
  """
  names = sorted(tensors)
  header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
  offset = 0
  for name in names:
    shape = _shape(tensors[name])
    size = 4 * int(np.prod(shape, dtype=np.int64))
    header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
    offset += size
  blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
  blob += b" " * (-len(blob) % 8)  # the format pads the header to 8-byte alignment
  tmp = file + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name in names:
      value = tensors[name]
      array = value.make() if isinstance(value, LazyTensor) else value
      array = np.asarray(array, dtype=np.float32, order="C")  # keeps 0-d arrays 0-d
      if list(_shape(array)) != header[name]["shape"]:
        raise ConversionError(f"tensor {name!r} was announced with shape "
                              f"{tuple(header[name]['shape'])} but has {_shape(array)}")
      f.write(memoryview(array).cast("B"))
  os.replace(tmp, file)


def save_pretrained(path: str, config: Mapping, tensors: Mapping[str, Any]) -> None:
  """Writes `path/config.json` and `path/model.safetensors` (float32, contiguous).

  Args:
    path: directory, created if needed; existing files of the same names are replaced.
    config: the transformers config as a JSON-serialisable dict.
    tensors: checkpoint name -> array (any float dtype; stored as float32) or `LazyTensor`.
  """
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as f:
    json.dump(dict(config), f, indent=2, sort_keys=True)
    f.write("\n")
  # transformers checks this metadata key to accept the file as a PyTorch checkpoint.
  write_safetensors(os.path.join(path, SAFETENSORS_NAME), tensors, {"format": "pt"})


# ----------------------------------------------------------------------------- params

def _format_path(path: tuple[str, ...]) -> str:
  return "/".join(str(p) for p in path)


def get_leaf(params: Mapping, path: tuple[str, ...]):
  """The leaf at `path` of a nested dict; ConversionError naming the path if absent."""
  node = params
  for i, key in enumerate(path):
    if not isinstance(node, Mapping) or key not in node:
      raise ConversionError(f"our params have no entry {_format_path(path[:i + 1])!r}")
    node = node[key]
  return node


def assign(params: dict, path: tuple[str, ...], value: np.ndarray) -> None:
  """Replaces the leaf at `path` (in place) with `value`, after a shape check.

  Args:
    params: nested dict of arrays or `jax.ShapeDtypeStruct`s (e.g. from
      `jax.eval_shape(module.init, ...)`); the existing leaf gives the expected shape.
    path: keys from the root, e.g. ('encoder', 'layer_0', 'attention', 'query', 'kernel').
    value: the new leaf.

  Raises:
    ConversionError naming our param path and both shapes when they differ, or the
    path when it does not exist.
  """
  if not path:
    raise ConversionError("assign needs a non-empty param path")
  parent = get_leaf(params, path[:-1]) if len(path) > 1 else params
  if not isinstance(parent, dict) or path[-1] not in parent:
    raise ConversionError(f"our params have no entry {_format_path(path)!r}")
  old = parent[path[-1]]
  if isinstance(old, Mapping):
    raise ConversionError(f"our param {_format_path(path)!r} is a subtree, not a leaf")
  if _shape(old) != _shape(value):
    raise ConversionError(f"param {_format_path(path)!r}: converted value has shape "
                          f"{_shape(value)}, our model expects {_shape(old)}")
  dtype = getattr(old, "dtype", np.float32)
  parent[path[-1]] = np.asarray(value, dtype=dtype)


def unfilled(params: Mapping, prefix: tuple[str, ...] = ()) -> list[str]:
  """Paths of leaves that are still `jax.ShapeDtypeStruct` placeholders."""
  out = []
  for key, value in params.items():
    if isinstance(value, Mapping):
      out.extend(unfilled(value, prefix + (key,)))
    elif isinstance(value, jax.ShapeDtypeStruct):
      out.append(_format_path(prefix + (key,)))
  return out


def to_mutable(tree: Any) -> Any:
  """A deep copy of the nested-dict structure (leaves shared), so `assign` is safe."""
  if isinstance(tree, Mapping):
    return {k: to_mutable(v) for k, v in tree.items()}
  return tree
