"""Name and layout rules between PyTorch checkpoint tensors and our Flax params.

One `Rule` per tensor says where it lives on both sides and how its layout differs, so the
same table drives import (checkpoint -> params) and export (params -> checkpoint):

  linear  torch Linear weight `[out, in]` <-> our full-shape kernel `[*in_dims, *out_dims]`
          (e.g. a query kernel `[D, heads, head_dim]`, an output kernel `[heads, head_dim, D]`)
  bias    `[out]` <-> `[*out_dims]`
  conv    torch Conv2d weight `[D, C, kh, kw]` <-> flax Conv kernel `[kh, kw, C, D]`
  lead1   a parameter with a leading singleton dim `[1, *shape]` <-> `[*shape]`
  same    identical layout (embedding tables, LayerNorm weight -> scale, bias)
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np

from vlp_jax.convert import hf_io

KINDS = ("linear", "bias", "conv", "lead1", "same")


@dataclasses.dataclass(frozen=True)
class Rule:
  """One tensor: checkpoint name (without the model prefix), our param path, layout kind.

  `n_in` is the number of leading (input) dims of our kernel for kind "linear".
  """
  hf: str
  ours: tuple[str, ...]
  kind: str = "same"
  n_in: int = 1

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"unknown layout kind {self.kind!r}; expected one of {KINDS}")


def hf_shape(rule: Rule, shape: Iterable[int]) -> tuple[int, ...]:
  """The checkpoint shape of a tensor whose param has shape `shape`."""
  shape = tuple(int(d) for d in shape)
  if rule.kind == "linear":
    n_in = int(np.prod(shape[:rule.n_in]))
    n_out = int(np.prod(shape[rule.n_in:]))
    return (n_out, n_in)
  if rule.kind == "bias":
    return (int(np.prod(shape)),)
  if rule.kind == "conv":
    kh, kw, c, d = shape
    return (d, c, kh, kw)
  if rule.kind == "lead1":
    return (1,) + shape
  return shape


def to_ours(rule: Rule, value: np.ndarray, shape: Iterable[int]) -> np.ndarray:
  """Checkpoint tensor -> our param of shape `shape` (float32)."""
  shape = tuple(int(d) for d in shape)
  value = np.asarray(value, np.float32)
  if rule.kind == "linear":
    return np.ascontiguousarray(value.T).reshape(shape)
  if rule.kind == "conv":
    return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
  return value.reshape(shape)


def to_hf(rule: Rule, value: np.ndarray) -> np.ndarray:
  """Our param -> checkpoint tensor (float32)."""
  value = np.asarray(value, np.float32)
  target = hf_shape(rule, value.shape)
  if rule.kind == "linear":
    return np.ascontiguousarray(value.reshape(target[1], target[0]).T)
  if rule.kind == "conv":
    return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
  return value.reshape(target)


def import_rules(rules: Iterable[Rule], src: hf_io.TensorSource, prefix: str, params: dict,
                 root: tuple[str, ...] = ()) -> None:
  """Fills `params[root + rule.ours]` from `src[prefix + rule.hf]` for every rule, in place.

  The expected checkpoint shape follows from our param's shape, so a mismatch names the
  tensor and both shapes (`TensorSource.take`), and a param we lack names our path (`assign`).
  """
  for rule in rules:
    path = root + rule.ours
    shape = hf_io.get_leaf(params, path).shape
    value = src.take(prefix + rule.hf, hf_shape(rule, shape))
    hf_io.assign(params, path, to_ours(rule, value, shape))


def export_rules(rules: Iterable[Rule], params: Mapping, prefix: str,
                 root: tuple[str, ...] = ()) -> dict[str, hf_io.LazyTensor]:
  """`{prefix + rule.hf: LazyTensor}` from `params[root + rule.ours]`, converted when written."""
  out = {}
  for rule in rules:
    leaf = hf_io.get_leaf(params, root + rule.ours)
    out[prefix + rule.hf] = hf_io.LazyTensor(
        hf_shape(rule, np.shape(leaf)),
        lambda leaf=leaf, rule=rule: to_hf(rule, np.asarray(leaf)))
  return out


def linear(hf: str, ours: tuple[str, ...], n_in: int = 1, bias: bool = True) -> list[Rule]:
  """Rules for a torch Linear `hf` (`.weight`, `.bias`) <-> our dense `ours` (kernel, bias)."""
  rules = [Rule(f"{hf}.weight", ours + ("kernel",), "linear", n_in)]
  if bias:
    rules.append(Rule(f"{hf}.bias", ours + ("bias",), "bias"))
  return rules


def layer_norm(hf: str, ours: tuple[str, ...]) -> list[Rule]:
  """Rules for a torch LayerNorm (`.weight`, `.bias`) <-> flax LayerNorm (scale, bias)."""
  return [Rule(f"{hf}.weight", ours + ("scale",)), Rule(f"{hf}.bias", ours + ("bias",))]
