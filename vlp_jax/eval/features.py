"""Runs an embedding function over an eval loader and keeps the features on device."""
from __future__ import annotations

from typing import Any
from collections.abc import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from vlp_jax.parallel import sharding as shd


def collect(fn: Callable[[Any, dict], Any], params: Any, batches: Iterable[dict], mesh,
            rules) -> Any:
  """Applies `fn(params, global_batch)` to every batch; returns its outputs for valid rows.

  Args:
    fn: returns a pytree of arrays with the batch as leading dimension.
    batches: host-local numpy batches with a bool `valid` [B] (padding rows are False).
  Returns:
    The concatenated outputs over all valid rows of all processes (global order), replicated.
  """
  rows, keep = collect_rows(fn, params, batches, mesh, rules)
  return take(rows, keep, mesh)


def device_entries(batch: dict) -> dict:
  """The numeric arrays of an eval batch; clip ids and other strings stay on the host."""
  return {k: v for k, v in batch.items() if np.asarray(v).dtype.kind in "biuf"}


def collect_rows(fn: Callable[[Any, dict], Any], params: Any, batches: Iterable[dict], mesh,
                 rules) -> tuple[Any, np.ndarray]:
  """Like `collect`, but keeps every row (padding included) where it was computed.

  For large per-example outputs (token features of a 10k-clip test set) that must stay
  sharded: nothing is replicated.

  Returns:
    (rows, keep): `rows` = the outputs of all batches concatenated, [num_batches * B, ...],
    sharded along the first axis like a batch; `keep` = int64 [N] positions of the valid rows
    in global order (row `keep[i]` is example i of `collect`'s output).
  """
  jitted = jax.jit(fn)
  outs, valids = [], []
  for batch in _aligned(batches):
    g = shd.host_to_global(device_entries(batch), mesh, rules)
    valid = g.pop("valid")
    with shd.activate(mesh, rules):
      outs.append(jitted(params, g))
    valids.append(multihost_utils.process_allgather(valid, tiled=True))
  if not outs:
    raise ValueError("the evaluation split produced no batches")
  keep = np.nonzero(np.concatenate(valids))[0]
  if keep.size == 0:
    raise ValueError("the evaluation split has no valid examples")
  out_shd = jax.tree.map(lambda a: shd.batch_sharding(mesh, rules, a.ndim), outs[0])
  return jax.jit(_concat, out_shardings=out_shd)(outs), keep


def take(rows: Any, keep: np.ndarray, mesh) -> Any:
  """`rows[keep]` for every leaf, replicated over `mesh` (small features only)."""
  return jax.jit(_take, out_shardings=shd.replicated(mesh))(rows, jnp.asarray(keep))


# Module-level, so repeated evaluations reuse the traced programs.
def _concat(xs: list) -> Any:
  return jax.tree.map(lambda *a: jnp.concatenate(a), *xs)


def _take(rows: Any, idx: jax.Array) -> Any:
  return jax.tree.map(lambda a: a[idx], rows)


def _aligned(batches: Iterable[dict]) -> Iterator[dict]:
  """Yields the same number of batches on every process.

  Hosts read different files, so one may run out first; it then contributes all-invalid copies
  of its last batch while the others finish (otherwise the collective steps would hang).
  """
  if jax.process_count() == 1:
    yield from batches
    return
  it, template = iter(batches), None
  while True:
    batch = next(it, None)
    more = multihost_utils.process_allgather(np.int32(batch is not None))
    if not np.any(more):
      return
    if batch is None:
      if template is None:
        raise ValueError(f"process {jax.process_index()} has no evaluation data while others do")
      batch = dict(template, valid=np.zeros_like(template["valid"]))
    template = batch
    yield batch


def batch_shards(mesh, rules) -> int:
  """Number of shards of an array's leading (batch) axis under `rules`."""
  spec = shd.batch_sharding(mesh, rules, 1).spec
  return int(np.prod([mesh.shape[a] for a in axes(spec[0] if spec else None)]))


def axes(spec) -> tuple:
  """The mesh axes of one PartitionSpec entry (None, a name or a tuple of names) as a tuple."""
  if spec is None:
    return ()
  return tuple(spec) if isinstance(spec, tuple) else (spec,)
