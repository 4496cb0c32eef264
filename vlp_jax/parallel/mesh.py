"""Device mesh from config: axes `data`, `fsdp`, `tensor` (axis types Auto)."""
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


def make_mesh(mesh_cfg: Mapping[str, int],
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Builds the (data, fsdp, tensor) mesh over `devices` (default: all global devices).

  Axis types are Auto, so logical sharding constraints are hints, not assertions.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  if devices == list(jax.devices()):
    # Lets jax order devices for the physical topology (ICI rings on TPU, hosts last).
    array = mesh_utils.create_device_mesh(shape, devices=devices)
  else:
    array = np.asarray(devices, dtype=object).reshape(shape)
  return jax.sharding.Mesh(array, AXES)
