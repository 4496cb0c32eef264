"""Device mesh from config: axes `data`, `fsdp`, `tensor` (axis types Auto).

Multi-slice TPU pods and multi-host GPU clusters: `mesh.dcn.<axis>` splits an axis across
slices (TPU, devices carry `slice_index`) or hosts (GPU: processes), the slow data-centre
network, while the rest of it and the other axes stay on the fast ICI / NVLink links inside a
slice or host. Put only `data` (pure data parallelism: one gradient all-reduce per step) on
DCN; `fsdp` and `tensor` communicate every layer.
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


def device_array(mesh_cfg: Mapping, devices: Sequence) -> np.ndarray:
  """The devices laid out as the (data, fsdp, tensor) mesh: object array of that shape.

  With `mesh.dcn`, devices are grouped by slice (`slice_index`, TPU multi-slice) or else by
  process (one group per host) and each group gets the ICI part of every axis
  (`mesh_utils.create_hybrid_device_mesh`); the group count must equal the DCN product.
  """
  devices = list(devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  dcn = dcn_shape(mesh_cfg, shape)
  if int(np.prod(dcn)) > 1:
    ici = tuple(n // d for n, d in zip(shape, dcn))
    by_slice = len({getattr(d, "slice_index", None) for d in devices}) > 1
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices,
                                                process_is_granule=not by_slice)
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
