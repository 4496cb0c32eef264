"""Device mesh from config: axes `data`, `fsdp`, `tensor` (axis types Auto).

Multi-slice TPU pods and multi-host GPU clusters: `mesh.dcn.<axis>` splits an axis across
slices (TPU, devices carry `slice_index`) or hosts (GPU: groups of consecutive processes),
over the slow data-centre network, while the rest of it and the other axes stay on the fast
ICI / NVLink links inside a slice or host. Put only `data` on DCN (pure data parallelism:
one gradient all-reduce per step); `fsdp` and `tensor` communicate every layer.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
from jax.experimental import mesh_utils
import numpy as np

AXES = ("data", "fsdp", "tensor")


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves the sizes of (data, fsdp, tensor); one size may be -1 (the remaining devices).

  Raises:
    ValueError: more than one -1, a size < 1, or sizes whose product is not `num_devices`.
  """
  sizes = [int(mesh_cfg.get(a, 1)) for a in AXES]
  unknown = [a for a, s in zip(AXES, sizes) if s == -1]
  if len(unknown) > 1:
    raise ValueError(f"mesh: only one axis may be -1, got {dict(zip(AXES, sizes))}")
  bad = [a for a, s in zip(AXES, sizes) if s != -1 and s < 1]
  if bad:
    raise ValueError(f"mesh.{bad[0]} must be >= 1 or -1, got {dict(zip(AXES, sizes))}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if unknown:
    if num_devices % known:
      raise ValueError(f"mesh {dict(zip(AXES, sizes))}: {num_devices} devices are not "
                       f"divisible by {known}")
    sizes[AXES.index(unknown[0])] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"{num_devices} are available")
  return tuple(sizes)


def dcn_shape(mesh_cfg: Mapping, shape: Sequence[int]) -> tuple[int, ...]:
  """Sizes of (data, fsdp, tensor) across slices / hosts (`mesh.dcn`; 1 = inside one).

  Raises:
    ValueError: a DCN size < 1 or one that does not divide its axis.
  """
  dcn = mesh_cfg.get("dcn") or {}
  sizes = tuple(int(dcn.get(a, 1)) for a in AXES)
  for a, d, n in zip(AXES, sizes, shape):
    if d < 1 or n % d:
      raise ValueError(f"mesh.dcn.{a}={d} must be >= 1 and divide mesh.{a}={n}")
  return sizes


def _dcn_groups(devices: Sequence, count: int) -> list[list]:
  """`count` groups of devices that share the fast links: TPU slices (`slice_index`), else
  hosts, as consecutive runs of process indices (one process per host, or one per GPU with
  a host's processes numbered together, as SLURM and torchrun do)."""
  if len({getattr(d, "slice_index", None) for d in devices}) > 1:
    key = lambda d: d.slice_index
  else:
    processes = sorted({d.process_index for d in devices})
    if len(processes) % count:
      raise ValueError(f"mesh.dcn: {len(processes)} processes cannot form {count} DCN groups")
    per_group = len(processes) // count
    rank = {p: i for i, p in enumerate(processes)}
    key = lambda d: rank[d.process_index] // per_group
  groups: dict = {}
  for d in devices:
    groups.setdefault(key(d), []).append(d)
  if len(groups) != count:
    raise ValueError(f"mesh.dcn asks for {count} slices / hosts, the devices form "
                     f"{len(groups)}")
  return [groups[k] for k in sorted(groups)]


def device_array(mesh_cfg: Mapping, devices: Sequence) -> np.ndarray:
  """The devices laid out as the (data, fsdp, tensor) mesh: object array of that shape.

  With `mesh.dcn`, the devices are split into DCN groups (`_dcn_groups`); each group holds
  the ICI part of every axis, laid out for its topology, and the groups tile the DCN part
  (as `mesh_utils.create_hybrid_device_mesh`).
  """
  devices = list(devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  dcn = dcn_shape(mesh_cfg, shape)
  if int(np.prod(dcn)) > 1:
    ici = tuple(n // d for n, d in zip(shape, dcn))
    groups = _dcn_groups(devices, int(np.prod(dcn)))
    blocks = np.empty(len(groups), dtype=object)
    for i, g in enumerate(groups):
      blocks[i] = mesh_utils.create_device_mesh(ici, devices=g)
    return np.block(blocks.reshape(dcn).tolist())
  if devices == list(jax.devices()):
    # Lets jax order devices for the physical topology (ICI rings on TPU, hosts last).
    return mesh_utils.create_device_mesh(shape, devices=devices)
  return np.asarray(devices, dtype=object).reshape(shape)


def make_mesh(mesh_cfg: Mapping[str, int],
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Builds the (data, fsdp, tensor) mesh over `devices` (default: all global devices).

  Axis types are Auto, so logical sharding constraints are hints, not assertions.
  """
  devices = list(jax.devices() if devices is None else devices)
  return jax.sharding.Mesh(device_array(mesh_cfg, devices), AXES)
