"""Logical-axis sharding rules and host-local -> global array movement.

Every parameter and large activation of `vlp_jax.models` carries logical axis names
(`batch`, `embed`, `heads`, ...). Config `sharding_rules` maps them to mesh axes; this module is
the one place that turns those names into `NamedSharding`s and host batches into global arrays.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = tuple[tuple[str, Any], ...]


def rules_from_config(rules: Sequence[Sequence[Any]]) -> Rules:
  """Normalises config `sharding_rules` (lists from the command line) to tuples."""
  out = []
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(f"sharding_rules entry {rule!r} must be (logical_axis, mesh_axes)")
    name, axes = rule
    out.append((str(name), tuple(axes) if isinstance(axes, (list, tuple)) else axes))
  return tuple(out)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Context in which models are traced: the mesh and the logical rules are in scope."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def logical_to_sharding(tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """Maps a tree of `nn.LogicallyPartitioned` boxes (or logical PartitionSpecs) to shardings.

  Args:
    tree: e.g. `jax.eval_shape(model.init, ...)` output; unboxed leaves are replicated.
  Returns:
    A tree of `NamedSharding` with the boxes removed.
  """
  specs = nn.get_partition_spec(tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 1) -> NamedSharding:
  """Sharding of an array whose leading dimension is the global batch."""
  spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
  return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_size_per_process(global_batch: int, mesh: Mesh, rules: Rules) -> int:
  """Rows of the global batch that this process loads.

  Raises:
    ValueError: the global batch does not divide over the batch-sharding devices or processes.
  """
  spec = nn.logical_to_mesh_axes(("batch",), rules)[0]
  axes = spec if isinstance(spec, tuple) else (() if spec is None else (spec,))
  shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
  if global_batch % shards:
    raise ValueError(f"batch size {global_batch} is not divisible by the {shards} devices "
                     f"it is sharded over (mesh axes {axes})")
  if global_batch % jax.process_count():
    raise ValueError(f"batch size {global_batch} is not divisible by {jax.process_count()} "
                     "processes")
  return global_batch // jax.process_count()


def host_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules,
                   keys: Sequence[str] | None = None) -> dict[str, jax.Array]:
  """Assembles host-local batch rows into global arrays sharded along `batch`.

  Each process passes its own rows (leading dimension = global batch / process count); the
  result's leading dimension is the global batch. Non-numeric entries (ids, strings) are dropped.
  """
  out = {}
  for k, v in batch.items():
    if keys is not None and k not in keys:
      continue
    v = np.asarray(v)
    if v.dtype.kind not in "biuf":
      continue
    out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, rules, v.ndim), v)
  return out
