"""Initial weights from elsewhere: another run's checkpoint or `transformers` checkpoints.

`config.init` (see configs/alpro_pretrain.py):
  checkpoint  another run's WORKDIR (or its `checkpoints/` dir); params whose path and shape
              match are copied, params it lacks keep their fresh init (listed in the log).
  step        that run's step to read, -1 = its latest.
  text, video "hf:DIR" = a local `transformers` checkpoint directory (vlp_jax/convert/hf.py).

Everything is restored straight into the sharded layout of the target params; only the
`params` subtree of a run's checkpoint is read (not its optimizer state).
"""
from __future__ import annotations

import os
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from vlp_jax.parallel import sharding as shd


def _checkpoint_dir(workdir: str) -> str:
  path = os.path.abspath(workdir)
  sub = os.path.join(path, "checkpoints")
  return sub if os.path.isdir(sub) else path


def _open(workdir: str, step: int) -> tuple[ocp.CheckpointManager, int]:
  """The run's checkpoint manager and the step to read (`step` -1 = latest)."""
  path = _checkpoint_dir(workdir)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no run directory {workdir!r} to read params from")
  manager = ocp.CheckpointManager(path, item_handlers=ocp.PyTreeCheckpointHandler())
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f"{workdir!r} holds no checkpoint (looked in {path!r})")
  if step is None or int(step) < 0:
    return manager, max(steps)
  if int(step) not in steps:
    raise FileNotFoundError(f"{workdir!r} has no checkpoint at step {step}; it has {sorted(steps)}")
  return manager, int(step)


def checkpoint_param_shapes(workdir: str, step: int = -1) -> tuple[int, dict[tuple, tuple]]:
  """(step, {param path tuple: shape}) of a run's checkpoint, read from its metadata only."""
  manager, step = _open(workdir, step)
  try:
    meta = manager.item_metadata(step)
  finally:
    manager.close()
  tree = getattr(meta, "tree", meta)
  if not isinstance(tree, dict) or "params" not in tree:
    raise ValueError(f"checkpoint {workdir!r} step {step} has no `params` entry")
  flat = traverse_util.flatten_dict(tree["params"])
  return step, {k: tuple(v.shape) for k, v in flat.items()}


def _restore(workdir: str, step: int, target: dict) -> dict:
  """Restores the params in `target` (nested dict of ShapeDtypeStruct with shardings)."""
  manager, step = _open(workdir, step)
  item = {"params": target}
  args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape,
                                                      dtype=x.dtype), item)
  try:
    out = manager.restore(step, args=ocp.args.PyTreeRestore(item=item, restore_args=args,
                                                             partial_restore=True))
  finally:
    manager.close()
  return out["params"]


def load_run_params(workdir: str, init_params: Callable[[jax.Array], Any], mesh, rules,
                    step: int = -1) -> tuple[Any, Any]:
  """Loads a run's params into the sharded layout that `init_params` defines.

  Args:
    workdir: the run's WORKDIR (or its `checkpoints/` directory).
    init_params: `rng -> logically boxed params` (a task's `init_params`); only its shapes
      and logical axis names are used (it is traced, never run).
    step: checkpoint step, -1 = latest.
  Returns:
    (params, shardings): float32 params as a nested dict of sharded jax arrays, and their
    `NamedSharding`s.
  Raises:
    FileNotFoundError: no checkpoint there. ValueError: a param the model needs is missing
    or has another shape (the message names it and both shapes).
  """
  with shd.activate(mesh, rules):
    abstract = jax.eval_shape(init_params, jax.random.PRNGKey(0))
    shardings = shd.logical_to_sharding(abstract, mesh, rules)
  abstract = nn.unbox(abstract)
  step, shapes = checkpoint_param_shapes(workdir, step)
  want = traverse_util.flatten_dict(abstract)
  for k, v in want.items():
    if k not in shapes:
      raise ValueError(f"checkpoint {workdir!r} (step {step}) has no param {'/'.join(k)} "
                       f"{tuple(v.shape)}")
    if shapes[k] != tuple(v.shape):
      raise ValueError(f"param {'/'.join(k)}: checkpoint {workdir!r} has shape {shapes[k]}, "
                       f"the model needs {tuple(v.shape)}")
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  return _restore(workdir, step, target), shardings


def copy_matching(params: Any, shardings: Any, workdir: str, step: int = -1) -> Any:
  """`params` with every leaf whose path and shape exist in the run's checkpoint replaced.

  Leaves the checkpoint lacks keep their value (logged); checkpoint params the model lacks
  are logged too. A leaf present in both with different shapes is an error.
  """
  step, shapes = checkpoint_param_shapes(workdir, step)
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


def apply_init(init_cfg, params: Any, shardings: Any, model_config: Any = None) -> Any:
  """Applies `config.init` to freshly initialised (sharded) params; returns the new params.

  Args:
    init_cfg: the `config.init` section (`checkpoint`, `step`, `text`, `video`).
    params: nested dict of jax arrays (the train state's params).
    shardings: matching `NamedSharding`s.
    model_config: the model's config (`ALPROConfig`), needed for `hf:` imports.
  """
  if init_cfg.get("checkpoint", ""):
    params = copy_matching(params, shardings, init_cfg.checkpoint, int(init_cfg.get("step", -1)))
  hf_keys = [k for k in ("text", "video") if init_cfg.get(k, "")]
  if not hf_keys:
    return params
  if model_config is None:
    raise ValueError(f"config.init.{hf_keys[0]}: this task's model has no transformers import")
  from vlp_jax.convert import hf
  # Imports work on host arrays: the encoders are copied once at start, and host memory
  # holds a few copies of them easily.
  host = jax.tree.map(np.asarray, jax.device_get(params))
  for key in hf_keys:
    path = _hf_dir(init_cfg[key], key)
    fn = hf.init_alpro_text if key == "text" else hf.init_alpro_video
    host = fn(host, path, model_config)
    logging.info("init.%s: imported %s", key, path)
  return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x, np.float32), s), host, shardings)
