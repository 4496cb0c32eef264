"""Initial weights from elsewhere: another run's checkpoint or `transformers` checkpoints.

`config.init`:
  checkpoint  another run's WORKDIR (or its `checkpoints/` dir); params whose collection, path
              and shape match are copied, params it lacks keep their fresh init (logged).
  step        that run's step to read, -1 = its latest.
  <key>       "hf:DIR" = a local `transformers` checkpoint directory, for each key the task
              lists in `pretrained_keys` (ALPRO: `text`, `video`); the task converts it.

Everything is placed straight into the sharded layout of the target params: checkpoints are
restored by orbax into the target shardings, and `hf:` imports are converted on the host and
placed shard by shard (`jax.make_array_from_callback`), so this works when a parameter's shards
live on several hosts. Only the `params` of a run's checkpoint are read (not its optimizer
state).
"""
from __future__ import annotations

import os
from typing import Any
from collections.abc import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from vlp_jax.convert import stacked
from vlp_jax.core import checkpoint as ckpt_lib
from vlp_jax.parallel import sharding as shd

_NOT_PRETRAINED = ("checkpoint", "step")


def _open(workdir: str, step: int | None) -> tuple[ocp.CheckpointManager, int]:
  """The run's checkpoint manager (read only) and the step to read (`step` -1 = latest)."""
  path = ckpt_lib.checkpoint_dir(workdir)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no run directory {workdir!r} to read params from")
  steps = ckpt_lib.all_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"{workdir!r} holds no checkpoint (looked in {path!r})")
  if step is None or int(step) < 0:
    step = steps[-1]
  elif int(step) not in steps:
    raise FileNotFoundError(f"{workdir!r} has no checkpoint at step {step}; it has {steps}")
  manager = ocp.CheckpointManager(path, item_handlers=ckpt_lib.read_handlers())
  return manager, int(step)


def checkpoint_param_shapes(workdir: str, step: int = -1) -> tuple[int, dict[tuple, tuple]]:
  """(step, {(collection, *param path): shape}) of a run's checkpoint, from its metadata only."""
  manager, step = _open(workdir, step)
  try:
    meta = manager.item_metadata(step)[ckpt_lib.STATE]
  finally:
    manager.close()
  tree = getattr(meta, "tree", meta)
  if not isinstance(tree, dict) or "params" not in tree:
    raise ValueError(f"checkpoint {workdir!r} step {step} has no `params` entry")
  flat = traverse_util.flatten_dict(tree["params"])
  return step, {k: tuple(v.shape) for k, v in flat.items()}


def _restore(workdir: str, step: int, target: dict) -> dict:
  """Restores the params in `target` ({collection: nested dict of ShapeDtypeStruct with
  shardings}); params of the checkpoint that `target` lacks are not read."""
  manager, step = _open(workdir, step)
  item = {"params": target}
  args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape,
                                                      dtype=x.dtype), item)
  try:
    out = manager.restore(step, args=ocp.args.Composite(**{
        ckpt_lib.STATE: ocp.args.PyTreeRestore(item=item, restore_args=args,
                                               partial_restore=True)}))
  finally:
    manager.close()
  return out[ckpt_lib.STATE]["params"]


def load_run_params(workdir: str, init_params: Callable[[jax.Array], Any], mesh, rules,
                    step: int = -1, collection: str = "model") -> tuple[Any, Any]:
  """Loads one collection of a run's params into the sharded layout `init_params` defines.

  Args:
    workdir: the run's WORKDIR (or its `checkpoints/` directory).
    init_params: `rng -> logically boxed params` of the collection; only its shapes and logical
      axis names are used (it is traced, never run).
    step: checkpoint step, -1 = latest.
    collection: the parameter collection to read.
  Returns:
    (params, shardings): float32 params as a nested dict of sharded jax arrays, and their
    `NamedSharding`s.
  Raises:
    FileNotFoundError: no checkpoint there. ValueError: a param the model needs is missing
    or has another shape (the message names it and both shapes).
  """
  target, shardings = shd.abstract_sharded(init_params, mesh, rules)
  step, shapes = checkpoint_param_shapes(workdir, step)
  for k, v in traverse_util.flatten_dict(target).items():
    key = (collection,) + k
    if key not in shapes:
      raise ValueError(f"checkpoint {workdir!r} (step {step}) has no param "
                       f"{'/'.join(key)} {tuple(v.shape)}")
    if shapes[key] != tuple(v.shape):
      raise ValueError(f"param {'/'.join(key)}: checkpoint {workdir!r} has shape {shapes[key]}, "
                       f"the model needs {tuple(v.shape)}")
  return _restore(workdir, step, {collection: target})[collection], shardings


def _scanned(shapes: dict[tuple, tuple]) -> bool:
  return stacked.is_stacked(traverse_util.unflatten_dict({k: 0 for k in shapes}))


def copy_matching(params: dict, shardings: dict, workdir: str, step: int = -1) -> dict:
  """`params` ({collection: tree}) with every leaf whose collection, path and shape exist in the
  run's checkpoint replaced.

  Leaves the checkpoint lacks keep their value (logged); checkpoint params the model lacks
  are logged too. A leaf present in both with different shapes is an error.
  """
  step, shapes = checkpoint_param_shapes(workdir, step)
  theirs, ours = _scanned(shapes), stacked.is_stacked(params)
  if theirs != ours:
    raise ValueError(f"init.checkpoint: {workdir!r} was trained with model.scan_layers={theirs} "
                     f"but this model has model.scan_layers={ours}; set "
                     f"--config.model.scan_layers={theirs} (the layouts differ: stacked layers "
                     "vs one entry per layer)")
  flat = traverse_util.flatten_dict(params)
  flat_shd = traverse_util.flatten_dict(shardings)
  target, fresh = {}, []
  for k, v in flat.items():
    if k not in shapes:
      fresh.append("/".join(k))
      continue
    if shapes[k] != tuple(v.shape):
      raise ValueError(f"init.checkpoint: param {'/'.join(k)} has shape {shapes[k]} in "
                       f"{workdir!r} but {tuple(v.shape)} in this model")
    target[k] = jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=flat_shd[k])
  if not target:
    raise ValueError(f"init.checkpoint: no param of this model is in {workdir!r}")
  unused = sorted("/".join(k) for k in shapes if k not in flat)
  restored = traverse_util.flatten_dict(
      _restore(workdir, step, traverse_util.unflatten_dict(target)))
  flat.update(restored)
  logging.info("init.checkpoint: %d params from %s (step %d)", len(restored), workdir, step)
  if fresh:
    logging.info("init.checkpoint: %d params keep their fresh init: %s", len(fresh),
                 ", ".join(fresh))
  if unused:
    logging.info("init.checkpoint: %d checkpoint params unused: %s", len(unused),
                 ", ".join(unused))
  return traverse_util.unflatten_dict(flat)


def _hf_dir(value: str, key: str) -> str:
  if not value.startswith("hf:"):
    raise ValueError(f"config.init.{key} must be '' or 'hf:DIR', got {value!r}")
  path = value[3:]
  if not os.path.isdir(path):
    raise FileNotFoundError(f"config.init.{key}: {path!r} is not a directory")
  return path


def requested(init_cfg) -> bool:
  """Whether `config.init` names anything to load."""
  if init_cfg is None:
    return False
  return any(init_cfg.get(k, "") for k in init_cfg if k != "step")


def place_host_leaves(host: Any, params: Any, shardings: Any) -> Any:
  """`params` with every numpy leaf of `host` placed into the matching sharding (each device
  gets only its shard); `host` leaves that are not numpy arrays keep the `params` leaf."""
  def place(h, p, s):
    if not isinstance(h, np.ndarray):
      return p
    value = np.asarray(h, dtype=p.dtype)
    if value.shape != p.shape:
      raise ValueError(f"an imported tensor has shape {value.shape}, the param {p.shape}")
    return jax.make_array_from_callback(value.shape, s, lambda index: value[index])
  return jax.tree.map(place, host, params, shardings,
                      is_leaf=lambda x: isinstance(x, (np.ndarray, jax.ShapeDtypeStruct)))


def apply_init(init_cfg, task, params: dict, shardings: dict) -> dict:
  """Applies `config.init` to freshly initialised (sharded) params; returns the new params.

  Args:
    init_cfg: the `config.init` section.
    task: the run's `Task` (its `pretrained_keys` and `import_pretrained`).
    params: {collection: nested dict of jax arrays} (the train state's params).
    shardings: matching `NamedSharding`s.
  """
  if init_cfg.get("checkpoint", ""):
    params = copy_matching(params, shardings, init_cfg.checkpoint, int(init_cfg.get("step", -1)))
  keys = [k for k in init_cfg if k not in _NOT_PRETRAINED and init_cfg.get(k, "")]
  if not keys:
    return params
  unknown = [k for k in keys if k not in task.pretrained_keys]
  if unknown:
    raise ValueError(f"config.init.{unknown[0]}: task {task.config.task!r} imports "
                     f"{list(task.pretrained_keys) or 'no'} transformers checkpoints")
  # Shapes only: the live values may be spread over hosts, and imports replace whole tensors.
  host = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  for key in keys:
    path = _hf_dir(init_cfg[key], key)
    host = task.import_pretrained(key, path, host)
    logging.info("init.%s: imported %s", key, path)
  return place_host_leaves(host, params, shardings)
