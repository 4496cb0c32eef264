"""Logical-axis sharding rules and host-local -> global array movement.

Every parameter and large activation of `vlp_jax.models` carries logical axis names
(`batch`, `embed`, `heads`, ...). Config `sharding_rules` maps them to mesh axes; this module is
the one place that turns those names into `NamedSharding`s and host batches into global arrays.
"""
from __future__ import annotations

import contextlib
from typing import Any
from collections.abc import Callable, Iterator, Mapping, Sequence

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


def sharded_init(init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh,
                 rules: Rules) -> tuple[Any, Any]:
  """Runs `init_fn(rng)` (logically boxed leaves) straight into its sharded layout.

  Nothing is ever materialised whole on one device: the shapes come from `jax.eval_shape`,
  the values from a jit with the boxes' shardings as `out_shardings`.

  Returns:
    (unboxed values, matching `NamedSharding`s).
  """
  with activate(mesh, rules):
    abstract = jax.eval_shape(init_fn, rng)
    shardings = logical_to_sharding(abstract, mesh, rules)
    values = jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=shardings)(rng)
  # The shardings of the values themselves: their tree matches `values` exactly (subtrees
  # without arrays, e.g. optax's MaskedNode for frozen leaves, have no sharding).
  return values, jax.tree.map(lambda x: x.sharding, values)


def abstract_sharded(init_fn: Callable[[jax.Array], Any], mesh: Mesh, rules: Rules
                     ) -> tuple[Any, Any]:
  """(tree of `jax.ShapeDtypeStruct` with shardings, shardings) of `init_fn`'s output, unboxed;
  `init_fn` is traced, never run."""
  with activate(mesh, rules):
    abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    shardings = logical_to_sharding(abstract, mesh, rules)
  structs = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         nn.unbox(abstract), shardings)
  return structs, shardings


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


def host_to_global(batch: Mapping[str, Any], mesh: Mesh, rules: Rules) -> dict[str, Any]:
  """Assembles host-local batch rows into global arrays sharded along `batch`.

  `batch` is a (nested) dict of numeric numpy arrays, e.g. {stream: {key: array}}. Each process
  passes its own rows (leading dimension = global batch / process count); the result's leading
  dimension is the global batch.

  Raises:
    TypeError: a leaf that is not a numeric (bool, int, float) array; the message names its key
      path. Select the device keys first (strings and ids stay on the host).
  """
  def convert(path: str, value):
    if isinstance(value, Mapping):
      return {k: convert(f"{path}/{k}" if path else str(k), v) for k, v in value.items()}
    v = np.asarray(value)
    if v.dtype.kind not in "biuf":
      raise TypeError(f"batch entry {path!r} has dtype {v.dtype}, which cannot go to the "
                      "devices; leave it out of the stream's device keys")
    return jax.make_array_from_process_local_data(batch_sharding(mesh, rules, v.ndim), v)
  return convert("", batch)
