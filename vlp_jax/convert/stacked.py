"""Stacked (scanned) layers <-> one entry per layer, at the import / export boundary.

With `model.scan_layers` the encoders keep one block whose params carry a leading layer axis,
under `layers_from_{start}/layer/...` (`models/layers.layer_stack`); checkpoints of Hugging
Face and every converter in this package use `layer_{i}/...`. `unstack` turns the first into
the second; `stack_like` turns a per-layer tree back into the layout of a model's params.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import numpy as np

_STACKED = re.compile(r"^layers_from_(\d+)$")


def is_stacked_path(path: str) -> bool:
  """Whether a "/"-joined parameter path lies inside scanned layers."""
  return any(_STACKED.match(part) for part in path.split("/"))


def is_stacked(params: Mapping) -> bool:
  """Whether any level of `params` holds scanned layers."""
  return any(_STACKED.match(k) or (isinstance(v, Mapping) and is_stacked(v))
             for k, v in params.items())


def unstack(params: Mapping) -> dict:
  """`params` with every `layers_from_{s}/layer/<leaf [n, ...]>` replaced by
  `layer_{s}/<leaf[0]>` .. `layer_{s+n-1}/<leaf[n-1]>` (numpy or jax slices)."""
  out = {}
  for k, v in params.items():
    m = _STACKED.match(k)
    if m and isinstance(v, Mapping):
      start = int(m.group(1))
      body = v["layer"]
      n = _depth(body)
      for i in range(n):
        out[f"layer_{start + i}"] = jax.tree.map(lambda x, i=i: x[i], body)
    elif isinstance(v, Mapping):
      out[k] = unstack(v)
    else:
      out[k] = v
  return out


def stack_like(params: Mapping, like: Mapping) -> dict:
  """`params` (one entry per layer) in the layout of `like` (a model's params, stacked or not):
  wherever `like` has `layers_from_{s}`, the `layer_{i}` entries i >= s it covers are stacked
  (as numpy) into it."""
  out = {}
  for k, v in like.items():
    m = _STACKED.match(k)
    if m and isinstance(v, Mapping):
      start, n = int(m.group(1)), _depth(v["layer"])
      missing = [f"layer_{i}" for i in range(start, start + n) if f"layer_{i}" not in params]
      if missing:
        raise KeyError(f"cannot stack {k}: no {', '.join(missing)}")
      layers = [params[f"layer_{i}"] for i in range(start, start + n)]
      out[k] = {"layer": jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]),
                                      *layers)}
    elif isinstance(v, Mapping):
      out[k] = stack_like(params[k], v)
    else:
      out[k] = params[k]
  return out


def _depth(tree: Mapping) -> int:
  leaf = tree
  while isinstance(leaf, Mapping):
    leaf = next(iter(leaf.values()))
  return int(np.shape(leaf)[0])
